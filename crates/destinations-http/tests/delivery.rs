//! The HTTP destination against real receivers on 127.0.0.1, counted.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use destinations_core::prelude::*;
use destinations_core::{HubConfig, InstanceConfig, Registry, SendStatus};
use destinations_http::{HttpOptions, HttpRequest, SendHttp};
use destinations_testkit::conformance::{self, Capabilities, ConformanceTarget, SinkBehaviour};
use destinations_testkit::{Receiver, Reply};
use hmac::{KeyInit, Mac};
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(60);

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
        max_attempts: 8,
        ..RetryPolicy::default()
    }
}

fn hub_with(options: HttpOptions, retry: RetryPolicy) -> Hub {
    hub_with_settings(
        options,
        InstanceSettings {
            retry,
            ..InstanceSettings::default()
        },
    )
}

fn hub_with_settings(options: HttpOptions, settings: InstanceSettings) -> Hub {
    let destination =
        destinations_http::HttpDestination::new(options).unwrap_or_else(|e| panic!("{e}"));
    Hub::builder()
        .destination("http", Arc::new(destination), settings)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn loopback_hub() -> Hub {
    hub_with(HttpOptions::allowing_loopback(), fast_retries())
}

/// Send one request through a loopback hub, let the hub finish; the hub and the send's status.
async fn status_of_one(request: HttpRequest) -> (Hub, SendStatus) {
    let hub = loopback_hub();
    let id = hub.sender().http(request).unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(WITHIN).await;
    let status = destinations_testkit::status(&hub, id).await;
    (hub, status)
}

struct HttpTarget {
    receiver: Option<Receiver>,
}

#[async_trait]
impl ConformanceTarget for HttpTarget {
    fn kind(&self) -> &'static str {
        destinations_http::KIND
    }

    async fn start_sink(&mut self, behaviour: SinkBehaviour) -> serde_json::Value {
        self.receiver = Some(
            Receiver::scripted(move |request| match behaviour {
                SinkBehaviour::Accept => Reply::Status(200),
                SinkBehaviour::FailFirstAttempts(n) if request.attempt <= n => Reply::Status(503),
                SinkBehaviour::FailFirstAttempts(_) => Reply::Status(204),
                SinkBehaviour::RejectPermanently => Reply::Full(422, vec![], "no thanks".into()),
            })
            .await,
        );
        json!({"allow_networks": ["127.0.0.0/8"]})
    }

    fn payload(&self, marker: u64) -> serde_json::Value {
        let url = self
            .receiver
            .as_ref()
            .map(|r| r.url("/hook"))
            .unwrap_or_default();
        json!({"method": "POST", "url": url, "data": {"marker": marker}})
    }

    fn invalid_payload(&self) -> (serde_json::Value, &'static str) {
        (json!({"url": "http://127.0.0.1/", "body": "x"}), "body")
    }

    async fn accepted_markers(&self) -> Vec<u64> {
        let requests = self
            .receiver
            .as_ref()
            .map(Receiver::accepted_requests)
            .unwrap_or_default();
        requests
            .iter()
            .filter_map(|r| r.json()["marker"].as_u64())
            .collect()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            instance_checks: true,
            ..Capabilities::default()
        }
    }

    /// An instance that keeps no order by key refuses a key it would ignore.
    fn instance_check(&self) -> Option<(serde_json::Value, serde_json::Value, &'static str)> {
        let mut payload = self.payload(0);
        payload["ordering_key"] = json!("customer-1");
        Some((json!({}), payload, "ordering_key"))
    }
}

#[tokio::test]
async fn conformance_suite() {
    conformance::run_all(&mut HttpTarget { receiver: None }).await;
}

