//! The hub: owns the destination instances, the queue, its capacity, and one dispatcher per
//! instance.

mod detached;
mod dispatch;
mod endpoints;
pub(crate) mod follow_up;

pub use endpoints::{EndpointChange, EndpointObserver, EndpointView};

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{
    ConfigError, InstanceConfig, InstanceSettings, OnRunError, QueueConfig, duration_text,
};
use crate::dead_letters::{DeadLetter, DeadLetterFilter, DeadLetterPage};
use crate::destination::{Destination, HealthError};
use crate::envelope::{Envelope, EventId};
use crate::error::SendError;
use crate::metrics::InstanceMetrics;
use crate::queue::{
    Capacity, Durability, MemoryQueue, Queue, QueueConsumer, QueueDepth, QueueError, Settled,
    Settlement, Tally,
};
use crate::registry::Registry;
use crate::run::{Run, Sender};
use crate::status::{SendStatus, StatusRetention};

use detached::Detached;
use dispatch::Dispatcher;

/// Settings of the hub as a whole.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// The queue: its kind, bounds, and how long a send waits for room.
    pub queue: QueueConfig,
    /// How many finished sends keep a queryable status (default 100 000).
    pub status_retention: usize,
    /// How long a finished send keeps a queryable status (default 24 h).
    #[serde(with = "duration_text")]
    pub status_max_age: Duration,
    /// How many dead letters are kept (default 10 000).
    pub dead_letter_capacity: usize,
    /// How many payload bytes of dead letters a memory queue keeps (default 256 MiB); the
    /// oldest go past it, counted as evicted.
    pub dead_letter_max_bytes: usize,
    /// What a failed run does with its sends.
    pub on_run_error: OnRunError,
    /// How long shutdown waits for deliveries under way (and, for a memory queue, for the
    /// queue to drain) before giving up on them.
    #[serde(with = "duration_text")]
    pub shutdown_timeout: Duration,
    /// The longest one delivery attempt may take, whatever the destination (default 5 min;
    /// an instance's `attempt_timeout` overrides it). An attempt cut short is tried again:
    /// its result is unknown.
    #[serde(with = "duration_text")]
    pub attempt_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            queue: QueueConfig::default(),
            status_retention: 100_000,
            status_max_age: Duration::from_secs(24 * 3600),
            dead_letter_capacity: 10_000,
            dead_letter_max_bytes: crate::dead_letters::DeadLetters::DEFAULT_MAX_BYTES,
            on_run_error: OnRunError::Discard,
            shutdown_timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(300),
        }
    }
}

impl HubConfig {
    /// How long finished statuses are kept.
    pub fn status_retention(&self) -> StatusRetention {
        StatusRetention {
            count: self.status_retention,
            age: self.status_max_age,
        }
    }
}

/// One configured destination instance.
pub(crate) struct Instance {
    pub(crate) name: Arc<str>,
    pub(crate) kind: &'static str,
    pub(crate) destination: Arc<dyn Destination>,
    pub(crate) max_payload_bytes: usize,
    /// When its failing targets are paused (its `pause`, else the destination's), if ever.
    pub(crate) pause: Option<crate::policy::PausePolicy>,
    pub(crate) metrics: InstanceMetrics,
    /// Its slot in the hub's [`Capacity`].
    pub(crate) slot: usize,
    pub(crate) consumer: Arc<dyn QueueConsumer>,
}

/// Where the hub is in its life. Only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Lifecycle {
    /// Taking sends, delivering.
    Running,
    /// Shutting down a memory queue: sends from outside are refused; open batches go out now;
    /// sends deliveries make are still taken, until nothing is pending.
    Draining,
    /// The queue leases no more; deliveries under way finish.
    Stopping,
    /// The shutdown deadline passed: deliveries under way are given up on.
    GivenUp,
}

/// What the hub shares with its senders and dispatchers.
pub(crate) struct HubShared {
    pub(crate) config: HubConfig,
    pub(crate) instances: HashMap<Arc<str>, Instance>,
    /// Instance names by capacity slot.
    slots: Vec<Arc<str>>,
    pub(crate) queue: Arc<dyn Queue>,
    pub(crate) capacity: Capacity,
    pub(crate) lifecycle: watch::Sender<Lifecycle>,
    /// Sends dead-lettered (memory queue) or lost because the shutdown deadline passed.
    pub(crate) abandoned: AtomicUsize,
    dispatchers: Mutex<Vec<JoinHandle<()>>>,
    /// Told of every dead letter, as it is made.
    pub(crate) dead_letter_observers: RwLock<Vec<DeadLetterObserver>>,
    pub(crate) detached: Detached,
    /// The targets delivered to, shared by every instance: holds (`Retry-After`), pauses,
    /// limits and what their attempts came to.
    pub(crate) endpoints: endpoints::Endpoints,
}

