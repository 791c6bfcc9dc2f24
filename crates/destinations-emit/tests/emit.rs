//! The emit destination with real webhook receivers on 127.0.0.1 and in-process listeners:
//! fan-out by subscription, retries per listener, history, the loop guard and `$errors`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use destinations_core::prelude::*;
use destinations_core::{HubConfig, InstanceConfig, Registry};
use destinations_emit::{EmitSend, Emitted, SendEmit, Subscription};
use destinations_testkit::{Receiver, Reply, TempDir};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

/// A hub with an emit instance (webhooks may reach loopback; fast retries) and an http one.
fn hub(extra: serde_json::Value) -> Hub {
    let mut emit = json!({
        "kind": "emit",
        "webhook": {"allow_networks": ["127.0.0.0/8"]},
        "retry": {"initial_delay": "10ms", "max_delay": "50ms"},
    });
    if let (Some(table), serde_json::Value::Object(extra)) = (emit.as_object_mut(), extra) {
        table.extend(extra);
    }
    let http = json!({"kind": "http", "allow_networks": ["127.0.0.0/8"]});
    let registry = Registry::linked();
    let mut builder = Hub::builder().config(HubConfig::default());
    for (name, table) in [("emit", emit), ("http", http)] {
        let config = InstanceConfig::from_table(name, table).unwrap_or_else(|e| panic!("{e}"));
        builder = builder
            .configured(&registry, name, config)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    builder.build().unwrap_or_else(|e| panic!("{e}"))
}

fn subscribe(hub: &Hub, emitter: &str, listener: &str, channel: Option<&str>) {
    destinations_emit::subscribe(hub, emitter, listener, channel).unwrap_or_else(|e| panic!("{e}"));
}

/// An in-process listener that records what it gets and says so on a channel.
fn recording(hub: &Hub, listener: &str) -> (Arc<Mutex<Vec<Emitted>>>, mpsc::UnboundedReceiver<()>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let (tell, told) = mpsc::unbounded_channel();
    let record = got.clone();
    destinations_emit::listen(hub, listener, move |emitted| {
        record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(emitted);
        let _ = tell.send(());
        async { Ok(()) }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    (got, told)
}

fn emit(hub: &Hub, emitter: &str, channel: Option<&str>, event: &serde_json::Value) -> EventId {
    let mut send = EmitSend::new(event).from_emitter(emitter);
    send.channel = channel.map(str::to_owned);
    hub.sender().emit(send).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn one_emit_reaches_every_matching_subscriber_once() {
    let hub = hub(json!({}));
    let glob = Receiver::start().await;
    let exact = Receiver::start().await;
    let refunds = Receiver::start().await;
    let elsewhere = Receiver::start().await;
    subscribe(&hub, "p_*", &glob.url("/glob"), None);
    subscribe(&hub, "p_orders", &glob.url("/glob"), None); // the same listener twice
    subscribe(&hub, "p_orders", &exact.url("/exact"), None);
    subscribe(&hub, "p_orders", &refunds.url("/refunds"), Some("refunds"));
    subscribe(&hub, "q_*", &elsewhere.url("/elsewhere"), None);
    let (in_process, _) = recording(&hub, "ledger");
    subscribe(&hub, "p_orders", "ledger", Some("refunds"));

    let order = emit(&hub, "p_orders", None, &json!({"order": 1}));
    let refund = emit(&hub, "p_orders", Some("refunds"), &json!({"refund": 2}));
    hub.shutdown_within(Duration::from_secs(60)).await;

    for id in [order, refund] {
        assert_eq!(
            destinations_testkit::state(&hub, id).await,
            Some(State::Delivered)
        );
    }
    let bodies = |r: &Receiver| {
        r.accepted_requests()
            .iter()
            .map(|q| q.json())
            .collect::<Vec<_>>()
    };
    let glob_got = bodies(&glob);
    assert_eq!(
        glob_got.len(),
        1,
        "once, though two subscriptions match: {glob_got:?}"
    );
    assert_eq!(glob_got[0]["event"], json!({"order": 1}));
    assert_eq!(glob_got[0]["metadata"]["emitter_id"], "p_orders");
    assert_eq!(glob_got[0]["metadata"]["emit_id"], order.to_string());
    assert_eq!(glob_got[0]["metadata"]["name"], serde_json::Value::Null);
    assert_eq!(bodies(&exact).len(), 1);
    let refunds_got = bodies(&refunds);
    assert_eq!(
        refunds_got.len(),
        1,
        "the channel's subscriber gets the channel's event only"
    );
    assert_eq!(refunds_got[0]["event"], json!({"refund": 2}));
    assert_eq!(refunds_got[0]["metadata"]["name"], "refunds");
    assert!(elsewhere.requests().is_empty());
    let in_process = in_process.lock().unwrap_or_else(PoisonError::into_inner);
    assert_eq!(in_process.len(), 1);
    assert_eq!(in_process[0].event_json(), json!({"refund": 2}));
    assert_eq!(in_process[0].emit_id, refund.to_string());
    // Each webhook delivery carries its own Idempotency-Key.
    let key = glob.accepted_requests()[0].key.clone();
    assert!(key.is_some() && key != Some(order.to_string()));
}

#[tokio::test]
async fn unsubscribing_stops_delivery() {
    let hub = hub(json!({}));
    let (got, mut told) = recording(&hub, "l");
    subscribe(&hub, "e", "l", None);
    emit(&hub, "e", None, &json!({"n": 1}));
    told.recv().await;
    let instance = destinations_emit::instance(&hub).unwrap_or_else(|e| panic!("{e}"));
    let removed = instance.unsubscribe(&Subscription {
        emitter_id: "e".into(),
        listener_id: "l".into(),
        event_name: None,
    });
    assert_eq!(removed, Ok(true));
    let after = emit(&hub, "e", None, &json!({"n": 2}));
    hub.shutdown_within(Duration::from_secs(60)).await;
    assert_eq!(
        destinations_testkit::state(&hub, after).await,
        Some(State::Delivered)
    );
    let got = got.lock().unwrap_or_else(PoisonError::into_inner);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event_json(), json!({"n": 1}));
}

#[tokio::test]
async fn a_failing_listener_is_retried_without_holding_up_the_others() {
    let hub = hub(json!({}));
    let flaky = Receiver::scripted(|request| {
        if request.attempt <= 2 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let steady = Receiver::start().await;
    // An in-process listener that does not answer until the steady webhook has its event: if
    // deliveries waited on each other, this would never finish.
    let steady_arrived = Arc::new(Notify::new());
    let gate = steady_arrived.clone();
    destinations_emit::listen(&hub, "gated", move |_| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Ok(())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    subscribe(&hub, "e", "gated", None);
    subscribe(&hub, "e", &flaky.url("/flaky"), None);
    subscribe(&hub, "e", &steady.url("/steady"), None);
    emit(&hub, "e", None, &json!({"n": 1}));
    steady.wait_for_accepted(1, Duration::from_secs(30)).await;
    steady_arrived.notify_one();
    assert_eq!(
        hub.shutdown_within(Duration::from_secs(60)).await.abandoned,
        0
    );
    let attempts = flaky.requests();
    assert_eq!(attempts.len(), 3, "two 503s, then accepted");
    assert!(
        attempts.iter().all(|r| r.key == attempts[0].key),
        "one delivery, retried with its key"
    );
    assert_eq!(flaky.accepted_keys().len(), 1);
    assert_eq!(steady.requests().len(), 1);
    assert!(destinations_testkit::dead_letters(&hub).await.is_empty());
}

#[tokio::test]
async fn the_history_lists_the_last_100_newest_first_with_metadata() {
    let hub = hub(json!({}));
    let ids: Vec<EventId> = (0..120)
        .map(|n| {
            emit(
                &hub,
                "p_history",
                if n % 2 == 0 { None } else { Some("odd") },
                &json!({"n": n}),
            )
        })
        .collect();
    hub.shutdown_within(Duration::from_secs(60)).await;
    let instance = destinations_emit::instance(&hub).unwrap_or_else(|e| panic!("{e}"));
    let history = serde_json::to_value(instance.history("p_history", 1000)).unwrap_or_default();
    let history = history.as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 100);
    for (entry, n) in history.iter().zip((20..120).rev()) {
        assert_eq!(entry["event"], json!({"raw_event": {"n": n}}));
        assert_eq!(entry["metadata"]["emitter_id"], "p_history");
        assert_eq!(entry["metadata"]["emit_id"], ids[n].to_string());
        let name = if n % 2 == 0 {
            serde_json::Value::Null
        } else {
            json!("odd")
        };
        assert_eq!(entry["metadata"]["name"], name);
        let id = entry["id"].as_str().unwrap_or_default();
        let (ms, seq) = id.split_once('-').unwrap_or_else(|| panic!("id {id}"));
        assert!(
            ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok(),
            "id {id}"
        );
    }
    assert_eq!(instance.history("p_history", 5).len(), 5);
    assert!(instance.history("nobody", 5).is_empty());
}

#[tokio::test]
async fn a_loop_of_listeners_stops_at_the_hop_limit() {
    let hub = hub(json!({"max_hops": 4}));
    let count = Arc::new(Mutex::new(0u32));
    for (listener, emits_to) in [("a", "b"), ("b", "a")] {
        // Work done as part of a delivery goes through the internal sender: still taken while
        // the hub drains at shutdown.
        let sender = hub.internal_sender();
        let count = count.clone();
        destinations_emit::listen(&hub, listener, move |emitted: Emitted| {
            *count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            let result = sender
                .emit(emitted.follow_up(&json!({"from": emitted.listener_id})))
                .map(drop)
                .map_err(|e| e.to_string());
            async move { result }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        // `a` listens to `b` and `b` to `a`.
        subscribe(&hub, emits_to, listener, None);
    }
    emit(&hub, "a", None, &json!({"start": true}));
    hub.shutdown_within(Duration::from_secs(60)).await;
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(
        letters.len(),
        1,
        "{:?}",
        letters.iter().map(|l| &l.reason).collect::<Vec<_>>()
    );
    assert!(
        letters[0].reason.contains("loop guard"),
        "{}",
        letters[0].reason
    );
    assert_eq!(
        *count.lock().unwrap_or_else(PoisonError::into_inner),
        5,
        "hops 0 to 4 are delivered, the fifth re-emit is stopped"
    );
}

#[tokio::test]
async fn a_dead_letter_of_another_destination_appears_on_errors() {
    let hub = hub(json!({}));
    let (got, mut told) = recording(&hub, "alerts");
    subscribe(&hub, "*", "alerts", Some("$errors"));
    let gone = Receiver::scripted(|_| Reply::Full(404, vec![], "no such hook".into())).await;
    let run = hub.begin_run("nightly-sync");
    let id = run
        .send()
        .to(
            "http",
            &json!({"url": gone.url("/hook?token=qs-s3cret"), "data": {"x": 1}, "headers": {"X-Token": "hunter2"}, "auth": {"bearer": "s3cret"}}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    told.recv().await;
    hub.shutdown_within(Duration::from_secs(60)).await;
    let got = got.lock().unwrap_or_else(PoisonError::into_inner);
    assert_eq!(got.len(), 1);
    let error = &got[0];
    assert_eq!(error.name.as_deref(), Some("$errors"));
    assert_eq!(
        error.emitter_id, "nightly-sync",
        "emitted by the run whose send died"
    );
    let event = error.event_json();
    assert_eq!(event["destination"], "http");
    assert_eq!(event["send_id"], id.to_string());
    assert_eq!(
        event["payload"]["data"],
        json!({"x": 1}),
        "with the original send"
    );
    assert!(
        event["error"].as_str().unwrap_or("").contains("404"),
        "{event}"
    );
    // Credentials, header values and query values never reach listeners (review T1).
    let shown = event.to_string();
    for secret in ["hunter2", "s3cret", "qs-s3cret"] {
        assert!(
            !shown.contains(secret),
            "`{secret}` leaked into $errors: {shown}"
        );
    }
    assert_eq!(event["payload"]["headers"]["X-Token"], "[redacted]");
    assert_eq!(event["payload"]["auth"]["bearer"], "[redacted]");
    assert!(
        event["payload"]["url"]
            .as_str()
            .is_some_and(|url| url.ends_with("/hook?token=%5Bredacted%5D")),
        "{event}"
    );
}

#[tokio::test]
async fn legacy_raw_events_are_taken_and_bad_emits_are_refused() {
    let hub = hub(json!({}));
    let (got, mut told) = recording(&hub, "l");
    subscribe(&hub, "legacy", "l", None);
    hub.sender()
        .to(
            "emit",
            &json!({"event": {"raw_event": {"old": true}}, "emitter_id": "legacy"}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    told.recv().await;
    assert_eq!(
        got.lock().unwrap_or_else(PoisonError::into_inner)[0].event_json(),
        json!({"old": true})
    );
    for (payload, field) in [
        (json!({"event": [1, 2]}), "event"),
        (json!({"event": {}, "channel": "$errors"}), "channel"),
        (json!({"event": {}, "emitter_id": "a b"}), "emitter_id"),
        (json!({"event": {}, "$delivery": {}}), "$delivery"),
        (json!({"channel": "x"}), "event"),
    ] {
        match hub.sender().to("emit", &payload) {
            Err(SendError::Invalid { error, .. }) => {
                assert_eq!(error.field, field, "{payload}: {error}");
            }
            other => panic!("{payload} was not refused: {other:?}"),
        }
    }
    hub.shutdown().await;
}

#[tokio::test]
async fn subscriptions_survive_a_restart_when_a_file_is_configured() {
    let folder = TempDir::new("emit-subscriptions");
    let file = folder.path().join("subscriptions.json");
    let options = json!({"subscriptions_file": file.display().to_string()});
    let first = hub(options.clone());
    subscribe(&first, "p_*", "https://hooks.example.com/a", None);
    subscribe(&first, "p_orders", "ledger", Some("refunds"));
    first.shutdown().await;
    let second = hub(options);
    let instance = destinations_emit::instance(&second).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(instance.subscriptions().len(), 2);
    assert_eq!(
        instance.subscriptions()[1].event_name.as_deref(),
        Some("refunds")
    );
    second.shutdown().await;
}

/// A listener on `$errors` whose own sends fail for good cannot feed `$errors` forever: what
/// is sent while delivering an `$errors` event belongs to the `$errors` run, and its dead
/// letters are kept but not reported again (review C5).
#[tokio::test]
async fn a_failing_errors_listener_does_not_loop() {
    let hub = hub(json!({}));
    let gone = Receiver::scripted(|_| {
        Reply::After(
            Duration::from_millis(20),
            Box::new(Reply::Full(404, vec![], "no such hook".into())),
        )
    })
    .await;
    let alerts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (sender, alert_url, heard) = (hub.internal_sender(), gone.url("/alert"), alerts.clone());
    destinations_emit::listen(&hub, "alerts", move |_| {
        heard.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Alert by HTTP, to a hook that is gone.
        let sent = sender.to("http", &json!({"url": alert_url}));
        async move { sent.map(|_| ()).map_err(|e| e.to_string()) }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    subscribe(&hub, "*", "alerts", Some("$errors"));
    hub.sender()
        .to("http", &json!({"url": gone.url("/first")}))
        .unwrap_or_else(|e| panic!("{e}"));
    // The first send dies, its $errors event is heard, the alert dies: then nothing more.
    gone.wait_for_requests(2, Duration::from_secs(60)).await;
    let report = hub.shutdown_within(Duration::from_secs(60)).await;
    assert_eq!(
        report.abandoned, 0,
        "shutdown ends: nothing keeps feeding the queue"
    );
    assert_eq!(
        alerts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the alert's own death is not reported on $errors"
    );
    let letters = hub
        .dead_letters(usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(letters.len(), 2, "both dead sends are kept: {letters:?}");
    assert_eq!(gone.requests().len(), 2);
}
