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
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use destinations_core::{
    Envelope, EventId, FinalWaiters, QueueError, ResponseSummary, SendStatus, Settlement, State,
    StatusStore,
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
        }
    }

    fn status(self, id: EventId) -> SendStatus {
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
    pub(crate) async fn requeued(&self, envelopes: &[Envelope]) -> Result<(), QueueError> {
        self.write(queued_records(envelopes), false).await
    }

    /// The error a send's status holds now, if any.
    async fn last_error(&self, id: EventId) -> Option<String> {
        let value = self.store.get(id.to_string()).await.ok()??;
        serde_json::from_slice::<Record>(&value).ok()?.last_error
    }

    /// Record what a settlement decided.
    pub(crate) async fn settled(&self, settlement: &Settlement) -> Result<(), QueueError> {
        let now = to_ms(SystemTime::now());
        let mut records = Vec::new();
        for s in &settlement.delivered {
            let mut record = Record::of(&s.envelope, StoredState::Delivered, now);
            record.response = s.response.as_deref().cloned();
            record.last_error = match &s.error {
                // Delivered after failures: it keeps the error of its last failed attempt.
                None if s.envelope.attempts > 1 => self.last_error(s.envelope.id).await,
                error => error.clone(),
            };
            records.push((s.envelope.id, record));
        }
        if let Some(retry) = &settlement.retry {
            for s in &retry.sends {
                let mut record = Record::of(&s.envelope, StoredState::Retrying, now);
                record.response = s.response.as_deref().cloned();
                record.last_error = match &s.error {
                    // Held back, not attempted: it keeps the error of its last attempt.
                    None if s.envelope.attempts > 0 => self.last_error(s.envelope.id).await,
                    error => error.clone(),
                };
                record.next_attempt_ms = Some(to_ms(retry.at));
                records.push((s.envelope.id, record));
            }
        }
        for s in &settlement.dead {
            let mut record = Record::of(&s.envelope, StoredState::Dead, now);
            record.response = s.response.as_deref().cloned();
            record.last_error = s.error.clone();
            records.push((s.envelope.id, record));
        }
        self.write(records, false).await?;
        // This server's waiters now; the others' through their watch.
        self.waiters.finished(settlement.finished().map(|e| &e.id));
        Ok(())
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

    fn attempting(&self, _envelopes: &[Envelope]) {}

    fn waiters(&self) -> &FinalWaiters {
        &self.waiters
    }
}
