//! One behaviour suite that every destination runs against a real sink, on every queue: it
//! delivers, refuses a bad payload naming the field, flushes partial batches on shutdown, loses
//! nothing in a burst — counted — and, on a durable queue, delivers after a restart what an
//! interrupted hub left. What a destination supports ([`Capabilities`]) adds cases: a transient
//! failure retried and a permanent one dead-lettered, its batch policy and groups honoured, the
//! order kept, the instance's own checks, health. No case looks at a kind's name.
//!
//! A destination's tests implement [`ConformanceTarget`] for their sink and call [`run_all`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use destinations_core::policy::BatchPolicyOverrides;
use destinations_core::{
    AttemptOutcome, EventFilter, EventId, Hub, HubConfig, InstanceConfig, Queue, Registry,
    SendError, SendStatus, State,
};
use destinations_nats::{NatsOptions, NatsQueue};
use destinations_sqlite::{SqliteOptions, SqliteQueue};
use serde_json::json;

use crate::s3::TempDir;

/// How the sink behaves in one case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkBehaviour {
    /// Accept everything.
    Accept,
    /// Fail every send's first `n` attempts transiently, then accept.
    FailFirstAttempts(u32),
    /// Refuse everything permanently.
    RejectPermanently,
}

/// What a destination under test supports, and so which cases run.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// The sink can be told to fail ([`SinkBehaviour`]): a transient failure is retried, a
    /// permanent one dead-lettered.
    pub failures: bool,
    /// It puts several sends in one delivery, and [`ConformanceTarget::accepted_batches`] says
    /// which arrived together: its batch policy (as the instance overrides it) is honoured.
    pub batches: bool,
    /// Sends fall in groups ([`ConformanceTarget::payload_in_group`]) that never share a batch.
    pub groups: bool,
    /// It delivers in the order sent.
    pub ordered: bool,
    /// Its instance refuses some payloads a send alone cannot know about
    /// ([`ConformanceTarget::instance_check`]).
    pub instance_checks: bool,
    /// Its health says whether the sink can be reached ([`ConformanceTarget::stop_sink`]).
    pub health: bool,
    /// Sends in the burst case (10 000 by default).
    pub burst: u64,
    /// Its deliveries end on the hub that made them, so one hub on the shared (NATS) queue can
    /// be judged alone. Not so for a fan-out whose deliveries are sends of their own: a stopping
    /// hub on a shared queue leaves those to the other servers (test that with several).
    pub shared_queue: bool,
}

impl Default for Capabilities {
    /// A sink that can fail; nothing else claimed.
    fn default() -> Self {
        Self {
            failures: true,
            batches: false,
            groups: false,
            ordered: false,
            instance_checks: false,
            health: false,
            burst: 10_000,
            shared_queue: true,
        }
    }
}

/// A destination under test, with a real sink it delivers to.
#[async_trait]
pub trait ConformanceTarget: Send + Sync {
    /// The destination kind.
    fn kind(&self) -> &'static str;
    /// What it supports (default: [`Capabilities::default`]).
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    /// Start a sink that behaves as asked; return the instance options that point at it.
    async fn start_sink(&mut self, behaviour: SinkBehaviour) -> serde_json::Value;
    /// A valid payload carrying `marker`, for the current sink.
    fn payload(&self, marker: u64) -> serde_json::Value;
    /// An invalid payload, and the field its error must name.
    fn invalid_payload(&self) -> (serde_json::Value, &'static str);
    /// The markers the sink accepted, duplicates included.
    async fn accepted_markers(&self) -> Vec<u64>;
    /// The markers of each delivery the sink accepted, in the order they arrived (with
    /// [`Capabilities::batches`]).
    async fn accepted_batches(&self) -> Vec<Vec<u64>> {
        Vec::new()
    }
    /// A valid payload carrying `marker` in group `group` (0 or 1), with
    /// [`Capabilities::groups`].
    fn payload_in_group(&self, marker: u64, _group: u8) -> serde_json::Value {
        self.payload(marker)
    }
    /// With [`Capabilities::instance_checks`]: options to add to the instance, a payload valid
    /// on its own that this instance refuses, and the field its error must name.
    fn instance_check(&self) -> Option<(serde_json::Value, serde_json::Value, &'static str)> {
        None
    }
    /// Stop the sink, so that it cannot be reached (with [`Capabilities::health`]).
    async fn stop_sink(&mut self) {}
    /// Called with each hub the suite builds, before anything is sent: a sink that is the
    /// hub's own (SSE streams, emit subscriptions) attaches to it here.
    async fn attach(&mut self, _hub: &Hub) {}
}

/// The queue the suite's hubs run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    /// The in-memory queue (drained at shutdown).
    Memory,
    /// The SQLite queue in a fresh file (kept at shutdown, there at the next start).
    Sqlite,
    /// The shared queue on a fresh nats-server (what a stopping hub held goes back to it).
    Nats,
}

