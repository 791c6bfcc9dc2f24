//! Sends given up on, kept with the reason, listable page by page and replayable.

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::Serialize;

use crate::envelope::{Envelope, EventId};
use crate::queue::{DeadLetterStore, QueueError};

/// One send given up on.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The send as it was accepted, with the attempts it made.
    pub envelope: Envelope,
    /// Why it was given up on.
    pub reason: String,
    /// When.
    pub died_at: SystemTime,
}

/// A dead letter as listed by the API, with its payload as JSON.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// When it was sent, RFC 3339.
    pub created_at: String,
    /// When it was given up on, RFC 3339.
    pub died_at: String,
    /// The payload.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
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
            created_at: humantime::format_rfc3339_millis(d.envelope.created_at).to_string(),
            died_at: humantime::format_rfc3339_millis(d.died_at).to_string(),
            payload: serde_json::from_slice(&d.envelope.payload).unwrap_or_default(),
        }
    }
}

/// Which dead letters to list or replay; every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Only these sends.
    pub ids: Option<Vec<EventId>>,
    /// Only sends to this destination instance.
    pub destination: Option<String>,
    /// Only those that died at or after this time.
    pub since: Option<SystemTime>,
    /// Only those that died before this time.
    pub until: Option<SystemTime>,
}

impl DeadLetterFilter {
    /// Whether `letter` matches (`ids` as a set, for large lists).
    pub fn matches(&self, letter: &DeadLetter, ids: Option<&HashSet<EventId>>) -> bool {
        ids.is_none_or(|ids| ids.contains(&letter.envelope.id))
            && self
                .destination
                .as_deref()
                .is_none_or(|d| *letter.envelope.destination == *d)
            && self.since.is_none_or(|since| letter.died_at >= since)
            && self.until.is_none_or(|until| letter.died_at < until)
    }

    /// The ids as a set, if the filter names any.
    pub fn id_set(&self) -> Option<HashSet<EventId>> {
        self.ids.as_ref().map(|ids| ids.iter().copied().collect())
    }
}

/// One page of dead letters, newest first.
#[derive(Clone, Debug, Default)]
pub struct DeadLetterPage {
    /// The letters.
    pub letters: Vec<DeadLetter>,
    /// Where the next page starts, if there is one (pass it as `after`).
    pub next: Option<String>,
}

impl DeadLetterPage {
    /// The sequence a store's page cursor names (the letters before it come next); every
    /// letter for no cursor. A cursor this kind of store did not make is refused.
    pub fn before(after: Option<&str>) -> Result<u64, QueueError> {
        match after {
            Some(cursor) => cursor
                .parse()
                .map_err(|_| QueueError::InvalidCursor(cursor.to_owned())),
            None => Ok(u64::MAX),
        }
    }

    /// A page of up to `limit` of these letters, each with its sequence, newest first; the next
    /// page's cursor if there are more.
    pub fn of(letters: impl IntoIterator<Item = (u64, DeadLetter)>, limit: usize) -> Self {
        let mut letters = letters.into_iter();
        let page: Vec<(u64, DeadLetter)> = letters.by_ref().take(limit).collect();
        let more = letters.next().is_some();
        let next = more
            .then(|| page.last().map(|(seq, _)| seq.to_string()))
            .flatten();
        Self {
            letters: page.into_iter().map(|(_, letter)| letter).collect(),
            next,
        }
    }
}

/// The most recent dead letters in memory, up to a count and a size in payload bytes (the
/// oldest are dropped past either, and counted).
pub struct DeadLetters {
    capacity: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Oldest first, each with its sequence number (the page cursor).
    letters: VecDeque<(u64, DeadLetter)>,
    /// The payload bytes of `letters`.
    bytes: usize,
    next_seq: u64,
    evicted: u64,
}

impl DeadLetters {
    /// The payload bytes kept unless said otherwise (256 MiB).
    pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

    /// A store that keeps up to `capacity` dead letters, of up to
    /// [`DEFAULT_MAX_BYTES`](Self::DEFAULT_MAX_BYTES) of payload in all.
    pub fn new(capacity: usize) -> Self {
        Self::bounded(capacity, Self::DEFAULT_MAX_BYTES)
    }

