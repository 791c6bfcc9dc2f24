//! One dispatcher per destination instance: lease → batch → deliver under a concurrency limit
//! → settle the attempt (delivered, retry at a time, or dead) with the sends it made.
//!
//! The queue owns the envelopes throughout: the dispatcher leases them, and each attempt ends
//! in one settlement. Retry timing and attempt counts live in the queue; the dispatcher only
//! decides, with the instance's retry policy, when the next attempt should be.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use super::endpoints::{AttemptEnd, EndpointGate, EndpointKey};
use super::follow_up::Collector;
use super::{HubShared, Lifecycle};
use crate::config::InstanceSettings;
use crate::dead_letters::DeadLetter;
use crate::destination::{Batch, BatchOutcome, Destination, Outcome, Report};
use crate::envelope::{Envelope, EventId};
use crate::metrics::{InstanceMetrics, Totals};
use crate::policy::{
    AdaptiveLimit, BatchPolicy, Health, PausePolicy, Pressure, RateGate, RateLimit, RetryDecision,
    RetryPolicy,
};
use crate::queue::{Leased, QueueConsumer, RetryBatch, Settled, Settlement};

/// The most envelopes leased at once.
const LEASE: usize = 256;

/// The most envelopes held waiting for busy targets: past it the dispatcher leases no more
/// until they start, or until the targets that hold them are found stalled.
const PARKED_MAX: usize = 4096;

/// A target with no attempt ending for this long, while the waiting set is full, is stalled:
/// what waits for it goes back to the queue (unattempted) so other targets' sends can be
/// leased.
const STALLED_AFTER: Duration = Duration::from_secs(1);

/// What a dispatcher's delivery tasks share.
struct Lane {
    name: Arc<str>,
    destination: Arc<dyn Destination>,
    /// When a failing target is paused, if the destination pauses them.
    pause: Option<PausePolicy>,
    retry: RetryPolicy,
    /// The longest one attempt may take.
    attempt_timeout: Duration,
    hub: Arc<HubShared>,
    metrics: InstanceMetrics,
    consumer: Arc<dyn QueueConsumer>,
    concurrency: Arc<Semaphore>,
    /// Whether the queue outlives the process (what is given up on at the deadline is then
    /// left for the next start, not dead-lettered).
    durable: bool,
    /// Delivery attempts under way.
    attempts: AtomicUsize,
    /// Signalled when the last attempt under way ends.
    idle: Notify,
    /// Told the target of each attempt that ends, to start what waits for it.
    target_done: mpsc::UnboundedSender<TargetDone>,
}

/// An attempt to a target ended: what it said about the target.
struct TargetDone {
    target: String,
    /// Let through as the probe of a paused target.
    probe: bool,
    round_trip: Duration,
    said: TargetSaid,
    /// The sends of the attempt that went back to the queue for a retry (an ordered
    /// sequence holds everything behind them until they come back).
    retried: Vec<EventId>,
    /// How long until that retry is due.
    retry_wait: Option<Duration>,
    /// The sequence the attempt's batch keeps its place in, if the instance is ordered.
    sequence: Option<String>,
}

/// What an attempt's outcome says about its target.
#[derive(Debug)]
struct TargetSaid {
    /// How long it asked to be left alone (`Retry-After`).
    hold: Option<Duration>,
    health: Health,
    pressure: Pressure,
    error: Option<String>,
}

impl TargetSaid {
    /// An attempt that ended without an outcome (given up at shutdown).
    const NOTHING: Self = Self {
        hold: None,
        health: Health::Unknown,
        pressure: Pressure::Unknown,
        error: None,
    };

    /// Read an attempt's outcome: a send delivered, or any answer but a server error, says
    /// the target answers; could not connect, a server error or a timeout says it fails;
    /// 429, 503, 408, a timeout or a `Retry-After` says it pushes back.
    fn of(outcome: &BatchOutcome) -> Self {
        let reports: &[Report] = match outcome {
            BatchOutcome::All(report) => std::slice::from_ref(report),
            BatchOutcome::Each(reports) => reports,
        };
        let mut said = Self::NOTHING;
        let (mut answered, mut failing, mut pushed_back) = (false, false, false);
        for report in reports {
            let status = report.response.as_ref().and_then(|r| r.status);
            match &report.outcome {
                Outcome::Delivered => answered = true,
                Outcome::Retry { after: Some(_), .. } => pushed_back = true,
                Outcome::Retry { error, after: None } => {
                    match status {
                        Some(429) => pushed_back = true,
                        Some(408 | 503) => (pushed_back, failing) = (true, true),
                        Some(400..=499) => answered = true,
                        _ => failing = true,
                    }
                    said.error.get_or_insert_with(|| error.clone());
                }
                Outcome::Failed { error } => {
                    if status.is_some_and(|s| s < 500) {
                        answered = true;
                    }
                    said.error.get_or_insert_with(|| error.clone());
                }
            }
        }
        said.hold = outcome.retry_after();
        said.health = if answered {
            Health::Answered
        } else if failing {
            Health::Failing
        } else {
            Health::Unknown
        };
        said.pressure = if pushed_back {
            Pressure::PushedBack
        } else if reports
            .iter()
            .any(|r| matches!(r.outcome, Outcome::Delivered))
        {
            Pressure::Answered
        } else {
            Pressure::Unknown
        };
        said
    }

    /// An attempt cut short at `attempt_timeout`.
    fn timed_out(error: String) -> Self {
        Self {
            hold: None,
            health: Health::Failing,
            pressure: Pressure::PushedBack,
            error: Some(error),
        }
    }
}

/// A batch going back to the queue unattempted: its target, and how long until it is due.
/// A batch going back to the queue unattempted.
struct Deferral {
    envelopes: Vec<Envelope>,
    /// Its target (or sequence), for the log.
    target: String,
    /// How long its target has not moved: it is due again after as long (1 s to 1 min).
    stalled: Duration,
    /// Not due before this much time (it waits in its sequence behind a retry due then).
    at_least: Duration,
}

/// A target's slot, held for the length of an attempt; its end is reported to the dispatcher.
struct TargetSlot {
    target: String,
    probe: bool,
    started: tokio::time::Instant,
    /// What the attempt said, set once it ended.
    said: Option<TargetSaid>,
    /// Sends going back to the queue for a retry.
    retried: Vec<EventId>,
    retry_wait: Option<Duration>,
    sequence: Option<String>,
    done: mpsc::UnboundedSender<TargetDone>,
}

impl Drop for TargetSlot {
    fn drop(&mut self) {
        let _ = self.done.send(TargetDone {
            target: std::mem::take(&mut self.target),
            probe: self.probe,
            round_trip: self.started.elapsed(),
            said: self.said.take().unwrap_or(TargetSaid::NOTHING),
            retried: std::mem::take(&mut self.retried),
            retry_wait: self.retry_wait.take(),
            sequence: self.sequence.take(),
        });
    }
}

