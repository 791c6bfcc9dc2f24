//! One dispatcher per destination instance: pull → batch → deliver under a concurrency limit
//! → record the outcome → schedule retries → dead-letter after the retry budget.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::HubShared;
use crate::config::InstanceSettings;
use crate::dead_letters::DeadLetter;
use crate::destination::{Batch, BatchOutcome, Destination, Outcome, Report, ResponseSummary};
use crate::envelope::Envelope;
use crate::metrics::InstanceMetrics;
use crate::policy::{BatchPolicy, RetryDecision, RetryPolicy};
use crate::queue::QueueConsumer;
use crate::status::Transition;

/// What a dispatcher's delivery tasks share.
struct Lane {
    name: Arc<str>,
    destination: Arc<dyn Destination>,
    retry: RetryPolicy,
    hub: Arc<HubShared>,
    metrics: InstanceMetrics,
    concurrency: Arc<Semaphore>,
    /// Envelopes taken from the queue and not yet delivered or dead.
    outstanding: AtomicUsize,
    /// Signalled when `outstanding` drops to zero.
    drained: Notify,
    /// Envelopes whose retry is due, delivered again as the batch they failed in.
    retries: mpsc::UnboundedSender<Vec<Envelope>>,
}

pub(super) struct Dispatcher {
    lane: Arc<Lane>,
    policy: BatchPolicy,
    consumer: Box<dyn QueueConsumer>,
    due_retries: mpsc::UnboundedReceiver<Vec<Envelope>>,
    /// Batches still filling, one per group the destination names.
    open: HashMap<Option<String>, OpenBatch>,
    /// The earliest deadline among the open batches.
    next_deadline: Option<tokio::time::Instant>,
    /// Shutdown has begun: flush, and batch no more.
    draining: watch::Receiver<bool>,
    /// Whether the open batches were made due for the drain already.
    drain_applied: bool,
}

/// A batch still filling: flushed when full or when its deadline passes.
struct OpenBatch {
    envelopes: Vec<Envelope>,
    bytes: usize,
    deadline: tokio::time::Instant,
}

impl Dispatcher {
    pub(super) fn start(
        hub: &Arc<HubShared>,
        name: Arc<str>,
        destination: Arc<dyn Destination>,
        settings: &InstanceSettings,
        metrics: InstanceMetrics,
    ) -> JoinHandle<()> {
        let (retries, due_retries) = mpsc::unbounded_channel();
        let consumer = hub.queue.consumer(&name);
        let policy = destination.batch_policy().with_overrides(&settings.batch);
        let concurrency = settings
            .concurrency
            .unwrap_or(InstanceSettings::DEFAULT_CONCURRENCY)
            .min(destination.max_concurrency().unwrap_or(usize::MAX))
            .max(1);
        let lane = Arc::new(Lane {
            name,
            destination,
            retry: settings.retry,
            hub: hub.clone(),
            metrics,
            concurrency: Arc::new(Semaphore::new(concurrency)),
            outstanding: AtomicUsize::new(0),
            drained: Notify::new(),
            retries,
        });
        let dispatcher = Self {
            consumer,
            lane,
            policy,
            due_retries,
            open: HashMap::new(),
            next_deadline: None,
            draining: hub.draining.subscribe(),
            drain_applied: false,
        };
        tokio::spawn(dispatcher.run())
    }

    async fn run(mut self) {
        let mut intake_open = true;
        loop {
            tokio::select! {
                biased;
                Some(batch) = self.due_retries.recv() => self.deliver(batch).await,
                next = self.consumer.next(), if intake_open => match next {
                    Some(envelope) => {
                        self.lane.outstanding.fetch_add(1, Ordering::AcqRel);
                        self.push(envelope).await;
                    }
                    None => {
                        intake_open = false;
                        self.flush_all().await;
                    }
                },
                () = sleep_until(self.next_deadline), if self.next_deadline.is_some() => self.flush_due().await,
                Ok(()) = self.draining.changed(), if !self.drain_applied => {
                    if *self.draining.borrow_and_update() {
                        self.drain_applied = true;
                        self.due_now();
                    }
                }
                () = self.lane.drained.notified(), if !intake_open => {}
            }
            if !intake_open
                && self.open.is_empty()
                && self.lane.outstanding.load(Ordering::Acquire) == 0
            {
                break;
            }
        }
    }