/// Told of each dead letter as it is made (the emit destination turns them into `$errors`
/// events). Runs on the delivery path: keep it quick and never block. Internal sends it makes
/// are queued with the dead letter, in one step.
pub type DeadLetterObserver = Arc<dyn Fn(&DeadLetter) + Send + Sync>;

impl HubShared {
    pub(crate) fn instance(&self, name: &str) -> Result<&Instance, SendError> {
        self.instances
            .get(name)
            .ok_or_else(|| SendError::UnknownDestination {
                name: name.to_owned(),
                known: self.known_names(),
            })
    }

    fn known_names(&self) -> String {
        let mut names: Vec<_> = self.instances.keys().map(|n| n.to_string()).collect();
        names.sort();
        names.join(", ")
    }

    pub(crate) fn lifecycle(&self) -> Lifecycle {
        *self.lifecycle.borrow()
    }

    /// Whether sends are taken: from outside only while running; internal ones (made by
    /// deliveries) while a memory queue drains too.
    fn accepting(&self, internal: bool) -> Result<(), SendError> {
        match self.lifecycle() {
            Lifecycle::Running => Ok(()),
            Lifecycle::Draining if internal => Ok(()),
            _ => Err(SendError::ShuttingDown),
        }
    }

    /// Sends and bytes per instance slot.
    pub(crate) fn tally<'a>(&self, envelopes: impl IntoIterator<Item = &'a Envelope>) -> Tally {
        let mut tally = Tally::default();
        let mut last: Option<(&Arc<str>, usize)> = None;
        for envelope in envelopes {
            let slot = match last {
                Some((name, slot)) if Arc::ptr_eq(name, &envelope.destination) => slot,
                _ => match self.instances.get(&envelope.destination) {
                    Some(instance) => {
                        last = Some((&envelope.destination, instance.slot));
                        instance.slot
                    }
                    None => continue,
                },
            };
            tally.add(slot, envelope.size());
        }
        tally
    }

    fn metrics_of(&self, slot: usize) -> Option<&InstanceMetrics> {
        let name = self.slots.get(slot)?;
        self.instances.get(name).map(|i| &i.metrics)
    }

    fn count_accepted(&self, tally: &Tally) {
        for (slot, sends, bytes) in tally.entries() {
            if let Some(metrics) = self.metrics_of(slot) {
                metrics.accepted.increment(sends as u64);
                crate::metrics::Totals::add(&metrics.totals.accepted, sends as u64);
                metrics.accepted_bytes.increment(bytes as u64);
            }
        }
    }

    fn count_refused(&self, tally: &Tally) {
        for (slot, sends, _) in tally.entries() {
            if let Some(metrics) = self.metrics_of(slot) {
                metrics.rejected_full.increment(sends as u64);
            }
        }
    }

    /// Hand envelopes to the queue, all or none, waiting up to `hub.queue.wait` for room.
    /// Refused envelopes come back with the reason. `internal` sends (made while delivering)
    /// are still taken while a memory queue drains.
    pub(crate) async fn release(
        &self,
        mut envelopes: Vec<Envelope>,
        internal: bool,
    ) -> Result<(), (SendError, Vec<Envelope>)> {
        if envelopes.is_empty() {
            return Ok(());
        }
        if internal {
            envelopes = match follow_up::capture(self, envelopes) {
                Ok(()) => return Ok(()),
                Err(envelopes) => envelopes,
            };
        }
        if let Err(error) = self.accepting(internal) {
            return Err((error, envelopes));
        }
        let tally = self.tally(&envelopes);
        if let Err(full) = self.capacity.reserve(&tally, self.config.queue.wait).await {
            self.count_refused(&tally);
            return Err((SendError::Queue(full.into()), envelopes));
        }
        let now = tokio::time::Instant::now();
        for envelope in &mut envelopes {
            envelope.start_budget(now);
        }
        match self.queue.enqueue(envelopes).await {
            Ok(()) => {
                self.queue_took(&tally);
                self.count_accepted(&tally);
                Ok(())
            }
            Err(refused) => {
                self.capacity.release(&tally);
                self.count_refused(&tally);
                Err((SendError::Queue(refused.why), refused.envelopes))
            }
        }
    }

    /// Take one send made outside any run: admitted now (or refused now, if there is no
    /// room), handed to the queue in the background.
    pub(crate) fn release_detached(
        &self,
        mut envelope: Envelope,
        internal: bool,
    ) -> Result<(), SendError> {
        if internal {
            envelope = match follow_up::capture(self, vec![envelope]) {
                Ok(()) => return Ok(()),
                Err(mut back) => back.pop().ok_or(SendError::ShuttingDown)?,
            };
        }
        self.accepting(internal)?;
        let tally = self.tally([&envelope]);
        if let Err(full) = self.capacity.try_reserve(&tally) {
            self.count_refused(&tally);
            return Err(SendError::Queue(full.into()));
        }
        envelope.start_budget(tokio::time::Instant::now());
        if !self.detached.submit(envelope) {
            self.capacity.release(&tally);
            return Err(SendError::ShuttingDown);
        }
        self.count_accepted(&tally);
        Ok(())
    }

    /// The queue took these sends: a shared queue bounds them from now on (see
    /// [`Queue::shared`]), so their room here is given back.
    pub(crate) fn queue_took(&self, tally: &Tally) {
        if self.queue.shared() {
            self.capacity.release(tally);
        }
    }

    /// Whether room is given back as sends settle: only for sends this hub admitted, which is
    /// every send of a queue that is not shared.
    pub(crate) fn settling_frees_room(&self) -> bool {
        !self.queue.shared()
    }

    /// Dead-letter envelopes the hub gives up on at the shutdown deadline (a memory queue's
    /// leftovers), through their instances' consumers.
    async fn abandon(&self, envelopes: Vec<Envelope>, reason: &str) {
        let mut by_instance: HashMap<Arc<str>, Vec<Settled>> = HashMap::new();
        for envelope in envelopes {
            // A send waiting for its retry keeps its last error in the reason.
            let last_error = match self.queue.statuses().get(envelope.id).await {
                Ok(Some(status)) if status.state == crate::status::State::Retrying => {
                    status.last_error
                }
                _ => None,
            };
            let error = match last_error {
                Some(last) => format!("{reason} while it waited to retry; last error: {last}"),
                None => reason.to_owned(),
            };
            by_instance
                .entry(envelope.destination.clone())
                .or_default()
                .push(Settled {
                    envelope,
                    error: Some(error),
                    response: None,
                });
        }
        for (name, dead) in by_instance {
            let Some(instance) = self.instances.get(&name) else {
                continue;
            };
            let tally = self.tally(dead.iter().map(|s| &s.envelope));
            self.abandoned.fetch_add(dead.len(), Ordering::AcqRel);
            instance.metrics.dead.increment(dead.len() as u64);
            crate::metrics::Totals::add(&instance.metrics.totals.dead, dead.len() as u64);
            let settlement = Settlement {
                dead,
                ..Settlement::default()
            };
            if let Err(error) = instance.consumer.settle(&settlement).await {
                tracing::error!(destination = %name, %error, "could not dead-letter sends at the shutdown deadline");
            }
            self.capacity.release(&tally);
        }
    }
}

