//! The hub: owns the destination instances, the queue, and one dispatcher per instance.

mod dispatch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{ConfigError, InstanceConfig, InstanceSettings, OnRunError, duration_text};
use crate::dead_letters::{DeadLetter, DeadLetters};
use crate::destination::{Destination, HealthError};
use crate::envelope::{Envelope, EventId};
use crate::error::SendError;
use crate::metrics::InstanceMetrics;
use crate::queue::{MemoryQueue, Queue, QueueCapacity, QueueDepth};
use crate::registry::Registry;
use crate::run::{Run, Sender};
use crate::status::{SendStatus, StatusBook};

use dispatch::Dispatcher;

/// Settings of the hub as a whole.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Bounds of the in-memory queue.
    pub queue: QueueCapacity,
    /// How many finished sends keep a queryable status (default 100 000).
    pub status_retention: usize,
    /// How many dead letters are kept (default 10 000).
    pub dead_letter_capacity: usize,
    /// What a failed run does with its sends.
    pub on_run_error: OnRunError,
    /// How long shutdown waits for pending deliveries before dead-lettering them.
    #[serde(with = "duration_text")]
    pub shutdown_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            queue: QueueCapacity::default(),
            status_retention: 100_000,
            dead_letter_capacity: 10_000,
            on_run_error: OnRunError::Discard,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// One configured destination instance.
pub(crate) struct Instance {
    pub(crate) name: Arc<str>,
    pub(crate) kind: &'static str,
    pub(crate) destination: Arc<dyn Destination>,
    pub(crate) max_payload_bytes: usize,
    pub(crate) metrics: InstanceMetrics,
}

/// What the hub shares with its senders and dispatchers.
pub(crate) struct HubShared {
    pub(crate) config: HubConfig,
    pub(crate) instances: HashMap<Arc<str>, Instance>,
    pub(crate) queue: Arc<dyn Queue>,
    pub(crate) status: StatusBook,
    pub(crate) dead_letters: DeadLetters,
    accepting: AtomicBool,
    /// Flips to `true` when the shutdown deadline passes: pending work is dead-lettered.
    pub(crate) give_up: watch::Sender<bool>,
    /// Sends dead-lettered because the shutdown deadline passed.
    pub(crate) abandoned: AtomicUsize,
    dispatchers: Mutex<Vec<JoinHandle<()>>>,
    /// Flips to `true` when shutdown begins: dispatchers flush their open batches and stop
    /// waiting to fill new ones.
    pub(crate) draining: watch::Sender<bool>,
    /// Signalled whenever an instance has nothing outstanding, so shutdown can check whether
    /// the whole hub is done.
    pub(crate) quiet: tokio::sync::Notify,
    /// Told of every dead letter, as it is made.
    pub(crate) dead_letter_observers: RwLock<Vec<DeadLetterObserver>>,
}

/// Told of each dead letter as it is made (the emit destination turns them into `$errors`
/// events). Runs on the delivery path: keep it quick and never block.
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

    /// Hand envelopes to the queue, all or none. `internal` sends (made by a destination while
    /// it delivers) are still taken while the hub drains at shutdown.
    pub(crate) fn release(
        &self,
        envelopes: Vec<Envelope>,
        internal: bool,
    ) -> Result<(), SendError> {
        if envelopes.is_empty() {
            return Ok(());
        }
        if !internal && !self.accepting.load(Ordering::Acquire) {
            return Err(SendError::ShuttingDown);
        }
        // Status first: a dispatcher may deliver before `enqueue` returns.
        self.status.queued(&envelopes);
        // Per destination: sends and bytes, counted in one pass (a run's sends usually go to
        // a few instances).
        let mut tally: Vec<(Arc<str>, u64, u64)> = Vec::new();
        for envelope in &envelopes {
            match tally
                .iter_mut()
                .find(|(name, ..)| Arc::ptr_eq(name, &envelope.destination))
            {
                Some((_, sends, bytes)) => {
                    *sends += 1;
                    *bytes += envelope.size() as u64;
                }
                None => tally.push((envelope.destination.clone(), 1, envelope.size() as u64)),
            }
        }
        // Refused envelopes come back, so their statuses can be forgotten without keeping a
        // list of ids on every release.
        let result = self.queue.enqueue(envelopes).map_err(|refused| {
            self.status.forget(refused.envelopes.iter().map(|e| e.id));
            refused.why
        });
        for (name, sends, bytes) in &tally {
            if let Some(instance) = self.instances.get(name) {
                match result {
                    Ok(()) => {
                        instance.metrics.accepted.increment(*sends);
                        instance.metrics.accepted_bytes.increment(*bytes);
                    }
                    Err(_) => instance.metrics.rejected_full.increment(*sends),
                }
            }
        }
        result.map_err(SendError::from)
    }
}

