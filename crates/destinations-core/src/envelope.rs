//! One recorded send, as it travels from the caller to its destination.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of one send: a UUIDv7, so ids sort by the time they were made.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

/// Hashes by the id's random low 64 bits: with [`IdHasher`], a map keyed by send ids hashes
/// without SipHash's cost on the send path.
impl std::hash::Hash for EventId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.as_u64_pair().1);
    }
}

/// A hasher for [`EventId`] keys (already random): spreads the bits with one multiply.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by send ids.
pub type IdMap<V> = std::collections::HashMap<EventId, V, std::hash::BuildHasherDefault<IdHasher>>;

impl EventId {
    /// A new id for a send made now.
    pub fn new() -> Self {
        Self::at(SystemTime::now())
    }

    /// A new id for a send made at `time`.
    pub fn at(time: SystemTime) -> Self {
        // Built from a thread-local fast generator rather than `Uuid::now_v7`, which asks the
        // OS for randomness on every call: ids are made on the send path.
        let millis = time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let random = fastrand::u128(..).to_le_bytes();
        let mut tail = [0u8; 10];
        tail.copy_from_slice(&random[..10]);
        Self(uuid::Builder::from_unix_timestamp_millis(millis, &tail).into_uuid())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The id's 16 bytes (what a durable queue stores).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.into_bytes()
    }

    /// An id from its 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }

    /// When the id was made, to the millisecond (a UUIDv7 begins with it).
    pub fn time(self) -> SystemTime {
        let bytes = self.to_bytes();
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&bytes[..6]);
        SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(u64::from_be_bytes(ms))
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text was not a send id.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a send id (expected a UUID such as 0192f5c4-8c5e-7b1a-9f3e-1c2d3e4f5a6b)")]
pub struct InvalidEventId(String);

impl FromStr for EventId {
    type Err = InvalidEventId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| InvalidEventId(s.to_owned()))
    }
}

/// One recorded send.
///
/// The payload is the destination's request, serialized to JSON once at send time; nothing on
/// the delivery path serializes it again.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The send's id.
    pub id: EventId,
    /// The destination instance it goes to (`http`, `archive`, ...).
    pub destination: Arc<str>,
    /// The run that sent it, if any.
    pub run: Option<Arc<str>>,
    /// When it was sent.
    pub created_at: SystemTime,
    /// How many delivery attempts have been made so far.
    pub attempts: u32,
    /// The destination's request as JSON bytes.
    pub payload: Bytes,
    /// When the send's retry budget (`retry.max_age`) began: when it was accepted, or last
    /// replayed. On this process's monotonic clock, so a wall-clock jump cannot age it.
    budget_since: Option<tokio::time::Instant>,
}

impl Envelope {
    /// A fresh envelope for a send made now.
    pub fn new(destination: Arc<str>, run: Option<Arc<str>>, payload: Bytes) -> Self {
        let now = SystemTime::now();
        Self {
            id: EventId::at(now),
            destination,
            run,
            created_at: now,
            attempts: 0,
            payload,
            budget_since: None,
        }
    }

    /// An envelope as a durable queue stored it: `budget_started` is when its retry budget
    /// began ([`budget_started_at`](Self::budget_started_at) when it was stored).
    pub fn restored(
        id: EventId,
        destination: Arc<str>,
        run: Option<Arc<str>>,
        created_at: SystemTime,
        attempts: u32,
        payload: Bytes,
        budget_started: SystemTime,
    ) -> Self {
        let ago = SystemTime::now()
            .duration_since(budget_started)
            .unwrap_or_default();
        let now = tokio::time::Instant::now();
        Self {
            id,
            destination,
            run,
            created_at,
            attempts,
            payload,
            budget_since: Some(now.checked_sub(ago).unwrap_or(now)),
        }
    }

    /// The payload's size in bytes.
    pub fn size(&self) -> usize {
        self.payload.len()
    }

    /// Start the retry budget now, unless it has started (the hub does this as it accepts a
    /// send; [`restart_budget`](Self::restart_budget) for a replay).
    pub fn start_budget(&mut self, now: tokio::time::Instant) {
        self.budget_since.get_or_insert(now);
    }

    /// Start a fresh retry budget now (a replayed dead letter).
    pub fn restart_budget(&mut self, now: tokio::time::Instant) {
        self.budget_since = Some(now);
    }

    /// How much of the retry budget is spent: the time since the send was accepted (or last
    /// replayed), on the monotonic clock; from `created_at` if it never was.
    pub fn age(&self) -> Duration {
        match self.budget_since {
            Some(since) => since.elapsed(),
            None => SystemTime::now()
                .duration_since(self.created_at)
                .unwrap_or_default(),
        }
    }

    /// When the retry budget began, by the wall clock (what a durable queue stores).
    pub fn budget_started_at(&self) -> SystemTime {
        match self.budget_since {
            Some(since) => SystemTime::now()
                .checked_sub(since.elapsed())
                .unwrap_or(self.created_at),
            None => self.created_at,
        }
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for EventId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::Custom(
                "uuid".to_owned(),
            )))
            .description(Some(
                "A send's id: a UUIDv7, so ids sort by when their sends were made",
            ))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for EventId {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_distinct_and_time_ordered_across_milliseconds() {
        let a = EventId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = EventId::new();
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!(a < b, "{a} should sort before {b}");
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| EventId::new()).collect();
        assert_eq!(many.len(), 10_000);
    }

    #[test]
    fn ids_round_trip_through_text() {
        let id = EventId::new();
        assert_eq!(id.to_string().parse::<EventId>().ok(), Some(id));
        assert!("nope".parse::<EventId>().is_err());
    }
}