/// Builds a [`Hub`].
pub struct HubBuilder {
    config: HubConfig,
    queue: Option<Arc<dyn Queue>>,
    instances: Vec<(String, Arc<dyn Destination>, InstanceSettings)>,
    delivering: bool,
}

impl Default for HubBuilder {
    fn default() -> Self {
        Self {
            config: HubConfig::default(),
            queue: None,
            instances: Vec::new(),
            delivering: true,
        }
    }
}

impl HubBuilder {
    /// Use these hub settings.
    pub fn config(mut self, config: HubConfig) -> Self {
        self.config = config;
        self
    }

    /// Use this queue instead of an in-memory one.
    pub fn queue(mut self, queue: Arc<dyn Queue>) -> Self {
        self.queue = Some(queue);
        self
    }

    /// Whether this hub delivers (the default): with `false` it only accepts sends into a
    /// shared queue that other hubs deliver from — an API server beside delivery workers.
    pub fn delivering(mut self, delivering: bool) -> Self {
        self.delivering = delivering;
        self
    }

    /// Add a destination instance under `name`.
    pub fn destination(
        mut self,
        name: impl Into<String>,
        destination: Arc<dyn Destination>,
        settings: InstanceSettings,
    ) -> Self {
        self.instances.push((name.into(), destination, settings));
        self
    }