impl QueueKind {
    /// Every queue the suite covers.
    pub const ALL: [Self; 3] = [Self::Memory, Self::Sqlite, Self::Nats];

    /// Whether sends outlive the hub that accepted them.
    pub fn is_durable(self) -> bool {
        self != Self::Memory
    }
}

/// Where one case's queue lives: nothing for memory, a folder for SQLite, a server for NATS.
enum QueueHome {
    Memory,
    Sqlite(TempDir),
    Nats(crate::NatsServer),
}

impl QueueHome {
    async fn new(kind: QueueKind) -> Self {
        match kind {
            QueueKind::Memory => Self::Memory,
            QueueKind::Sqlite => Self::Sqlite(TempDir::new("conformance")),
            QueueKind::Nats => Self::Nats(crate::NatsServer::start().await),
        }
    }

    /// A queue here: a new memory queue, or the SQLite file or NATS streams (again, after a
    /// restart).
    async fn open(&self, config: &HubConfig) -> Option<Arc<dyn Queue>> {
        match self {
            Self::Memory => None,
            Self::Sqlite(dir) => {
                let queue = SqliteQueue::open(
                    &SqliteOptions::at(dir.path().join("queue.db")),
                    config.status_retention(),
                    config.dead_letter_capacity,
                )
                .unwrap_or_else(|e| panic!("{e}"));
                Some(Arc::new(queue))
            }
            Self::Nats(server) => {
                let queue = NatsQueue::connect(NatsOptions::at(server.url()), config)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                Some(Arc::new(queue))
            }
        }
    }
}

/// Sends per case.
const SENDS: u64 = 40;
/// The instance name used by the suite.
const INSTANCE: &str = "target";
/// How long a case waits for its sends to become final.
const WITHIN: Duration = Duration::from_secs(60);

/// Run every case on every queue that applies.
pub async fn run_all(target: &mut dyn ConformanceTarget) {
    let shared_queue = target.capabilities().shared_queue;
    for queue in QueueKind::ALL {
        if queue != QueueKind::Nats || shared_queue {
            run_on(target, queue).await;
        }
    }
}

/// Run every case that applies on one queue.
pub async fn run_on(target: &mut dyn ConformanceTarget, queue: QueueKind) {
    let can = target.capabilities();
    delivers_every_send_once_or_more(target, queue).await;
    rejects_a_bad_payload_naming_the_field(target, queue).await;
    flushes_a_partial_batch_on_shutdown(target, queue).await;
    loses_nothing_in_a_burst(target, queue).await;
    if can.failures {
        retries_a_transient_failure(target, queue).await;
        dead_letters_a_permanent_failure(target, queue).await;
    }
    if can.batches {
        honours_its_batch_policy(target, queue).await;
    }
    if can.groups {
        never_batches_two_groups_together(target, queue).await;
    }
    if can.ordered {
        delivers_in_the_order_sent(target, queue).await;
    }
    if can.instance_checks {
        refuses_what_the_instance_forbids_naming_the_field(target, queue).await;
    }
    if can.health && queue == QueueKind::Memory {
        reports_health_as_the_sink_comes_and_goes(target).await;
    }
    if queue.is_durable() {
        delivers_after_a_restart_what_an_interrupted_hub_left(target, queue).await;
    }
}

