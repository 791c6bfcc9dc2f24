//! The last N events of each emitter, newest first, with the ids and metadata the reference
//! platform shows: `{id: "<ms>-<seq>", event: {raw_event}, metadata: {emitter_id, emit_id, name}}`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::value::RawValue;

/// One event as the history endpoint shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// `<milliseconds since the epoch>-<sequence within that millisecond>`.
    pub id: String,
    /// The event, wrapped as `{"raw_event": {...}}`.
    pub event: RawEvent,
    /// Who emitted it, the send's id, and the channel.
    pub metadata: HistoryMetadata,
}

/// The legacy wrapping of a stored event.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct RawEvent {
    /// The event as emitted.
    #[schema(value_type = Object)]
    pub raw_event: Arc<RawValue>,
}

/// What is known of a stored event.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryMetadata {
    /// The emitter.
    pub emitter_id: String,
    /// The emit's send id.
    pub emit_id: String,
    /// The channel; `null` for the default one.
    pub name: Option<String>,
}

struct Emitter {
    entries: VecDeque<HistoryEntry>,
    last_ms: u64,
    seq: u64,
    last_used: u64,
}

/// The histories of every emitter of one instance, bounded in length, in emitters and in the
/// bytes of their events all together.
pub(crate) struct History {
    emitters: Mutex<HashMap<String, Emitter>>,
    keep: usize,
    max_emitters: usize,
    /// The most event bytes kept across emitters; past it the idlest emitters' oldest events
    /// go (review C6: 10 000 emitters × 100 events could otherwise hold any amount).
    max_bytes: usize,
    /// The event bytes kept now.
    bytes: std::sync::atomic::AtomicUsize,
}

/// The bytes an entry holds, as counted against the bound.
fn size(entry: &HistoryEntry) -> usize {
    entry.event.raw_event.get().len() + entry.id.len() + entry.metadata.emit_id.len()
}

impl History {
    pub(crate) fn new(keep: usize, max_emitters: usize, max_bytes: usize) -> Self {
        Self {
            emitters: Mutex::new(HashMap::new()),
            keep,
            max_emitters,
            max_bytes,
            bytes: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The next `<ms>-<seq>` id of `emitter`.
    pub(crate) fn next_id(&self, emitter: &str) -> String {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut emitters = self.emitters.lock().unwrap_or_else(PoisonError::into_inner);
        self.make_room(&mut emitters, emitter);
        let state = emitters.entry(emitter.to_owned()).or_insert(Emitter {
            entries: VecDeque::new(),
            last_ms: 0,
            seq: 0,
            last_used: ms,
        });
        // Ids never go backwards, even if the clock does.
        let ms = ms.max(state.last_ms);
        state.seq = if ms == state.last_ms {
            state.seq + 1
        } else {
            0
        };
        state.last_ms = ms;
        state.last_used = ms;
        format!("{ms}-{}", state.seq)
    }

    pub(crate) fn record(&self, entry: HistoryEntry) {
        use std::sync::atomic::Ordering::Relaxed;
        let added = size(&entry);
        if added > self.max_bytes {
            return;
        }
        let mut emitters = self.emitters.lock().unwrap_or_else(PoisonError::into_inner);
        // An emitter first seen here (its event made its id on another server) is made now.
        let emitter = entry.metadata.emitter_id.clone();
        self.make_room(&mut emitters, &emitter);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let state = emitters.entry(emitter).or_insert(Emitter {
            entries: VecDeque::new(),
            last_ms: 0,
            seq: 0,
            last_used: now,
        });
        if state.entries.len() == self.keep
            && let Some(old) = state.entries.pop_back()
        {
            self.bytes.fetch_sub(size(&old), Relaxed);
        }
        state.entries.push_front(entry);
        let mut total = self.bytes.fetch_add(added, Relaxed) + added;
        while total > self.max_bytes {
            // The idlest emitter with anything kept gives up its oldest event.
            let Some(idlest) = emitters
                .iter_mut()
                .filter(|(_, e)| !e.entries.is_empty())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(_, e)| e)
            else {
                break;
            };
            if let Some(old) = idlest.entries.pop_back() {
                total -= size(&old);
                self.bytes.fetch_sub(size(&old), Relaxed);
            }
        }
    }

    /// The newest `limit` events of `emitter`.
    pub(crate) fn recent(&self, emitter: &str, limit: usize) -> Vec<HistoryEntry> {
        let emitters = self.emitters.lock().unwrap_or_else(PoisonError::into_inner);
        emitters
            .get(emitter)
            .map(|state| state.entries.iter().take(limit).cloned().collect())
            .unwrap_or_default()
    }

    fn make_room(&self, emitters: &mut HashMap<String, Emitter>, emitter: &str) {
        if emitters.len() >= self.max_emitters && !emitters.contains_key(emitter) {
            let idlest = emitters
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(name, _)| name.clone());
            if let Some(forgotten) = idlest.and_then(|idlest| emitters.remove(&idlest)) {
                let freed: usize = forgotten.entries.iter().map(size).sum();
                self.bytes
                    .fetch_sub(freed, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(history: &History, emitter: &str, n: u32) -> HistoryEntry {
        HistoryEntry {
            id: history.next_id(emitter),
            event: RawEvent {
                raw_event: Arc::from(
                    serde_json::value::to_raw_value(&serde_json::json!({"n": n}))
                        .unwrap_or_else(|_| RawValue::NULL.to_owned()),
                ),
            },
            metadata: HistoryMetadata {
                emitter_id: emitter.into(),
                emit_id: format!("e{n}"),
                name: None,
            },
        }
    }

    #[test]
    fn the_byte_bound_takes_from_the_idlest_emitter_first() {
        let one = size(&entry(&History::new(1, 1, 1), "x", 0));
        let history = History::new(100, 10, one * 5);
        for n in 0..3 {
            let e = entry(&history, "idle", n);
            history.record(e);
        }
        // Idle since long ago (ids are in milliseconds: both would be of the same one).
        if let Some(idle) = history
            .emitters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut("idle")
        {
            idle.last_used = 0;
        }
        for n in 0..4 {
            let e = entry(&history, "busy", n);
            history.record(e);
        }
        assert_eq!(history.recent("busy", 10).len(), 4);
        assert_eq!(
            history.recent("idle", 10).len(),
            1,
            "the idle one gave up its oldest"
        );
        assert!(history.bytes.load(std::sync::atomic::Ordering::Relaxed) <= one * 5);
    }

    #[test]
    fn newest_first_bounded_with_increasing_ids() {
        let history = History::new(3, 10, 1 << 20);
        for n in 0..5 {
            let e = entry(&history, "p", n);
            history.record(e);
        }
        let recent = history.recent("p", 10);
        let ids: Vec<&str> = recent.iter().map(|e| e.metadata.emit_id.as_str()).collect();
        assert_eq!(ids, ["e4", "e3", "e2"]);
        let parsed: Vec<(u64, u64)> = recent
            .iter()
            .map(|e| {
                let (ms, seq) = e.id.split_once('-').unwrap_or_default();
                (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
            })
            .collect();
        assert!(parsed.windows(2).all(|w| w[0] > w[1]), "{parsed:?}");
        assert_eq!(history.recent("p", 1).len(), 1);
    }
}