    /// Add a destination instance from its config table, built by a registered kind.
    pub fn configured(
        self,
        registry: &Registry,
        name: &str,
        config: InstanceConfig,
    ) -> Result<Self, ConfigError> {
        let destination = registry.build(&config.kind, name, config.options)?;
        Ok(self.destination(name, destination, config.settings))
    }

    /// Start the dispatchers. Needs a Tokio runtime.
    pub fn build(self) -> Result<Hub, ConfigError> {
        let queue = match self.queue {
            Some(queue) => queue,
            None => {
                if self.config.queue.kind != "memory" || !self.config.queue.options.is_empty() {
                    return Err(ConfigError::hub(format!(
                        "hub.queue: kind = \"{}\" needs its backend crate to open the queue (HubBuilder::queue); \
                         only \"memory\" is built in{}",
                        self.config.queue.kind,
                        if self.config.queue.options.is_empty() {
                            String::new()
                        } else {
                            format!(
                                ", and it takes no `{}`",
                                self.config
                                    .queue
                                    .options
                                    .keys()
                                    .cloned()
                                    .collect::<Vec<_>>()
                                    .join("`, `")
                            )
                        }
                    )));
                }
                Arc::new(MemoryQueue::with_dead_letters(
                    self.config.status_retention(),
                    crate::dead_letters::DeadLetters::bounded(
                        self.config.dead_letter_capacity,
                        self.config.dead_letter_max_bytes,
                    ),
                ))
            }
        };
        if !self.delivering && !queue.shared() {
            return Err(ConfigError::hub(format!(
                "a hub that does not deliver needs a queue other hubs deliver from (kind = \"nats\"); \
                 sends into `{}` would never leave it",
                queue.describe()
            )));
        }
        let mut named = Vec::with_capacity(self.instances.len());
        for (name, destination, settings) in self.instances {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ConfigError::new(
                    &name,
                    "instance names use letters, digits, `_` and `-` only",
                ));
            }
            if named.iter().any(|(n, ..): &(Arc<str>, _, _)| **n == *name) {
                return Err(ConfigError::new(&name, "configured twice"));
            }
            named.push((Arc::<str>::from(name), destination, settings));
        }
        let shares: Vec<_> = named
            .iter()
            .map(|(name, _, settings)| (name.clone(), settings.queue))
            .collect();
        let capacity =
            Capacity::new(self.config.queue.bounds, &shares).map_err(ConfigError::hub)?;
        let mut instances = HashMap::new();
        let mut slots = Vec::with_capacity(named.len());
        let mut runtimes = Vec::new();
        for (slot, (name, destination, settings)) in named.into_iter().enumerate() {
            // A destination that takes one attempt at a time does so to keep its sends in order.
            // So does one that keeps its sequences in order.
            let consumer = if destination.max_concurrency() == Some(1) || destination.ordered() {
                queue.consumer_in_order(&name)
            } else {
                queue.consumer(&name)
            };
            let consumer = consumer.map_err(|e| {
                ConfigError::new(&name, format!("the queue has no place for it: {e}"))
            })?;
            let instance = Instance {
                name: name.clone(),
                kind: destination.kind(),
                max_payload_bytes: settings
                    .max_payload_bytes
                    .unwrap_or(InstanceSettings::DEFAULT_MAX_PAYLOAD_BYTES),
                pause: settings
                    .pause
                    .or_else(|| destination.pause_policy())
                    .filter(|p| p.enabled),
                metrics: InstanceMetrics::new(&name),
                destination: destination.clone(),
                slot,
                consumer,
            };
            runtimes.push((name.clone(), settings));
            slots.push(name.clone());
            instances.insert(name, instance);
        }
        // A durable queue's backlog counts against each instance's room (a shared queue bounds
        // its backlog itself).
        let backlog = queue
            .backlog()
            .map_err(|e| ConfigError::hub(format!("hub.queue: {e}")))?;
        for (name, depth) in backlog {
            match instances.get(name.as_str()) {
                Some(_) if queue.shared() => {}
                Some(instance) => {
                    let mut tally = Tally::default();
                    tally.add_many(instance.slot, depth.events, depth.bytes);
                    capacity.force(&tally);
                }
                None => tracing::warn!(
                    destination = %name,
                    sends = depth.events,
                    "the queue holds sends for a destination instance that is not configured; they wait until it is (or export them: destinations queue export)"
                ),
            }
        }
        let (detached, intake) = Detached::new();
        let shared = Arc::new(HubShared {
            config: self.config,
            instances,
            slots,
            queue,
            capacity,
            lifecycle: watch::Sender::new(Lifecycle::Running),
            abandoned: AtomicUsize::new(0),
            dispatchers: Mutex::new(Vec::new()),
            dead_letter_observers: RwLock::new(Vec::new()),
            detached,
            endpoints: endpoints::Endpoints::default(),
        });
        Detached::start(&shared, intake);
        let hub = Hub {
            shared: shared.clone(),
        };
        for instance in shared.instances.values() {
            instance.destination.attach(&hub);
        }
        let handles = runtimes
            .into_iter()
            .filter(|_| self.delivering)
            .map(|(name, settings)| Dispatcher::start(&shared, &name, &settings))
            .collect();
        *shared
            .dispatchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = handles;
        Ok(hub)
    }
}

