//! `destinations queue check` and `destinations queue export`: look into a queue file without
//! changing it — while a server runs on it, or after it refused to start.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use destinations_core::State;
use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use crate::chunk::{Payloads, Record, Stored, decode_records};
use crate::options::{OpenError, describe};
use crate::rows::{self, from_ms, stored_counts};
use crate::schema::{self, APPLICATION_ID, SCHEMA_VERSION};

/// What `check` found.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// The schema version of the file.
    pub schema_version: i32,
    /// Whether a server holds the file now.
    pub in_use: bool,
    /// Sends per destination instance and state.
    pub sends: BTreeMap<String, BTreeMap<String, u64>>,
    /// Payload bytes of the sends still pending (queued or retrying), per instance.
    pub pending_bytes: BTreeMap<String, u64>,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Dead letters dropped because the store was full.
    pub dead_letters_evicted: u64,
}

fn open_read_only(path: &Path) -> Result<Connection, OpenError> {
    if !path.is_file() {
        return Err(OpenError::new(path, "does not exist"));
    }
    schema::check_header(path)?;
    let conn = schema::connect(path, true)?;
    let fail = |e: rusqlite::Error| OpenError::new(path, describe(&e));
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(fail)?;
    if application_id != APPLICATION_ID {
        return Err(OpenError::new(
            path,
            "is not a destinations queue (another program's SQLite database)",
        ));
    }
    Ok(conn)
}

/// Whether another process holds the queue's lock.
fn in_use(path: &Path) -> bool {
    std::fs::File::open(schema::lock_path(path)).is_ok_and(|file| {
        matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        )
    })
}

/// Verify a queue file, read-only: its kind, its schema, SQLite's integrity check, and what
/// it holds.
pub fn check(path: &Path) -> Result<CheckReport, OpenError> {
    let conn = open_read_only(path)?;
    let fail = |e: rusqlite::Error| OpenError::new(path, describe(&e));
    let schema_version: i32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(fail)?;
    if schema_version > SCHEMA_VERSION {
        return Err(OpenError::new(
            path,
            format!("has schema {schema_version}; this build reads up to {SCHEMA_VERSION}"),
        ));
    }
    schema::integrity(&conn, path)?;
    let mut sends: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut pending_bytes = BTreeMap::new();
    {
        let mut statement = conn
            .prepare("SELECT destination, records FROM chunks")
            .map_err(fail)?;
        let mut rows = statement.query([]).map_err(fail)?;
        while let Some(row) = rows.next().map_err(fail)? {
            let destination: String = row.get(0).map_err(fail)?;
            let records: Vec<u8> = row.get(1).map_err(fail)?;
            let records = decode_records(&records).ok_or_else(|| {
                OpenError::new(
                    path,
                    format!("is damaged: the records of a `{destination}` chunk cannot be read"),
                )
            })?;
            let counts = sends.entry(destination.clone()).or_default();
            for (state, size) in stored_counts(&records) {
                let name = serde_json::to_value(state.state())
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                *counts.entry(name).or_insert(0) += 1;
                if !state.is_final() {
                    *pending_bytes.entry(destination.clone()).or_insert(0) += size;
                }
            }
        }
    }
    let dead_letters = rows::dead_count(&conn).map_err(fail)? as u64;
    let dead_letters_evicted =
        u64::try_from(rows::meta(&conn, "dead_letters_evicted").map_err(fail)?).unwrap_or(0);
    Ok(CheckReport {
        schema_version,
        in_use: in_use(path),
        sends,
        pending_bytes,
        dead_letters,
        dead_letters_evicted,
    })
}

/// What `export` wrote.
#[derive(Debug, Default, Serialize)]
pub struct ExportSummary {
    /// Sends written.
    pub exported: u64,
    /// Rows that could not be read (damage), skipped.
    pub unreadable: u64,
}

