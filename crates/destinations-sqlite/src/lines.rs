//! What each instance has waiting, in memory beside the file: the rows ready for delivery (with
//! their envelopes while memory allows, by row number past it) and the batches waiting for a
//! retry. The file is the truth; this is its schedule, rebuilt from the file at every start.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use destinations_core::Envelope;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What an envelope held in memory costs beyond its payload (the envelope, its line slot).
const ENVELOPE_COST: usize = 192;

/// Memory for envelopes waiting in the lines, shared by every instance.
pub(crate) struct Memory {
    budget: usize,
    used: AtomicUsize,
}

impl Memory {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget,
            used: AtomicUsize::new(0),
        }
    }

    fn cost(envelope: &Envelope) -> usize {
        envelope.size() + ENVELOPE_COST
    }

    /// Take room for `envelope`, if there is some.
    fn take(&self, envelope: &Envelope) -> bool {
        let cost = Self::cost(envelope);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(cost).filter(|total| *total <= self.budget)
            })
            .is_ok()
    }

    /// Take room for `envelope` whatever the budget says (it is in memory already).
    fn force(&self, envelope: &Envelope) {
        self.used.fetch_add(Self::cost(envelope), Ordering::AcqRel);
    }

    fn give(&self, envelope: &Envelope) {
        let cost = Self::cost(envelope);
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(cost))
            });
    }
}

/// One instance's schedule.
pub(crate) struct Lines {
    state: Mutex<LineState>,
    /// Woken when something is added, or the queue stops.
    pub(crate) wake: Notify,
}

#[derive(Default)]
struct LineState {
    /// Ready rows whose envelopes are in memory; all of them come before `spilled`.
    loaded: VecDeque<(i64, Envelope)>,
    /// Ready rows whose envelopes are on disk only.
    spilled: VecDeque<i64>,
    /// Batches waiting for their retry.
    delayed: BinaryHeap<Reverse<Delayed>>,
    /// Whether a dispatcher consumes this instance.
    consumed: bool,
    stopped: bool,
}

/// A batch waiting for its retry, ordered by when it is due.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Delayed {
    pub(crate) due: Instant,
    pub(crate) batch: i64,
    pub(crate) seqs: Vec<i64>,
}

/// What a lease takes next.
pub(crate) enum Next {
    /// Ready rows: those in memory, then those to read back.
    Ready(Vec<(i64, Envelope)>, Vec<i64>),
    /// A batch whose retry is due.
    Retry(Delayed),
    /// Nothing yet; something is due at this time, if anything.
    Wait(Option<Instant>),
    /// The queue stopped.
    Stopped,
}

impl Lines {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(LineState::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A dispatcher consumes this instance from now on.
    pub(crate) fn consume(&self) {
        self.lock().consumed = true;
    }

    pub(crate) fn consumed(&self) -> bool {
        self.lock().consumed
    }

    /// Rows made ready, in order: kept in memory while the budget allows and nothing is
    /// spilled ahead of them (order is kept), by row number otherwise.
    pub(crate) fn push_ready(
        &self,
        rows: impl IntoIterator<Item = (i64, Envelope)>,
        memory: &Memory,
    ) {
        let mut state = self.lock();
        for (seq, envelope) in rows {
            if state.spilled.is_empty() && memory.take(&envelope) {
                state.loaded.push_back((seq, envelope));
            } else {
                state.spilled.push_back(seq);
            }
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Rows ready on disk (the backlog found at start).
    pub(crate) fn push_spilled(&self, seq: i64) {
        self.lock().spilled.push_back(seq);
    }

    /// Leased rows given back: first in line again.
    pub(crate) fn push_front(&self, rows: Vec<(i64, Envelope)>, memory: &Memory) {
        let mut state = self.lock();
        for (seq, envelope) in rows.into_iter().rev() {
            memory.force(&envelope);
            state.loaded.push_front((seq, envelope));
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Rows that could not be read back: first in line again.
    pub(crate) fn unspill(&self, seqs: Vec<i64>) {
        let mut state = self.lock();
        // They were taken from the front of `spilled`, after every loaded row.
        for seq in seqs.into_iter().rev() {
            state.spilled.push_front(seq);
        }
    }

    /// A batch to retry when it is due.
    pub(crate) fn delay(&self, delayed: Delayed) {
        self.lock().delayed.push(Reverse(delayed));
        self.wake.notify_one();
    }

    /// What to lease next, up to `max` rows.
    pub(crate) fn next(&self, max: usize, memory: &Memory) -> Next {
        let mut state = self.lock();
        if state.stopped {
            return Next::Stopped;
        }
        let now = Instant::now();
        if state
            .delayed
            .peek()
            .is_some_and(|Reverse(next)| next.due <= now)
            && let Some(Reverse(due)) = state.delayed.pop()
        {
            return Next::Retry(due);
        }
        if state.loaded.is_empty() && state.spilled.is_empty() {
            return Next::Wait(state.delayed.peek().map(|Reverse(next)| next.due));
        }
        let mut loaded = Vec::new();
        let mut spilled = Vec::new();
        while loaded.len() + spilled.len() < max.max(1) {
            if let Some((seq, envelope)) = state.loaded.pop_front() {
                memory.give(&envelope);
                loaded.push((seq, envelope));
            } else if let Some(seq) = state.spilled.pop_front() {
                spilled.push(seq);
            } else {
                break;
            }
        }
        Next::Ready(loaded, spilled)
    }

    /// Lease no more.
    pub(crate) fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_waiters();
        self.wake.notify_one();
    }
}
