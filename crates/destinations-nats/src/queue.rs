//! The queue: a work-queue stream with a subject per destination instance, one durable pull
//! consumer per instance shared by every server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::response::Response;
use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, header};
use async_trait::async_trait;
use destinations_core::{
    DeadLetterStore, Durability, Envelope, EventId, Fanout, HubConfig, Leased, Queue,
    QueueConsumer, QueueDepth, QueueError, Refused, Settlement, StatusStore,
};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::dead::NatsDeadLetters;
use crate::fanout::NatsFanout;
use crate::lock::{self, InstanceLock};
use crate::options::NatsOptions;
use crate::statuses::NatsStatuses;
use crate::wire;

/// The most sends one atomic publish holds (nats-server's limit).
const MAX_ATOMIC: usize = 1000;

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
    /// Every consumer's leases, to hand back what is still held at close.
    held: Mutex<Vec<std::sync::Weak<Mutex<Leases>>>>,
    /// The locks of in-order instances.
    locks: kv::Store,
    /// Every in-order consumer's lock, to release at close.
    held_locks: Mutex<Vec<Arc<InstanceLock>>>,
    /// This server, as a lock holder.
    node: String,
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
                held: Mutex::new(Vec::new()),
                locks,
                held_locks: Mutex::new(Vec::new()),
                node: EventId::new().to_string(),
            }),
        })
    }
}

/// What the stream holds per instance.
async fn backlog(
    stream: &stream::Stream,
    prefix: &str,
) -> Result<Vec<(String, QueueDepth)>, String> {
    let info = stream
        .get_info()
        .await
        .map_err(|e| format!("cannot read the backlog: {e}"))?;
    let average = usize::try_from(info.state.bytes / info.state.messages.max(1)).unwrap_or(0);
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}.send.>"))
        .await
        .map_err(|e| format!("cannot read the backlog: {e}"))?;
    let mut depths = Vec::new();
    let send_prefix = format!("{prefix}.send.");
    while let Some(entry) = subjects.next().await {
        let (subject, count) = entry.map_err(|e| format!("cannot read the backlog: {e}"))?;
        if let Some(instance) = subject.strip_prefix(&send_prefix) {
            depths.push((
                instance.to_owned(),
                QueueDepth {
                    events: count,
                    bytes: count * average,
                },
            ));
        }
    }
    Ok(depths)
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
        QueueError::Unavailable(format!("nats-server did not store {what}: {text}"))
    }

    fn subject(&self, instance: &str) -> String {
        format!("{}.send.{instance}", self.options.subject_prefix)
    }

    /// Store these envelopes in the stream, all or none (runs of more than 1 000 in parts of
    /// 1 000, each all or none), then their statuses.
    async fn publish(&self, envelopes: &[Envelope]) -> Result<(), QueueError> {
        if let Some(down) = self.unavailable_now() {
            return Err(down);
        }
        for part in envelopes.chunks(MAX_ATOMIC) {
            match part {
                [one] => self.publish_one(one, &one.id.to_string()).await?,
                _ => self.publish_atomic(part).await?,
            }
        }
        if let Err(error) = self.statuses.queued(envelopes).await {
            // The sends are stored; only their `queued` status is missing until they settle.
            tracing::warn!(%error, count = envelopes.len(), "queued statuses not written");
        }
        Ok(())
    }

    async fn publish_one(&self, envelope: &Envelope, message_id: &str) -> Result<(), QueueError> {
        let fail = |e: &dyn std::fmt::Display| self.refusal("the send", e);
        self.context
            .publish_with_headers(
                self.subject(&envelope.destination),
                wire::send_headers(envelope, message_id),
                envelope.payload.clone(),
            )
            .await
            .map_err(|e| fail(&e))?
            .await
            .map_err(|e| fail(&e))?;
        Ok(())
    }

    /// One atomic batch (JetStream 2.12's `Nats-Batch-*` headers): the first message and the
    /// commit are requests, the rest plain publishes on the same connection, in order.
    async fn publish_atomic(&self, part: &[Envelope]) -> Result<(), QueueError> {
        let batch = EventId::new().to_string();
        let fail = |e: &dyn std::fmt::Display| self.refusal("the run", e);
        let last = part.len();
        for (index, envelope) in part.iter().enumerate() {
            let mut headers: HeaderMap = wire::send_headers(envelope, &envelope.id.to_string());
            headers.insert(header::NATS_BATCH_ID, batch.as_str());
            headers.insert(
                header::NATS_BATCH_SEQUENCE,
                (index + 1).to_string().as_str(),
            );
            let commit = index + 1 == last;
            if commit {
                headers.insert(header::NATS_BATCH_COMMIT, header::NATS_BATCH_COMMIT_FINAL);
            }
            let subject = self.subject(&envelope.destination);
            if index == 0 || commit {
                let request = async_nats::Request::new()
                    .headers(headers)
                    .payload(envelope.payload.clone())
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
                    .publish_with_headers(subject, headers, envelope.payload.clone())
                    .await
                    .map_err(|e| fail(&e))?;
            }
        }
        Ok(())
    }
}

