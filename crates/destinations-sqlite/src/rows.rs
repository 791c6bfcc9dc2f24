//! Reading the file back: chunks at start, payloads when their turn comes, a send's status,
//! dead letters.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use destinations_core::{
    Attempt, DeadLetter, DeadLetterFilter, DeadLetterPage, Envelope, EventFilter, EventId,
    QueueError, SendStatus, State,
};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::chunk::{Outcome, Record, Runs, Stored, decode_records};

/// Milliseconds since the epoch.
pub(crate) fn to_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A time from milliseconds since the epoch.
pub(crate) fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The time (ms) in a send id: ids are UUIDv7, their first 48 bits the time they were made.
pub(crate) fn id_ms(id: EventId) -> i64 {
    let bytes = id.to_bytes();
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&bytes[..6]);
    i64::from_be_bytes(ms)
}

/// A chunk as the file holds it (its payloads apart).
pub(crate) struct StoredChunk {
    pub(crate) seq: i64,
    pub(crate) destination: String,
    pub(crate) created_ms: i64,
    pub(crate) budget_ms: i64,
    pub(crate) pending: u32,
    pub(crate) records: Vec<Record>,
    pub(crate) runs: Runs,
    pub(crate) outcomes: Vec<Outcome>,
}

const CHUNK_COLUMNS: &str = "seq, destination, created_ms, budget_ms, records, runs, outcomes";

fn stored_chunk(row: &Row<'_>) -> rusqlite::Result<StoredChunk> {
    let damaged = |what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            format!("chunk {what} cannot be read").into(),
        )
    };
    let records: Vec<u8> = row.get("records")?;
    let runs: String = row.get("runs")?;
    let outcomes: String = row.get("outcomes")?;
    let records = decode_records(&records).ok_or_else(|| damaged("records"))?;
    Ok(StoredChunk {
        seq: row.get("seq")?,
        destination: row.get("destination")?,
        created_ms: row.get("created_ms")?,
        budget_ms: row.get("budget_ms")?,
        pending: records
            .iter()
            .filter(|record| !record.state.is_final())
            .count()
            .try_into()
            .unwrap_or(u32::MAX),
        records,
        runs: Runs::from_json(&runs).ok_or_else(|| damaged("runs"))?,
        outcomes: serde_json::from_str(&outcomes).map_err(|_| damaged("outcomes"))?,
    })
}

/// Every chunk with sends not final, oldest first.
pub(crate) fn pending_chunks(conn: &Connection) -> rusqlite::Result<Vec<StoredChunk>> {
    let mut statement = conn.prepare(&format!(
        "SELECT {CHUNK_COLUMNS} FROM chunks WHERE finished_ms IS NULL ORDER BY seq"
    ))?;
    let rows = statement.query_map([], stored_chunk)?;
    rows.collect()
}

/// These chunks (those still there).
pub(crate) fn chunks(conn: &Connection, seqs: &[i64]) -> rusqlite::Result<Vec<StoredChunk>> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let array: Rc<Vec<Value>> = Rc::new(seqs.iter().map(|s| Value::Integer(*s)).collect());
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {CHUNK_COLUMNS} FROM chunks WHERE seq IN rarray(?1)"
    ))?;
    let rows = statement.query_map([array], stored_chunk)?;
    rows.collect()
}

/// Every finished chunk as (seq, sends, when it finished), oldest finish first: what the
/// retention removes first.
pub(crate) fn finished_chunks(conn: &Connection) -> rusqlite::Result<Vec<(i64, usize, i64)>> {
    let mut statement = conn.prepare(
        "SELECT seq, count, finished_ms FROM chunks WHERE finished_ms IS NOT NULL
         ORDER BY 3, seq",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get(0)?,
            usize::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
            row.get(2)?,
        ))
    })?;
    rows.collect()
}

