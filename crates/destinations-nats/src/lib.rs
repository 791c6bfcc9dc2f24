//! A shared queue for `destinations` on NATS JetStream: several servers, one backlog.
//!
//! Sends wait in a work-queue stream. A run's sends to one destination instance are stored as
//! one message (a *bundle*, on `PREFIX.send.INSTANCE.COUNT`; up to 1 000 sends and
//! nats-server's `max_payload`), and a run that reaches several instances is published all or
//! none with JetStream 2.12's atomic batch publish. A bundle's `Nats-Msg-Id` is its first
//! send's id, so a publish repeated after a lost answer is not stored twice. Every server
//! leases from the instance's one durable pull consumer, so a bundle is with one server at a
//! time; it is acknowledged (and leaves the stream) once each of its sends is delivered, dead
//! (then in a dead-letter stream), or back in the stream: a batch that failed goes back whole
//! as one message, due at its retry time, and comes back as that batch to whichever server
//! asks first once due. A server that dies hands its bundles on when their lease (`lease`,
//! 30 s) runs out; the next server passes over the sends whose statuses are already final.
//! Statuses live in a key-value bucket, so every server lists, replays and answers the same.
//!
//! Needs nats-server 2.12.1 or later with JetStream.

mod dead;
mod fanout;
mod lock;
mod options;
mod queue;
mod statuses;
mod wire;

pub use options::NatsOptions;
pub use queue::{NatsError, NatsQueue};

/// The queue kind name used in config (`[hub.queue] kind = "nats"`).
pub const KIND: &str = "nats";

/// nats-server did not do what was asked: the queue is unavailable, and says for what.
fn unavailable(what: &str, error: impl std::fmt::Display) -> destinations_core::QueueError {
    destinations_core::QueueError::Unavailable(format!("{what}: {error}"))
}

/// Create a stream, or bring an existing one to `config` (`what` names it in errors): the
/// stream and its config as the server holds it.
async fn open_stream(
    context: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
    what: &str,
) -> Result<
    (
        async_nats::jetstream::stream::Stream,
        async_nats::jetstream::stream::Config,
    ),
    String,
> {
    let name = config.name.clone();
    let fail = |e: &dyn std::fmt::Display| format!("cannot open the {what} `{name}`: {e}");
    let info = context
        .create_or_update_stream(config)
        .await
        .map_err(|e| fail(&e))?;
    let stream = context.get_stream(&name).await.map_err(|e| fail(&e))?;
    Ok((stream, info.config))
}
