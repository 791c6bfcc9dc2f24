//! The SSE destination of `destinations`: `send.sse({channel, payload, stream?})` publishes an
//! event to a named stream, served as `text/event-stream` at `GET /v1/sse/{stream}`: `event:`
//! is the channel, `data:` the payload's JSON, `id:` the send's id. A new subscriber gets the
//! stream's last 100 events, then live ones; `Last-Event-ID` resumes exactly where it left
//! off while the buffer still holds that event. A subscriber that falls a whole buffer behind
//! is told (`event: error`) and disconnected, never holding up the others. Streams can need a
//! read token; browsers on other origins are allowed by `cors_origins`.
//!
//! ```no_run
//! use destinations_core::prelude::*;
//! use destinations_sse::{SendSse, SseSend};
//!
//! # async fn demo(hub: Hub) -> Result<(), SendError> {
//! let run = hub.begin_run("checkout");
//! run.send().sse(SseSend::new("order_placed", &serde_json::json!({"order": 42})).on_stream("orders"))?;
//! run.finish().await?;
//! # Ok(()) }
//! ```

mod destination;
mod http;
mod options;
mod send;
mod streams;

use destinations_core::{DestinationPlugin, EventId, Hub, Registry, SendError, Sender, Typed};

pub use destination::{DEFAULT_STREAM, SseDestination};
pub use options::SseOptions;
pub use send::{MAX_NAME_CHARS, SseSend, check_name};
pub use streams::{EVENTS_DELIVERED, EVENTS_PUBLISHED, SUBSCRIBERS, SUBSCRIBERS_DROPPED};

/// The kind name of this destination in config (`kind = "sse"`), and the default instance.
pub const KIND: &str = "sse";

/// This destination's registration.
pub const PLUGIN: DestinationPlugin = DestinationPlugin {
    kind: KIND,
    describe: "live event streams over Server-Sent Events, with replay and Last-Event-ID resume",
    build: Typed::<SseDestination>::from_config,
};

destinations_core::register_destination!(PLUGIN);

/// Register this destination explicitly (when link-time registration is not wanted).
pub fn register(registry: &mut Registry) {
    registry.register(PLUGIN);
}

/// The routes of every SSE instance of `hub`, to mount in an HTTP server. Two instances may
/// not serve the same `route`.
pub fn routes(hub: &Hub) -> Result<utoipa_axum::router::OpenApiRouter, String> {
    let mut router = utoipa_axum::router::OpenApiRouter::new();
    let mut taken: Vec<(String, String)> = Vec::new();
    for (name, destination) in hub.instances_of::<Typed<SseDestination>>() {
        if let Some((other, _)) = taken.iter().find(|(_, route)| route == destination.route()) {
            return Err(format!(
                "destinations `{other}` and `{name}` both serve `{}`: give one another `route`",
                destination.route()
            ));
        }
        taken.push((name, destination.route().to_owned()));
        router = router.merge(destination.router());
    }
    Ok(router)
}

/// End the open responses of every SSE instance of `hub` (see [`SseDestination::close`]).
pub fn close(hub: &Hub) {
    for (_, destination) in hub.instances_of::<Typed<SseDestination>>() {
        destination.close();
    }
}

/// `send.sse(...)` on a [`Sender`].
pub trait SendSse {
    /// Publish an event through the instance named `sse`.
    fn sse(&self, send: SseSend) -> Result<EventId, SendError>;
    /// Publish an event through the SSE instance named `instance`.
    fn sse_to(&self, instance: &str, send: SseSend) -> Result<EventId, SendError>;
}

impl SendSse for Sender {
    fn sse(&self, send: SseSend) -> Result<EventId, SendError> {
        self.sse_to(KIND, send)
    }

    fn sse_to(&self, instance: &str, send: SseSend) -> Result<EventId, SendError> {
        self.record_to(instance, &send)
    }
}