/// The payload data of these chunks (those whose payloads are still there).
pub(crate) fn payloads(conn: &Connection, seqs: &[i64]) -> rusqlite::Result<HashMap<i64, Bytes>> {
    let array: Rc<Vec<Value>> = Rc::new(seqs.iter().map(|s| Value::Integer(*s)).collect());
    let mut statement =
        conn.prepare_cached("SELECT seq, data FROM payloads WHERE seq IN rarray(?1)")?;
    let rows = statement.query_map([array], |row| {
        Ok((row.get(0)?, Bytes::from(row.get::<_, Vec<u8>>(1)?)))
    })?;
    rows.collect()
}

/// The newest chunk that holds send `id` (a replayed send is in a newer chunk than the one it
/// died in), with its index there. `longest` is the longest time between the first and last
/// send of any chunk, which bounds where to look.
pub(crate) fn chunk_of(
    conn: &Connection,
    id: EventId,
    longest: i64,
) -> rusqlite::Result<Option<(StoredChunk, usize)>> {
    let at = id_ms(id);
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {CHUNK_COLUMNS} FROM chunks
         WHERE first_ms BETWEEN ?1 AND ?2 AND last_id >= ?3 ORDER BY seq DESC"
    ))?;
    let mut rows = statement.query(params![at - longest, at, id.to_bytes()])?;
    while let Some(row) = rows.next()? {
        let chunk = stored_chunk(row)?;
        if let Some(index) = chunk.records.iter().position(|r| r.id == id) {
            return Ok(Some((chunk, index)));
        }
    }
    Ok(None)
}

/// The status of send `index` of a chunk.
pub(crate) fn status_in(
    destination: &Arc<str>,
    runs: &Runs,
    outcomes: &[Outcome],
    created_ms: i64,
    record: &Record,
) -> SendStatus {
    let outcome = (record.outcome as usize)
        .checked_sub(1)
        .and_then(|at| outcomes.get(at));
    let state = record.state.state();
    SendStatus {
        id: record.id,
        destination: destination.clone(),
        run: runs.get(record.run),
        state,
        attempts: u32::from(record.attempts),
        last_error: outcome.and_then(|o| o.error.clone()),
        response: outcome
            .and_then(|o| o.response.clone())
            .map(|mut response| {
                response.elapsed_ms = u64::from(record.elapsed_ms);
                response
            }),
        created_at: from_ms(record.created_ms),
        updated_at: from_ms(if record.updated_ms == 0 {
            created_ms
        } else {
            record.updated_ms
        }),
        next_attempt_at: (state == State::Retrying)
            .then(|| outcome.and_then(|o| o.run_at_ms).map(from_ms))
            .flatten(),
        attempts_log: None,
    }
}

/// The failed attempts the file keeps of send `id`, oldest first.
pub(crate) fn attempts_of(conn: &Connection, id: EventId) -> rusqlite::Result<Vec<Attempt>> {
    let mut statement =
        conn.prepare_cached("SELECT attempt FROM attempts WHERE id = ?1 ORDER BY seq")?;
    let rows = statement.query_map([id.to_bytes()], |row| row.get::<_, String>(0))?;
    let mut attempts = Vec::new();
    for text in rows {
        // An attempt this build cannot read is left out, not fatal to the status.
        if let Ok(attempt) = serde_json::from_str(&text?) {
            attempts.push(attempt);
        }
    }
    Ok(attempts)
}

/// A send found by a listing: its chunk, its place there, its status as the file has it.
pub(crate) struct Listed {
    pub(crate) seq: i64,
    pub(crate) index: usize,
    pub(crate) status: SendStatus,
}

