//! Where accepted sends wait, and the owner of everything that must survive: leases, retry
//! times and attempt counts, statuses and dead letters.
//!
//! The hub admits sends against a [`Capacity`] (a bound per destination instance under a global
//! one), hands them to a [`Queue`], and runs one dispatcher per instance that leases envelopes
//! from its [`QueueConsumer`], batches and delivers them, and ends every attempt in one
//! [`Settlement`]: delivered, retry at a time, or dead with a reason — plus the sends the
//! delivery itself made (emit fan-out, `$errors`), applied together.
//!
//! Backends: [`MemoryQueue`] here (fast, lost with the process), `destinations-sqlite`
//! (embedded, survives `kill -9`).

mod capacity;
mod memory;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;

pub use capacity::{Capacity, CapacityFull, FullScope, InstanceShare, QueueBounds, Tally, Unit};
pub use memory::MemoryQueue;

use crate::attempts::Attempted;
use crate::dead_letters::{DeadLetterFilter, DeadLetterPage};
use crate::destination::ResponseSummary;
use crate::envelope::{Envelope, EventId};
use crate::status::{EventFilter, EventPage, FinalWaiters, SendStatus};

/// What survives when the process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Nothing: the queue lives in memory. Shutdown drains it.
    Memory,
    /// A crash or `kill -9` of the process (a committed write is in the OS's hands).
    Process,
    /// A power loss too (every commit is synced to the disk).
    Machine,
}

impl Durability {
    /// Whether accepted sends outlive the process: shutdown then leaves the backlog in place
    /// instead of draining it.
    pub fn is_durable(self) -> bool {
        !matches!(self, Self::Memory)
    }
}

/// Where accepted sends wait for their dispatcher.
///
/// Implementations own the envelopes from [`enqueue`](Queue::enqueue) until a settlement says
/// they are delivered or dead, the retry schedule in between, and the statuses and dead
/// letters. Capacity is the hub's ([`Capacity`]); a shared backend may still refuse with
/// [`QueueError::Full`] on limits of its own.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// What survives when the process ends.
    fn durability(&self) -> Durability;

    /// Whether other hubs (other servers) enqueue to and lease from the same backlog. A hub
    /// counts each send it admits against its instance's room until the send is settled;
    /// settlements of a shared queue include sends other hubs admitted, so there a hub counts
    /// a send only until the queue has taken it, and the queue bounds the backlog itself
    /// (refusing with [`QueueError::Full`] or [`QueueError::Unavailable`]). Default: not shared.
    fn shared(&self) -> bool {
        false
    }

    /// A short description for logs and `destinations check` (`memory`, `sqlite ./data/queue.db`).
    fn describe(&self) -> String;

    /// The consumer side of one destination instance; called once per instance when the hub
    /// is built. Sends for an instance with no consumer are refused
    /// ([`QueueError::NoConsumer`]).
    fn consumer(&self, instance: &str) -> Result<Arc<dyn QueueConsumer>, QueueError>;

    /// The consumer of an instance whose sends go out one at a time, in order (its
    /// destination's `max_concurrency` is 1, as SSE's is): a shared queue lets one hub at a
    /// time lease them. Default: [`consumer`](Self::consumer), for a queue only one hub
    /// leases from.
    fn consumer_in_order(&self, instance: &str) -> Result<Arc<dyn QueueConsumer>, QueueError> {
        self.consumer(instance)
    }

    /// What the queue already holds per instance (a durable queue's backlog from an earlier
    /// run), so the hub can count it against each instance's capacity.
    fn backlog(&self) -> Result<Vec<(String, QueueDepth)>, QueueError>;

    /// Accept every envelope or none. Resolves once they are as durable as the backend
    /// promises; a refusal hands them back, untouched.
    async fn enqueue(&self, envelopes: Vec<Envelope>) -> Result<(), Refused>;

    /// Move these dead letters back into the queue with a fresh retry budget, atomically.
    /// Ids that are not dead letters are skipped. Returns the envelopes moved.
    async fn replay(&self, ids: &[EventId]) -> Result<Vec<Envelope>, QueueError>;

    /// Stop leasing: every consumer's [`lease`](QueueConsumer::lease) ends. A memory queue
    /// returns what it still holds (the hub dead-letters it); a durable one keeps its backlog
    /// and returns nothing. Settlements are still taken after this.
    async fn stop(&self) -> Vec<Envelope>;

    /// Everything is settled: release resources (a durable queue checkpoints its file).
    async fn close(&self) {}

    /// The statuses of sends.
    fn statuses(&self) -> &dyn StatusStore;

    /// The dead letters.
    fn dead_letters(&self) -> &dyn DeadLetterStore;

    /// How a shared queue's hubs all hear what one of them publishes (an SSE event delivered by
    /// one server reaches the subscribers of every server). `None` (the default): hubs on this
    /// queue are alone, and in-process delivery stays in-process.
    fn fanout(&self) -> Option<Arc<dyn Fanout>> {
        None
    }
}

