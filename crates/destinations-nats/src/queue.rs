//! The queue: a work-queue stream with a subject per destination instance, one durable pull
//! consumer per instance shared by every server.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::response::Response;
use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, header};
use async_trait::async_trait;
use destinations_core::{
    DeadLetterStore, Durability, Envelope, EventId, Fanout, HubConfig, IdHasher, IdMap, Leased,
    Queue, QueueConsumer, QueueDepth, QueueError, Refused, Settlement, StatusStore,
};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::dead::NatsDeadLetters;
use crate::fanout::NatsFanout;
use crate::lock::{self, InstanceLock};
use crate::options::NatsOptions;
use crate::statuses::NatsStatuses;
use crate::wire;

/// The most messages one atomic publish holds (nats-server's limit).
const MAX_ATOMIC: usize = 1000;

/// The most sends one message holds: what a server that dies mid-delivery may hand on to be
/// looked over again.
const MAX_BUNDLE: usize = 1000;

/// Room left in a message for its headers.
const HEADER_ROOM: usize = 4096;

/// JetStream's error code for an atomic batch holding an id already stored.
const DUPLICATE_IN_BATCH: u64 = 10201;

/// A queue shared by every server that connects to the same streams.
pub struct NatsQueue {
    shared: Arc<Shared>,
}

struct Shared {
    options: NatsOptions,
    client: async_nats::Client,
    context: jetstream::Context,
    stream: stream::Stream,
    statuses: NatsStatuses,
    dead_letters: NatsDeadLetters,
    fanout: Arc<NatsFanout>,
    backlog: Vec<(String, QueueDepth)>,
    stopped: watch::Sender<bool>,
    /// Every consumer, to hand back what it still holds at close.
    consumers: Mutex<Vec<std::sync::Weak<NatsConsumer>>>,
    /// The locks of in-order instances.
    locks: kv::Store,
    /// Every in-order consumer's lock, to release at close.
    held_locks: Mutex<Vec<Arc<InstanceLock>>>,
    /// This server, as a lock holder.
    node: String,
    /// The largest bundle body nats-server takes.
    bundle_limit: usize,
    /// The most bytes one pull asks for: several bundles, at least the largest.
    fetch_bytes: usize,
}

/// The queue could not be opened: what is wrong, in words.
#[derive(Debug, thiserror::Error)]
#[error("hub.queue (nats at {url}): {message}")]
pub struct NatsError {
    url: String,
    message: String,
}