/// The slots an attempt holds while the target has it: one of the instance's, and one of its
/// target's (if the destination names targets). The dispatcher hears of the target's slot
/// freeing before the attempt stops counting, so what waits for it starts first.
struct Slots {
    _instance: OwnedSemaphorePermit,
    target: Option<TargetSlot>,
}

/// One target's attempts under way, the batches waiting for it, and what holds them back.
struct Target {
    busy: usize,
    waiting: VecDeque<Waiting>,
    /// When an attempt to it last ended or began (or it was first seen).
    progressed: tokio::time::Instant,
    /// Its own rate limit, if the destination gives one per target.
    rate: Option<RateGate>,
    /// Nothing goes to it before this (it answered with `Retry-After`).
    hold_until: Option<tokio::time::Instant>,
    /// The wake-up set for what waits for it, if any.
    wake: Option<tokio::time::Instant>,
    /// Its limit of attempts at once, if it adapts to how the target answers.
    adaptive: Option<AdaptiveLimit>,
}

/// A batch waiting for its target, and the sequence it keeps its place in (of an ordered
/// instance).
struct Waiting {
    envelopes: Vec<Envelope>,
    sequence: Option<String>,
}

/// Of an ordered instance: one sequence's sends in line. At most one batch of it is out (with
/// its target: waiting there or under way); what went back to the queue (a retry, a deferral)
/// is awaited in its place; the rest wait behind, in the order accepted.
struct Sequence {
    out: bool,
    /// Batches gone back to the queue, oldest first, ahead of everything behind; each holds
    /// its envelopes once it is back. Nothing else goes out until the first is back.
    returning: VecDeque<Returning>,
    behind: VecDeque<Vec<Envelope>>,
    /// When a batch of it last went out or ended.
    progressed: tokio::time::Instant,
}

/// A batch of a sequence that went back to the queue, and is awaited in its place.
struct Returning {
    ids: Vec<EventId>,
    back: Option<Vec<Envelope>>,
    /// When it is due back, if known (a retry's due time).
    due: Option<tokio::time::Instant>,
}

impl Sequence {
    fn new(now: tokio::time::Instant) -> Self {
        Self {
            out: false,
            returning: VecDeque::new(),
            behind: VecDeque::new(),
            progressed: now,
        }
    }

    /// The next batch to go out, if its turn has come: what came back first, then what waits
    /// behind — nothing while a batch is out or the oldest gone back is not back yet.
    fn next(&mut self) -> Option<Vec<Envelope>> {
        if self.out {
            return None;
        }
        match self.returning.front_mut() {
            Some(front) => {
                let back = front.back.take()?;
                self.returning.pop_front();
                Some(back)
            }
            None => self.behind.pop_front(),
        }
    }

    /// A batch of it went back to the queue; nothing behind it goes out before it is back.
    /// `out`: the batch that was out (older than all that went back before it).
    fn went_back(&mut self, ids: Vec<EventId>, out: bool, due: Option<tokio::time::Instant>) {
        let returning = Returning {
            ids,
            back: None,
            due,
        };
        if out {
            self.out = false;
            self.returning.push_front(returning);
        } else {
            self.returning.push_back(returning);
        }
    }

    fn is_empty(&self) -> bool {
        !self.out && self.returning.is_empty() && self.behind.is_empty()
    }
}

impl Target {
    fn new(now: tokio::time::Instant, rate: Option<&RateLimit>, adaptive: Option<usize>) -> Self {
        Self {
            busy: 0,
            waiting: VecDeque::new(),
            progressed: now,
            rate: rate.map(RateLimit::gate),
            hold_until: None,
            wake: None,
            adaptive: adaptive.map(AdaptiveLimit::new),
        }
    }

    /// Attempts it may have under way at once now.
    fn limit(&self, fixed: usize) -> usize {
        self.adaptive
            .as_ref()
            .map_or(fixed, |adaptive| adaptive.limit().min(fixed))
    }

    /// Whether it remembers nothing a fresh one would not: it may be forgotten.
    fn forgettable(&self, now: tokio::time::Instant) -> bool {
        self.busy == 0
            && self.waiting.is_empty()
            && self.hold_until.is_none_or(|until| until <= now)
            && self.rate.as_ref().is_none_or(|rate| rate.is_idle(now))
    }
}

/// Whether a batch for a target may start now.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// It starts (as the probe of a paused target if `probe`): its target's slot and its
    /// turns under the rate limits are taken.
    Go { probe: bool },
    /// The target has all the attempts it may have under way.
    Busy,
    /// Not before this time (a rate limit's next turn, a `Retry-After`, a pause).
    WaitUntil(tokio::time::Instant),
    /// Until the hub hears of a change to the target (a probe ends, an operator resumes it).
    Blocked,
}

