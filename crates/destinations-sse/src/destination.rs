//! The SSE destination: each send is published to its stream's subscribers.

use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use destinations_core::{
    Batch, BatchOutcome, ConfigError, Destination, InvalidPayload, Report, ResponseSummary,
    parse_strict,
};

use crate::KIND;
use crate::http::{Served, router};
use crate::options::SseOptions;
use crate::send::{Route, SseSend};
use crate::streams::{Event, Streams};

/// The stream of a send that names none, outside a run.
pub const DEFAULT_STREAM: &str = "default";

/// Publishes each send to the subscribers of its stream.
pub struct SseDestination {
    served: Arc<Served>,
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
        })
    }

    /// Build an instance from its config options (the registry's entry point).
    pub fn from_config(
        instance: &str,
        options: serde_json::Value,
    ) -> Result<Arc<dyn Destination>, ConfigError> {
        let options: SseOptions = destinations_core::parse_options(instance, options)?;
        Self::new(instance, options)
            .map(|d| Arc::new(d) as Arc<dyn Destination>)
            .map_err(|message| ConfigError::new(instance, message))
    }

    /// The HTTP routes that serve this instance's streams: `GET ROUTE/{stream}`.
    pub fn router(&self) -> Router {
        router(self.served.clone())
    }

    /// End every open response and refuse new ones: for a server that is stopping, whose
    /// graceful shutdown would otherwise wait for subscribers that never hang up.
    pub fn close(&self) {
        self.served.closing.send_replace(true);
    }

    /// Where the streams are served (`route`).
    pub fn route(&self) -> &str {
        &self.served.options.route
    }
}

#[async_trait]
impl Destination for SseDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        let send: SseSend = parse_strict(payload)?;
        send.check()
    }

    /// One at a time: a stream's events go out in the order they were sent.
    fn max_concurrency(&self) -> Option<usize> {
        Some(1)
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let reports = batch
            .envelopes()
            .iter()
            .map(|envelope| {
                let route: Route<'_> = match serde_json::from_slice(&envelope.payload) {
                    Ok(route) => route,
                    Err(e) => {
                        return Report::failed(format!("the stored send no longer parses: {e}"));
                    }
                };
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
                self.served.streams.publish(
                    stream,
                    Event::new(envelope.id.to_string(), &route.channel, route.payload.get()),
                );
                Report::delivered().with_response(ResponseSummary {
                    status: None,
                    elapsed_ms: 0,
                    body_excerpt: None,
                    location: Some(format!("{}/{stream}", self.served.options.route)),
                })
            })
            .collect();
        BatchOutcome::Each(reports)
    }
}