/// The newest sends matching `filter` made before `before`, `limit + 1` at most (one more
/// than a page, to tell whether another follows), newest first. Chunks are read newest
/// first; reading stops once no older chunk can hold a send newer than those found
/// (`longest` bounds how far a chunk's sends spread after its first).
pub(crate) fn events(
    conn: &Connection,
    filter: &EventFilter,
    unfinished_only: bool,
    before: Option<EventId>,
    limit: usize,
    longest: i64,
) -> rusqlite::Result<Vec<Listed>> {
    let keep = limit.saturating_add(1);
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {CHUNK_COLUMNS}, first_ms FROM chunks
         WHERE first_ms <= ?1 AND first_ms < ?2 AND first_ms >= ?3
           AND (?4 IS NULL OR destination = ?4)
         ORDER BY first_ms DESC, seq DESC"
    ))?;
    let until = filter.until.map_or(i64::MAX, to_ms);
    let since = filter
        .since
        .map_or(i64::MIN, |since| to_ms(since) - longest);
    let mut rows = statement.query(params![
        before.map_or(i64::MAX, id_ms),
        until,
        since,
        filter.destination,
    ])?;
    // The newest found so far by id; a replayed send is in several chunks, the newest wins.
    let mut found: std::collections::BTreeMap<EventId, Listed> = Default::default();
    while let Some(row) = rows.next()? {
        let first_ms: i64 = row.get("first_ms")?;
        if found.len() >= keep
            && found
                .first_key_value()
                .is_some_and(|(oldest, _)| first_ms + longest < id_ms(*oldest))
        {
            break;
        }
        let chunk = stored_chunk(row)?;
        let destination: Arc<str> = Arc::from(chunk.destination.as_str());
        for (index, record) in chunk.records.iter().enumerate() {
            if before.is_some_and(|before| record.id >= before)
                || !filter.in_time(from_ms(record.created_ms))
                || filter
                    .state
                    .is_some_and(|state| record.state.state() != state)
                || (unfinished_only && record.state.is_final())
            {
                continue;
            }
            let status = status_in(
                &destination,
                &chunk.runs,
                &chunk.outcomes,
                chunk.created_ms,
                record,
            );
            if !filter.matches(&status) {
                continue;
            }
            // A dead send may have been replayed: then a newer chunk holds it, and its status
            // there is the one that counts.
            if record.state == Stored::Dead
                && chunk_of(conn, record.id, longest)?
                    .is_some_and(|(newest, _)| newest.seq != chunk.seq)
            {
                continue;
            }
            let newer_chunk = found
                .get(&record.id)
                .is_none_or(|seen| seen.seq < chunk.seq);
            if newer_chunk {
                found.insert(
                    record.id,
                    Listed {
                        seq: chunk.seq,
                        index,
                        status,
                    },
                );
            }
            if found.len() > keep {
                found.pop_first();
            }
        }
    }
    Ok(found.into_values().rev().collect())
}

/// The status of a dead letter whose chunk the retention removed.
pub(crate) fn dead_status(conn: &Connection, id: EventId) -> rusqlite::Result<Option<SendStatus>> {
    conn.prepare_cached(
        "SELECT destination, run, created_ms, attempts, died_ms, reason FROM dead WHERE id = ?1",
    )?
    .query_row([id.to_bytes()], |row| {
        Ok(SendStatus {
            id,
            destination: Arc::from(row.get::<_, String>(0)?),
            run: row.get::<_, Option<String>>(1)?.map(Arc::from),
            state: State::Dead,
            attempts: row.get(3)?,
            last_error: Some(row.get(5)?),
            response: None,
            created_at: from_ms(row.get(2)?),
            updated_at: from_ms(row.get(4)?),
            next_attempt_at: None,
            attempts_log: None,
        })
    })
    .optional()
}

/// Refuse a page cursor this queue did not make, before any read.
pub(crate) fn check_cursor(after: Option<&str>) -> Result<(), QueueError> {
    cursor(after)
        .map(|_| ())
        .map_err(|_| QueueError::InvalidCursor(after.unwrap_or_default().to_owned()))
}

/// A page cursor: when the last letter died, and its row.
fn cursor(after: Option<&str>) -> Result<(i64, i64), String> {
    let Some(after) = after else {
        return Ok((i64::MAX, i64::MAX));
    };
    after
        .split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .ok_or_else(|| format!("`{after}` is not a dead-letter cursor of this server"))
}

/// A dead letter from a row of `dead`.
pub(crate) fn dead_letter(row: &Row<'_>) -> rusqlite::Result<(i64, DeadLetter)> {
    let id: Vec<u8> = row.get("id")?;
    let id: [u8; 16] = id.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "id".into(), rusqlite::types::Type::Blob)
    })?;
    let died_ms: i64 = row.get("died_ms")?;
    let envelope = Envelope::restored(
        EventId::from_bytes(id),
        Arc::from(row.get::<_, String>("destination")?),
        row.get::<_, Option<String>>("run")?.map(Arc::from),
        from_ms(row.get("created_ms")?),
        row.get("attempts")?,
        Bytes::from(row.get::<_, Vec<u8>>("payload")?),
        from_ms(died_ms),
    );
    Ok((
        row.get("seq")?,
        DeadLetter {
            envelope,
            reason: row.get("reason")?,
            died_at: from_ms(died_ms),
        },
    ))
}

