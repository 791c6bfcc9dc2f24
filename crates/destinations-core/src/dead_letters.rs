//! Sends given up on, kept with the reason, listable and replayable.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde::Serialize;

use crate::envelope::{Envelope, EventId};

/// One send given up on.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The send as it was accepted.
    pub envelope: Envelope,
    /// Why it was given up on.
    pub reason: String,
    /// When.
    pub died_at: SystemTime,
}

/// A dead letter as listed by the API, with its payload as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterSummary {
    /// The send's id.
    pub id: EventId,
    /// The destination instance.
    pub destination: String,
    /// The run that sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// Why it was given up on.
    pub reason: String,
    /// When, RFC 3339.
    pub died_at: String,
    /// The payload.
    pub payload: serde_json::Value,
}

impl From<&DeadLetter> for DeadLetterSummary {
    fn from(d: &DeadLetter) -> Self {
        Self {
            id: d.envelope.id,
            destination: d.envelope.destination.to_string(),
            run: d.envelope.run.as_deref().map(str::to_owned),
            attempts: d.envelope.attempts,
            reason: d.reason.clone(),
            died_at: humantime::format_rfc3339_millis(d.died_at).to_string(),
            payload: serde_json::from_slice(&d.envelope.payload).unwrap_or_default(),
        }
    }
}

/// The most recent dead letters, up to a capacity (the oldest are dropped past it, and counted).
pub struct DeadLetters {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    letters: VecDeque<DeadLetter>,
    evicted: u64,
}

impl DeadLetters {
    /// A store that keeps up to `capacity` dead letters.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keep a dead letter.
    pub fn push(&self, letter: DeadLetter) {
        let mut inner = self.lock();
        inner.letters.push_back(letter);
        while inner.letters.len() > self.capacity {
            inner.letters.pop_front();
            inner.evicted += 1;
        }
    }

    /// The most recent `limit`, newest first.
    pub fn list(&self, limit: usize) -> Vec<DeadLetter> {
        self.lock()
            .letters
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.lock().letters.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many were dropped because the store was full.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    /// Take out the dead letters with these ids (all of them if `ids` is `None`), oldest first.
    pub fn take(&self, ids: Option<&[EventId]>) -> Vec<DeadLetter> {
        let mut inner = self.lock();
        let (taken, kept): (Vec<_>, Vec<_>) = inner
            .letters
            .drain(..)
            .partition(|d| ids.is_none_or(|ids| ids.contains(&d.envelope.id)));
        inner.letters = kept.into();
        taken
    }

    /// Put letters back (a replay that could not be enqueued).
    pub fn restore(&self, letters: Vec<DeadLetter>) {
        for letter in letters {
            self.push(letter);
        }
    }
}
