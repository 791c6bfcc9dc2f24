//! Where released sends wait for their dispatcher.

mod memory;

use async_trait::async_trait;

pub use memory::{MemoryQueue, QueueCapacity};

use crate::envelope::Envelope;

/// The queue between the send path and the dispatchers.
///
/// `enqueue` is all-or-nothing, so a run's sends are released together or refused together.
/// An envelope occupies the queue until it is [`settle`](Queue::settle)d: delivered or
/// dead-lettered, retries included, so the queue's bound is a bound on everything pending.
pub trait Queue: Send + Sync + 'static {
    /// Accept every envelope or none; refused ones come back with the reason.
    fn enqueue(&self, envelopes: Vec<Envelope>) -> Result<(), Refused>;
    /// The consumer side of one destination instance; called once per instance.
    fn consumer(&self, destination: &str) -> Box<dyn QueueConsumer>;
    /// The envelope has left the queue for good (delivered or dead-lettered).
    fn settle(&self, envelope: &Envelope);
    /// Stop taking envelopes; consumers drain what is there and then end.
    fn close(&self);
    /// How much is pending.
    fn depth(&self) -> QueueDepth;
}

/// The consumer side of one destination instance's share of the queue.
#[async_trait]
pub trait QueueConsumer: Send + Sync {
    /// The next envelope, or `None` once the queue is closed and drained.
    async fn next(&mut self) -> Option<Envelope>;
}

/// How much a queue holds (envelopes pending until settled).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueDepth {
    /// Pending envelopes.
    pub events: usize,
    /// Their payload bytes.
    pub bytes: usize,
}

/// Envelopes the queue did not take, handed back with the reason.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub why: QueueFull,
    /// The envelopes, untouched.
    pub envelopes: Vec<Envelope>,
}

/// The queue refused the sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueFull {
    /// No room for this many more envelopes.
    #[error(
        "the queue is full: {pending} sends pending, room for {limit}; this request needs {asked} more \
         (deliveries are slower than sends; retry later or raise queue.max_events)"
    )]
    Events {
        /// Envelopes pending.
        pending: usize,
        /// The queue's limit.
        limit: usize,
        /// Envelopes asked for.
        asked: usize,
    },
    /// No room for this many more bytes.
    #[error(
        "the queue is full: {pending} payload bytes pending, room for {limit}; this request needs {asked} more \
         (deliveries are slower than sends; retry later or raise queue.max_bytes)"
    )]
    Bytes {
        /// Bytes pending.
        pending: usize,
        /// The queue's limit.
        limit: usize,
        /// Bytes asked for.
        asked: usize,
    },
    /// The queue no longer takes sends.
    #[error("the queue is closed: the hub is shutting down")]
    Closed,
    /// No consumer exists for this destination.
    #[error("no destination instance `{0}` consumes from this queue")]
    NoConsumer(String),
}
