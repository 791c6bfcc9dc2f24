//! One emit, `{event, channel?, emitter_id?, hops?}`, and the rules it is checked against at send
//! time.

use destinations_core::InvalidPayload;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The longest emitter, listener or channel name accepted.
pub const MAX_NAME_CHARS: usize = 200;
/// The built-in channel that carries every dead letter of every destination.
pub const ERRORS_CHANNEL: &str = "$errors";

/// The built-in channel told when a target (an HTTP host) is paused or resumed.
pub const ENDPOINTS_CHANNEL: &str = "$endpoints";

/// An event for the listeners subscribed to its emitter (and channel).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmitSend {
    /// The event: a JSON object. The legacy form `{"raw_event": {...}}` is taken too.
    #[schema(value_type = Object)]
    pub event: Box<RawValue>,
    /// The channel (`event_name` in subscriptions); none = the default channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Who emits; default the run's id, or `default` outside a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emitter_id: Option<String>,
    /// How many emits led to this one: a listener that emits in response passes on the `hops` it
    /// was given plus one (in-process handlers do it with [`crate::Emitted::follow_up`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hops: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl EmitSend {
    /// An event on the default channel. A value that does not serialize is reported by
    /// [`check`](Self::check).
    pub fn new<T: Serialize + ?Sized>(event: &T) -> Self {
        Self {
            event: serde_json::value::to_raw_value(event)
                .unwrap_or_else(|_| RawValue::NULL.to_owned()),
            channel: None,
            emitter_id: None,
            hops: 0,
        }
    }

    /// The same event on `channel`.
    pub fn on_channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }

    /// The same event, emitted by `emitter_id` (for sends outside a run).
    pub fn from_emitter(mut self, emitter_id: impl Into<String>) -> Self {
        self.emitter_id = Some(emitter_id.into());
        self
    }

    /// An event object, names that fit, no built-in channel.
    pub fn check(&self) -> Result<(), InvalidPayload> {
        event_object(&self.event)?;
        if let Some(channel) = &self.channel {
            check_name("channel", channel)?;
            if channel.starts_with('$') {
                return Err(InvalidPayload::field(
                    "channel",
                    format!(
                        "`{channel}`: channels starting with `$` are built in; emit on another"
                    ),
                ));
            }
        }
        if let Some(emitter) = &self.emitter_id {
            check_name("emitter_id", emitter)?;
        }
        Ok(())
    }
}

/// The event object itself: unwrapped from the legacy `{"raw_event": {...}}` form.
pub(crate) fn event_object(event: &RawValue) -> Result<&RawValue, InvalidPayload> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Legacy<'a> {
        #[serde(borrow)]
        raw_event: &'a RawValue,
    }
    let inner = match serde_json::from_str::<Legacy<'_>>(event.get()) {
        Ok(legacy) => legacy.raw_event,
        Err(_) => event,
    };
    if !inner.get().trim_start().starts_with('{') {
        return Err(InvalidPayload::field(
            "event",
            "must be a JSON object (or {\"raw_event\": {...}})",
        ));
    }
    Ok(inner)
}

/// 1 to 200 characters of letters, digits and `. _ - : ~ @ +` (a leading `$` for built-in
/// channels).
pub fn check_name(field: &str, name: &str) -> Result<(), InvalidPayload> {
    destinations_core::check_name(field, name.strip_prefix('$').unwrap_or(name))
}

impl destinations_core::SendType for EmitSend {
    const KIND: &'static str = crate::KIND;

    fn check(&self) -> Result<(), destinations_core::InvalidPayload> {
        EmitSend::check(self).map(drop)
    }
    #[cfg(feature = "openapi")]
    fn schema() -> Option<destinations_core::SendSchema> {
        Some(destinations_core::SendSchema::of::<Self>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(json: &str) -> EmitSend {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn plain_and_legacy_events_are_objects() {
        assert!(send(r#"{"event": {"a": 1}}"#).check().is_ok());
        assert!(
            send(r#"{"event": {"raw_event": {"a": 1}}}"#)
                .check()
                .is_ok()
        );
        let legacy = send(r#"{"event": {"raw_event": {"a": 1}}}"#);
        assert_eq!(
            event_object(&legacy.event).map(|e| e.get().to_owned()).ok(),
            Some(r#"{"a": 1}"#.to_owned())
        );
        for bad in [
            r#"{"event": 3}"#,
            r#"{"event": {"raw_event": [1]}}"#,
            r#"{"event": "x"}"#,
        ] {
            assert_eq!(
                send(bad).check().map_err(|e| e.field).err(),
                Some("event".to_owned()),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_and_reserved_channels() {
        assert!(
            send(r#"{"event": {}, "channel": "$errors"}"#)
                .check()
                .is_err()
        );
        assert!(send(r#"{"event": {}, "channel": "a b"}"#).check().is_err());
        assert!(
            send(r#"{"event": {}, "emitter_id": "p_orders", "channel": "refunds"}"#)
                .check()
                .is_ok()
        );
        assert!(check_name("event_name", "$errors").is_ok());
    }
}