impl NatsQueue {
    /// Connect, check the server, and create (or bring up to date) the streams and the bucket,
    /// with the hub's settings: `hub.queue.max_events` and `max_bytes` bound the shared backlog
    /// (the stream's own limits; a send past them is refused), the status retention and the
    /// dead-letter bounds apply to the bucket and the dead-letter stream.
    pub async fn connect(options: NatsOptions, hub: &HubConfig) -> Result<Self, NatsError> {
        let retention = hub.status_retention();
        let bounds = hub.queue.bounds;
        let fail = |message: String| NatsError {
            url: options.url.clone(),
            message,
        };
        options.check().map_err(fail)?;
        let mut connect = async_nats::ConnectOptions::new()
            .name("destinations")
            .connection_timeout(options.timeout)
            .ping_interval(Duration::from_secs(10))
            .request_timeout(Some(options.timeout));
        if let (Some(user), Some(password)) = (&options.user, &options.password) {
            connect = connect.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &options.token {
            connect = connect.token(token.clone());
        }
        if let Some(ca) = &options.ca_file {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        // Several servers of a cluster, comma-separated.
        let servers: Vec<&str> = options.url.split(',').map(str::trim).collect();
        let client = connect
            .connect(servers)
            .await
            .map_err(|e| fail(format!("cannot connect: {e}")))?;
        if !client.is_server_compatible(2, 12, 1) {
            return Err(fail(format!(
                "nats-server {} is too old: 2.12.1 or later publishes a run all or none",
                client.server_info().version
            )));
        }
        let context = jetstream::ContextBuilder::new()
            .timeout(options.timeout)
            .build(client.clone());
        let (stream, held) = crate::open_stream(
            &context,
            stream::Config {
                name: options.stream.clone(),
                subjects: vec![format!("{}.send.>", options.subject_prefix)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                discard: stream::DiscardPolicy::New,
                duplicate_window: Duration::from_secs(120),
                max_messages: i64::try_from(bounds.max_events).unwrap_or(i64::MAX),
                max_bytes: i64::try_from(bounds.max_bytes).unwrap_or(i64::MAX),
                allow_atomic_publish: true,
                ..Default::default()
            },
            "stream",
        )
        .await
        .map_err(fail)?;
        if !held.allow_atomic_publish {
            return Err(fail(format!(
                "the stream `{}` does not take atomic publishes (is JetStream 2.12.1 or later?)",
                options.stream
            )));
        }
        let statuses = NatsStatuses::open(
            &context,
            &options.status_bucket,
            retention.age,
            options.replicas,
        )
        .await
        .map_err(fail)?;
        let dead_letters = NatsDeadLetters::open(
            &context,
            &options.dead_letter_stream,
            &options.subject_prefix,
            hub.dead_letter_capacity,
            hub.dead_letter_max_bytes,
            options.replicas,
        )
        .await
        .map_err(fail)?;
        let fanout = NatsFanout::open(
            &context,
            &options.fanout_stream,
            &options.subject_prefix,
            options.fanout_keep,
            options.replicas,
        )
        .await
        .map_err(fail)?;
        let locks = lock::bucket(
            &context,
            &options.lock_bucket,
            options.lease,
            options.replicas,
        )
        .await
        .map_err(fail)?;
        let max_payload = client.server_info().max_payload;
        let bundle_limit = max_payload.saturating_sub(HEADER_ROOM).max(HEADER_ROOM);
        let backlog = backlog(&stream, &options.subject_prefix)
            .await
            .map_err(fail)?;
        Ok(Self {
            shared: Arc::new(Shared {
                options,
                client,
                context,
                stream,
                statuses,
                dead_letters,
                fanout: Arc::new(fanout),
                backlog,
                stopped: watch::channel(false).0,
                consumers: Mutex::new(Vec::new()),
                locks,
                held_locks: Mutex::new(Vec::new()),
                node: EventId::new().to_string(),
                bundle_limit,
                fetch_bytes: (max_payload * 4).max(4 << 20),
            }),
        })
    }
}

/// What the stream holds per instance: its bundles' subjects say how many sends each holds.
async fn backlog(
    stream: &stream::Stream,
    prefix: &str,
) -> Result<Vec<(String, QueueDepth)>, String> {
    let info = stream
        .get_info()
        .await
        .map_err(|e| format!("cannot read the backlog: {e}"))?;
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}.send.>"))
        .await
        .map_err(|e| format!("cannot read the backlog: {e}"))?;
    let mut sends: Vec<(String, usize)> = Vec::new();
    let send_prefix = format!("{prefix}.send.");
    while let Some(entry) = subjects.next().await {
        let (subject, messages) = entry.map_err(|e| format!("cannot read the backlog: {e}"))?;
        let Some((instance, per_message)) = subject
            .strip_prefix(&send_prefix)
            .and_then(|rest| rest.rsplit_once('.'))
        else {
            continue;
        };
        let count = messages * per_message.parse::<usize>().unwrap_or(1);
        match sends.iter_mut().find(|(name, _)| name == instance) {
            Some((_, total)) => *total += count,
            None => sends.push((instance.to_owned(), count)),
        }
    }
    let total: usize = sends.iter().map(|(_, count)| count).sum();
    let average = usize::try_from(info.state.bytes).unwrap_or(usize::MAX) / total.max(1);
    Ok(sends
        .into_iter()
        .map(|(instance, events)| {
            (
                instance,
                QueueDepth {
                    events,
                    bytes: events * average,
                },
            )
        })
        .collect())
}

impl Shared {
    fn unavailable_now(&self) -> Option<QueueError> {
        (self.client.connection_state() != async_nats::connection::State::Connected).then(|| {
            QueueError::Unavailable(format!(
                "nats-server at {} is not reachable",
                self.options.url
            ))
        })
    }

    /// Why nats-server did not store sends, in words.
    fn refusal(&self, what: &str, error: &dyn std::fmt::Display) -> QueueError {
        let text = error.to_string();
        if text.contains("maximum messages") || text.contains("maximum bytes") {
            return QueueError::Unavailable(format!(
                "the shared queue is full: the stream `{}` holds hub.queue.max_events sends or max_bytes bytes ({text})",
                self.options.stream
            ));
        }
        // A publish in flight when the connection dropped times out waiting for its ack: the
        // cause worth naming is the lost server, not the timeout.
        if let Some(QueueError::Unavailable(unreachable)) = self.unavailable_now() {
            return QueueError::Unavailable(format!(
                "{unreachable}: it did not store {what} ({text})"
            ));
        }
        QueueError::Unavailable(format!("nats-server did not store {what}: {text}"))
    }

    /// The subject of a bundle of `count` sends of `instance`: the count in the subject lets
    /// the stream's per-subject counts say how many sends wait.
    fn subject(&self, instance: &str, count: usize) -> String {
        format!("{}.send.{instance}.{count}", self.options.subject_prefix)
    }

    /// These sends as the messages that store them: each instance's sends in the order given,
    /// in bundles of at most [`MAX_BUNDLE`] sends that fit one message. `first_publish` gives
    /// each bundle its first send's id as `Nats-Msg-Id`, so a publish repeated after a lost
    /// answer is dropped; sends published again (a retry, sends handed back) go without one,
    /// since the same first send may then lead a different bundle.
    fn bundles(
        &self,
        envelopes: &[Envelope],
        first_publish: bool,
        handling: wire::Handling,
    ) -> Vec<Outgoing> {
        let mut per_instance: Vec<(&str, Vec<&Envelope>)> = Vec::new();
        for envelope in envelopes {
            match per_instance
                .iter_mut()
                .find(|(instance, _)| *instance == &*envelope.destination)
            {
                Some((_, sends)) => sends.push(envelope),
                None => per_instance.push((&envelope.destination, vec![envelope])),
            }
        }
        let limit = self.bundle_limit;
        let mut outgoing = Vec::new();
        for (instance, sends) in per_instance {
            let mut bundle: Vec<&Envelope> = Vec::new();
            let mut size = 1;
            for envelope in sends {
                let framed = wire::framed_len(envelope);
                if !bundle.is_empty() && (bundle.len() == MAX_BUNDLE || size + framed > limit) {
                    outgoing.push(self.outgoing(instance, &bundle, first_publish, handling));
                    bundle.clear();
                    size = 1;
                }
                bundle.push(envelope);
                size += framed;
            }
            if !bundle.is_empty() {
                outgoing.push(self.outgoing(instance, &bundle, first_publish, handling));
            }
        }
        outgoing
    }

    fn outgoing(
        &self,
        instance: &str,
        sends: &[&Envelope],
        first_publish: bool,
        handling: wire::Handling,
    ) -> Outgoing {
        let message_id = first_publish.then(|| sends[0].id.to_string());
        Outgoing {
            subject: self.subject(instance, sends.len()),
            headers: wire::bundle_headers(message_id.as_deref(), handling),
            body: wire::bundle_body(sends),
        }
    }

    /// Store a run's sends, all or none, then their statuses.
    async fn publish(&self, envelopes: &[Envelope]) -> Result<(), QueueError> {
        self.store(self.bundles(envelopes, true, wire::Handling::default()))
            .await?;
        if let Err(error) = self.statuses.queued(envelopes).await {
            // The sends are stored; only their `queued` status is missing until they settle.
            tracing::warn!(%error, count = envelopes.len(), "queued statuses not written");
        }
        Ok(())
    }

    /// Put sends back in the stream (a batch to try again, sends handed back, a replay).
    async fn republish(
        &self,
        envelopes: &[Envelope],
        handling: wire::Handling,
    ) -> Result<(), QueueError> {
        self.store(self.bundles(envelopes, false, handling)).await
    }

    /// Store these messages, all or none (more than [`MAX_ATOMIC`] in parts, each all or
    /// none): one is a plain publish, more an atomic batch.
    async fn store(&self, messages: Vec<Outgoing>) -> Result<(), QueueError> {
        if let Some(down) = self.unavailable_now() {
            return Err(down);
        }
        if let Some(large) = messages.iter().find(|m| m.body.len() > self.bundle_limit) {
            return Err(QueueError::Unavailable(format!(
                "a send of {} bytes is larger than nats-server takes in one message ({} bytes, its max_payload)",
                large.body.len(),
                self.bundle_limit
            )));
        }
        match messages.as_slice() {
            [] => Ok(()),
            [one] => self.publish_one(one).await,
            _ => {
                for part in messages.chunks(MAX_ATOMIC) {
                    self.publish_atomic(part).await?;
                }
                Ok(())
            }
        }
    }

    async fn publish_one(&self, message: &Outgoing) -> Result<(), QueueError> {
        let fail = |e: &dyn std::fmt::Display| self.refusal("the sends", e);
        self.context
            .publish_with_headers(
                message.subject.clone(),
                message.headers.clone(),
                message.body.clone(),
            )
            .await
            .map_err(|e| fail(&e))?
            .await
            .map_err(|e| fail(&e))?;
        Ok(())
    }

    /// One atomic batch (JetStream 2.12's `Nats-Batch-*` headers): the first message and the
    /// commit are requests, the rest plain publishes on the same connection, in order.
    async fn publish_atomic(&self, part: &[Outgoing]) -> Result<(), QueueError> {
        let batch = EventId::new().to_string();
        let fail = |e: &dyn std::fmt::Display| self.refusal("the run", e);
        let last = part.len();
        for (index, message) in part.iter().enumerate() {
            let mut headers = message.headers.clone();
            headers.insert(header::NATS_BATCH_ID, batch.as_str());
            headers.insert(
                header::NATS_BATCH_SEQUENCE,
                (index + 1).to_string().as_str(),
            );
            let commit = index + 1 == last;
            if commit {
                headers.insert(header::NATS_BATCH_COMMIT, header::NATS_BATCH_COMMIT_FINAL);
            }
            let subject = message.subject.clone();
            if index == 0 || commit {
                let request = async_nats::Request::new()
                    .headers(headers)
                    .payload(message.body.clone())
                    .timeout(Some(self.options.timeout));
                let reply = self
                    .client
                    .send_request(subject, request)
                    .await
                    .map_err(|e| fail(&e))?;
                if reply.payload.is_empty() {
                    if commit {
                        return Err(fail(&"the commit was not acknowledged"));
                    }
                    continue;
                }
                match serde_json::from_slice::<Response<jetstream::publish::PublishAck>>(
                    &reply.payload,
                ) {
                    Ok(Response::Ok(_)) => {}
                    // A run stored before, whose answer was lost: it is there.
                    Ok(Response::Err { error }) if error.error_code().0 == DUPLICATE_IN_BATCH => {
                        return Ok(());
                    }
                    Ok(Response::Err { error }) => return Err(fail(&error)),
                    Err(e) => return Err(fail(&e)),
                }
            } else {
                self.client
                    .publish_with_headers(subject, headers, message.body.clone())
                    .await
                    .map_err(|e| fail(&e))?;
            }
        }
        Ok(())
    }
}

/// One message for the work stream.
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    body: bytes::Bytes,
}

impl NatsQueue {
    fn nats_consumer(
        &self,
        instance: &str,
        lock: Option<Arc<InstanceLock>>,
    ) -> Arc<dyn QueueConsumer> {
        let consumer = Arc::new(NatsConsumer {
            shared: self.shared.clone(),
            instance: Arc::from(instance),
            consumer: tokio::sync::Mutex::new(None),
            leases: Arc::new(Mutex::new(Leases::default())),
            fetching: tokio::sync::Mutex::new(None),
            renewing: std::sync::Once::new(),
            lock,
        });
        self.shared
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&consumer));
        consumer
    }
}

