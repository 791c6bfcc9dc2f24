//! Where each send is: queued, in flight, delivered, retrying, or dead — kept bounded.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Serialize, Serializer};
use tokio::sync::oneshot;

use crate::attempts::{Attempt, log_attempt};
use crate::destination::ResponseSummary;
use crate::envelope::{Envelope, EventId, IdMap};
use crate::queue::{QueueError, Settlement, StatusStore};

/// The state of one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SendStatus {
    /// The send's id.
    pub id: EventId,
    /// The destination instance.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub destination: Arc<str>,
    /// The run that sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
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
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub created_at: SystemTime,
    /// When its state last changed.
    #[serde(serialize_with = "rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub updated_at: SystemTime,
    /// When the next attempt is due, while retrying.
    #[serde(
        serialize_with = "rfc3339_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub next_attempt_at: Option<SystemTime>,
    /// Every attempt, oldest first (the first and the newest, 10 in all): given when one send
    /// is asked for, not in a listing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts_log: Option<Vec<Attempt>>,
}

/// Times as RFC 3339 (`2026-12-01T10:00:00.000Z`), both ways.
pub(crate) mod rfc3339_serde {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        super::rfc3339(t, s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

pub(crate) fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

pub(crate) fn rfc3339_option<S: Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// A change to a send's status.
#[derive(Clone, Debug)]
pub enum Transition {
    /// An attempt starts; the send has made this many attempts, this one included.
    Attempting {
        /// Attempts made, this one included.
        attempts: u32,
    },
    /// Delivered.
    Delivered(Option<Arc<ResponseSummary>>),
    /// Failed; another attempt at this time.
    Retrying {
        /// What went wrong; `None` for a send held back without an attempt (its last
        /// attempt's error and answer stay).
        error: Option<String>,
        /// The target's answer.
        response: Option<Arc<ResponseSummary>>,
        /// When the next attempt is due.
        next_attempt_at: SystemTime,
    },
    /// Given up.
    Dead {
        /// Why.
        error: String,
        /// The target's answer.
        response: Option<Arc<ResponseSummary>>,
    },
}

/// Those waiting for sends to become final (`?wait=`), keyed by send id: a finish wakes only
/// the waiters of that send.
#[derive(Default)]
pub struct FinalWaiters {
    /// How many waiters are registered; zero keeps the settle path free of the lock.
    count: AtomicUsize,
    waiting: Mutex<IdMap<Vec<oneshot::Sender<()>>>>,
    /// Told when a waiter registers (a store that listens for finishes only while someone
    /// waits starts listening).
    registered: tokio::sync::Notify,
}

impl FinalWaiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdMap<Vec<oneshot::Sender<()>>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Be told when `id` becomes final. The receiver resolves then (or errs if the waiter is
    /// dropped).
    pub fn register(&self, id: EventId) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(id).or_default().push(tx);
        self.count.fetch_add(1, Ordering::AcqRel);
        self.registered.notify_waiters();
        rx
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Resolves once a waiter registers (create it before checking [`is_empty`](Self::is_empty)).
    pub fn registered(&self) -> tokio::sync::futures::Notified<'_> {
        self.registered.notified()
    }

    /// Wake every waiter: each looks again (a store that just started listening may have
    /// missed a finish).
    pub fn wake_all(&self) {
        if self.is_empty() {
            return;
        }
        let mut waiting = self.lock();
        let woken: usize = waiting.values().map(Vec::len).sum();
        for (_, senders) in waiting.drain() {
            for sender in senders {
                let _ = sender.send(());
            }
        }
        self.count.fetch_sub(woken, Ordering::AcqRel);
    }

    /// These sends became final: wake their waiters.
    pub fn finished<'a>(&self, ids: impl IntoIterator<Item = &'a EventId>) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut waiting = self.lock();
        for id in ids {
            if let Some(senders) = waiting.remove(id) {
                self.count.fetch_sub(senders.len(), Ordering::AcqRel);
                for sender in senders {
                    let _ = sender.send(());
                }
            }
        }
    }

    /// Drop the registrations of `id` whose waiters gave up.
    pub fn forget_closed(&self, id: EventId) {
        let mut waiting = self.lock();
        if let Some(senders) = waiting.get_mut(&id) {
            let before = senders.len();
            senders.retain(|s| !s.is_closed());
            self.count
                .fetch_sub(before - senders.len(), Ordering::AcqRel);
            if senders.is_empty() {
                waiting.remove(&id);
            }
        }
    }
}