/// A [`Hub`] that may be gone.
#[derive(Clone, Debug)]
pub struct WeakHub(Weak<HubShared>);

impl WeakHub {
    /// The hub, if it is still there.
    pub fn upgrade(&self) -> Option<Hub> {
        self.0.upgrade().map(|shared| Hub { shared })
    }
}

impl std::fmt::Debug for HubShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubShared").finish_non_exhaustive()
    }
}

/// What shutdown achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Sends given up on at the deadline: dead-lettered with that reason (memory queue), or
    /// lost because nothing could hold them.
    pub abandoned: usize,
    /// Sends a durable queue keeps for the next start.
    pub kept: usize,
}

/// The delivery engine: takes sends, delivers them after their run, retries, dead-letters.
///
/// Cheap to clone; every clone is the same hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<HubShared>,
}

/// How long deliveries that ignore the shutdown deadline get before they are cut off.
const GRACE: Duration = Duration::from_secs(2);

impl Hub {
    /// A handle that does not keep the hub alive: for a destination that sends into its own
    /// hub (see [`Destination::attach`]).
    pub fn downgrade(&self) -> WeakHub {
        WeakHub(Arc::downgrade(&self.shared))
    }

    /// Be told of every dead letter as it is made, from any instance.
    pub fn on_dead_letter(&self, observer: DeadLetterObserver) {
        self.shared
            .dead_letter_observers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(observer);
    }

    /// Be told of every target paused or resumed (after failures, or by an operator).
    pub fn on_endpoint_change(&self, observer: EndpointObserver) {
        self.shared.endpoints.observe(observer);
    }

    /// The targets delivered to lately (an HTTP destination's hosts): whether each is open,
    /// paused or probing, the attempts each instance gives it at once, its rates and last
    /// error. Targets of this server only, when several share a queue.
    pub fn endpoints(&self) -> Vec<EndpointView> {
        self.shared.endpoints.list()
    }

