//! Batched requests against real receivers: sends that share method, URL, headers and
//! credentials arrive as one NDJSON or JSON-array body, every id once, each send keeping its
//! own status; a retried batch is the same request again; bodies may be gzipped.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use destinations_core::RetryPolicy;
use destinations_core::policy::BatchPolicyOverrides;
use destinations_core::prelude::*;
use destinations_http::{BatchEncoding, Compression, HttpOptions, HttpRequest, SendHttp};
use destinations_testkit::{ReceivedRequest, Receiver, Reply};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);

fn hub(options: HttpOptions, batch: BatchPolicyOverrides) -> Hub {
    let destination =
        destinations_http::HttpDestination::new(options).unwrap_or_else(|e| panic!("{e}"));
    Hub::builder()
        .destination(
            "http",
            Arc::new(destination),
            InstanceSettings {
                batch,
                retry: RetryPolicy {
                    initial_delay: Duration::from_millis(5),
                    max_delay: Duration::from_millis(50),
                    ..RetryPolicy::default()
                },
                ..InstanceSettings::default()
            },
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The ids a batched request names, in order.
fn ids_of(request: &ReceivedRequest) -> Vec<String> {
    request
        .header("destinations-ids")
        .unwrap_or_else(|| panic!("no destinations-ids header"))
        .split(',')
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_alike_arrive_as_ndjson_batches_with_every_id_once() {
    let receiver = Receiver::start().await;
    let options = HttpOptions {
        encoding: Some(BatchEncoding::Ndjson),
        ..HttpOptions::allowing_loopback()
    };
    let hub = hub(
        options,
        BatchPolicyOverrides {
            max_events: Some(10),
            max_age: Some(Duration::from_millis(50)),
            ..BatchPolicyOverrides::default()
        },
    );
    let sender = hub.sender();
    let mut sent: HashMap<String, (String, u64)> = HashMap::new();
    for n in 0..95u64 {
        // Two tenants' headers: a request carries one tenant's sends only.
        let tenant = if n % 5 == 0 { "b" } else { "a" };
        let id = sender
            .http(
                HttpRequest::post(receiver.url("/events"))
                    .header("x-tenant", tenant)
                    .json(&json!({ "n": n })),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        sent.insert(id.to_string(), (tenant.to_owned(), n));
    }
    let ids: Vec<EventId> = sent.keys().map(|id| id.parse().unwrap()).collect();
    destinations_testkit::delivered(&hub, &ids, WITHIN).await;
    let requests = receiver.requests();
    assert!(
        requests.len() <= 95 / 10 + 3,
        "batched: {} requests",
        requests.len()
    );
    let mut seen = HashSet::new();
    for request in &requests {
        assert_eq!(request.header("content-type"), Some("application/x-ndjson"));
        let ids = ids_of(request);
        let key = request.key.clone().unwrap_or_default();
        assert!(key.starts_with("b_"), "a batch's own key: {key}");
        let lines: Vec<Value> = std::str::from_utf8(&request.body)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), ids.len(), "one line per id");
        assert!(ids.len() <= 10, "max_events holds");
        let tenant = request.header("x-tenant").unwrap_or_default();
        for (id, line) in ids.iter().zip(&lines) {
            let (sent_tenant, n) = &sent[id];
            assert_eq!(sent_tenant, tenant, "only alike sends share a request");
            assert_eq!(line, &json!({ "n": n }), "each line is its send's data");
            assert!(seen.insert(id.clone()), "{id} arrived twice");
        }
    }
    assert_eq!(seen.len(), 95, "every id once");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzipped_json_array_batch_that_fails_is_sent_again_byte_for_byte() {
    let receiver = Receiver::scripted(|request| {
        if request.attempt == 1 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let options = HttpOptions {
        encoding: Some(BatchEncoding::JsonArray),
        compression: Compression::Gzip,
        ..HttpOptions::allowing_loopback()
    };
    let hub = hub(
        options,
        BatchPolicyOverrides {
            max_events: Some(20),
            max_age: Some(Duration::from_secs(30)),
            ..BatchPolicyOverrides::default()
        },
    );
    let sender = hub.sender();
    let ids: Vec<EventId> = (0..20)
        .map(|n| {
            sender
                .http(HttpRequest::post(receiver.url("/events")).json(&json!({ "n": n })))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    destinations_testkit::delivered(&hub, &ids, WITHIN).await;
    let requests = receiver.requests();
    assert_eq!(
        requests.len(),
        2,
        "one batch of 20, failed once, sent again"
    );
    let (first, again) = (&requests[0], &requests[1]);
    assert_eq!(first.body, again.body, "the same bytes");
    assert_eq!(first.key, again.key, "the same idempotency key");
    assert_eq!(ids_of(first), ids_of(again));
    assert_eq!(
        ids_of(first),
        ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "in the order sent"
    );
    assert_eq!(first.header("content-encoding"), Some("gzip"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(&first.body[..])
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("not gzip: {e}"));
    let elements: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(
        elements,
        (0..20).map(|n| json!({ "n": n })).collect::<Vec<_>>()
    );
    for id in &ids {
        let status = hub.status(*id).await.unwrap().unwrap();
        assert_eq!(status.attempts, 2, "each send counts the batch's attempts");
    }
    hub.shutdown().await;
}
