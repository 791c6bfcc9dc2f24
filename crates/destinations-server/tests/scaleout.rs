//! Several `destinations serve` processes on one real nats-server (`[hub.queue] kind = "nats"`):
//! one backlog, every send delivered, nothing lost when a server is killed; counted by send id.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Server, WITHIN, cli, send_runs, temp_config};
use destinations_testkit::{NatsServer, Receiver, Reply, SseClient, TempDir};
use serde_json::{Value, json};

/// A server's config on `nats`, with a short lease so a killed server's sends come back
/// quickly.
fn on_nats(nats: &NatsServer) -> String {
    format!(
        r#"
[hub.queue]
kind = "nats"
url = "{}"
lease = "2s"

[destinations.http]
kind = "http"
timeout = "5s"
allow_networks = ["127.0.0.0/8"]

[destinations.sse]
kind = "sse"
replay = 100

[destinations.emit]
kind = "emit"

[destinations.emit.webhook]
allow_networks = ["127.0.0.0/8"]
"#,
        nats.url()
    )
}

async fn start(config: &str) -> Server {
    Server::start(Some(config)).await
}

/// How many times each send id arrived (its `Idempotency-Key`, answered 2xx).
fn arrivals(receiver: &Receiver) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in receiver.accepted_requests() {
        if let Some(key) = request.header("idempotency-key") {
            *counts.entry(key.to_owned()).or_default() += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_one_backlog_and_a_killed_one_loses_nothing() {
    let nats = NatsServer::start().await;
    // A slow receiver, so the kill comes while every server still delivers.
    let receiver = Receiver::scripted(|_| {
        Reply::After(Duration::from_millis(300), Box::new(Reply::Status(200)))
    })
    .await;
    let url = receiver.url("/hook");
    let env = on_nats(&nats);
    let a = start(&env).await;
    let b = start(&env).await;
    let c = start(&env).await;
    let mut ids = Vec::new();
    for server in [&a, &b, &c] {
        ids.extend(send_runs(server, &url, 600, 100).await);
    }
    // Kill one server while the three deliver: what it leased comes back to the others when
    // its lease runs out.
    receiver.wait_for_accepted(150, WITHIN).await;
    c.kill9().await;
    let before = receiver.accepted_keys().len();
    assert!(
        before < ids.len(),
        "killed while delivering ({before} arrived)"
    );

    receiver.wait_for_accepted(ids.len(), WITHIN).await;
    let expected: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let counts = arrivals(&receiver);
    assert!(
        counts.keys().all(|key| expected.contains(key.as_str())),
        "a request arrived for a send that was never accepted"
    );
    assert_eq!(counts.len(), ids.len(), "every send arrived");
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    // At least once: only the sends the killed server had in hand may come twice.
    assert!(
        duplicates <= 100,
        "{duplicates} duplicates: more than the killed server could have had in hand"
    );
    eprintln!("{} sends, {duplicates} delivered twice", ids.len());

    // Every surviving server answers for every send, whoever accepted it.
    for id in [&ids[0], &ids[650], &ids[ids.len() - 1]] {
        for server in [&a, &b] {
            let status = server.final_status(id).await;
            assert_eq!(status["state"], "delivered", "{status}");
        }
    }
    assert!(a.terminate().await.success());
    assert!(b.terminate().await.success());
}

/// POST one send to `url` through `server`: the answer's status and body.
async fn post_one(server: &Server, url: &str) -> (u16, Value) {
    server
        .post(
            "/v1/runs",
            &json!({"sends": [{"destination": "http", "payload": {"url": url}}]}),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_mid_delivery_loses_nothing_and_sends_meanwhile_get_503() {
    let mut nats = NatsServer::start().await;
    let receiver = Receiver::scripted(|_| {
        Reply::After(Duration::from_millis(5), Box::new(Reply::Status(200)))
    })
    .await;
    let url = receiver.url("/hook");
    let server = start(&on_nats(&nats)).await;
    let ids = send_runs(&server, &url, 300, 100).await;
    // nats-server dies (kill -9) while the server delivers.
    receiver.wait_for_accepted(20, WITHIN).await;
    nats.kill().await;
    let refused = tokio::time::timeout(WITHIN, async {
        loop {
            let (code, body) = post_one(&server, &url).await;
            if code != 202 {
                return (code, body);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("sends were still accepted after nats-server died"));
    assert_eq!(refused.0, 503, "{}", refused.1);
    let message = refused.1["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("not reachable"), "{}", refused.1);

    nats.restart().await;
    let accepted = tokio::time::timeout(WITHIN, async {
        loop {
            let (code, body) = post_one(&server, &url).await;
            if code == 202 {
                return body["ids"][0].as_str().unwrap_or_default().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("sends were still refused after nats-server came back"));
    let status = server.final_status(&accepted).await;
    assert_eq!(status["state"], "delivered", "{status}");
    // Everything accepted before the outage arrived, once or more.
    receiver.wait_for_accepted(ids.len() + 1, WITHIN).await;
    let arrived = arrivals(&receiver);
    assert!(
        ids.iter().all(|id| arrived.contains_key(id)),
        "a send accepted before nats-server died never arrived"
    );
    assert!(server.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_takes_sends_and_a_worker_delivers_them() {
    let nats = NatsServer::start().await;
    let receiver = Receiver::start().await;
    let url = receiver.url("/hook");
    let config = on_nats(&nats);
    let api = Server::start_with(Some(&config), &[("DESTINATIONS_ROLE", "api")]).await;
    let ids = send_runs(&api, &url, 100, 50).await;
    // No server delivers yet.
    let (_, status) = api.get(&format!("/v1/events/{}", ids[0])).await;
    assert_eq!(status["state"], "queued", "{status}");
    assert!(receiver.requests().is_empty());

    let worker = Server::start_with(Some(&config), &[("DESTINATIONS_ROLE", "worker")]).await;
    receiver.wait_for_accepted(ids.len(), WITHIN).await;
    let status = api.final_status(&ids[99]).await;
    assert_eq!(status["state"], "delivered", "{status}");
    // A worker answers probes and metrics only.
    let (code, body) = worker
        .post(
            "/v1/runs",
            &json!({"sends": [{"destination": "http", "payload": {"url": url}}]}),
        )
        .await;
    assert_eq!(code, 404, "{body}");
    let (code, _) = worker.get("/healthz").await;
    assert_eq!(code, 200);
    assert!(api.terminate().await.success());
    assert!(worker.terminate().await.success());
}

#[tokio::test]
async fn api_and_worker_roles_need_a_shared_queue() {
    let dir = TempDir::new("roles");
    for role in ["api", "worker"] {
        let (status, said) =
            Server::refused_start_with(None, dir.path(), &[("DESTINATIONS_ROLE", role)]).await;
        assert!(!status.success());
        assert!(said.contains("nats"), "--role {role}: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_subscriber_on_one_server_sees_sends_made_on_another_and_resumes_on_a_third() {
    let nats = NatsServer::start().await;
    let config = on_nats(&nats);
    let a = start(&config).await;
    let b = start(&config).await;
    let c = start(&config).await;
    let http = reqwest::Client::new();
    let mut on_c = SseClient::open(&http, &format!("{}/v1/sse/orders", c.base), &[]).await;
    // Ten events made on A in one run: stored together, leased together, published in order
    // by whichever server delivers them.
    let sends: Vec<Value> = (0..10)
        .map(|n| json!({"destination": "sse", "payload": {"channel": "order", "stream": "orders", "payload": {"n": n}}}))
        .collect();
    let ids = a.post_run(sends).await;
    assert_eq!(ids.len(), 10);
    for (n, id) in ids.iter().enumerate() {
        let event = tokio::time::timeout(WITHIN, on_c.next_event())
            .await
            .unwrap_or_else(|_| panic!("event {n} never reached the subscriber on C"))
            .unwrap_or_else(|| panic!("the stream on C ended"));
        assert_eq!(event.id.as_deref(), Some(id.as_str()), "in order");
        assert_eq!(event.json(), json!({"n": n}));
    }
    // The subscriber drops after the fourth event and resumes on B.
    let mut on_b = SseClient::open(
        &http,
        &format!("{}/v1/sse/orders", b.base),
        &[("last-event-id", ids[3].as_str())],
    )
    .await;
    for (n, id) in ids.iter().enumerate().skip(4) {
        let event = tokio::time::timeout(WITHIN, on_b.next_event())
            .await
            .unwrap_or_else(|_| panic!("event {n} was not replayed on B"))
            .unwrap_or_else(|| panic!("the stream on B ended"));
        assert_eq!(
            event.id.as_deref(),
            Some(id.as_str()),
            "replayed in order from B"
        );
    }
    for server in [a, b, c] {
        assert!(server.terminate().await.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_made_on_one_server_hears_emits_made_on_another() {
    let nats = NatsServer::start().await;
    let receiver = Receiver::start().await;
    let config = on_nats(&nats);
    let a = start(&config).await;
    let b = start(&config).await;
    let hook = receiver.url("/listener");
    let query = format!("/v1/subscriptions?emitter_id=checkout&listener_id={hook}");
    let (code, body) = b.post(&query, &json!(null)).await;
    assert_eq!(code, 201, "{body}");
    // Server A has it too (every server applies every change, in one order).
    tokio::time::timeout(WITHIN, async {
        loop {
            let (_, listed) = a.get("/v1/subscriptions").await;
            if listed["subscriptions"]
                .as_array()
                .is_some_and(|s| s.len() == 1)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("server A never had the subscription made on B"));

    let (code, body) = a
        .post(
            "/v1/send/emit",
            &json!({"event": {"order": 42}, "emitter_id": "checkout"}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    receiver.wait_for_accepted(1, WITHIN).await;
    let call = receiver
        .requests()
        .pop()
        .unwrap_or_else(|| panic!("no webhook call"));
    assert_eq!(call.json()["event"], json!({"order": 42}));
    // The emitter's history shows it on every server.
    for server in [&a, &b] {
        tokio::time::timeout(WITHIN, async {
            loop {
                let (_, history) = server.get("/v1/emitters/checkout/events?limit=10").await;
                if let Some(first) = history["events"].as_array().and_then(|h| h.first()) {
                    assert_eq!(
                        first["event"]["raw_event"],
                        json!({"order": 42}),
                        "{history}"
                    );
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("a server's history never showed the emit"));
    }

    // Removed on A: gone from B.
    let code = a
        .http
        .delete(format!("{}{query}", a.base))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(code, 200);
    tokio::time::timeout(WITHIN, async {
        loop {
            let (_, listed) = b.get("/v1/subscriptions").await;
            if listed["subscriptions"]
                .as_array()
                .is_some_and(Vec::is_empty)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("server B kept a subscription removed on A"));
    assert!(a.terminate().await.success());
    assert!(b.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_creates_the_streams_and_says_when_nats_cannot_be_reached() {
    let mut nats = NatsServer::start().await;
    let config = temp_config(&on_nats(&nats));
    let config = config.display().to_string();
    let (ok, out, err) = cli(&["check", "--config", &config], &[]).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("queue: nats") && out.contains("ok, 0 sends waiting"),
        "{out}"
    );
    // The streams it made are the ones a server then uses: a server starts on them.
    let server = start(&on_nats(&nats)).await;
    assert!(server.terminate().await.success());

    nats.kill().await;
    let (ok, out, err) = cli(&["check", "--config", &config], &[]).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("hub.queue (nats at nats://127.0.0.1:") && err.contains("cannot connect"),
        "{err}"
    );
}
