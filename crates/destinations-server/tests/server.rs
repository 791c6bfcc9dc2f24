//! The `destinations` binary end to end: real server processes on 127.0.0.1, real receivers.

use std::io::Read;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod common;

use common::{BIN, Server, WITHIN, cli, error_code, temp_config};
use destinations_testkit::{Receiver, Reply, SseClient, TempDir, files_under};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn embedded_defaults_deliver_a_send_and_report_it_delivered() {
    let receiver = Receiver::start().await;
    let server = Server::start(None).await;
    let (code, body) = server
        .post(
            "/v1/send/http",
            &json!({"url": receiver.url("/hook"), "data": {"name": "Luke"}}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let status = server.final_status(&id).await;
    assert_eq!(status["state"], "delivered", "{status}");
    assert_eq!(status["attempts"], 1);
    assert_eq!(status["destination"], "http");
    assert_eq!(status["id"], id.as_str());
    assert_eq!(status["response"]["status"], 200);
    let request = receiver
        .requests()
        .pop()
        .unwrap_or_else(|| panic!("one request"));
    assert_eq!(request.header("idempotency-key"), Some(id.as_str()));
    assert_eq!(request.json(), json!({"name": "Luke"}));
}

#[tokio::test]
async fn embedded_defaults_write_s3_sends_as_objects_under_data() {
    let dir = TempDir::new("server-s3");
    let server = Server::start_in(None, &[], Some(dir.path())).await;
    let sends: Vec<Value> = (0..3)
        .map(|n| json!({"destination": "s3", "payload": {"bucket": "analytics", "prefix": "signups", "payload": {"n": n}}}))
        .collect();
    let (code, body) = server.post("/v1/runs", &json!({"sends": sends})).await;
    assert_eq!(code, 202, "{body}");
    let id = body["ids"][0].as_str().unwrap_or_default().to_owned();
    let (_, status) = server.get(&format!("/v1/events/{id}")).await;
    assert_eq!(
        status["state"], "queued",
        "batched for up to a minute: {status}"
    );
    let message = server
        .refused(
            "/v1/send/s3",
            &json!({"bucket": "analytics", "prefix": "../escape", "payload": {}}),
        )
        .await;
    assert!(message.contains("`prefix`"), "{message}");

    // SIGTERM flushes the open batch.
    assert!(server.terminate().await.success());
    let folder = dir.path().join("data/objects/analytics/signups");
    let found = files_under(&folder);
    assert_eq!(
        found.len(),
        1,
        "one object under {}: {found:?}",
        folder.display()
    );
    let relative = found[0]
        .strip_prefix(&folder)
        .unwrap_or_else(|e| panic!("{e}"));
    let parts: Vec<_> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert_eq!(parts.len(), 5, "YYYY/MM/DD/HH/FILE: {relative:?}");
    assert!(parts[4].starts_with(&format!(
        "{}-{}-{}-{}-",
        parts[0], parts[1], parts[2], parts[3]
    )));
    assert!(parts[4].ends_with(".gz"));
    let bytes = std::fs::read(&found[0]).unwrap_or_else(|e| panic!("{e}"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(text, "{\"n\":0}\n{\"n\":1}\n{\"n\":2}\n");
}

#[tokio::test]
async fn embedded_defaults_write_emails_to_the_outbox() {
    let dir = TempDir::new("server-email");
    let server = Server::start_in(None, &[], Some(dir.path())).await;
    let (code, body) = server
        .post(
            "/v1/send/email",
            &json!({"subject": "Deploy finished", "text": "v1.2.3 is live.", "html": "<p>v1.2.3 is <b>live</b>.</p>"}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let status = server.final_status(&id).await;
    assert_eq!(status["state"], "delivered", "{status}");
    let path = dir.path().join(format!("data/outbox/{id}.eml"));
    assert_eq!(
        status["response"]["location"],
        format!("./data/outbox/{id}.eml")
    );
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(raw.contains("Subject: Deploy finished"), "{raw}");
    assert!(raw.contains("To: <owner@localhost>"), "{raw}");
    assert!(raw.contains("multipart/alternative"), "{raw}");
    let message = server
        .refused(
            "/v1/send/email",
            &json!({"subject": "x", "text": "y", "to": ["someone@else.test"]}),
        )
        .await;
    assert!(message.contains("`to[0]`"), "{message}");
}

#[tokio::test]
async fn embedded_defaults_stream_sse_sends_to_subscribers_and_stop_cleanly() {
    // An API token guards the API, not the streams (they have read tokens of their own).
    let server = Server::start_with(
        None,
        &[("DESTINATIONS__API_TOKEN", "api-secret-for-tests-0001")],
    )
    .await;
    let http = reqwest::Client::new();
    let mut stream = SseClient::open(&http, &format!("{}/v1/sse/default", server.base), &[]).await;
    let response = http
        .post(format!("{}/v1/send/sse", server.base))
        .bearer_auth("api-secret-for-tests-0001")
        .json(&json!({"channel": "greeting", "payload": {"hello": "world"}}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 202);
    let id = response.json::<Value>().await.unwrap_or_default()["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let event = stream
        .next_event()
        .await
        .unwrap_or_else(|| panic!("no event"));
    assert_eq!(event.event.as_deref(), Some("greeting"));
    assert_eq!(event.id.as_deref(), Some(id.as_str()));
    assert_eq!(event.json(), json!({"hello": "world"}));
    // SIGTERM ends the open stream instead of waiting for the subscriber to hang up.
    assert!(server.terminate().await.success());
    assert!(stream.next_event().await.is_none(), "the stream ended");
}

#[tokio::test]
async fn subscriptions_and_emits_over_the_api() {
    let receiver = Receiver::start().await;
    let server = Server::start(None).await;
    let hook = receiver.url("/listener");
    let query = format!("/v1/subscriptions?emitter_id=p_*&listener_id={hook}&event_name=");
    let (code, body) = server.post(&query, &json!(null)).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = server.post(&query, &json!(null)).await;
    assert_eq!(
        (code, &body["created"]),
        (200, &json!(false)),
        "idempotent: {body}"
    );
    let (code, body) = server
        .post(
            "/v1/subscriptions",
            &json!({"emitter_id": "p_demo", "listener_id": "in-process", "event_name": "refunds"}),
        )
        .await;
    assert_eq!(code, 201, "a JSON body works too: {body}");
    let (_, body) = server.get("/v1/subscriptions").await;
    assert_eq!(
        body["subscriptions"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    let (code, body) = server
        .post(
            "/v1/subscriptions?emitter_id=p_*&listener_id=not%20a%20name",
            &json!(null),
        )
        .await;
    assert_eq!(code, 400, "{body}");

    let (code, body) = server
        .post(
            "/v1/send/emit",
            &json!({"event": {"order": 7}, "emitter_id": "p_demo"}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let emit_id = body["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(server.final_status(&emit_id).await["state"], "delivered");
    receiver.wait_for_accepted(1, WITHIN).await;
    let delivered = receiver
        .requests()
        .pop()
        .unwrap_or_else(|| panic!("no webhook call"));
    assert_eq!(delivered.json()["event"], json!({"order": 7}));
    assert_eq!(delivered.json()["metadata"]["emit_id"], emit_id.as_str());

    let (_, body) = server.get("/v1/emitters/p_demo/events?limit=10").await;
    let events = body["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1, "{body}");
    assert_eq!(events[0]["event"], json!({"raw_event": {"order": 7}}));
    assert_eq!(
        events[0]["metadata"],
        json!({"emitter_id": "p_demo", "emit_id": emit_id, "name": null})
    );

    let response = server
        .http
        .delete(format!("{}{query}", server.base))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
    let (_, body) = server
        .post(
            "/v1/send/emit",
            &json!({"event": {"order": 8}, "emitter_id": "p_demo"}),
        )
        .await;
    let status = server
        .final_status(body["id"].as_str().unwrap_or_default())
        .await;
    assert_eq!(status["response"]["location"], "0 listener(s)", "{status}");
    assert_eq!(receiver.requests().len(), 1, "unsubscribed: nothing more");
}

#[tokio::test]
async fn an_operator_pauses_and_resumes_a_host_and_listeners_hear_of_it_on_endpoints() {
    let receiver = Receiver::start().await;
    let listener = Receiver::start().await;
    let server = Server::start(None).await;
    let (code, body) = server
        .post(
            "/v1/subscriptions",
            &json!({"emitter_id": "*", "listener_id": listener.url("/ops"), "event_name": "$endpoints"}),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let host = receiver.addr().to_string();
    let (code, body) = server
        .post(&format!("/v1/endpoints/{host}/pause"), &json!(null))
        .await;
    assert_eq!((code, &body["state"]), (200, &json!("paused")), "{body}");
    let (code, body) = server
        .post("/v1/send/http", &json!({"url": receiver.url("/hook")}))
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    listener.wait_for_accepted(1, WITHIN).await;
    let paused = listener.requests()[0].json();
    assert_eq!(paused["event"]["change"], "paused", "{paused}");
    assert_eq!(paused["event"]["by"], "operator");
    assert_eq!(paused["event"]["target"], host.as_str());
    let (_, body) = server.get("/v1/endpoints").await;
    let endpoint = body["endpoints"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["target"] == host.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("{host} not listed: {body}"));
    assert_eq!(endpoint["state"], "paused", "{endpoint}");
    assert_eq!(endpoint["paused_by"], "operator");
    let (_, status) = server.get(&format!("/v1/events/{id}")).await;
    assert_eq!(
        (&status["state"], &status["attempts"]),
        (&json!("queued"), &json!(0)),
        "held, unattempted: {status}"
    );
    assert!(receiver.requests().is_empty());
    let (code, body) = server
        .post(&format!("/v1/endpoints/{host}/resume"), &json!(null))
        .await;
    assert_eq!((code, &body["was_held"]), (200, &json!(true)), "{body}");
    assert_eq!(server.final_status(&id).await["state"], "delivered");
    listener.wait_for_accepted(2, WITHIN).await;
    assert_eq!(listener.requests()[1].json()["event"]["change"], "resumed");
    let (_, body) = server.get("/v1/endpoints").await;
    let endpoint = body["endpoints"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["target"] == host.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(endpoint["state"], "open", "{body}");
    assert!(
        endpoint["concurrency"]["http"].as_u64() >= Some(1),
        "{body}"
    );
    let metrics = server.text("/metrics").await;
    assert!(
        metrics.contains(&format!(
            "destinations_endpoint_paused{{kind=\"http\",target=\"{host}\"}} 0"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_api_token_guards_subscriptions_too() {
    let server = Server::start_with(
        None,
        &[("DESTINATIONS__API_TOKEN", "api-secret-for-tests-0001")],
    )
    .await;
    let (code, body) = server.get("/v1/subscriptions").await;
    assert_eq!(code, 401, "{body}");
    let response = server
        .http
        .get(format!("{}/v1/subscriptions", server.base))
        .bearer_auth("api-secret-for-tests-0001")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn a_run_is_released_all_or_nothing() {
    let receiver = Receiver::start().await;
    let server = Server::start(None).await;
    let mut sends: Vec<Value> = (0..3)
        .map(|n| json!({"destination": "http", "payload": {"url": receiver.url("/refused-run"), "data": {"n": n}}}))
        .collect();
    sends.push(json!({"destination": "http", "payload": {"url": "gopher://127.0.0.1/"}}));
    let (code, body) = server
        .post("/v1/runs", &json!({"run_id": "bad", "sends": sends}))
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(error_code(&body), "invalid_payload");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`sends[3].payload.url`") && message.contains("gopher"),
        "{message}"
    );

    let sends: Vec<Value> = (0..100)
        .map(|n| json!({"destination": "http", "payload": {"url": receiver.url("/good-run"), "data": {"n": n}}}))
        .collect();
    let (code, body) = server
        .post("/v1/runs", &json!({"run_id": "good", "sends": sends}))
        .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["run_id"], "good");
    let ids: Vec<String> = body["ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ids.len(), 100);
    receiver.wait_for_accepted(100, WITHIN).await;
    assert_eq!(
        receiver.accepted_keys(),
        ids.iter().cloned().collect(),
        "the same 100 ids arrived"
    );
    // The refused run's sends came first; once the good run has arrived they would have too.
    assert!(receiver.requests().iter().all(|r| r.uri == "/good-run"));

    let (code, body) = server
        .post("/v1/runs", &json!({"sends": [{"destination": "http", "payload": {"url": receiver.url("/failed-run")}}], "failed": true}))
        .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(
        body["ids"],
        json!([]),
        "a failed run is discarded by default"
    );
}

#[tokio::test]
async fn errors_carry_a_code_and_the_right_status() {
    let server = Server::start(Some(
        r#"
        max_request_bytes = 4096
        [destinations.http]
        kind = "http"
        allow_networks = ["127.0.0.0/8"]
        max_payload_bytes = 200
        "#,
    ))
    .await;
    let (code, body) = server
        .post("/v1/send/nowhere", &json!({"url": "http://127.0.0.1/"}))
        .await;
    assert_eq!(
        (code, error_code(&body)),
        (404, "unknown_destination"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("configured: http")
    );

    let (code, body) = server
        .post_raw("/v1/send/http", b"{\"url\":".to_vec())
        .await;
    assert_eq!(
        (code, error_code(&body)),
        (400, "invalid_payload"),
        "{body}"
    );

    let (code, body) = server
        .post(
            "/v1/send/http",
            &json!({"url": "http://127.0.0.1/", "data": "x".repeat(300)}),
        )
        .await;
    assert_eq!(
        (code, error_code(&body)),
        (413, "payload_too_large"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_payload_bytes")
    );

    let (code, body) = server.post_raw("/v1/send/http", vec![b' '; 8192]).await;
    assert_eq!(
        (code, error_code(&body)),
        (413, "payload_too_large"),
        "{body}"
    );

    let (code, body) = server
        .post("/v1/runs", &json!({"sends": [], "extra": 1}))
        .await;
    assert_eq!(
        (code, error_code(&body)),
        (400, "invalid_payload"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("`extra`")
    );

    let (code, body) = server
        .get("/v1/events/01a208c6-6307-7f2f-8594-f5794d754c2e")
        .await;
    assert_eq!((code, error_code(&body)), (404, "not_found"), "{body}");
    let (code, body) = server.get("/v1/events/not-an-id").await;
    assert_eq!((code, error_code(&body)), (400, "invalid_id"), "{body}");
    let (code, body) = server.get("/v2/anything").await;
    assert_eq!((code, error_code(&body)), (404, "not_found"), "{body}");
}

#[tokio::test]
async fn a_full_queue_answers_503_and_loses_nothing_accepted() {
    let open = Arc::new(AtomicBool::new(false));
    let is_open = open.clone();
    // Hold every request until the test opens the gate.
    let receiver = Receiver::scripted(move |_| {
        if is_open.load(Ordering::SeqCst) {
            Reply::Status(200)
        } else {
            Reply::After(Duration::from_secs(3600), Box::new(Reply::Status(200)))
        }
    })
    .await;
    let server = Server::start(Some(
        r#"
        [hub.queue]
        max_events = 3
        wait = "200ms"
        [destinations.http]
        kind = "http"
        timeout = "500ms"
        allow_networks = ["127.0.0.0/8"]
        retry = { initial_delay = "10ms", max_delay = "50ms", max_attempts = 1000 }
        "#,
    ))
    .await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let (code, body) = server
            .post(
                "/v1/send/http",
                &json!({"url": receiver.url("/q"), "data": {"n": n}}),
            )
            .await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().unwrap_or_default().to_owned());
    }
    let (code, body) = server
        .post("/v1/send/http", &json!({"url": receiver.url("/q")}))
        .await;
    assert_eq!((code, error_code(&body)), (503, "queue_full"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("queue.max_events")
    );
    // With no room at all, the body is not even read: this one is not JSON, and the answer is
    // still 503, not 400.
    let (code, body) = server.post_raw("/v1/runs", b"not json".to_vec()).await;
    assert_eq!((code, error_code(&body)), (503, "queue_full"), "{body}");
    open.store(true, Ordering::SeqCst);
    for id in &ids {
        assert_eq!(server.final_status(id).await["state"], "delivered");
    }
    let (code, _) = server
        .post("/v1/send/http", &json!({"url": receiver.url("/q")}))
        .await;
    assert_eq!(code, 202, "room again once delivered");
}

#[tokio::test]
async fn one_stuck_instance_leaves_room_for_the_others() {
    let stuck = Receiver::scripted(|_| {
        Reply::After(Duration::from_secs(3600), Box::new(Reply::Status(200)))
    })
    .await;
    let ok = Receiver::start().await;
    let server = Server::start(Some(
        r#"
        [hub.queue]
        max_events = 40
        wait = "0s"
        [destinations.slow]
        kind = "http"
        allow_networks = ["127.0.0.0/8"]
        [destinations.fast]
        kind = "http"
        allow_networks = ["127.0.0.0/8"]
        "#,
    ))
    .await;
    // 40 in all: 10 reserved for each, 20 shared; the stuck one takes its 10 and the 20.
    let mut accepted = 0;
    let refusal = loop {
        let (code, body) = server
            .post("/v1/send/slow", &json!({"url": stuck.url("/s")}))
            .await;
        if code != 202 {
            break body;
        }
        accepted += 1;
        assert!(accepted <= 40, "never refused");
    };
    assert_eq!(accepted, 30, "{refusal}");
    assert_eq!(error_code(&refusal), "queue_full");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`slow`") && message.contains("reserved share"),
        "{message}"
    );
    for n in 0..10 {
        let (code, body) = server
            .post(
                "/v1/send/fast",
                &json!({"url": ok.url("/f"), "data": {"n": n}}),
            )
            .await;
        assert_eq!(code, 202, "the other instance still takes sends: {body}");
        let id = body["id"].as_str().unwrap_or_default().to_owned();
        assert_eq!(server.final_status(&id).await["state"], "delivered");
    }
}

#[tokio::test]
async fn health_readiness_and_prometheus_metrics() {
    let receiver = Receiver::start().await;
    let server = Server::start(None).await;
    assert_eq!(server.get("/healthz").await, (200, json!({"status": "ok"})));
    let (code, body) = server.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["destinations"]["http"]["ok"], true);
    assert_eq!(body["destinations"]["s3"]["ok"], true);
    assert_eq!(body["destinations"]["email"]["ok"], true);
    let (_, body) = server
        .post("/v1/send/http", &json!({"url": receiver.url("/m")}))
        .await;
    server
        .final_status(body["id"].as_str().unwrap_or_default())
        .await;
    let (code, _) = server
        .post(
            "/v1/send/http",
            &json!({"url": receiver.url("/m"), "body": 1}),
        )
        .await;
    assert_eq!(code, 400);
    let metrics = server.text("/metrics").await;
    for line in [
        r#"destinations_sends_accepted_total{destination="http"} 1"#,
        r#"destinations_delivered_total{destination="http"} 1"#,
        r#"destinations_sends_rejected_total{destination="http",reason="invalid"} 1"#,
        r#"destinations_queue_events{destination="http"} 0"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing `{line}` in:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("destinations_delivery_seconds"),
        "{metrics}"
    );
    let (code, body) = server.get("/v1/destinations").await;
    assert_eq!(
        (code, body),
        (
            200,
            json!({"destinations": [
                {"name": "email", "kind": "email"},
                {"name": "emit", "kind": "emit"},
                {"name": "http", "kind": "http"},
                {"name": "s3", "kind": "s3"},
                {"name": "sse", "kind": "sse"},
            ]})
        )
    );
}

#[tokio::test]
async fn an_api_token_guards_the_api_but_not_health() {
    let server = Server::start_with(
        None,
        &[("DESTINATIONS__API_TOKEN", "s3cret-token-for-tests-0002")],
    )
    .await;
    let (code, body) = server
        .post("/v1/send/http", &json!({"url": "http://127.0.0.1:9/"}))
        .await;
    assert_eq!((code, error_code(&body)), (401, "unauthorized"));
    assert_eq!(server.get("/healthz").await.0, 200);
    let response = server
        .http
        .get(format!("{}/v1/destinations", server.base))
        .bearer_auth("s3cret-token-for-tests-0002")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn sigterm_delivers_pending_work_before_exiting() {
    let receiver = Receiver::scripted(|_| {
        Reply::After(Duration::from_millis(100), Box::new(Reply::Status(200)))
    })
    .await;
    let server = Server::start(Some(
        r#"
        [destinations.http]
        kind = "http"
        allow_networks = ["127.0.0.0/8"]
        per_host_concurrency = 2
        "#,
    ))
    .await;
    let sends: Vec<Value> = (0..20)
        .map(|n| json!({"destination": "http", "payload": {"url": receiver.url("/late"), "data": {"n": n}}}))
        .collect();
    let (code, body) = server.post("/v1/runs", &json!({"sends": sends})).await;
    assert_eq!(code, 202, "{body}");
    let exit = server.terminate().await;
    assert!(exit.success(), "clean exit after delivering: {exit:?}");
    assert_eq!(
        receiver.accepted_keys().len(),
        20,
        "everything pending was delivered before exit"
    );
}

#[tokio::test]
async fn dead_letters_are_listed_with_the_reason_and_replayed() {
    let accepting = Arc::new(AtomicBool::new(false));
    let flag = accepting.clone();
    let receiver = Receiver::scripted(move |_| {
        if flag.load(Ordering::SeqCst) {
            Reply::Status(200)
        } else {
            Reply::Full(410, vec![], "gone for now".into())
        }
    })
    .await;
    let server = Server::start(None).await;
    let (_, body) = server
        .post("/v1/send/http", &json!({"url": receiver.url("/dl")}))
        .await;
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(server.final_status(&id).await["state"], "dead");
    // The status says dead a moment before the dead letter is committed (SQLite's statuses
    // are read from memory, ahead of the file): it is listed within moments.
    let started = std::time::Instant::now();
    let body = loop {
        let (code, body) = server.get("/v1/dead-letters").await;
        assert_eq!(code, 200);
        if body["dead_letters"][0].is_object() {
            break body;
        }
        assert!(
            started.elapsed() < WITHIN,
            "the dead letter was never listed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let letter = &body["dead_letters"][0];
    assert_eq!(letter["id"], id.as_str());
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("HTTP 410 Gone: gone for now"),
        "{letter}"
    );
    assert_eq!(letter["payload"]["url"], receiver.url("/dl"));
    let (_, dead) = server.get(&format!("/v1/events/{id}")).await;
    let log = &dead["attempts_log"];
    assert_eq!(log.as_array().map(Vec::len), Some(1), "{dead}");
    assert_eq!(log[0]["number"], 1);
    assert_eq!(log[0]["outcome"], "failed");
    assert_eq!(log[0]["status_code"], 410);
    assert_eq!(log[0]["response_excerpt"], "gone for now");
    assert!(log[0]["duration_ms"].is_u64() && log[0]["started_at"].is_string());
    let listed = |query: &'static str| {
        let server = &server;
        async move {
            let (code, body) = server.get(&format!("/v1/events?{query}")).await;
            assert_eq!(code, 200, "{body}");
            body["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        listed("state=dead&destination=http").await,
        vec![id.clone()]
    );
    // (the dead letter's `$errors` emit is delivered, to another destination)
    assert_eq!(
        listed("state=delivered&destination=http").await,
        Vec::<String>::new()
    );

    accepting.store(true, Ordering::SeqCst);
    let (code, body) = server
        .post("/v1/dead-letters/replay", &json!({"ids": [id]}))
        .await;
    assert_eq!((code, body["replayed"].clone()), (202, json!([id])));
    let delivered = server.final_status(&id).await;
    assert_eq!(delivered["state"], "delivered");
    assert_eq!(
        server.get("/v1/dead-letters").await.1["dead_letters"],
        json!([])
    );
    // The replayed send keeps the attempt that failed before, then the one that delivered it.
    let (_, delivered) = server.get(&format!("/v1/events/{id}")).await;
    let outcomes: Vec<_> = delivered["attempts_log"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| (a["outcome"].clone(), a["status_code"].clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (json!("failed"), json!(410)),
            (json!("delivered"), json!(200))
        ],
        "{delivered}"
    );
    // The listing reads the queue file, a moment behind the status (see above): it says so
    // once the delivery is committed.
    let started = std::time::Instant::now();
    while listed("state=delivered&destination=http").await != vec![id.clone()] {
        assert!(
            started.elapsed() < WITHIN,
            "the delivered send was never listed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(listed("state=dead").await, Vec::<String>::new());
}

#[tokio::test]
async fn the_readme_configuration_example_is_valid() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .unwrap_or_else(|e| panic!("README.md: {e}"));
    let start = readme
        .find("```toml\nlisten =")
        .unwrap_or_else(|| panic!("the README has no configuration example"));
    let block = &readme[start + "```toml\n".len()..];
    let block = &block[..block.find("```").unwrap_or(block.len())];
    let path = temp_config(block);
    let (ok, stdout, stderr) = cli(&["check", "--config", &path.display().to_string()], &[]).await;
    assert!(ok, "{stdout}{stderr}");
    for kind in ["email", "http", "s3", "sse"] {
        assert!(stdout.contains(&format!("kind {kind}")), "{stdout}");
    }
}

#[tokio::test]
async fn cli_send_status_list_and_check() {
    let receiver = Receiver::start().await;
    let server = Server::start(None).await;
    let payload = json!({"url": receiver.url("/cli"), "data": {"from": "cli"}}).to_string();
    let (ok, out, err) = cli(&["send", "http", &payload, "--server", &server.base], &[]).await;
    assert!(ok, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap_or_default()["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (ok, out, err) = cli(
        &["status", &id, "--wait", "30s", "--server", &server.base],
        &[],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap_or_default()["state"],
        "delivered",
        "{out}"
    );
    let (ok, _, err) = cli(
        &[
            "send",
            "http",
            r#"{"url":"http://127.0.0.1/","body":1}"#,
            "--server",
            &server.base,
        ],
        &[],
    )
    .await;
    assert!(!ok && err.contains("`body`"), "{err}");

    let (ok, out, _) = cli(&["list"], &[]).await;
    assert!(ok && out.lines().any(|l| l.starts_with("http ")), "{out}");

    let (ok, out, err) = cli(&["check"], &[("DESTINATIONS__LISTEN", "127.0.0.1:9999")]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("config: embedded defaults") && out.contains("listen: 127.0.0.1:9999"),
        "{out}"
    );
    assert!(out.contains("destination http: kind http"), "{out}");

    let bad = temp_config("[destinations.hooks]\nkind = \"http\"\ntimout = \"2s\"\n");
    let (ok, _, err) = cli(&["check", "--config", &bad.display().to_string()], &[]).await;
    assert!(
        !ok && err.contains("destinations.hooks") && err.contains("timout"),
        "{err}"
    );
    let bad = temp_config("lisen = \"127.0.0.1:1\"\n");
    let (ok, _, err) = cli(&["check", "--config", &bad.display().to_string()], &[]).await;
    assert!(!ok && err.contains("lisen"), "{err}");
    let bad = temp_config("[destinations.x]\nkind = \"carrier-pigeon\"\n");
    let (ok, _, err) = cli(&["check", "--config", &bad.display().to_string()], &[]).await;
    assert!(
        !ok && err.contains("unknown kind `carrier-pigeon`"),
        "{err}"
    );
}

#[tokio::test]
async fn the_debug_receiver_prints_what_arrives() {
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = probe.local_addr().unwrap_or_else(|e| panic!("{e}"));
    drop(probe);
    let mut child = Command::new(BIN)
        .args(["receive", "--listen", &addr.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut lines = BufReader::new(child.stdout.take().unwrap_or_else(|| panic!("stdout"))).lines();
    let first = tokio::time::timeout(WITHIN, lines.next_line())
        .await
        .ok()
        .and_then(|l| l.ok().flatten());
    assert_eq!(first, Some(format!("receiving on http://{addr}")));
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/hello"))
        .json(&json!({"name": "Luke"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status().as_u16(), 200);
    let mut seen = Vec::new();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(WITHIN, lines.next_line()).await {
        let done = line.trim() == "}";
        seen.push(line);
        if done {
            break;
        }
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("POST /hello"),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|l| l.contains("\"name\": \"Luke\"")),
        "{seen:?}"
    );
}
