//! A shared queue for `destinations` on NATS JetStream: several servers, one backlog.
//!
//! Sends wait in a work-queue stream, a subject per destination instance
//! (`PREFIX.send.INSTANCE`); every server leases from the instance's one durable pull consumer,
//! so each send goes to one server at a time. A run is published all or none (JetStream 2.12's
//! atomic batch publish, up to 1 000 sends a batch) with each send's id as its `Nats-Msg-Id`, so
//! a publish repeated after a lost answer is not stored twice. A delivered send is acknowledged
//! (and leaves the stream); a failed one is answered with a delayed negative acknowledgement,
//! and comes back when its retry is due, to whichever server asks first; a server that dies
//! hands its leased sends on when their lease (`lease`, 30 s) runs out. Dead letters wait in a
//! stream of their own, statuses in a key-value bucket, so every server lists, replays and
//! answers the same.
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