#[tokio::test]
async fn every_accepted_send_arrives_through_transient_failures() {
    // Each send is refused in a different way before it is accepted: a 503, a dropped
    // connection, a 429 with Retry-After: 0, an answer slower than the timeout.
    let receiver = Receiver::scripted(|request| {
        let marker = request.json()["n"].as_u64().unwrap_or(0);
        match (marker % 5, request.attempt) {
            (1, 1) => Reply::Status(503),
            (2, 1) => Reply::Drop,
            (3, 1) => Reply::Full(429, vec![("retry-after", "0".into())], String::new()),
            (4, 1) => Reply::After(Duration::from_millis(1500), Box::new(Reply::Status(200))),
            _ => Reply::Status(200),
        }
    })
    .await;
    let mut options = HttpOptions::allowing_loopback();
    options.timeout = Duration::from_millis(300);
    // Three sends in five fail their first attempt: by the default policy a host to pause,
    // whose probes (often a first attempt) fail as often. This is about retries alone.
    let settings = InstanceSettings {
        retry: fast_retries(),
        pause: Some(destinations_core::PausePolicy {
            enabled: false,
            ..Default::default()
        }),
        ..InstanceSettings::default()
    };
    let hub = hub_with_settings(options, settings);
    const N: u64 = 250;
    let run = hub.begin_run("burst");
    let mut ids = HashSet::new();
    for n in 0..N {
        let id = run
            .send()
            .http(HttpRequest::post(receiver.url("/in")).json(&json!({"n": n})))
            .unwrap_or_else(|e| panic!("{e}"));
        ids.insert(id.to_string());
    }
    run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    receiver.wait_for_accepted(N as usize, WITHIN).await;
    hub.shutdown_within(WITHIN).await;

    assert_eq!(
        receiver.accepted_keys(),
        ids,
        "N sends accepted → the same N ids received"
    );
    let accepted = receiver.accepted_requests();
    let distinct_bodies: HashSet<_> = accepted.iter().map(|r| r.json()["n"].as_u64()).collect();
    assert_eq!(distinct_bodies.len(), N as usize);
    // Duplicates are possible only for the slow answers (the receiver accepted after the
    // sender gave up), and each duplicate carries the same id.
    for r in &accepted {
        let n = r.json()["n"].as_u64().unwrap_or(0);
        assert!(r.attempt == 1 || n % 5 != 0, "send {n} needed no retry");
    }
    let mut statuses = Vec::new();
    for id in &ids {
        let status = destinations_testkit::status(&hub, id.parse().unwrap_or_default()).await;
        assert_eq!(status.state, State::Delivered, "{id}: {status:?}");
        statuses.push(status);
    }
    let timed_out = statuses
        .iter()
        .filter(|s| {
            s.attempts == 2
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("timed out"))
        })
        .count();
    assert_eq!(
        timed_out,
        (N / 5) as usize,
        "every slow first answer was a timeout, then retried"
    );
}

#[tokio::test]
async fn a_permanent_4xx_dead_letters_at_once_with_status_and_body() {
    let receiver =
        Receiver::scripted(|_| Reply::Full(404, vec![], "no such hook: check the URL".into()))
            .await;
    let (hub, status) =
        status_of_one(HttpRequest::post(receiver.url("/missing")).json(&json!({"a": 1}))).await;
    assert_eq!(status.state, State::Dead);
    assert_eq!(status.attempts, 1);
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("HTTP 404 Not Found: no such hook"),
        "{error}"
    );
    let response = status.response.unwrap_or_else(|| panic!("response kept"));
    assert_eq!(response.status, Some(404));
    assert_eq!(
        response.body_excerpt.as_deref(),
        Some("no such hook: check the URL")
    );
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].envelope.id, status.id);
    assert_eq!(receiver.requests().len(), 1, "not retried");
}

#[tokio::test]
async fn error_bodies_are_cut_at_4_kib() {
    let receiver = Receiver::scripted(|_| Reply::Full(400, vec![], "x".repeat(100_000))).await;
    let (_, status) = status_of_one(HttpRequest::post(receiver.url("/"))).await;
    let error = status.last_error.clone().unwrap_or_default();
    let excerpt = status
        .response
        .and_then(|r| r.body_excerpt)
        .unwrap_or_default();
    assert_eq!(excerpt.len(), 4096);
    // The error repeats one line of it, not the 4 KiB again.
    assert!(
        error.starts_with("HTTP 400 Bad Request: xxx") && error.chars().count() < 260,
        "{} characters: {error}",
        error.chars().count()
    );
}