#[async_trait]
impl Queue for NatsQueue {
    fn durability(&self) -> Durability {
        Durability::Process
    }

    fn shared(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "nats {} (stream {})",
            self.shared.options.url, self.shared.options.stream
        )
    }

    fn consumer(&self, instance: &str) -> Result<Arc<dyn QueueConsumer>, QueueError> {
        Ok(self.nats_consumer(instance, None))
    }

    /// One server at a time leases the instance's sends (see [`lock`](crate::lock)).
    fn consumer_in_order(&self, instance: &str) -> Result<Arc<dyn QueueConsumer>, QueueError> {
        let shared = &self.shared;
        let lock = Arc::new(InstanceLock::new(
            shared.locks.clone(),
            instance,
            &shared.node,
            shared.options.lease,
        ));
        shared
            .held_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(lock.clone());
        Ok(self.nats_consumer(instance, Some(lock)))
    }

    fn backlog(&self) -> Result<Vec<(String, QueueDepth)>, QueueError> {
        Ok(self.shared.backlog.clone())
    }

    async fn enqueue(&self, envelopes: Vec<Envelope>) -> Result<(), Refused> {
        match self.shared.publish(&envelopes).await {
            Ok(()) => Ok(()),
            Err(why) => Err(Refused { why, envelopes }),
        }
    }

    async fn replay(&self, ids: &[EventId]) -> Result<Vec<Envelope>, QueueError> {
        let shared = &self.shared;
        if let Some(down) = shared.unavailable_now() {
            return Err(down);
        }
        let now = tokio::time::Instant::now();
        let mut replayed = Vec::new();
        // Each letter is queued again before it leaves the dead letters: a failure in between
        // leaves it in both (replayed twice at worst), never in neither.
        for id in ids {
            let Some((sequence, mut envelope)) = shared.dead_letters.get(*id).await? else {
                continue;
            };
            envelope.attempts = 0;
            envelope.restart_budget(now);
            shared
                .statuses
                .requeued(std::slice::from_ref(&envelope))
                .await?;
            shared
                .republish(
                    std::slice::from_ref(&envelope),
                    wire::Handling {
                        replayed: true,
                        ..wire::Handling::default()
                    },
                )
                .await?;
            shared.dead_letters.remove(sequence).await?;
            replayed.push(envelope);
        }
        Ok(replayed)
    }

    async fn stop(&self) -> Vec<Envelope> {
        self.shared.stopped.send_replace(true);
        Vec::new()
    }

    /// Hand back at once what this server still holds (a batch cut off by the shutdown
    /// deadline, sends leased and not yet handed out), so another server takes it now rather
    /// than when its lease runs out.
    async fn close(&self) {
        let shared = &self.shared;
        let consumers: Vec<Arc<NatsConsumer>> = shared
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        for consumer in consumers {
            consumer.hand_back_all().await;
        }
        let locks: Vec<Arc<InstanceLock>> = shared
            .held_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for lock in locks {
            let _ = tokio::time::timeout(shared.options.timeout, lock.release()).await;
        }
        let _ = tokio::time::timeout(shared.options.timeout, shared.client.flush()).await;
    }

    fn statuses(&self) -> &dyn StatusStore {
        &self.shared.statuses
    }

    fn dead_letters(&self) -> &dyn DeadLetterStore {
        &self.shared.dead_letters
    }

    fn fanout(&self) -> Option<Arc<dyn Fanout>> {
        Some(self.shared.fanout.clone())
    }
}