/// Builds a [`Hub`].
#[derive(Default)]
pub struct HubBuilder {
    config: HubConfig,
    queue: Option<Arc<dyn Queue>>,
    instances: Vec<(String, Arc<dyn Destination>, InstanceSettings)>,
}

impl HubBuilder {
    /// Use these hub settings.
    pub fn config(mut self, config: HubConfig) -> Self {
        self.config = config;
        self
    }

    /// Use this queue instead of the in-memory one.
    pub fn queue(mut self, queue: Arc<dyn Queue>) -> Self {
        self.queue = Some(queue);
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
        let queue = self
            .queue
            .unwrap_or_else(|| Arc::new(MemoryQueue::new(self.config.queue)));
        let mut instances = HashMap::new();
        let mut runtimes = Vec::new();
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
            let name: Arc<str> = name.into();
            if instances.contains_key(&name) {
                return Err(ConfigError::new(&name, "configured twice"));
            }
            let instance = Instance {
                name: name.clone(),
                kind: destination.kind(),
                max_payload_bytes: settings
                    .max_payload_bytes
                    .unwrap_or(InstanceSettings::DEFAULT_MAX_PAYLOAD_BYTES),
                metrics: InstanceMetrics::new(&name),
                destination: destination.clone(),
            };
            runtimes.push((
                name.clone(),
                destination,
                settings,
                instance.metrics.clone(),
            ));
            instances.insert(name, instance);
        }
        let (give_up, _) = watch::channel(false);
        let shared = Arc::new(HubShared {
            status: StatusBook::new(self.config.status_retention),
            dead_letters: DeadLetters::new(self.config.dead_letter_capacity),
            config: self.config,
            instances,
            queue,
            accepting: AtomicBool::new(true),
            give_up,
            abandoned: AtomicUsize::new(0),
            dispatchers: Mutex::new(Vec::new()),
            draining: watch::Sender::new(false),
            quiet: tokio::sync::Notify::new(),
            dead_letter_observers: RwLock::new(Vec::new()),
        });
        let hub = Hub {
            shared: shared.clone(),
        };
        for instance in shared.instances.values() {
            instance.destination.attach(&hub);
        }
        let handles = runtimes
            .into_iter()
            .map(|(name, destination, settings, metrics)| {
                Dispatcher::start(&shared, name, destination, &settings, metrics)
            })
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
    /// Sends still pending at the deadline, dead-lettered with that reason.
    pub abandoned: usize,
}

