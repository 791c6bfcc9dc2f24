//! The chunks held in memory beside the file: those with sends leased or waiting in a line
//! with their envelopes. A settlement changes a chunk here and hands the change to the writer;
//! a chunk leaves memory when none of its sends are here any more, and is read back from the
//! file when one is wanted again.
//!
//! Reading a chunk back races with the chunk's life in memory, so a read pins what it found
//! in memory and registers what it reads from the file: a chunk that came into memory,
//! changed and left again while it was being read makes the copy read stale, and the read is
//! made again.

use std::collections::HashMap;
use std::sync::Arc;

use destinations_core::{Envelope, SendStatus};

use crate::chunk::{Outcome, Record, Runs};
use crate::rows::{self, from_ms};
use crate::writer::Written;

/// How many of a chunk's last outcomes a new one is compared with, to share it.
const RECENT_OUTCOMES: usize = 16;

/// A chunk with sends in memory: leased, or waiting in a line with their envelopes. Other
/// chunks stay on disk only, and are read back with their sends' payloads.
pub(crate) struct ChunkState {
    pub(crate) destination: Arc<str>,
    pub(crate) records: Vec<Record>,
    pub(crate) runs: Runs,
    outcomes: Vec<Outcome>,
    /// The outcomes serialized, while they stay the same.
    outcomes_json: Option<Arc<str>>,
    /// Changes made to the outcomes in memory.
    pub(crate) outcomes_version: u64,
    /// The last of those changes the file has.
    pub(crate) outcomes_written: u64,
    pub(crate) pending: u32,
    pub(crate) created_ms: i64,
    pub(crate) budget_ms: i64,
    /// Its sends in memory (leased, or in a line with their envelope).
    pub(crate) resident: u32,
}

impl ChunkState {
    pub(crate) fn written(destination: Arc<str>, written: Written) -> Self {
        let count = u32::try_from(written.records.len()).unwrap_or(u32::MAX);
        Self {
            destination,
            pending: count,
            resident: count,
            records: written.records,
            runs: written.runs,
            outcomes: Vec::new(),
            outcomes_json: None,
            outcomes_version: 0,
            outcomes_written: 0,
            created_ms: written.created_ms,
            budget_ms: written.budget_ms,
        }
    }

    /// A chunk read back from the file, for `resident` of its sends.
    pub(crate) fn stored(stored: rows::StoredChunk, resident: u32) -> Self {
        Self {
            destination: Arc::from(stored.destination.as_str()),
            records: stored.records,
            runs: stored.runs,
            outcomes_version: 0,
            outcomes_written: 0,
            outcomes: stored.outcomes,
            outcomes_json: None,
            pending: stored.pending,
            created_ms: stored.created_ms,
            budget_ms: stored.budget_ms,
            resident,
        }
    }

    /// The last outcome of send `index`.
    pub(crate) fn outcome_of(&self, index: usize) -> Option<&Outcome> {
        let at = (self.records.get(index)?.outcome as usize).checked_sub(1)?;
        self.outcomes.get(at)
    }

    /// Keep `outcome` for a send: sends that came to the same (a batch, deliveries answered
    /// alike) share it. Its number, for the send's record.
    pub(crate) fn add_outcome(&mut self, outcome: Outcome) -> u32 {
        // Sends answered alike settle together, so a match is among the last few: looking
        // further would cost every settlement the whole list (a backlog deferred again and
        // again adds one outcome per batch).
        let recent = self.outcomes.len().saturating_sub(RECENT_OUTCOMES);
        let at = match self.outcomes[recent..]
            .iter()
            .rposition(|known| *known == outcome)
        {
            Some(at) => recent + at,
            None => {
                self.push_outcome(outcome);
                self.outcomes.len() - 1
            }
        };
        u32::try_from(at + 1).unwrap_or(u32::MAX)
    }

    /// A new outcome at the end. The outcomes serialized so far are extended rather than
    /// serialized again: each settlement hands them to the writer, and a chunk of a long
    /// backlog may hold thousands.
    fn push_outcome(&mut self, outcome: Outcome) {
        let extended = self.outcomes_json.as_deref().and_then(|json| {
            let element = serde_json::to_string(&outcome).ok()?;
            let open = json.strip_suffix(']')?;
            let separator = if self.outcomes.is_empty() { "" } else { "," };
            Some(Arc::<str>::from(format!("{open}{separator}{element}]")))
        });
        self.outcomes.push(outcome);
        self.outcomes_version += 1;
        self.outcomes_json = extended;
    }

    fn changed_outcomes(&mut self) {
        self.outcomes_json = None;
        self.outcomes_version += 1;
    }

    /// Drop the outcomes no send refers to any more (every retry adds one), once they
    /// outnumber the sends; true if the records were renumbered (all are to be written).
    pub(crate) fn compact_outcomes(&mut self) -> bool {
        if self.outcomes.len() <= 2 * self.records.len() + 16 {
            return false;
        }
        let mut renumbered = vec![0u32; self.outcomes.len()];
        let mut kept = Vec::new();
        for record in &mut self.records {
            let Some(at) = (record.outcome as usize).checked_sub(1) else {
                continue;
            };
            let Some(outcome) = self.outcomes.get(at) else {
                continue;
            };
            if renumbered[at] == 0 {
                kept.push(outcome.clone());
                renumbered[at] = u32::try_from(kept.len()).unwrap_or(u32::MAX);
            }
            record.outcome = renumbered[at];
        }
        self.outcomes = kept;
        self.changed_outcomes();
        true
    }

