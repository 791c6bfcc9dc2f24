//! A chat-webhook destination for `destinations`, written as a third-party author writes one:
//! `send.chat(ChatMessage::new("deploy finished").on_channel("ops"))` posts to a Slack- or
//! Discord-style incoming webhook after the run. A channel's messages within a second go out
//! as one post, a line each, so a burst stays under the webhook's rate limit; a 429 or 5xx is
//! retried (after its `Retry-After`), any other refusal dead-lettered with the answer.

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{BatchPolicy, DestinationPlugin, Parsed, Registry, SendType, Typed};
use destinations_core::{TypedDestination, check_name, register_destination};
use serde::{Deserialize, Serialize};

/// The kind name in config (`kind = "chat"`), and the instance `send.chat` goes to.
pub const KIND: &str = "chat";

/// This destination's registration.
pub const PLUGIN: DestinationPlugin = DestinationPlugin {
    kind: KIND,
    describe: "messages to a Slack- or Discord-style incoming webhook, a channel's burst in one post",
    build: Typed::<ChatDestination>::from_config,
};
register_destination!(PLUGIN);

/// Register this destination explicitly (a linker may drop the link-time registration).
pub fn register(registry: &mut Registry) {
    registry.register(PLUGIN);
}

/// The longest text of one message, in characters (a Discord post holds 2 000).
pub const MAX_TEXT_CHARS: usize = 1800;

/// One chat message.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// The text, 1 to 1 800 characters.
    pub text: String,
    /// The channel (Slack webhooks that allow it); default the webhook's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

impl ChatMessage {
    /// A message to the webhook's own channel.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            channel: None,
        }
    }

    /// The same message to `channel`.
    pub fn on_channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }
}

impl SendType for ChatMessage {
    const KIND: &'static str = KIND;

    fn check(&self) -> Result<(), InvalidPayload> {
        match self.text.chars().count() {
            0 => return Err(InvalidPayload::field("text", "is empty")),
            n if n > MAX_TEXT_CHARS => {
                let why = format!("is {n} characters long, over the limit of {MAX_TEXT_CHARS}");
                return Err(InvalidPayload::field("text", why));
            }
            _ => {}
        }
        self.channel
            .as_deref()
            .map_or(Ok(()), |c| check_name("channel", c))
    }
}

/// `send.chat(...)` on a [`Sender`].
pub trait SendChat {
    /// Post a message through the instance named `chat`.
    fn chat(&self, message: ChatMessage) -> Result<EventId, SendError>;
}

impl SendChat for Sender {
    fn chat(&self, message: ChatMessage) -> Result<EventId, SendError> {
        self.record(&message)
    }
}

/// What the webhook takes: `{"text"}` (Slack) or `{"content"}` (Discord).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Slack,
    Discord,
}

/// An instance's options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatOptions {
    /// The incoming webhook's URL; it is the credential, so it is never shown in errors.
    pub webhook_url: String,
    #[serde(default)]
    pub format: Format,
    /// The only channels a message may name, if set.
    #[serde(default)]
    pub channels: Option<Vec<String>>,
}

/// Posts messages to one incoming webhook.
pub struct ChatDestination {
    client: reqwest::Client,
    options: ChatOptions,
}

/// A stored message as delivery reads it, borrowing its text.
#[derive(Deserialize)]
pub struct StoredMessage<'a> {
    #[serde(borrow)]
    text: Cow<'a, str>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
}

#[async_trait]
impl TypedDestination for ChatDestination {
    type Send = ChatMessage;
    type Stored<'a> = StoredMessage<'a>;
    type Options = ChatOptions;

    fn from_options(_instance: &str, options: ChatOptions) -> Result<Self, String> {
        let url = reqwest::Url::parse(&options.webhook_url)
            .map_err(|e| format!("`webhook_url` is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("`webhook_url` must be an http or https URL".into());
        }
        // No proxy from the environment, no redirects: the webhook is exactly where it says.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Self { client, options })
    }

    fn check_for_instance(&self, message: &StoredMessage<'_>) -> Result<(), InvalidPayload> {
        match (&self.options.channels, &message.channel) {
            (Some(allowed), Some(channel)) if !allowed.iter().any(|a| a == channel) => {
                let why = format!("`{channel}` is not one of: {}", allowed.join(", "));
                Err(InvalidPayload::field("channel", why))
            }
            _ => Ok(()),
        }
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy {
            max_events: 20,
            max_bytes: 64 << 10,
            max_age: Duration::from_secs(1),
        }
    }

    fn batch_group(&self, message: &StoredMessage<'_>) -> Option<String> {
        message.channel.as_deref().map(str::to_owned)
    }

    /// A post per run of messages that fits one post, in order.
    async fn deliver(&self, sends: &[Parsed<'_, Self::Stored<'_>>]) -> BatchOutcome {
        let limit = match self.options.format {
            Format::Slack => 40_000,
            Format::Discord => 2_000,
        };
        let mut reports = Vec::with_capacity(sends.len());
        let mut rest = sends;
        while !rest.is_empty() {
            let mut chars = 0;
            let fits = rest.iter().take_while(|s| {
                chars += s.send.text.chars().count() + 1;
                chars <= limit + 1
            });
            let take = fits.count().max(1);
            let report = self.post(&rest[..take]).await;
            reports.extend(std::iter::repeat_n(report, take));
            rest = &rest[take..];
        }
        BatchOutcome::Each(reports)
    }
}

impl ChatDestination {
    async fn post(&self, messages: &[Parsed<'_, StoredMessage<'_>>]) -> Report {
        let text: Vec<&str> = messages.iter().map(|m| &*m.send.text).collect();
        let body = match (self.options.format, &messages[0].send.channel) {
            (Format::Slack, Some(channel)) => {
                serde_json::json!({"text": text.join("\n"), "channel": channel})
            }
            (Format::Slack, None) => serde_json::json!({"text": text.join("\n")}),
            (Format::Discord, _) => serde_json::json!({"content": text.join("\n")}),
        };
        let request = self.client.post(&self.options.webhook_url).json(&body);
        let response = match request.send().await {
            Ok(response) => response,
            // Without the URL: it is the webhook's secret.
            Err(e) => return Report::retry(format!("could not post: {}", e.without_url())),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok());
        let after = retry_after
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        let answer = response.text().await.unwrap_or_default();
        let said = format!(
            "the webhook answered {status}: {}",
            answer.chars().take(200).collect::<String>()
        );
        match status.as_u16() {
            200..=299 => Report::delivered(),
            429 | 500..=599 => Report::retry_after(said, after),
            _ => Report::failed(said),
        }
    }
}
