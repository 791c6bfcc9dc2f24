//! An embedded, durable queue for `destinations`: one SQLite file in WAL mode, written by one
//! thread that commits whatever has gathered in one transaction (group commit).
//!
//! An accepted send is committed before `enqueue` resolves, so it survives the process
//! crashing or being killed (`sync = "normal"`), or a power loss too (`sync = "full"`).
//! Statuses and dead letters live in the same file, bounded by the hub's retention. At
//! start, everything not final is ready again and retries keep their attempt count and due
//! time. A file that is not a queue, is damaged, comes from a newer version or is in use by
//! another process is refused with a message that names it; nothing on disk is removed.
//!
//! ```no_run
//! use std::sync::Arc;
//! use destinations_core::{Hub, HubConfig};
//! use destinations_sqlite::{SqliteOptions, SqliteQueue};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = HubConfig::default();
//! let queue = SqliteQueue::open(
//!     &SqliteOptions::at("./data/queue.db"),
//!     config.status_retention(),
//!     config.dead_letter_capacity,
//! )?;
//! let hub = Hub::builder().config(config).queue(Arc::new(queue));
//! # Ok(()) }
//! ```

mod chunk;
mod lines;
mod options;
mod queue;
mod resident;
mod rows;
mod schema;
mod tools;
mod writer;

pub use options::{OpenError, SqliteOptions, SyncMode};
pub use queue::SqliteQueue;
pub use tools::{CheckReport, ExportSummary, check, export};

/// The queue kind name used in config (`[hub.queue] kind = "sqlite"`).
pub const KIND: &str = "sqlite";