/// One exported send: the shape of a send in `POST /v1/runs`, with where it stood.
#[derive(Serialize)]
struct Exported<'a> {
    id: String,
    destination: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    run: Option<&'a str>,
    state: State,
    attempts: u32,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a str>,
    payload: &'a serde_json::value::RawValue,
}

/// Write every pending send (queued or retrying; dead letters too with `dead`) as NDJSON,
/// one `{"id", "destination", "run", "state", "attempts", "created_at", "last_error",
/// "payload"}` per line, oldest first. The file is never changed: a damaged one is read from a
/// copy whose header is mended to the pages that are there, and rows that cannot be read are
/// skipped and counted; the rest still come out.
pub fn export(path: &Path, dead: bool, out: &mut dyn Write) -> Result<ExportSummary, OpenError> {
    // A damaged file is read from a mended copy; a sound one as it is.
    let sound = open_read_only(path).and_then(|conn| schema::integrity(&conn, path).map(|()| conn));
    match sound {
        Ok(conn) => export_from(&conn, path, dead, out),
        Err(error) if error.problem.contains("malformed") || error.problem.contains("damaged") => {
            let salvage = Salvage::copy(path)?;
            let conn = schema::connect(&salvage.db, true)?;
            export_from(&conn, path, dead, out)
        }
        Err(error) => Err(error),
    }
}

/// A copy of a damaged queue file (and its log), its header mended to the pages the copy
/// holds, so SQLite reads what is there. Removed when dropped.
struct Salvage {
    dir: std::path::PathBuf,
    db: std::path::PathBuf,
}

