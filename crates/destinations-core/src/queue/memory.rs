//! The in-memory queue: fast, and lost when the process ends.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    DeadLetterStore, Durability, Leased, Queue, QueueConsumer, QueueDepth, QueueError, Refused,
    Settlement, StatusStore,
};
use crate::dead_letters::{DeadLetter, DeadLetters};
use crate::envelope::{Envelope, EventId};
use crate::status::{StatusBook, StatusRetention};

/// A queue in memory: per destination instance, a line of ready envelopes and a timer heap of
/// batches waiting for their retry; statuses and dead letters beside them.
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

/// What the queue and its consumers share.
struct Shared {
    instances: RwLock<HashMap<Arc<str>, Arc<InstanceQueue>>>,
    stopped: AtomicBool,
    statuses: StatusBook,
    dead_letters: DeadLetters,
}

impl Default for MemoryQueue {
    /// 100 000 finished statuses for up to a day, 10 000 dead letters.
    fn default() -> Self {
        Self::new(
            StatusRetention {
                count: 100_000,
                age: std::time::Duration::from_secs(24 * 3600),
            },
            10_000,
        )
    }
}

impl MemoryQueue {
    /// An empty queue that remembers finished statuses within `retention` and keeps up to
    /// `dead_letter_capacity` dead letters.
    pub fn new(retention: StatusRetention, dead_letter_capacity: usize) -> Self {
        Self::with_dead_letters(retention, DeadLetters::new(dead_letter_capacity))
    }

    /// An empty queue keeping its dead letters in `dead_letters` (to bound them in bytes too).
    pub fn with_dead_letters(retention: StatusRetention, dead_letters: DeadLetters) -> Self {
        Self {
            shared: Arc::new(Shared {
                instances: RwLock::new(HashMap::new()),
                stopped: AtomicBool::new(false),
                statuses: StatusBook::new(retention),
                dead_letters,
            }),
        }
    }
}