/// The instance's options for the current sink, with fast retries and `extra` on top.
async fn instance(
    target: &mut dyn ConformanceTarget,
    behaviour: SinkBehaviour,
    extra: &serde_json::Value,
) -> InstanceConfig {
    let mut table = target.start_sink(behaviour).await;
    let object = table
        .as_object_mut()
        .unwrap_or_else(|| panic!("start_sink must return a JSON object of options"));
    object.insert("kind".into(), json!(target.kind()));
    object.insert(
        "retry".into(),
        json!({"initial_delay": "5ms", "max_delay": "50ms", "max_attempts": 4}),
    );
    // Batches (of a destination that batches) go out quickly, unless the case says otherwise.
    object.insert("batch".into(), json!({"max_age": "50ms"}));
    // A sink that fails every send's first attempts on purpose is not a target to pause.
    object.insert("pause".into(), json!({"enabled": false}));
    if let serde_json::Value::Object(extra) = extra {
        object.extend(extra.clone());
    }
    InstanceConfig::from_table(INSTANCE, table).unwrap_or_else(|e| panic!("{e}"))
}

/// The same instance with batches that go out at once (the next start after a case that
/// batched for an hour).
fn quickly_flushed(mut config: InstanceConfig) -> InstanceConfig {
    config.settings.batch = BatchPolicyOverrides {
        max_age: Some(Duration::from_millis(10)),
        ..BatchPolicyOverrides::default()
    };
    config
}

async fn hub_on(
    target: &mut dyn ConformanceTarget,
    home: &QueueHome,
    config: InstanceConfig,
) -> Hub {
    let hub = hub_only(home, config).await;
    target.attach(&hub).await;
    hub
}

async fn hub_only(home: &QueueHome, config: InstanceConfig) -> Hub {
    let hub_config = HubConfig::default();
    let mut builder = Hub::builder().config(hub_config.clone());
    if let Some(queue) = home.open(&hub_config).await {
        builder = builder.queue(queue);
    }
    builder
        .configured(&Registry::linked(), INSTANCE, config)
        .unwrap_or_else(|e| {
            panic!("{e} (is the destination crate named by the test, so it is linked?)")
        })
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn hub_for(
    target: &mut dyn ConformanceTarget,
    behaviour: SinkBehaviour,
    extra: serde_json::Value,
    home: &QueueHome,
) -> Hub {
    let config = instance(target, behaviour, &extra).await;
    hub_on(target, home, config).await
}

async fn send_all(target: &dyn ConformanceTarget, hub: &Hub) -> Vec<EventId> {
    let run = hub.begin_run("conformance");
    for marker in 0..SENDS {
        run.send()
            .to(INSTANCE, &target.payload(marker))
            .unwrap_or_else(|e| panic!("a valid payload was refused: {e}"));
    }
    run.finish().await.unwrap_or_else(|e| panic!("{e}"))
}

/// Wait until every send is delivered or dead, and what their deliveries sent in turn (a
/// fan-out's) too, then shut down: nothing may be given up on.
async fn settle(hub: &Hub, ids: &[EventId]) {
    for id in ids {
        hub.wait_final(*id, WITHIN)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(hub.drained(WITHIN).await, "the queue did not drain");
    let report = hub.shutdown_within(WITHIN).await;
    assert_eq!(report.abandoned, 0, "shutdown had to abandon sends");
    assert_eq!(report.kept, 0, "sends were left in the queue");
}

async fn status(hub: &Hub, id: EventId) -> SendStatus {
    hub.status(id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("send {id} has no status"))
}

async fn states(hub: &Hub, ids: &[EventId]) -> HashMap<State, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        let state = status(hub, *id).await.state;
        *counts.entry(state).or_insert(0) += 1;
    }
    counts
}

fn assert_each_marker_arrived(mut markers: Vec<u64>, queue: QueueKind) {
    markers.sort_unstable();
    markers.dedup();
    assert_eq!(
        markers,
        (0..SENDS).collect::<Vec<_>>(),
        "every send must arrive (duplicates allowed), on the {queue:?} queue"
    );
}

/// Every accepted send arrives; every status says delivered.
pub async fn delivers_every_send_once_or_more(
    target: &mut dyn ConformanceTarget,
    queue: QueueKind,
) {
    let home = QueueHome::new(queue).await;
    let hub = hub_for(target, SinkBehaviour::Accept, json!({}), &home).await;
    let ids = send_all(target, &hub).await;
    settle(&hub, &ids).await;
    assert_eq!(
        states(&hub, &ids).await,
        HashMap::from([(State::Delivered, SENDS as usize)]),
        "on the {queue:?} queue"
    );
    for id in &ids {
        let log = status(&hub, *id).await.attempts_log.unwrap_or_default();
        assert!(
            log.last()
                .is_some_and(|a| a.outcome == AttemptOutcome::Delivered),
            "{id}'s attempt log ends with its delivery, on the {queue:?} queue: {log:?}"
        );
    }
    lists_the_sends(&hub, &ids, queue).await;
    assert_each_marker_arrived(target.accepted_markers().await, queue);
}