/// Look at a target's gates and the instance's rate limit, then ask the hub-wide `endpoint`
/// state (asked last: a yes counts the attempt under way there); on [`Admission::Go`], take
/// them.
fn admit(
    state: &mut Target,
    instance_rate: &mut Option<RateGate>,
    limit: usize,
    endpoint: impl FnOnce() -> EndpointGate,
    now: tokio::time::Instant,
) -> Admission {
    if state.busy >= state.limit(limit) {
        return Admission::Busy;
    }
    let ready_at = [
        state.hold_until,
        state.rate.as_ref().map(|rate| rate.ready_at(now)),
        instance_rate.as_ref().map(|rate| rate.ready_at(now)),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(now);
    if ready_at > now {
        return Admission::WaitUntil(ready_at);
    }
    let probe = match endpoint() {
        EndpointGate::Go { probe } => probe,
        EndpointGate::WaitUntil(until) => return Admission::WaitUntil(until),
        EndpointGate::Blocked => return Admission::Blocked,
    };
    if let Some(rate) = &mut state.rate {
        rate.take(now);
    }
    if let Some(rate) = instance_rate {
        rate.take(now);
    }
    state.busy += 1;
    if let Some(adaptive) = &mut state.adaptive {
        adaptive.started(state.busy);
    }
    state.progressed = now;
    Admission::Go { probe }
}

/// Counts an attempt under way for as long as it lives, however it ends.
struct AttemptUnderWay(Arc<Lane>);

impl Drop for AttemptUnderWay {
    fn drop(&mut self) {
        if self.0.attempts.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

pub(super) struct Dispatcher {
    lane: Arc<Lane>,
    policy: BatchPolicy,
    /// What the lease task hands over.
    leases: mpsc::Receiver<Leased>,
    /// Batches still filling, one per group the destination names.
    open: HashMap<Option<String>, OpenBatch>,
    /// The open batches' deadlines, earliest first.
    deadlines: Deadlines,
    lifecycle: watch::Receiver<Lifecycle>,
    /// The most attempts at once to one target, if the destination names targets.
    per_target: Option<usize>,
    /// Each target's rate limit, if the destination gives one.
    per_target_rate: Option<RateLimit>,
    /// Whether each target's limit of attempts at once adapts (up to `per_target`).
    adaptive: bool,
    /// Whether the destination names targets (and they go through the hub's endpoints).
    named_targets: bool,
    /// Whether each sequence's sends go one attempt at a time, in the order accepted, a retry
    /// holding the ones behind it.
    ordered: bool,
    /// Of an ordered instance: the sequences with a batch out or waiting.
    sequences: HashMap<String, Sequence>,
    /// Targets whose hub-wide state changed (a pause over, a probe ended, an operator's
    /// resume), when the destination names targets.
    endpoint_changes: Option<broadcast::Receiver<EndpointKey>>,
    /// The whole instance's rate limit (`rate_limit`).
    instance_rate: Option<RateGate>,
    /// Whether batches go through the targets' gates (a limit of any kind is set).
    gated: bool,
    /// Targets with attempts under way or batches waiting, and what waits for them (the key
    /// `""` is the whole instance, for a destination that names no targets).
    targets: HashMap<String, Target>,
    /// When targets waiting for a time (a rate limit, `Retry-After`) may go, earliest first.
    wake_ups: BinaryHeap<Reverse<(tokio::time::Instant, String)>>,
    /// Envelopes waiting for a busy target, across targets.
    parked: usize,
    /// The attempts that ended, by target.
    target_done: mpsc::UnboundedReceiver<TargetDone>,
    /// When to look for stalled targets (while the waiting set is full).
    stall_check: Option<tokio::time::Instant>,
    /// Batches for stalled targets, to go back to the queue together.
    deferring: Vec<Deferral>,
    /// When an attempt to any target last ended.
    last_answer: tokio::time::Instant,
}

/// A batch still filling: flushed when full or when its deadline passes.
struct OpenBatch {
    envelopes: Vec<Envelope>,
    bytes: usize,
    deadline: tokio::time::Instant,
    /// Its number in [`Deadlines`]: a deadline left by an earlier batch of the same group is
    /// not this one's.
    opened: u64,
}

/// The deadlines of the open batches, earliest first (review C13: with thousands of groups
/// open, finding the due ones must not mean looking at every one). A batch that leaves full
/// leaves its deadline behind; it is skipped when it comes up, and the heap is rebuilt when
/// such leftovers outnumber the open batches.
#[derive(Default)]
struct Deadlines {
    heap: BinaryHeap<Reverse<(tokio::time::Instant, u64, Option<String>)>>,
    opened: u64,
}

impl Deadlines {
    /// A batch of `group` opened with this deadline; its number.
    fn add(&mut self, deadline: tokio::time::Instant, group: Option<String>) -> u64 {
        self.opened += 1;
        self.heap.push(Reverse((deadline, self.opened, group)));
        self.opened
    }

    /// The earliest deadline (perhaps of a batch gone already: an early wake-up, no more).
    fn next(&self) -> Option<tokio::time::Instant> {
        self.heap.peek().map(|Reverse((deadline, _, _))| *deadline)
    }

    /// The next deadline passed by `now`: its batch's number and group.
    fn pop_due(&mut self, now: tokio::time::Instant) -> Option<(u64, Option<String>)> {
        if self.next()? > now {
            return None;
        }
        let Reverse((_, opened, group)) = self.heap.pop()?;
        Some((opened, group))
    }

    fn clear(&mut self) {
        self.heap.clear();
    }

    /// The deadlines of `open` only.
    fn rebuild(&mut self, open: &HashMap<Option<String>, OpenBatch>) {
        self.heap = open
            .iter()
            .map(|(group, batch)| Reverse((batch.deadline, batch.opened, group.clone())))
            .collect();
    }

    /// Rebuild once leftovers outnumber the open batches, so memory follows what is open.
    fn compact(&mut self, open: &HashMap<Option<String>, OpenBatch>) {
        if self.heap.len() > 2 * open.len() + 1024 {
            self.rebuild(open);
        }
    }
}

impl Dispatcher {
    pub(super) fn start(
        hub: &Arc<HubShared>,
        name: &Arc<str>,
        settings: &InstanceSettings,
    ) -> JoinHandle<()> {
        let Some(instance) = hub.instances.get(name) else {
            return tokio::spawn(async {});
        };
        let destination = instance.destination.clone();
        let policy = destination.batch_policy().with_overrides(&settings.batch);
        let concurrency = settings
            .concurrency
            .unwrap_or(InstanceSettings::DEFAULT_CONCURRENCY)
            .min(destination.max_concurrency().unwrap_or(usize::MAX))
            .max(1);
        let ordered = destination.ordered();
        let per_target = destination.per_target_concurrency().map(|n| n.max(1));
        let per_target_rate = destination.per_target_rate_limit();
        let pause = instance.pause;
        let adaptive = per_target.is_some() && destination.adaptive_concurrency();
        let instance_rate = settings.rate_limit.as_ref().map(RateLimit::gate);
        let named_targets = per_target.is_some() || per_target_rate.is_some() || pause.is_some();
        // An ordered instance hears of each attempt's end, to send the next of its sequence.
        let gated = named_targets || instance_rate.is_some() || ordered;
        let (done_tx, target_done) = mpsc::unbounded_channel();
        let lane = Arc::new(Lane {
            name: name.clone(),
            destination,
            pause,
            retry: settings.retry,
            attempt_timeout: settings
                .attempt_timeout
                .unwrap_or(hub.config.attempt_timeout)
                .max(Duration::from_millis(1)),
            hub: hub.clone(),
            metrics: instance.metrics.clone(),
            consumer: instance.consumer.clone(),
            concurrency: Arc::new(Semaphore::new(concurrency)),
            durable: hub.queue.durability().is_durable(),
            attempts: AtomicUsize::new(0),
            idle: Notify::new(),
            target_done: done_tx,
        });
        let leases = lease_task(lane.consumer.clone());
        let dispatcher = Self {
            lane,
            policy,
            leases,
            open: HashMap::new(),
            deadlines: Deadlines::default(),
            lifecycle: hub.lifecycle.subscribe(),
            per_target,
            per_target_rate,
            adaptive,
            named_targets,
            ordered,
            sequences: HashMap::new(),
            endpoint_changes: named_targets.then(|| hub.endpoints.subscribe()),
            instance_rate,
            gated,
            targets: HashMap::new(),
            wake_ups: BinaryHeap::new(),
            parked: 0,
            target_done,
            stall_check: None,
            deferring: Vec::new(),
            last_answer: tokio::time::Instant::now(),
        };
        tokio::spawn(dispatcher.run())
    }

    async fn run(mut self) {
        let mut intake_open = true;
        loop {
            let wake_up = self.next_wake_up();
            tokio::select! {
                biased;
                // A freed target slot first: what waits for it starts before more is leased.
                Some(done) = self.target_done.recv() => self.target_freed(done).await,
                leased = self.leases.recv(), if intake_open && self.parked < PARKED_MAX => match leased {
                    Some(Leased::Retry(batch)) => self.retry_back(batch).await,
                    Some(Leased::Ready(envelopes)) => {
                        for envelope in envelopes {
                            self.push(envelope).await;
                        }
                    }
                    None => {
                        intake_open = false;
                        self.intake_closed().await;
                    }
                },
                () = sleep_until(self.stall_check), if self.stall_check.is_some() => self.defer_stalled().await,
                () = sleep_until(self.deadlines.next()), if self.deadlines.next().is_some() => self.flush_due().await,
                () = sleep_until(wake_up), if wake_up.is_some() => self.wake_due().await,
                changed = endpoint_changed(self.endpoint_changes.as_mut()) => self.endpoint_changed(changed).await,
                Ok(()) = self.lifecycle.changed() => {
                    let now = *self.lifecycle.borrow_and_update();
                    match now {
                        Lifecycle::Draining => self.due_now(),
                        Lifecycle::GivenUp => self.give_up_waiting().await,
                        _ => {}
                    }
                }
                () = self.lane.idle.notified(), if !intake_open => {}
            }
            if !self.deferring.is_empty() {
                let deferring = std::mem::take(&mut self.deferring);
                self.defer_all(deferring).await;
            }
            self.check_stalls_if_full();
            if !intake_open
                && self.open.is_empty()
                && self.parked == 0
                && self.lane.attempts.load(Ordering::Acquire) == 0
            {
                break;
            }
        }
    }

    /// The queue leases no more: what is still filling was leased already, so it goes out now,
    /// as a batch under way (given up on at the deadline: dead-lettered by a memory queue, kept
    /// by a durable one).
    async fn intake_closed(&mut self) {
        self.deadlines.clear();
        let open: Vec<Vec<Envelope>> = self.open.drain().map(|(_, b)| b.envelopes).collect();
        for envelopes in open {
            self.deliver(envelopes).await;
        }
    }

    /// Which group a payload batches in; a destination that panics here batches it in the
    /// default group rather than taking the dispatcher down.
    fn group_of(&self, envelope: &Envelope) -> Option<String> {
        self.ask(
            envelope,
            "a batch group; the send is batched in the default group",
            |d, p| d.batch_group(p),
        )
    }

    /// Which target a batch goes to, when the destination limits attempts per target; one
    /// that panics naming it delivers the batch without a target's limit.
    fn target_of(&self, envelopes: &[Envelope]) -> Option<String> {
        if !self.named_targets {
            return None;
        }
        self.ask(envelopes.first()?, "a target", |d, p| d.target(p))
    }

    /// The sequence a batch keeps its place in, when the instance is ordered; one that panics
    /// naming it keeps no order for the batch.
    fn sequence_of(&self, envelopes: &[Envelope]) -> Option<String> {
        if !self.ordered {
            return None;
        }
        self.ask(
            envelopes.first()?,
            "a sequence; the batch keeps no order",
            |d, p| d.sequence(p),
        )
    }

    /// Ask the destination to name something of a payload (its group, target, sequence); a
    /// destination that panics answers nothing, logged, rather than taking the dispatcher down.
    fn ask(
        &self,
        envelope: &Envelope,
        naming: &str,
        hook: impl FnOnce(&dyn Destination, &[u8]) -> Option<String>,
    ) -> Option<String> {
        let destination = &*self.lane.destination;
        std::panic::catch_unwind(AssertUnwindSafe(|| hook(destination, &envelope.payload)))
            .unwrap_or_else(|_| {
                tracing::error!(destination = %self.name(), id = %envelope.id, "the destination panicked naming {naming}");
                None
            })
    }

    fn name(&self) -> &str {
        &self.lane.name
    }

    fn draining(&self) -> bool {
        *self.lifecycle.borrow() >= Lifecycle::Draining
    }

    fn given_up(&self) -> bool {
        *self.lifecycle.borrow() == Lifecycle::GivenUp
    }

    async fn push(&mut self, envelope: Envelope) {
        if self.policy.max_age.is_zero() || self.policy.max_events <= 1 {
            return self.deliver(vec![envelope]).await;
        }
        let group = self.group_of(&envelope);
        let draining = self.draining();
        let mut entry = match self.open.entry(group) {
            Entry::Occupied(entry) => entry,
            Entry::Vacant(vacant) => {
                // Draining: a batch takes what is ready now and goes as soon as nothing more is.
                let wait = if draining {
                    Duration::ZERO
                } else {
                    self.policy.max_age
                };
                let deadline = tokio::time::Instant::now() + wait;
                let opened = self.deadlines.add(deadline, vacant.key().clone());
                vacant.insert_entry(OpenBatch {
                    envelopes: Vec::new(),
                    bytes: 0,
                    deadline,
                    opened,
                })
            }
        };
        let open = entry.get_mut();
        open.bytes += envelope.size();
        open.envelopes.push(envelope);
        if self.policy.is_full(open.envelopes.len(), open.bytes) {
            // Its deadline stays behind in `deadlines`, recognised as stale when it comes up.
            let full = entry.remove();
            self.deadlines.compact(&self.open);
            self.deliver(full.envelopes).await;
        }
        // The loop looks at the queue before deadlines: while a backlog lasts, batches that
        // came of age go out from here, not after the backlog.
        if !draining
            && self
                .deadlines
                .next()
                .is_some_and(|deadline| deadline <= tokio::time::Instant::now())
        {
            self.flush_due().await;
        }
    }

    /// Shutdown began: every open batch is due now. The loop still takes what the queue holds
    /// ready first (it is polled before deadlines), so batches stay as full as they can be.
    fn due_now(&mut self) {
        let now = tokio::time::Instant::now();
        for open in self.open.values_mut() {
            open.deadline = now;
        }
        self.deadlines.rebuild(&self.open);
    }

    /// Deliver every open batch whose deadline has passed: the cost is the batches due (and
    /// the stale deadlines of batches that left full), not the batches open.
    async fn flush_due(&mut self) {
        let now = tokio::time::Instant::now();
        let mut due = Vec::new();
        while let Some((opened, group)) = self.deadlines.pop_due(now) {
            if let Entry::Occupied(entry) = self.open.entry(group)
                && entry.get().opened == opened
            {
                due.push(entry.remove().envelopes);
            }
        }
        self.deadlines.compact(&self.open);
        for envelopes in due {
            self.deliver(envelopes).await;
        }
    }

    /// Deliver a batch: behind what came before it in its sequence (of an ordered instance),
    /// then at once if its target's gates allow (a free slot, its turn under the rate limits,
    /// no `Retry-After` in force), else once they do — without holding an instance slot
    /// meanwhile.
    async fn deliver(&mut self, envelopes: Vec<Envelope>) {
        let sequence = self.sequence_of(&envelopes).filter(|_| !self.given_up());
        let Some(key) = sequence else {
            return self.through_target_gates(envelopes, None).await;
        };
        let now = tokio::time::Instant::now();
        self.parked += envelopes.len();
        self.sequences
            .entry(key.clone())
            .or_insert_with(|| Sequence::new(now))
            .behind
            .push_back(envelopes);
        self.next_in_sequence(&key).await;
    }

    /// Send a sequence's next batch to its target, if its turn has come.
    async fn next_in_sequence(&mut self, key: &str) {
        let Some(sequence) = self.sequences.get_mut(key) else {
            return;
        };
        let Some(next) = sequence.next() else {
            if sequence.is_empty() {
                self.sequences.remove(key);
            }
            return;
        };
        sequence.out = true;
        sequence.progressed = tokio::time::Instant::now();
        self.parked -= next.len();
        self.through_target_gates(next, Some(key.to_owned())).await;
    }

    /// Deliver a batch as far as its target's gates allow.
    async fn through_target_gates(&mut self, envelopes: Vec<Envelope>, sequence: Option<String>) {
        if !self.gated {
            return self.begin(envelopes, None, false, None).await;
        }
        let key = self.target_of(&envelopes).unwrap_or_default();
        let now = tokio::time::Instant::now();
        let limit = self.per_target.unwrap_or(usize::MAX);
        let adaptive = self.adaptive.then_some(limit);
        // Only while other targets move: when none does, there is nothing better to lease for,
        // and what waits stays put (the waiting set's bound stops leasing) rather than cycle
        // through the queue.
        let may_defer = !self.ordered && !self.draining() && now - self.last_answer < STALLED_AFTER;
        let state = match self.targets.get_mut(&key) {
            Some(state) => state,
            None => self
                .targets
                .entry(key.clone())
                .or_insert_with(|| Target::new(now, self.per_target_rate.as_ref(), adaptive)),
        };
        // Nothing waits ahead of it and the gates are open: it starts now (the usual case).
        let mut ready_at = state.wake;
        if state.waiting.is_empty() {
            let lane = &self.lane;
            let endpoint = || lane.enter(&key, now);
            match admit(state, &mut self.instance_rate, limit, endpoint, now) {
                Admission::Go { probe } => {
                    return self.begin(envelopes, Some(key), probe, sequence).await;
                }
                Admission::WaitUntil(at) => ready_at = Some(at),
                Admission::Busy | Admission::Blocked => {}
            }
        }
        // A target that has not moved for a while (an attempt hanging on a host that never
        // answers, a long pause) gets no room among the waiting: what comes for it goes back
        // to the queue at once, unattempted, so that it cannot crowd out the other targets.
        // (An ordered instance keeps its order in memory instead.)
        let stalled_for = now - state.progressed;
        let wait = match ready_at {
            Some(at) if at > now + STALLED_AFTER => Some(at - now),
            // Twice as long as it has stalled: a host dark for long is asked about less often.
            _ if state.busy > 0 && stalled_for >= STALLED_AFTER => Some(stalled_for * 2),
            _ => None,
        };
        if let Some(wait) = wait
            && may_defer
        {
            self.deferring.push(Deferral {
                envelopes,
                target: key,
                stalled: wait,
                at_least: Duration::ZERO,
            });
            return;
        }
        self.parked += envelopes.len();
        state.waiting.push_back(Waiting {
            envelopes,
            sequence,
        });
        self.start_waiting(&key).await;
    }

    /// With the waiting set full (leasing stops), look for stalled targets and sequences soon.
    fn check_stalls_if_full(&mut self) {
        if self.parked >= PARKED_MAX && self.stall_check.is_none() && !self.draining() {
            self.stall_check = Some(tokio::time::Instant::now() + STALLED_AFTER);
        }
    }

    /// A batch back from the queue for its retry. Its sequence awaits it in its place (ahead
    /// of all behind it); anything else is delivered like a new batch.
    async fn retry_back(&mut self, envelopes: Vec<Envelope>) {
        if let Some(key) = self.sequence_of(&envelopes)
            && let Some(first) = envelopes.first().map(|e| e.id)
            && let Some(sequence) = self.sequences.get_mut(&key)
            && let Some(slot) = sequence
                .returning
                .iter_mut()
                .find(|r| r.back.is_none() && r.ids.contains(&first))
        {
            self.parked += envelopes.len();
            slot.back = Some(envelopes);
            return self.next_in_sequence(&key).await;
        }
        self.deliver(envelopes).await;
    }

    /// Start what waits for `key`, in order, as far as its gates allow; a batch held back
    /// until a time sets a wake-up for it.
    async fn start_waiting(&mut self, key: &str) {
        let limit = self.per_target.unwrap_or(usize::MAX);
        loop {
            let now = tokio::time::Instant::now();
            let Some(state) = self.targets.get_mut(key) else {
                return;
            };
            if state.waiting.is_empty() {
                if state.forgettable(now) {
                    self.targets.remove(key);
                }
                return;
            }
            let lane = &self.lane;
            let endpoint = || lane.enter(key, now);
            let probe = match admit(state, &mut self.instance_rate, limit, endpoint, now) {
                // An attempt that ends starts the next; a change to the target is heard.
                Admission::Busy | Admission::Blocked => return,
                Admission::WaitUntil(ready_at) => {
                    if state.wake.is_none_or(|wake| wake > ready_at) {
                        state.wake = Some(ready_at);
                        self.wake_ups.push(Reverse((ready_at, key.to_owned())));
                    }
                    return;
                }
                Admission::Go { probe } => probe,
            };
            let Some(next) = state.waiting.pop_front() else {
                return;
            };
            self.parked -= next.envelopes.len();
            self.begin(next.envelopes, Some(key.to_owned()), probe, next.sequence)
                .await;
        }
    }

    fn next_wake_up(&self) -> Option<tokio::time::Instant> {
        self.wake_ups.peek().map(|Reverse((at, _))| *at)
    }

    /// Targets whose wait is over: start what waits for them.
    async fn wake_due(&mut self) {
        let now = tokio::time::Instant::now();
        let mut due = Vec::new();
        while let Some(Reverse((at, _))) = self.wake_ups.peek()
            && *at <= now
        {
            if let Some(Reverse((at, key))) = self.wake_ups.pop() {
                if let Some(state) = self.targets.get_mut(&key)
                    && state.wake == Some(at)
                {
                    state.wake = None;
                }
                due.push(key);
            }
        }
        due.dedup();
        for key in due {
            self.start_waiting(&key).await;
        }
    }

    /// The shutdown deadline passed: what still waits for its turn is given up on (kept by a
    /// durable queue, dead-lettered with the reason by a memory one).
    async fn give_up_waiting(&mut self) {
        let mut waiting: Vec<Vec<Envelope>> = self
            .targets
            .values_mut()
            .flat_map(|state| state.waiting.drain(..).map(|w| w.envelopes))
            .collect();
        // Order no longer matters: nothing more is attempted. What comes after (a lease already
        // in hand) goes straight to be given up, not behind a batch whose end never comes.
        for (_, sequence) in self.sequences.drain() {
            waiting.extend(sequence.returning.into_iter().filter_map(|r| r.back));
            waiting.extend(sequence.behind);
        }
        self.wake_ups.clear();
        for envelopes in waiting {
            self.parked -= envelopes.len();
            self.lane
                .give_up(
                    envelopes,
                    "the shutdown deadline passed before its turn came",
                )
                .await;
        }
    }

    /// The waiting set stayed full: targets without an attempt ending for [`STALLED_AFTER`]
    /// give back what waits for them, so that leasing, stopped, can go on for the others.
    async fn defer_stalled(&mut self) {
        let now = tokio::time::Instant::now();
        self.stall_check = None;
        if self.parked < PARKED_MAX || self.draining() {
            return;
        }
        let stalled: Vec<String> = self
            .targets
            .iter()
            .filter(|(_, t)| !t.waiting.is_empty() && now - t.progressed >= STALLED_AFTER)
            .map(|(key, _)| key.clone())
            .collect();
        let mut deferred = Vec::new();
        for key in stalled {
            let Some(state) = self.targets.get_mut(&key) else {
                continue;
            };
            let stalled_for = now - state.progressed;
            for Waiting {
                envelopes,
                sequence,
            } in state.waiting.drain(..)
            {
                self.parked -= envelopes.len();
                if let Some(sequence) = sequence.and_then(|key| self.sequences.get_mut(&key)) {
                    // Back in its place when it returns: nothing behind it overtakes it.
                    sequence.went_back(envelopes.iter().map(|e| e.id).collect(), true, None);
                }
                deferred.push(Deferral {
                    envelopes,
                    target: key.clone(),
                    stalled: stalled_for,
                    at_least: Duration::ZERO,
                });
            }
        }
        // Sequences held by a batch gone back to the queue or still under way: what waits behind
        // it goes back too, awaited in its place, for as long as the sequence has not moved.
        for (key, sequence) in &mut self.sequences {
            // Waiting for a batch gone back to the queue, or for one under way that hangs.
            let stalled_for = now - sequence.progressed;
            let awaiting = sequence.returning.front().is_some_and(|r| r.back.is_none());
            if !(awaiting || sequence.out) || stalled_for < STALLED_AFTER {
                continue;
            }
            // Back already: it goes again, keeping its place.
            let mut again: Vec<Vec<Envelope>> = sequence
                .returning
                .iter_mut()
                .filter_map(|r| r.back.take())
                .collect();
            for envelopes in std::mem::take(&mut sequence.behind) {
                sequence.went_back(envelopes.iter().map(|e| e.id).collect(), false, None);
                again.push(envelopes);
            }
            // Nothing behind a retry goes before it: back no sooner than it is due (else they
            // come back early, only to be handed back again).
            let front_due = sequence.returning.front().and_then(|r| r.due);
            let at_least =
                front_due.map_or(Duration::ZERO, |due| due.saturating_duration_since(now));
            for envelopes in again {
                self.parked -= envelopes.len();
                deferred.push(Deferral {
                    envelopes,
                    target: key.clone(),
                    stalled: stalled_for,
                    at_least,
                });
            }
        }
        self.defer_all(deferred).await;
        if self.parked >= PARKED_MAX {
            // Still full of targets that progress: look again later.
            self.stall_check = Some(now + STALLED_AFTER);
        }
    }

    /// Hand batches for stalled targets back to the queue, settled together so that a store
    /// commits them in a few writes.
    async fn defer_all(&self, deferred: Vec<Deferral>) {
        let lane = &self.lane;
        futures::future::join_all(deferred.into_iter().map(|deferral| async move {
            lane.defer(deferral).await;
        }))
        .await;
    }

    /// An attempt to a target ended: adapt its limit, tell the hub what the target said (a
    /// named target is held, paused or resumed for every instance), and start what waits for
    /// it.
    async fn target_freed(&mut self, mut done: TargetDone) {
        let now = tokio::time::Instant::now();
        self.last_answer = now;
        let sequence = done.sequence.take();
        if let Some(sequence) = sequence
            .as_ref()
            .and_then(|key| self.sequences.get_mut(key))
        {
            sequence.progressed = now;
            if done.retried.is_empty() {
                sequence.out = false;
            } else {
                // The oldest of all: everything behind it waits until it is back.
                let due = done.retry_wait.map(|wait| now + wait);
                sequence.went_back(std::mem::take(&mut done.retried), true, due);
            }
        }
        // What the target said is recorded before the sequence's next batch meets its gates.
        self.target_ended(done, now).await;
        if let Some(key) = sequence {
            self.next_in_sequence(&key).await;
        }
    }

    /// The target's side of an attempt's end: its count, its limit, its hold, the hub's view of
    /// it, and what waits for it.
    async fn target_ended(&mut self, done: TargetDone, now: tokio::time::Instant) {
        let Some(state) = self.targets.get_mut(&done.target) else {
            return;
        };
        state.busy = state.busy.saturating_sub(1);
        state.progressed = now;
        if let Some(adaptive) = &mut state.adaptive {
            adaptive.ended(now, done.round_trip, done.said.pressure);
        }
        if done.target.is_empty() {
            if let Some(hold) = done.said.hold {
                let until = now + hold;
                state.hold_until = Some(state.hold_until.map_or(until, |held| held.max(until)));
            }
        } else {
            let end = AttemptEnd {
                instance: self.lane.name.clone(),
                health: done.said.health,
                probe: done.probe,
                hold: done.said.hold,
                error: done.said.error,
                limit: state.limit(self.per_target.unwrap_or(usize::MAX)),
            };
            self.lane
                .hub
                .endpoints
                .ended(self.lane.destination.kind(), &done.target, end, now);
        }
        self.start_waiting(&done.target).await;
    }

    /// The hub heard of a change to a target (or of so many that some were missed): start
    /// what waits for it here.
    async fn endpoint_changed(
        &mut self,
        changed: Result<EndpointKey, broadcast::error::RecvError>,
    ) {
        let keys: Vec<String> = match changed {
            Ok((kind, target)) => {
                if kind != self.lane.destination.kind() || !self.targets.contains_key(&target) {
                    return;
                }
                vec![target]
            }
            Err(broadcast::error::RecvError::Lagged(_)) => self
                .targets
                .iter()
                .filter(|(_, t)| !t.waiting.is_empty())
                .map(|(key, _)| key.clone())
                .collect(),
            Err(broadcast::error::RecvError::Closed) => {
                self.endpoint_changes = None;
                return;
            }
        };
        for key in keys {
            self.start_waiting(&key).await;
        }
    }

    /// Wait for a concurrency slot of the instance, then deliver in a task of its own.
    async fn begin(
        &mut self,
        envelopes: Vec<Envelope>,
        target: Option<String>,
        probe: bool,
        sequence: Option<String>,
    ) {
        let slot = target.filter(|_| self.gated).map(|target| TargetSlot {
            target,
            probe,
            started: tokio::time::Instant::now(),
            said: None,
            retried: Vec::new(),
            retry_wait: None,
            sequence,
            done: self.lane.target_done.clone(),
        });
        let permit = self.lane.concurrency.clone().acquire_owned().await;
        let Ok(instance) = permit else { return };
        let slots = Slots {
            _instance: instance,
            target: slot,
        };
        self.lane.attempts.fetch_add(1, Ordering::AcqRel);
        let under_way = AttemptUnderWay(self.lane.clone());
        tokio::spawn(async move {
            let lane = under_way.0.clone();
            lane.attempt(envelopes, slots).await;
            drop(under_way);
        });
    }
}

/// Lease from the queue in a task of its own, so that a lease is never cut short by the
/// dispatcher's other work; hands over one lease at a time.
fn lease_task(consumer: Arc<dyn QueueConsumer>) -> mpsc::Receiver<Leased> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Some(leased) = consumer.lease(LEASE).await {
            if let Err(returned) = tx.send(leased).await {
                // The dispatcher is gone: give the envelopes back.
                let (Leased::Ready(envelopes) | Leased::Retry(envelopes)) = returned.0;
                consumer.release(envelopes).await;
                return;
            }
        }
    });
    rx
}

