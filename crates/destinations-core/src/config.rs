//! Configuration shared by every destination instance, and how an instance's table is split
//! between the hub and the destination's own options.

use std::time::Duration;

use serde::Deserialize;

use crate::policy::{BatchPolicyOverrides, PausePolicy, RateLimit, RetryPolicy};
use crate::queue::{InstanceShare, QueueBounds};

/// What to do with a run's sends when the run fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRunError {
    /// Drop them: a failed run sends nothing (the default).
    #[default]
    Discard,
    /// Deliver them as if the run had succeeded.
    Deliver,
}

/// Settings the hub applies to any destination instance, whatever its kind.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSettings {
    /// Retry policy; unset keys take the defaults.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Batch overrides on top of the destination's own policy.
    #[serde(default)]
    pub batch: BatchPolicyOverrides,
    /// Most batches delivered at once (default 256).
    pub concurrency: Option<usize>,
    /// Largest payload accepted at send time, in bytes (default 1 MiB).
    pub max_payload_bytes: Option<usize>,
    /// This instance's part of the queue: its own bound and its reserved share.
    #[serde(default)]
    pub queue: InstanceShare,
    /// The longest one delivery attempt may take (default: `hub.attempt_timeout`).
    #[serde(default, with = "duration_text::option")]
    pub attempt_timeout: Option<Duration>,
    /// At most so many attempts per second (or minute) for the whole instance, spaced rather
    /// than failed: `{ per_second = 10, burst = 5 }`.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// When a failing target (an HTTP host) is paused: `{ after_failures = 5 }`, or
    /// `{ enabled = false }` never to pause. Default: the destination's (the HTTP destination
    /// pauses its hosts; others name no targets to pause).
    #[serde(default)]
    pub pause: Option<PausePolicy>,
}

impl InstanceSettings {
    /// The keys of an instance table that belong to the hub rather than to the destination.
    pub const KEYS: [&'static str; 8] = [
        "retry",
        "batch",
        "concurrency",
        "max_payload_bytes",
        "queue",
        "attempt_timeout",
        "rate_limit",
        "pause",
    ];
    /// Default for [`concurrency`](Self::concurrency).
    pub const DEFAULT_CONCURRENCY: usize = 256;
    /// Default for [`max_payload_bytes`](Self::max_payload_bytes).
    pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
}

/// The queue (`[hub.queue]`): its kind, its bounds, how long a send waits for room, and the
/// backend's own options (`path`, `sync` for `sqlite`).
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// The backend: `memory` (the library's default) or one a backend crate provides
    /// (`sqlite`).
    pub kind: String,
    /// Bounds of everything pending.
    pub bounds: QueueBounds,
    /// How long a send waits for room before it is refused (default 5 s).
    pub wait: Duration,
    /// The rest of the table, for the backend to read strictly.
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl QueueConfig {
    /// The default wait for room.
    pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            kind: "memory".to_owned(),
            bounds: QueueBounds::default(),
            wait: Self::DEFAULT_WAIT,
            options: serde_json::Map::new(),
        }
    }
}

impl<'de> Deserialize<'de> for QueueConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let mut config = Self::default();
        if let Some(kind) = table.remove("kind") {
            config.kind = kind
                .as_str()
                .ok_or_else(|| {
                    D::Error::custom("`kind` must be a string (\"memory\" or \"sqlite\")")
                })?
                .to_owned();
        }
        let mut bounds = serde_json::Map::new();
        for key in ["max_events", "max_bytes"] {
            if let Some(value) = table.remove(key) {
                bounds.insert(key.to_owned(), value);
            }
        }
        config.bounds = serde_json::from_value(serde_json::Value::Object(bounds))
            .map_err(|e| D::Error::custom(e.to_string()))?;
        if let Some(wait) = table.remove("wait") {
            config.wait = duration_text::deserialize(wait)
                .map_err(|e| D::Error::custom(format!("`wait`: {e}")))?;
        }
        config.options = table;
        Ok(config)
    }
}

/// One `[destinations.NAME]` table, split: its kind, the hub's settings, the destination's
/// own options.
///
/// Its `Debug` names the options without their values: they hold passwords, keys and signing
/// secrets, and one `?config` in a log line must not print them.
#[derive(Clone)]
pub struct InstanceConfig {
    /// The destination kind (`http`, `s3`, ...).
    pub kind: String,
    /// Settings the hub applies.
    pub settings: InstanceSettings,
    /// The rest of the table, for the destination to read strictly.
    pub options: serde_json::Value,
}

impl std::fmt::Debug for InstanceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: Vec<&String> = self
            .options
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        f.debug_struct("InstanceConfig")
            .field("kind", &self.kind)
            .field("settings", &self.settings)
            .field("options", &options)
            .finish()
    }
}

/// A config table could not be read: an instance's, or the hub's.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The instance name (empty for the hub's own settings).
    pub instance: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// A problem with instance `instance`.
    pub fn new(instance: &str, message: impl Into<String>) -> Self {
        Self {
            instance: instance.to_owned(),
            message: message.into(),
        }
    }

    /// A problem with the hub's own settings; the message names the key.
    pub fn hub(message: impl Into<String>) -> Self {
        Self::new("", message)
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.instance.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "destinations.{}: {}", self.instance, self.message)
        }
    }
}

