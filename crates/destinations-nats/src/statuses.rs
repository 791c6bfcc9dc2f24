//! Statuses in a JetStream key-value bucket, one key per send, so every server answers the same.
//!
//! A send's status is written when it is queued and when an attempt settles (retrying,
//! delivered, dead); the bucket forgets it after the hub's status retention. `in_flight` is
//! not written: it would cost a write per attempt, and a late one could land after the
//! attempt's outcome. Each server watches the bucket, so a `?wait=` on one server wakes when
//! another finishes the send.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use destinations_core::attempts::log_attempt;
use destinations_core::{
    Attempt, Envelope, EventFilter, EventId, EventPage, FinalWaiters, QueueError, ResponseSummary,
    SendStatus, Settlement, State, StatusStore,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::wire::{from_ms, to_ms};

/// One send's status as the bucket holds it.
#[derive(Serialize, Deserialize)]
struct Record {
    #[serde(rename = "d")]
    destination: String,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    run: Option<String>,
    #[serde(rename = "s")]
    state: StoredState,
    #[serde(rename = "a")]
    attempts: u32,
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    response: Option<ResponseSummary>,
    #[serde(rename = "c")]
    created_ms: u64,
    #[serde(rename = "u")]
    updated_ms: u64,
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    next_attempt_ms: Option<u64>,
    /// The attempts that failed, oldest first.
    #[serde(rename = "l", default, skip_serializing_if = "Vec::is_empty")]
    failed_attempts: Vec<Attempt>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredState {
    Queued,
    Retrying,
    Delivered,
    Dead,
}

impl From<StoredState> for State {
    fn from(state: StoredState) -> Self {
        match state {
            StoredState::Queued => State::Queued,
            StoredState::Retrying => State::Retrying,
            StoredState::Delivered => State::Delivered,
            StoredState::Dead => State::Dead,
        }
    }
}

impl Record {
    fn of(envelope: &Envelope, state: StoredState, now: u64) -> Self {
        Self {
            destination: envelope.destination.to_string(),
            run: envelope.run.as_deref().map(str::to_owned),
            state,
            attempts: envelope.attempts,
            last_error: None,
            response: None,
            created_ms: to_ms(envelope.created_at),
            updated_ms: now,
            next_attempt_ms: None,
            failed_attempts: Vec::new(),
        }
    }

    /// The status, with the attempt log.
    fn status(self, id: EventId) -> SendStatus {
        let failed = self.failed_attempts.clone();
        self.summary(id).with_attempts(failed)
    }

    /// The status, without the attempt log (for a listing).
    fn summary(self, id: EventId) -> SendStatus {
        SendStatus {
            id,
            destination: Arc::from(self.destination),
            run: self.run.map(Arc::from),
            state: self.state.into(),
            attempts: self.attempts,
            last_error: self.last_error,
            response: self.response,
            created_at: from_ms(self.created_ms),
            updated_at: from_ms(self.updated_ms),
            next_attempt_at: self.next_attempt_ms.map(from_ms),
            attempts_log: None,
        }
    }
}

/// Wake this server's `?wait=` waiters when any server finishes their sends: the bucket is
/// watched only while someone here waits (every status change of every server would be
/// read otherwise), and a few seconds after.
async fn watch_while_waited(store: kv::Store, waiters: Arc<FinalWaiters>) {
    const LINGER: Duration = Duration::from_secs(5);
    loop {
        let registered = waiters.registered();
        if waiters.is_empty() {
            registered.await;
            continue;
        }
        let mut watch = match store.watch_all().await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::warn!(%error, "statuses are not watched; waiters wake at their timeout");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // A finish between a waiter's look and this watch's start is not heard: each looks
        // again now.
        waiters.wake_all();
        let mut idle_since = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(1), watch.next()).await {
                Ok(Some(Ok(entry))) => {
                    let final_state = serde_json::from_slice::<Record>(&entry.value)
                        .is_ok_and(|r| State::from(r.state).is_final());
                    if final_state && let Ok(id) = entry.key.parse::<EventId>() {
                        waiters.finished([&id]);
                    }
                }
                Ok(Some(Err(_))) | Err(_) => {}
                Ok(None) => break,
            }
            if waiters.is_empty() {
                let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= LINGER {
                    break;
                }
            } else {
                idle_since = None;
            }
        }
    }
}

/// `queued` statuses for these sends, as of now.
fn queued_records(envelopes: &[Envelope]) -> Vec<(EventId, Record)> {
    let now = to_ms(SystemTime::now());
    envelopes
        .iter()
        .map(|e| (e.id, Record::of(e, StoredState::Queued, now)))
        .collect()
}

/// The statuses of every server's sends.
pub(crate) struct NatsStatuses {
    context: jetstream::Context,
    store: kv::Store,
    subject_prefix: String,
    waiters: Arc<FinalWaiters>,
    watcher: tokio::task::JoinHandle<()>,
    /// Replayed sends this server holds and has not settled: their statuses hold attempts
    /// from before the replay, read before their first settlement.
    replayed: std::sync::Mutex<std::collections::HashSet<EventId>>,
}

