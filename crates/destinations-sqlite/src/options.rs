//! What a SQLite queue is configured with, and what goes wrong opening one.

use std::path::PathBuf;

use serde::Deserialize;

/// Options of the SQLite queue (`[hub.queue]` with `kind = "sqlite"`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteOptions {
    /// The database file; created, with its directory, if missing.
    pub path: PathBuf,
    /// What a commit survives: `normal` (a crash or `kill -9` of the process; the default) or
    /// `full` (a power loss too, at the cost of a sync per commit).
    #[serde(default)]
    pub sync: SyncMode,
    /// Memory for sends waiting their turn, payloads and bookkeeping (default 32 MiB); past it
    /// they wait on disk only and are read back when their turn comes.
    #[serde(default = "SqliteOptions::default_memory")]
    pub memory_bytes: usize,
}

impl SqliteOptions {
    /// The default for [`memory_bytes`](Self::memory_bytes).
    pub const DEFAULT_MEMORY: usize = 32 << 20;

    fn default_memory() -> usize {
        Self::DEFAULT_MEMORY
    }

    /// A queue in this file, on the defaults.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            sync: SyncMode::default(),
            memory_bytes: Self::DEFAULT_MEMORY,
        }
    }
}

/// When a commit reaches the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Commits are in the OS's hands: they survive the process crashing or being killed, not a
    /// power loss (SQLite `synchronous = NORMAL` in WAL mode).
    #[default]
    Normal,
    /// Every commit is synced to the disk: it survives a power loss (`synchronous = FULL`).
    Full,
}

/// The queue's file cannot be used; says which file, what is wrong and what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the queue database {path}: {problem}")]
pub struct OpenError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, and what to do about it.
    pub problem: String,
}

impl OpenError {
    pub(crate) fn new(path: &std::path::Path, problem: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

/// What an SQLite error means for the person running the server.
pub(crate) fn describe(error: &rusqlite::Error) -> String {
    use rusqlite::ErrorCode;
    let meaning = match error.sqlite_error_code() {
        Some(ErrorCode::ReadOnly) => {
            "it cannot be written (read-only file, directory or file system): make them writable"
        }
        Some(ErrorCode::CannotOpen) => {
            "it cannot be opened: check that its directory exists and is writable"
        }
        Some(ErrorCode::NotADatabase) => "it is not an SQLite database (or it is damaged)",
        Some(ErrorCode::DatabaseCorrupt) => "it is damaged",
        Some(ErrorCode::DiskFull) => "the disk is full: free some space",
        Some(ErrorCode::SystemIoFailure) => "the disk failed to read or write it",
        Some(ErrorCode::PermissionDenied) => "permission denied",
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            "another process holds it locked"
        }
        _ => return error.to_string(),
    };
    format!("{meaning} ({error})")
}

/// What to do about a damaged file.
pub(crate) const EXPORT_HINT: &str = "Nothing was changed; `destinations queue export` writes every pending send it can still \
     read as NDJSON, then move the file away";

/// [`describe`], with what to do when the error says the file is damaged.
pub(crate) fn describe_opening(error: &rusqlite::Error) -> String {
    use rusqlite::ErrorCode;
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            format!("{}. {EXPORT_HINT}", describe(error))
        }
        _ => describe(error),
    }
}
