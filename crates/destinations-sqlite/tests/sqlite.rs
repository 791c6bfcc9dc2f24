//! The SQLite queue's promises, on real files: what is accepted survives a restart (retries
//! with their attempt counts and due times, statuses, dead letters), delivered payloads go,
//! retention holds, memory stays bounded, and a file the queue must not touch is refused with
//! its name. (`kill -9` of a real server is in the server's tests.)

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{AttemptOutcome, DeadLetterFilter, EventFilter, HubConfig, Queue};
use destinations_sqlite::{OpenError, SqliteOptions, SqliteQueue};
use destinations_testkit::TempDir;
use serde_json::json;
use tokio::sync::Semaphore;

/// Answers every attempt with `answer` once the gate lets it (an open gate by default), and
/// records the markers it saw, in order.
struct Recorder {
    answer: Box<dyn Fn(u32) -> Report + Send + Sync>,
    seen: Mutex<Vec<u64>>,
    gate: Arc<Semaphore>,
}

impl Recorder {
    fn new(answer: impl Fn(u32) -> Report + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            answer: Box::new(answer),
            seen: Mutex::new(Vec::new()),
            gate: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
        })
    }

    fn closed() -> Arc<Self> {
        let recorder = Self::new(|_| Report::delivered());
        recorder.gate.forget_permits(Semaphore::MAX_PERMITS);
        recorder
    }

    fn seen(&self) -> Vec<u64> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[async_trait]
impl Destination for Recorder {
    fn kind(&self) -> &'static str {
        "recorder"
    }
    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        let _: serde_json::Value = destinations_core::parse_strict(payload)?;
        Ok(())
    }
    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        if let Ok(permit) = self.gate.acquire().await {
            permit.forget();
        }
        let attempt = batch.envelopes()[0].attempts;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for envelope in batch.envelopes() {
            let value: serde_json::Value =
                serde_json::from_slice(&envelope.payload).unwrap_or_default();
            seen.push(value["marker"].as_u64().unwrap_or(u64::MAX));
        }
        BatchOutcome::All((self.answer)(attempt))
    }
}

fn open(dir: &TempDir) -> Result<SqliteQueue, OpenError> {
    open_with(&SqliteOptions::at(dir.path().join("queue.db")))
}

fn open_with(options: &SqliteOptions) -> Result<SqliteQueue, OpenError> {
    let config = HubConfig::default();
    SqliteQueue::open(
        options,
        config.status_retention(),
        config.dead_letter_capacity,
    )
}

