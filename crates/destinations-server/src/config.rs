//! The server's configuration: `destinations.toml`, environment overrides, embedded defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::Role;
use anyhow::{Context, bail};
use destinations::{ConfigError, Hub, HubConfig, InstanceConfig, Registry};
use serde::Deserialize;

/// The configuration used when no file is given: every destination on, on safe local
/// defaults, so a first try works with nothing else running.
pub(crate) const EMBEDDED_DEFAULTS: &str = include_str!("../destinations.default.toml");

/// Environment variables with this prefix override config keys: `DESTINATIONS__LISTEN`,
/// `DESTINATIONS__HUB__SHUTDOWN_TIMEOUT`, `DESTINATIONS__DESTINATIONS__HTTP__TIMEOUT`.
pub(crate) const ENV_PREFIX: &str = "DESTINATIONS__";

/// The whole server configuration. Its `Debug` shows no secret (tokens, passwords and keys
/// live in `api_token` and the destination tables).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerConfig {
    /// Address to listen on (default `127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub(crate) listen: SocketAddr,
    /// If set, `/v1/*` requires `Authorization: Bearer <api_token>`. Required to listen beyond
    /// loopback.
    #[serde(default)]
    pub(crate) api_token: Option<String>,
    /// `Host` names the server answers to besides loopback names (on loopback) — and, when set,
    /// the only ones it answers to beyond loopback.
    #[serde(default)]
    pub(crate) allowed_hosts: Vec<String>,
    /// How long clients may take to send a request, how many may be connected, how long a
    /// stopping server waits for requests under way (`[clients]`).
    #[serde(default)]
    pub(crate) clients: crate::listener::ClientLimits,
    /// How long a readiness check answers `/readyz` before the next is made (default 10 s).
    #[serde(
        with = "destinations::config::duration_text",
        default = "default_readiness_cache"
    )]
    pub(crate) readiness_cache: std::time::Duration,
    /// Largest request body accepted, in bytes (default 16 MiB).
    #[serde(default = "default_max_request_bytes")]
    pub(crate) max_request_bytes: usize,
    /// Where the server keeps its data (default `./data`); `{data_dir}` in any string of the
    /// config stands for it.
    #[serde(default = "default_data_dir")]
    pub(crate) data_dir: PathBuf,
    /// The delivery engine's settings; the queue is `sqlite` (in the data directory) unless
    /// `[hub.queue] kind` says otherwise.
    #[serde(default)]
    pub(crate) hub: HubConfig,
    /// Destination instances by name: `[destinations.NAME]` with `kind` and its options.
    #[serde(default)]
    pub(crate) destinations: BTreeMap<String, toml::Value>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("api_token", &self.api_token.as_ref().map(|_| "<set>"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("clients", &self.clients)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("data_dir", &self.data_dir)
            .field("queue", &self.hub.queue.kind)
            .field(
                "destinations",
                &self.destinations.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn default_readiness_cache() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_max_request_bytes() -> usize {
    16 * 1024 * 1024
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

/// What `{data_dir}` stands for in config strings.
pub(crate) const DATA_DIR_TOKEN: &str = "{data_dir}";

/// Where the configuration came from, for messages.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    File(String),
    Embedded,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{path}"),
            Self::Embedded => f.write_str("embedded defaults"),
        }
    }
}

impl ServerConfig {
    /// Read the file (or the embedded defaults), apply environment overrides and the data
    /// directory, check it.
    pub(crate) fn load(
        path: Option<&Path>,
        data_dir: Option<&Path>,
    ) -> anyhow::Result<(Self, Source)> {
        let (text, source) = match path {
            Some(path) => (
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?,
                Source::File(path.display().to_string()),
            ),
            None => (EMBEDDED_DEFAULTS.to_owned(), Source::Embedded),
        };
        let mut table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{source} is not valid TOML"))?;
        apply_env_overrides(&mut table, std::env::vars())?;
        if let Some(dir) = data_dir {
            table.insert(
                "data_dir".to_owned(),
                toml::Value::String(dir.display().to_string()),
            );
        }
        // The server's queue is durable unless the config says otherwise: a 202 means the
        // send is committed.
        let queue = table
            .entry("hub")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(hub) = queue
            && let toml::Value::Table(queue) = hub
                .entry("queue")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            queue
                .entry("kind")
                .or_insert_with(|| toml::Value::String("sqlite".to_owned()));
        }
        let dir = match table.get("data_dir") {
            Some(toml::Value::String(dir)) => dir.clone(),
            Some(_) => bail!("{source}: `data_dir` must be a path"),
            None => default_data_dir().display().to_string(),
        };
        for (key, value) in table.iter_mut() {
            if key != "data_dir" {
                expand_data_dir(value, &dir);
            }
        }
        let mut config: Self = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                anyhow::anyhow!("{source}: `{path}`: {}", e.into_inner())
            })?;
        // A sqlite queue with no path lives in the data directory.
        let queue = &mut config.hub.queue;
        if queue.kind == "sqlite" && !queue.options.contains_key("path") {
            queue.options.insert(
                "path".to_owned(),
                serde_json::Value::String(config.data_dir.join("queue.db").display().to_string()),
            );
        }
        Ok((config, source))
    }

    /// Refuse what would leave the server open: a token too short to be one, or listening
    /// beyond loopback with no token (anyone who reaches the port could send anywhere the
    /// destinations reach, and read dead letters).
    pub(crate) fn check_exposure(&self, listen: SocketAddr) -> anyhow::Result<()> {
        if let Some(token) = &self.api_token {
            destinations::secret::check_token(token)
                .map_err(|why| anyhow::anyhow!("`api_token` {why}"))?;
        }
        if !listen.ip().is_loopback() && self.api_token.is_none() {
            bail!(
                "refusing to listen on {listen} without an API token: beyond loopback, anyone who reaches the port could make the server send requests and read dead letters. Set `api_token` (or DESTINATIONS__API_TOKEN) to a long random value, e.g. `openssl rand -hex 32`, or listen on 127.0.0.1"
            );
        }
        self.clients.check().map_err(anyhow::Error::msg)?;
        for host in &self.allowed_hosts {
            if host.is_empty() || host.contains(['/', ':', ' ', '@']) {
                bail!(
                    "`allowed_hosts` holds `{host}`: list host names only (no scheme, port or path)"
                );
            }
        }
        Ok(())
    }

    /// The queue file, for a sqlite queue.
    pub(crate) fn queue_path(&self) -> Option<PathBuf> {
        (self.hub.queue.kind == "sqlite")
            .then(|| {
                self.hub
                    .queue
                    .options
                    .get("path")?
                    .as_str()
                    .map(PathBuf::from)
            })
            .flatten()
    }

    /// Split each instance table for the hub.
    pub(crate) fn instances(&self) -> Result<Vec<(String, InstanceConfig)>, ConfigError> {
        self.destinations
            .iter()
            .map(|(name, table)| {
                let json = serde_json::to_value(table)
                    .map_err(|e| ConfigError::new(name, e.to_string()))?;
                Ok((name.clone(), InstanceConfig::from_table(name, json)?))
            })
            .collect()
    }

    /// Open the queue and build the hub with every configured instance, delivering unless the
    /// server is an API server. Needs a Tokio runtime. A queue file that cannot be used is
    /// refused here, with its name.
    pub(crate) async fn build_hub(&self, registry: &Registry, role: Role) -> anyhow::Result<Hub> {
        let queue = destinations::open_queue(&self.hub).await?;
        if role == Role::Worker && !queue.shared() {
            anyhow::bail!(
                "--role worker delivers from a queue API servers share ([hub.queue] kind = \"nats\"); nothing else would put sends into `{}`",
                queue.describe()
            );
        }
        let mut builder = Hub::builder()
            .config(self.hub.clone())
            .queue(queue)
            .delivering(role != Role::Api);
        for (name, instance) in self.instances()? {
            builder = builder.configured(registry, &name, instance)?;
        }
        Ok(builder.build()?)
    }
}

