//! The HTTP destination of `destinations`: `send.http({method, url, headers, params, auth,
//! data})` makes one request per send after the run, with retries on transient failures, an
//! `Idempotency-Key` header carrying the send id, optional Standard Webhooks signing, a
//! per-host concurrency limit, and an SSRF guard.
//!
//! ```no_run
//! use destinations_core::prelude::*;
//! use destinations_http::{HttpRequest, SendHttp};
//!
//! # async fn demo(hub: Hub) -> Result<(), SendError> {
//! let run = hub.begin_run("workflow-42");
//! run.send().http(HttpRequest::post("https://example.com/hook").json(&serde_json::json!({"name": "Luke"})))?;
//! run.finish().await?;
//! # Ok(()) }
//! ```

mod batch;
mod client;
mod destination;
mod guard;
mod options;
mod request;
mod signing;

use destinations_core::{DestinationPlugin, EventId, Registry, SendError, Sender};

pub use batch::{BatchEncoding, Compression};
pub use destination::HttpDestination;
pub use guard::{AddressGuard, Refused, non_public_class};
pub use options::{DeliveryOrder, HttpOptions};
pub use request::{Auth, HttpRequest, MAX_URL_BYTES, Method, redact_url};
pub use signing::WebhookSigner;

/// The kind name of this destination in config (`kind = "http"`), and the default instance.
pub const KIND: &str = "http";

/// This destination's registration.
pub const PLUGIN: DestinationPlugin = DestinationPlugin {
    kind: KIND,
    describe: "one HTTP request per send, retried with backoff, optionally signed (Standard Webhooks)",
    build: HttpDestination::from_config,
};

destinations_core::register_destination!(PLUGIN);

/// Register this destination explicitly (when link-time registration is not wanted).
pub fn register(registry: &mut Registry) {
    registry.register(PLUGIN);
}

/// `send.http(...)` on a [`Sender`].
pub trait SendHttp {
    /// Send a request through the instance named `http`.
    fn http(&self, request: HttpRequest) -> Result<EventId, SendError>;
    /// Send a request through the HTTP instance named `instance`.
    fn http_to(&self, instance: &str, request: HttpRequest) -> Result<EventId, SendError>;
}

impl SendHttp for Sender {
    fn http(&self, request: HttpRequest) -> Result<EventId, SendError> {
        self.http_to(KIND, request)
    }

    fn http_to(&self, instance: &str, request: HttpRequest) -> Result<EventId, SendError> {
        self.record_to(instance, &request)
    }
}