#[tokio::test]
async fn a_run_that_is_never_finished_sends_nothing() {
    let receiver = Receiver::start().await;
    let hub = loopback_hub();
    {
        let run = hub.begin_run("abandoned");
        for n in 0..10 {
            run.send()
                .http(HttpRequest::post(receiver.url("/never")).json(&json!({ "n": n })))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(run.held(), 10);
    } // dropped unfinished
    let failed = hub.begin_run("failed");
    failed
        .send()
        .http(HttpRequest::post(receiver.url("/never")))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        failed.fail().await.unwrap_or_default().is_empty(),
        "on_run_error = discard by default"
    );
    // A marker sent afterwards: once it has arrived, anything the runs leaked would have too.
    hub.sender()
        .http(HttpRequest::post(receiver.url("/marker")))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(WITHIN).await;
    let paths: Vec<String> = receiver.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(paths, vec!["/marker".to_owned()]);
}

#[tokio::test]
async fn shutdown_delivers_pending_work() {
    let receiver = Receiver::scripted(|_| {
        Reply::After(Duration::from_millis(20), Box::new(Reply::Status(200)))
    })
    .await;
    let hub = loopback_hub();
    let run = hub.begin_run("late");
    for n in 0..100 {
        run.send()
            .http(HttpRequest::post(receiver.url("/")).json(&json!({ "n": n })))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let ids = run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    let report = hub.shutdown_within(WITHIN).await;
    assert_eq!(report.abandoned, 0);
    assert_eq!(receiver.accepted_keys().len(), 100);
    for id in &ids {
        assert_eq!(
            destinations_testkit::state(&hub, *id).await,
            Some(State::Delivered)
        );
    }
    let after = hub.sender().http(HttpRequest::post(receiver.url("/")));
    assert!(matches!(after, Err(SendError::ShuttingDown)), "{after:?}");
}

#[tokio::test]
async fn the_ssrf_guard_refuses_loopback_unless_allow_listed() {
    let receiver = Receiver::start().await;
    let hub = hub_with(HttpOptions::default(), fast_retries());
    let literal = hub
        .sender()
        .http(HttpRequest::post(receiver.url("/")))
        .unwrap_or_else(|e| panic!("{e}"));
    let by_name = hub
        .sender()
        .http(HttpRequest::post(format!(
            "http://localhost:{}/",
            receiver.addr().port()
        )))
        .unwrap_or_else(|e| panic!("{e}"));
    // The same address written as an IPv4-mapped IPv6 literal, in decimal, in hex, in octal.
    let port = receiver.addr().port();
    let other_forms: Vec<EventId> = [
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://0x7f000001:{port}/"),
        format!("http://0177.0.0.1:{port}/"),
        format!("http://127.1:{port}/"),
    ]
    .into_iter()
    .map(|url| {
        hub.sender()
            .http(HttpRequest::post(url))
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .collect();
    hub.shutdown_within(WITHIN).await;
    for id in [literal, by_name].into_iter().chain(other_forms) {
        let status = destinations_testkit::status(&hub, id).await;
        assert_eq!(status.state, State::Dead, "{status:?}");
        assert_eq!(status.attempts, 1, "a refusal is permanent");
        let error = status.last_error.unwrap_or_default();
        assert!(error.contains("a loopback address"), "{error}");
        assert!(error.contains("allow_networks"), "{error}");
        assert!(
            !error.contains("127.0.0.1 ("),
            "the resolved address is not disclosed: {error}"
        );
    }
    assert!(
        receiver.requests().is_empty(),
        "nothing reached the receiver"
    );
}

#[tokio::test]
async fn redirects_are_not_followed_by_default() {
    let target = Receiver::start().await;
    let location = target.url("/elsewhere");
    let receiver = Receiver::scripted(move |_| {
        Reply::Full(302, vec![("location", location.clone())], String::new())
    })
    .await;
    let (_, status) = status_of_one(HttpRequest::post(receiver.url("/"))).await;
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("not followed"), "{error}");
    assert!(target.requests().is_empty());
}

/// A redirect is checked like the first request: from an allow-listed 127.0.0.1 to 127.0.0.2,
/// which is not allowed, it is refused (review T4).
#[tokio::test]
async fn a_followed_redirect_is_held_to_the_same_guard() {
    let location = format!(
        "http://127.0.0.2:{}/inside",
        Receiver::unused_address().port()
    );
    let receiver = Receiver::scripted(move |_| {
        Reply::Full(302, vec![("location", location.clone())], String::new())
    })
    .await;
    let options = HttpOptions {
        follow_redirects: 1,
        allow_networks: vec!["127.0.0.1/32".parse().unwrap_or_else(|e| panic!("{e}"))],
        ..HttpOptions::default()
    };
    let hub = hub_with(options, fast_retries());
    let id = hub
        .sender()
        .http(HttpRequest::post(receiver.url("/")))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(WITHIN).await;
    let status = destinations_testkit::status(&hub, id).await;
    assert_eq!(status.state, State::Dead, "{status:?}");
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("127.0.0.2") && error.contains("loopback"),
        "{error}"
    );
    assert_eq!(receiver.requests().len(), 1, "the first request went out");
}

#[tokio::test]
async fn signatures_verify_with_an_independent_hmac() {
    let receiver = Receiver::start().await;
    let secret_bytes = b"a-32-byte-secret-for-the-tests!!";
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(secret_bytes)
    );
    let old_secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 24])
    );
    let mut options = HttpOptions::allowing_loopback();
    options.signing_secrets = vec![secret, old_secret];
    let hub = hub_with(options, fast_retries());
    let id = hub
        .sender()
        .http(HttpRequest::post(receiver.url("/signed")).json(&json!({"event": "signed"})))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(WITHIN).await;

    let request = receiver
        .requests()
        .pop()
        .unwrap_or_else(|| panic!("one request"));
    assert_eq!(request.header("webhook-id"), Some(id.to_string().as_str()));
    assert_eq!(
        request.header("idempotency-key"),
        Some(id.to_string().as_str())
    );
    let timestamp = request.header("webhook-timestamp").unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    assert!(
        now.abs_diff(timestamp.parse().unwrap_or(0)) < 300,
        "timestamp is now"
    );
    let signed = format!(
        "{id}.{timestamp}.{}",
        String::from_utf8_lossy(&request.body)
    );
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret_bytes).unwrap_or_else(|e| panic!("{e}"));
    mac.update(signed.as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    let header = request.header("webhook-signature").unwrap_or_default();
    let signatures: Vec<&str> = header.split(' ').collect();
    assert_eq!(signatures.len(), 2, "one signature per secret");
    assert_eq!(signatures[0], expected);
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.json(), json!({"event": "signed"}));
}

