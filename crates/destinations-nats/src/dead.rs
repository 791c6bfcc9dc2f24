//! Dead letters in a stream of their own, one subject per send (`PREFIX.dead.ID`), so every
//! server lists and replays the same letters.

use std::time::SystemTime;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use destinations_core::{
    DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterStore, Envelope, EventId, QueueError,
};

use crate::{unavailable, wire};

/// The dead-letter stream.
pub(crate) struct NatsDeadLetters {
    context: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
}

impl NatsDeadLetters {
    /// Open (or create) the stream, keeping up to `capacity` letters and `max_bytes` of them
    /// (the oldest go first).
    pub(crate) async fn open(
        context: &jetstream::Context,
        name: &str,
        subject_prefix: &str,
        capacity: usize,
        max_bytes: usize,
        replicas: usize,
    ) -> Result<Self, String> {
        let prefix = format!("{subject_prefix}.dead.");
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{prefix}>")],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_messages: i64::try_from(capacity.max(1)).unwrap_or(i64::MAX),
            max_bytes: i64::try_from(max_bytes.max(1)).unwrap_or(i64::MAX),
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        };
        let (stream, _) = crate::open_stream(context, config, "dead-letter stream").await?;
        Ok(Self {
            context: context.clone(),
            stream,
            prefix,
        })
    }

    /// Keep `envelope` as a dead letter, once the stream has it.
    pub(crate) async fn put(&self, envelope: &Envelope, reason: &str) -> Result<(), QueueError> {
        let headers = wire::dead_headers(envelope, reason, SystemTime::now());
        self.context
            .publish_with_headers(
                format!("{}{}", self.prefix, envelope.id),
                headers,
                envelope.payload.clone(),
            )
            .await
            .map_err(|e| unavailable("keeping a dead letter", e))?
            .await
            .map_err(|e| unavailable("keeping a dead letter", e))?;
        Ok(())
    }

    /// The letter of `id` and its place in the stream, if there is one.
    async fn find(&self, id: EventId) -> Result<Option<(u64, DeadLetter)>, QueueError> {
        match self
            .stream
            .direct_get_last_for_subject(format!("{}{id}", self.prefix))
            .await
        {
            Ok(message) => Ok(wire::dead_letter(&message.headers, message.payload)
                .ok()
                .map(|letter| (message.sequence, letter))),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable("reading a dead letter", e)),
        }
    }

    /// The letter of `id` as an envelope, and its place in the stream (for [`remove`]).
    ///
    /// [`remove`]: Self::remove
    pub(crate) async fn get(&self, id: EventId) -> Result<Option<(u64, Envelope)>, QueueError> {
        Ok(self
            .find(id)
            .await?
            .map(|(sequence, letter)| (sequence, letter.envelope)))
    }

    /// Remove the letter at `sequence` (queued again).
    pub(crate) async fn remove(&self, sequence: u64) -> Result<(), QueueError> {
        self.stream
            .delete_message(sequence)
            .await
            .map_err(|e| unavailable("removing a replayed dead letter", e))?;
        Ok(())
    }
}

#[async_trait]
impl DeadLetterStore for NatsDeadLetters {
    async fn list(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterPage, QueueError> {
        let ids = filter.id_set();
        // By id: one lookup each, newest first.
        if let Some(wanted) = &filter.ids {
            let mut found = Vec::new();
            for id in wanted {
                if let Some((sequence, letter)) = self.find(*id).await?
                    && filter.matches(&letter, ids.as_ref())
                {
                    found.push((sequence, letter));
                }
            }
            found.sort_by_key(|(sequence, _)| std::cmp::Reverse(*sequence));
            let before = DeadLetterPage::before(after)?;
            return Ok(DeadLetterPage::of(
                found.into_iter().filter(|(sequence, _)| *sequence < before),
                limit,
            ));
        }
        let before = DeadLetterPage::before(after)?;
        let state = self
            .stream
            .get_info()
            .await
            .map_err(|e| unavailable("listing dead letters", e))?
            .state;
        let mut found = Vec::new();
        let mut sequence = state.last_sequence.min(before.saturating_sub(1));
        while sequence >= state.first_sequence.max(1) && found.len() <= limit {
            match self.stream.direct_get(sequence).await {
                Ok(message) => {
                    if let Ok(letter) = wire::dead_letter(&message.headers, message.payload)
                        && filter.matches(&letter, None)
                    {
                        found.push((sequence, letter));
                    }
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(unavailable("listing dead letters", e)),
            }
            sequence -= 1;
        }
        Ok(DeadLetterPage::of(found, limit))
    }

    /// Letters the stream dropped for its limits, near enough: every letter it ever took, less
    /// those it holds and those replayed from its middle (the stream counts those as deleted;
    /// a replay of its oldest letter, or a send that died twice, counts here too).
    async fn evicted(&self) -> Result<u64, QueueError> {
        let state = self
            .stream
            .get_info()
            .await
            .map_err(|e| unavailable("counting dead letters", e))?
            .state;
        Ok(state
            .last_sequence
            .saturating_sub(state.messages)
            .saturating_sub(state.deleted_count.unwrap_or(0)))
    }
}