impl InstanceConfig {
    /// Split an instance table (as JSON) into kind, hub settings and destination options.
    pub fn from_table(instance: &str, table: serde_json::Value) -> Result<Self, ConfigError> {
        let serde_json::Value::Object(mut table) = table else {
            return Err(ConfigError::new(instance, "must be a table"));
        };
        let kind = match table.remove("kind") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(_) => return Err(ConfigError::new(instance, "`kind` must be a string")),
            None => {
                return Err(ConfigError::new(
                    instance,
                    "`kind` is missing (e.g. kind = \"http\")",
                ));
            }
        };
        let mut hub_keys = serde_json::Map::new();
        for key in InstanceSettings::KEYS {
            if let Some(value) = table.remove(key) {
                hub_keys.insert(key.to_owned(), value);
            }
        }
        let settings = crate::payload::parse_strict::<InstanceSettings>(
            serde_json::to_vec(&hub_keys).unwrap_or_default().as_slice(),
        )
        .map_err(|e| ConfigError::new(instance, e.to_string()))?;
        if let Some(rate) = &settings.rate_limit {
            rate.check()
                .map_err(|e| ConfigError::new(instance, format!("`rate_limit`: {e}")))?;
        }
        if let Some(pause) = &settings.pause {
            pause
                .check()
                .map_err(|e| ConfigError::new(instance, format!("`pause`: {e}")))?;
        }
        Ok(Self {
            kind,
            settings,
            options: serde_json::Value::Object(table),
        })
    }
}

/// Read a destination's own options strictly, naming the instance and the field at fault.
pub fn parse_options<T: serde::de::DeserializeOwned>(
    instance: &str,
    options: serde_json::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(options).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        if path == "." {
            ConfigError::new(instance, message)
        } else {
            ConfigError::new(instance, format!("`{path}`: {message}"))
        }
    })
}

/// Durations in config text: `"500ms"`, `"60s"`, `"10m"`, `"24h"` (humantime), or a number of
/// seconds.
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Seconds(f64),
        Human(String),
    }

    /// The longest duration a setting takes: longer ones would overflow the clocks they are
    /// added to.
    const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

    fn parse(text: Text) -> Result<Duration, String> {
        let duration = match text {
            Text::Seconds(s) if s >= 0.0 && s.is_finite() && s <= LONGEST.as_secs_f64() => {
                Duration::from_secs_f64(s)
            }
            Text::Seconds(s) => return Err(format!("{s} is not a duration of at most 100 years")),
            Text::Human(h) => humantime::parse_duration(&h).map_err(|e| {
                format!("`{h}` is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"10m\"")
            })?,
        };
        if duration > LONGEST {
            return Err(format!(
                "{} is longer than the longest duration a setting takes, 100 years",
                humantime::format_duration(duration)
            ));
        }
        Ok(duration)
    }

    /// Read a duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(Text::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    /// Write a duration as humantime text.
    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*value).to_string())
    }

    /// The same for optional durations.
    pub mod option {
        use super::*;

        /// Read an optional duration.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<Text>::deserialize(d)?
                .map(parse)
                .transpose()
                .map_err(serde::de::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn debug_shows_option_names_not_values() {
        let c = InstanceConfig::from_table(
            "mail",
            json!({"kind": "email", "smtp": {"password": "hunter2"}, "from": "a@b.c"}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("smtp"),
            "{shown}"
        );
    }

    #[test]
    fn splits_an_instance_table() {
        let c = InstanceConfig::from_table(
            "hooks",
            json!({"kind":"http","timeout":"2s","retry":{"max_attempts":3},"concurrency":8}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.kind, "http");
        assert_eq!(c.settings.retry.max_attempts, 3);
        assert_eq!(c.settings.concurrency, Some(8));
        assert_eq!(c.options, json!({"timeout":"2s"}));
    }

    #[test]
    fn names_the_instance_and_field_in_errors() {
        let e = InstanceConfig::from_table("hooks", json!({"timeout":"2s"})).unwrap_err();
        assert!(
            e.to_string()
                .contains("destinations.hooks: `kind` is missing"),
            "{e}"
        );
        let e = InstanceConfig::from_table(
            "hooks",
            json!({"kind":"http","retry":{"max_attempts":"x"}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("retry.max_attempts"), "{e}");
        let e = InstanceConfig::from_table(
            "hooks",
            json!({"kind":"http","pause":{"after_failures":0}}),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("destinations.hooks: `pause`: after_failures must be at least 1"),
            "{e}"
        );
        let e = InstanceConfig::from_table("hooks", json!({"kind":"http","pause":{"after":3}}))
            .unwrap_err();
        assert!(e.to_string().contains("pause"), "{e}");
        let ok =
            InstanceConfig::from_table("hooks", json!({"kind":"http","pause":{"enabled":false}}))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.settings.pause.map(|p| p.enabled), Some(false));
    }
}
