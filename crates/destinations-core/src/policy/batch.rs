//! How a destination's envelopes are grouped into batches.

use std::time::Duration;

use serde::Deserialize;

use crate::config::duration_text;

/// When an open batch is handed to its destination: at the first of `max_events`, `max_bytes`
/// or `max_age` after its first envelope arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most envelopes in one batch.
    pub max_events: usize,
    /// Most payload bytes in one batch (a single larger envelope still goes alone).
    pub max_bytes: usize,
    /// Longest an envelope waits for its batch to fill.
    pub max_age: Duration,
}

impl BatchPolicy {
    /// No batching: every envelope is delivered on its own, at once.
    pub const fn one_per_send() -> Self {
        Self {
            max_events: 1,
            max_bytes: usize::MAX,
            max_age: Duration::ZERO,
        }
    }

    /// Whether a batch of `events` envelopes and `bytes` bytes must be flushed now.
    pub fn is_full(&self, events: usize, bytes: usize) -> bool {
        events >= self.max_events || bytes >= self.max_bytes
    }

    /// This policy with the configured overrides applied.
    pub fn with_overrides(mut self, overrides: &BatchPolicyOverrides) -> Self {
        if let Some(n) = overrides.max_events {
            self.max_events = n.max(1);
        }
        if let Some(n) = overrides.max_bytes {
            self.max_bytes = n.max(1);
        }
        if let Some(age) = overrides.max_age {
            self.max_age = age;
        }
        self
    }
}

/// Per-instance batch settings from the config; unset keys keep the destination's default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPolicyOverrides {
    /// Most envelopes in one batch.
    pub max_events: Option<usize>,
    /// Most payload bytes in one batch.
    pub max_bytes: Option<usize>,
    /// Longest wait for a batch to fill, e.g. `"60s"`.
    #[serde(default, with = "duration_text::option")]
    pub max_age: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_send_is_full_at_once() {
        let p = BatchPolicy::one_per_send();
        assert!(!p.is_full(0, 0));
        assert!(p.is_full(1, 10));
    }

    #[test]
    fn full_by_events_or_bytes_and_overridable() {
        let p = BatchPolicy {
            max_events: 10,
            max_bytes: 100,
            max_age: Duration::from_secs(60),
        };
        assert!(!p.is_full(9, 99));
        assert!(p.is_full(10, 1));
        assert!(p.is_full(1, 100));
        let o: BatchPolicyOverrides =
            serde_json::from_str(r#"{"max_events": 3, "max_age": "2s"}"#).unwrap_or_default();
        let p = p.with_overrides(&o);
        assert_eq!(
            (p.max_events, p.max_bytes, p.max_age),
            (3, 100, Duration::from_secs(2))
        );
    }
}