    /// Pause `target` by hand, for every destination kind that pauses targets: nothing more
    /// is attempted to it (its sends stay queued) until [`resume_endpoint`](Self::resume_endpoint).
    pub fn pause_endpoint(&self, target: &str) -> Result<(), String> {
        let mut kinds: Vec<(&'static str, crate::policy::PausePolicy)> = Vec::new();
        for instance in self.shared.instances.values() {
            if let Some(policy) = instance.pause
                && !kinds.iter().any(|(kind, _)| *kind == instance.kind)
            {
                kinds.push((instance.kind, policy));
            }
        }
        if kinds.is_empty() {
            return Err("no destination here pauses targets (the HTTP destination does)".into());
        }
        self.shared.endpoints.pause_by_hand(&kinds, target);
        Ok(())
    }

    /// Resume a target paused (by hand or after failures) or held by a `Retry-After`:
    /// attempts go at once. Returns whether anything held it back.
    pub fn resume_endpoint(&self, target: &str) -> bool {
        self.shared.endpoints.resume_by_hand(target)
    }

    /// Start building a hub.
    pub fn builder() -> HubBuilder {
        HubBuilder::default()
    }

    /// Begin a run: its sends are held until [`Run::finish`].
    pub fn begin_run(&self, run_id: impl Into<String>) -> Run {
        Run::begin(self.shared.clone(), run_id.into(), false)
    }

    /// A sender outside any run: each send is admitted at once (or refused at once if the
    /// queue has no room) and handed to the queue in the background; [`flush`](Self::flush)
    /// waits until it is there. A run's [`finish`](Run::finish) resolves only once its sends
    /// are in the queue.
    pub fn sender(&self) -> Sender {
        Sender::detached(self.shared.clone(), false)
    }

    /// A sender for a destination that sends while it delivers (the emit destination's fan-out
    /// and `$errors`): inside a delivery, its sends are queued with that delivery's settlement;
    /// they are still taken while a memory queue drains at shutdown.
    pub fn internal_sender(&self) -> Sender {
        Sender::detached(self.shared.clone(), true)
    }

    /// An [`internal_sender`](Self::internal_sender) whose sends belong to run `run` — and so
    /// do the sends their deliveries make. The emit destination sends `$errors` events in
    /// run `$errors`, to know a failure that a failure report set off.
    pub fn internal_sender_in(&self, run: &str) -> Sender {
        Sender::detached_in(self.shared.clone(), true, Arc::from(run))
    }

    /// A run whose sends are internal (see [`internal_sender`](Self::internal_sender)).
    pub fn begin_internal_run(&self, run_id: impl Into<String>) -> Run {
        Run::begin(self.shared.clone(), run_id.into(), true)
    }

    /// Wait until every send made outside a run so far is in the queue (durable, for a durable
    /// queue).
    pub async fn flush(&self) {
        self.shared.detached.flush().await;
    }

    /// What the queue promises to survive.
    pub fn durability(&self) -> Durability {
        self.shared.queue.durability()
    }

    /// The queue, described for logs (`memory`, `sqlite ./data/queue.db`).
    pub fn queue_description(&self) -> String {
        self.shared.queue.describe()
    }

    /// How this hub hears what the other hubs on a shared queue publish (see
    /// [`Queue::fanout`]); `None` when it is alone.
    pub fn fanout(&self) -> Option<Arc<dyn crate::queue::Fanout>> {
        self.shared.queue.fanout()
    }

    /// The status of a send, while it is remembered.
    pub async fn status(&self, id: EventId) -> Result<Option<SendStatus>, QueueError> {
        let statuses = self.shared.queue.statuses();
        match statuses.get(id).await? {
            Some(status) => Ok(Some(status)),
            // A send made outside a run may still be on its way to the queue.
            None if self.shared.detached.pending() => {
                self.flush().await;
                statuses.get(id).await
            }
            None => Ok(None),
        }
    }

    /// The status of a send once it is delivered or dead, or as it is after `timeout`.
    pub async fn wait_final(
        &self,
        id: EventId,
        timeout: Duration,
    ) -> Result<Option<SendStatus>, QueueError> {
        if self.shared.detached.pending() {
            self.flush().await;
        }
        self.shared.queue.statuses().wait_final(id, timeout).await
    }

    /// The newest sends matching `filter`, a page at a time (`after`: the previous page's
    /// `next`), without their attempt logs ([`status`](Self::status) gives one send's).
    pub async fn events(
        &self,
        filter: &crate::status::EventFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<crate::status::EventPage, QueueError> {
        if self.shared.detached.pending() {
            self.flush().await;
        }
        self.shared
            .queue
            .statuses()
            .list(filter, after, limit)
            .await
    }

    /// The most recent dead letters, newest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self
            .dead_letter_page(&DeadLetterFilter::default(), None, limit)
            .await?
            .letters)
    }

