//! The hub's own promises — retry timing, batching, bounds, runs, shutdown, dead letters —
//! driven by a scripted in-process destination on a paused clock. (Destinations are tested
//! against real servers in their own crates; here the subject is the engine.)

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{
    CapacityFull, DeadLetterFilter, HubConfig, InstanceShare, OnRunError, QueueBounds, QueueConfig,
    QueueError, SendStatus,
};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Records each delivery attempt (when, which markers) and answers as its script says.
struct Scripted {
    policy: BatchPolicy,
    answer: Box<dyn Fn(u32) -> Report + Send + Sync>,
    attempts: Mutex<Vec<(Instant, Vec<u64>, u32)>>,
    hang: bool,
    /// Each delivery takes a permit first (none at the start: deliveries wait until the test
    /// adds some).
    gate: Option<Arc<Semaphore>>,
}

impl Scripted {
    fn new(answer: impl Fn(u32) -> Report + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            policy: BatchPolicy::one_per_send(),
            answer: Box::new(answer),
            attempts: Mutex::new(Vec::new()),
            hang: false,
            gate: None,
        })
    }

    /// Delivers once the test opens the gate, one delivery per permit added.
    fn gated() -> (Arc<Self>, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let d = Arc::new(Self {
            policy: BatchPolicy::one_per_send(),
            answer: Box::new(|_| Report::delivered()),
            attempts: Mutex::new(Vec::new()),
            hang: false,
            gate: Some(gate.clone()),
        });
        (d, gate)
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
            gate: None,
        })
    }

    /// Never answers.
    fn hanging() -> Arc<Self> {
        Arc::new(Self {
            policy: BatchPolicy::one_per_send(),
            answer: Box::new(|_| Report::delivered()),
            attempts: Mutex::new(Vec::new()),
            hang: true,
            gate: None,
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
        if let Some(gate) = &self.gate
            && let Ok(permit) = gate.acquire().await
        {
            permit.forget();
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

async fn status(hub: &Hub, id: EventId) -> SendStatus {
    hub.status(id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("send {id} has no status"))
}

async fn final_status(hub: &Hub, id: EventId) -> SendStatus {
    hub.wait_final(id, Duration::from_secs(3600))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("send {id} has no status"))
}

async fn dead_letters(hub: &Hub) -> Vec<destinations_core::DeadLetter> {
    hub.dead_letters(usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Hub settings with these queue bounds, no waiting for room.
fn bounded(max_events: usize) -> HubConfig {
    HubConfig {
        queue: QueueConfig {
            bounds: QueueBounds {
                max_events,
                max_bytes: 1 << 20,
            },
            wait: Duration::ZERO,
            ..QueueConfig::default()
        },
        ..HubConfig::default()
    }
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
    let status = status(&hub, id).await;
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
    assert_eq!(status(&hub, id).await.state, State::Delivered);
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
    let status = status(&hub, id).await;
    assert_eq!(status.state, State::Dead);
    let letters = dead_letters(&hub).await;
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

/// Send `marker` in batch group `group`.
fn send_grouped(hub: &Hub, marker: u64, group: &str) {
    hub.sender()
        .to("d", &json!({ "marker": marker, "group": group }))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_leaves_its_deadline_behind_not_its_groups_next_batch() {
    let d = Scripted::batching(2, Duration::from_secs(60), |_| Report::delivered());
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let start = Instant::now();
    let grouped = |marker: u64, group: &str| send_grouped(&hub, marker, group);
    // Group `a` fills at once (its deadline, at 60 s, stays behind); its next batch opens
    // at 30 s and is due at 90 s, not at the old 60 s.
    grouped(0, "a");
    grouped(1, "a");
    // Thousands of other groups open meanwhile, each due on its own.
    for n in 0..5_000 {
        grouped(1_000 + n, &format!("g{n}"));
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    grouped(2, "a");
    tokio::time::sleep(Duration::from_secs(31)).await;
    let attempts = d.attempts();
    let of_a: Vec<(Vec<u64>, Duration)> = attempts
        .iter()
        .filter(|a| a.1.iter().any(|m| *m < 1_000))
        .map(|a| (a.1.clone(), a.0 - start))
        .collect();
    assert_eq!(
        of_a.len(),
        1,
        "only the full batch of `a` went by 61 s: {of_a:?}"
    );
    assert_eq!(
        attempts.len(),
        5_001,
        "every other group went at its own 60 s"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    let last = d
        .attempts()
        .last()
        .cloned()
        .unwrap_or_else(|| panic!("no attempt"));
    assert_eq!(last.1, vec![2]);
    assert!(
        last.0 - start >= Duration::from_secs(90),
        "{:?}",
        last.0 - start
    );
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn each_group_fills_and_ages_on_its_own() {
    let d = Scripted::batching(3, Duration::from_secs(60), |_| Report::delivered());
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let start = Instant::now();
    let grouped = |marker: u64, group: &str| send_grouped(&hub, marker, group);
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
    // Hang deliveries so nothing leaves the queue while we fill it.
    let hanging = Scripted::hanging();
    let hub = hub(hanging.clone(), InstanceSettings::default(), bounded(3));
    // One pending already: a run of three no longer fits.
    send(&hub, 100);
    let run = hub.begin_run("big");
    let ids: Vec<EventId> = (0..3)
        .map(|m| {
            run.send()
                .to("d", &json!({ "marker": m }))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let refused = run
        .finish()
        .await
        .err()
        .unwrap_or_else(|| panic!("refused"));
    match &refused.error {
        SendError::Queue(QueueError::Full(CapacityFull {
            pending: 1,
            limit: 3,
            asked: 3,
            ..
        })) => {}
        other => panic!("expected queue full, got {other:?}"),
    }
    for id in &ids {
        assert!(
            hub.status(*id).await.ok().flatten().is_none(),
            "nothing of the run was kept"
        );
    }
    assert_eq!(hub.queue_depth().events, 1);
    assert_eq!(refused.into_run().held(), 3, "the run comes back whole");
    for m in 0..2 {
        send(&hub, m);
    }
    let refused = hub.sender().to("d", &json!({"marker": 9}));
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("queue is full for `d`") && message.contains("queue.max_events"),
        "{message}"
    );
    // Everything accepted is accounted for at shutdown: dead-lettered with the reason.
    let report = hub.shutdown_within(Duration::from_millis(50)).await;
    assert_eq!(report.abandoned, 3);
    let letters = dead_letters(&hub).await;
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
async fn a_refused_finish_gives_the_run_back_to_finish_again() {
    let (d, gate) = Scripted::gated();
    let hub = hub(d.clone(), InstanceSettings::default(), bounded(2));
    let first = hub.begin_run("first");
    for m in 0..2 {
        first
            .send()
            .to("d", &json!({ "marker": m }))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    first.finish().await.unwrap_or_else(|e| panic!("{e}"));
    let second = hub.begin_run("second");
    let ids: Vec<EventId> = (2..4)
        .map(|m| {
            second
                .send()
                .to("d", &json!({ "marker": m }))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let refused = second
        .finish()
        .await
        .err()
        .unwrap_or_else(|| panic!("the queue is full"));
    assert!(
        matches!(refused.error, SendError::Queue(QueueError::Full(_))),
        "{refused}"
    );
    let second = refused.into_run();
    gate.add_permits(2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        second.finish().await.unwrap_or_else(|e| panic!("{e}")),
        ids,
        "the same sends"
    );
    gate.add_permits(2);
    hub.shutdown_within(Duration::from_secs(60)).await;
    let mut markers: Vec<u64> = d.attempts().into_iter().flat_map(|a| a.1).collect();
    markers.sort_unstable();
    assert_eq!(markers, [0, 1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_full_instance_makes_a_run_wait_for_room_instead_of_refusing() {
    let (d, gate) = Scripted::gated();
    let mut config = bounded(1);
    config.queue.wait = Duration::from_secs(5);
    let hub = hub(d.clone(), InstanceSettings::default(), config);
    send(&hub, 0);
    let waiting = tokio::spawn({
        let hub = hub.clone();
        async move {
            let run = hub.begin_run("r");
            run.send()
                .to("d", &json!({"marker": 1}))
                .unwrap_or_else(|e| panic!("{e}"));
            run.finish().await.map_err(|e| e.error)
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!waiting.is_finished(), "waits while the instance is full");
    gate.add_permits(1);
    let released = waiting.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        released.map(|ids| ids.len()).ok(),
        Some(1),
        "taken once the first was delivered"
    );
    // And refused at the bound when no room comes.
    let started = Instant::now();
    let run = hub.begin_run("late");
    run.send()
        .to("d", &json!({"marker": 2}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(run.finish().await.is_err());
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    gate.add_permits(10);
    hub.shutdown_within(Duration::from_secs(60)).await;
}

#[tokio::test]
async fn one_stuck_instance_does_not_make_another_refuse() {
    let stuck = Scripted::hanging();
    let ok = Scripted::new(|_| Report::delivered());
    let hub = Hub::builder()
        .config(bounded(10))
        .destination("stuck", stuck, InstanceSettings::default())
        .destination("ok", ok.clone(), InstanceSettings::default())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    // The stuck instance takes what it may: its reserved share and the shared overflow.
    let mut taken = 0;
    while hub.sender().to("stuck", &json!({"marker": taken})).is_ok() {
        taken += 1;
    }
    assert_eq!(
        taken, 8,
        "10 in all: its 2 reserved and the 6 shared, not the other's 2"
    );
    let full = hub
        .sender()
        .to("stuck", &json!({"marker": 99}))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        full.contains("`stuck` is past its reserved share"),
        "{full}"
    );
    let id = hub
        .sender()
        .to("ok", &json!({"marker": 1}))
        .unwrap_or_else(|e| panic!("the other instance still takes sends: {e}"));
    assert_eq!(final_status(&hub, id).await.state, State::Delivered);
    hub.shutdown_within(Duration::ZERO).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_dead_letters_a_retry_that_is_not_due_before_the_deadline() {
    let d = Scripted::new(|_| Report::retry_after("busy", Some(Duration::from_secs(300))));
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    let id = send(&hub, 1);
    let report = hub.shutdown_within(Duration::from_secs(10)).await;
    assert_eq!(report.abandoned, 1);
    let status = status(&hub, id).await;
    assert_eq!(status.state, State::Dead);
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("waited to retry") && error.contains("busy"),
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
async fn dead_letters_replay_with_their_ids_their_time_and_a_fresh_budget() {
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
    let dead = final_status(&hub, id).await;
    assert_eq!(dead.state, State::Dead);
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let replayed = hub
        .replay_dead_letters(&DeadLetterFilter::default(), 1000)
        .await
        .unwrap_or_default();
    assert_eq!(replayed, vec![id]);
    assert!(dead_letters(&hub).await.is_empty());
    hub.shutdown().await;
    let status = status(&hub, id).await;
    assert_eq!((status.state, status.attempts), (State::Delivered, 1));
    assert_eq!(
        status.created_at, dead.created_at,
        "a replay keeps when it was sent"
    );
}

#[tokio::test]
async fn replay_selects_by_destination_and_a_replayed_send_can_die_again() {
    let a = Scripted::new(|_| Report::failed("404"));
    let b = Scripted::new(|_| Report::failed("404"));
    let hub = Hub::builder()
        .destination("a", a.clone(), InstanceSettings::default())
        .destination("b", b, InstanceSettings::default())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let to = |name: &str| {
        hub.sender()
            .to(name, &json!({"marker": 1}))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (ia, ib) = (to("a"), to("b"));
    final_status(&hub, ia).await;
    final_status(&hub, ib).await;
    let only_a = DeadLetterFilter {
        destination: Some("a".into()),
        ..DeadLetterFilter::default()
    };
    let replayed = hub
        .replay_dead_letters(&only_a, 1000)
        .await
        .unwrap_or_default();
    assert_eq!(replayed, vec![ia], "only a's letter");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = final_status(&hub, ia).await;
    assert_eq!(
        (again.state, again.attempts),
        (State::Dead, 1),
        "dead again, counted afresh"
    );
    let letters: Vec<EventId> = dead_letters(&hub)
        .await
        .iter()
        .map(|l| l.envelope.id)
        .collect();
    assert_eq!(letters.len(), 2);
    assert!(letters.contains(&ia) && letters.contains(&ib));
    assert_eq!(a.attempts().len(), 2);
    hub.shutdown().await;
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
    let status = status(&hub, id).await;
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
    assert!(dead_letters(&hub).await.is_empty());
}

#[tokio::test]
async fn a_replay_the_queue_refuses_leaves_the_dead_letters_as_they_were() {
    let dead = Scripted::new(|_| Report::failed("404"));
    let stuck = Scripted::hanging();
    let hub = Hub::builder()
        .config(bounded(2))
        .destination(
            "dead",
            dead,
            InstanceSettings {
                queue: InstanceShare {
                    max_events: Some(1),
                    ..InstanceShare::default()
                },
                ..InstanceSettings::default()
            },
        )
        .destination("stuck", stuck, InstanceSettings::default())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let id = hub
        .sender()
        .to("dead", &json!({"marker": 1}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(final_status(&hub, id).await.state, State::Dead);
    // The shared room is taken by sends that never finish.
    while hub.sender().to("stuck", &json!({"marker": 2})).is_ok() {}
    assert!(matches!(
        hub.replay_dead_letters(&DeadLetterFilter::default(), 1000)
            .await,
        Err(SendError::Queue(QueueError::Full(_)))
    ));
    let status = status(&hub, id).await;
    assert_eq!(status.state, State::Dead);
    assert_eq!(status.last_error.as_deref(), Some("404"));
    assert_eq!(dead_letters(&hub).await.len(), 1, "still a dead letter");
    hub.shutdown_within(Duration::ZERO).await;
}

/// Panics naming the batch group of marker 1.
struct PanickyGroups(Arc<Scripted>);

#[async_trait]
impl Destination for PanickyGroups {
    fn kind(&self) -> &'static str {
        "panicky"
    }
    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        self.0.validate(payload)
    }
    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy {
            max_events: 10,
            max_bytes: usize::MAX,
            max_age: Duration::from_secs(1),
        }
    }
    fn batch_group(&self, payload: &[u8]) -> Option<String> {
        assert!(
            !payload.starts_with(br#"{"marker":1}"#),
            "no group for marker 1"
        );
        None
    }
    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        self.0.deliver(batch).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_destination_that_panics_naming_a_group_loses_nothing() {
    let d = Scripted::new(|_| Report::delivered());
    let hub = Hub::builder()
        .destination(
            "d",
            Arc::new(PanickyGroups(d.clone())),
            InstanceSettings::default(),
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<EventId> = (0..4).map(|m| send(&hub, m)).collect();
    let report = hub.shutdown_within(Duration::from_secs(60)).await;
    assert_eq!(report.abandoned, 0);
    for id in ids {
        assert_eq!(status(&hub, id).await.state, State::Delivered);
    }
    let mut markers: Vec<u64> = d.attempts().into_iter().flat_map(|a| a.1).collect();
    markers.sort_unstable();
    assert_eq!(markers, [0, 1, 2, 3]);
    assert_eq!(hub.queue_depth().events, 0);
}

#[tokio::test(start_paused = true)]
async fn extreme_retry_settings_cannot_hang_shutdown() {
    let d = Scripted::new(|_| Report::retry_after("503", Some(Duration::MAX)));
    let settings = InstanceSettings {
        retry: serde_json::from_value(json!({"max_delay": "99years", "max_age": "99years"}))
            .unwrap_or_else(|e| panic!("{e}")),
        ..InstanceSettings::default()
    };
    let hub = hub(d.clone(), settings, HubConfig::default());
    let id = send(&hub, 1);
    let report = hub.shutdown_within(Duration::from_secs(1)).await;
    assert_eq!(report.abandoned, 1, "given up at the deadline, not hung");
    assert_eq!(status(&hub, id).await.state, State::Dead);
    assert!(
        serde_json::from_value::<RetryPolicy>(json!({"max_delay": "300000000000y"})).is_err(),
        "durations past 100 years are refused at config time"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_budget_ages_on_the_monotonic_clock() {
    // The paused clock moves tokio's monotonic time only: the budget must run out on it.
    let d = Scripted::new(|_| Report::retry_after("busy", Some(Duration::from_secs(4))));
    let settings = InstanceSettings {
        retry: RetryPolicy {
            max_age: Duration::from_secs(10),
            ..RetryPolicy::default()
        },
        ..InstanceSettings::default()
    };
    let hub = hub(d.clone(), settings, HubConfig::default());
    let id = send(&hub, 1);
    let dead = final_status(&hub, id).await;
    assert_eq!(dead.state, State::Dead);
    assert_eq!(
        d.attempts().len(),
        3,
        "at 0 s, 4 s and 8 s; the next would start after 10 s"
    );
    assert!(
        dead.last_error
            .unwrap_or_default()
            .contains("more than 10s after the send")
    );
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_never_ends_is_cut_short_and_frees_its_slot() {
    // Two slots, three sends to a destination that never answers: without a bound the third
    // would never be attempted (review C9).
    let d = Scripted::hanging();
    let settings = InstanceSettings {
        concurrency: Some(2),
        attempt_timeout: Some(Duration::from_secs(10)),
        retry: RetryPolicy {
            max_attempts: 2,
            ..RetryPolicy::default()
        },
        ..InstanceSettings::default()
    };
    let hub = hub(d.clone(), settings, HubConfig::default());
    let ids: Vec<EventId> = (0..3).map(|n| send(&hub, n)).collect();
    for id in ids {
        let status = final_status(&hub, id).await;
        assert_eq!(status.state, State::Dead, "{status:?}");
        let reason = status.last_error.unwrap_or_default();
        assert!(
            reason.starts_with("gave up after 2 attempts")
                && reason.contains("did not end within attempt_timeout (10s)"),
            "{reason}"
        );
    }
    assert_eq!(d.attempts().len(), 6, "every send was attempted twice");
    hub.shutdown_within(Duration::from_secs(1)).await;
}

#[test]
fn the_hub_bounds_every_attempt_by_default() {
    assert_eq!(
        HubConfig::default().attempt_timeout,
        Duration::from_secs(300)
    );
    let settings: InstanceSettings =
        serde_json::from_value(json!({"attempt_timeout": "2s"})).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(settings.attempt_timeout, Some(Duration::from_secs(2)));
}

/// The backoff really waits: over 200 sends, the mean gap before attempt k+1 is half its
/// ceiling (full jitter is uniform on [0, ceiling]) — a backoff of zero fails this (review T2).
#[tokio::test(start_paused = true)]
async fn retries_wait_half_their_ceiling_on_average() {
    let d = Scripted::new(|attempt| {
        if attempt < 5 {
            Report::retry("503")
        } else {
            Report::delivered()
        }
    });
    let hub = hub(d.clone(), InstanceSettings::default(), HubConfig::default());
    for marker in 0..200 {
        send(&hub, marker);
    }
    hub.shutdown_within(Duration::from_secs(3600)).await;
    let attempts = d.attempts();
    for k in 1..5u32 {
        let gaps: Vec<f64> = (0..200u64)
            .map(|marker| {
                let at = |attempt: u32| {
                    attempts
                        .iter()
                        .find(|(_, markers, a)| *a == attempt && markers == &vec![marker])
                        .map(|(at, _, _)| *at)
                        .unwrap_or_else(|| panic!("send {marker} has no attempt {attempt}"))
                };
                (at(k + 1) - at(k)).as_secs_f64()
            })
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let ceiling = f64::from(1u32 << (k - 1));
        assert!(
            (0.3 * ceiling..=0.7 * ceiling).contains(&mean),
            "mean gap before attempt {} was {mean:.3} s; full jitter under a {ceiling} s ceiling averages {:.1} s",
            k + 1,
            ceiling / 2.0
        );
    }
}

/// A run cannot hold more than the whole queue could take: it would sit in memory outside
/// every bound and then be refused whole (review C6).
#[tokio::test]
async fn a_run_larger_than_the_queue_is_refused_at_the_send_that_crosses_it() {
    let d = Scripted::new(|_| Report::delivered());
    let hub = hub(d, InstanceSettings::default(), bounded(3));
    let run = hub.begin_run("big");
    for marker in 0..3 {
        run.send()
            .to("d", &json!({ "marker": marker }))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    match run.send().to("d", &json!({ "marker": 3 })) {
        Err(SendError::RunTooLarge { run, held, .. }) => {
            assert_eq!((run.as_str(), held), ("big", 3));
        }
        other => panic!("the fourth send was not refused: {other:?}"),
    }
    assert_eq!(run.finish().await.map(|ids| ids.len()).unwrap_or(0), 3);
    hub.shutdown_within(Duration::from_secs(60)).await;
}
