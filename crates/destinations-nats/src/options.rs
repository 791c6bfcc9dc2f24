//! `[hub.queue] kind = "nats"`: where the server is and what to call things there.

use std::time::Duration;

use serde::Deserialize;

/// The NATS queue's settings. Every server that shares a backlog names the same `url`,
/// `stream`, `dead_letter_stream` and `status_bucket`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsOptions {
    /// The server (`nats://host:4222`; several, comma-separated, for a cluster).
    pub url: String,
    /// A user name and password, if the server asks for them.
    pub user: Option<String>,
    /// The user's password.
    pub password: Option<String>,
    /// A token, if the server asks for one.
    pub token: Option<String>,
    /// Trust only this CA for `tls://` servers (default: the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// The work-queue stream holding the backlog (created if missing).
    pub stream: String,
    /// The stream holding dead letters (created if missing).
    pub dead_letter_stream: String,
    /// The key-value bucket holding statuses (created if missing).
    pub status_bucket: String,
    /// The stream through which every server hears what one publishes — SSE events (created
    /// if missing).
    pub fanout_stream: String,
    /// The key-value bucket that lets one server at a time deliver an instance whose sends go
    /// out in order (SSE) (created if missing).
    pub lock_bucket: String,
    /// How many of the newest messages of each topic (an SSE stream) the fan-out stream keeps
    /// for servers that start later and for `Last-Event-ID` resumes.
    pub fanout_keep: i64,
    /// The subjects' first token: sends wait on `PREFIX.send.INSTANCE.COUNT` (a bundle of
    /// COUNT sends), dead letters on `PREFIX.dead.ID`.
    pub subject_prefix: String,
    /// Copies of each stream in a cluster (1 for a single server).
    pub replicas: usize,
    /// How long a leased send stays with the server that leased it before the others may take
    /// it: a server that dies hands its sends on after this. Attempts longer than this keep
    /// their lease by extending it.
    #[serde(with = "destinations_core::config::duration_text")]
    pub lease: Duration,
    /// Messages of one instance leased at once, across all servers (JetStream's
    /// `max_ack_pending`; a message is a run's sends to the instance, or a batch to retry). A
    /// batch waiting for its retry holds a place too (the first server to see it early hands
    /// it back with a delay, and JetStream counts it until then): size it for the retries that
    /// may wait at once plus a few hundred per server. At the limit, no server leases more of
    /// the instance until one finishes.
    pub max_leased: i64,
    /// How long to wait for the server before a send is refused as unavailable.
    #[serde(with = "destinations_core::config::duration_text")]
    pub timeout: Duration,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            token: None,
            ca_file: None,
            stream: "DESTINATIONS".into(),
            dead_letter_stream: "DESTINATIONS_DEAD".into(),
            status_bucket: "destinations_status".into(),
            fanout_stream: "DESTINATIONS_FANOUT".into(),
            lock_bucket: "destinations_locks".into(),
            fanout_keep: 1000,
            subject_prefix: "destinations".into(),
            replicas: 1,
            lease: Duration::from_secs(30),
            max_leased: 100_000,
            timeout: Duration::from_secs(5),
        }
    }
}

impl NatsOptions {
    /// Settings for the server at `url`, the rest default.
    pub fn at(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// What is wrong with these settings, in words.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = |name: &str| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        for (field, value) in [
            ("stream", &self.stream),
            ("dead_letter_stream", &self.dead_letter_stream),
            ("status_bucket", &self.status_bucket),
            ("fanout_stream", &self.fanout_stream),
            ("lock_bucket", &self.lock_bucket),
            ("subject_prefix", &self.subject_prefix),
        ] {
            if !name_ok(value) {
                return Err(format!(
                    "hub.queue.{field}: `{value}` may hold letters, digits, `_` and `-` only"
                ));
            }
        }
        if self.stream == self.dead_letter_stream
            || self.stream == self.fanout_stream
            || self.dead_letter_stream == self.fanout_stream
        {
            return Err(
                "hub.queue: `stream`, `dead_letter_stream` and `fanout_stream` must differ".into(),
            );
        }
        if self.fanout_keep < 1 {
            return Err("hub.queue.fanout_keep: at least 1".into());
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(format!(
                "hub.queue.replicas: {} is not between 1 and 5",
                self.replicas
            ));
        }
        if self.lease < Duration::from_secs(1) {
            return Err("hub.queue.lease: at least 1s".into());
        }
        if self.max_leased < 1 {
            return Err("hub.queue.max_leased: at least 1".into());
        }
        if self.password.is_some() != self.user.is_some() {
            return Err("hub.queue: `user` and `password` go together".into());
        }
        Ok(())
    }
}
