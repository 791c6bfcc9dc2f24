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

/// Memory for envelopes waiting in the lines, shared by every instance. Each line may also
/// keep a small floor of its own whatever the others hold, so that one instance's backlog
/// does not send every other instance's fresh sends to disk and back.
pub(crate) struct Memory {
    budget: usize,
    floor: usize,
    used: AtomicUsize,
}

impl Memory {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget,
            floor: budget / 16,
            used: AtomicUsize::new(0),
        }
    }

    fn cost(envelope: &Envelope) -> usize {
        envelope.size() + ENVELOPE_COST
    }

    /// Take room for `envelope` in a line holding `line` bytes already, if there is some.
    fn take(&self, envelope: &Envelope, line: &mut usize) -> bool {
        let cost = Self::cost(envelope);
        let within_floor = *line + cost <= self.floor;
        let taken = within_floor
            || self
                .used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    used.checked_add(cost).filter(|total| *total <= self.budget)
                })
                .is_ok();
        if taken {
            if within_floor {
                self.used.fetch_add(cost, Ordering::AcqRel);
            }
            *line += cost;
        }
        taken
    }

    /// Take room for `envelope` whatever the budget says (it is in memory already).
    fn force(&self, envelope: &Envelope, line: &mut usize) {
        let cost = Self::cost(envelope);
        self.used.fetch_add(cost, Ordering::AcqRel);
        *line += cost;
    }

    fn give(&self, envelope: &Envelope, line: &mut usize) {
        let cost = Self::cost(envelope);
        *line = line.saturating_sub(cost);
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

/// Where a send is: its chunk and its place there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Slot {
    pub(crate) chunk: i64,
    pub(crate) index: u32,
}

#[derive(Default)]
struct LineState {
    /// Ready sends whose envelopes are in memory; all of them come before `spilled`.
    loaded: VecDeque<(Slot, Envelope)>,
    /// What `loaded` costs in [`Memory`].
    loaded_bytes: usize,
    /// Ready sends whose envelopes are on disk only, as runs of consecutive places in a chunk
    /// (a backlog of a million sends is a few thousand runs).
    spilled: Spilled,
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
    pub(crate) slots: Vec<Slot>,
}

/// What a lease takes next.
pub(crate) enum Next {
    /// Ready sends: those in memory, then those to read back.
    Ready(Vec<(Slot, Envelope)>, Vec<Slot>),
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

    /// Sends made ready, in order: kept in memory while the budget allows and nothing is
    /// spilled ahead of them (order is kept), by their place otherwise. Returns how many were
    /// kept in memory.
    pub(crate) fn push_ready(
        &self,
        sends: impl IntoIterator<Item = (Slot, Envelope)>,
        memory: &Memory,
    ) -> usize {
        let mut state = self.lock();
        let mut kept = 0;
        for (slot, envelope) in sends {
            let state = &mut *state;
            if state.spilled.is_empty() && memory.take(&envelope, &mut state.loaded_bytes) {
                state.loaded.push_back((slot, envelope));
                kept += 1;
            } else {
                state.spilled.push_back(slot);
            }
        }
        drop(state);
        self.wake.notify_one();
        kept
    }

    /// Sends ready on disk (the backlog found at start).
    pub(crate) fn push_spilled(&self, slot: Slot) {
        self.lock().spilled.push_back(slot);
    }

    /// Leased sends given back: first in line again.
    pub(crate) fn push_front(&self, sends: Vec<(Slot, Envelope)>, memory: &Memory) {
        let mut state = self.lock();
        for (slot, envelope) in sends.into_iter().rev() {
            memory.force(&envelope, &mut state.loaded_bytes);
            state.loaded.push_front((slot, envelope));
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Sends that could not be read back: first in line again.
    pub(crate) fn unspill(&self, slots: Vec<Slot>) {
        let mut state = self.lock();
        // They were taken from the front of `spilled`, after every loaded send.
        for slot in slots.into_iter().rev() {
            state.spilled.push_front(slot);
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
            if let Some((slot, envelope)) = state.loaded.pop_front() {
                memory.give(&envelope, &mut state.loaded_bytes);
                loaded.push((slot, envelope));
            } else if let Some(slot) = state.spilled.pop_front() {
                spilled.push(slot);
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

/// Places in chunks, in order, kept as runs of consecutive places of one chunk.
#[derive(Default)]
struct Spilled {
    /// (chunk, first place, places).
    runs: VecDeque<(i64, u32, u32)>,
}

impl Spilled {
    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn push_back(&mut self, slot: Slot) {
        if let Some((chunk, first, count)) = self.runs.back_mut()
            && *chunk == slot.chunk
            && first.checked_add(*count) == Some(slot.index)
        {
            *count += 1;
            return;
        }
        self.runs.push_back((slot.chunk, slot.index, 1));
    }

    fn push_front(&mut self, slot: Slot) {
        if let Some((chunk, first, count)) = self.runs.front_mut()
            && *chunk == slot.chunk
            && slot.index.checked_add(1) == Some(*first)
        {
            *first = slot.index;
            *count += 1;
            return;
        }
        self.runs.push_front((slot.chunk, slot.index, 1));
    }

    fn pop_front(&mut self) -> Option<Slot> {
        let (chunk, first, count) = self.runs.front_mut()?;
        let slot = Slot {
            chunk: *chunk,
            index: *first,
        };
        *first += 1;
        *count -= 1;
        if *count == 0 {
            self.runs.pop_front();
        }
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(chunk: i64, index: u32) -> Slot {
        Slot { chunk, index }
    }

    #[test]
    fn spilled_places_keep_their_order_in_runs() {
        let mut spilled = Spilled::default();
        for index in 0..100 {
            spilled.push_back(slot(1, index));
        }
        spilled.push_back(slot(2, 0));
        spilled.push_back(slot(1, 100));
        assert_eq!(spilled.runs.len(), 3, "one run per stretch of one chunk");
        assert_eq!(spilled.pop_front(), Some(slot(1, 0)));
        spilled.push_front(slot(1, 0));
        assert_eq!(spilled.runs.len(), 3, "given back: the run grows again");
        let order: Vec<Slot> = std::iter::from_fn(|| spilled.pop_front()).collect();
        assert_eq!(order.len(), 102);
        assert_eq!(order[99], slot(1, 99));
        assert_eq!(order[100], slot(2, 0));
        assert_eq!(order[101], slot(1, 100));
    }

    #[test]
    fn one_instances_backlog_leaves_the_others_fresh_sends_in_memory() {
        let envelope = || {
            Envelope::new(
                std::sync::Arc::from("d"),
                None,
                bytes::Bytes::from(vec![b'x'; 808]),
            )
        };
        // Room for 16 envelopes of 1 000 bytes in all: a line's floor is one of them.
        let memory = Memory::new(16 * (envelope().size() + ENVELOPE_COST));
        let (backlog, fresh) = (Lines::new(), Lines::new());
        let kept = backlog.push_ready((0..100).map(|n| (slot(1, n), envelope())), &memory);
        assert!(
            (16..100).contains(&kept),
            "the backlog fills the budget, then spills: {kept}"
        );
        assert_eq!(
            fresh.push_ready([(slot(2, 0), envelope())], &memory),
            1,
            "another instance's send stays in memory, within its floor"
        );
        assert_eq!(
            fresh.push_ready([(slot(2, 1), envelope())], &memory),
            0,
            "past its floor it spills like any other"
        );
    }
}
