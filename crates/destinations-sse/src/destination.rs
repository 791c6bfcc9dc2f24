//! The SSE destination: each send is published to its stream's subscribers.

use std::sync::Arc;

use async_trait::async_trait;
use destinations_core::{BatchOutcome, Fanout, Parsed, Report, ResponseSummary, TypedDestination};

use crate::http::{Served, router};
use crate::options::SseOptions;
use crate::send::{Route, SseSend};
use crate::streams::{Event, Streams};

/// The stream of a send that names none, outside a run.
pub const DEFAULT_STREAM: &str = "default";

/// Publishes each send to the subscribers of its stream.
pub struct SseDestination {
    served: Arc<Served>,
    /// This instance's topic among the hubs of a shared queue (`sse.INSTANCE`).
    topic: String,
    /// The hubs' fan-out, when the queue is shared: events are published there and every
    /// server's streams (this one's too) take them from it, all in the same order.
    fanout: std::sync::OnceLock<Arc<dyn Fanout>>,
    /// The task that hears the other servers' events.
    hearing: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for SseDestination {
    fn drop(&mut self) {
        if let Some(task) = self
            .hearing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// A stream name as one topic token: letters, digits, `_` and `-` as they are, every other
/// byte as `~XX` (hex). Stream names take `.`, `:`, `@`, `~` and any letter.
fn topic_token(stream: &str) -> String {
    let mut token = String::with_capacity(stream.len());
    for byte in stream.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("~{byte:02x}"));
        }
    }
    token
}

/// The stream name a topic token stands for.
fn stream_of(token: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(token.len());
    let mut rest = token.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'~' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Hand every server's events for this instance to the streams here.
async fn hear(fanout: Arc<dyn Fanout>, topic: String, streams: Arc<Streams>) {
    let prefix = format!("{topic}.");
    destinations_core::hear(fanout, topic, move |message| {
        let stream = message.topic.strip_prefix(prefix.as_str()).and_then(stream_of);
        match (stream, Event::from_frame(message.message)) {
            (Some(stream), Some(event)) => streams.publish(&stream, event),
            _ => {
                tracing::warn!(topic = %message.topic, "an SSE event heard from another server does not read");
            }
        }
        true
    })
    .await;
}

impl SseDestination {
    /// An instance named `instance` (for its metrics) with these options.
    pub fn new(instance: &str, options: SseOptions) -> Result<Self, String> {
        options.check()?;
        let streams = Arc::new(Streams::new(
            instance,
            options.replay,
            options.replay_bytes,
            options.subscriber_buffer,
            options.max_streams,
            options.max_subscribers,
        ));
        Ok(Self {
            served: Arc::new(Served {
                streams,
                options,
                closing: tokio::sync::watch::Sender::new(false),
            }),
            topic: format!("sse.{}", topic_token(instance)),
            fanout: std::sync::OnceLock::new(),
            hearing: std::sync::Mutex::new(None),
        })
    }

    /// The HTTP routes that serve this instance's streams: `GET ROUTE/{stream}`.
    pub fn router(&self) -> utoipa_axum::router::OpenApiRouter {
        router(self.served.clone())
    }

    /// End every open response and refuse new ones: for a server that is stopping, whose
    /// graceful shutdown would otherwise wait for subscribers that never hang up.
    pub fn close(&self) {
        self.served.closing.send_replace(true);
    }

    /// The events a new subscriber to `stream` would be replayed now (the last `replay`),
    /// oldest first, each as it goes on the wire (`id:`, `event:` and `data:` lines).
    pub fn recent(&self, stream: &str) -> Vec<bytes::Bytes> {
        self.served
            .streams
            .recent(stream)
            .iter()
            .map(|event| event.frame.clone())
            .collect()
    }

    /// Where the streams are served (`route`).
    pub fn route(&self) -> &str {
        &self.served.options.route
    }
}

#[async_trait]
impl TypedDestination for SseDestination {
    type Send = SseSend;
    type Stored<'a> = Route<'a>;
    type Options = SseOptions;

    fn from_options(instance: &str, options: SseOptions) -> Result<Self, String> {
        Self::new(instance, options)
    }

    /// One at a time: a stream's events go out in the order they were sent.
    fn max_concurrency(&self) -> Option<usize> {
        Some(1)
    }

    /// On a shared queue, events go through the hubs' fan-out, so a subscriber on any server
    /// sees every server's events, and resumes by `Last-Event-ID` on any of them.
    fn attach(&self, hub: &destinations_core::Hub) {
        let Some(fanout) = hub.fanout() else {
            return;
        };
        if self.fanout.set(fanout.clone()).is_err() {
            return;
        }
        let task = tokio::spawn(hear(
            fanout,
            self.topic.clone(),
            self.served.streams.clone(),
        ));
        *self
            .hearing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
    }

    async fn deliver(&self, sends: &[Parsed<'_, Self::Stored<'_>>]) -> BatchOutcome {
        let mut reports = Vec::with_capacity(sends.len());
        for send in sends {
            reports.push(self.deliver_one(send).await);
        }
        BatchOutcome::Each(reports)
    }
}

impl SseDestination {
    /// Publish one send: to the fan-out on a shared queue, else to the streams here.
    async fn deliver_one(&self, send: &Parsed<'_, Route<'_>>) -> Report {
        let (route, envelope) = (&send.send, send.envelope);
        // A run id that is not a valid stream name (the API takes any) would name a
        // stream nobody can open: such sends go to the default stream.
        let stream = route
            .stream
            .as_deref()
            .or(envelope
                .run
                .as_deref()
                .filter(|run| crate::send::check_name("stream", run).is_ok()))
            .unwrap_or(DEFAULT_STREAM);
        let event = Event::new(envelope.id.to_string(), &route.channel, route.payload.get());
        match self.fanout.get() {
            Some(fanout) => {
                let topic = format!("{}.{}", self.topic, topic_token(stream));
                if let Err(error) = fanout.publish(&topic, event.frame).await {
                    return Report::retry(error.to_string());
                }
            }
            None => self.served.streams.publish(stream, event),
        }
        Report::delivered().with_response(ResponseSummary {
            status: None,
            elapsed_ms: 0,
            body_excerpt: None,
            location: Some(format!("{}/{stream}", self.served.options.route)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_round_trip_through_topic_tokens() {
        for name in ["orders", "a.b:c~d@e+f", "é", "workflow-42", "p_abc123"] {
            let token = topic_token(name);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'~'),
                "{token}"
            );
            assert_eq!(stream_of(&token).as_deref(), Some(name));
        }
    }
}
