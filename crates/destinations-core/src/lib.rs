//! The delivery engine of `destinations`: a program records sends during a run, and after the
//! run they are delivered — batched, retried, dead-lettered, with a status for each.
//!
//! Most users depend on the `destinations` facade crate instead, which re-exports this one and
//! adds the destination crates chosen with Cargo features.
//!
//! ```
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use destinations_core::prelude::*;
//!
//! /// A destination that accepts everything.
//! struct Accept;
//!
//! #[async_trait]
//! impl Destination for Accept {
//!     fn kind(&self) -> &'static str { "accept" }
//!     fn validate(&self, _payload: &[u8]) -> Result<(), InvalidPayload> { Ok(()) }
//!     async fn deliver(&self, _batch: &Batch) -> BatchOutcome { BatchOutcome::All(Report::delivered()) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = Hub::builder()
//!     .destination("accept", Arc::new(Accept), InstanceSettings::default())
//!     .build()?;
//! let run = hub.begin_run("workflow-42");
//! let id = run.send().to("accept", &serde_json::json!({"hello": "world"}))?;
//! run.finish().await?;                 // nothing left the process before this line
//! hub.shutdown().await;                // delivers what is pending
//! assert_eq!(hub.status(id).await?.map(|s| s.state), Some(State::Delivered));
//! # Ok(()) }
//! ```

pub mod attempts;
pub mod config;
pub mod dead_letters;
pub mod destination;
pub mod envelope;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod pattern;
pub mod payload;
pub mod policy;
pub mod queue;
pub mod registry;
pub mod run;
pub mod secret;
pub mod status;
pub mod typed;

pub use inventory;

pub use attempts::{Attempt, AttemptOutcome, Attempted};
pub use config::{
    ConfigError, InstanceConfig, InstanceSettings, OnRunError, QueueConfig, parse_options,
};
pub use dead_letters::{
    DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterSummary, DeadLetters,
};
pub use destination::{
    Batch, BatchOutcome, Destination, HealthError, Outcome, Report, ResponseSummary,
};
pub use envelope::{Envelope, EventId, IdHasher, IdMap};
pub use error::SendError;
pub use hub::{
    DeadLetterObserver, EndpointChange, EndpointObserver, EndpointView, Hub, HubBuilder, HubConfig,
    ShutdownReport, WeakHub,
};
pub use pattern::glob_match;
pub use payload::{InvalidPayload, check_name, check_serialized, parse_strict, raw_json};
pub use policy::{BatchPolicy, PausePolicy, RateGate, RateLimit, RetryPolicy, SharedRateGate};
pub use queue::{
    CapacityFull, DeadLetterStore, Durability, Fanout, FanoutMessage, InstanceShare, Leased,
    MemoryQueue, Queue, QueueBounds, QueueConsumer, QueueDepth, QueueError, Refused, RetryBatch,
    Settled, Settlement, StatusStore, hear,
};
pub use registry::{DestinationPlugin, Registry};
pub use run::{FinishError, Run, Sender};
pub use status::{
    EventFilter, EventPage, FinalWaiters, SendStatus, State, StatusBook, StatusRetention,
};
pub use typed::{Parsed, SendSchema, SendType, Typed, TypedDestination};

/// What a program that sends, or a destination crate, usually needs.
pub mod prelude {
    pub use crate::{
        Batch, BatchOutcome, BatchPolicy, Destination, EventId, Hub, InstanceSettings,
        InvalidPayload, Outcome, Report, RetryPolicy, Run, SendError, Sender, State,
    };
}
