//! How sends are stored: in chunks — the sends one change queued for one destination instance
//! (a run's sends, a delivery's follow-ups) — written as one row, so the file does work per
//! run and per batch rather than per send.
//!
//! A chunk row holds a fixed-size record per send (id, when it was sent, its size, attempts,
//! state, run and outcome), the distinct runs and outcomes its sends refer to, and, in a table
//! of its own, the payloads back to back. A settlement rewrites the records of the chunks it
//! touches; the payloads leave the file as soon as every send of the chunk is final.

use std::sync::Arc;

use destinations_core::{EventId, ResponseSummary, State};
use serde::{Deserialize, Serialize};

/// Bytes of one send's record.
pub(crate) const RECORD: usize = 52;

/// Where a send stands, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Stored {
    Queued = 0,
    Retrying = 1,
    Delivered = 2,
    Dead = 3,
}

impl Stored {
    fn from_byte(byte: u8) -> Self {
        match byte {
            1 => Self::Retrying,
            2 => Self::Delivered,
            3 => Self::Dead,
            _ => Self::Queued,
        }
    }

    pub(crate) fn state(self) -> State {
        match self {
            Self::Queued => State::Queued,
            Self::Retrying => State::Retrying,
            Self::Delivered => State::Delivered,
            Self::Dead => State::Dead,
        }
    }

    pub(crate) fn is_final(self) -> bool {
        matches!(self, Self::Delivered | Self::Dead)
    }
}

/// One send of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) id: EventId,
    pub(crate) created_ms: i64,
    /// When its state last changed (0: when its chunk was written).
    pub(crate) updated_ms: i64,
    /// Payload bytes.
    pub(crate) size: u32,
    /// How long its last attempt took (kept here, so that outcomes that differ only by it are
    /// shared).
    pub(crate) elapsed_ms: u32,
    pub(crate) attempts: u16,
    pub(crate) state: Stored,
    /// 1 + the index of its run in the chunk's runs; 0 for none.
    pub(crate) run: u16,
    /// 1 + the index of its last outcome in the chunk's outcomes; 0 for none.
    pub(crate) outcome: u32,
}

impl Record {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_bytes());
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        out.extend_from_slice(&self.updated_ms.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.elapsed_ms.to_be_bytes());
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.push(self.state as u8);
        out.push(0);
        out.extend_from_slice(&self.run.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.outcome.to_be_bytes());
    }

    fn read(bytes: &[u8]) -> Option<Self> {
        let field = |from: usize, to: usize| bytes.get(from..to);
        Some(Self {
            id: EventId::from_bytes(field(0, 16)?.try_into().ok()?),
            created_ms: i64::from_be_bytes(field(16, 24)?.try_into().ok()?),
            updated_ms: i64::from_be_bytes(field(24, 32)?.try_into().ok()?),
            size: u32::from_be_bytes(field(32, 36)?.try_into().ok()?),
            elapsed_ms: u32::from_be_bytes(field(36, 40)?.try_into().ok()?),
            attempts: u16::from_be_bytes(field(40, 42)?.try_into().ok()?),
            state: Stored::from_byte(*bytes.get(42)?),
            run: u16::from_be_bytes(field(44, 46)?.try_into().ok()?),
            outcome: u32::from_be_bytes(field(48, 52)?.try_into().ok()?),
        })
    }
}

/// One record, as stored.
pub(crate) fn encode_record(record: &Record) -> [u8; RECORD] {
    let mut out = Vec::with_capacity(RECORD);
    record.write(&mut out);
    let mut bytes = [0u8; RECORD];
    bytes.copy_from_slice(&out);
    bytes
}

/// The records of a chunk, as stored.
pub(crate) fn encode_records(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * RECORD);
    for record in records {
        record.write(&mut out);
    }
    out
}

/// The records of a chunk from their stored bytes (`None` if they are damaged).
pub(crate) fn decode_records(bytes: &[u8]) -> Option<Vec<Record>> {
    if !bytes.len().is_multiple_of(RECORD) {
        return None;
    }
    bytes.chunks_exact(RECORD).map(Record::read).collect()
}

/// What an attempt came to, shared by the sends of a chunk it came to the same for (the
/// time and the attempt's duration are in each send's record).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Outcome {
    /// For a retry: when the next attempt is due, and the batch it retries with.
    #[serde(rename = "at", default, skip_serializing_if = "Option::is_none")]
    pub(crate) run_at_ms: Option<i64>,
    #[serde(rename = "b", default, skip_serializing_if = "Option::is_none")]
    pub(crate) batch: Option<i64>,
    /// The error (for a dead send, the reason).
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// What the target answered.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub(crate) response: Option<ResponseSummary>,
}

/// The first bytes of a chunk's payload data.
const PAYLOADS_MAGIC: &[u8; 4] = b"DQP1";

/// One send as the payload data holds it: enough to give it back without its chunk's row (a
/// damaged file may have lost that row and kept this).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PayloadEntry<'a> {
    pub(crate) id: EventId,
    pub(crate) created_ms: i64,
    pub(crate) run: Option<&'a str>,
    pub(crate) payload: &'a [u8],
}