/// The delivery engine: takes sends, delivers them after their run, retries, dead-letters.
///
/// Cheap to clone; every clone is the same hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<HubShared>,
}

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

    /// Start building a hub.
    pub fn builder() -> HubBuilder {
        HubBuilder::default()
    }

    /// Begin a run: its sends are held until [`Run::finish`].
    pub fn begin_run(&self, run_id: impl Into<String>) -> Run {
        Run::begin(self.shared.clone(), run_id.into(), false)
    }

    /// A sender outside any run: each send is released at once.
    pub fn sender(&self) -> Sender {
        Sender::detached(self.shared.clone(), false)
    }

    /// A sender for a destination that sends while it delivers (the emit destination's fan-out
    /// and `$errors`): its sends are still taken while the hub drains at shutdown, so work in
    /// flight can finish; refused once the hub has stopped.
    pub fn internal_sender(&self) -> Sender {
        Sender::detached(self.shared.clone(), true)
    }

    /// A run whose sends are internal (see [`internal_sender`](Self::internal_sender)).
    pub fn begin_internal_run(&self, run_id: impl Into<String>) -> Run {
        Run::begin(self.shared.clone(), run_id.into(), true)
    }

    /// The status of a send, while it is remembered.
    pub fn status(&self, id: EventId) -> Option<SendStatus> {
        self.shared.status.get(id)
    }

    /// The status of a send once it is delivered or dead, or as it is after `timeout`.
    pub async fn wait_final(&self, id: EventId, timeout: Duration) -> Option<SendStatus> {
        self.shared.status.wait_final(id, timeout).await
    }

    /// The most recent dead letters, newest first.
    pub fn dead_letters(&self, limit: usize) -> Vec<DeadLetter> {
        self.shared.dead_letters.list(limit)
    }

    /// How many dead letters were dropped because the store was full.
    pub fn dead_letters_evicted(&self) -> u64 {
        self.shared.dead_letters.evicted()
    }

    /// Send dead letters again (all of them, or those with these ids), with a fresh retry
    /// budget and their original ids. Returns the ids replayed.
    pub fn replay_dead_letters(&self, ids: Option<&[EventId]>) -> Result<Vec<EventId>, SendError> {
        let letters = self.shared.dead_letters.take(ids);
        let envelopes: Vec<Envelope> = letters
            .iter()
            .filter(|d| self.shared.instances.contains_key(&d.envelope.destination))
            .map(|d| Envelope {
                attempts: 0,
                created_at: SystemTime::now(),
                ..d.envelope.clone()
            })
            .collect();
        let ids: Vec<EventId> = envelopes.iter().map(|e| e.id).collect();
        // If the queue refuses them, they stay dead letters, with their status as it was.
        let statuses: Vec<SendStatus> = ids
            .iter()
            .filter_map(|id| self.shared.status.get(*id))
            .collect();
        match self.shared.release(envelopes, false) {
            Ok(()) => Ok(ids),
            Err(e) => {
                self.shared.status.restore(statuses);
                self.shared.dead_letters.restore(letters);
                Err(e)
            }
        }
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

    /// How much is pending.
    pub fn queue_depth(&self) -> QueueDepth {
        self.shared.queue.depth()
    }

    /// The hub's settings.
    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// Stop taking sends, flush partial batches, and wait for pending deliveries up to the
    /// configured `shutdown_timeout`; whatever is still pending then is dead-lettered.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.shutdown_within(self.shared.config.shutdown_timeout)
            .await
    }

    /// [`shutdown`](Self::shutdown) with this deadline.
    pub async fn shutdown_within(&self, timeout: Duration) -> ShutdownReport {
        let deadline = tokio::time::Instant::now() + timeout;
        self.shared.accepting.store(false, Ordering::Release);
        // Drain: open batches go out now, and what deliveries send (internal sends) is taken,
        // until nothing is pending. Only then does the queue close.
        self.shared.draining.send_replace(true);
        loop {
            let quiet = self.shared.quiet.notified();
            tokio::pin!(quiet);
            quiet.as_mut().enable();
            if self.shared.queue.depth().events == 0 {
                break;
            }
            tokio::select! {
                () = quiet => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.shared.queue.close();
        let handles: Vec<_> = std::mem::take(
            &mut *self
                .shared
                .dispatchers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut all = futures::future::join_all(handles);
        if tokio::time::timeout_at(deadline, &mut all).await.is_err() {
            self.shared.give_up.send_replace(true);
            all.await;
        }
        let abandoned = self.shared.abandoned.load(Ordering::Acquire);
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "shutdown deadline passed: pending sends were dead-lettered"
            );
        }
        ShutdownReport { abandoned }
    }
}