/// The hub lists `ids` (one run's sends to the suite's instance), newest first, a page at a
/// time, and filters them by destination, state, run and time. (A destination may add sends
/// of its own to the instance, an emit's fan-out: the listing may hold more than `ids`.)
async fn lists_the_sends(hub: &Hub, ids: &[EventId], queue: QueueKind) {
    let mine = EventFilter {
        destination: Some(INSTANCE.to_owned()),
        ..EventFilter::default()
    };
    let list = |filter: EventFilter, after: Option<String>, limit: usize| async move {
        hub.events(&filter, after.as_deref(), limit)
            .await
            .unwrap_or_else(|e| panic!("listing sends on the {queue:?} queue: {e}"))
    };
    let ours = |listed: &[EventId]| -> Vec<EventId> {
        listed
            .iter()
            .filter(|id| ids.contains(id))
            .copied()
            .collect()
    };
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = list(mine.clone(), after, 7).await;
        assert!(page.events.len() <= 7, "a page holds at most its limit");
        assert!(
            page.events.iter().all(|s| *s.destination == *INSTANCE),
            "only the instance asked for"
        );
        listed.extend(page.events.iter().map(|s| s.id));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert!(
        listed.windows(2).all(|w| w[0] > w[1]),
        "newest first, each once, across pages, on the {queue:?} queue"
    );
    let mut newest_first = ids.to_vec();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(
        ours(&listed),
        newest_first,
        "every send listed, on the {queue:?} queue"
    );
    let listed_with = |filter: EventFilter| async move {
        let page = list(filter, None, 1000).await;
        page.events.iter().map(|s| s.id).collect::<Vec<_>>()
    };
    let delivered = EventFilter {
        state: Some(State::Delivered),
        run: Some("conformance".to_owned()),
        ..mine.clone()
    };
    assert_eq!(ours(&listed_with(delivered).await).len(), ids.len());
    let dead = EventFilter {
        state: Some(State::Dead),
        ..mine.clone()
    };
    assert!(ours(&listed_with(dead).await).is_empty(), "none is dead");
    let other_run = EventFilter {
        run: Some("another".to_owned()),
        ..mine.clone()
    };
    assert!(
        ours(&listed_with(other_run).await).is_empty(),
        "none of that run"
    );
    let later = EventFilter {
        since: Some(std::time::SystemTime::now() + Duration::from_secs(60)),
        ..mine.clone()
    };
    assert!(listed_with(later).await.is_empty(), "none made since");
    let earlier = EventFilter {
        until: Some(std::time::SystemTime::now() + Duration::from_secs(60)),
        ..mine
    };
    assert_eq!(ours(&listed_with(earlier).await).len(), ids.len());
}

/// Transient failures are retried until the sink accepts.
pub async fn retries_a_transient_failure(target: &mut dyn ConformanceTarget, queue: QueueKind) {
    let home = QueueHome::new(queue).await;
    let hub = hub_for(
        target,
        SinkBehaviour::FailFirstAttempts(2),
        json!({}),
        &home,
    )
    .await;
    let ids = send_all(target, &hub).await;
    settle(&hub, &ids).await;
    assert_eq!(
        states(&hub, &ids).await,
        HashMap::from([(State::Delivered, SENDS as usize)]),
        "on the {queue:?} queue"
    );
    for id in &ids {
        let status = status(&hub, *id).await;
        assert!(
            status.attempts >= 3,
            "{id} delivered after {} attempts, expected 3, on the {queue:?} queue",
            status.attempts
        );
        assert!(status.last_error.is_some(), "the transient error is kept");
        let log = status.attempts_log.unwrap_or_default();
        let outcomes: Vec<_> = log.iter().map(|a| a.outcome).collect();
        assert!(
            outcomes.len() >= 3
                && outcomes.last() == Some(&AttemptOutcome::Delivered)
                && outcomes[..outcomes.len() - 1]
                    .iter()
                    .all(|o| *o == AttemptOutcome::Retry),
            "{id}'s log holds each failed attempt, then the delivery, on the {queue:?} queue: {log:?}"
        );
        assert!(
            log.windows(2)
                .all(|w| w[0].number < w[1].number && w[0].started_at <= w[1].started_at),
            "attempts in order: {log:?}"
        );
        assert!(
            log.iter()
                .filter(|a| a.outcome == AttemptOutcome::Retry)
                .all(|a| a.error.is_some() && a.duration_ms.is_some()),
            "a failed attempt keeps its error and duration: {log:?}"
        );
    }
    assert_each_marker_arrived(target.accepted_markers().await, queue);
}