    /// The outcomes, serialized, if the file lacks some change to them: they go with every
    /// update until one is committed.
    pub(crate) fn outcomes_to_write(&mut self) -> Option<Arc<str>> {
        if self.outcomes_version <= self.outcomes_written {
            return None;
        }
        let outcomes = &self.outcomes;
        Some(
            self.outcomes_json
                .get_or_insert_with(|| {
                    serde_json::to_string(outcomes)
                        .unwrap_or_else(|_| "[]".to_owned())
                        .into()
                })
                .clone(),
        )
    }

    pub(crate) fn status(&self, record: &Record) -> SendStatus {
        rows::status_in(
            &self.destination,
            &self.runs,
            &self.outcomes,
            self.created_ms,
            record,
        )
    }

    /// The envelope of send `index`, from its payload.
    pub(crate) fn envelope(&self, index: usize, payload: &[u8]) -> Option<Envelope> {
        let record = self.records.get(index)?;
        Some(Envelope::restored(
            record.id,
            self.destination.clone(),
            self.runs.get(record.run),
            from_ms(record.created_ms),
            u32::from(record.attempts),
            bytes::Bytes::copy_from_slice(payload),
            from_ms(self.budget_ms),
        ))
    }
}

/// The chunks in memory, and those being read back from the file.
#[derive(Default)]
pub(crate) struct Resident {
    chunks: HashMap<i64, ChunkState>,
    /// Chunks being read from the file: by how many reads, and how often each left memory.
    loading: HashMap<i64, Loading>,
}

#[derive(Default)]
struct Loading {
    reads: u32,
    departures: u64,
}

/// A read of chunks under way: those pinned in memory, and those read from the file (with
/// how often each had left memory when the read began).
pub(crate) struct Reading {
    pinned: Vec<i64>,
    pub(crate) cold: Vec<i64>,
    departures: Vec<u64>,
}

impl Resident {
    pub(crate) fn get(&self, seq: i64) -> Option<&ChunkState> {
        self.chunks.get(&seq)
    }

    pub(crate) fn get_mut(&mut self, seq: i64) -> Option<&mut ChunkState> {
        self.chunks.get_mut(&seq)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&i64, &ChunkState)> {
        self.chunks.iter()
    }

    /// A chunk just written, with all its sends in memory.
    pub(crate) fn insert(&mut self, seq: i64, chunk: ChunkState) {
        self.chunks.insert(seq, chunk);
    }

    /// `count` sends of chunk `seq` left memory.
    pub(crate) fn leave(&mut self, seq: i64, count: u32) {
        if let Some(chunk) = self.chunks.get_mut(&seq) {
            chunk.resident = chunk.resident.saturating_sub(count);
        }
        self.drop_if_idle(seq);
    }

    /// Chunk `seq` leaves if none of its sends is in memory, or none is pending.
    pub(crate) fn drop_if_idle(&mut self, seq: i64) {
        if self
            .chunks
            .get(&seq)
            .is_some_and(|chunk| chunk.resident == 0 || chunk.pending == 0)
        {
            self.chunks.remove(&seq);
            if let Some(loading) = self.loading.get_mut(&seq) {
                loading.departures += 1;
            }
        }
    }

    /// Begin reading chunks `seqs`: those in memory stay there until [`Resident::end_read`],
    /// the others are to be read from the file.
    pub(crate) fn begin_read(&mut self, seqs: &[i64]) -> Reading {
        let mut reading = Reading {
            pinned: Vec::new(),
            cold: Vec::new(),
            departures: Vec::new(),
        };
        for &seq in seqs {
            if let Some(chunk) = self.chunks.get_mut(&seq) {
                chunk.resident += 1;
                reading.pinned.push(seq);
            } else {
                let loading = self.loading.entry(seq).or_default();
                loading.reads += 1;
                reading.cold.push(seq);
                reading.departures.push(loading.departures);
            }
        }
        reading
    }

    /// The chunks read from the file arrived: kept (unless a fresher copy is in memory now)
    /// and true, or false when one may have changed while it was read (read again).
    pub(crate) fn arrived(&mut self, reading: &Reading, stored: Vec<rows::StoredChunk>) -> bool {
        let mut fresh = true;
        for (seq, departures) in reading.cold.iter().zip(&reading.departures) {
            let Some(loading) = self.loading.get_mut(seq) else {
                continue;
            };
            if loading.departures != *departures && !self.chunks.contains_key(seq) {
                fresh = false;
            }
            loading.reads -= 1;
            if loading.reads == 0 {
                self.loading.remove(seq);
            }
        }
        if fresh {
            for chunk in stored {
                self.chunks
                    .entry(chunk.seq)
                    .or_insert_with(|| ChunkState::stored(chunk, 0));
            }
        }
        fresh
    }

