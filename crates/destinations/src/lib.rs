//! `destinations`: asynchronous, batched, at-least-once event delivery.
//!
//! A program records sends during a run — `send.http(...)`, `send.s3(...)`, `send.email(...)`,
//! `send.sse(...)`, `send.emit(...)` — and never waits on the network: everything a run sent is delivered
//! after it finishes, retried on transient failures, dead-lettered with a reason otherwise,
//! with a status per send.
//!
//! Pick destinations with Cargo features (`http`, `s3`, `email`, `sse` and `emit` are on by
//! default). Naming this crate links
//! every enabled destination, so [`Registry::linked`] sees them.
//!
//! ```no_run
//! use destinations::prelude::*;
//! use serde_json::json;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = destinations::hub_with_defaults()?;
//! let run = hub.begin_run("workflow-42");
//! run.send().http(HttpRequest::post("https://example.com/hook").json(&json!({"name": "Luke"})))?;
//! run.send().s3(S3Send::new("analytics", "signups/", &json!({"name": "Luke"})))?;
//! run.finish().await?;                 // hand every recorded send to the queue, atomically
//! hub.shutdown().await;                // deliver what is pending before exiting
//! # Ok(()) }
//! ```

pub use destinations_core::*;

#[cfg(feature = "email")]
pub use destinations_email as email;
#[cfg(feature = "emit")]
pub use destinations_emit as emit;
#[cfg(feature = "http")]
pub use destinations_http as http;
#[cfg(feature = "s3")]
pub use destinations_s3 as s3;
#[cfg(feature = "sqlite")]
pub use destinations_sqlite as sqlite;
#[cfg(feature = "sse")]
pub use destinations_sse as sse;

/// Everything a sending program usually needs, typed sends included.
pub mod prelude {
    pub use destinations_core::prelude::*;

    #[cfg(feature = "email")]
    pub use destinations_email::{Attachment, EmailSend, SendEmail};
    #[cfg(feature = "emit")]
    pub use destinations_emit::{EmitSend, Emitted, SendEmit};
    #[cfg(feature = "http")]
    pub use destinations_http::{HttpRequest, SendHttp};
    #[cfg(feature = "s3")]
    pub use destinations_s3::{S3Send, SendS3};
    #[cfg(feature = "sse")]
    pub use destinations_sse::{SendSse, SseSend};
}

/// Every destination kind in this build: those linked in (`inventory`, third-party crates
/// included) plus every enabled feature's, registered explicitly in case a linker dropped one.
pub fn registry() -> Registry {
    #[allow(unused_mut)]
    let mut registry = Registry::linked();
    #[cfg(feature = "http")]
    destinations_http::register(&mut registry);
    #[cfg(feature = "s3")]
    destinations_s3::register(&mut registry);
    #[cfg(feature = "email")]
    destinations_email::register(&mut registry);
    #[cfg(feature = "sse")]
    destinations_sse::register(&mut registry);
    #[cfg(feature = "emit")]
    destinations_emit::register(&mut registry);
    registry
}

/// A hub with one instance per enabled kind, named after the kind, on its defaults. The `http`
/// instance refuses non-public addresses, as in production; the `s3` instance writes objects
/// under `./data/objects` (each bucket a folder); the `email` instance writes `.eml` files to
/// `./data/outbox`, addressed to `owner@localhost`; the `sse` instance keeps streams in memory
/// (serve them with `destinations::sse::routes(&hub)`); the `emit` instance keeps subscriptions in
/// memory (its webhooks refuse non-public addresses).
pub fn hub_with_defaults() -> Result<Hub, ConfigError> {
    let registry = registry();
    let mut builder = Hub::builder();
    for kind in registry.kinds() {
        let config = InstanceConfig::from_table(kind, serde_json::json!({ "kind": kind }))?;
        builder = builder.configured(&registry, kind, config)?;
    }
    builder.build()
}

/// The queue `[hub.queue]` names: `memory`, `sqlite` (feature `sqlite`) at its `path`, or
/// `nats` (feature `nats`) at its `url`, with the hub's status retention and dead-letter
/// bounds. A durable queue is checked as it opens: a damaged, foreign or busy file, or a NATS
/// server that cannot be reached or is too old, is refused with what is wrong.
pub async fn open_queue(config: &HubConfig) -> Result<std::sync::Arc<dyn Queue>, ConfigError> {
    let queue = &config.queue;
    let options = || serde_json::Value::Object(queue.options.clone());
    match queue.kind.as_str() {
        "memory" => {
            if let Some(key) = queue.options.keys().next() {
                return Err(ConfigError::hub(format!(
                    "hub.queue: `{key}` is not a setting of the memory queue (it takes max_events, max_bytes, wait)"
                )));
            }
            Ok(std::sync::Arc::new(MemoryQueue::with_dead_letters(
                config.status_retention(),
                destinations_core::DeadLetters::bounded(
                    config.dead_letter_capacity,
                    config.dead_letter_max_bytes,
                ),
            )))
        }
        #[cfg(feature = "sqlite")]
        destinations_sqlite::KIND => {
            let options: destinations_sqlite::SqliteOptions = serde_json::from_value(options())
                .map_err(|e| ConfigError::hub(format!("hub.queue: {e}")))?;
            let opened = destinations_sqlite::SqliteQueue::open(
                &options,
                config.status_retention(),
                config.dead_letter_capacity,
            )
            .map_err(|e| ConfigError::hub(e.to_string()))?;
            Ok(std::sync::Arc::new(opened))
        }
        #[cfg(feature = "nats")]
        destinations_nats::KIND => {
            let options: destinations_nats::NatsOptions = serde_json::from_value(options())
                .map_err(|e| ConfigError::hub(format!("hub.queue: {e}")))?;
            let opened = destinations_nats::NatsQueue::connect(options, config)
                .await
                .map_err(|e| ConfigError::hub(e.to_string()))?;
            Ok(std::sync::Arc::new(opened))
        }
        other => Err(ConfigError::hub(format!(
            "hub.queue: no queue of kind `{other}` in this build; kinds: memory{}{}",
            if cfg!(feature = "sqlite") {
                ", sqlite"
            } else {
                " (sqlite needs the `sqlite` feature)"
            },
            if cfg!(feature = "nats") {
                ", nats"
            } else {
                " (nats needs the `nats` feature)"
            }
        ))),
    }
}