fn hub_on(queue: SqliteQueue, destination: Arc<Recorder>, config: HubConfig) -> Hub {
    Hub::builder()
        .config(config)
        .queue(Arc::new(queue))
        .destination("d", destination, InstanceSettings::default())
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn send_run(hub: &Hub, markers: std::ops::Range<u64>) -> Vec<EventId> {
    let run = hub.begin_run("r");
    for marker in markers {
        run.send()
            .to("d", &json!({ "marker": marker }))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    run.finish().await.unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn what_was_accepted_is_there_after_a_restart_and_delivered_then() {
    let dir = TempDir::new("sqlite");
    let closed = Recorder::closed();
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        closed.clone(),
        HubConfig::default(),
    );
    let ids = send_run(&hub, 0..100).await;
    let report = hub.shutdown_within(Duration::from_millis(100)).await;
    assert_eq!(
        (report.abandoned, report.kept),
        (0, 100),
        "kept, not dead-lettered"
    );
    assert!(closed.seen().is_empty());
    drop(hub);

    let open_gate = Recorder::new(|_| Report::delivered());
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        open_gate.clone(),
        HubConfig::default(),
    );
    assert_eq!(
        hub.queue_depth().events,
        100,
        "the backlog counts against the room"
    );
    for id in &ids {
        let status = destinations_testkit::final_status(&hub, *id, Duration::from_secs(30)).await;
        assert_eq!(status.map(|s| s.state), Some(State::Delivered));
    }
    assert_eq!(
        open_gate.seen(),
        (0..100).collect::<Vec<_>>(),
        "each once, in order"
    );
    let report = hub.shutdown_within(Duration::from_secs(10)).await;
    assert_eq!((report.abandoned, report.kept), (0, 0));
}

#[tokio::test]
async fn a_retry_keeps_its_attempt_count_and_due_time_across_a_restart() {
    let dir = TempDir::new("sqlite");
    let busy = Recorder::new(|_| Report::retry_after("503 busy", Some(Duration::from_secs(2))));
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        busy.clone(),
        HubConfig::default(),
    );
    let ids = send_run(&hub, 0..3).await;
    let mut before = Vec::new();
    for id in &ids {
        loop {
            let status = destinations_testkit::status(&hub, *id).await;
            if status.state == State::Retrying {
                before.push(status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    hub.shutdown_within(Duration::ZERO).await;
    drop(hub);

    let ok = Recorder::new(|_| Report::delivered());
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        ok.clone(),
        HubConfig::default(),
    );
    for (id, before) in ids.iter().zip(&before) {
        let after = destinations_testkit::status(&hub, *id).await;
        assert_eq!(after.state, State::Retrying);
        assert_eq!(after.attempts, 1, "the attempt count survived");
        assert_eq!(
            after.next_attempt_at, before.next_attempt_at,
            "and the due time"
        );
        assert_eq!(after.last_error.as_deref(), Some("503 busy"));
    }
    let started = std::time::SystemTime::now();
    for id in &ids {
        let status = destinations_testkit::final_status(&hub, *id, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("status"));
        assert_eq!((status.state, status.attempts), (State::Delivered, 2));
        let due = before[0].next_attempt_at.unwrap_or(started);
        assert!(
            status.updated_at + Duration::from_millis(5) >= due,
            "not retried before it was due"
        );
    }
    assert_eq!(ok.seen(), vec![0, 1, 2], "retried as the same batch, once");
    hub.shutdown().await;
}

#[tokio::test]
async fn dead_letters_and_statuses_survive_a_restart_and_replay_delivers_them() {
    let dir = TempDir::new("sqlite");
    let gone = Recorder::new(|_| Report::failed("410 Gone"));
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        gone,
        HubConfig::default(),
    );
    let ids = send_run(&hub, 0..5).await;
    for id in &ids {
        let status = destinations_testkit::final_status(&hub, *id, Duration::from_secs(30)).await;
        assert_eq!(status.map(|s| s.state), Some(State::Dead));
    }
    hub.shutdown().await;
    drop(hub);

    let ok = Recorder::new(|_| Report::delivered());
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        ok.clone(),
        HubConfig::default(),
    );
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(letters.len(), 5);
    assert!(
        letters
            .iter()
            .all(|l| l.reason == "410 Gone" && l.envelope.attempts == 1)
    );
    let outcomes = |status: destinations_core::SendStatus| -> Vec<(u32, AttemptOutcome)> {
        let log = status.attempts_log.unwrap_or_default();
        log.iter().map(|a| (a.number, a.outcome)).collect()
    };
    for id in &ids {
        let status = destinations_testkit::status(&hub, *id).await;
        assert_eq!(
            outcomes(status),
            [(1, AttemptOutcome::Failed)],
            "the failed attempt is in the file"
        );
    }
    let dead_ones = EventFilter {
        state: Some(State::Dead),
        ..EventFilter::default()
    };
    let listed = |filter: EventFilter| {
        let hub = &hub;
        async move {
            let page = hub.events(&filter, None, 100).await;
            page.unwrap_or_else(|e| panic!("{e}")).events.len()
        }
    };
    assert_eq!(listed(dead_ones.clone()).await, 5);
    let page = hub
        .dead_letter_page(&DeadLetterFilter::default(), None, 2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(page.letters.len(), 2);
    let rest = hub
        .dead_letter_page(&DeadLetterFilter::default(), page.next.as_deref(), 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rest.letters.len(), 3, "the cursor pages through the rest");
    assert!(rest.next.is_none());
    let replayed = hub
        .replay_dead_letters(&DeadLetterFilter::default(), 1000)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(replayed.len(), 5);
    for id in &ids {
        let status = destinations_testkit::final_status(&hub, *id, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("status"));
        assert_eq!((status.state, status.attempts), (State::Delivered, 1));
        let status = destinations_testkit::status(&hub, *id).await;
        assert_eq!(
            outcomes(status),
            [(1, AttemptOutcome::Failed), (1, AttemptOutcome::Delivered)],
            "a replayed send keeps the attempts before its replay"
        );
    }
    assert_eq!(listed(dead_ones).await, 0, "replayed: no longer dead");
    let delivered = EventFilter {
        state: Some(State::Delivered),
        ..EventFilter::default()
    };
    assert_eq!(listed(delivered).await, 5);
    let mut seen = ok.seen();
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    assert!(destinations_testkit::dead_letters(&hub).await.is_empty());
    hub.shutdown().await;
}

#[tokio::test]
async fn delivered_payloads_leave_the_file_and_statuses_keep_to_the_retention() {
    let dir = TempDir::new("sqlite");
    let path = dir.path().join("queue.db");
    let config = HubConfig {
        status_retention: 10,
        ..HubConfig::default()
    };
    let queue = SqliteQueue::open(&SqliteOptions::at(&path), config.status_retention(), 100)
        .unwrap_or_else(|e| panic!("{e}"));
    let ok = Recorder::new(|_| Report::delivered());
    let hub = hub_on(queue, ok, config);
    let ids = send_run(&hub, 0..300).await;
    for id in &ids {
        destinations_testkit::final_status(&hub, *id, Duration::from_secs(30)).await;
    }
    // One more commit after the last delivery lets the writer prune.
    let last = send_run(&hub, 300..301).await;
    destinations_testkit::final_status(&hub, last[0], Duration::from_secs(30)).await;
    hub.shutdown().await;
    drop(hub);
    let report = destinations_sqlite::check(&path).unwrap_or_else(|e| panic!("{e}"));
    let delivered = report
        .sends
        .get("d")
        .and_then(|s| s.get("delivered"))
        .copied()
        .unwrap_or(0);
    assert!(delivered <= 10 + 64, "{delivered} delivered statuses kept");
    assert_eq!(report.pending_bytes.get("d").copied().unwrap_or(0), 0);
    assert!(
        destinations_testkit::state(
            &hub_on(
                open_with(&SqliteOptions::at(&path)).unwrap_or_else(|e| panic!("{e}")),
                Recorder::closed(),
                HubConfig::default()
            ),
            ids[0]
        )
        .await
        .is_none(),
        "the oldest status is forgotten"
    );
}

#[tokio::test]
async fn a_backlog_larger_than_memory_waits_on_disk_and_keeps_its_order() {
    let dir = TempDir::new("sqlite");
    let mut options = SqliteOptions::at(dir.path().join("queue.db"));
    options.memory_bytes = 4096;
    let gated = Recorder::closed();
    let hub = hub_on(
        open_with(&options).unwrap_or_else(|e| panic!("{e}")),
        gated.clone(),
        HubConfig::default(),
    );
    let mut ids = Vec::new();
    for first in (0..2000).step_by(100) {
        ids.extend(send_run(&hub, first..first + 100).await);
    }
    gated.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    for id in &ids {
        let status = destinations_testkit::final_status(&hub, *id, Duration::from_secs(60)).await;
        assert_eq!(status.map(|s| s.state), Some(State::Delivered));
    }
    let report = hub.shutdown_within(Duration::from_secs(60)).await;
    assert_eq!(report.kept, 0);
    let seen = gated.seen();
    assert_eq!(seen.len(), 2000);
    let mut sorted = seen;
    sorted.sort_unstable();
    assert_eq!(sorted, (0..2000).collect::<Vec<_>>(), "every send, once");
}

fn refused(result: Result<SqliteQueue, OpenError>) -> String {
    match result {
        Ok(_) => panic!("the queue opened"),
        Err(error) => error.to_string(),
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_queue_is_refused_naming_it_and_left_as_it_was() {
    let dir = TempDir::new("sqlite");
    let path = dir.path().join("queue.db");
    let noise: Vec<u8> = (0..64 * 1024).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&path, &noise).unwrap_or_else(|e| panic!("{e}"));
    let message = refused(open(&dir));
    assert!(
        message.contains(&path.display().to_string()) && message.contains("not an SQLite database"),
        "{message}"
    );
    assert!(std::fs::read(&path).ok() == Some(noise), "nothing changed");

    // Another program's SQLite database.
    let foreign = dir.path().join("foreign.db");
    {
        let conn = rusqlite::Connection::open(&foreign).unwrap_or_else(|e| panic!("{e}"));
        conn.execute_batch(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY); INSERT INTO orders VALUES (1);",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let before = std::fs::read(&foreign).unwrap_or_default();
    let message = refused(open_with(&SqliteOptions::at(&foreign)));
    assert!(
        message.contains("another program") && message.contains("orders"),
        "{message}"
    );
    assert!(
        std::fs::read(&foreign).unwrap_or_default() == before,
        "nothing changed"
    );
}

#[tokio::test]
async fn a_truncated_file_is_refused_and_its_sends_can_still_be_exported() {
    let dir = TempDir::new("sqlite");
    let path = dir.path().join("queue.db");
    let closed = Recorder::closed();
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        closed,
        HubConfig::default(),
    );
    let payload = "x".repeat(2000);
    // Forty runs: forty chunks, of which the damage takes some and leaves the others.
    for first in (0..400u64).step_by(10) {
        let run = hub.begin_run("big");
        for marker in first..first + 10 {
            run.send()
                .to("d", &json!({ "marker": marker, "pad": payload }))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    }
    hub.shutdown_within(Duration::ZERO).await;
    drop(hub);
    let full = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(full > 400 * 2000, "checkpointed into the file: {full}");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{e}"));
    file.set_len(full / 2).unwrap_or_else(|e| panic!("{e}"));
    drop(file);
    let message = refused(open(&dir));
    assert!(
        message.contains(&path.display().to_string())
            && (message.contains("damaged") || message.contains("malformed"))
            && message.contains("queue export"),
        "{message}"
    );
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.len()).ok(),
        Some(full / 2),
        "left as it was"
    );
    let mut out = Vec::new();
    let summary =
        destinations_sqlite::export(&path, false, &mut out).unwrap_or_else(|e| panic!("{e}"));
    let exported = summary.exported;
    assert!(exported > 0, "what can be read comes out: {summary:?}");
    let first: serde_json::Value =
        serde_json::from_slice(out.split(|b| *b == b'\n').next().unwrap_or_default())
            .unwrap_or_default();
    assert_eq!(first["destination"], "d");
    assert_eq!(first["payload"]["marker"], 0);
}

#[tokio::test]
async fn a_newer_schema_and_a_second_process_are_refused() {
    let dir = TempDir::new("sqlite");
    let queue = open(&dir).unwrap_or_else(|e| panic!("{e}"));
    let message = refused(open(&dir));
    assert!(message.contains("another process uses it"), "{message}");
    queue.close().await;
    drop(queue);
    // user_version lives at offset 60 of the header.
    let path = dir.path().join("queue.db");
    let mut bytes = std::fs::read(&path).unwrap_or_default();
    bytes[60..64].copy_from_slice(&99u32.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let message = refused(open(&dir));
    assert!(
        message.contains("newer version of destinations (schema 99"),
        "{message}"
    );
}

#[tokio::test]
async fn a_file_of_the_first_schema_is_upgraded_keeping_its_sends() {
    let dir = TempDir::new("sqlite");
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        Recorder::closed(),
        HubConfig::default(),
    );
    let ids = send_run(&hub, 0..3).await;
    let report = hub.shutdown_within(Duration::from_millis(100)).await;
    assert_eq!(report.kept, 3);
    drop(hub);
    // Make it a file of schema 1: no attempt log.
    let path = dir.path().join("queue.db");
    let conn = rusqlite::Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
    conn.execute_batch("DROP TABLE attempts; PRAGMA user_version = 1;")
        .unwrap_or_else(|e| panic!("{e}"));
    drop(conn);

    let flaky = Recorder::new(|attempt| {
        if attempt == 1 {
            Report::retry("503 Service Unavailable")
        } else {
            Report::delivered()
        }
    });
    let mut settings = InstanceSettings::default();
    settings.retry.initial_delay = Duration::from_millis(10);
    let hub = Hub::builder()
        .queue(Arc::new(open(&dir).unwrap_or_else(|e| panic!("{e}"))))
        .destination("d", flaky, settings)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    for id in &ids {
        let status = destinations_testkit::final_status(&hub, *id, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("status"));
        assert_eq!(status.state, State::Delivered);
        let log = destinations_testkit::status(&hub, *id).await.attempts_log;
        let outcomes: Vec<_> = log.unwrap_or_default().iter().map(|a| a.outcome).collect();
        assert_eq!(outcomes, [AttemptOutcome::Retry, AttemptOutcome::Delivered]);
    }
    hub.shutdown().await;
    let conn = rusqlite::Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let version: i32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap_or_default();
    assert_eq!(version, 2, "upgraded in place");
}

#[tokio::test]
async fn a_listing_pages_through_thousands_of_sends_newest_first() {
    let dir = TempDir::new("sqlite");
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        Recorder::closed(),
        HubConfig::default(),
    );
    // Runs of different sizes: chunks of many sizes, each its own row.
    let mut ids = Vec::new();
    for size in [1, 700, 3, 900, 396] {
        let start = ids.len() as u64;
        ids.extend(send_run(&hub, start..start + size).await);
    }
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = hub
            .events(&EventFilter::default(), after.as_deref(), 150)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(page.events.iter().all(|s| s.attempts_log.is_none()));
        listed.extend(page.events.iter().map(|s| s.id));
        pages += 1;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    ids.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(listed.len(), 2000);
    assert!(listed == ids, "every send once, newest first");
    assert_eq!(pages, 14);
    let since_middle = EventFilter {
        since: Some(ids[999].time()),
        state: Some(State::Queued),
        ..EventFilter::default()
    };
    let page = hub
        .events(&since_middle, None, 1000)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        page.events.iter().all(|s| s.created_at >= ids[999].time()),
        "only sends made since"
    );
    assert!(page.events.len() >= 1000, "{}", page.events.len());
    let report = hub.shutdown_within(Duration::from_millis(100)).await;
    assert_eq!(report.kept, 2000);
}