/// Dead letters matching `filter`, newest first. Letters asked for by id are looked up one by
/// one (at most 1 000, on the unique index of `id`).
pub(crate) fn dead_letters(
    conn: &Connection,
    filter: &DeadLetterFilter,
    after: Option<&str>,
    limit: usize,
) -> Result<DeadLetterPage, String> {
    let (before_ms, before_seq) = cursor(after)?;
    let run = || -> rusqlite::Result<DeadLetterPage> {
        let mut found = Vec::new();
        if let Some(ids) = &filter.ids {
            // By the unique index on `id`, the rest of the filter checked here.
            let mut by_id = conn.prepare_cached(
                "SELECT seq, id, destination, run, created_ms, attempts, died_ms, reason, payload
                 FROM dead WHERE id = ?1",
            )?;
            for id in ids {
                let mut rows = by_id.query([id.to_bytes()])?;
                while let Some(row) = rows.next()? {
                    let (seq, letter) = dead_letter(row)?;
                    let died_ms = to_ms(letter.died_at);
                    if (died_ms, seq) < (before_ms, before_seq) && filter.matches(&letter, None) {
                        found.push((seq, letter));
                    }
                }
            }
            found.sort_by_key(|(seq, letter)| std::cmp::Reverse((to_ms(letter.died_at), *seq)));
            found.dedup_by_key(|(seq, _)| *seq);
            found.truncate(limit.saturating_add(1));
        } else {
            let mut statement = conn.prepare_cached(
                "SELECT seq, id, destination, run, created_ms, attempts, died_ms, reason, payload
                 FROM dead
                 WHERE (died_ms, seq) < (?1, ?2)
                   AND (?3 IS NULL OR destination = ?3)
                   AND (?4 IS NULL OR died_ms >= ?4)
                   AND (?5 IS NULL OR died_ms < ?5)
                 ORDER BY died_ms DESC, seq DESC
                 LIMIT ?6",
            )?;
            let mut rows = statement.query(params![
                before_ms,
                before_seq,
                filter.destination,
                filter.since.map(to_ms),
                filter.until.map(to_ms),
                i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX),
            ])?;
            while let Some(row) = rows.next()? {
                found.push(dead_letter(row)?);
            }
        }
        let mut cursors = Vec::new();
        let mut letters = Vec::new();
        for (seq, letter) in found {
            cursors.push(format!("{}-{seq}", to_ms(letter.died_at)));
            letters.push(letter);
        }
        // One more than asked means there is a next page, starting after the last one kept.
        let next = if letters.len() > limit {
            letters.truncate(limit);
            limit
                .checked_sub(1)
                .and_then(|last| cursors.get(last).cloned())
        } else {
            None
        };
        Ok(DeadLetterPage { letters, next })
    };
    run().map_err(|e| crate::options::describe(&e))
}

/// A counter of the `meta` table.
pub(crate) fn meta(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |row| row.get(0))
}

/// How many dead letters are kept.
pub(crate) fn dead_count(conn: &Connection) -> rusqlite::Result<usize> {
    let count: i64 = conn.query_row("SELECT count(*) FROM dead", [], |row| row.get(0))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// The highest retry batch number in use.
pub(crate) fn last_batch(chunks: &[StoredChunk]) -> i64 {
    chunks
        .iter()
        .flat_map(|c| c.outcomes.iter().filter_map(|o| o.batch))
        .max()
        .unwrap_or(0)
}

/// What a chunk's sends count for, per state.
pub(crate) fn stored_counts(records: &[Record]) -> impl Iterator<Item = (Stored, u64)> + '_ {
    records
        .iter()
        .map(|record| (record.state, u64::from(record.size)))
}