/// Which sends a listing shows (every field that is given must match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only sends to this destination instance.
    pub destination: Option<String>,
    /// Only sends in this state.
    pub state: Option<State>,
    /// Only sends of this run.
    pub run: Option<String>,
    /// Only sends made at or after this time.
    pub since: Option<SystemTime>,
    /// Only sends made before this time.
    pub until: Option<SystemTime>,
}

impl EventFilter {
    /// Whether `status` matches.
    pub fn matches(&self, status: &SendStatus) -> bool {
        self.destination
            .as_deref()
            .is_none_or(|d| *status.destination == *d)
            && self.state.is_none_or(|state| status.state == state)
            && self
                .run
                .as_deref()
                .is_none_or(|run| status.run.as_deref() == Some(run))
            && self.since.is_none_or(|since| status.created_at >= since)
            && self.until.is_none_or(|until| status.created_at < until)
    }

    /// Whether a send made at `created_at` can match (a bound checked before its status is
    /// read).
    pub fn in_time(&self, created_at: SystemTime) -> bool {
        self.since.is_none_or(|since| created_at >= since)
            && self.until.is_none_or(|until| created_at < until)
    }
}

/// One page of sends, newest first (by when they were made).
#[derive(Clone, Debug, Default, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventPage {
    /// The sends, without their attempt logs.
    pub events: Vec<SendStatus>,
    /// Pass as `after` for the next page; `None` on the last.
    pub next: Option<String>,
}

impl EventPage {
    /// The id a page cursor names: listings continue with sends older than it.
    pub fn before(after: Option<&str>) -> Result<Option<EventId>, QueueError> {
        after
            .map(|text| {
                text.parse::<EventId>()
                    .map_err(|_| QueueError::InvalidCursor(text.to_owned()))
            })
            .transpose()
    }

    /// Of up to `limit + 1` items found newest first, keep `limit`; the cursor of the next
    /// page if there was one more (the id of the last one kept).
    pub fn cut<T>(
        newest_first: &mut Vec<T>,
        limit: usize,
        id: impl Fn(&T) -> EventId,
    ) -> Option<String> {
        let more = newest_first.len() > limit;
        newest_first.truncate(limit);
        more.then(|| newest_first.last().map(|last| id(last).to_string()))
            .flatten()
    }
}

/// How long finished sends stay queryable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRetention {
    /// Most finished sends remembered (older ones are forgotten first).
    pub count: usize,
    /// Longest a finished send is remembered.
    pub age: Duration,
}

/// The statuses of recent sends, in memory: every unfinished send, plus the most recent
/// finished ones within the retention (older finished ones are forgotten first).
pub struct StatusBook {
    retention: StatusRetention,
    inner: Mutex<Inner>,
    waiters: FinalWaiters,
}

#[derive(Default)]
struct Inner {
    /// Instance names; entries keep an index.
    names: Vec<Arc<str>>,
    by_id: IdMap<Entry>,
    /// Finished sends, oldest first, with the generation they finished in (a replayed dead
    /// letter is queued again under its id, and only its latest finish may evict it) and when.
    finished: VecDeque<(EventId, u16, u64)>,
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
    /// The target's last answer, shared with the other sends it answered for: most delivered
    /// sends have one and nothing else to keep, so it is not boxed into the detail.
    response: Option<Arc<ResponseSummary>>,
    /// Attempts made (at most `u16::MAX` are counted).
    attempts: u16,
    destination: u16,
    /// How many times the send was queued again (dead-letter replays).
    generation: u16,
    state: State,
}

