//! The hub's own promises — retry timing, batching, bounds, runs, shutdown, dead letters —
//! driven by a scripted in-process destination on a paused clock. (Destinations are tested
//! against real servers in their own crates; here the subject is the engine.)

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{HubConfig, OnRunError, QueueCapacity, QueueFull};
use serde_json::json;
use tokio::time::Instant;

/// Records each delivery attempt (when, which markers) and answers as its script says.
struct Scripted {
    policy: BatchPolicy,
    answer: Box<dyn Fn(u32) -> Report + Send + Sync>,
    attempts: Mutex<Vec<(Instant, Vec<u64>, u32)>>,
    hang: bool,
}

impl Scripted {
    fn new(answer: impl Fn(u32) -> Report + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            policy: BatchPolicy::one_per_send(),
            answer: Box::new(answer),
            attempts: Mutex::new(Vec::new()),
            hang: false,
        })
    }

    /// Batches of up to `max_events`, flushed after `max_age`, answered by `answer`.
    fn batching(
        max_events: usize,
        max_age: Duration,
        answer: impl Fn(u32) -> Report + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            policy: BatchPolicy {
                max_events,
                max_bytes: usize::MAX,
                max_age,
            },
            answer: Box::new(answer),
            attempts: Mutex::new(Vec::new()),
            hang: false,
        })
    }

    /// Never answers.
    fn hanging() -> Arc<Self> {
        Arc::new(Self {
            policy: BatchPolicy::one_per_send(),
            answer: Box::new(|_| Report::delivered()),
            attempts: Mutex::new(Vec::new()),
            hang: true,
        })
    }

    fn attempts(&self) -> Vec<(Instant, Vec<u64>, u32)> {
        self.attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[async_trait]
impl Destination for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        let value: serde_json::Value = destinations_core::parse_strict(payload)?;
        match value.get("marker") {
            Some(m) if m.is_u64() => Ok(()),
            _ => Err(InvalidPayload::field("marker", "must be a number")),
        }
    }

    fn batch_policy(&self) -> BatchPolicy {
        self.policy
    }

    fn batch_group(&self, payload: &[u8]) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
        Some(value.get("group")?.as_str()?.to_owned())
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let markers = batch
            .envelopes()
            .iter()
            .map(|e| serde_json::from_slice::<serde_json::Value>(&e.payload).unwrap_or_default()["marker"].as_u64().unwrap_or(0))
            .collect();
        let attempt = batch.envelopes()[0].attempts;
        self.attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((Instant::now(), markers, attempt));
        if self.hang {
            std::future::pending::<()>().await;
        }
        BatchOutcome::All((self.answer)(attempt))
    }
}