/// A permanent failure is dead-lettered after one attempt, with a reason.
pub async fn dead_letters_a_permanent_failure(
    target: &mut dyn ConformanceTarget,
    queue: QueueKind,
) {
    let home = QueueHome::new(queue).await;
    let hub = hub_for(target, SinkBehaviour::RejectPermanently, json!({}), &home).await;
    let ids = send_all(target, &hub).await;
    settle(&hub, &ids).await;
    assert_eq!(
        states(&hub, &ids).await,
        HashMap::from([(State::Dead, SENDS as usize)]),
        "on the {queue:?} queue"
    );
    let letters = hub
        .dead_letters(usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(letters.len(), SENDS as usize);
    for letter in letters {
        assert_eq!(
            letter.envelope.attempts, 1,
            "a permanent failure is not retried"
        );
        assert!(!letter.reason.is_empty());
        let log = status(&hub, letter.envelope.id)
            .await
            .attempts_log
            .unwrap_or_default();
        assert!(
            matches!(&log[..], [only] if only.outcome == AttemptOutcome::Failed && only.number == 1 && only.error.is_some()),
            "a dead letter's log holds its one failed attempt with the error, on the {queue:?} queue: {log:?}"
        );
    }
    assert!(target.accepted_markers().await.is_empty());
}

/// A bad payload is refused at send time, naming the field; nothing is delivered.
pub async fn rejects_a_bad_payload_naming_the_field(
    target: &mut dyn ConformanceTarget,
    queue: QueueKind,
) {
    let home = QueueHome::new(queue).await;
    let hub = hub_for(target, SinkBehaviour::Accept, json!({}), &home).await;
    let (payload, field) = target.invalid_payload();
    let bytes = Bytes::from(serde_json::to_vec(&payload).unwrap_or_default());
    match hub.sender().json(INSTANCE, bytes) {
        Err(SendError::Invalid { error, .. }) => assert_eq!(error.field, field, "{error}"),
        other => panic!("expected an invalid-payload error naming `{field}`, got {other:?}"),
    }
    settle(&hub, &[]).await;
    assert!(target.accepted_markers().await.is_empty());
}

/// Sends waiting for a batch to fill are delivered at shutdown: those a dispatcher holds go out
/// at once; a durable queue keeps any it had not handed out yet, and the next hub delivers them.
pub async fn flushes_a_partial_batch_on_shutdown(
    target: &mut dyn ConformanceTarget,
    queue: QueueKind,
) {
    let home = QueueHome::new(queue).await;
    let config = instance(
        target,
        SinkBehaviour::Accept,
        &json!({"batch": {"max_events": 100_000, "max_bytes": 1_000_000_000, "max_age": "1h"}}),
    )
    .await;
    let hub = hub_on(target, &home, config.clone()).await;
    let ids = send_all(target, &hub).await;
    assert!(
        target.accepted_markers().await.is_empty(),
        "nothing is delivered before the batch fills or shutdown flushes it"
    );
    let report = hub.shutdown_within(WITHIN).await;
    assert_eq!(report.abandoned, 0, "on the {queue:?} queue");
    // A shared queue keeps what a stopping hub had not leased yet without the hub knowing.
    let left_in_shared = queue == QueueKind::Nats
        && states(&hub, &ids).await.get(&State::Delivered) != Some(&ids.len());
    let hub = if report.kept > 0 || left_in_shared {
        assert!(queue.is_durable(), "only a durable queue keeps sends");
        drop(hub);
        let next = hub_on(target, &home, quickly_flushed(config)).await;
        settle(&next, &ids).await;
        next
    } else {
        hub
    };
    assert_eq!(
        states(&hub, &ids).await,
        HashMap::from([(State::Delivered, SENDS as usize)]),
        "on the {queue:?} queue"
    );
    assert_each_marker_arrived(target.accepted_markers().await, queue);
}

/// A hub stopped before it could deliver (the deadline already passed) leaves its sends in
/// the durable queue; the next hub on the same file delivers every one.
pub async fn delivers_after_a_restart_what_an_interrupted_hub_left(
    target: &mut dyn ConformanceTarget,
    queue: QueueKind,
) {
    let home = QueueHome::new(queue).await;
    let config = instance(
        target,
        SinkBehaviour::Accept,
        &json!({"batch": {"max_events": 100_000, "max_bytes": 1_000_000_000, "max_age": "1h"}}),
    )
    .await;
    let first = hub_on(target, &home, config.clone()).await;
    let ids = send_all(target, &first).await;
    let report = first.shutdown_within(Duration::ZERO).await;
    assert_eq!(report.abandoned, 0, "a durable queue gives up on nothing");
    // A hub counts the backlog it keeps; a shared queue's backlog is the queue's to count. A
    // destination that delivers in no time (publishing in memory) may finish the batch in hand
    // before the deadline is noticed: then it delivered every send, and kept none.
    if queue != QueueKind::Nats && report.kept == 0 {
        assert_eq!(
            states(&first, &ids).await,
            HashMap::from([(State::Delivered, SENDS as usize)]),
            "the interrupted hub neither kept its sends nor delivered them"
        );
    }
    drop(first);

    let second = hub_on(target, &home, quickly_flushed(config)).await;
    settle(&second, &ids).await;
    assert_eq!(
        states(&second, &ids).await,
        HashMap::from([(State::Delivered, SENDS as usize)])
    );
    assert_each_marker_arrived(target.accepted_markers().await, queue);
}

/// Sends recorded in runs of 100 by several producers at once, `count` in all, markers from 0.
async fn send_many(target: &dyn ConformanceTarget, hub: &Hub, count: u64) -> Vec<EventId> {
    let mut ids = Vec::new();
    let mut first = 0;
    while first < count {
        let runs: Vec<_> = (0..4)
            .map(|n| first + n * 100)
            .take_while(|start| *start < count)
            .map(|start| {
                let run = hub.begin_run("burst");
                for marker in start..(start + 100).min(count) {
                    run.send()
                        .to(INSTANCE, &target.payload(marker))
                        .unwrap_or_else(|e| panic!("a valid payload was refused: {e}"));
                }
                run.finish()
            })
            .collect();
        for finished in futures::future::join_all(runs).await {
            ids.extend(finished.unwrap_or_else(|e| panic!("{e}")));
        }
        first += 400;
    }
    ids
}

/// A burst (10 000 sends unless the destination says less) loses nothing: every send delivered,
/// every marker arrived.
pub async fn loses_nothing_in_a_burst(target: &mut dyn ConformanceTarget, queue: QueueKind) {
    let count = target.capabilities().burst;
    let home = QueueHome::new(queue).await;
    let hub = hub_for(target, SinkBehaviour::Accept, json!({}), &home).await;
    let ids = send_many(target, &hub, count).await;
    assert_eq!(
        ids.len() as u64,
        count,
        "every send of the burst was accepted"
    );
    settle(&hub, &ids).await;
    assert_eq!(
        states(&hub, &ids).await,
        HashMap::from([(State::Delivered, count as usize)]),
        "a burst of {count} on the {queue:?} queue"
    );
    let mut markers = target.accepted_markers().await;
    markers.sort_unstable();
    markers.dedup();
    assert_eq!(
        markers.len() as u64,
        count,
        "every send of the burst arrives (duplicates allowed), on the {queue:?} queue"
    );
}

/// Batches as the instance sets them: never more than `max_events`, and several sends in one
/// delivery when they are there together.
pub async fn honours_its_batch_policy(target: &mut dyn ConformanceTarget, queue: QueueKind) {
    let home = QueueHome::new(queue).await;
    let hub = hub_for(
        target,
        SinkBehaviour::Accept,
        json!({"batch": {"max_events": 7, "max_age": "200ms"}}),
        &home,
    )
    .await;
    let ids = send_all(target, &hub).await;
    settle(&hub, &ids).await;
    let batches = target.accepted_batches().await;
    assert!(
        batches.iter().all(|b| b.len() <= 7),
        "a batch held more than max_events = 7: {batches:?}, on the {queue:?} queue"
    );
    assert!(
        batches.iter().any(|b| b.len() > 1),
        "40 sends recorded together went one a delivery: {batches:?}, on the {queue:?} queue"
    );
    assert_each_marker_arrived(batches.concat(), queue);
}

/// Sends of two groups, interleaved, never share a delivery.
pub async fn never_batches_two_groups_together(
    target: &mut dyn ConformanceTarget,
    queue: QueueKind,
) {
    let home = QueueHome::new(queue).await;
    let hub = hub_for(
        target,
        SinkBehaviour::Accept,
        json!({"batch": {"max_age": "200ms"}}),
        &home,
    )
    .await;
    let run = hub.begin_run("groups");
    let group = |marker: u64| u8::from(marker % 2 == 1);
    for marker in 0..SENDS {
        run.send()
            .to(INSTANCE, &target.payload_in_group(marker, group(marker)))
            .unwrap_or_else(|e| panic!("a valid payload was refused: {e}"));
    }
    let ids = run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    settle(&hub, &ids).await;
    let batches = target.accepted_batches().await;
    for batch in &batches {
        assert!(
            batch.iter().all(|m| group(*m) == group(batch[0])),
            "one delivery mixed two groups: {batch:?}, on the {queue:?} queue"
        );
    }
    assert_each_marker_arrived(batches.concat(), queue);
}

/// Sends arrive in the order they were sent.
pub async fn delivers_in_the_order_sent(target: &mut dyn ConformanceTarget, queue: QueueKind) {
    let home = QueueHome::new(queue).await;
    let hub = hub_for(target, SinkBehaviour::Accept, json!({}), &home).await;
    let ids = send_all(target, &hub).await;
    settle(&hub, &ids).await;
    let mut seen = std::collections::HashSet::new();
    let first_arrivals: Vec<u64> = target
        .accepted_markers()
        .await
        .into_iter()
        .filter(|m| seen.insert(*m))
        .collect();
    assert_eq!(
        first_arrivals,
        (0..SENDS).collect::<Vec<_>>(),
        "sends arrived out of the order sent, on the {queue:?} queue"
    );
}

/// A payload valid on its own that this instance refuses is refused at send time, naming the
/// field; what the instance allows goes.
pub async fn refuses_what_the_instance_forbids_naming_the_field(
    target: &mut dyn ConformanceTarget,
    queue: QueueKind,
) {
    let Some((options, payload, field)) = target.instance_check() else {
        panic!("a target that claims instance checks gives one (instance_check)");
    };
    let home = QueueHome::new(queue).await;
    let hub = hub_for(target, SinkBehaviour::Accept, options, &home).await;
    let bytes = Bytes::from(serde_json::to_vec(&payload).unwrap_or_default());
    match hub.sender().json(INSTANCE, bytes) {
        Err(SendError::Invalid { error, .. }) => assert_eq!(error.field, field, "{error}"),
        other => panic!("expected the instance to refuse, naming `{field}`, got {other:?}"),
    }
    let allowed = hub
        .sender()
        .to(INSTANCE, &target.payload(0))
        .unwrap_or_else(|e| panic!("a payload the instance allows was refused: {e}"));
    settle(&hub, &[allowed]).await;
    assert_eq!(target.accepted_markers().await, vec![0]);
}

/// Health is good while the sink is up, and says so when it is gone.
pub async fn reports_health_as_the_sink_comes_and_goes(target: &mut dyn ConformanceTarget) {
    let home = QueueHome::new(QueueKind::Memory).await;
    let hub = hub_for(target, SinkBehaviour::Accept, json!({}), &home).await;
    let health = |hub: Hub| async move {
        hub.health()
            .await
            .into_iter()
            .find(|(name, _)| name == INSTANCE)
            .map(|(_, result)| result)
            .unwrap_or_else(|| panic!("no health for the instance"))
    };
    if let Err(error) = health(hub.clone()).await {
        panic!("unhealthy with its sink up: {error}");
    }
    target.stop_sink().await;
    let down = health(hub.clone()).await;
    assert!(down.is_err(), "healthy with its sink stopped");
    hub.shutdown_within(Duration::ZERO).await;
}
