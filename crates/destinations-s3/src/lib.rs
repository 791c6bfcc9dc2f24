//! The S3 destination of `destinations`: `send.s3({bucket, prefix, payload})` collects events
//! per (bucket, prefix) and writes each batch — at the first of 60 s, 10 000 events or 8 MiB —
//! as one object of newline-delimited JSON, gzip-compressed by default, under
//! `PREFIX/YYYY/MM/DD/HH/YYYY-MM-DD-HH-MM-SS-SHA256.gz`. The key names the SHA-256 of the
//! object's bytes and a failed batch is retried as the same batch, so a retried upload
//! overwrites the same key instead of writing a duplicate.
//!
//! The store comes from the instance's `url`: `s3://` (AWS or any S3-compatible server through
//! `endpoint`), `gs://`, `az://`, `file://PATH` or `memory://`.
//!
//! ```no_run
//! use destinations_core::prelude::*;
//! use destinations_s3::{S3Send, SendS3};
//!
//! # async fn demo(hub: Hub) -> Result<(), SendError> {
//! let run = hub.begin_run("workflow-42");
//! run.send().s3(S3Send::new("analytics", "orders/", &serde_json::json!({"order": 42})))?;
//! run.finish().await?;
//! # Ok(()) }
//! ```

mod destination;
mod metrics;
mod object;
mod options;
mod send;
mod store;

use destinations_core::{DestinationPlugin, EventId, Registry, SendError, Sender};

pub use destination::S3Destination;
pub use metrics::{
    COMPRESS_SECONDS, EVENTS_WRITTEN, NDJSON_BYTES_WRITTEN, OBJECT_BYTES_WRITTEN, OBJECT_EVENTS,
    OBJECTS_WRITTEN, UPLOAD_SECONDS,
};
pub use options::{Compression, MIN_PART_BYTES, S3Options};
pub use send::{MAX_PREFIX_BYTES, S3Send, check_bucket, check_prefix};

/// The kind name of this destination in config (`kind = "s3"`), and the default instance.
pub const KIND: &str = "s3";

/// This destination's registration.
pub const PLUGIN: DestinationPlugin = DestinationPlugin {
    kind: KIND,
    describe: "events batched per bucket and prefix into compressed NDJSON objects with content-addressed keys",
    build: S3Destination::from_config,
};

destinations_core::register_destination!(PLUGIN);

/// Register this destination explicitly (when link-time registration is not wanted).
pub fn register(registry: &mut Registry) {
    registry.register(PLUGIN);
}

/// `send.s3(...)` on a [`Sender`].
pub trait SendS3 {
    /// Send an event through the instance named `s3`.
    fn s3(&self, send: S3Send) -> Result<EventId, SendError>;
    /// Send an event through the S3 instance named `instance`.
    fn s3_to(&self, instance: &str, send: S3Send) -> Result<EventId, SendError>;
}

impl SendS3 for Sender {
    fn s3(&self, send: S3Send) -> Result<EventId, SendError> {
        self.s3_to(KIND, send)
    }

    fn s3_to(&self, instance: &str, send: S3Send) -> Result<EventId, SendError> {
        // The instance adds its own rules (its bucket list) when it takes the send.
        self.record_to(instance, &send)
    }
}
