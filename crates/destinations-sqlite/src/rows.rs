//! Rows of the `sends` table, read back as envelopes, statuses and dead letters.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use destinations_core::{
    DeadLetter, DeadLetterFilter, DeadLetterPage, Envelope, EventId, ResponseSummary, SendStatus,
    State,
};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::schema::{DELIVERED, QUEUED, RETRYING};

/// Milliseconds since the epoch.
pub(crate) fn to_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A time from milliseconds since the epoch.
pub(crate) fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

pub(crate) fn state_of(code: i64) -> State {
    match code {
        QUEUED => State::Queued,
        RETRYING => State::Retrying,
        DELIVERED => State::Delivered,
        _ => State::Dead,
    }
}

fn event_id(row: &Row<'_>, column: &str) -> rusqlite::Result<EventId> {
    let bytes: Vec<u8> = row.get(column)?;
    let bytes: [u8; 16] = bytes.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, column.to_owned(), rusqlite::types::Type::Blob)
    })?;
    Ok(EventId::from_bytes(bytes))
}

/// Names shared by every envelope of one instance (one allocation per name, not per row).
#[derive(Default)]
pub(crate) struct Names(HashMap<String, Arc<str>>);

impl Names {
    pub(crate) fn get(&mut self, name: String) -> Arc<str> {
        self.0
            .entry(name)
            .or_insert_with_key(|name| Arc::from(name.as_str()))
            .clone()
    }
}

const ENVELOPE_COLUMNS: &str =
    "seq, id, destination, run, created_ms, budget_ms, attempts, payload";

pub(crate) fn envelope_of(row: &Row<'_>, names: &mut Names) -> rusqlite::Result<(i64, Envelope)> {
    let seq: i64 = row.get("seq")?;
    let payload: Option<Vec<u8>> = row.get("payload")?;
    let envelope = Envelope::restored(
        event_id(row, "id")?,
        names.get(row.get("destination")?),
        row.get::<_, Option<String>>("run")?.map(Arc::from),
        from_ms(row.get("created_ms")?),
        row.get("attempts")?,
        Bytes::from(payload.unwrap_or_default()),
        from_ms(row.get("budget_ms")?),
    );
    Ok((seq, envelope))
}

/// The envelopes of these rows, by seq (rows that are gone are left out).
pub(crate) fn envelopes_by_seq(
    conn: &Connection,
    seqs: &[i64],
) -> rusqlite::Result<HashMap<i64, Envelope>> {
    let array: Rc<Vec<Value>> = Rc::new(seqs.iter().map(|s| Value::Integer(*s)).collect());
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {ENVELOPE_COLUMNS} FROM sends WHERE seq IN rarray(?1)"
    ))?;
    let mut names = Names::default();
    let mut found = HashMap::with_capacity(seqs.len());
    let mut rows = statement.query([array])?;
    while let Some(row) = rows.next()? {
        let (seq, envelope) = envelope_of(row, &mut names)?;
        found.insert(seq, envelope);
    }
    Ok(found)
}