impl Salvage {
    fn copy(path: &Path) -> Result<Self, OpenError> {
        let fail = |e: std::io::Error| {
            OpenError::new(path, format!("cannot make a copy to read it from: {e}"))
        };
        let dir = std::env::temp_dir().join(format!("destinations-salvage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let db = dir.join("queue.db");
        let mut bytes = std::fs::read(path).map_err(fail)?;
        if bytes.len() >= 100 {
            // Page size at offset 16 (1 means 65 536); the page count at offset 28.
            let size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
                1 => 65_536,
                n => usize::from(n).max(512),
            };
            let pages = u32::try_from(bytes.len() / size).unwrap_or(u32::MAX);
            bytes.truncate(pages as usize * size);
            bytes[28..32].copy_from_slice(&pages.to_be_bytes());
        }
        std::fs::write(&db, bytes).map_err(fail)?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        if let Ok(log) = std::fs::read(&wal) {
            std::fs::write(dir.join("queue.db-wal"), log).map_err(fail)?;
        }
        Ok(Self { dir, db })
    }
}

impl Drop for Salvage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn export_from(
    conn: &Connection,
    path: &Path,
    dead: bool,
    out: &mut dyn Write,
) -> Result<ExportSummary, OpenError> {
    let fail = |e: rusqlite::Error| OpenError::new(path, describe(&e));
    let mut summary = ExportSummary::default();
    let mut write = |line: &Exported<'_>, summary: &mut ExportSummary| -> Result<(), OpenError> {
        let text = serde_json::to_string(line)
            .map_err(|e| OpenError::new(path, format!("a send could not be written: {e}")))?;
        writeln!(out, "{text}")
            .map_err(|e| OpenError::new(path, format!("the export could not be written: {e}")))?;
        summary.exported += 1;
        Ok(())
    };
    // The payloads of chunks with pending sends, one by one in the order written (they say
    // whose sends they are, so a damaged chunk row does not strand them); past damage, skip
    // ahead in growing steps until rows read again.
    let mut after = 0i64;
    let mut skip = 1i64;
    let mut next = conn
        .prepare("SELECT seq, data FROM payloads WHERE seq > ?1 ORDER BY seq LIMIT 1")
        .map_err(fail)?;
    loop {
        let row = next
            .query_row([after], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
            })
            .optional();
        let (seq, data) = match row {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(_) => {
                summary.unreadable += 1;
                match after.checked_add(skip) {
                    Some(next) => after = next,
                    None => break,
                }
                skip = skip.saturating_mul(2);
                continue;
            }
        };
        after = seq;
        skip = 1;
        let Some((destination, entries)) = Payloads::read(&data) else {
            summary.unreadable += 1;
            continue;
        };
        // Where each send stands, if the chunk's row can still be read.
        let stood = conn
            .query_row(
                "SELECT records, outcomes FROM chunks WHERE seq = ?1",
                [seq],
                |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, String>(1)?)),
            )
            .ok()
            .and_then(|(records, outcomes)| {
                Some((
                    decode_records(&records)?,
                    serde_json::from_str::<Vec<crate::chunk::Outcome>>(&outcomes).ok()?,
                ))
            });
        for (index, entry) in entries.enumerate() {
            let standing = stood.as_ref().and_then(|(records, outcomes)| {
                let record = records.get(index).filter(|r| r.id == entry.id)?;
                let error = (record.outcome as usize)
                    .checked_sub(1)
                    .and_then(|at| outcomes.get(at))
                    .and_then(|o| o.error.as_deref());
                Some((*record, error))
            });
            let (record, last_error) = match standing {
                Some((record, _)) if record.state.is_final() => continue,
                Some(standing) => standing,
                // The row is gone: all that is known is that it was queued.
                None => (
                    Record {
                        id: entry.id,
                        created_ms: entry.created_ms,
                        updated_ms: 0,
                        size: 0,
                        elapsed_ms: 0,
                        attempts: 0,
                        state: Stored::Queued,
                        run: 0,
                        outcome: 0,
                    },
                    None,
                ),
            };
            let Ok(payload) = serde_json::from_slice::<&serde_json::value::RawValue>(entry.payload)
            else {
                summary.unreadable += 1;
                continue;
            };
            write(
                &exported(&record, destination, entry.run, last_error, payload),
                &mut summary,
            )?;
        }
    }
    if dead {
        let mut statement = conn
            .prepare(
                "SELECT seq, id, destination, run, created_ms, attempts, died_ms, reason, payload
                 FROM dead ORDER BY seq",
            )
            .map_err(fail)?;
        let mut rows = statement.query([]).map_err(fail)?;
        loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(_) => {
                    summary.unreadable += 1;
                    break;
                }
            };
            let Ok((_, letter)) = rows::dead_letter(row) else {
                summary.unreadable += 1;
                continue;
            };
            let Ok(payload) =
                serde_json::from_slice::<&serde_json::value::RawValue>(&letter.envelope.payload)
            else {
                summary.unreadable += 1;
                continue;
            };
            let record = Record {
                id: letter.envelope.id,
                created_ms: rows::to_ms(letter.envelope.created_at),
                updated_ms: 0,
                size: 0,
                elapsed_ms: 0,
                attempts: u16::try_from(letter.envelope.attempts).unwrap_or(u16::MAX),
                state: Stored::Dead,
                run: 0,
                outcome: 0,
            };
            write(
                &exported(
                    &record,
                    &letter.envelope.destination,
                    letter.envelope.run.as_deref(),
                    Some(&letter.reason),
                    payload,
                ),
                &mut summary,
            )?;
        }
    }
    out.flush()
        .map_err(|e| OpenError::new(path, format!("the export could not be written: {e}")))?;
    Ok(summary)
}

/// One send as an NDJSON line.
fn exported<'a>(
    record: &Record,
    destination: &'a str,
    run: Option<&'a str>,
    last_error: Option<&'a str>,
    payload: &'a serde_json::value::RawValue,
) -> Exported<'a> {
    Exported {
        id: record.id.to_string(),
        destination,
        run,
        state: record.state.state(),
        attempts: u32::from(record.attempts),
        created_at: humantime_rfc3339(record.created_ms),
        last_error,
        payload,
    }
}

fn humantime_rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(from_ms(ms)).to_string()
}
