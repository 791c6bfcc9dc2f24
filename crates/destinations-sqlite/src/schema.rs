//! The file: its schema, and the checks that refuse a file this queue must not touch — a
//! foreign database, a newer schema, a damaged file — before anything is written.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::options::{EXPORT_HINT, OpenError, SyncMode, describe_opening};

/// `PRAGMA application_id` of a destinations queue ("DSTQ").
pub(crate) const APPLICATION_ID: i32 = 0x4453_5451;
/// The schema this build writes and reads.
pub(crate) const SCHEMA_VERSION: i32 = 2;

/// The first 16 bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

const SCHEMA: &str = "
CREATE TABLE chunks (
    seq         INTEGER PRIMARY KEY,
    destination TEXT    NOT NULL,
    first_ms    INTEGER NOT NULL,
    last_id     BLOB    NOT NULL,
    created_ms  INTEGER NOT NULL,
    budget_ms   INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    finished_ms INTEGER,
    records     BLOB    NOT NULL,
    runs        TEXT    NOT NULL,
    outcomes    TEXT    NOT NULL
);
CREATE INDEX chunks_by_time ON chunks(first_ms);
CREATE TABLE payloads (seq INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE dead (
    seq         INTEGER PRIMARY KEY,
    id          BLOB    NOT NULL UNIQUE,
    destination TEXT    NOT NULL,
    run         TEXT,
    created_ms  INTEGER NOT NULL,
    attempts    INTEGER NOT NULL,
    died_ms     INTEGER NOT NULL,
    reason      TEXT    NOT NULL,
    payload     BLOB    NOT NULL
);
CREATE INDEX dead_by_time ON dead(died_ms);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('dead_letters_evicted', 0), ('longest_chunk_ms', 0);
";

/// What each schema version adds to the one before: `UPGRADES[0]` makes version 2 of 1, and
/// so on. A fresh file gets `SCHEMA` and every upgrade.
const UPGRADES: [&str; 1] = ["
-- The attempts that failed, each as JSON, with the chunk that holds its send (they go with
-- it, unless the send is a dead letter, whose attempts stay as long as it does).
CREATE TABLE attempts (
    seq     INTEGER PRIMARY KEY,
    id      BLOB    NOT NULL,
    chunk   INTEGER NOT NULL,
    attempt TEXT    NOT NULL
);
CREATE INDEX attempts_by_id ON attempts(id);
CREATE INDEX attempts_by_chunk ON attempts(chunk);
"];

const _: () = assert!(UPGRADES.len() as i32 == SCHEMA_VERSION - 1);

/// Bring a file of schema `from` up to this build's, in one transaction.
fn upgrade(conn: &mut Connection, from: i32, path: &Path) -> Result<(), OpenError> {
    let fail = |e: rusqlite::Error| OpenError::new(path, describe_opening(&e));
    let tx = conn.transaction().map_err(fail)?;
    for step in UPGRADES.iter().skip(usize::try_from(from - 1).unwrap_or(0)) {
        tx.execute_batch(step).map_err(fail)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(fail)?;
    tx.commit().map_err(fail)
}

/// The lock that keeps a second process off the file: two servers on one queue would deliver
/// everything twice.
pub(crate) struct FileLock {
    _file: File,
}

/// The lock file beside `path`.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Take the lock of `path`, or say who has it.
pub(crate) fn lock(path: &Path) -> Result<FileLock, OpenError> {
    let lock_path = lock_path(path);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            OpenError::new(
                path,
                format!(
                    "cannot create its lock file {}: {e}; its directory must be writable (or choose another --data-dir)",
                    lock_path.display()
                ),
            )
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(OpenError::new(
                path,
                format!(
                    "another process uses it ({} is locked{}): is a second `destinations serve` running on the same data directory? Stop it, or give this one another --data-dir",
                    lock_path.display(),
                    match holder.trim() {
                        "" => String::new(),
                        pid => format!(" by process {pid}"),
                    }
                ),
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(OpenError::new(
                path,
                format!("cannot lock {}: {e}", lock_path.display()),
            ));
        }
    }
    let _ = file.set_len(0);
    let _ = write!(file, "{}", std::process::id());
    Ok(FileLock { _file: file })
}

/// Refuse a file that is not an SQLite database before SQLite opens it (SQLite would call an
/// empty file a fresh database, and some damage only shows on first read).
pub(crate) fn check_header(path: &Path) -> Result<(), OpenError> {
    let Ok(mut file) = File::open(path) else {
        return Ok(()); // missing: it will be created
    };
    let mut header = [0u8; 16];
    let mut read = 0;
    while read < header.len() {
        match file.read(&mut header[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => {
                return Err(OpenError::new(path, format!("cannot be read: {e}")));
            }
        }
    }
    if read == 0 {
        return Ok(()); // empty: SQLite writes a fresh database into it
    }
    if read < header.len() || &header != SQLITE_HEADER {
        return Err(OpenError::new(
            path,
            "is not an SQLite database (its first bytes are not SQLite's header), so it is not a destinations queue, \
             or it is damaged. Nothing was changed; move the file away or choose another path",
        ));
    }
    Ok(())
}

/// Open a connection to the file, writing nothing yet.
pub(crate) fn connect(path: &Path, read_only: bool) -> Result<Connection, OpenError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let fail = |e: rusqlite::Error| OpenError::new(path, describe_opening(&e));
    let conn = Connection::open_with_flags(path, flags).map_err(fail)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(fail)?;
    // The writer keeps 16 MiB of pages cached; readers, which look up a few rows at a time, 2.
    conn.pragma_update(None, "cache_size", if read_only { -2048 } else { -16_384 })
        .map_err(fail)?;
    // Statement journals (a multi-row update inside a transaction) stay in memory.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(fail)?;
    rusqlite::vtab::array::load_module(&conn).map_err(fail)?;
    Ok(conn)
}

/// Put the writer's connection in WAL mode with the chosen sync level (only once the file is
/// known to be a queue: this writes to it).
pub(crate) fn configure(conn: &Connection, path: &Path, sync: SyncMode) -> Result<(), OpenError> {
    let fail = |e: rusqlite::Error| OpenError::new(path, describe_opening(&e));
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::new(
            path,
            format!(
                "cannot be put in WAL mode (SQLite answered `{mode}`); is it on a network file system?"
            ),
        ));
    }
    let level = match sync {
        SyncMode::Normal => "NORMAL",
        SyncMode::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", level)
        .map_err(fail)?;
    // Checkpoint in bigger steps than the default (1000 pages): 4096 pages of 16 KiB, 64 MiB of
    // log — fewer stalls of the writer, and a page written many times (rows queued, then
    // delivered) reaches the file once.
    conn.pragma_update(None, "wal_autocheckpoint", 4096)
        .map_err(fail)
}

/// Make sure `conn` holds a queue this build can use: create the schema in a fresh file;
/// refuse a foreign database, a newer schema, or a damaged file.
pub(crate) fn prepare(conn: &mut Connection, path: &Path, sync: SyncMode) -> Result<(), OpenError> {
    let fail = |e: rusqlite::Error| OpenError::new(path, describe_opening(&e));
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(fail)?;
    let version: i32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(fail)?;
    let tables: Vec<String> = {
        let mut statement = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .map_err(fail)?;
        statement
            .query_map([], |row| row.get(0))
            .map_err(fail)?
            .collect::<Result<_, _>>()
            .map_err(fail)?
    };
    if application_id == 0 && tables.is_empty() {
        // Bigger pages than SQLite's 4 KiB: fewer log frames and system calls per commit.
        conn.pragma_update(None, "page_size", 16_384)
            .map_err(fail)?;
        configure(conn, path, sync)?;
        let tx = conn.transaction().map_err(fail)?;
        tx.execute_batch(SCHEMA).map_err(fail)?;
        for step in UPGRADES {
            tx.execute_batch(step).map_err(fail)?;
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(fail)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
        return Ok(());
    }
    if application_id != APPLICATION_ID {
        return Err(OpenError::new(
            path,
            format!(
                "is an SQLite database of another program (tables: {}), not a destinations queue. Nothing was changed; \
                 choose another path for the queue",
                if tables.is_empty() {
                    "none".to_owned()
                } else {
                    tables.join(", ")
                }
            ),
        ));
    }
    if version > SCHEMA_VERSION {
        return Err(OpenError::new(
            path,
            format!(
                "was written by a newer version of destinations (schema {version}; this build reads up to {SCHEMA_VERSION}). \
                 Nothing was changed; run the newer version, or export the pending sends with it (destinations queue export)"
            ),
        ));
    }
    integrity(conn, path)?;
    configure(conn, path, sync)?;
    if version < SCHEMA_VERSION {
        upgrade(conn, version, path)?;
    }
    Ok(())
}

/// Refuse a damaged file, quoting SQLite's own findings.
pub(crate) fn integrity(conn: &Connection, path: &Path) -> Result<(), OpenError> {
    let fail = |e: rusqlite::Error| OpenError::new(path, describe_opening(&e));
    let findings: Vec<String> = {
        let mut statement = conn.prepare("PRAGMA quick_check(5)").map_err(fail)?;
        statement
            .query_map([], |row| row.get(0))
            .map_err(fail)?
            .collect::<Result<_, _>>()
            .map_err(fail)?
    };
    if findings.len() == 1 && findings[0] == "ok" {
        return Ok(());
    }
    Err(OpenError::new(
        path,
        format!("is damaged: {}. {EXPORT_HINT}", findings.join("; ")),
    ))
}
