//! Where each send is: queued, in flight, delivered, retrying, or dead — kept bounded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::destination::ResponseSummary;
use crate::envelope::{Envelope, EventId, IdMap};

/// The state of one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its dispatcher.
    Queued,
    /// A delivery attempt is under way.
    InFlight,
    /// The target accepted it.
    Delivered,
    /// An attempt failed; another is scheduled.
    Retrying,
    /// Given up on; kept with the reason in the dead letters.
    Dead,
}

impl State {
    /// Whether nothing more will happen to the send.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Delivered | Self::Dead)
    }
}

/// Everything known about one send.
#[derive(Clone, Debug, Serialize)]
pub struct SendStatus {
    /// The send's id.
    pub id: EventId,
    /// The destination instance.
    pub destination: Arc<str>,
    /// The run that sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<Arc<str>>,
    /// Where it is.
    pub state: State,
    /// Delivery attempts made.
    pub attempts: u32,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// The target's answer to the last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseSummary>,
    /// When it was sent.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    /// When its state last changed.
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: SystemTime,
    /// When the next attempt is due, while retrying.
    #[serde(
        serialize_with = "rfc3339_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt_at: Option<SystemTime>,
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn rfc3339_option<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// A change to a send's status.
#[derive(Clone, Debug)]
pub enum Transition {
    /// An attempt starts.
    Attempting,
    /// Delivered.
    Delivered(Option<ResponseSummary>),
    /// Failed; another attempt at this time.
    Retrying {
        /// What went wrong.
        error: String,
        /// The target's answer.
        response: Option<ResponseSummary>,
        /// When the next attempt is due.
        next_attempt_at: SystemTime,
    },
    /// Given up.
    Dead {
        /// Why.
        error: String,
        /// The target's answer.
        response: Option<ResponseSummary>,
    },
}

/// The statuses of recent sends: every unfinished send, plus the most recent finished ones up
/// to a retention count (older finished ones are forgotten first).
pub struct StatusBook {
    retain_finished: usize,
    inner: Mutex<Inner>,
    /// Woken whenever a send reaches a final state.
    finished: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    /// Instance names; entries keep an index.
    names: Vec<Arc<str>>,
    by_id: IdMap<Entry>,
    /// Finished sends, oldest first, with the generation they finished in: a replayed dead
    /// letter is queued again under its id, and only its latest finish may evict it.
    finished: VecDeque<(EventId, u16)>,
}

/// What the book keeps of one send: small while it waits (most sends, most of the time), the
/// rest boxed once something happened to it.
///
/// Kept compact because a million waiting sends means a million entries: the instance as an
/// index into the book's names, times in milliseconds.
struct Entry {
    run: Option<Arc<str>>,
    created_ms: u64,
    updated_ms: u64,
    detail: Option<Box<Detail>>,
    attempts: u32,
    destination: u16,
    /// How many times the send was queued again (dead-letter replays).
    generation: u16,
    state: State,
}

fn to_ms(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_ms(ms: u64) -> SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

#[derive(Default)]
struct Detail {
    last_error: Option<String>,
    response: Option<ResponseSummary>,
    next_attempt_at: Option<SystemTime>,
}

impl Inner {
    /// The index of an instance name, added on first sight (instances are few).
    fn name_index(&mut self, name: &Arc<str>) -> u16 {
        let found = self
            .names
            .iter()
            .position(|known| Arc::ptr_eq(known, name) || **known == **name);
        let index = found.unwrap_or_else(|| {
            self.names.push(name.clone());
            self.names.len() - 1
        });
        u16::try_from(index).unwrap_or(u16::MAX)
    }
}

impl Entry {
    fn status(&self, id: EventId, names: &[Arc<str>]) -> SendStatus {
        let detail = self.detail.as_deref();
        SendStatus {
            id,
            destination: names
                .get(usize::from(self.destination))
                .cloned()
                .unwrap_or_else(|| Arc::from("")),
            run: self.run.clone(),
            state: self.state,
            attempts: self.attempts,
            last_error: detail.and_then(|d| d.last_error.clone()),
            response: detail.and_then(|d| d.response.clone()),
            created_at: from_ms(self.created_ms),
            updated_at: from_ms(self.updated_ms),
            next_attempt_at: detail.and_then(|d| d.next_attempt_at),
        }
    }

    fn detail(&mut self) -> &mut Detail {
        self.detail.get_or_insert_with(Box::default)
    }
}

impl StatusBook {
    /// A book that remembers up to `retain_finished` finished sends.
    pub fn new(retain_finished: usize) -> Self {
        Self {
            retain_finished,
            inner: Mutex::new(Inner::default()),
            finished: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record these envelopes as queued.
    pub fn queued(&self, envelopes: &[Envelope]) {
        let now = to_ms(SystemTime::now());
        let mut inner = self.lock();
        inner.by_id.reserve(envelopes.len());
        for e in envelopes {
            let destination = inner.name_index(&e.destination);
            let generation = inner
                .by_id
                .get(&e.id)
                .map_or(0, |earlier| earlier.generation.wrapping_add(1));
            inner.by_id.insert(
                e.id,
                Entry {
                    destination,
                    run: e.run.clone(),
                    created_ms: to_ms(e.created_at),
                    updated_ms: now,
                    state: State::Queued,
                    attempts: e.attempts,
                    generation,
                    detail: None,
                },
            );
        }
    }

    /// Put back statuses as they were (a replay the queue refused).
    pub(crate) fn restore(&self, statuses: Vec<SendStatus>) {
        let mut inner = self.lock();
        for status in statuses {
            let detail = (status.last_error.is_some()
                || status.response.is_some()
                || status.next_attempt_at.is_some())
            .then(|| {
                Box::new(Detail {
                    last_error: status.last_error,
                    response: status.response,
                    next_attempt_at: status.next_attempt_at,
                })
            });
            let generation = inner.by_id.get(&status.id).map_or(0, |e| e.generation);
            let destination = inner.name_index(&status.destination);
            inner.by_id.insert(
                status.id,
                Entry {
                    destination,
                    run: status.run,
                    created_ms: to_ms(status.created_at),
                    updated_ms: to_ms(status.updated_at),
                    state: status.state,
                    attempts: status.attempts,
                    generation,
                    detail,
                },
            );
        }
    }

    /// Forget these sends (they were refused after all).
    pub fn forget(&self, ids: impl IntoIterator<Item = EventId>) {
        let mut inner = self.lock();
        for id in ids {
            inner.by_id.remove(&id);
        }
    }

    /// Apply a change to one send.
    pub fn apply(&self, id: EventId, transition: Transition) {
        let now = to_ms(SystemTime::now());
        let mut inner = self.lock();
        let Some(status) = inner.by_id.get_mut(&id) else {
            return;
        };
        status.updated_ms = now;
        if let Some(detail) = status.detail.as_deref_mut() {
            detail.next_attempt_at = None;
        }
        match transition {
            Transition::Attempting => {
                status.state = State::InFlight;
                status.attempts += 1;
            }
            Transition::Delivered(response) => {
                status.state = State::Delivered;
                if response.is_some() || status.detail.is_some() {
                    status.detail().response = response;
                }
            }
            Transition::Retrying {
                error,
                response,
                next_attempt_at,
            } => {
                status.state = State::Retrying;
                let detail = status.detail();
                detail.last_error = Some(error);
                detail.response = response;
                detail.next_attempt_at = Some(next_attempt_at);
            }
            Transition::Dead { error, response } => {
                status.state = State::Dead;
                let detail = status.detail();
                detail.last_error = Some(error);
                detail.response = response;
            }
        }
        if status.state.is_final() {
            let generation = status.generation;
            inner.finished.push_back((id, generation));
            while inner.finished.len() > self.retain_finished {
                if let Some((old, finished_in)) = inner.finished.pop_front() {
                    let current = inner.by_id.get(&old).map(|e| (e.generation, e.state));
                    if current.is_some_and(|(g, state)| g == finished_in && state.is_final()) {
                        inner.by_id.remove(&old);
                    }
                }
            }
            drop(inner);
            self.finished.notify_waiters();
        }
    }

    /// The status of one send once it is final (delivered or dead), or as it is when `timeout`
    /// passes first. `None` if the send is unknown.
    pub async fn wait_final(
        &self,
        id: EventId,
        timeout: std::time::Duration,
    ) -> Option<SendStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before looking, so a change in between is not missed.
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            let status = self.get(id)?;
            if status.state.is_final() {
                return Some(status);
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return self.get(id);
            }
        }
    }

    /// The status of one send, if it is still remembered.
    pub fn get(&self, id: EventId) -> Option<SendStatus> {
        let inner = self.lock();
        inner
            .by_id
            .get(&id)
            .map(|entry| entry.status(id, &inner.names))
    }

    /// How many sends are remembered.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether no send is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn walks_the_states_and_forgets_old_finished_sends_first() {
        let book = StatusBook::new(1);
        let a = Envelope::new("d".into(), None, Bytes::new());
        let b = Envelope::new("d".into(), None, Bytes::new());
        let c = Envelope::new("d".into(), None, Bytes::new());
        book.queued(&[a.clone(), b.clone(), c.clone()]);
        book.apply(a.id, Transition::Attempting);
        let s = book.get(a.id).unwrap_or_else(|| panic!("known"));
        assert_eq!((s.state, s.attempts), (State::InFlight, 1));
        book.apply(
            a.id,
            Transition::Retrying {
                error: "503".into(),
                response: None,
                next_attempt_at: SystemTime::now(),
            },
        );
        assert_eq!(book.get(a.id).map(|s| s.state), Some(State::Retrying));
        book.apply(a.id, Transition::Delivered(None));
        book.apply(
            b.id,
            Transition::Dead {
                error: "404".into(),
                response: None,
            },
        );
        assert!(book.get(a.id).is_none(), "oldest finished forgotten");
        assert_eq!(book.get(b.id).map(|s| s.state), Some(State::Dead));
        assert_eq!(
            book.get(c.id).map(|s| s.state),
            Some(State::Queued),
            "unfinished kept"
        );
    }

    #[test]
    fn a_replayed_send_is_not_forgotten_for_its_earlier_finish() {
        let book = StatusBook::new(1);
        let a = Envelope::new("d".into(), None, Bytes::new());
        let b = Envelope::new("d".into(), None, Bytes::new());
        book.queued(&[a.clone(), b.clone()]);
        let dead = || Transition::Dead {
            error: "x".into(),
            response: None,
        };
        book.apply(a.id, dead());
        book.queued(std::slice::from_ref(&a)); // replayed under the same id
        book.apply(b.id, dead()); // evicts a's earlier finish, not a itself
        assert_eq!(book.get(a.id).map(|s| s.state), Some(State::Queued));
    }
}