impl Shared {
    fn instances(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<InstanceQueue>>> {
        self.instances
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Push envelopes onto their instances' lines (their statuses are recorded first, so a
    /// dispatcher that delivers at once finds them). Envelopes of an unknown instance come
    /// back.
    fn push(&self, envelopes: Vec<Envelope>) -> Vec<Envelope> {
        self.statuses.queued(&envelopes);
        let instances = self.instances();
        let mut unknown = Vec::new();
        let mut current: Option<(Arc<str>, std::sync::MutexGuard<'_, Lines>, &InstanceQueue)> =
            None;
        for envelope in envelopes {
            let same = current
                .as_ref()
                .is_some_and(|(name, ..)| Arc::ptr_eq(name, &envelope.destination));
            if !same {
                if let Some((_, lines, queue)) = current.take() {
                    drop(lines);
                    queue.wake.notify_one();
                }
                match instances.get(&envelope.destination) {
                    Some(queue) => {
                        current = Some((envelope.destination.clone(), queue.lock(), queue));
                    }
                    None => {
                        unknown.push(envelope);
                        continue;
                    }
                }
            }
            if let Some((_, lines, _)) = current.as_mut() {
                lines.ready.push_back(envelope);
            }
        }
        if let Some((_, lines, queue)) = current {
            drop(lines);
            queue.wake.notify_one();
        }
        unknown
    }
}

/// One instance's share: what is ready, and what waits for a retry.
struct InstanceQueue {
    lines: Mutex<Lines>,
    /// Woken when something is pushed, or the queue stops.
    wake: Notify,
}

#[derive(Default)]
struct Lines {
    ready: VecDeque<Envelope>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    next_seq: u64,
    stopped: bool,
}

/// A batch waiting for its retry: ordered by when it is due, then by when it was scheduled.
struct Delayed {
    due: Instant,
    seq: u64,
    batch: Vec<Envelope>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

impl InstanceQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    fn durability(&self) -> Durability {
        Durability::Memory
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }

    fn consumer(&self, instance: &str) -> Result<Arc<dyn QueueConsumer>, QueueError> {
        let queue = Arc::new(InstanceQueue {
            lines: Mutex::new(Lines::default()),
            wake: Notify::new(),
        });
        self.shared
            .instances
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(instance.into(), queue.clone());
        Ok(Arc::new(MemoryConsumer {
            queue,
            shared: self.shared.clone(),
        }))
    }

    fn backlog(&self) -> Result<Vec<(String, QueueDepth)>, QueueError> {
        Ok(Vec::new())
    }

    async fn enqueue(&self, envelopes: Vec<Envelope>) -> Result<(), Refused> {
        let shared = &self.shared;
        if shared.stopped.load(Ordering::Acquire) {
            return Err(Refused {
                why: QueueError::Closed,
                envelopes,
            });
        }
        {
            let instances = shared.instances();
            if let Some(e) = envelopes
                .iter()
                .find(|e| !instances.contains_key(&e.destination))
            {
                return Err(Refused {
                    why: QueueError::NoConsumer(e.destination.to_string()),
                    envelopes,
                });
            }
        }
        let unknown = shared.push(envelopes);
        debug_assert!(unknown.is_empty(), "instances were checked");
        Ok(())
    }

    async fn replay(&self, ids: &[EventId]) -> Result<Vec<Envelope>, QueueError> {
        let shared = &self.shared;
        if shared.stopped.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let now = Instant::now();
        let envelopes: Vec<Envelope> = shared
            .dead_letters
            .take(ids)
            .into_iter()
            .map(|letter| {
                let mut envelope = letter.envelope;
                envelope.attempts = 0;
                envelope.restart_budget(now);
                envelope
            })
            .collect();
        let replayed = envelopes.clone();
        let unknown = shared.push(envelopes);
        // Letters of an instance this hub no longer has stay dead letters.
        for envelope in &unknown {
            shared.dead_letters.push(DeadLetter {
                envelope: envelope.clone(),
                reason: format!(
                    "not replayed: no destination instance `{}` is configured",
                    envelope.destination
                ),
                died_at: SystemTime::now(),
            });
        }
        Ok(replayed
            .into_iter()
            .filter(|e| !unknown.iter().any(|u| u.id == e.id))
            .collect())
    }

    async fn stop(&self) -> Vec<Envelope> {
        self.shared.stopped.store(true, Ordering::Release);
        let mut leftovers = Vec::new();
        for queue in self.shared.instances().values() {
            let mut lines = queue.lock();
            lines.stopped = true;
            leftovers.extend(lines.ready.drain(..));
            for Reverse(delayed) in lines.delayed.drain() {
                leftovers.extend(delayed.batch);
            }
            drop(lines);
            queue.wake.notify_waiters();
            queue.wake.notify_one();
        }
        leftovers
    }

    fn statuses(&self) -> &dyn StatusStore {
        &self.shared.statuses
    }

    fn dead_letters(&self) -> &dyn DeadLetterStore {
        &self.shared.dead_letters
    }
}

/// The consumer of one instance.
struct MemoryConsumer {
    queue: Arc<InstanceQueue>,
    shared: Arc<Shared>,
}

#[async_trait]
impl QueueConsumer for MemoryConsumer {
    async fn lease(&self, max: usize) -> Option<Leased> {
        loop {
            let woken = self.queue.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let next_due = {
                let mut lines = self.queue.lock();
                let now = Instant::now();
                if lines
                    .delayed
                    .peek()
                    .is_some_and(|Reverse(next)| next.due <= now)
                    && let Some(Reverse(due)) = lines.delayed.pop()
                {
                    return Some(Leased::Retry(due.batch));
                }
                if !lines.ready.is_empty() {
                    let take = max.max(1).min(lines.ready.len());
                    return Some(Leased::Ready(lines.ready.drain(..take).collect()));
                }
                if lines.stopped {
                    return None;
                }
                lines.delayed.peek().map(|Reverse(next)| next.due)
            };
            match next_due {
                Some(due) => {
                    tokio::select! {
                        () = &mut woken => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
                None => woken.await,
            }
        }
    }

    async fn settle(&self, settlement: &Settlement) -> Result<(), QueueError> {
        let shared = &self.shared;
        // Dead letters before statuses: whoever hears a send is dead finds its letter listed.
        let died_at = SystemTime::now();
        for settled in &settlement.dead {
            shared.dead_letters.push(DeadLetter {
                envelope: settled.envelope.clone(),
                reason: settled.error.clone().unwrap_or_default(),
                died_at,
            });
        }
        shared.statuses.settled(settlement);
        if let Some(retry) = &settlement.retry {
            let now = Instant::now();
            // A wait too long for the clock is as good as forever; the retry age ends it.
            let due = now
                .checked_add(retry.wait)
                .unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 86_400));
            let mut lines = self.queue.lock();
            let seq = lines.next_seq;
            lines.next_seq += 1;
            lines.delayed.push(Reverse(Delayed {
                due,
                seq,
                batch: retry.sends.iter().map(|s| s.envelope.clone()).collect(),
            }));
            drop(lines);
            self.queue.wake.notify_one();
        }
        if !settlement.follow_ups.is_empty() {
            if shared.stopped.load(Ordering::Acquire) {
                tracing::warn!(
                    sends = settlement.follow_ups.len(),
                    "sends made by a delivery after the memory queue stopped are dropped"
                );
                return Ok(());
            }
            let unknown = shared.push(settlement.follow_ups.clone());
            for envelope in unknown {
                tracing::warn!(id = %envelope.id, destination = %envelope.destination, "a send made while delivering names no destination instance; dropped");
            }
        }
        Ok(())
    }

    async fn release(&self, envelopes: Vec<Envelope>) {
        let mut lines = self.queue.lock();
        for envelope in envelopes.into_iter().rev() {
            lines.ready.push_front(envelope);
        }
        drop(lines);
        self.queue.wake.notify_one();
    }
}