impl NatsQueue {
    fn nats_consumer(
        &self,
        instance: &str,
        lock: Option<Arc<InstanceLock>>,
    ) -> Arc<dyn QueueConsumer> {
        let leases = Arc::new(Mutex::new(HashMap::new()));
        self.shared
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&leases));
        Arc::new(NatsConsumer {
            shared: self.shared.clone(),
            instance: instance.to_owned(),
            consumer: tokio::sync::Mutex::new(None),
            leases,
            fetching: tokio::sync::Mutex::new(None),
            renewing: std::sync::Once::new(),
            lock,
        })
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
            // A fresh message id: the first one may still be in the duplicate window.
            let message_id = format!("{}.replay.{}", envelope.id, EventId::new());
            shared.publish_one(&envelope, &message_id).await?;
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
    /// deadline), so another server takes it now rather than when its lease runs out.
    async fn close(&self) {
        let shared = &self.shared;
        let held: Vec<async_nats::Subject> = shared
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .flat_map(|leases| {
                std::mem::take(&mut *leases.lock().unwrap_or_else(PoisonError::into_inner))
                    .into_values()
                    .collect::<Vec<_>>()
            })
            .collect();
        for reply in held {
            let acker = Acker::new(shared.context.clone(), Some(reply));
            let _ =
                tokio::time::timeout(shared.options.timeout, acker.ack_with(AckKind::Nak(None)))
                    .await;
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
    instance: String,
    consumer: tokio::sync::Mutex<Option<PullConsumer>>,
    /// Where to answer for each leased send (its message's reply subject), from the lease to
    /// the settlement.
    leases: Arc<Mutex<Leases>>,
    /// The pull under way, read across leases until it ends.
    fetching: tokio::sync::Mutex<Option<pull::Batch>>,
    /// The task that keeps the leases (started with the first lease).
    renewing: std::sync::Once,
    /// For an instance whose sends go out in order: held while this server leases them.
    lock: Option<Arc<InstanceLock>>,
}

type Leases = HashMap<EventId, async_nats::Subject>;

/// Keep every send this server holds — in a batch still filling, waiting for a busy target, in
/// an attempt — leased: a third of the lease time apart, tell nats-server work is in progress
/// (`+WPI`), so no other server takes a send this one still has. Ends with the consumer.
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
        let replies: Vec<async_nats::Subject> = leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        drop(leases);
        // An in-order instance's lock is kept while this server holds its sends.
        if let Some(lock) = &lock
            && !replies.is_empty()
        {
            lock.hold().await;
        }
        for reply in replies {
            let acker = Acker::new(context.clone(), Some(reply));
            let _ = tokio::time::timeout(timeout, acker.ack_with(AckKind::Progress)).await;
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
        let consumer: PullConsumer = self
            .shared
            .stream
            .get_or_create_consumer(
                &self.instance,
                pull::Config {
                    durable_name: Some(self.instance.clone()),
                    filter_subject: self.shared.subject(&self.instance),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: options.lease,
                    max_deliver: -1,
                    max_ack_pending: options.max_leased,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("cannot open the consumer `{}`: {e}", self.instance))?;
        *slot = Some(consumer.clone());
        Ok(consumer)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn acker(&self, reply: async_nats::Subject) -> Acker {
        Acker::new(self.shared.context.clone(), Some(reply))
    }

    /// Answer for these sends, each within the queue's timeout.
    async fn answer(&self, ids: impl Iterator<Item = EventId>, kind: AckKind) {
        let replies: Vec<(EventId, async_nats::Subject)> = {
            let mut leases = self.leases();
            ids.filter_map(|id| leases.remove(&id).map(|reply| (id, reply)))
                .collect()
        };
        for (id, reply) in replies {
            let acker = self.acker(reply);
            let answered =
                tokio::time::timeout(self.shared.options.timeout, acker.ack_with(kind)).await;
            if !matches!(answered, Ok(Ok(()))) {
                // Its lease runs out and another attempt comes: at least once.
                tracing::warn!(%id, instance = %self.instance, "could not answer nats-server for a send");
            }
        }
    }

    /// Wait for some of this instance's sends; `None` once stopped.
    async fn next_leased(&self, max: usize) -> Option<Vec<Envelope>> {
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
            let envelopes = self.take(messages).await;
            if !envelopes.is_empty() {
                return Some(envelopes);
            }
        }
    }

    /// Leased messages as envelopes, keeping how to answer for each.
    async fn take(&self, messages: Vec<jetstream::Message>) -> Vec<Envelope> {
        let mut envelopes = Vec::with_capacity(messages.len());
        let mut foreign = Vec::new();
        {
            let mut leases = self.leases();
            for message in messages {
                let delivered = message.info().map_or(1, |info| info.delivered);
                let attempts = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
                let reply = message.reply.clone();
                let (message, acker) = message.split();
                let headers = message.headers.unwrap_or_default();
                match (wire::envelope(&headers, message.payload, attempts), reply) {
                    (Ok(envelope), Some(reply)) => {
                        leases.insert(envelope.id, reply);
                        envelopes.push(envelope);
                    }
                    (Ok(_), None) => {
                        foreign.push((message.subject, "no reply subject".into(), acker));
                    }
                    (Err(why), _) => foreign.push((message.subject, why, acker)),
                }
            }
        }
        for (subject, why, acker) in foreign {
            // Not a send this queue wrote: it would come back forever.
            tracing::warn!(%subject, %why, "dropping a message that is not a send");
            let _ =
                tokio::time::timeout(self.shared.options.timeout, acker.ack_with(AckKind::Term))
                    .await;
        }
        envelopes
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
        self.next_leased(max).await.map(Leased::Ready)
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
        self.answer(settlement.finished().map(|e| e.id), AckKind::Ack)
            .await;
        if let Some(retry) = &settlement.retry {
            self.answer(
                retry.sends.iter().map(|s| s.envelope.id),
                AckKind::Nak(Some(retry.wait)),
            )
            .await;
        }
        Ok(())
    }

    async fn release(&self, envelopes: Vec<Envelope>) {
        self.answer(envelopes.iter().map(|e| e.id), AckKind::Nak(None))
            .await;
    }

    async fn extend(&self, ids: &[EventId]) -> Result<(), QueueError> {
        let replies: Vec<async_nats::Subject> = {
            let leases = self.leases();
            ids.iter()
                .filter_map(|id| leases.get(id).cloned())
                .collect()
        };
        for reply in replies {
            let acker = self.acker(reply);
            tokio::time::timeout(
                self.shared.options.timeout,
                acker.ack_with(AckKind::Progress),
            )
            .await
            .map_err(|_| QueueError::Unavailable("extending a lease timed out".into()))?
            .map_err(|e| QueueError::Unavailable(format!("extending a lease: {e}")))?;
        }
        Ok(())
    }
}