/// Messages every hub on a shared queue receives, in one order.
///
/// A topic is dot-separated tokens of letters, digits, `_` and `-` (`sse.live.orders`); a
/// subscription to `sse.live` receives every topic below it.
#[async_trait]
pub trait Fanout: Send + Sync {
    /// Publish `message` under `topic`; resolves once every hub will receive it.
    async fn publish(&self, topic: &str, message: bytes::Bytes) -> Result<(), QueueError>;

    /// Every message below `topic`, in publish order: first those still kept (the newest few
    /// of each topic), then new ones as they come; from after `after` (a message's
    /// [`sequence`](FanoutMessage::sequence)) when given. The stream ends if the backend
    /// loses it: subscribe again from the last sequence seen.
    async fn subscribe(
        &self,
        topic: &str,
        after: Option<u64>,
    ) -> Result<futures::stream::BoxStream<'static, FanoutMessage>, QueueError>;
}

/// Hear every message below `topic` for as long as `handle` wants them (it returns `false` to
/// stop), subscribing again from the last sequence heard, a second later, whenever the backend
/// drops the subscription. Run it in a task of its own.
pub async fn hear(
    fanout: Arc<dyn Fanout>,
    topic: String,
    mut handle: impl FnMut(FanoutMessage) -> bool + Send,
) {
    use futures::StreamExt;
    let mut last = None;
    loop {
        match fanout.subscribe(&topic, last).await {
            Ok(mut heard) => {
                while let Some(message) = heard.next().await {
                    last = Some(message.sequence);
                    if !handle(message) {
                        return;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, %topic, "what other servers publish is not heard; trying again");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One message heard through a [`Fanout`].
#[derive(Clone, Debug)]
pub struct FanoutMessage {
    /// Its topic, whole.
    pub topic: String,
    /// Its place in the order every hub hears messages in.
    pub sequence: u64,
    /// What was published.
    pub message: bytes::Bytes,
}

/// The consumer side of one destination instance's share of the queue.
#[async_trait]
pub trait QueueConsumer: Send + Sync {
    /// Wait for work: up to `max` envelopes that are ready, or one batch whose retry came due.
    /// `None` once the queue stopped (a memory queue first hands out what was ready). Leased
    /// envelopes belong to the caller until settled or released.
    async fn lease(&self, max: usize) -> Option<Leased>;

    /// Apply the outcome of one delivery attempt, and queue the sends the delivery made, in
    /// one step.
    async fn settle(&self, settlement: &Settlement) -> Result<(), QueueError>;

    /// Give leased envelopes back without counting an attempt (a dispatcher that stopped
    /// before it could deliver them).
    async fn release(&self, envelopes: Vec<Envelope>);

    /// Still working on these (a batch filling, a long attempt): a backend whose leases expire
    /// keeps them. Default: leases do not expire.
    async fn extend(&self, _ids: &[EventId]) -> Result<(), QueueError> {
        Ok(())
    }
}

/// Envelopes handed to a dispatcher.
#[derive(Debug)]
pub enum Leased {
    /// Ready for their first attempt (or their first in this process): batch them.
    Ready(Vec<Envelope>),
    /// A batch that failed together and is due again: deliver it as it is, so a destination
    /// that writes a batch as one object writes the same object again.
    Retry(Vec<Envelope>),
}

/// One envelope's part in a settlement.
#[derive(Clone, Debug)]
pub struct Settled {
    /// The envelope, its attempt count including this attempt.
    pub envelope: Envelope,
    /// The error of a failed attempt (for a dead letter, the reason).
    pub error: Option<String>,
    /// What the target answered.
    pub response: Option<Arc<ResponseSummary>>,
}

/// A batch to try again.
#[derive(Clone, Debug)]
pub struct RetryBatch {
    /// Its envelopes, with the error of this attempt.
    pub sends: Vec<Settled>,
    /// How long to wait.
    pub wait: Duration,
    /// When the next attempt is due, by the wall clock (for statuses and durable stores).
    pub at: SystemTime,
}

/// The outcome of one delivery attempt, applied in one step.
#[derive(Clone, Debug, Default)]
pub struct Settlement {
    /// Accepted by the target.
    pub delivered: Vec<Settled>,
    /// To try again, together.
    pub retry: Option<RetryBatch>,
    /// Given up on, each with its reason.
    pub dead: Vec<Settled>,
    /// Sends the delivery made (emit fan-out, `$errors`), queued in the same step.
    pub follow_ups: Vec<Envelope>,
    /// The attempt this settles, if it settles one: its failures go into the sends' attempt
    /// logs ([`failed_attempts`](Settlement::failed_attempts)).
    pub attempted: Option<Attempted>,
}

impl Settlement {
    /// Envelopes that leave the queue for good with this settlement.
    pub fn finished(&self) -> impl Iterator<Item = &Envelope> {
        self.delivered
            .iter()
            .chain(&self.dead)
            .map(|settled| &settled.envelope)
    }
}

/// Where each send is, for one backend.
#[async_trait]
pub trait StatusStore: Send + Sync {
    /// The status of one send with its attempt log, while it is remembered.
    async fn get(&self, id: EventId) -> Result<Option<SendStatus>, QueueError>;

    /// The newest remembered sends matching `filter`, without their attempt logs, `limit` at
    /// a time from `after` (the previous page's [`next`](EventPage::next)): newest first by
    /// when they were made.
    async fn list(
        &self,
        filter: &EventFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EventPage, QueueError>;

    /// A delivery attempt starts for these (they show `in_flight`).
    fn attempting(&self, envelopes: &[Envelope]);

    /// Those waiting for sends to finish, woken by the store as sends become final.
    fn waiters(&self) -> &FinalWaiters;

    /// The status once the send is delivered or dead, or as it is when `timeout` passes.
    /// `None` if the send is unknown.
    async fn wait_final(
        &self,
        id: EventId,
        timeout: Duration,
    ) -> Result<Option<SendStatus>, QueueError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register before looking, so a finish in between is not missed.
            let finished = self.waiters().register(id);
            let Some(status) = self.get(id).await? else {
                return Ok(None);
            };
            if status.state.is_final() {
                return Ok(Some(status));
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                self.waiters().forget_closed(id);
                return self.get(id).await;
            }
        }
    }
}

/// The dead letters of one backend.
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// Dead letters matching `filter`, newest first, `limit` at a time from `after` (the
    /// previous page's [`next`](DeadLetterPage::next)).
    async fn list(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterPage, QueueError>;

    /// How many dead letters were dropped because the store was full.
    async fn evicted(&self) -> Result<u64, QueueError>;
}

/// How much a queue holds (envelopes pending until settled, retries included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
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
    pub why: QueueError,
    /// The envelopes, untouched.
    pub envelopes: Vec<Envelope>,
}

/// The queue refused, or could not do, what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// No room for these sends.
    #[error(transparent)]
    Full(#[from] CapacityFull),
    /// The backend cannot take or give sends right now (disk full, I/O error, broker down).
    #[error("the queue is unavailable: {0}")]
    Unavailable(String),
    /// The queue no longer takes sends.
    #[error("the queue is closed: the hub is shutting down")]
    Closed,
    /// No consumer exists for this destination instance.
    #[error("no destination instance `{0}` consumes from this queue")]
    NoConsumer(String),
    /// A dead-letter page cursor this queue did not make.
    #[error(
        "`after`: `{0}` is not a page cursor of this server; pass the `next` of the previous page"
    )]
    InvalidCursor(String),
}