    async fn push(&mut self, envelope: Envelope) {
        if self.policy.max_age.is_zero() || self.policy.max_events <= 1 {
            return self.deliver(vec![envelope]).await;
        }
        let group = self.lane.destination.batch_group(&envelope.payload);
        let mut entry = match self.open.entry(group) {
            Entry::Occupied(entry) => entry,
            Entry::Vacant(vacant) => {
                // Draining: a batch takes what is ready now and goes as soon as nothing more is.
                let wait = if *self.draining.borrow() {
                    Duration::ZERO
                } else {
                    self.policy.max_age
                };
                let deadline = tokio::time::Instant::now() + wait;
                if self.next_deadline.is_none_or(|next| deadline < next) {
                    self.next_deadline = Some(deadline);
                }
                vacant.insert_entry(OpenBatch {
                    envelopes: Vec::new(),
                    bytes: 0,
                    deadline,
                })
            }
        };
        let open = entry.get_mut();
        open.bytes += envelope.size();
        open.envelopes.push(envelope);
        if self.policy.is_full(open.envelopes.len(), open.bytes) {
            // A stale `next_deadline` only wakes `flush_due` early, which then recomputes it.
            let full = entry.remove();
            self.deliver(full.envelopes).await;
        }
        // The loop looks at the queue before deadlines: while a backlog lasts, batches that
        // came of age go out from here, not after the backlog.
        if !*self.draining.borrow()
            && self
                .next_deadline
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
        if !self.open.is_empty() {
            self.next_deadline = Some(now);
        }
    }

    /// Deliver every open batch whose deadline has passed.
    async fn flush_due(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<_> = self
            .open
            .extract_if(|_, open| open.deadline <= now)
            .map(|(_, open)| open.envelopes)
            .collect();
        self.next_deadline = self.open.values().map(|open| open.deadline).min();
        for envelopes in due {
            self.deliver(envelopes).await;
        }
    }

    /// Deliver every open batch, full or not (the intake closed).
    async fn flush_all(&mut self) {
        self.next_deadline = None;
        let open = std::mem::take(&mut self.open);
        for (_, batch) in open {
            self.deliver(batch.envelopes).await;
        }
    }

    /// Wait for a concurrency slot, then deliver in a task of its own.
    async fn deliver(&self, envelopes: Vec<Envelope>) {
        let permit = self.lane.concurrency.clone().acquire_owned().await;
        let Ok(permit) = permit else { return };
        tokio::spawn(self.lane.clone().deliver(envelopes, permit));
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Resolves once the hub gives up on pending work (the shutdown deadline passed).
async fn given_up(mut give_up: watch::Receiver<bool>) {
    // An error means the hub is gone, which is giving up too.
    let _ = give_up.wait_for(|gave_up| *gave_up).await;
}

impl Lane {
    async fn deliver(self: Arc<Self>, mut envelopes: Vec<Envelope>, permit: OwnedSemaphorePermit) {
        let give_up = self.hub.give_up.subscribe();
        if *give_up.borrow() {
            drop(permit);
            self.abandon(envelopes, "the shutdown deadline passed before delivery");
            return;
        }
        for envelope in &mut envelopes {
            envelope.attempts += 1;
            self.hub.status.apply(envelope.id, Transition::Attempting);
        }
        let count = envelopes.len();
        self.metrics.in_flight.increment(count as f64);
        self.metrics.batch_events.record(count as f64);
        let started = Instant::now();
        // Lent, not cloned: the envelopes come back for the outcome.
        let batch = Batch::new(envelopes);
        let outcome = tokio::select! {
            // A destination (or a listener it calls) that panics must not take the batch with
            // it: the batch is retried like any transient failure.
            outcome = std::panic::AssertUnwindSafe(self.destination.deliver(&batch)).catch_unwind() => Some(
                outcome.unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(destination = %self.name, %what, "the destination panicked while delivering");
                    BatchOutcome::All(Report::retry(format!("the destination panicked while delivering: {what}")))
                }),
            ),
            () = given_up(give_up) => None,
        };
        let envelopes = batch.into_envelopes();
        self.metrics.delivery_seconds.record(started.elapsed());
        self.metrics.in_flight.decrement(count as f64);
        drop(permit);
        let Some(outcome) = outcome else {
            self.abandon(
                envelopes,
                "the shutdown deadline passed during a delivery attempt; its result is unknown",
            );
            return;
        };
        let mut failed_transiently = Vec::new();
        for (envelope, report) in envelopes.into_iter().zip(outcome.into_reports(count)) {
            match report.outcome {
                Outcome::Delivered => {
                    self.metrics.attempts_delivered.increment(1);
                    self.delivered(&envelope, report.response);
                }
                Outcome::Failed { error } => {
                    self.metrics.attempts_failed.increment(1);
                    self.dead(envelope, error, report.response);
                }
                Outcome::Retry { error, after } => {
                    self.metrics.attempts_retry.increment(1);
                    failed_transiently.push((envelope, error, after, report.response));
                }
            }
        }
        if !failed_transiently.is_empty() {
            self.schedule_retry(failed_transiently);
        }
    }