    /// A store that keeps up to `capacity` dead letters and `max_bytes` of their payloads
    /// (review C6: 10 000 letters of 1 MiB each would otherwise hold 10 GiB).
    pub fn bounded(capacity: usize, max_bytes: usize) -> Self {
        Self {
            capacity,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keep a dead letter.
    pub fn push(&self, letter: DeadLetter) {
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.bytes += letter.envelope.payload.len();
        inner.letters.push_back((seq, letter));
        while inner.letters.len() > self.capacity || inner.bytes > self.max_bytes {
            let Some((_, oldest)) = inner.letters.pop_front() else {
                break;
            };
            inner.bytes -= oldest.envelope.payload.len();
            inner.evicted += 1;
        }
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.lock().letters.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take out the dead letters with these ids, oldest first.
    pub fn take(&self, ids: &[EventId]) -> Vec<DeadLetter> {
        let wanted: HashSet<EventId> = ids.iter().copied().collect();
        let mut inner = self.lock();
        let (taken, kept): (Vec<_>, Vec<_>) = inner
            .letters
            .drain(..)
            .partition(|(_, d)| wanted.contains(&d.envelope.id));
        inner.letters = kept.into();
        inner.bytes -= taken
            .iter()
            .map(|(_, d)| d.envelope.payload.len())
            .sum::<usize>();
        taken.into_iter().map(|(_, d)| d).collect()
    }
}

#[async_trait]
impl DeadLetterStore for DeadLetters {
    async fn list(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterPage, QueueError> {
        let before = DeadLetterPage::before(after)?;
        let ids = filter.id_set();
        let inner = self.lock();
        let matching = inner
            .letters
            .iter()
            .rev()
            .filter(|(seq, letter)| *seq < before && filter.matches(letter, ids.as_ref()))
            .map(|(seq, letter)| (*seq, letter.clone()));
        Ok(DeadLetterPage::of(matching, limit))
    }

    async fn evicted(&self) -> Result<u64, QueueError> {
        Ok(self.lock().evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn letter(to: &str) -> DeadLetter {
        DeadLetter {
            envelope: Envelope::new(to.into(), None, Bytes::from_static(b"{}")),
            reason: "x".into(),
            died_at: SystemTime::now(),
        }
    }

    #[tokio::test]
    async fn the_oldest_go_past_the_byte_bound_and_are_counted() {
        let store = DeadLetters::bounded(1000, 350);
        for _ in 0..10 {
            store.push(DeadLetter {
                envelope: Envelope::new("a".into(), None, Bytes::from(vec![b'x'; 100])),
                reason: "x".into(),
                died_at: SystemTime::now(),
            });
        }
        assert_eq!(store.len(), 3, "3 of 100 bytes fit in 350");
        assert_eq!(store.evicted().await.unwrap_or_default(), 7);
    }

    #[tokio::test]
    async fn pages_newest_first_with_a_filter_and_a_cursor() {
        let store = DeadLetters::new(10);
        let letters: Vec<_> = (0..5)
            .map(|i| letter(if i % 2 == 0 { "a" } else { "b" }))
            .collect();
        for l in &letters {
            store.push(l.clone());
        }
        let only_a = DeadLetterFilter {
            destination: Some("a".into()),
            ..DeadLetterFilter::default()
        };
        let first = store.list(&only_a, None, 2).await.unwrap_or_default();
        let ids: Vec<_> = first.letters.iter().map(|l| l.envelope.id).collect();
        assert_eq!(ids, [letters[4].envelope.id, letters[2].envelope.id]);
        let rest = store
            .list(&only_a, first.next.as_deref(), 2)
            .await
            .unwrap_or_default();
        assert_eq!(rest.letters.len(), 1);
        assert_eq!(rest.letters[0].envelope.id, letters[0].envelope.id);
        assert!(rest.next.is_none(), "the last page says so");
    }

    #[tokio::test]
    async fn the_oldest_are_evicted_and_counted() {
        let store = DeadLetters::new(2);
        for _ in 0..3 {
            store.push(letter("a"));
        }
        assert_eq!(store.len(), 2);
        assert_eq!(store.evicted().await.ok(), Some(1));
    }
}
