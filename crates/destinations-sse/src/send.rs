//! One SSE send, `{channel, payload, stream?}`, and the rules it is checked against at send
//! time.

use destinations_core::InvalidPayload;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The longest channel (the SSE `event:` name) and stream name accepted.
pub const MAX_NAME_CHARS: usize = 200;

/// One event for a stream's subscribers.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SseSend {
    /// The SSE `event:` name subscribers listen for.
    pub channel: String,
    /// The event's data, any JSON value.
    #[schema(value_type = Value)]
    pub payload: Box<RawValue>,
    /// The stream; default the run's id, or `default` outside a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
}

impl SseSend {
    /// An event on `channel`. A payload that cannot be serialized is reported by
    /// [`check`](Self::check), with the field named.
    pub fn new<T: Serialize + ?Sized>(channel: impl Into<String>, payload: &T) -> Self {
        Self {
            channel: channel.into(),
            payload: destinations_core::raw_json(payload),
            stream: None,
        }
    }

    /// The same event on the stream `stream` instead of the default.
    pub fn on_stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    /// A channel and stream name that fit on an SSE line and in a URL path segment.
    pub fn check(&self) -> Result<(), InvalidPayload> {
        check_name("channel", &self.channel)?;
        if let Some(stream) = &self.stream {
            check_name("stream", stream)?;
        }
        destinations_core::check_serialized("payload", &self.payload)
    }
}

impl destinations_core::SendType for SseSend {
    const KIND: &'static str = crate::KIND;

    fn check(&self) -> Result<(), InvalidPayload> {
        SseSend::check(self)
    }
    #[cfg(feature = "openapi")]
    fn schema() -> Option<destinations_core::SendSchema> {
        Some(destinations_core::SendSchema::of::<Self>())
    }
}

/// 1 to 200 characters of letters, digits and `. _ - : ~ @ +`: safe on an SSE `event:` line, in
/// a URL path segment and in logs.
pub fn check_name(field: &str, name: &str) -> Result<(), InvalidPayload> {
    destinations_core::check_name(field, name)
}

/// A stored send as delivery reads it: the payload not copied.
#[derive(Deserialize)]
pub struct Route<'a> {
    #[serde(borrow)]
    pub(crate) channel: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) payload: &'a RawValue,
    #[serde(borrow, default)]
    pub(crate) stream: Option<std::borrow::Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["orders", "p_abc123", "workflow-42", "a.b:c~d@e+f", "é"] {
            assert!(check_name("channel", good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a\nb", "a/b", "a\rb", &"x".repeat(201)] {
            assert!(check_name("channel", bad).is_err(), "{bad:?}");
        }
    }
}