impl Drop for NatsStatuses {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl NatsStatuses {
    /// Open (or create) the bucket, keeping statuses for `retention`, and start watching it.
    pub(crate) async fn open(
        context: &jetstream::Context,
        bucket: &str,
        retention: Duration,
        replicas: usize,
    ) -> Result<Self, String> {
        let store = context
            .create_or_update_key_value(kv::Config {
                bucket: bucket.to_owned(),
                history: 1,
                max_age: retention,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot open the status bucket `{bucket}`: {e}"))?;
        let waiters = Arc::new(FinalWaiters::default());
        let watcher = tokio::spawn(watch_while_waited(store.clone(), waiters.clone()));
        Ok(Self {
            context: context.clone(),
            store,
            subject_prefix: format!("$KV.{bucket}."),
            waiters,
            watcher,
            replayed: std::sync::Mutex::default(),
        })
    }

    /// Write these statuses, every write under way at once, and wait for all of them. With
    /// `only_new`, a send that already has a status keeps it.
    async fn write(
        &self,
        records: Vec<(EventId, Record)>,
        only_new: bool,
    ) -> Result<(), QueueError> {
        let fail =
            |e: &dyn std::fmt::Display| QueueError::Unavailable(format!("writing a status: {e}"));
        let mut acks = Vec::with_capacity(records.len());
        for (id, record) in records {
            let body = serde_json::to_vec(&record).map_err(|e| fail(&e))?;
            let mut message =
                jetstream::message::PublishMessage::build().payload(Bytes::from(body));
            if only_new {
                message = message.header(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            }
            let ack = self
                .context
                .send_publish(format!("{}{id}", self.subject_prefix), message)
                .await
                .map_err(|e| fail(&e))?;
            acks.push(ack);
        }
        for ack in acks {
            match ack.await {
                Ok(_) => {}
                Err(e) if only_new && e.kind() == PublishErrorKind::WrongLastSequence => {}
                Err(e) => return Err(fail(&e)),
            }
        }
        Ok(())
    }

    /// These sends are queued: written once they are in the stream, so a send that settles
    /// first keeps the status its attempt gave it.
    pub(crate) async fn queued(&self, envelopes: &[Envelope]) -> Result<(), QueueError> {
        self.write(queued_records(envelopes), true).await
    }

    /// These dead letters are queued again: written before they are, replacing `dead`.
    /// They keep the log of their earlier attempts.
    pub(crate) async fn requeued(&self, envelopes: &[Envelope]) -> Result<(), QueueError> {
        let mut records = queued_records(envelopes);
        let earlier =
            futures::future::join_all(records.iter().map(|(id, _)| self.earlier(*id))).await;
        for ((_, record), earlier) in records.iter_mut().zip(earlier) {
            if let Some(earlier) = earlier {
                record.failed_attempts = earlier.failed_attempts;
            }
        }
        self.write(records, false).await
    }

    /// These sends, leased here, are dead letters queued again.
    pub(crate) fn replayed(&self, ids: impl Iterator<Item = EventId>) {
        self.replayed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(ids);
    }

    /// A send's status as the bucket holds it now, if any. One that cannot be read is said in
    /// the log: the send's earlier attempts and error are then missing from its status.
    async fn earlier(&self, id: EventId) -> Option<Record> {
        match self.store.get(id.to_string()).await {
            Ok(value) => serde_json::from_slice::<Record>(&value?).ok(),
            Err(error) => {
                tracing::warn!(%id, %error, "a send's earlier status could not be read; its attempt log starts again");
                None
            }
        }
    }

    /// Record what a settlement decided. A send's earlier status is read first only when
    /// something of it stays: the error and attempts of earlier failures (a send attempted
    /// before, or replayed).
    pub(crate) async fn settled(&self, settlement: &Settlement) -> Result<(), QueueError> {
        let now = to_ms(SystemTime::now());
        let mut failed: std::collections::HashMap<EventId, Attempt> =
            settlement.failed_attempts().into_iter().collect();
        let mut records = Vec::new();
        {
            let mut replayed = self
                .replayed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut record = |s: &destinations_core::Settled, state, attempted: bool| {
                let mut record = Record::of(&s.envelope, state, now);
                record.response = s.response.as_deref().cloned();
                record.last_error = s.error.clone();
                // Attempted before this attempt (or held back after one), or replayed.
                let earlier_attempts = if attempted { 1 } else { 0 };
                // Taken out of the set whatever else says the status is needed.
                let replayed_now = replayed.remove(&s.envelope.id);
                let has_earlier = s.envelope.attempts > earlier_attempts || replayed_now;
                records.push((s.envelope.id, record, has_earlier));
            };
            for s in &settlement.delivered {
                record(s, StoredState::Delivered, true);
            }
            for s in &settlement.dead {
                record(s, StoredState::Dead, true);
            }
            if let Some(retry) = &settlement.retry {
                for s in &retry.sends {
                    record(s, StoredState::Retrying, s.error.is_some());
                }
            }
        }
        let earlier = futures::future::join_all(records.iter().map(|(id, _, has_earlier)| {
            let read = has_earlier.then(|| self.earlier(*id));
            async move {
                match read {
                    Some(read) => read.await,
                    None => None,
                }
            }
        }))
        .await;
        let retry_at = settlement.retry.as_ref().map(|r| to_ms(r.at));
        let records = records
            .into_iter()
            .zip(earlier)
            .map(|((id, mut record, _), earlier)| {
                if let Some(earlier) = earlier {
                    // Delivered after failures, or held back: it keeps its last error.
                    if record.last_error.is_none() {
                        record.last_error = earlier.last_error;
                    }
                    record.failed_attempts = earlier.failed_attempts;
                }
                if let Some(attempt) = failed.remove(&id) {
                    log_attempt(&mut record.failed_attempts, attempt);
                }
                if matches!(record.state, StoredState::Retrying) {
                    record.next_attempt_ms = retry_at;
                }
                (id, record)
            })
            .collect();
        self.write(records, false).await?;
        // This server's waiters now; the others' through their watch.
        self.waiters.finished(settlement.finished().map(|e| &e.id));
        Ok(())
    }

    /// Sends of the status stream from sequence `from` to `to` (to its end when `None`), each
    /// with when the server stored it (ms): read in one pass of an ordered consumer.
    async fn read_range(
        &self,
        from: u64,
        to: Option<u64>,
    ) -> Result<Vec<(EventId, Record, u64)>, QueueError> {
        let fail =
            |e: &dyn std::fmt::Display| QueueError::Unavailable(format!("listing statuses: {e}"));
        let consumer = self
            .store
            .stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("{}>", self.subject_prefix),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| fail(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| fail(&e))?;
        let mut read = Vec::new();
        loop {
            // Each message says how many follow; a stream that stops answering is an error,
            // not the end of the page.
            let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .map_err(|_| fail(&"nats-server did not answer within 5 s"))?;
            let Some(message) = next else { break };
            let message = message.map_err(|e| fail(&e))?;
            let info = message.info().map_err(|e| fail(&e))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            let stored_ms =
                u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            if to.is_some_and(|to| sequence > to) {
                break;
            }
            let key = message.subject.strip_prefix(self.subject_prefix.as_str());
            if let Some(id) = key.and_then(|key| key.parse::<EventId>().ok())
                && let Ok(record) = serde_json::from_slice::<Record>(&message.payload)
            {
                read.push((id, record, stored_ms));
            }
            if pending == 0 || to == Some(sequence) {
                break;
            }
        }
        Ok(read)
    }
}

#[async_trait]
impl StatusStore for NatsStatuses {
    async fn get(&self, id: EventId) -> Result<Option<SendStatus>, QueueError> {
        let value = self
            .store
            .get(id.to_string())
            .await
            .map_err(|e| QueueError::Unavailable(format!("reading a status: {e}")))?;
        Ok(value
            .and_then(|v| serde_json::from_slice::<Record>(&v).ok())
            .map(|record| record.status(id)))
    }

    /// Statuses are read from the bucket's stream newest write first, in windows that grow,
    /// until no older write can be of a send newer than those found (a send's last write is
    /// never older than the send).
    async fn list(
        &self,
        filter: &EventFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EventPage, QueueError> {
        /// How far the servers' clocks may disagree.
        const SKEW: Duration = Duration::from_secs(5);
        let before = EventPage::before(after)?;
        let keep = limit.saturating_add(1);
        let state = self
            .store
            .stream
            .get_info()
            .await
            .map_err(|e| QueueError::Unavailable(format!("listing statuses: {e}")))?
            .state;
        let first = state.first_sequence.max(1);
        let mut to = state.last_sequence;
        let mut window = (4 * keep as u64).max(256);
        let mut found: std::collections::BTreeMap<EventId, SendStatus> = Default::default();
        // The newest window is read to the stream's end, whatever was written meanwhile: a
        // status rewritten during the listing moves past `last_sequence`, and is found there.
        let mut newest = true;
        while to >= first && state.messages > 0 {
            let from = to.saturating_sub(window - 1).max(first);
            let read = self.read_range(from, (!newest).then_some(to)).await?;
            newest = false;
            let oldest_write = read.first().map(|(_, _, ms)| from_ms(*ms));
            // Newest write first: a send written twice counts as its newest write.
            for (id, record, _) in read.into_iter().rev() {
                if before.is_some_and(|before| id >= before) || found.contains_key(&id) {
                    continue;
                }
                let status = record.summary(id);
                if filter.matches(&status) {
                    found.insert(id, status);
                    if found.len() > keep {
                        found.pop_first();
                    }
                }
            }
            let enough = found.len() >= keep
                && found.first_key_value().zip(oldest_write).is_some_and(
                    |((oldest_found, _), written)| written + SKEW < oldest_found.time(),
                );
            if enough || from == first {
                break;
            }
            to = from - 1;
            window = (window * 2).min(65_536);
        }
        let mut events: Vec<SendStatus> = found.into_values().rev().collect();
        let next = EventPage::cut(&mut events, limit, |status| status.id);
        Ok(EventPage { events, next })
    }

    fn attempting(&self, _envelopes: &[Envelope]) {}

    fn waiters(&self) -> &FinalWaiters {
        &self.waiters
    }
}