#[tokio::test]
async fn requests_carry_method_headers_params_auth_and_text_bodies() {
    let receiver = Receiver::start().await;
    let hub = loopback_hub();
    hub.sender()
        .http(
            HttpRequest::put(receiver.url("/p?x=1"))
                .header("X-Custom", "yes")
                .param("q", "a b")
                .basic("luke", "s3cret")
                .text("plain text"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(WITHIN).await;
    let request = receiver
        .requests()
        .pop()
        .unwrap_or_else(|| panic!("one request"));
    assert_eq!(request.method, "PUT");
    assert_eq!(request.uri, "/p?x=1&q=a+b");
    assert_eq!(request.header("x-custom"), Some("yes"));
    let basic = base64::engine::general_purpose::STANDARD.encode("luke:s3cret");
    assert_eq!(
        request.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(&request.body[..], b"plain text");
    assert_eq!(
        request.header("content-type"),
        None,
        "text is sent as it is"
    );
}

#[tokio::test]
async fn strict_validation_names_the_field_through_the_json_path() {
    let hub = loopback_hub();
    let cases = [
        (
            json!({"url": "http://127.0.0.1/", "body": {"a": 1}}),
            "body",
            "unknown field `body`",
        ),
        (
            json!({"method": "post", "url": "http://127.0.0.1/"}),
            "method",
            "unknown variant `post`",
        ),
        (
            json!({"method": "FETCH", "url": "http://127.0.0.1/"}),
            "method",
            "unknown variant `FETCH`",
        ),
        (json!({"url": "ftp://127.0.0.1/f"}), "url", "scheme `ftp`"),
        (
            json!({"url": "http://127.0.0.1/", "headers": {"X-A": "1\r\nX-B: 2"}}),
            "headers.X-A",
            "CR or LF",
        ),
        (
            json!({"url": "http://127.0.0.1/", "headers": {"X-A": 1}}),
            "headers.X-A",
            "invalid type",
        ),
    ];
    for (payload, field, says) in cases {
        let bytes = bytes::Bytes::from(serde_json::to_vec(&payload).unwrap_or_default());
        match hub.sender().json("http", bytes) {
            Err(SendError::Invalid { error, .. }) => {
                assert_eq!(error.field, field, "{payload}");
                assert!(error.message.contains(says), "{payload}: {error}");
            }
            other => panic!("{payload} should be refused, got {other:?}"),
        }
    }
    let too_big = json!({"url": "http://127.0.0.1/", "data": "x".repeat(2 * 1024 * 1024)});
    assert!(matches!(
        hub.sender().to("http", &too_big),
        Err(SendError::TooLarge { .. })
    ));
    assert!(matches!(
        hub.sender().to("nope", &json!({})),
        Err(SendError::UnknownDestination { .. })
    ));
    hub.shutdown_within(WITHIN).await;
}

#[tokio::test]
async fn instances_build_from_config_through_the_registry() {
    let mut registry = Registry::new();
    destinations_http::register(&mut registry);
    let config = InstanceConfig::from_table(
        "hooks",
        json!({"kind": "http", "timeout": "2s", "allow_networks": ["127.0.0.0/8"], "retry": {"max_attempts": 2}}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let hub = Hub::builder()
        .config(HubConfig::default())
        .configured(&registry, "hooks", config)
        .unwrap_or_else(|e| panic!("{e}"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hub.destinations(), vec![("hooks".to_owned(), "http")]);
    let bad = InstanceConfig::from_table("hooks", json!({"kind": "http", "timout": "2s"}))
        .unwrap_or_else(|e| panic!("{e}"));
    let error = registry
        .build("http", "hooks", bad.options)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("destinations.hooks") && error.contains("timout"),
        "{error}"
    );
    let bad = InstanceConfig::from_table(
        "hooks",
        json!({"kind": "http", "signing_secrets": ["nope"]}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let error = registry
        .build("http", "hooks", bad.options)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("whsec_"), "{error}");
    hub.shutdown().await;
}

/// A host that accepts connections and never answers holds only its own slots: with every
/// one of them taken and thousands more sends waiting for it, a send to another host is
/// delivered at once (review C4).
#[tokio::test]
async fn a_stalled_host_never_holds_up_another() {
    let stalled = Receiver::scripted(|_| {
        Reply::After(Duration::from_secs(3600), Box::new(Reply::Status(200)))
    })
    .await;
    let healthy = Receiver::start().await;
    // The fixed bound: an adaptive one would give a host that never answers a single slot.
    let options = HttpOptions {
        per_host_concurrency: 2,
        adaptive_concurrency: false,
        timeout: Duration::from_secs(3600),
        ..HttpOptions::allowing_loopback()
    };
    let destination =
        destinations_http::HttpDestination::new(options).unwrap_or_else(|e| panic!("{e}"));
    let hub = Hub::builder()
        .destination(
            "http",
            Arc::new(destination),
            InstanceSettings {
                concurrency: Some(4),
                ..InstanceSettings::default()
            },
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let sender = hub.sender();
    // More than the dispatcher holds waiting (4 096): the rest go back to the queue.
    let waiting: Vec<EventId> = (0..5000)
        .map(|n| {
            sender
                .http(HttpRequest::post(stalled.url("/stalled")).json(&json!({"n": n})))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    stalled.wait_for_requests(2, WITHIN).await;
    let id = sender
        .http(HttpRequest::post(healthy.url("/healthy")))
        .unwrap_or_else(|e| panic!("{e}"));
    let status = hub
        .wait_final(id, WITHIN)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no status"));
    assert_eq!(status.state, State::Delivered, "{status:?}");
    assert_eq!(
        stalled.requests().len(),
        2,
        "the stalled host never had more than its 2 slots"
    );
    // Those that waited were not attempted, so their retry budget is whole.
    for id in &waiting[2..] {
        let status = destinations_testkit::status(&hub, *id).await;
        assert_eq!(status.attempts, 0, "{status:?}");
        assert!(
            matches!(status.state, State::Queued | State::Retrying),
            "{status:?}"
        );
    }
    hub.shutdown_within(Duration::from_millis(100)).await;
}

/// Deliver `requests` through a hub on `options` (one at a time), let it finish; their
/// statuses.
async fn statuses_with(options: HttpOptions, requests: Vec<HttpRequest>) -> Vec<SendStatus> {
    let hub = hub_with_settings(
        options,
        InstanceSettings {
            retry: fast_retries(),
            concurrency: Some(1),
            ..InstanceSettings::default()
        },
    );
    let ids: Vec<EventId> = requests
        .into_iter()
        .map(|request| hub.sender().http(request).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    hub.shutdown_within(WITHIN).await;
    let mut statuses = Vec::new();
    for id in ids {
        statuses.push(destinations_testkit::status(&hub, id).await);
    }
    statuses
}

#[tokio::test]
async fn https_to_a_private_ca_with_ca_file_and_refused_without() {
    let receiver = Receiver::tls(|_| Reply::Status(200)).await;
    let mut trusting = HttpOptions::allowing_loopback();
    trusting.ca_file = Some(receiver.ca_file());
    let request = HttpRequest::post(receiver.url("/tls")).json(&json!({"over": "tls"}));
    let statuses = statuses_with(trusting, vec![request.clone()]).await;
    assert_eq!(statuses[0].state, State::Delivered, "{:?}", statuses[0]);
    let arrived = receiver.requests();
    assert_eq!(arrived.len(), 1);
    assert_eq!(arrived[0].json(), json!({"over": "tls"}));
    assert_eq!(
        arrived[0].header("host"),
        Some(format!("localhost:{}", receiver.addr().port()).as_str())
    );
    // The system's trust does not know the test CA: the certificate is refused, nothing
    // is delivered.
    let untrusting = HttpOptions::allowing_loopback();
    let statuses = statuses_with(untrusting, vec![request]).await;
    let error = statuses[0].last_error.clone().unwrap_or_default();
    assert_ne!(statuses[0].state, State::Delivered);
    assert!(
        error.contains("TLS") && error.contains("certificate"),
        "{error}"
    );
    assert_eq!(receiver.requests().len(), 1, "nothing more arrived");
}

#[tokio::test]
async fn followed_redirects_change_the_method_as_browsers_do_and_drop_credentials_across_origins() {
    let target = Receiver::start().await;
    let (see_other, temporary, other_origin) = (
        target.url("/after-303"),
        target.url("/after-307"),
        target.url("/other-origin"),
    );
    let redirecting = Receiver::scripted(move |request| {
        let to = match request.uri.as_str() {
            "/303" => (303, see_other.clone()),
            "/307" => (307, temporary.clone()),
            "/away" => (302, other_origin.clone()),
            _ => (308, "/loop".to_owned()),
        };
        Reply::Full(to.0, vec![("location", to.1)], String::new())
    })
    .await;
    let mut options = HttpOptions::allowing_loopback();
    options.follow_redirects = 2;
    let body = json!({"kept": true});
    let statuses = statuses_with(
        options,
        vec![
            HttpRequest::post(redirecting.url("/303")).json(&body),
            HttpRequest::post(redirecting.url("/307")).json(&body),
            HttpRequest::put(redirecting.url("/away"))
                .json(&body)
                .bearer("secret-token"),
            HttpRequest::post(redirecting.url("/loop")).json(&body),
        ],
    )
    .await;
    let states: Vec<State> = statuses.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [
            State::Delivered,
            State::Delivered,
            State::Delivered,
            State::Dead
        ],
        "{statuses:?}"
    );
    let arrived = target.requests();
    let at = |path: &str| {
        arrived
            .iter()
            .find(|r| r.uri == path)
            .unwrap_or_else(|| panic!("nothing arrived at {path}: {arrived:?}"))
    };
    assert_eq!(
        at("/after-303").method,
        "GET",
        "a 303 is followed with a GET"
    );
    assert!(at("/after-303").body.is_empty());
    assert_eq!(at("/after-307").method, "POST", "a 307 keeps the method");
    assert_eq!(at("/after-307").json(), body, "and the body");
    assert_eq!(at("/other-origin").method, "PUT", "a 302 keeps a PUT");
    assert_eq!(
        at("/other-origin").header("authorization"),
        None,
        "credentials do not cross to another origin"
    );
    let error = statuses[3].last_error.clone().unwrap_or_default();
    assert!(error.contains("more than 2 redirects"), "{error}");
}

#[tokio::test]
async fn sends_reuse_a_connection_and_survive_targets_that_close_theirs() {
    let keeping = Receiver::start().await;
    let requests = (0..20)
        .map(|n| HttpRequest::post(keeping.url("/kept")).json(&json!({"n": n})))
        .collect();
    let statuses = statuses_with(HttpOptions::allowing_loopback(), requests).await;
    assert!(statuses.iter().all(|s| s.state == State::Delivered));
    assert_eq!(keeping.requests().len(), 20);
    assert_eq!(keeping.connections(), 1, "one at a time, on one connection");
    // A target that closes every connection after its answer: each send gets a new one.
    let closing = Receiver::scripted(|_| {
        Reply::Full(200, vec![("connection", "close".to_owned())], String::new())
    })
    .await;
    let requests = (0..5)
        .map(|n| HttpRequest::post(closing.url("/closed")).json(&json!({"n": n})))
        .collect();
    let statuses = statuses_with(HttpOptions::allowing_loopback(), requests).await;
    assert!(
        statuses
            .iter()
            .all(|s| s.state == State::Delivered && s.attempts == 1),
        "{statuses:?}"
    );
    assert_eq!(closing.connections(), 5);
}

/// A host that answers 429 with `Retry-After` gets nothing more until then — not the failed
/// send, not the others for it — while another host is sent to meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_holds_back_every_send_for_that_host_only() {
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let busy = {
        let times = times.clone();
        Receiver::scripted(move |_| {
            let mut times = times
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            times.push(std::time::Instant::now());
            if times.len() == 1 {
                Reply::Full(429, vec![("retry-after", "1".to_owned())], String::new())
            } else {
                Reply::Status(200)
            }
        })
        .await
    };
    let other = Receiver::start().await;
    let hub = loopback_hub();
    let sender = hub.sender();
    let first = sender
        .http(HttpRequest::post(busy.url("/busy")))
        .unwrap_or_else(|e| panic!("{e}"));
    busy.wait_for_requests(1, WITHIN).await;
    let mut ids: Vec<EventId> = (0..3)
        .map(|n| {
            sender
                .http(HttpRequest::post(busy.url("/busy")).json(&json!({ "n": n })))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let elsewhere = sender
        .http(HttpRequest::post(other.url("/other")))
        .unwrap_or_else(|e| panic!("{e}"));
    // The other host is served while the busy one is held.
    destinations_testkit::delivered(&hub, &[elsewhere], WITHIN).await;
    ids.push(first);
    destinations_testkit::delivered(&hub, &ids, WITHIN).await;
    let times = times
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert_eq!(
        times.len(),
        5,
        "the refused request, its retry, three others"
    );
    for later in &times[1..] {
        assert!(
            *later - times[0] >= Duration::from_secs(1),
            "the host was sent to {:?} after it said Retry-After: 1",
            *later - times[0]
        );
    }
    hub.shutdown().await;
}