/// A chunk's payload data: its destination, then each send (id, when, run, payload).
pub(crate) fn encode_payloads<'a>(
    destination: &str,
    sends: impl Iterator<Item = (EventId, i64, Option<&'a str>, &'a [u8])>,
    capacity: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity + 64);
    out.extend_from_slice(PAYLOADS_MAGIC);
    write_str(&mut out, destination);
    for (id, created_ms, run, payload) in sends {
        out.extend_from_slice(&id.to_bytes());
        out.extend_from_slice(&created_ms.to_be_bytes());
        write_str(&mut out, run.unwrap_or(""));
        out.extend_from_slice(
            &u32::try_from(payload.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(payload);
    }
    out
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads a chunk's payload data.
pub(crate) struct Payloads<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Payloads<'a> {
    /// The payload data, and the destination it is for (`None` if it is not payload data).
    pub(crate) fn read(data: &'a [u8]) -> Option<(&'a str, Self)> {
        if data.get(..4)? != PAYLOADS_MAGIC {
            return None;
        }
        let mut payloads = Self { data, at: 4 };
        let destination = payloads.str()?;
        Some((destination, payloads))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
        std::str::from_utf8(self.take(usize::from(len))?).ok()
    }
}

impl<'a> Iterator for Payloads<'a> {
    type Item = PayloadEntry<'a>;

    /// The next send; `None` at the end (or where the data is torn).
    fn next(&mut self) -> Option<Self::Item> {
        let id = EventId::from_bytes(self.take(16)?.try_into().ok()?);
        let created_ms = i64::from_be_bytes(self.take(8)?.try_into().ok()?);
        let run = self.str()?;
        let size = u32::from_be_bytes(self.take(4)?.try_into().ok()?);
        let payload = self.take(size as usize)?;
        Some(PayloadEntry {
            id,
            created_ms,
            run: (!run.is_empty()).then_some(run),
            payload,
        })
    }
}

/// The runs a chunk's sends name: each distinct one once.
#[derive(Clone, Debug, Default)]
pub(crate) struct Runs(pub(crate) Vec<Arc<str>>);

impl Runs {
    /// The record's index for `run` (1-based; 0 for none), added on first sight.
    pub(crate) fn index(&mut self, run: Option<&Arc<str>>) -> u16 {
        let Some(run) = run else {
            return 0;
        };
        let at = match self.0.iter().position(|r| Arc::ptr_eq(r, run) || r == run) {
            Some(at) => at,
            None => {
                self.0.push(run.clone());
                self.0.len() - 1
            }
        };
        u16::try_from(at + 1).unwrap_or(u16::MAX)
    }

    /// The run of a record.
    pub(crate) fn get(&self, index: u16) -> Option<Arc<str>> {
        usize::from(index)
            .checked_sub(1)
            .and_then(|at| self.0.get(at))
            .cloned()
    }

    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "[]".to_owned())
    }

    pub(crate) fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str::<Vec<String>>(text)
            .ok()
            .map(|runs| Self(runs.into_iter().map(Arc::from).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let records: Vec<Record> = (0..3u16)
            .map(|n| Record {
                id: EventId::new(),
                created_ms: 1_764_000_000_000 + i64::from(n),
                updated_ms: 1_764_000_000_100 + i64::from(n),
                size: 250 + u32::from(n),
                elapsed_ms: 12,
                attempts: n,
                state: [Stored::Queued, Stored::Retrying, Stored::Dead][usize::from(n)],
                run: n,
                outcome: u32::from(n) * 7,
            })
            .collect();
        let bytes = encode_records(&records);
        assert_eq!(bytes.len(), 3 * RECORD);
        assert_eq!(decode_records(&bytes), Some(records));
        assert_eq!(decode_records(&bytes[..RECORD + 1]), None, "a torn record");
    }

    #[test]
    fn payload_data_gives_each_send_back_and_stops_where_it_is_torn() {
        let ids = [EventId::new(), EventId::new()];
        let sends = [
            (ids[0], 1, Some("run-1"), &b"{\"a\":1}"[..]),
            (ids[1], 2, None, &b"{}"[..]),
        ];
        let data = encode_payloads("http", sends.into_iter(), 16);
        let (destination, payloads) = Payloads::read(&data).unwrap_or_else(|| panic!("data"));
        assert_eq!(destination, "http");
        let entries: Vec<_> = payloads.collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].run, Some("run-1"));
        assert_eq!(entries[1].payload, b"{}");
        assert_eq!(entries[1].run, None);
        let torn = &data[..data.len() - 1];
        let (_, payloads) = Payloads::read(torn).unwrap_or_else(|| panic!("data"));
        assert_eq!(
            payloads.count(),
            1,
            "the torn send is left out, the others come back"
        );
        assert!(Payloads::read(b"nope").is_none());
    }

    #[test]
    fn runs_are_kept_once_and_found_again() {
        let mut runs = Runs::default();
        let a: Arc<str> = Arc::from("a");
        assert_eq!(runs.index(None), 0);
        assert_eq!(runs.index(Some(&a)), 1);
        assert_eq!(runs.index(Some(&Arc::from("b"))), 2);
        assert_eq!(runs.index(Some(&Arc::from("a"))), 1);
        let back = Runs::from_json(&runs.to_json()).unwrap_or_default();
        assert_eq!(back.get(2).as_deref(), Some("b"));
        assert_eq!(back.get(0), None);
    }
}