/// One instance's share of the stream, through its durable consumer.
struct NatsConsumer {
    shared: Arc<Shared>,
    instance: Arc<str>,
    consumer: tokio::sync::Mutex<Option<PullConsumer>>,
    /// What this server leased, from the lease to the settlement.
    leases: Arc<Mutex<Leases>>,
    /// The pull under way, read across leases until it ends.
    fetching: tokio::sync::Mutex<Option<pull::Batch>>,
    /// The task that keeps the leases (started with the first lease).
    renewing: std::sync::Once,
    /// For an instance whose sends go out in order: held while this server leases them.
    lock: Option<Arc<InstanceLock>>,
}

type IdSet = std::collections::HashSet<EventId, std::hash::BuildHasherDefault<IdHasher>>;

/// One leased message.
struct Held {
    /// Where to answer for it.
    reply: async_nats::Subject,
    /// Its sends as leased, in order.
    sends: Vec<Envelope>,
    /// Those not yet settled.
    unsettled: IdSet,
}

/// Every message this server leased for one instance, and the sends not yet handed out.
/// A message is acknowledged once all its sends are settled.
#[derive(Default)]
struct Leases {
    messages: HashMap<u64, Held>,
    /// Each leased send's message.
    sends: IdMap<u64>,
    next_key: u64,
    /// Sends leased and not yet handed to the dispatcher.
    ready: VecDeque<Envelope>,
    /// Batches to try again, each handed out whole.
    retries: VecDeque<Vec<Envelope>>,
}