/// The next change the hub heard of, if this dispatcher listens for any.
async fn endpoint_changed(
    changes: Option<&mut broadcast::Receiver<EndpointKey>>,
) -> Result<EndpointKey, broadcast::error::RecvError> {
    match changes {
        Some(changes) => changes.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Resolves once the hub gives up on deliveries under way (the shutdown deadline passed).
async fn given_up(mut lifecycle: watch::Receiver<Lifecycle>) {
    // An error means the hub is gone, which is giving up too.
    let _ = lifecycle.wait_for(|l| *l == Lifecycle::GivenUp).await;
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

impl Lane {
    /// Whether the hub lets an attempt go to a named target now (no `Retry-After` or pause in
    /// force); a target that is not named is not the hub's to hold.
    fn enter(&self, target: &str, now: tokio::time::Instant) -> EndpointGate {
        if target.is_empty() {
            return EndpointGate::Go { probe: false };
        }
        self.hub
            .endpoints
            .enter(self.destination.kind(), target, self.pause, now)
    }

    /// One delivery attempt of a batch, settled.
    async fn attempt(self: Arc<Self>, mut envelopes: Vec<Envelope>, mut slots: Slots) {
        let lifecycle = self.hub.lifecycle.subscribe();
        if *lifecycle.borrow() == Lifecycle::GivenUp {
            drop(slots);
            self.give_up(envelopes, "the shutdown deadline passed before delivery")
                .await;
            return;
        }
        for envelope in &mut envelopes {
            envelope.attempts += 1;
        }
        self.hub.queue.statuses().attempting(&envelopes);
        let count = envelopes.len();
        self.metrics.in_flight.increment(count as f64);
        self.metrics.batch_events.record(count as f64);
        let started = Instant::now();
        let started_at = SystemTime::now();
        let collector = Collector::new(&self.hub, envelopes.first().and_then(|e| e.run.clone()));
        // Lent, not cloned: the envelopes come back for the outcome.
        let batch = Batch::new(envelopes);
        let delivery =
            collector.scope(AssertUnwindSafe(self.destination.deliver(&batch)).catch_unwind());
        let mut said = None;
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(self.attempt_timeout, delivery) => Some(match outcome {
                Ok(Ok(outcome)) => outcome,
                // A destination (or a listener it calls) that panics must not take the batch
                // with it: the batch is retried like any transient failure.
                Ok(Err(panic)) => {
                    let what = panic_message(panic.as_ref());
                    tracing::error!(destination = %self.name, %what, "the destination panicked while delivering");
                    BatchOutcome::All(Report::retry(format!("the destination panicked while delivering: {what}")))
                }
                // A destination that never answers must not hold a delivery slot forever.
                Err(_) => {
                    let limit = humantime::format_duration(self.attempt_timeout);
                    tracing::warn!(destination = %self.name, %limit, count, "a delivery attempt was cut short at attempt_timeout");
                    let error = format!("the attempt did not end within attempt_timeout ({limit}); its result is unknown, so it is tried again");
                    said = Some(TargetSaid::timed_out(error.clone()));
                    BatchOutcome::All(Report::retry(error))
                }
            }),
            () = given_up(lifecycle) => None,
        };
        let envelopes = batch.into_envelopes();
        self.metrics.delivery_seconds.record(started.elapsed());
        self.metrics.in_flight.decrement(count as f64);
        // What the target said (a `Retry-After`, failing, pushing back) decides for every
        // batch for it.
        if let (Some(slot), Some(outcome)) = (&mut slots.target, &outcome) {
            slot.said = Some(said.unwrap_or_else(|| TargetSaid::of(outcome)));
        }
        let Some(outcome) = outcome else {
            drop(slots);
            self.give_up(
                envelopes,
                "the shutdown deadline passed during a delivery attempt; its result is unknown",
            )
            .await;
            return;
        };
        let mut settlement = self.judge(envelopes, outcome);
        settlement.attempted = Some(crate::attempts::Attempted {
            started_at,
            took: started.elapsed(),
        });
        if !self.durable
            && self.hub.lifecycle() >= Lifecycle::Stopping
            && let Some(retry) = settlement.retry.take()
        {
            // A memory queue that stopped cannot hold a retry.
            for mut settled in retry.sends {
                settled.error = Some(format!(
                    "the hub stopped before the next attempt was due; last error: {}",
                    settled.error.unwrap_or_default()
                ));
                settlement.dead.push(settled);
            }
        }
        if let (Some(slot), Some(retry)) = (&mut slots.target, &settlement.retry) {
            slot.retried = retry.sends.iter().map(|s| s.envelope.id).collect();
            slot.retry_wait = Some(retry.wait);
        }
        // The slots are free once the target answered: the next batch for it need not wait
        // for this settlement.
        drop(slots);
        self.observe_dead(&settlement, &collector);
        settlement.follow_ups = collector.take();
        self.settle(settlement).await;
    }

    /// Sort an attempt's reports into a settlement, deciding when failed sends are tried
    /// again.
    fn judge(&self, envelopes: Vec<Envelope>, outcome: BatchOutcome) -> Settlement {
        let count = envelopes.len();
        let mut settlement = Settlement::default();
        let mut failed = Vec::new();
        let mut retry_after = None;
        for (envelope, report) in envelopes.into_iter().zip(outcome.into_reports(count)) {
            match report.outcome {
                Outcome::Delivered => {
                    self.metrics.attempts_delivered.increment(1);
                    settlement.delivered.push(Settled {
                        envelope,
                        error: None,
                        response: report.response,
                    });
                }
                Outcome::Failed { error } => {
                    self.metrics.attempts_failed.increment(1);
                    Totals::add(&self.metrics.totals.failed_attempts, 1);
                    settlement.dead.push(Settled {
                        envelope,
                        error: Some(error),
                        response: report.response,
                    });
                }
                Outcome::Retry { error, after } => {
                    self.metrics.attempts_retry.increment(1);
                    Totals::add(&self.metrics.totals.failed_attempts, 1);
                    retry_after = retry_after.max(after);
                    failed.push(Settled {
                        envelope,
                        error: Some(error),
                        response: report.response,
                    });
                }
            }
        }
        // The instance's last error, for those watching (once per batch).
        if let Some(error) = failed
            .last()
            .or(settlement.dead.last())
            .and_then(|s| s.error.as_deref())
        {
            self.metrics.totals.failed_with(error);
        }
        if failed.is_empty() {
            return settlement;
        }
        // Envelopes that failed together are retried together, so a destination that writes
        // a batch as one object writes the same object again.
        let attempts = failed
            .iter()
            .map(|f| f.envelope.attempts)
            .max()
            .unwrap_or(0);
        let age = failed
            .iter()
            .map(|f| f.envelope.age())
            .max()
            .unwrap_or_default();
        match self.retry.decide(attempts, age, retry_after) {
            RetryDecision::RetryIn(wait) => {
                let at = SystemTime::now()
                    .checked_add(wait)
                    .unwrap_or_else(SystemTime::now);
                tracing::debug!(destination = %self.name, count = failed.len(), ?wait, "retry scheduled");
                settlement.retry = Some(RetryBatch {
                    sends: failed,
                    wait,
                    at,
                });
            }
            decision => {
                for mut settled in failed {
                    let error = settled.error.take().unwrap_or_default();
                    let reason = match decision {
                        RetryDecision::TooOld => format!(
                            "gave up after {} attempts: the next would start more than {} after the send; last error: {error}",
                            settled.envelope.attempts,
                            humantime::format_duration(self.retry.max_age)
                        ),
                        _ => format!(
                            "gave up after {} attempts; last error: {error}",
                            settled.envelope.attempts
                        ),
                    };
                    settled.error = Some(reason);
                    settlement.dead.push(settled);
                }
            }
        }
        settlement
    }

    /// Tell the observers of each dead letter; what they send joins the settlement.
    fn observe_dead(&self, settlement: &Settlement, collector: &Collector) {
        if settlement.dead.is_empty() {
            return;
        }
        let observers = self
            .hub
            .dead_letter_observers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let died_at = SystemTime::now();
        for settled in &settlement.dead {
            let reason = settled.error.clone().unwrap_or_default();
            tracing::warn!(destination = %self.name, id = %settled.envelope.id, attempts = settled.envelope.attempts, reason = %reason.escape_debug(), "dead-lettered");
            if observers.is_empty() {
                continue;
            }
            let letter = DeadLetter {
                envelope: settled.envelope.clone(),
                reason,
                died_at,
            };
            for observe in &observers {
                let observed = collector
                    .sync_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| observe(&letter))));
                if observed.is_err() {
                    tracing::error!(destination = %self.name, id = %letter.envelope.id, "a dead-letter observer panicked");
                }
            }
        }
    }

    /// Apply a settlement: the sends it made are counted before it lands and the room of those
    /// it finishes is given back after, so the queue never looks empty in between. A backend
    /// that fails to settle (a disk error) is asked again until it does, or the hub gives up.
    async fn settle(&self, mut settlement: Settlement) {
        let now = tokio::time::Instant::now();
        for envelope in &mut settlement.follow_ups {
            envelope.start_budget(now);
        }
        let made = self.hub.tally(&settlement.follow_ups);
        let frees_room = self.hub.settling_frees_room();
        if frees_room {
            self.hub.capacity.force(&made);
        }
        self.hub.count_accepted(&made);
        let finished = self.hub.tally(settlement.finished());
        // Counted before the statuses say so: whoever sees a send delivered finds it counted.
        self.metrics
            .delivered
            .increment(settlement.delivered.len() as u64);
        self.metrics.dead.increment(settlement.dead.len() as u64);
        let totals = &self.metrics.totals;
        Totals::add(&totals.delivered, settlement.delivered.len() as u64);
        Totals::add(&totals.dead, settlement.dead.len() as u64);
        let mut wait = Duration::from_millis(50);
        loop {
            match self.consumer.settle(&settlement).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::error!(destination = %self.name, %error, "could not record the outcome of a delivery attempt; trying again");
                    if self.hub.lifecycle() == Lifecycle::GivenUp {
                        // A durable queue delivers these again at the next start.
                        return;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        if frees_room {
            self.hub.capacity.release(&finished);
        }
    }

    /// Hand a batch for a busy or paused target back to the queue, due again after a wait as
    /// long as the target has gone without an attempt ending (1 s to 1 min), or later if it
    /// may not go sooner, its attempt count unchanged: it was not attempted.
    async fn defer(&self, deferral: Deferral) {
        let Deferral {
            envelopes,
            target,
            stalled,
            at_least,
        } = deferral;
        let wait = stalled
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
            .max(at_least);
        // Not an attempt, so no error: a send keeps its last attempt's error and answer (the
        // hold is the target's, shown by `GET /v1/endpoints`).
        tracing::debug!(destination = %self.name, count = envelopes.len(), %target, ?wait, "not attempted yet: deferred behind a busy or paused target");
        let sends = envelopes
            .into_iter()
            .map(|envelope| Settled {
                envelope,
                error: None,
                response: None,
            })
            .collect();
        let settlement = Settlement {
            retry: Some(RetryBatch {
                sends,
                wait,
                at: SystemTime::now()
                    .checked_add(wait)
                    .unwrap_or_else(SystemTime::now),
            }),
            ..Settlement::default()
        };
        self.settle(settlement).await;
    }

    /// The shutdown deadline passed with these envelopes in hand: a memory queue dead-letters
    /// them with the reason; a durable queue keeps them (the lease dies with the process).
    async fn give_up(&self, envelopes: Vec<Envelope>, reason: &str) {
        if self.durable {
            return;
        }
        self.hub.abandon(envelopes, reason).await;
    }
}