// A million waiting sends are a million entries: keep one within 56 bytes (72 with its key).
const _: () = assert!(std::mem::size_of::<Entry>() <= 56);

fn saturate(attempts: u32) -> u16 {
    u16::try_from(attempts).unwrap_or(u16::MAX)
}

fn to_ms(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_ms(ms: u64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

#[derive(Default)]
struct Detail {
    last_error: Option<String>,
    next_attempt_at: Option<SystemTime>,
    /// The attempts that failed, oldest first.
    failed_attempts: Vec<Attempt>,
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

    /// Apply a change to one send; `true` if it became final.
    fn apply(&mut self, id: EventId, transition: Transition, now: u64) -> bool {
        let Some(status) = self.by_id.get_mut(&id) else {
            return false;
        };
        status.updated_ms = now;
        if let Some(detail) = status.detail.as_deref_mut() {
            detail.next_attempt_at = None;
        }
        match transition {
            Transition::Attempting { attempts } => {
                status.state = State::InFlight;
                status.attempts = saturate(attempts);
            }
            Transition::Delivered(response) => {
                status.state = State::Delivered;
                status.response = response;
            }
            Transition::Retrying {
                error,
                response,
                next_attempt_at,
            } => {
                status.state = State::Retrying;
                // Without an error it was held back, not attempted: its last attempt's
                // error and answer stay.
                if error.is_some() {
                    status.response = response;
                }
                let detail = status.detail();
                if let Some(error) = error {
                    detail.last_error = Some(error);
                }
                detail.next_attempt_at = Some(next_attempt_at);
            }
            Transition::Dead { error, response } => {
                status.state = State::Dead;
                status.response = response;
                status.detail().last_error = Some(error);
            }
        }
        if !status.state.is_final() {
            return false;
        }
        let generation = status.generation;
        self.finished.push_back((id, generation, now));
        true
    }

    /// Forget the oldest finished sends beyond the retention.
    fn evict(&mut self, retention: StatusRetention, now: u64) {
        let max_age = retention.age.as_millis() as u64;
        while self.finished.len() > retention.count
            || self
                .finished
                .front()
                .is_some_and(|(_, _, at)| now.saturating_sub(*at) > max_age)
        {
            let Some((old, finished_in, _)) = self.finished.pop_front() else {
                break;
            };
            let current = self.by_id.get(&old).map(|e| (e.generation, e.state));
            if current.is_some_and(|(g, state)| g == finished_in && state.is_final()) {
                self.by_id.remove(&old);
            }
        }
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
            attempts: u32::from(self.attempts),
            last_error: detail.and_then(|d| d.last_error.clone()),
            response: self.response.as_deref().cloned(),
            created_at: from_ms(self.created_ms),
            updated_at: from_ms(self.updated_ms),
            next_attempt_at: detail.and_then(|d| d.next_attempt_at),
            attempts_log: None,
        }
    }

    fn detail(&mut self) -> &mut Detail {
        self.detail.get_or_insert_with(Box::default)
    }
}

impl StatusBook {
    /// A book that remembers finished sends within `retention`.
    pub fn new(retention: StatusRetention) -> Self {
        Self {
            retention,
            inner: Mutex::new(Inner::default()),
            waiters: FinalWaiters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record these envelopes as queued (again, for a replay: a new generation).
    pub fn queued(&self, envelopes: &[Envelope]) {
        let now = to_ms(SystemTime::now());
        let mut inner = self.lock();
        inner.by_id.reserve(envelopes.len());
        for e in envelopes {
            let destination = inner.name_index(&e.destination);
            let entry = |generation| Entry {
                destination,
                run: e.run.clone(),
                created_ms: to_ms(e.created_at),
                updated_ms: now,
                state: State::Queued,
                attempts: saturate(e.attempts),
                generation,
                detail: None,
                response: None,
            };
            // One lookup a send: a replayed send's entry is replaced, one generation on.
            match inner.by_id.entry(e.id) {
                std::collections::hash_map::Entry::Occupied(mut earlier) => {
                    let generation = earlier.get().generation.wrapping_add(1);
                    // A replayed send keeps the log of its earlier attempts.
                    let log = earlier
                        .get_mut()
                        .detail
                        .as_deref_mut()
                        .map(|detail| std::mem::take(&mut detail.failed_attempts))
                        .filter(|log| !log.is_empty());
                    let mut replayed = entry(generation);
                    if let Some(log) = log {
                        replayed.detail().failed_attempts = log;
                    }
                    earlier.insert(replayed);
                }
                std::collections::hash_map::Entry::Vacant(new) => {
                    new.insert(entry(0));
                }
            }
        }
    }

    /// Apply one change to one send.
    pub fn apply(&self, id: EventId, transition: Transition) {
        let now = to_ms(SystemTime::now());
        let mut inner = self.lock();
        if inner.apply(id, transition, now) {
            inner.evict(self.retention, now);
            drop(inner);
            self.waiters.finished([&id]);
        }
    }

    /// Apply a settlement's changes, under one lock.
    pub fn settled(&self, settlement: &Settlement) {
        let now = to_ms(SystemTime::now());
        let mut inner = self.lock();
        for s in &settlement.delivered {
            inner.apply(
                s.envelope.id,
                Transition::Delivered(s.response.clone()),
                now,
            );
        }
        if let Some(retry) = &settlement.retry {
            for s in &retry.sends {
                inner.apply(
                    s.envelope.id,
                    Transition::Retrying {
                        error: s.error.clone(),
                        response: s.response.clone(),
                        next_attempt_at: retry.at,
                    },
                    now,
                );
            }
        }
        for s in &settlement.dead {
            inner.apply(
                s.envelope.id,
                Transition::Dead {
                    error: s.error.clone().unwrap_or_default(),
                    response: s.response.clone(),
                },
                now,
            );
        }
        for (id, attempt) in settlement.failed_attempts() {
            if let Some(entry) = inner.by_id.get_mut(&id) {
                log_attempt(&mut entry.detail().failed_attempts, attempt);
            }
        }
        inner.evict(self.retention, now);
        drop(inner);
        self.waiters.finished(settlement.finished().map(|e| &e.id));
    }

    /// The status of one send with its attempt log, if it is still remembered.
    pub fn get(&self, id: EventId) -> Option<SendStatus> {
        let inner = self.lock();
        let entry = inner.by_id.get(&id)?;
        let failed = entry
            .detail
            .as_deref()
            .map(|detail| detail.failed_attempts.clone())
            .unwrap_or_default();
        Some(entry.status(id, &inner.names).with_attempts(failed))
    }

    /// The newest sends matching `filter` made before the send `after` names, `limit` at
    /// most. One pass over every remembered send under the book's lock, comparing the
    /// entries' own fields and keeping the newest ids in a bounded heap; statuses are built
    /// for the page alone.
    pub fn list(
        &self,
        filter: &EventFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EventPage, QueueError> {
        use std::cmp::Reverse;
        let before = EventPage::before(after)?;
        let inner = self.lock();
        let destination = match filter.destination.as_deref() {
            Some(name) => match inner.names.iter().position(|known| **known == *name) {
                Some(index) => Some(u16::try_from(index).unwrap_or(u16::MAX)),
                None => return Ok(EventPage::default()),
            },
            None => None,
        };
        let since = filter.since.map(to_ms);
        let until = filter.until.map(to_ms);
        let mut newest = std::collections::BinaryHeap::with_capacity(limit + 2);
        for (id, entry) in &inner.by_id {
            let matches = before.is_none_or(|before| *id < before)
                && destination.is_none_or(|d| entry.destination == d)
                && filter.state.is_none_or(|state| entry.state == state)
                && since.is_none_or(|since| entry.created_ms >= since)
                && until.is_none_or(|until| entry.created_ms < until)
                && filter
                    .run
                    .as_deref()
                    .is_none_or(|run| entry.run.as_deref() == Some(run));
            if !matches {
                continue;
            }
            // One more than a page, to tell whether another follows.
            if newest.len() <= limit {
                newest.push(Reverse(*id));
            } else if newest.peek().is_some_and(|Reverse(oldest)| id > oldest) {
                newest.pop();
                newest.push(Reverse(*id));
            }
        }
        let mut ids: Vec<EventId> = newest.into_iter().map(|Reverse(id)| id).collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let next = EventPage::cut(&mut ids, limit, |id| *id);
        let events = ids
            .iter()
            .filter_map(|id| Some(inner.by_id.get(id)?.status(*id, &inner.names)))
            .collect();
        Ok(EventPage { events, next })
    }
}

#[async_trait]
impl StatusStore for StatusBook {
    async fn get(&self, id: EventId) -> Result<Option<SendStatus>, QueueError> {
        Ok(StatusBook::get(self, id))
    }

    async fn list(
        &self,
        filter: &EventFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EventPage, QueueError> {
        StatusBook::list(self, filter, after, limit)
    }

    fn attempting(&self, envelopes: &[Envelope]) {
        let now = to_ms(SystemTime::now());
        let mut inner = self.lock();
        for e in envelopes {
            inner.apply(
                e.id,
                Transition::Attempting {
                    attempts: e.attempts,
                },
                now,
            );
        }
    }

    fn waiters(&self) -> &FinalWaiters {
        &self.waiters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn keep(count: usize) -> StatusRetention {
        StatusRetention {
            count,
            age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn walks_the_states_and_forgets_old_finished_sends_first() {
        let book = StatusBook::new(keep(1));
        let a = Envelope::new("d".into(), None, Bytes::new());
        let b = Envelope::new("d".into(), None, Bytes::new());
        let c = Envelope::new("d".into(), None, Bytes::new());
        book.queued(&[a.clone(), b.clone(), c.clone()]);
        book.apply(a.id, Transition::Attempting { attempts: 1 });
        let s = book.get(a.id).unwrap_or_else(|| panic!("known"));
        assert_eq!((s.state, s.attempts), (State::InFlight, 1));
        book.apply(
            a.id,
            Transition::Retrying {
                error: Some("503".into()),
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
        let book = StatusBook::new(keep(1));
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

    fn failed_once(envelope: &Envelope) -> Settlement {
        let mut attempted = envelope.clone();
        attempted.attempts += 1;
        Settlement {
            dead: vec![crate::queue::Settled {
                envelope: attempted,
                error: Some("410 Gone".into()),
                response: Some(Arc::new(ResponseSummary {
                    status: Some(410),
                    elapsed_ms: 3,
                    body_excerpt: Some("x".repeat(5000)),
                    location: None,
                })),
            }],
            attempted: Some(crate::attempts::Attempted {
                started_at: SystemTime::now(),
                took: Duration::from_millis(3),
            }),
            ..Settlement::default()
        }
    }

    #[test]
    fn a_replayed_send_keeps_the_log_of_its_attempts_before() {
        use crate::attempts::{AttemptOutcome, MAX_LOGGED_EXCERPT};
        let book = StatusBook::new(keep(10));
        let a = Envelope::new("d".into(), None, Bytes::new());
        book.queued(std::slice::from_ref(&a));
        book.settled(&failed_once(&a));
        let log = book
            .get(a.id)
            .and_then(|s| s.attempts_log)
            .unwrap_or_default();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].outcome, AttemptOutcome::Failed);
        assert_eq!(log[0].status_code, Some(410));
        assert!(
            log[0]
                .response_excerpt
                .as_ref()
                .is_some_and(|e| e.len() <= MAX_LOGGED_EXCERPT + 3),
            "the excerpt is bounded"
        );
        book.queued(std::slice::from_ref(&a)); // replayed
        let mut again = a.clone();
        again.attempts = 1;
        book.attempting(std::slice::from_ref(&again));
        book.settled(&Settlement {
            delivered: vec![crate::queue::Settled {
                envelope: again,
                error: None,
                response: None,
            }],
            ..Settlement::default()
        });
        let outcomes: Vec<_> = book
            .get(a.id)
            .and_then(|s| s.attempts_log)
            .unwrap_or_default()
            .iter()
            .map(|a| a.outcome)
            .collect();
        assert_eq!(
            outcomes,
            [AttemptOutcome::Failed, AttemptOutcome::Delivered]
        );
    }

    #[test]
    fn a_listing_pages_newest_first_and_filters() {
        let book = StatusBook::new(keep(100));
        let sends: Vec<Envelope> = (0..10)
            .map(|n| {
                let name = if n % 2 == 0 { "even" } else { "odd" };
                Envelope::new(name.into(), Some("r".into()), Bytes::new())
            })
            .collect();
        book.queued(&sends);
        book.settled(&failed_once(&sends[0]));
        let mut newest_first: Vec<EventId> = sends.iter().map(|e| e.id).collect();
        newest_first.sort_unstable_by(|a, b| b.cmp(a));
        let all = EventFilter::default();
        let first = book.list(&all, None, 4).unwrap_or_default();
        assert_eq!(
            first.events.iter().map(|s| s.id).collect::<Vec<_>>(),
            newest_first[..4]
        );
        let second = book
            .list(&all, first.next.as_deref(), 4)
            .unwrap_or_default();
        assert_eq!(
            second.events.iter().map(|s| s.id).collect::<Vec<_>>(),
            newest_first[4..8]
        );
        let last = book
            .list(&all, second.next.as_deref(), 4)
            .unwrap_or_default();
        assert_eq!(last.events.len(), 2);
        assert!(last.next.is_none(), "no page after the last");
        let even = EventFilter {
            destination: Some("even".into()),
            ..EventFilter::default()
        };
        assert_eq!(
            book.list(&even, None, 100).map(|p| p.events.len()).ok(),
            Some(5)
        );
        let dead = EventFilter {
            state: Some(State::Dead),
            ..EventFilter::default()
        };
        let page = book.list(&dead, None, 100).unwrap_or_default();
        assert_eq!(
            page.events.iter().map(|s| s.id).collect::<Vec<_>>(),
            [sends[0].id]
        );
        assert!(
            page.events[0].attempts_log.is_none(),
            "a listing leaves out the logs"
        );
        assert!(
            book.list(&all, Some("nope"), 4).is_err(),
            "a cursor that is not an id"
        );
    }

    #[test]
    fn finished_sends_older_than_the_retention_age_are_forgotten() {
        let book = StatusBook::new(StatusRetention {
            count: 100,
            age: Duration::ZERO,
        });
        let a = Envelope::new("d".into(), None, Bytes::new());
        let b = Envelope::new("d".into(), None, Bytes::new());
        book.queued(&[a.clone(), b.clone()]);
        book.apply(a.id, Transition::Delivered(None));
        std::thread::sleep(Duration::from_millis(5));
        book.apply(b.id, Transition::Delivered(None));
        assert!(book.get(a.id).is_none(), "older than the age");
    }

    #[tokio::test]
    async fn a_finish_wakes_only_the_waiters_of_that_send() {
        let book = StatusBook::new(keep(10));
        let a = Envelope::new("d".into(), None, Bytes::new());
        let b = Envelope::new("d".into(), None, Bytes::new());
        book.queued(&[a.clone(), b.clone()]);
        let mut on_a = book.waiters().register(a.id);
        let mut on_b = book.waiters().register(b.id);
        book.apply(a.id, Transition::Delivered(None));
        assert!(on_a.try_recv().is_ok(), "a's waiter woken");
        assert!(on_b.try_recv().is_err(), "b's waiter still waits");
        let waited = book.wait_final(b.id, Duration::from_millis(10)).await;
        assert_eq!(
            waited.ok().flatten().map(|s| s.state),
            Some(State::Queued),
            "as it is at the timeout"
        );
    }
}