impl Leases {
    /// A leased message's sends, to hand out.
    fn hold(&mut self, reply: async_nats::Subject, envelopes: Vec<Envelope>, retry: bool) {
        let key = self.next_key;
        self.next_key += 1;
        for envelope in &envelopes {
            self.sends.insert(envelope.id, key);
        }
        self.messages.insert(
            key,
            Held {
                reply,
                unsettled: envelopes.iter().map(|e| e.id).collect(),
                sends: envelopes.clone(),
            },
        );
        if retry {
            self.retries.push_back(envelopes);
        } else {
            self.ready.extend(envelopes);
        }
    }

    /// A batch to try again first, else up to `max` ready sends.
    fn hand_out(&mut self, max: usize) -> Option<Leased> {
        if let Some(batch) = self.retries.pop_front() {
            return Some(Leased::Retry(batch));
        }
        if self.ready.is_empty() {
            return None;
        }
        let count = max.clamp(1, self.ready.len());
        Some(Leased::Ready(self.ready.drain(..count).collect()))
    }

    /// These sends are settled: where to acknowledge the messages left with none unsettled.
    fn settled(&mut self, ids: impl IntoIterator<Item = EventId>) -> Vec<async_nats::Subject> {
        let mut finished = Vec::new();
        for id in ids {
            let Some(key) = self.sends.remove(&id) else {
                continue;
            };
            let Some(held) = self.messages.get_mut(&key) else {
                continue;
            };
            held.unsettled.remove(&id);
            if held.unsettled.is_empty()
                && let Some(held) = self.messages.remove(&key)
            {
                finished.push(held.reply);
            }
        }
        finished
    }

