//! Hosts that fail or push back, against real receivers on loopback: a failing host is paused
//! (its sends wait, unattempted, and all arrive once it answers), and a host's limit of
//! requests at once halves on 503s and grows back; an ordered host gets its sends in order
//! through retries.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use destinations_core::prelude::*;
use destinations_core::{EndpointChange, PausePolicy, RetryPolicy};
use destinations_http::{HttpOptions, HttpRequest, SendHttp};
use destinations_testkit::{Receiver, Reply};
use serde_json::json;
use tokio::sync::mpsc;

const WITHIN: Duration = Duration::from_secs(60);

fn hub(options: HttpOptions, settings: InstanceSettings) -> Hub {
    let destination =
        destinations_http::HttpDestination::new(options).unwrap_or_else(|e| panic!("{e}"));
    Hub::builder()
        .destination("http", Arc::new(destination), settings)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_fails_20_times_is_paused_loses_nothing_and_gets_everything_once_back() {
    let down = Arc::new(AtomicBool::new(true));
    let receiver = {
        let down = down.clone();
        Receiver::scripted(move |_| {
            if down.load(Ordering::SeqCst) {
                Reply::Status(500)
            } else {
                Reply::Status(200)
            }
        })
        .await
    };
    let settings = InstanceSettings {
        // Ten attempts each: were the probes of a paused host not few, some would run out.
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            max_attempts: 10,
            ..RetryPolicy::default()
        },
        pause: Some(PausePolicy {
            after_failures: 20,
            min_attempts: 1000,
            first_pause: Duration::from_millis(200),
            longest_pause: Duration::from_millis(400),
            ..PausePolicy::default()
        }),
        ..InstanceSettings::default()
    };
    let hub = hub(HttpOptions::allowing_loopback(), settings);
    let (changes, mut changed) = mpsc::unbounded_channel();
    hub.on_endpoint_change(Arc::new(move |change: &EndpointChange| {
        let _ = changes.send((change.change, change.by));
    }));
    let sender = hub.sender();
    let ids: Vec<EventId> = (0..40)
        .map(|n| {
            sender
                .http(HttpRequest::post(receiver.url("/hook")).json(&json!({ "n": n })))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    // Paused after its 20th failure; its first probe fails and pauses it again.
    assert_eq!(changed.recv().await, Some(("paused", "failures")));
    let at_pause = receiver.requests().len();
    assert_eq!(changed.recv().await, Some(("paused", "failures")));
    assert_eq!(
        receiver.requests().len(),
        at_pause + 1,
        "one probe between two pauses, nothing else"
    );
    let endpoint = hub.endpoints().pop().expect("the host is listed");
    assert_eq!(
        (endpoint.state, endpoint.paused_by),
        ("paused", Some("failures"))
    );
    let waiting = hub.status(ids[39]).await.unwrap().unwrap();
    assert_eq!(
        waiting.attempts, 0,
        "a send behind a paused host costs no attempt"
    );
    down.store(false, Ordering::SeqCst);
    assert_eq!(changed.recv().await, Some(("resumed", "failures")));
    destinations_testkit::delivered(&hub, &ids, WITHIN).await;
    assert!(
        hub.dead_letters(100).await.unwrap().is_empty(),
        "nothing dead-lettered"
    );
    let arrived: HashSet<u64> = receiver
        .requests()
        .iter()
        .filter(|r| r.json()["n"].is_u64())
        .map(|r| r.json()["n"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(arrived.len(), 40, "every send arrived");
    let failed = receiver.requests().len() - receiver.accepted_requests().len();
    assert!(
        failed <= 20 + 2 + 1,
        "20 failures, a failed probe (and one under way at the trip), no more: {failed}"
    );
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_limit_of_requests_at_once_halves_on_503s_and_grows_back() {
    const ANSWERED_FIRST: usize = 3000;
    const REFUSED: usize = 200;
    let seen = Arc::new(AtomicUsize::new(0));
    let receiver = {
        let seen = seen.clone();
        Receiver::scripted(move |_| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            if (ANSWERED_FIRST..ANSWERED_FIRST + REFUSED).contains(&n) {
                Reply::Status(503)
            } else {
                Reply::After(Duration::from_millis(2), Box::new(Reply::Status(200)))
            }
        })
        .await
    };
    let settings = InstanceSettings {
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            ..RetryPolicy::default()
        },
        // Pausing aside: this is about the limit alone.
        pause: Some(PausePolicy {
            enabled: false,
            ..PausePolicy::default()
        }),
        ..InstanceSettings::default()
    };
    let options = HttpOptions {
        per_host_concurrency: 32,
        ..HttpOptions::allowing_loopback()
    };
    let hub = hub(options, settings);
    let sender = hub.sender();
    let ids: Vec<EventId> = (0..ANSWERED_FIRST * 2)
        .map(|n| {
            sender
                .http(HttpRequest::post(receiver.url("/hook")).json(&json!({ "n": n })))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let now = |hub: &Hub| {
        hub.endpoints()
            .pop()
            .map_or(0, |endpoint| endpoint.concurrency["http"])
    };
    receiver.wait_for_requests(ANSWERED_FIRST, WITHIN).await;
    let grown = now(&hub);
    assert!(grown >= 4, "grows from 1 while the host answers: {grown}");
    receiver
        .wait_for_requests(ANSWERED_FIRST + REFUSED, WITHIN)
        .await;
    let cut = now(&hub);
    assert!(cut <= grown / 2, "halved on 503s: {grown} -> {cut}");
    destinations_testkit::delivered(&hub, &ids, WITHIN).await;
    let back = now(&hub);
    assert!(back > cut, "grows back once it answers: {cut} -> {back}");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_per_host_sends_arrive_in_order_through_retries() {
    let receiver = Receiver::scripted(|request| {
        if request.json()["n"] == 3 && request.attempt <= 2 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let options = HttpOptions {
        ordering: destinations_http::DeliveryOrder::PerHost,
        ..HttpOptions::allowing_loopback()
    };
    let settings = InstanceSettings {
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(50),
            ..RetryPolicy::default()
        },
        ..InstanceSettings::default()
    };
    let hub = hub(options, settings);
    let sender = hub.sender();
    let ids: Vec<EventId> = (0..30)
        .map(|n| {
            sender
                .http(HttpRequest::post(receiver.url("/hook")).json(&json!({ "n": n })))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    destinations_testkit::delivered(&hub, &ids, WITHIN).await;
    let arrived: Vec<(u64, u32)> = receiver
        .requests()
        .iter()
        .map(|r| (r.json()["n"].as_u64().unwrap_or(u64::MAX), r.attempt))
        .collect();
    let mut expected: Vec<(u64, u32)> = (0..3).map(|n| (n, 1)).collect();
    expected.extend([(3, 1), (3, 2), (3, 3)]);
    expected.extend((4..30).map(|n| (n, 1)));
    assert_eq!(arrived, expected, "in order, the retried one in its place");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_per_key_sends_arrive_in_order_per_key_and_other_keys_to_the_host_go_on() {
    let receiver = Receiver::scripted(|request| {
        let body = request.json();
        if body["k"] == "a" && body["n"] == 3 && request.attempt <= 2 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let options = HttpOptions {
        ordering: destinations_http::DeliveryOrder::PerKey,
        ..HttpOptions::allowing_loopback()
    };
    let settings = InstanceSettings {
        retry: RetryPolicy {
            // Long enough for key b to finish while key a waits.
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        },
        ..InstanceSettings::default()
    };
    let hub = hub(options, settings);
    let sender = hub.sender();
    let mut ids = Vec::new();
    for n in 0..10 {
        for key in ["a", "b"] {
            let request = HttpRequest::post(receiver.url("/hook"))
                .json(&json!({ "k": key, "n": n }))
                .ordering_key(key);
            ids.push(sender.http(request).unwrap_or_else(|e| panic!("{e}")));
        }
        // No key: no order, delivered all the same.
        let request = HttpRequest::post(receiver.url("/hook")).json(&json!({ "k": "", "n": n }));
        ids.push(sender.http(request).unwrap_or_else(|e| panic!("{e}")));
    }
    destinations_testkit::delivered(&hub, &ids, WITHIN).await;
    let requests = receiver.requests();
    let arrived = |key: &str| -> Vec<(u64, u32)> {
        requests
            .iter()
            .filter(|r| r.json()["k"] == key)
            .map(|r| (r.json()["n"].as_u64().unwrap_or(u64::MAX), r.attempt))
            .collect()
    };
    let mut expected: Vec<(u64, u32)> = (0..3).map(|n| (n, 1)).collect();
    expected.extend([(3, 1), (3, 2), (3, 3)]);
    expected.extend((4..10).map(|n| (n, 1)));
    assert_eq!(
        arrived("a"),
        expected,
        "in order, the retried one in its place"
    );
    assert_eq!(
        arrived("b"),
        (0..10).map(|n| (n, 1)).collect::<Vec<_>>(),
        "key b in its own order"
    );
    assert_eq!(arrived("").len(), 10, "sends without a key all arrive");
    let last_b = requests.iter().rposition(|r| r.json()["k"] == "b");
    let a_through = requests
        .iter()
        .position(|r| r.json()["k"] == "a" && r.json()["n"] == 3 && r.attempt == 3);
    assert!(
        last_b < a_through,
        "key b, to the same host, was not held behind key a's retries"
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn an_ordering_key_is_refused_where_it_would_be_ignored_or_is_empty() {
    let hub = hub(
        HttpOptions::allowing_loopback(),
        InstanceSettings::default(),
    );
    let sender = hub.sender();
    let url = "http://127.0.0.1:9/hook";
    let typed = sender
        .http(HttpRequest::post(url).ordering_key("customer-1"))
        .expect_err("an instance that does not order by key refuses a key");
    let raw = sender
        .to("http", &json!({ "url": url, "ordering_key": "customer-1" }))
        .expect_err("the same as JSON");
    // The same field with its name written in escapes.
    let escaped = sender
        .json(
            "http",
            bytes::Bytes::from_static(
                br#"{"url":"http://127.0.0.1:9/hook","ordering\u005fkey":"customer-1"}"#,
            ),
        )
        .expect_err("an escaped field name is the same field");
    for error in [typed, raw, escaped] {
        let text = error.to_string();
        assert!(
            text.contains("ordering_key") && text.contains("per_key"),
            "names the field and the fix: {text}"
        );
    }
    // A body that mentions the name is not a key.
    sender
        .http(HttpRequest::post(url).json(&json!({ "ordering_key": 1 })))
        .unwrap_or_else(|e| panic!("{e}"));
    let keyed = hub_keyed();
    let empty = keyed
        .sender()
        .http(HttpRequest::post(url).ordering_key(""))
        .expect_err("an empty key");
    assert!(empty.to_string().contains("ordering_key"), "{empty}");
    keyed.shutdown_within(Duration::ZERO).await;
    hub.shutdown_within(Duration::ZERO).await;
}

fn hub_keyed() -> Hub {
    let options = HttpOptions {
        ordering: destinations_http::DeliveryOrder::PerKey,
        ..HttpOptions::allowing_loopback()
    };
    hub(options, InstanceSettings::default())
}