    /// Dead letters matching `filter`, newest first, a page at a time (`after`: the previous
    /// page's `next`).
    pub async fn dead_letter_page(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterPage, QueueError> {
        self.shared
            .queue
            .dead_letters()
            .list(filter, after, limit)
            .await
    }

    /// A payload of `destination` as it may be shown: parsed, with what the destination
    /// calls secret hidden ([`Destination::redact`]).
    pub fn shown_payload(&self, destination: &str, payload: &[u8]) -> serde_json::Value {
        let mut value: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        if let Ok(instance) = self.shared.instance(destination) {
            instance.destination.redact(&mut value);
        }
        value
    }

    /// A dead letter as the API lists it, its payload redacted.
    pub fn dead_letter_summary(&self, letter: &DeadLetter) -> crate::DeadLetterSummary {
        let mut summary = crate::DeadLetterSummary::from(letter);
        if let Ok(instance) = self.shared.instance(&letter.envelope.destination) {
            instance.destination.redact(&mut summary.payload);
        }
        summary
    }

    /// How many dead letters were dropped because the store was full.
    pub async fn dead_letters_evicted(&self) -> Result<u64, QueueError> {
        self.shared.queue.dead_letters().evicted().await
    }

    /// Send up to `limit` dead letters matching `filter` again, with their ids, their original
    /// `created_at`, and a fresh retry budget, in one step. Returns the ids replayed.
    pub async fn replay_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
    ) -> Result<Vec<EventId>, SendError> {
        let shared = &self.shared;
        shared.accepting(false)?;
        let candidates = shared
            .queue
            .dead_letters()
            .list(filter, None, limit)
            .await?
            .letters;
        // Oldest first, and only those of instances this hub has.
        let candidates: Vec<&DeadLetter> = candidates
            .iter()
            .rev()
            .filter(|letter| shared.instances.contains_key(&letter.envelope.destination))
            .collect();
        let tally = shared.tally(candidates.iter().map(|l| &l.envelope));
        if let Err(full) = shared
            .capacity
            .reserve(&tally, shared.config.queue.wait)
            .await
        {
            shared.count_refused(&tally);
            return Err(SendError::Queue(full.into()));
        }
        let ids: Vec<EventId> = candidates.iter().map(|l| l.envelope.id).collect();
        let moved = match shared.queue.replay(&ids).await {
            Ok(moved) => moved,
            Err(error) => {
                shared.capacity.release(&tally);
                return Err(error.into());
            }
        };
        // What was reserved for letters that were no longer there (replayed meanwhile).
        let moved_ids: std::collections::HashSet<EventId> = moved.iter().map(|e| e.id).collect();
        let gone = shared.tally(
            candidates
                .iter()
                .map(|l| &l.envelope)
                .filter(|e| !moved_ids.contains(&e.id)),
        );
        shared.capacity.release(&gone);
        let moved_tally = shared.tally(&moved);
        shared.queue_took(&moved_tally);
        shared.count_accepted(&moved_tally);
        Ok(moved.iter().map(|e| e.id).collect())
    }

    /// Wait up to `hub.queue.wait` until `destination` (any instance, for `None`) has room for
    /// a send; refuse with how full it is otherwise. The server asks before it reads a body.
    pub async fn wait_for_room(&self, destination: Option<&str>) -> Result<(), SendError> {
        let shared = &self.shared;
        shared.accepting(false)?;
        let slot = destination
            .map(|name| shared.instance(name).map(|i| i.slot))
            .transpose()?;
        shared
            .capacity
            .wait_for_room(slot, shared.config.queue.wait)
            .await
            .map_err(|full| SendError::Queue(full.into()))
    }