    /// Give up the whole messages these sends came in: none of their sends is handed out or
    /// settled here any more. Where to answer for each.
    fn give_up(&mut self, ids: &[EventId]) -> Vec<async_nats::Subject> {
        let keys: std::collections::BTreeSet<u64> = ids
            .iter()
            .filter_map(|id| self.sends.get(id))
            .copied()
            .collect();
        let mut dropped = IdSet::default();
        let mut replies = Vec::new();
        for key in keys {
            if let Some(held) = self.messages.remove(&key) {
                for envelope in &held.sends {
                    self.sends.remove(&envelope.id);
                    dropped.insert(envelope.id);
                }
                replies.push(held.reply);
            }
        }
        self.ready.retain(|e| !dropped.contains(&e.id));
        self.retries
            .retain(|batch| !batch.iter().any(|e| dropped.contains(&e.id)));
        replies
    }

    /// Every leased message, to hand back at close.
    fn take_all(&mut self) -> Vec<Held> {
        self.sends.clear();
        self.ready.clear();
        self.retries.clear();
        self.messages.drain().map(|(_, held)| held).collect()
    }

    /// Where to answer for the messages these sends came in, each once.
    fn replies_of(&self, ids: &[EventId]) -> Vec<async_nats::Subject> {
        let keys: std::collections::BTreeSet<u64> = ids
            .iter()
            .filter_map(|id| self.sends.get(id))
            .copied()
            .collect();
        keys.iter()
            .filter_map(|key| self.messages.get(key))
            .map(|held| held.reply.clone())
            .collect()
    }

    fn all_replies(&self) -> Vec<async_nats::Subject> {
        self.messages.values().map(|h| h.reply.clone()).collect()
    }
}

/// Answer nats-server for one message, within `timeout`; whether it was sent.
async fn answer_one(
    context: &jetstream::Context,
    reply: async_nats::Subject,
    kind: AckKind,
    timeout: Duration,
) -> bool {
    let acker = Acker::new(context.clone(), Some(reply));
    matches!(
        tokio::time::timeout(timeout, acker.ack_with(kind)).await,
        Ok(Ok(()))
    )
}

/// Hand a leased message back: as it is when none of its sends was settled here, else its
/// unsettled sends as a new message, and the old one acknowledged.
async fn hand_back(shared: &Shared, held: Held) {
    let kind = if held.unsettled.len() == held.sends.len() {
        AckKind::Nak(None)
    } else {
        let unsettled: Vec<Envelope> = held
            .sends
            .into_iter()
            .filter(|e| held.unsettled.contains(&e.id))
            .collect();
        match shared
            .republish(&unsettled, wire::Handling::default())
            .await
        {
            Ok(()) => AckKind::Ack,
            // All of it comes back; what was settled is passed over then.
            Err(_) => AckKind::Nak(None),
        }
    };
    answer_one(&shared.context, held.reply, kind, shared.options.timeout).await;
}

/// Keep every message this server holds — sends in a batch still filling, waiting for a busy
/// target, in an attempt, not yet handed out — leased: a third of the lease time apart, tell
/// nats-server work is in progress (`+WPI`), so no other server takes what this one still
/// has. Ends with the consumer.
async fn renew(
    leases: std::sync::Weak<Mutex<Leases>>,
    lock: Option<Arc<InstanceLock>>,
    context: jetstream::Context,
    lease: Duration,
    timeout: Duration,
) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(leases) = leases.upgrade() else {
            return;
        };
        let replies = leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .all_replies();
        drop(leases);
        // An in-order instance's lock is kept while this server holds its sends.
        if let Some(lock) = &lock
            && !replies.is_empty()
        {
            lock.hold().await;
        }
        for reply in replies {
            answer_one(&context, reply, AckKind::Progress, timeout).await;
        }
    }
}

impl NatsConsumer {
    /// The durable consumer, created on first use (every server shares it).
    async fn consumer(&self) -> Result<PullConsumer, String> {
        let mut slot = self.consumer.lock().await;
        if let Some(consumer) = &*slot {
            return Ok(consumer.clone());
        }
        let options = &self.shared.options;
        let fail = |e: &dyn std::fmt::Display| {
            format!("cannot open the consumer `{}`: {e}", self.instance)
        };
        let config = pull::Config {
            durable_name: Some(self.instance.to_string()),
            filter_subject: format!("{}.send.{}.*", options.subject_prefix, self.instance),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait: options.lease,
            max_deliver: -1,
            max_ack_pending: options.max_leased,
            ..Default::default()
        };
        let stream = &self.shared.stream;
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(&self.instance, config.clone())
            .await
            .map_err(|e| fail(&e))?;
        // One made by an older version, on other subjects, would never see a send.
        if consumer.cached_info().config.filter_subject != config.filter_subject {
            consumer = stream.update_consumer(config).await.map_err(|e| fail(&e))?;
        }
        *slot = Some(consumer.clone());
        Ok(consumer)
    }

