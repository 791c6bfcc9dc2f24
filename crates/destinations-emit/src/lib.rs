//! The emit destination of `destinations`: `send.emit(event, channel?)` delivers an event to
//! every listener subscribed to its emitter (the run, or an explicit `emitter_id`) and channel.
//! Listeners are webhook URLs — called exactly as the HTTP destination delivers, with its SSRF
//! guard, signing and retries — or in-process handlers registered with
//! [`EmitDestination::listen`]. Each listener gets a send of its own, retried and dead-lettered
//! on its own. Every dead letter of every destination is also emitted on the built-in `$errors`
//! channel, and a chain of listeners emitting back to each other is cut after `max_hops`.
//!
//! ```no_run
//! use destinations_core::prelude::*;
//! use destinations_emit::{EmitSend, SendEmit};
//!
//! # async fn demo(hub: Hub) -> Result<(), Box<dyn std::error::Error>> {
//! destinations_emit::listen(&hub, "audit", |emitted| async move {
//!     println!("{} emitted {}", emitted.emitter_id, emitted.event.get());
//!     Ok(())
//! })?;
//! destinations_emit::subscribe(&hub, "checkout", "audit", None)?;
//! let run = hub.begin_run("checkout");
//! run.send().emit(EmitSend::new(&serde_json::json!({"order": 42})))?;
//! run.finish().await?;
//! # Ok(()) }
//! ```

mod destination;
mod history;
mod http;
mod send;
mod subscriptions;

use destinations_core::{DestinationPlugin, EventId, Hub, Registry, SendError, Sender};
use utoipa_axum::router::OpenApiRouter;

pub use destination::{EmitDestination, EmitOptions, Emitted, ListenerResult};
pub use history::{HistoryEntry, HistoryMetadata, RawEvent};
pub use send::{ENDPOINTS_CHANNEL, ERRORS_CHANNEL, EmitSend, MAX_NAME_CHARS, check_name};
pub use subscriptions::Subscription;

/// The kind name of this destination in config (`kind = "emit"`), and the default instance.
pub const KIND: &str = "emit";

/// This destination's registration.
pub const PLUGIN: DestinationPlugin = DestinationPlugin {
    kind: KIND,
    describe: "events fanned out to subscribed listeners (webhooks, in-process handlers), with history and $errors",
    build: EmitDestination::from_config,
};

destinations_core::register_destination!(PLUGIN);

/// Register this destination explicitly (when link-time registration is not wanted).
pub fn register(registry: &mut Registry) {
    registry.register(PLUGIN);
}

/// The hub's one emit instance (the API and the helpers below serve one).
pub fn instance(hub: &Hub) -> Result<std::sync::Arc<EmitDestination>, String> {
    let mut found = hub.instances_of::<EmitDestination>();
    match found.len() {
        1 => Ok(found.remove(0).1),
        0 => Err("the hub has no emit instance (kind = \"emit\")".to_owned()),
        n => Err(format!(
            "the hub has {n} emit instances; the subscriptions API serves one: keep one"
        )),
    }
}

/// Deliver events for `listener_id` to `handler` in this process (see
/// [`EmitDestination::listen`]).
pub fn listen<F, Fut>(hub: &Hub, listener_id: &str, handler: F) -> Result<(), String>
where
    F: Fn(Emitted) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ListenerResult> + Send + 'static,
{
    instance(hub)?.listen(listener_id, handler);
    Ok(())
}

/// Subscribe `listener_id` to the emitters matching `emitter_id` on `event_name` (none = the
/// default channel); `false` if it was subscribed already.
pub fn subscribe(
    hub: &Hub,
    emitter_id: &str,
    listener_id: &str,
    event_name: Option<&str>,
) -> Result<bool, String> {
    instance(hub)?.subscribe(Subscription {
        emitter_id: emitter_id.to_owned(),
        listener_id: listener_id.to_owned(),
        event_name: event_name.map(str::to_owned),
    })
}

/// The subscriptions API of the hub's emit instance, to mount in an HTTP server (none if the
/// hub has no emit instance).
pub fn routes(hub: &Hub) -> Result<OpenApiRouter, String> {
    if hub.instances_of::<EmitDestination>().is_empty() {
        return Ok(OpenApiRouter::new());
    }
    Ok(http::router(instance(hub)?))
}

/// `send.emit(...)` on a [`Sender`].
pub trait SendEmit {
    /// Emit through the instance named `emit`.
    fn emit(&self, send: EmitSend) -> Result<EventId, SendError>;
    /// Emit through the emit instance named `instance`.
    fn emit_to(&self, instance: &str, send: EmitSend) -> Result<EventId, SendError>;
}

impl SendEmit for Sender {
    fn emit(&self, send: EmitSend) -> Result<EventId, SendError> {
        self.emit_to(KIND, send)
    }

    fn emit_to(&self, instance: &str, send: EmitSend) -> Result<EventId, SendError> {
        self.record_to(instance, &send)
    }
}