fn hub(destination: Arc<Scripted>, settings: InstanceSettings, config: HubConfig) -> Hub {
    Hub::builder()
        .config(config)
        .destination("d", destination, settings)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn send(hub: &Hub, marker: u64) -> EventId {
    hub.sender()
        .to("d", &json!({ "marker": marker }))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_within_full_jitter() {
    let d = Scripted::new(|attempt| {
        if attempt < 6 {
            Report::retry("503")
        } else {
            Report::delivered()
        }
    });
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let id = send(&hub, 1);
    hub.shutdown_within(Duration::from_secs(3600)).await;
    let attempts = d.attempts();
    assert_eq!(attempts.len(), 6);
    for (i, pair) in attempts.windows(2).enumerate() {
        let gap = pair[1].0 - pair[0].0;
        let ceiling = Duration::from_secs(1 << i);
        assert!(
            gap <= ceiling,
            "gap {i} was {gap:?}, over the ceiling {ceiling:?}"
        );
    }
    let total = attempts[5].0 - attempts[0].0;
    assert!(total <= Duration::from_secs(1 + 2 + 4 + 8 + 16));
    let status = hub.status(id).unwrap_or_else(|| panic!("status"));
    assert_eq!((status.state, status.attempts), (State::Delivered, 6));
    assert_eq!(status.last_error.as_deref(), Some("503"));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let d = Scripted::new(|attempt| {
        if attempt == 1 {
            Report::retry_after("429", Some(Duration::from_secs(42)))
        } else {
            Report::delivered()
        }
    });
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let id = send(&hub, 1);
    hub.shutdown_within(Duration::from_secs(3600)).await;
    let attempts = d.attempts();
    assert_eq!(attempts.len(), 2);
    assert!(attempts[1].0 - attempts[0].0 >= Duration::from_secs(42));
    assert_eq!(hub.status(id).map(|s| s.state), Some(State::Delivered));
}

#[tokio::test(start_paused = true)]
async fn the_attempt_budget_ends_in_a_dead_letter_with_the_reason() {
    let d = Scripted::new(|_| Report::retry("connection refused"));
    let settings = InstanceSettings {
        retry: RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        },
        ..InstanceSettings::default()
    };
    let hub = hub(d.clone(), settings, HubConfig::default());
    let id = send(&hub, 7);
    hub.shutdown_within(Duration::from_secs(3600)).await;
    assert_eq!(d.attempts().len(), 3);
    let status = hub.status(id).unwrap_or_else(|| panic!("status"));
    assert_eq!(status.state, State::Dead);
    let letters = hub.dead_letters(10);
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].reason,
        "gave up after 3 attempts; last error: connection refused"
    );
    assert_eq!(
        status.last_error.as_deref(),
        Some(letters[0].reason.as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn batches_flush_by_count_and_by_age() {
    let d = Scripted::batching(3, Duration::from_secs(60), |_| Report::delivered());
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let start = Instant::now();
    for marker in 0..4 {
        send(&hub, marker);
    }
    // The fourth send waits for its batch's age; advance the paused clock past it.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let attempts = d.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].1, vec![0, 1, 2], "full by count, at once");
    assert!(attempts[0].0 - start < Duration::from_secs(1));
    assert_eq!(attempts[1].1, vec![3], "flushed by age");
    assert!(attempts[1].0 - start >= Duration::from_secs(60));
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn each_group_fills_and_ages_on_its_own() {
    let d = Scripted::batching(3, Duration::from_secs(60), |_| Report::delivered());
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let start = Instant::now();
    let grouped = |marker: u64, group: &str| {
        hub.sender()
            .to("d", &json!({ "marker": marker, "group": group }))
            .unwrap_or_else(|e| panic!("{e}"));
    };
    for marker in 0..5 {
        grouped(marker, if marker % 2 == 0 { "even" } else { "odd" });
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    grouped(5, "late");
    tokio::time::sleep(Duration::from_secs(51)).await;
    let batches: Vec<(Vec<u64>, Duration)> = d
        .attempts()
        .into_iter()
        .map(|a| (a.1, a.0 - start))
        .collect();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[0].0, vec![0, 2, 4], "a full group goes at once");
    assert!(batches[0].1 < Duration::from_secs(1));
    assert_eq!(
        batches[1].0,
        vec![1, 3],
        "the other group waits for its own age"
    );
    assert!(batches[1].1 >= Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let attempts = d.attempts();
    assert_eq!(
        attempts.len(),
        3,
        "the late group ages from its own first send"
    );
    assert_eq!(attempts[2].1, vec![5]);
    assert!(attempts[2].0 - start >= Duration::from_secs(70));
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_that_fails_is_retried_as_the_same_batch() {
    let d = Scripted::batching(3, Duration::from_secs(1), |attempt| {
        if attempt == 1 {
            Report::retry("throttled")
        } else {
            Report::delivered()
        }
    });
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    for marker in 0..3 {
        send(&hub, marker);
    }
    hub.shutdown_within(Duration::from_secs(3600)).await;
    let batches: Vec<Vec<u64>> = d.attempts().into_iter().map(|a| a.1).collect();
    assert_eq!(batches, vec![vec![0, 1, 2], vec![0, 1, 2]]);
}

#[tokio::test]
async fn a_full_queue_refuses_a_whole_run_and_keeps_nothing_of_it() {
    let config = HubConfig {
        queue: QueueCapacity {
            max_events: 3,
            max_bytes: 1 << 20,
        },
        ..HubConfig::default()
    };
    // Hang deliveries so nothing leaves the queue while we fill it.
    let hanging = Scripted::hanging();
    let hub = hub(hanging.clone(), InstanceSettings::default(), config);
    let run = hub.begin_run("big");
    let ids: Vec<EventId> = (0..5)
        .map(|m| {
            run.send()
                .to("d", &json!({ "marker": m }))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    match run.finish().await {
        Err(SendError::QueueFull(QueueFull::Events {
            pending: 0,
            limit: 3,
            asked: 5,
        })) => {}
        other => panic!("expected queue full, got {other:?}"),
    }
    assert!(
        ids.iter().all(|id| hub.status(*id).is_none()),
        "nothing of the run was kept"
    );
    assert_eq!(hub.queue_depth().events, 0);
    for m in 0..3 {
        send(&hub, m);
    }
    let refused = hub.sender().to("d", &json!({"marker": 9}));
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("queue is full") && message.contains("queue.max_events"),
        "{message}"
    );
    // Everything accepted is accounted for at shutdown: dead-lettered with the reason.
    let report = hub.shutdown_within(Duration::from_millis(50)).await;
    assert_eq!(report.abandoned, 3);
    let letters = hub.dead_letters(10);
    assert_eq!(letters.len(), 3);
    assert!(
        letters
            .iter()
            .all(|l| l.reason.contains("shutdown deadline")),
        "{:?}",
        letters[0].reason
    );
    assert_eq!(hanging.attempts().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn shutdown_dead_letters_a_retry_that_is_not_due_before_the_deadline() {
    let d = Scripted::new(|_| Report::retry_after("busy", Some(Duration::from_secs(300))));
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let id = send(&hub, 1);
    let report = hub.shutdown_within(Duration::from_secs(10)).await;
    assert_eq!(report.abandoned, 1);
    let status = hub.status(id).unwrap_or_else(|| panic!("status"));
    assert_eq!(status.state, State::Dead);
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("waiting to retry") && error.contains("busy"),
        "{error}"
    );
}

#[tokio::test]
async fn a_failed_run_delivers_when_configured_to() {
    let d = Scripted::new(|_| Report::delivered());
    let config = HubConfig {
        on_run_error: OnRunError::Deliver,
        ..HubConfig::default()
    };
    let hub = hub(d.clone(), InstanceSettings::default(), config);
    let run = hub.begin_run("r");
    run.send()
        .to("d", &json!({"marker": 1}))
        .unwrap_or_else(|e| panic!("{e}"));
    let released = run.fail().await.unwrap_or_default();
    assert_eq!(released.len(), 1);
    hub.shutdown().await;
    assert_eq!(d.attempts().len(), 1);
}

#[tokio::test]
async fn sends_are_validated_and_a_finished_run_takes_no_more() {
    let d = Scripted::new(|_| Report::delivered());
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let refused = hub.sender().to("d", &json!({"marker": "x"}));
    match refused {
        Err(SendError::Invalid { error, .. }) => assert_eq!(error.field, "marker"),
        other => panic!("{other:?}"),
    }
    let run = hub.begin_run("r");
    let sender = run.send().clone();
    run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        sender.to("d", &json!({"marker": 1})),
        Err(SendError::RunFinished { .. })
    ));
    hub.shutdown().await;
    assert!(d.attempts().is_empty());
}

#[tokio::test]
async fn dead_letters_replay_with_their_ids_and_a_fresh_budget() {
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = fail.clone();
    let d = Scripted::new(move |_| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            Report::failed("410 Gone")
        } else {
            Report::delivered()
        }
    });
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let id = send(&hub, 1);
    // Wait for the dead letter through the status, yielding to the runtime between looks.
    while hub.status(id).map(|s| s.state) != Some(State::Dead) {
        tokio::task::yield_now().await;
    }
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(hub.replay_dead_letters(None).unwrap_or_default(), vec![id]);
    assert!(hub.dead_letters(10).is_empty());
    hub.shutdown().await;
    let status = hub.status(id).unwrap_or_else(|| panic!("status"));
    assert_eq!((status.state, status.attempts), (State::Delivered, 1));
}

#[tokio::test]
async fn instances_of_a_type_are_found_by_downcasting() {
    let d = Scripted::new(|_| Report::delivered());
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let found = hub.instances_of::<Scripted>();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, "d");
    assert!(Arc::ptr_eq(&found[0].1, &d));
    assert!(hub.instances_of::<Hanging>().is_empty());
    hub.shutdown().await;
}

/// A destination whose own limit is one batch at a time: deliveries never overlap, whatever
/// the instance's concurrency says.
struct OneAtATime {
    active: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

/// A second destination type, to show `instances_of` tells types apart.
struct Hanging;

#[async_trait]
impl Destination for Hanging {
    fn kind(&self) -> &'static str {
        "hanging"
    }
    fn validate(&self, _: &[u8]) -> Result<(), InvalidPayload> {
        Ok(())
    }
    async fn deliver(&self, _: &Batch) -> BatchOutcome {
        std::future::pending().await
    }
}

#[async_trait]
impl Destination for OneAtATime {
    fn kind(&self) -> &'static str {
        "one-at-a-time"
    }
    fn validate(&self, _: &[u8]) -> Result<(), InvalidPayload> {
        Ok(())
    }
    fn max_concurrency(&self) -> Option<usize> {
        Some(1)
    }
    async fn deliver(&self, _: &Batch) -> BatchOutcome {
        use std::sync::atomic::Ordering;
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        BatchOutcome::All(Report::delivered())
    }
}

#[tokio::test(start_paused = true)]
async fn a_destinations_own_concurrency_limit_wins() {
    let d = Arc::new(OneAtATime {
        active: Default::default(),
        most: Default::default(),
    });
    let hub = Hub::builder()
        .destination(
            "d",
            d.clone(),
            InstanceSettings {
                concurrency: Some(64),
                ..InstanceSettings::default()
            },
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    for marker in 0..20 {
        hub.sender()
            .to("d", &json!({ "marker": marker }))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    hub.shutdown_within(Duration::from_secs(60)).await;
    assert_eq!(d.most.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_destination_that_panics_is_retried_and_shutdown_still_ends() {
    let d = Scripted::new(|attempt| {
        assert!(attempt > 1, "the first attempt panics");
        Report::delivered()
    });
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let id = send(&hub, 1);
    let report = hub.shutdown_within(Duration::from_secs(3600)).await;
    assert_eq!(report.abandoned, 0);
    let status = hub.status(id).unwrap_or_else(|| panic!("status"));
    assert_eq!((status.state, status.attempts), (State::Delivered, 2));
    assert!(
        status.last_error.unwrap_or_default().contains("panicked"),
        "the panic is the recorded error"
    );
}

/// Forwards every send it delivers to instance `d` as an internal send, as the emit destination
/// fans out.
struct Forwarder {
    hub: std::sync::OnceLock<destinations_core::WeakHub>,
}

#[async_trait]
impl Destination for Forwarder {
    fn kind(&self) -> &'static str {
        "forwarder"
    }
    fn validate(&self, _: &[u8]) -> Result<(), InvalidPayload> {
        Ok(())
    }
    fn attach(&self, hub: &Hub) {
        let _ = self.hub.set(hub.downgrade());
    }
    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let Some(hub) = self.hub.get().and_then(|h| h.upgrade()) else {
            return BatchOutcome::All(Report::retry("no hub"));
        };
        for envelope in batch.envelopes() {
            if let Err(e) = hub.internal_sender().json("d", envelope.payload.clone()) {
                return BatchOutcome::All(Report::failed(e.to_string()));
            }
        }
        BatchOutcome::All(Report::delivered())
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_takes_the_sends_deliveries_make_and_flushes_aged_batches() {
    let d = Scripted::batching(100, Duration::from_secs(3600), |_| Report::delivered());
    let hub = Hub::builder()
        .destination("d", d.clone(), InstanceSettings::default())
        .destination(
            "forward",
            Arc::new(Forwarder {
                hub: std::sync::OnceLock::new(),
            }),
            InstanceSettings::default(),
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    for marker in 0..5 {
        hub.sender()
            .to("forward", &json!({ "marker": marker }))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Outside a delivery, the hub takes nothing once shutdown began.
    let report = hub.shutdown_within(Duration::from_secs(60)).await;
    assert_eq!(report.abandoned, 0);
    assert!(matches!(
        hub.sender().to("d", &json!({"marker": 9})),
        Err(SendError::ShuttingDown)
    ));
    let mut delivered: Vec<u64> = d.attempts().into_iter().flat_map(|a| a.1).collect();
    delivered.sort_unstable();
    assert_eq!(
        delivered,
        vec![0, 1, 2, 3, 4],
        "the forwarded sends were taken while draining, and their hour-long batch went out at once"
    );
    assert!(hub.dead_letters(10).is_empty());
}

#[tokio::test]
async fn a_replay_the_queue_refuses_leaves_the_dead_letters_as_they_were() {
    let dead = Scripted::new(|_| Report::failed("404"));
    let stuck = Scripted::hanging();
    let hub = Hub::builder()
        .config(HubConfig {
            queue: QueueCapacity {
                max_events: 1,
                max_bytes: 1 << 20,
            },
            ..HubConfig::default()
        })
        .destination("dead", dead, InstanceSettings::default())
        .destination("stuck", stuck, InstanceSettings::default())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let id = hub
        .sender()
        .to("dead", &json!({"marker": 1}))
        .unwrap_or_else(|e| panic!("{e}"));
    let status = hub.wait_final(id, Duration::from_secs(30)).await;
    assert_eq!(status.map(|s| s.state), Some(State::Dead));
    // The only slot is taken by a send that never finishes.
    hub.sender()
        .to("stuck", &json!({"marker": 2}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        hub.replay_dead_letters(None),
        Err(SendError::QueueFull(_))
    ));
    let status = hub
        .status(id)
        .unwrap_or_else(|| panic!("the status is kept"));
    assert_eq!(status.state, State::Dead);
    assert_eq!(status.last_error.as_deref(), Some("404"));
    assert_eq!(hub.dead_letters(10).len(), 1, "still a dead letter");
    hub.shutdown_within(Duration::ZERO).await;
}