/// The status of one send, as stored.
pub(crate) fn status(conn: &Connection, id: EventId) -> rusqlite::Result<Option<SendStatus>> {
    let mut statement = conn.prepare_cached(
        "SELECT destination, run, state, attempts, last_error, response, created_ms, updated_ms, run_at_ms
         FROM sends WHERE id = ?1",
    )?;
    statement
        .query_row([id.to_bytes()], |row| {
            let state = state_of(row.get("state")?);
            let response: Option<String> = row.get("response")?;
            let run_at: Option<i64> = row.get("run_at_ms")?;
            Ok(SendStatus {
                id,
                destination: Arc::from(row.get::<_, String>("destination")?),
                run: row.get::<_, Option<String>>("run")?.map(Arc::from),
                state,
                attempts: row.get("attempts")?,
                last_error: row.get("last_error")?,
                response: response.and_then(|r| serde_json::from_str::<ResponseSummary>(&r).ok()),
                created_at: from_ms(row.get("created_ms")?),
                updated_at: from_ms(row.get("updated_ms")?),
                next_attempt_at: (state == State::Retrying)
                    .then(|| run_at.map(from_ms))
                    .flatten(),
            })
        })
        .optional()
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

/// Dead letters matching `filter`, newest first.
pub(crate) fn dead_letters(
    conn: &Connection,
    filter: &DeadLetterFilter,
    after: Option<&str>,
    limit: usize,
) -> Result<DeadLetterPage, String> {
    let (before_ms, before_seq) = cursor(after)?;
    let ids: Option<Rc<Vec<Value>>> = filter.ids.as_ref().map(|ids| {
        Rc::new(
            ids.iter()
                .map(|id| Value::Blob(id.to_bytes().to_vec()))
                .collect(),
        )
    });
    let run = || -> rusqlite::Result<DeadLetterPage> {
        let mut statement = conn.prepare_cached(&format!(
            "SELECT {ENVELOPE_COLUMNS}, last_error, updated_ms FROM sends
             WHERE state = 3
               AND (updated_ms, seq) < (?1, ?2)
               AND (?3 IS NULL OR destination = ?3)
               AND (?4 IS NULL OR updated_ms >= ?4)
               AND (?5 IS NULL OR updated_ms < ?5)
               AND (?6 IS NULL OR id IN rarray(?6))
             ORDER BY updated_ms DESC, seq DESC
             LIMIT ?7"
        ))?;
        let mut rows = statement.query(params![
            before_ms,
            before_seq,
            filter.destination,
            filter.since.map(to_ms),
            filter.until.map(to_ms),
            ids,
            i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX),
        ])?;
        let mut names = Names::default();
        let mut letters = Vec::new();
        let mut cursors = Vec::new();
        while let Some(row) = rows.next()? {
            let (seq, envelope) = envelope_of(row, &mut names)?;
            let died_ms: i64 = row.get("updated_ms")?;
            cursors.push(format!("{died_ms}-{seq}"));
            letters.push(DeadLetter {
                envelope,
                reason: row
                    .get::<_, Option<String>>("last_error")?
                    .unwrap_or_default(),
                died_at: from_ms(died_ms),
            });
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

/// How many dead letters were dropped because the store was full.
pub(crate) fn evicted(conn: &Connection) -> rusqlite::Result<u64> {
    let evicted: i64 = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'dead_letters_evicted'")?
        .query_row([], |row| row.get(0))?;
    Ok(u64::try_from(evicted).unwrap_or(0))
}

/// One pending row, as loaded at open.
pub(crate) struct PendingRow {
    pub(crate) seq: i64,
    pub(crate) destination: String,
    pub(crate) size: usize,
    /// For a retrying row: when it is due, and the batch it retries with.
    pub(crate) retry: Option<(i64, i64)>,
}

/// What a start finds in the file: the rows not final (oldest first), and the delivered ones
/// as (seq, when), oldest delivery first, for the retention.
pub(crate) struct Found {
    pub(crate) pending: Vec<PendingRow>,
    pub(crate) delivered: Vec<(i64, i64)>,
}

/// Every row that is not dead, in one pass.
pub(crate) fn found(conn: &Connection) -> rusqlite::Result<Found> {
    let mut statement = conn.prepare(
        "SELECT seq, destination, state, run_at_ms, batch, length(payload) AS size, updated_ms
         FROM sends WHERE state <> 3 ORDER BY seq",
    )?;
    let mut rows = statement.query([])?;
    let mut found = Found {
        pending: Vec::new(),
        delivered: Vec::new(),
    };
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get("seq")?;
        let state: i64 = row.get("state")?;
        if state == DELIVERED {
            found.delivered.push((seq, row.get("updated_ms")?));
            continue;
        }
        let retry = if state == RETRYING {
            Some((
                row.get::<_, Option<i64>>("run_at_ms")?.unwrap_or(0),
                row.get::<_, Option<i64>>("batch")?.unwrap_or(0),
            ))
        } else {
            None
        };
        found.pending.push(PendingRow {
            seq,
            destination: row.get("destination")?,
            size: usize::try_from(row.get::<_, Option<i64>>("size")?.unwrap_or(0)).unwrap_or(0),
            retry,
        });
    }
    found.delivered.sort_by_key(|(seq, at)| (*at, *seq));
    Ok(found)
}

/// Counts kept by the writer for retention: finished rows by state.
pub(crate) fn count_state(conn: &Connection, state: i64) -> rusqlite::Result<usize> {
    let count: i64 = conn.query_row(
        "SELECT count(*) FROM sends WHERE state = ?1",
        [state],
        |row| row.get(0),
    )?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// The highest retry batch number in use.
pub(crate) fn last_batch(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(batch), 0) FROM sends", [], |row| {
        row.get(0)
    })
}
