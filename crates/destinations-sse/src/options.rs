//! The options of one SSE destination instance, from `[destinations.NAME]`.

use std::collections::BTreeMap;
use std::time::Duration;

use destinations_core::config::duration_text;
use serde::Deserialize;

/// Options of an SSE destination instance.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseOptions {
    /// Where streams are served: `ROUTE/{stream}` (default `/v1/sse`).
    pub route: String,
    /// Events each stream keeps for replay and `Last-Event-ID` resume (default 100).
    pub replay: usize,
    /// Bytes of event data each stream keeps for replay, at most (default 1 MiB; the newest
    /// event is always kept).
    pub replay_bytes: usize,
    /// How often an idle connection gets a `:keepalive` comment (default 15 s).
    #[serde(with = "duration_text")]
    pub keepalive: Duration,
    /// Events a subscriber may fall behind by before it is told and disconnected
    /// (default 1 024). It can resume with `Last-Event-ID`.
    pub subscriber_buffer: usize,
    /// Read tokens by stream name (`"*"` = every stream): a stream with tokens needs one, as
    /// `?token=` (for browsers' `EventSource`) or `Authorization: Bearer`. Streams without
    /// any are open. Independent of the server's API token.
    pub tokens: BTreeMap<String, Vec<String>>,
    /// Origins allowed to read streams from a browser on another origin (`"*"` = any).
    pub cors_origins: Vec<String>,
    /// Most streams kept; past it, the stream idle longest with no subscriber is forgotten
    /// (default 10 000).
    pub max_streams: usize,
    /// Most subscribers at once, all streams together (default 100 000).
    pub max_subscribers: usize,
}

impl Default for SseOptions {
    fn default() -> Self {
        Self {
            route: "/v1/sse".to_owned(),
            replay: 100,
            replay_bytes: 1024 * 1024,
            keepalive: Duration::from_secs(15),
            subscriber_buffer: 1024,
            tokens: BTreeMap::new(),
            cors_origins: Vec::new(),
            max_streams: 10_000,
            max_subscribers: 100_000,
        }
    }
}

impl std::fmt::Debug for SseOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseOptions")
            .field("route", &self.route)
            .field("replay", &self.replay)
            .field("replay_bytes", &self.replay_bytes)
            .field("keepalive", &self.keepalive)
            .field("subscriber_buffer", &self.subscriber_buffer)
            .field("tokens", &self.tokens.keys().collect::<Vec<_>>())
            .field("cors_origins", &self.cors_origins)
            .field("max_streams", &self.max_streams)
            .field("max_subscribers", &self.max_subscribers)
            .finish()
    }
}

impl SseOptions {
    /// The options' own consistency, with the option named.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !self.route.starts_with('/')
            || self.route.ends_with('/')
            || self.route.contains(['{', '}'])
        {
            return Err(format!(
                "`route` {:?} must start with `/`, not end with one, and hold no `{{`",
                self.route
            ));
        }
        if self.keepalive.is_zero() {
            return Err("`keepalive` must be above 0".to_owned());
        }
        for (name, value) in [
            ("subscriber_buffer", self.subscriber_buffer),
            ("max_streams", self.max_streams),
            ("max_subscribers", self.max_subscribers),
        ] {
            if value == 0 {
                return Err(format!("`{name}` must be at least 1"));
            }
        }
        for (stream, tokens) in &self.tokens {
            if tokens.is_empty() {
                return Err(format!("`tokens.{stream}` must list at least one token"));
            }
            for (index, token) in tokens.iter().enumerate() {
                destinations_core::secret::check_token(token)
                    .map_err(|why| format!("`tokens.{stream}[{index}]` {why}"))?;
            }
        }
        Ok(())
    }
}
