//! The chat destination against a real webhook on loopback: the shared conformance suite on
//! every queue, then what is its own (a channel's burst in one post, the instance's channels,
//! the webhook's URL kept out of errors).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use destinations_chat::{ChatDestination, ChatMessage, SendChat};
use destinations_core::prelude::*;
use destinations_core::{Outcome, Typed};
use destinations_testkit::conformance::{self, Capabilities, ConformanceTarget, SinkBehaviour};
use destinations_testkit::{Receiver, Reply};
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(60);

struct Webhook {
    receiver: Option<Receiver>,
}

#[async_trait]
impl ConformanceTarget for Webhook {
    fn kind(&self) -> &'static str {
        destinations_chat::KIND
    }

    async fn start_sink(&mut self, behaviour: SinkBehaviour) -> serde_json::Value {
        // A chat webhook takes no idempotency key: a post is the same attempt again when its
        // body is (a failed batch is retried whole).
        let seen: Mutex<HashMap<Vec<u8>, u32>> = Mutex::default();
        let receiver = Receiver::scripted(move |request| {
            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            let attempt = seen.entry(request.body.to_vec()).or_insert(0);
            *attempt += 1;
            match behaviour {
                SinkBehaviour::Accept => Reply::Status(200),
                SinkBehaviour::FailFirstAttempts(n) if *attempt <= n => Reply::Status(503),
                SinkBehaviour::FailFirstAttempts(_) => Reply::Status(200),
                SinkBehaviour::RejectPermanently => Reply::Full(404, vec![], "no_such_hook".into()),
            }
        })
        .await;
        let url = receiver.url("/hook");
        self.receiver = Some(receiver);
        json!({ "webhook_url": url })
    }

    fn payload(&self, marker: u64) -> serde_json::Value {
        json!({ "text": format!("marker {marker}") })
    }

    fn invalid_payload(&self) -> (serde_json::Value, &'static str) {
        (json!({ "text": "hi", "colour": "red" }), "colour")
    }

    async fn accepted_markers(&self) -> Vec<u64> {
        self.accepted_batches().await.concat()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            batches: true,
            groups: true,
            instance_checks: true,
            ..Capabilities::default()
        }
    }

    /// The lines of each accepted post.
    async fn accepted_batches(&self) -> Vec<Vec<u64>> {
        let requests = self.receiver.as_ref().map(Receiver::accepted_requests);
        requests
            .unwrap_or_default()
            .iter()
            .map(|r| {
                let text = r.json()["text"].as_str().unwrap_or_default().to_owned();
                text.lines()
                    .filter_map(|line| line.strip_prefix("marker ")?.parse().ok())
                    .collect::<Vec<u64>>()
            })
            .collect()
    }

    /// A channel per group.
    fn payload_in_group(&self, marker: u64, group: u8) -> serde_json::Value {
        json!({ "text": format!("marker {marker}"), "channel": format!("group-{group}") })
    }

    /// A channel the instance does not list.
    fn instance_check(&self) -> Option<(serde_json::Value, serde_json::Value, &'static str)> {
        let payload = json!({ "text": "marker 0", "channel": "dev" });
        Some((json!({ "channels": ["ops"] }), payload, "channel"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    conformance::run_all(&mut Webhook { receiver: None }).await;
}

fn hub(options: serde_json::Value) -> Hub {
    let chat =
        Typed::<ChatDestination>::from_config("chat", options).unwrap_or_else(|e| panic!("{e}"));
    Hub::builder()
        .destination("chat", chat, InstanceSettings::default())
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn a_channels_burst_is_one_post_a_line_each_and_channels_never_mix() {
    let receiver = Receiver::start().await;
    let hub = hub(json!({ "webhook_url": receiver.url("/hook"), "channels": ["ops", "dev"] }));
    let run = hub.begin_run("deploy");
    for n in 0..5 {
        run.send()
            .chat(ChatMessage::new(format!("ops {n}")).on_channel("ops"))
            .unwrap_or_else(|e| panic!("{e}"));
        run.send()
            .chat(ChatMessage::new(format!("dev {n}")).on_channel("dev"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let ids = run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    destinations_testkit::delivered(&hub, &ids, WITHIN).await;
    let mut posts: Vec<(String, String)> = receiver
        .requests()
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["channel"].as_str().unwrap_or_default().to_owned(),
                body["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    posts.sort();
    assert_eq!(
        posts,
        [
            (
                "dev".to_owned(),
                "dev 0\ndev 1\ndev 2\ndev 3\ndev 4".to_owned()
            ),
            (
                "ops".to_owned(),
                "ops 0\nops 1\nops 2\nops 3\nops 4".to_owned()
            ),
        ]
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn bad_messages_are_refused_with_the_field_named() {
    let hub = hub(json!({ "webhook_url": "http://127.0.0.1:9/hook", "channels": ["ops"] }));
    let sender = hub.sender();
    for (message, field) in [
        (ChatMessage::new(""), "`text`: is empty"),
        (
            ChatMessage::new("x".repeat(1801)),
            "`text`: is 1801 characters long",
        ),
        (ChatMessage::new("hi").on_channel("a b"), "`channel`"),
        (
            ChatMessage::new("hi").on_channel("dev"),
            "`channel`: `dev` is not one of: ops",
        ),
    ] {
        let error = sender.chat(message).expect_err(field).to_string();
        assert!(error.contains(field), "{error}");
    }
    let raw = sender
        .to("chat", &json!({"text": "hi", "channel": "dev"}))
        .expect_err("raw");
    assert!(raw.to_string().contains("`channel`"), "{raw}");
    let options =
        Typed::<ChatDestination>::from_config("chat", json!({ "webhook_url": "ftp://x" }));
    assert!(
        options
            .err()
            .is_some_and(|e| e.to_string().contains("webhook_url"))
    );
    hub.shutdown_within(Duration::ZERO).await;
}

#[tokio::test]
async fn a_refusal_is_dead_lettered_with_the_answer_and_never_the_webhooks_url() {
    let receiver = Receiver::scripted(|_| Reply::Full(403, vec![], "invalid_token".into())).await;
    let secret_url = receiver.url("/services/T000/B000/SECRET");
    let hub = hub(json!({ "webhook_url": secret_url }));
    let id = hub
        .sender()
        .chat(ChatMessage::new("hi"))
        .unwrap_or_else(|e| panic!("{e}"));
    let status = hub
        .wait_final(id, WITHIN)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no status"));
    assert_eq!(status.state, State::Dead);
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("403") && error.contains("invalid_token"),
        "{error}"
    );
    assert!(!error.contains("SECRET"), "{error}");
    // Nothing listens here: the connection error must not name the URL either.
    let hub = self::hub(json!({ "webhook_url": "http://127.0.0.1:9/services/SECRET" }));
    let report = Typed::<ChatDestination>::from_config(
        "chat",
        json!({ "webhook_url": "http://127.0.0.1:9/services/SECRET" }),
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .deliver(&Batch::new(vec![destinations_core::Envelope::new(
        Arc::from("chat"),
        None,
        br#"{"text":"hi"}"#.to_vec().into(),
    )]))
    .await
    .into_reports(1)
    .remove(0);
    match report.outcome {
        Outcome::Retry { error, .. } => assert!(
            error.contains("could not post") && !error.contains("SECRET"),
            "{error}"
        ),
        other => panic!("{other:?}"),
    }
    hub.shutdown_within(Duration::ZERO).await;
}