#[tokio::test]
async fn a_replay_by_ids_replays_those_letters_only() {
    let dir = TempDir::new("sqlite");
    let gone = Recorder::new(|attempt| {
        if attempt == 1 {
            Report::failed("410 Gone")
        } else {
            Report::delivered()
        }
    });
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        gone,
        HubConfig::default(),
    );
    let ids = send_run(&hub, 0..3).await;
    for id in &ids {
        let status = destinations_testkit::final_status(&hub, *id, Duration::from_secs(30)).await;
        assert_eq!(status.map(|s| s.state), Some(State::Dead));
    }
    // The statuses say dead a moment before the letters are committed.
    assert!(hub.drained(Duration::from_secs(30)).await);
    assert_eq!(destinations_testkit::dead_letters(&hub).await.len(), 3);
    let chosen = DeadLetterFilter {
        ids: Some(vec![ids[0], ids[1]]),
        ..DeadLetterFilter::default()
    };
    let listed = hub
        .dead_letter_page(&chosen, None, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut listed: Vec<EventId> = listed.letters.iter().map(|l| l.envelope.id).collect();
    listed.sort();
    let mut asked = ids[..2].to_vec();
    asked.sort();
    assert_eq!(listed, asked, "the letters asked for, and only those");
    let mut replayed = hub
        .replay_dead_letters(&chosen, 2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    replayed.sort();
    assert_eq!(replayed, asked);
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(
        letters.iter().map(|l| l.envelope.id).collect::<Vec<_>>(),
        [ids[2]],
        "the one not asked for stays dead"
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn a_listing_finds_the_sends_in_flight() {
    let dir = TempDir::new("sqlite");
    // Every attempt waits at the gate: the sends stay in flight.
    let stuck = Recorder::closed();
    let hub = hub_on(
        open(&dir).unwrap_or_else(|e| panic!("{e}")),
        stuck,
        HubConfig::default(),
    );
    let ids = send_run(&hub, 0..3).await;
    let in_flight = EventFilter {
        state: Some(State::InFlight),
        ..EventFilter::default()
    };
    let started = std::time::Instant::now();
    loop {
        let page = hub
            .events(&in_flight, None, 10)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut found: Vec<EventId> = page.events.iter().map(|s| s.id).collect();
        found.sort();
        let mut expected = ids.clone();
        expected.sort();
        if found == expected {
            assert!(page.events.iter().all(|s| s.state == State::InFlight));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the sends in flight were not listed: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queued = EventFilter {
        state: Some(State::Queued),
        ..EventFilter::default()
    };
    let page = hub.events(&queued, None, 10).await;
    assert!(
        page.unwrap_or_else(|e| panic!("{e}")).events.is_empty(),
        "in flight, not queued"
    );
    let _ = hub.shutdown_within(Duration::from_millis(100)).await;
}