    /// The instances whose destination is a `T`, as (name, destination), sorted by name.
    pub fn instances_of<T: Destination>(&self) -> Vec<(String, Arc<T>)> {
        let mut found: Vec<(String, Arc<T>)> = self
            .shared
            .instances
            .values()
            .filter_map(|instance| {
                let any: Arc<dyn std::any::Any + Send + Sync> = instance.destination.clone();
                any.downcast::<T>()
                    .ok()
                    .map(|destination| (instance.name.to_string(), destination))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// The configured instances as (name, kind), sorted by name.
    pub fn destinations(&self) -> Vec<(String, &'static str)> {
        let mut list: Vec<_> = self
            .shared
            .instances
            .values()
            .map(|i| (i.name.to_string(), i.kind))
            .collect();
        list.sort();
        list
    }

    /// Each instance with the JSON Schema of what it takes, by name (for the API document).
    pub fn send_schemas(&self) -> Vec<(String, Option<crate::typed::SendSchema>)> {
        let mut list: Vec<_> = self
            .shared
            .instances
            .values()
            .map(|i| (i.name.to_string(), i.destination.send_schema()))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    /// Ask every instance whether its target is reachable.
    pub async fn health(&self) -> Vec<(String, Result<(), HealthError>)> {
        let checks = self
            .shared
            .instances
            .values()
            .map(|i| async move { (i.name.to_string(), i.destination.health().await) });
        let mut results = futures::future::join_all(checks).await;
        results.sort_by(|a, b| a.0.cmp(&b.0));
        results
    }

    /// How much is pending, in all.
    pub fn queue_depth(&self) -> QueueDepth {
        self.shared.capacity.depth()
    }

    /// Each instance's counts since the hub started (sends accepted, delivered, dead, failed
    /// attempts) and what waits in its queue, by name.
    pub fn totals(&self) -> Vec<crate::metrics::InstanceTotals> {
        use std::sync::atomic::Ordering::Relaxed;
        let depths: std::collections::HashMap<String, QueueDepth> =
            self.queue_depths().into_iter().collect();
        let mut list: Vec<_> = self
            .shared
            .instances
            .values()
            .map(|i| {
                let totals = &i.metrics.totals;
                let last_error = totals.last_error();
                crate::metrics::InstanceTotals {
                    name: i.name.to_string(),
                    kind: i.kind,
                    accepted: totals.accepted.load(Relaxed),
                    delivered: totals.delivered.load(Relaxed),
                    dead: totals.dead.load(Relaxed),
                    failed_attempts: totals.failed_attempts.load(Relaxed),
                    queued: depths.get(&*i.name).map_or(0, |d| d.events),
                    last_error_at: last_error
                        .as_ref()
                        .map(|(_, at)| humantime::format_rfc3339_millis(*at).to_string()),
                    last_error: last_error.map(|(error, _)| error),
                }
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// How much is pending per instance, sorted by name.
    pub fn queue_depths(&self) -> Vec<(String, QueueDepth)> {
        let mut depths: Vec<_> = self
            .shared
            .capacity
            .depths()
            .into_iter()
            .map(|(name, depth)| (name.to_string(), depth))
            .collect();
        depths.sort_by(|a, b| a.0.cmp(&b.0));
        depths
    }

    /// The hub's settings.
    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// Stop taking sends and stop, within the configured `shutdown_timeout`: a memory queue
    /// is drained first (partial batches flushed, pending deliveries and retries waited for,
    /// whatever is left at the deadline dead-lettered); a durable queue leases no more, lets
    /// the deliveries under way finish, and keeps its backlog for the next start.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.shutdown_within(self.shared.config.shutdown_timeout)
            .await
    }

    /// [`shutdown`](Self::shutdown) with this deadline.
    pub async fn shutdown_within(&self, timeout: Duration) -> ShutdownReport {
        let shared = &self.shared;
        let deadline = tokio::time::Instant::now() + timeout;
        let durable = shared.queue.durability().is_durable();
        if !durable {
            shared
                .lifecycle
                .send_if_modified(|l| advance(l, Lifecycle::Draining));
            shared.capacity.wait_empty(deadline).await;
        }
        shared
            .lifecycle
            .send_if_modified(|l| advance(l, Lifecycle::Stopping));
        if !durable && shared.capacity.depth().events > 0 {
            shared
                .lifecycle
                .send_if_modified(|l| advance(l, Lifecycle::GivenUp));
        }
        // Sends admitted outside a run reach the queue before it stops.
        if let Some(task) = shared.detached.close() {
            let mut task = task;
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
        let leftovers = shared.queue.stop().await;
        if !leftovers.is_empty() {
            shared
                .abandon(
                    leftovers,
                    "the shutdown deadline passed (hub.shutdown_timeout)",
                )
                .await;
        }
        let handles: Vec<_> = std::mem::take(
            &mut *shared
                .dispatchers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let aborts: Vec<_> = handles.iter().map(JoinHandle::abort_handle).collect();
        let mut all = futures::future::join_all(handles);
        if tokio::time::timeout_at(deadline, &mut all).await.is_err() {
            shared
                .lifecycle
                .send_if_modified(|l| advance(l, Lifecycle::GivenUp));
            if tokio::time::timeout(GRACE, &mut all).await.is_err() {
                // Whatever still runs ignores every signal: cut it off; what it held stays
                // counted as pending.
                tracing::error!(
                    "dispatchers did not stop within the grace period after the shutdown deadline; aborting them"
                );
                for abort in aborts {
                    abort.abort();
                }
            }
        }
        shared.queue.close().await;
        let pending = shared.capacity.depth().events;
        let (abandoned, kept) = if durable {
            (shared.abandoned.load(Ordering::Acquire), pending)
        } else {
            (shared.abandoned.load(Ordering::Acquire) + pending, 0)
        };
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "shutdown deadline passed: sends still pending were given up on"
            );
        }
        ShutdownReport { abandoned, kept }
    }

    /// Wait until nothing is pending — every send delivered or dead — or `timeout`; whether
    /// the queue is empty. (A program that must not leave sends for the next start of a
    /// durable queue waits here before [`shutdown`](Self::shutdown).)
    pub async fn drained(&self, timeout: Duration) -> bool {
        self.flush().await;
        self.shared
            .capacity
            .wait_empty(tokio::time::Instant::now() + timeout)
            .await
    }
}

/// Move the lifecycle forward to `to` (never back); whether it moved.
fn advance(current: &mut Lifecycle, to: Lifecycle) -> bool {
    if *current < to {
        *current = to;
        true
    } else {
        false
    }
}