/// Replace `{data_dir}` in every string of `value`.
fn expand_data_dir(value: &mut toml::Value, dir: &str) {
    match value {
        toml::Value::String(text) if text.contains(DATA_DIR_TOKEN) => {
            *text = text.replace(DATA_DIR_TOKEN, dir);
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|v| expand_data_dir(v, dir)),
        toml::Value::Table(table) => table.iter_mut().for_each(|(_, v)| expand_data_dir(v, dir)),
        _ => {}
    }
}

/// Apply `DESTINATIONS__A__B=value` as `a.b = value`. A value that reads as TOML (a number, a
/// boolean, an array, a quoted string) is taken as such; anything else is a plain string.
pub(crate) fn apply_env_overrides(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if keys.iter().any(String::is_empty) {
            bail!("environment variable {name}: empty key segment");
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let (last, parents) = keys
            .split_last()
            .unwrap_or_else(|| unreachable!("split yields one key at least"));
        let mut node = &mut *table;
        for key in parents {
            let entry = node
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = match entry {
                toml::Value::Table(t) => t,
                _ => bail!("environment variable {name}: `{key}` is not a table in the config"),
            };
        }
        node.insert(last.clone(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any variable, any value: the override lands at its path, as the TOML value it
        /// reads as or else as the text itself, unchanged — or is refused; never a panic.
        #[test]
        fn env_overrides_land_where_they_say(
            path in "[A-Za-z_]{1,8}(__[A-Za-z_]{1,8}){0,3}",
            raw in "\\PC{0,24}",
        ) {
            let mut table: toml::Table = toml::from_str(EMBEDDED_DEFAULTS).unwrap_or_default();
            let name = format!("{ENV_PREFIX}{path}");
            if apply_env_overrides(&mut table, std::iter::once((name, raw.clone()))).is_ok() {
                let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
                let mut node = &table;
                for key in &keys[..keys.len() - 1] {
                    node = node.get(key).and_then(toml::Value::as_table).unwrap_or_else(|| panic!("{key} is a table"));
                }
                let landed = node.get(&keys[keys.len() - 1]).unwrap_or_else(|| panic!("{path} landed"));
                let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}")).ok().and_then(|mut t| t.remove("v"));
                match parsed {
                    Some(value) => proptest::prop_assert_eq!(landed, &value),
                    None => proptest::prop_assert_eq!(landed.as_str(), Some(raw.as_str())),
                }
            }
        }
    }

    #[test]
    fn embedded_defaults_parse() {
        let table: toml::Table = toml::from_str(EMBEDDED_DEFAULTS).unwrap_or_default();
        let config: ServerConfig = toml::Value::Table(table)
            .try_into()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(config.destinations.contains_key("http"));
        assert_eq!(config.listen, default_listen());
    }

    #[test]
    fn env_overrides_set_nested_keys_with_types() {
        let mut table: toml::Table = toml::from_str(EMBEDDED_DEFAULTS).unwrap_or_default();
        let vars = [
            ("DESTINATIONS__LISTEN", "127.0.0.1:9999"),
            ("DESTINATIONS__HUB__QUEUE__MAX_EVENTS", "10"),
            ("DESTINATIONS__DESTINATIONS__HOOKS__KIND", "http"),
            (
                "DESTINATIONS__DESTINATIONS__HOOKS__ALLOW_NETWORKS",
                r#"["10.0.0.0/8"]"#,
            ),
            ("UNRELATED", "x"),
        ];
        apply_env_overrides(
            &mut table,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let config: ServerConfig = toml::Value::Table(table)
            .try_into()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.hub.queue.bounds.max_events, 10);
        assert_eq!(config.hub.queue.kind, "sqlite");
        let hooks = &config.destinations["hooks"];
        assert_eq!(hooks.get("kind").and_then(|k| k.as_str()), Some("http"));
        assert!(hooks.get("allow_networks").is_some_and(|a| a.is_array()));
    }
}