    /// Hand back everything this server holds of the instance. The pull under way is read to
    /// its end first: a message handed back while it is open would be sent to it again, and
    /// wait out a lease with nobody reading it.
    async fn hand_back_all(&self) {
        if let Some(mut batch) = self.fetching.lock().await.take() {
            let mut messages = Vec::new();
            // The pull expires within a second; the margin covers a slow server.
            let _ = tokio::time::timeout(self.shared.options.timeout, async {
                while let Some(Ok(message)) = batch.next().await {
                    messages.push(message);
                }
            })
            .await;
            self.take(messages).await;
        }
        let messages = self.leases().take_all();
        for message in messages {
            hand_back(&self.shared, message).await;
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answer for these messages.
    async fn answer(&self, replies: Vec<async_nats::Subject>, kind: AckKind) {
        let shared = &self.shared;
        for reply in replies {
            if !answer_one(&shared.context, reply, kind, shared.options.timeout).await {
                // Its lease runs out and it comes back: at least once.
                tracing::warn!(instance = %self.instance, "could not answer nats-server for leased sends");
            }
        }
    }

    /// Wait for some of this instance's sends; `None` once stopped.
    async fn next_leased(&self, max: usize) -> Option<Leased> {
        let mut stopped = self.shared.stopped.subscribe();
        loop {
            if *stopped.borrow() {
                return None;
            }
            // An in-order instance: only while this server holds it.
            if let Some(lock) = &self.lock
                && !lock.hold().await
            {
                tokio::select! {
                    _ = stopped.changed() => {}
                    () = tokio::time::sleep(self.shared.options.lease / 3) => {}
                }
                continue;
            }
            if let Some(leased) = self.leases().hand_out(max) {
                return Some(leased);
            }
            let consumer = match self.consumer().await {
                Ok(consumer) => consumer,
                Err(error) => {
                    tracing::warn!(%error, "leasing waits for nats-server");
                    tokio::select! {
                        _ = stopped.changed() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            // The pull under way is kept from one lease to the next: messages nats-server
            // sent to it are this server's until acknowledged, so none may be left unread.
            let mut fetching = self.fetching.lock().await;
            if fetching.is_none() {
                match consumer
                    .fetch()
                    .max_messages(max.max(1))
                    .max_bytes(self.shared.fetch_bytes)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                {
                    Ok(batch) => *fetching = Some(batch),
                    Err(error) => {
                        drop(fetching);
                        tracing::debug!(%error, "fetch failed");
                        tokio::select! {
                            _ = stopped.changed() => {}
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                        continue;
                    }
                }
            }
            let Some(batch) = fetching.as_mut() else {
                continue;
            };
            let first = tokio::select! {
                _ = stopped.changed() => return None,
                first = batch.next() => first,
            };
            let mut messages = Vec::new();
            match first {
                Some(Ok(message)) => messages.push(message),
                Some(Err(error)) => {
                    tracing::debug!(%error, "a pull ended with an error");
                    *fetching = None;
                }
                // This pull is done: the next lease starts another.
                None => *fetching = None,
            }
            // Then whatever has already arrived, without waiting for more.
            if let Some(batch) = fetching.as_mut() {
                loop {
                    match batch.next().now_or_never() {
                        Some(Some(Ok(message))) => messages.push(message),
                        Some(Some(Err(_)) | None) => {
                            *fetching = None;
                            break;
                        }
                        None => break,
                    }
                }
            }
            drop(fetching);
            self.take(messages).await;
        }
    }

    /// Leased messages' sends, held to hand out. A retry not yet due goes back until it is;
    /// of a message delivered before (a server died holding it) or a retry, the sends that
    /// already finished are passed over.
    async fn take(&self, messages: Vec<jetstream::Message>) {
        let now = std::time::SystemTime::now();
        let timeout = self.shared.options.timeout;
        for message in messages {
            let delivered = message.info().map_or(1, |info| info.delivered);
            let reply = message.reply.clone();
            let (message, acker) = message.split();
            let handling = wire::handling(message.headers.as_ref());
            if let Some(wait) = handling
                .not_before
                .and_then(|due| due.duration_since(now).ok())
                .filter(|wait| !wait.is_zero())
            {
                let _ =
                    tokio::time::timeout(timeout, acker.ack_with(AckKind::Nak(Some(wait)))).await;
                continue;
            }
            let (envelopes, reply) = match (wire::unbundle(&self.instance, &message.payload), reply)
            {
                (Ok(envelopes), Some(reply)) => (envelopes, reply),
                (outcome, _) => {
                    // Not sends this queue wrote: they would come back forever.
                    let why = outcome.err().unwrap_or_else(|| "no reply subject".into());
                    tracing::warn!(subject = %message.subject, %why, "dropping a message that holds no sends");
                    let _ = tokio::time::timeout(timeout, acker.ack_with(AckKind::Term)).await;
                    continue;
                }
            };
            let envelopes = if delivered > 1 || handling.retry {
                self.unfinished(envelopes).await
            } else {
                envelopes
            };
            if handling.replayed {
                self.shared
                    .statuses
                    .replayed(envelopes.iter().map(|e| e.id));
            }
            if envelopes.is_empty() {
                answer_one(&self.shared.context, reply, AckKind::Ack, timeout).await;
                continue;
            }
            self.leases().hold(reply, envelopes, handling.retry);
        }
    }

    /// The sends whose statuses are not final, each with the attempts its status counts if
    /// more (an attempt under way when a server died).
    async fn unfinished(&self, envelopes: Vec<Envelope>) -> Vec<Envelope> {
        let statuses = &self.shared.statuses;
        let looked = futures::future::join_all(envelopes.iter().map(|e| statuses.get(e.id))).await;
        envelopes
            .into_iter()
            .zip(looked)
            .filter_map(|(mut envelope, status)| match status {
                Ok(Some(status)) if status.state.is_final() => None,
                Ok(Some(status)) => {
                    envelope.attempts = envelope.attempts.max(status.attempts);
                    Some(envelope)
                }
                // Unknown or unreadable: delivered again rather than lost.
                _ => Some(envelope),
            })
            .collect()
    }
}

#[async_trait]
impl QueueConsumer for NatsConsumer {
    async fn lease(&self, max: usize) -> Option<Leased> {
        self.renewing.call_once(|| {
            let options = &self.shared.options;
            tokio::spawn(renew(
                Arc::downgrade(&self.leases),
                self.lock.clone(),
                self.shared.context.clone(),
                options.lease,
                options.timeout,
            ));
        });
        self.next_leased(max).await
    }

    async fn settle(&self, settlement: &Settlement) -> Result<(), QueueError> {
        let shared = &self.shared;
        if !settlement.follow_ups.is_empty() {
            shared.publish(&settlement.follow_ups).await?;
        }
        for dead in &settlement.dead {
            let reason = dead.error.as_deref().unwrap_or_default();
            shared.dead_letters.put(&dead.envelope, reason).await?;
        }
        // Statuses before the answers: a server that dies in between leaves a send to be
        // delivered again, not a status that never says how it ended.
        shared.statuses.settled(settlement).await?;
        let mut settled: Vec<EventId> = settlement.finished().map(|e| e.id).collect();
        if let Some(retry) = &settlement.retry {
            // The batch goes back as one message, due at its retry time.
            let sends: Vec<Envelope> = retry.sends.iter().map(|s| s.envelope.clone()).collect();
            let handling = wire::Handling {
                not_before: Some(retry.at),
                retry: true,
                replayed: false,
            };
            shared.republish(&sends, handling).await?;
            settled.extend(sends.iter().map(|e| e.id));
        }
        let finished = self.leases().settled(settled);
        self.answer(finished, AckKind::Ack).await;
        Ok(())
    }

    async fn release(&self, envelopes: Vec<Envelope>) {
        if envelopes.is_empty() {
            return;
        }
        let ids: Vec<EventId> = envelopes.iter().map(|e| e.id).collect();
        match self
            .shared
            .republish(&envelopes, wire::Handling::default())
            .await
        {
            Ok(()) => {
                let finished = self.leases().settled(ids);
                self.answer(finished, AckKind::Ack).await;
            }
            Err(error) => {
                // All of their messages come back; what was settled is passed over then.
                tracing::warn!(%error, "handing sends back whole");
                let replies = self.leases().give_up(&ids);
                self.answer(replies, AckKind::Nak(None)).await;
            }
        }
    }

    async fn extend(&self, ids: &[EventId]) -> Result<(), QueueError> {
        let replies = self.leases().replies_of(ids);
        let shared = &self.shared;
        for reply in replies {
            if !answer_one(
                &shared.context,
                reply,
                AckKind::Progress,
                shared.options.timeout,
            )
            .await
            {
                return Err(QueueError::Unavailable(
                    "extending a lease: nats-server did not take it".into(),
                ));
            }
        }
        Ok(())
    }
}
