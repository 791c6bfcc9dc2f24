//! `destinations queue check` and `destinations queue export`: look into a queue file without
//! changing it — while a server runs on it, or after it refused to start.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use destinations_core::State;
use rusqlite::Connection;
use serde::Serialize;

use crate::options::{OpenError, describe};
use crate::rows::{from_ms, state_of};
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
            .prepare(
                "SELECT destination, state, count(*), coalesce(sum(length(payload)), 0)
                 FROM sends GROUP BY destination, state",
            )
            .map_err(fail)?;
        let mut rows = statement.query([]).map_err(fail)?;
        while let Some(row) = rows.next().map_err(fail)? {
            let destination: String = row.get(0).map_err(fail)?;
            let state = state_of(row.get(1).map_err(fail)?);
            let count: i64 = row.get(2).map_err(fail)?;
            let bytes: i64 = row.get(3).map_err(fail)?;
            let name = serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            sends
                .entry(destination.clone())
                .or_default()
                .insert(name, u64::try_from(count).unwrap_or(0));
            if !state.is_final() {
                *pending_bytes.entry(destination).or_insert(0) += u64::try_from(bytes).unwrap_or(0);
            }
        }
    }
    let dead_letters_evicted = crate::rows::evicted(&conn).map_err(fail)?;
    Ok(CheckReport {
        schema_version,
        in_use: in_use(path),
        sends,
        pending_bytes,
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
    match open_read_only(path).and_then(|conn| export_from(&conn, path, dead, out)) {
        Ok(summary) => Ok(summary),
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
    let states: &[i64] = if dead { &[0, 1, 3] } else { &[0, 1] };
    let last: i64 = conn
        .query_row("SELECT coalesce(max(seq), 0) FROM sends", [], |row| {
            row.get(0)
        })
        .unwrap_or(i64::MAX);
    let mut summary = ExportSummary::default();
    let mut after = i64::MIN;
    // Past a damaged page, skip ahead in growing steps until rows read again.
    let mut skip: i64 = 1;
    let mut statement = conn
        .prepare(
            "SELECT seq, id, destination, run, state, attempts, created_ms, last_error, payload
             FROM sends WHERE seq > ?1 ORDER BY seq LIMIT 500",
        )
        .map_err(fail)?;
    while after < last {
        let mut rows = statement.query([after]).map_err(fail)?;
        let mut read_any = false;
        loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(_) => {
                    summary.unreadable += 1;
                    after = after.max(0).saturating_add(skip);
                    skip = skip.saturating_mul(2);
                    read_any = true;
                    break;
                }
            };
            read_any = true;
            skip = 1;
            let Ok(seq) = row.get::<_, i64>(0) else {
                summary.unreadable += 1;
                continue;
            };
            after = seq;
            match exported(row, states) {
                Ok(Some(line)) => {
                    writeln!(out, "{line}").map_err(|e| {
                        OpenError::new(path, format!("the export could not be written: {e}"))
                    })?;
                    summary.exported += 1;
                }
                Ok(None) => {}
                Err(_) => summary.unreadable += 1,
            }
        }
        if !read_any {
            break;
        }
    }
    out.flush()
        .map_err(|e| OpenError::new(path, format!("the export could not be written: {e}")))?;
    Ok(summary)
}

/// One row as an NDJSON line, if its state is exported.
fn exported(row: &rusqlite::Row<'_>, states: &[i64]) -> rusqlite::Result<Option<String>> {
    let state: i64 = row.get(4)?;
    if !states.contains(&state) {
        return Ok(None);
    }
    let id: Vec<u8> = row.get(1)?;
    let id = <[u8; 16]>::try_from(id.as_slice())
        .map(destinations_core::EventId::from_bytes)
        .map_err(|_| rusqlite::Error::InvalidQuery)?;
    let destination: String = row.get(2)?;
    let run: Option<String> = row.get(3)?;
    let last_error: Option<String> = row.get(7)?;
    let payload: Vec<u8> = row.get::<_, Option<Vec<u8>>>(8)?.unwrap_or_default();
    let payload: &serde_json::value::RawValue =
        serde_json::from_slice(&payload).map_err(|_| rusqlite::Error::InvalidQuery)?;
    let line = Exported {
        id: id.to_string(),
        destination: &destination,
        run: run.as_deref(),
        state: state_of(state),
        attempts: row.get(5)?,
        created_at: humantime_rfc3339(row.get(6)?),
        last_error: last_error.as_deref(),
        payload,
    };
    serde_json::to_string(&line)
        .map(Some)
        .map_err(|_| rusqlite::Error::InvalidQuery)
}

fn humantime_rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(from_ms(ms)).to_string()
}
