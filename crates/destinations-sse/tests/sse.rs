//! The SSE destination served over real HTTP on 127.0.0.1 and read by real clients: reqwest
//! streams parsed by hand, a thousand of them at once, and headless Chromium's `EventSource`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use destinations_core::prelude::*;
use destinations_core::{HubConfig, InstanceConfig, Registry};
use destinations_sse::{SendSse, SseSend};
use destinations_testkit::SseClient;
use serde_json::json;
use tokio::sync::mpsc;

/// A hub with one SSE instance named `sse`, and its routes served on 127.0.0.1.
async fn serve(options: serde_json::Value) -> (Hub, String) {
    let mut table = json!({"kind": "sse"});
    if let (Some(table), serde_json::Value::Object(options)) = (table.as_object_mut(), options) {
        table.extend(options);
    }
    let config = InstanceConfig::from_table("sse", table).unwrap_or_else(|e| panic!("{e}"));
    let hub = Hub::builder()
        .config(HubConfig::default())
        .configured(&Registry::linked(), "sse", config)
        .unwrap_or_else(|e| panic!("{e}"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let router = destinations_sse::routes(&hub)
        .unwrap_or_else(|e| panic!("{e}"))
        .split_for_parts()
        .0;
    let address = listen(router).await;
    (hub, format!("http://{address}/v1/sse"))
}

async fn listen(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    address
}

/// Publish events `range` on `stream` and wait until each is delivered (published).
async fn publish(hub: &Hub, stream: &str, range: std::ops::Range<u64>) -> Vec<EventId> {
    let mut ids = Vec::new();
    for n in range {
        let id = hub
            .sender()
            .sse(SseSend::new("tick", &json!({"n": n})).on_stream(stream))
            .unwrap_or_else(|e| panic!("{e}"));
        ids.push(id);
    }
    for id in &ids {
        let status = destinations_testkit::final_status(hub, *id, Duration::from_secs(30)).await;
        assert_eq!(status.map(|s| s.state), Some(State::Delivered));
    }
    ids
}

/// Read `count` events, returning their `n` only.
async fn numbers(client: &mut SseClient, count: usize) -> Vec<u64> {
    read(client, count).await.into_iter().map(|e| e.0).collect()
}

/// Read `count` events, returning their `n` and ids.
async fn read(client: &mut SseClient, count: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < count {
        let event = client
            .next_event()
            .await
            .unwrap_or_else(|| panic!("the stream ended after {} events", got.len()));
        assert_eq!(event.event.as_deref(), Some("tick"));
        let n = event.json()["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("{event:?}"));
        got.push((n, event.id.unwrap_or_default()));
    }
    got
}

#[tokio::test]
async fn a_new_subscriber_gets_the_last_100_in_order_then_live_events() {
    let (hub, base) = serve(json!({})).await;
    let ids = publish(&hub, "s", 0..150).await;
    let http = reqwest::Client::new();
    let mut client = SseClient::open(&http, &format!("{base}/s"), &[]).await;
    let replayed = read(&mut client, 100).await;
    let expected: Vec<(u64, String)> = (50..150)
        .map(|n| (n, ids[n as usize].to_string()))
        .collect();
    assert_eq!(
        replayed, expected,
        "the last 100, oldest first, each with its send id"
    );
    let live = publish(&hub, "s", 150..151).await;
    assert_eq!(read(&mut client, 1).await, vec![(150, live[0].to_string())]);
    hub.shutdown().await;
}

#[tokio::test]
async fn resuming_by_last_event_id_loses_and_repeats_nothing() {
    let (hub, base) = serve(json!({})).await;
    let http = reqwest::Client::new();
    let mut first = SseClient::open(&http, &format!("{base}/orders"), &[]).await;
    publish(&hub, "orders", 0..30).await;
    let seen = read(&mut first, 10).await;
    drop(first);
    publish(&hub, "orders", 30..60).await;
    let last = seen[9].1.clone();
    let mut header = SseClient::open(
        &http,
        &format!("{base}/orders"),
        &[("last-event-id", &last)],
    )
    .await;
    let resumed = numbers(&mut header, 50).await;
    assert_eq!(
        resumed,
        (10..60).collect::<Vec<_>>(),
        "from the event after {last}"
    );
    let mut query = SseClient::open(&http, &format!("{base}/orders?lastEventId={last}"), &[]).await;
    let resumed = numbers(&mut query, 50).await;
    assert_eq!(
        resumed,
        (10..60).collect::<Vec<_>>(),
        "?lastEventId= works as the header does"
    );
    publish(&hub, "orders", 60..61).await;
    assert_eq!(read(&mut header, 1).await[0].0, 60, "then live, no repeat");
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn idle_connections_get_keepalive_comments() {
    let (hub, base) = serve(json!({"keepalive": "15s"})).await;
    let http = reqwest::Client::new();
    let mut client = SseClient::open(&http, &format!("{base}/quiet"), &[]).await;
    let start = tokio::time::Instant::now();
    for expected in 1..=2u32 {
        let block = client
            .next()
            .await
            .unwrap_or_else(|| panic!("the stream ended"));
        assert_eq!(block.comments, vec!["keepalive"], "{block:?}");
        assert!(
            start.elapsed() >= Duration::from_secs(15) * expected,
            "{:?}",
            start.elapsed()
        );
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_cut_off_while_a_fast_one_receives_everything() {
    let (hub, base) = serve(json!({"subscriber_buffer": 2048, "replay": 10})).await;
    let http = reqwest::Client::new();
    // Connected, then never read until the end: its socket buffers fill, then its queue.
    let mut stalled = SseClient::open(&http, &format!("{base}/firehose"), &[]).await;
    let mut fast = SseClient::open(&http, &format!("{base}/firehose"), &[]).await;
    let (progress, mut reached) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut received = Vec::new();
        while let Some(event) = fast.next_event().await {
            received.push(event.json()["n"].as_u64().unwrap_or(u64::MAX));
            let _ = progress.send(received.len());
            if received.len() == 40_000 {
                break;
            }
        }
        received
    });
    let pad = "x".repeat(1000);
    for chunk in 0..40u64 {
        let run = hub.begin_run("firehose");
        for n in chunk * 1000..(chunk + 1) * 1000 {
            run.send()
                .sse(SseSend::new("tick", &json!({"n": n, "pad": pad})).on_stream("firehose"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        run.finish().await.unwrap_or_else(|e| panic!("{e}"));
        // Let the fast reader catch up before the next thousand: it never lags a buffer behind.
        while reached
            .recv()
            .await
            .is_some_and(|n| n < ((chunk + 1) * 1000) as usize)
        {}
    }
    let received = reader.await.unwrap_or_default();
    assert_eq!(
        received,
        (0..40_000).collect::<Vec<_>>(),
        "the fast reader got everything, in order"
    );

    let mut got = Vec::new();
    let mut told = None;
    while let Some(event) = stalled.next_event().await {
        if event.event.as_deref() == Some("error") {
            told = Some(event.json());
            break;
        }
        got.push(event.json()["n"].as_u64().unwrap_or(u64::MAX));
    }
    let told = told.unwrap_or_else(|| {
        panic!(
            "the stalled reader was not told; it got {} events",
            got.len()
        )
    });
    assert!(
        told["error"].as_str().unwrap_or("").contains("fell behind"),
        "{told}"
    );
    assert!(got.len() < 40_000, "it was cut off");
    assert_eq!(
        got,
        (0..got.len() as u64).collect::<Vec<_>>(),
        "what it got has no gap"
    );
    assert!(stalled.next().await.is_none(), "and the response ended");
    hub.shutdown().await;
}

#[tokio::test]
async fn read_tokens_refuse_and_admit() {
    let (hub, base) =
        serve(json!({"tokens": {"private": ["t-123-read-token-one", "t-456-read-token-two"]}}))
            .await;
    let http = reqwest::Client::new();
    let status = |headers: &'static [(&'static str, &'static str)], query: &'static str| {
        let http = http.clone();
        let url = format!("{base}/private{query}");
        async move { SseClient::connect(&http, &url, headers).await.0 }
    };
    assert_eq!(status(&[], "").await, 401, "no token");
    assert_eq!(status(&[], "?token=wrong").await, 403, "a wrong token");
    assert_eq!(status(&[("authorization", "Bearer nope")], "").await, 403);
    assert_eq!(
        status(&[], "?token=t-456-read-token-two").await,
        200,
        "?token= for EventSource"
    );
    assert_eq!(
        status(&[("authorization", "Bearer t-123-read-token-one")], "").await,
        200
    );
    assert_eq!(
        status(&[("authorization", "bearer t-123-read-token-one")], "").await,
        200,
        "the scheme in any case (RFC 9110)"
    );
    assert_eq!(
        SseClient::connect(&http, &format!("{base}/public"), &[])
            .await
            .0,
        200,
        "other streams stay open"
    );
    let (code, _) = SseClient::connect(&http, &format!("{base}/bad%20name"), &[]).await;
    assert_eq!(code, 400);
    publish(&hub, "private", 0..1).await;
    let mut client = SseClient::open(
        &http,
        &format!("{base}/private?token=t-123-read-token-one"),
        &[],
    )
    .await;
    assert_eq!(read(&mut client, 1).await[0].0, 0);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_all_receive_a_burst() {
    let (hub, base) = serve(json!({})).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(SseClient::open(&http, &format!("{base}/burst"), &[]).await);
    }
    // Every client is subscribed once its answer's headers arrived.
    publish(&hub, "burst", 0..50).await;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| tokio::spawn(async move { numbers(&mut client, 50).await }))
        .collect();
    for reader in readers {
        assert_eq!(
            reader.await.unwrap_or_default(),
            (0..50).collect::<Vec<_>>()
        );
    }
    hub.shutdown().await;
}

#[tokio::test]
async fn browsers_on_allowed_origins_get_cors_headers() {
    let (hub, base) = serve(json!({"cors_origins": ["http://app.example"]})).await;
    let http = reqwest::Client::new();
    let response = http
        .get(format!("{base}/s"))
        .header("origin", "http://app.example")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(&b"http://app.example"[..])
    );
    assert_eq!(
        response.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/event-stream"[..])
    );
    let other = http
        .get(format!("{base}/s"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let preflight = http
        .request(reqwest::Method::OPTIONS, format!("{base}/s"))
        .header("origin", "http://app.example")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(preflight.status().as_u16(), 204);
    hub.shutdown().await;
}

#[tokio::test]
async fn closing_ends_open_responses_and_refuses_new_ones() {
    let (hub, base) = serve(json!({})).await;
    let http = reqwest::Client::new();
    let mut open = SseClient::open(&http, &format!("{base}/s"), &[]).await;
    destinations_sse::close(&hub);
    assert!(open.next().await.is_none(), "the open response ended");
    assert_eq!(
        SseClient::connect(&http, &format!("{base}/s"), &[]).await.0,
        503
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn bad_sends_are_refused_naming_the_field() {
    let (hub, _) = serve(json!({})).await;
    for (payload, field) in [
        (json!({"channel": "a\nb", "payload": 1}), "channel"),
        (json!({"channel": "", "payload": 1}), "channel"),
        (
            json!({"channel": "c", "payload": 1, "stream": "a/b"}),
            "stream",
        ),
        (json!({"channel": "c"}), "payload"),
        (json!({"channel": "c", "payload": 1, "data": 2}), "data"),
    ] {
        match hub.sender().to("sse", &payload) {
            Err(SendError::Invalid { error, .. }) => {
                assert_eq!(error.field, field, "{payload}: {error}");
            }
            other => panic!("{payload} was not refused: {other:?}"),
        }
    }
    hub.shutdown().await;
}

#[tokio::test]
async fn the_stream_defaults_to_the_run_then_to_default() {
    let (hub, base) = serve(json!({})).await;
    let http = reqwest::Client::new();
    let mut by_run = SseClient::open(&http, &format!("{base}/workflow-7"), &[]).await;
    let mut default = SseClient::open(&http, &format!("{base}/default"), &[]).await;
    let run = hub.begin_run("workflow-7");
    run.send()
        .sse(SseSend::new("tick", &json!({"n": 1})))
        .unwrap_or_else(|e| panic!("{e}"));
    run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    hub.sender()
        .sse(SseSend::new("tick", &json!({"n": 2})))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read(&mut by_run, 1).await[0].0, 1);
    assert_eq!(read(&mut default, 1).await[0].0, 2);
    hub.shutdown().await;
}

/// Headless Chromium opens a page that uses `EventSource` (cross-origin, with a read token);
/// the page posts each event it receives back to the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_a_real_browser() {
    let site = destinations_testkit::Site::bind().await;
    let page_origin = site.origin().to_owned();
    let (hub, base) = serve(
        json!({"cors_origins": [page_origin], "tokens": {"browser": ["b-token-for-the-browser"]}}),
    )
    .await;
    let page = format!(
        r#"<!doctype html><meta charset="utf-8"><title>sse</title><script>
        const report = (body) => fetch("/report", {{method: "POST", body: JSON.stringify(body)}});
        const source = new EventSource("{base}/browser?token=b-token-for-the-browser");
        source.onopen = () => report({{open: true}});
        let seq = 0;
        source.addEventListener("tick", (e) => report({{seq: ++seq, id: e.lastEventId, data: JSON.parse(e.data)}}));
        </script>"#
    );
    let reports = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let (arrived, mut arrivals) = mpsc::unbounded_channel::<()>();
    let app = Router::new()
        .route(
            "/",
            axum::routing::get(move || async move { axum::response::Html(page) }),
        )
        .route(
            "/report",
            axum::routing::post({
                let reports = reports.clone();
                move |body: String| async move {
                    let value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                    reports
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(value);
                    let _ = arrived.send(());
                }
            }),
        );
    let browser = site.open(app, "the browser for the EventSource test");
    let wait = |count: usize| {
        let reports = reports.clone();
        async move { reports.lock().unwrap_or_else(PoisonError::into_inner).len() >= count }
    };
    // The page says when its EventSource is open; then three events go out.
    while !wait(1).await {
        tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .unwrap_or_else(|_| panic!("the browser never opened the stream"));
    }
    let ids = publish(&hub, "browser", 0..3).await;
    while !wait(4).await {
        tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .unwrap_or_else(|_| panic!("the browser did not report every event"));
    }
    browser.close().await;
    let reports = reports
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(reports[0], json!({"open": true}));
    // The reports may overtake each other; `seq` is the order the page received events in.
    let mut events: Vec<serde_json::Value> = reports[1..].to_vec();
    events.sort_by_key(|e| e["seq"].as_u64());
    let expected: Vec<serde_json::Value> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| json!({"seq": n + 1, "id": id.to_string(), "data": {"n": n}}))
        .collect();
    assert_eq!(events, expected, "each event, in order, with its id");
    hub.shutdown().await;
}

#[test]
fn short_read_tokens_are_refused_at_load_naming_the_entry() {
    let table = json!({"kind": "sse", "tokens": {"orders": ["a-long-enough-read-token", ""]}});
    let config = InstanceConfig::from_table("sse", table).unwrap_or_else(|e| panic!("{e}"));
    let refused = Hub::builder()
        .config(HubConfig::default())
        .configured(&Registry::linked(), "sse", config)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("an empty token was accepted"));
    assert!(refused.contains("`tokens.orders[1]`"), "{refused}");
    assert!(refused.contains("at least 16"), "{refused}");
}
