//! What one server publishes for every server to hear (SSE events), in a limits stream that
//! keeps the newest few of each topic for servers that start later.

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use bytes::Bytes;
use destinations_core::{Fanout, FanoutMessage, QueueError};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::unavailable;

/// The fan-out stream.
pub(crate) struct NatsFanout {
    context: jetstream::Context,
    stream: stream::Stream,
    /// `PREFIX.fanout.`
    prefix: String,
}

impl NatsFanout {
    /// Open (or create) the stream, keeping the newest `keep` messages of each topic.
    pub(crate) async fn open(
        context: &jetstream::Context,
        name: &str,
        subject_prefix: &str,
        keep: i64,
        replicas: usize,
    ) -> Result<Self, String> {
        let prefix = format!("{subject_prefix}.fanout.");
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{prefix}>")],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_messages_per_subject: keep,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        let (stream, _) = crate::open_stream(context, config, "fan-out stream").await?;
        Ok(Self {
            context: context.clone(),
            stream,
            prefix,
        })
    }
}

#[async_trait]
impl Fanout for NatsFanout {
    async fn publish(&self, topic: &str, message: Bytes) -> Result<(), QueueError> {
        self.context
            .publish(format!("{}{topic}", self.prefix), message)
            .await
            .map_err(|e| unavailable("publishing to every server", e))?
            .await
            .map_err(|e| unavailable("publishing to every server", e))?;
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        after: Option<u64>,
    ) -> Result<BoxStream<'static, FanoutMessage>, QueueError> {
        let consumer = self
            .stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("{}{topic}.>", self.prefix),
                deliver_policy: match after {
                    Some(sequence) => DeliverPolicy::ByStartSequence {
                        start_sequence: sequence + 1,
                    },
                    None => DeliverPolicy::All,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("listening to every server", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("listening to every server", e))?;
        let prefix = self.prefix.clone();
        Ok(messages
            .take_while(|message| std::future::ready(message.is_ok()))
            .filter_map(move |message| {
                let heard = message.ok().and_then(|message| {
                    let sequence = message.info().ok()?.stream_sequence;
                    let topic = message.subject.strip_prefix(prefix.as_str())?.to_owned();
                    Some(FanoutMessage {
                        topic,
                        sequence,
                        message: message.payload.clone(),
                    })
                });
                std::future::ready(heard)
            })
            .boxed())
    }
}