    /// The read is over: the chunks it pinned are free to leave memory.
    pub(crate) fn end_read(&mut self, reading: Reading) {
        for seq in reading.pinned {
            self.leave(seq, 1);
        }
        for seq in reading.cold {
            self.drop_if_idle(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Runs;

    fn stored(seq: i64, pending: u32) -> rows::StoredChunk {
        rows::StoredChunk {
            seq,
            destination: "http".to_owned(),
            created_ms: 0,
            budget_ms: 0,
            pending,
            records: Vec::new(),
            runs: Runs::default(),
            outcomes: Vec::new(),
        }
    }

    /// Chunk `seq` in memory with one send there.
    fn with_one_resident(seq: i64) -> Resident {
        let mut resident = Resident::default();
        resident.insert(seq, ChunkState::stored(stored(seq, 1), 1));
        resident
    }

    fn record(outcome: u32) -> Record {
        Record {
            id: destinations_core::EventId::new(),
            created_ms: 0,
            updated_ms: 0,
            size: 0,
            elapsed_ms: 0,
            attempts: 1,
            state: crate::chunk::Stored::Retrying,
            run: 0,
            outcome,
        }
    }

    fn retried(batch: i64) -> Outcome {
        Outcome {
            run_at_ms: Some(batch * 1000),
            batch: Some(batch),
            error: Some(format!("failure {batch}")),
            response: None,
        }
    }

    #[test]
    fn outcomes_extended_in_place_read_as_if_serialized_whole() {
        let mut chunk = ChunkState::stored(stored(1, 1), 1);
        assert_eq!(chunk.outcomes_to_write(), None, "nothing changed yet");
        for batch in 1..=50 {
            chunk.add_outcome(retried(batch));
            // Shared with the last one: no new outcome.
            assert_eq!(
                chunk.add_outcome(retried(batch)) as usize,
                chunk.outcomes.len()
            );
            let written = chunk
                .outcomes_to_write()
                .unwrap_or_else(|| panic!("changed"));
            let whole = serde_json::to_string(&chunk.outcomes).unwrap_or_default();
            assert_eq!(&*written, whole.as_str(), "after {batch} outcomes");
            let read: Vec<Outcome> = serde_json::from_str(&written).unwrap_or_default();
            assert_eq!(read, chunk.outcomes);
        }
    }

    #[test]
    fn outcomes_no_send_refers_to_leave_and_the_rest_keep_their_sends() {
        let mut chunk = ChunkState::stored(stored(1, 2), 2);
        chunk.records = vec![record(0), record(0)];
        for batch in 1..=40 {
            let index = usize::try_from(batch % 2).unwrap_or(0);
            let number = chunk.add_outcome(retried(batch));
            chunk.records[index].outcome = number;
        }
        assert_eq!(chunk.outcomes.len(), 40, "each retry kept its own");
        let before: Vec<Option<Outcome>> = (0..2).map(|i| chunk.outcome_of(i).cloned()).collect();
        let version = chunk.outcomes_version;
        assert!(chunk.compact_outcomes());
        assert_eq!(chunk.outcomes.len(), 2);
        let after: Vec<Option<Outcome>> = (0..2).map(|i| chunk.outcome_of(i).cloned()).collect();
        assert_eq!(before, after);
        assert!(chunk.outcomes_version > version, "the file is to get them");
        assert!(chunk.outcomes_to_write().is_some());
        assert!(!chunk.compact_outcomes(), "nothing more to drop");
    }

    #[test]
    fn a_chunk_being_read_stays_in_memory_when_its_last_send_leaves() {
        let mut resident = with_one_resident(1);
        let reading = resident.begin_read(&[1]);
        assert!(reading.cold.is_empty(), "found in memory");
        resident.leave(1, 1);
        assert!(resident.get(1).is_some(), "pinned by the read");
        assert!(resident.arrived(&reading, Vec::new()));
        resident.end_read(reading);
        assert!(resident.get(1).is_none(), "left once the read ended");
    }

    #[test]
    fn a_copy_read_while_the_chunk_came_and_went_is_read_again() {
        let mut resident = Resident::default();
        let reading = resident.begin_read(&[1]);
        assert_eq!(reading.cold, [1]);
        // Meanwhile another read brought it into memory, a settlement changed it, and it left.
        resident.insert(1, ChunkState::stored(stored(1, 1), 1));
        resident.leave(1, 1);
        assert!(!resident.arrived(&reading, vec![stored(1, 1)]));
        assert!(resident.get(1).is_none(), "the stale copy is not kept");
        resident.end_read(reading);

        let again = resident.begin_read(&[1]);
        assert!(resident.arrived(&again, vec![stored(1, 1)]));
        assert!(resident.get(1).is_some());
    }

    #[test]
    fn a_copy_in_memory_wins_over_the_one_read() {
        let mut resident = Resident::default();
        let reading = resident.begin_read(&[1]);
        resident.insert(1, ChunkState::stored(stored(1, 7), 1));
        assert!(resident.arrived(&reading, vec![stored(1, 1)]));
        assert_eq!(resident.get(1).map(|c| c.pending), Some(7));
    }
}