    fn delivered(&self, envelope: &Envelope, response: Option<ResponseSummary>) {
        self.hub
            .status
            .apply(envelope.id, Transition::Delivered(response));
        self.metrics.delivered.increment(1);
        self.hub.queue.settle(envelope);
        self.finished();
    }

    /// Envelopes that failed together are retried together, so a destination that writes a
    /// batch as one object writes the same object again.
    fn schedule_retry(
        self: &Arc<Self>,
        failed: Vec<(Envelope, String, Option<Duration>, Option<ResponseSummary>)>,
    ) {
        let now = SystemTime::now();
        let attempts = failed.iter().map(|f| f.0.attempts).max().unwrap_or(0);
        let age = failed
            .iter()
            .filter_map(|f| now.duration_since(f.0.created_at).ok())
            .max()
            .unwrap_or_default();
        let retry_after = failed.iter().filter_map(|f| f.2).max();
        let wait = match self.retry.decide(attempts, age, retry_after) {
            RetryDecision::RetryIn(wait) => wait,
            decision => {
                for (envelope, error, _, response) in failed {
                    let reason = match decision {
                        RetryDecision::TooOld => format!(
                            "gave up after {} attempts: the next would start more than {} after the send; last error: {error}",
                            envelope.attempts,
                            humantime::format_duration(self.retry.max_age)
                        ),
                        _ => format!(
                            "gave up after {} attempts; last error: {error}",
                            envelope.attempts
                        ),
                    };
                    self.dead(envelope, reason, response);
                }
                return;
            }
        };
        let next_attempt_at = now + wait;
        let mut envelopes = Vec::with_capacity(failed.len());
        let mut last_error = String::new();
        for (envelope, error, _, response) in failed {
            self.hub.status.apply(
                envelope.id,
                Transition::Retrying {
                    error: error.clone(),
                    response,
                    next_attempt_at,
                },
            );
            last_error = error;
            envelopes.push(envelope);
        }
        tracing::debug!(destination = %self.name, count = envelopes.len(), ?wait, error = %last_error, "retry scheduled");
        let lane = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(wait) => {
                    if let Err(returned) = lane.retries.send(envelopes) {
                        lane.abandon(returned.0, "the dispatcher stopped before the retry was due");
                    }
                }
                () = given_up(lane.hub.give_up.subscribe()) => {
                    let reason = format!("the shutdown deadline passed while waiting to retry; last error: {last_error}");
                    lane.abandon(envelopes, &reason);
                }
            }
        });
    }

    fn abandon(&self, envelopes: Vec<Envelope>, reason: &str) {
        self.hub
            .abandoned
            .fetch_add(envelopes.len(), Ordering::AcqRel);
        for envelope in envelopes {
            self.dead(envelope, reason.to_owned(), None);
        }
    }

    fn dead(&self, envelope: Envelope, reason: String, response: Option<ResponseSummary>) {
        tracing::warn!(destination = %self.name, id = %envelope.id, attempts = envelope.attempts, %reason, "dead-lettered");
        self.hub.status.apply(
            envelope.id,
            Transition::Dead {
                error: reason.clone(),
                response,
            },
        );
        self.metrics.dead.increment(1);
        let letter = DeadLetter {
            envelope,
            reason,
            died_at: SystemTime::now(),
        };
        // Observers first, settle last: what they send (`$errors`) is queued before shutdown
        // can see this send settled and the queue empty.
        for observe in self
            .hub
            .dead_letter_observers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let observed =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| observe(&letter)));
            if observed.is_err() {
                tracing::error!(destination = %self.name, id = %letter.envelope.id, "a dead-letter observer panicked");
            }
        }
        self.hub.queue.settle(&letter.envelope);
        self.hub.dead_letters.push(letter);
        self.finished();
    }

    fn finished(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_one();
            self.hub.quiet.notify_waiters();
        }
    }
}
