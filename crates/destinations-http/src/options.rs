//! The options of one HTTP destination instance, from `[destinations.NAME]`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use destinations_core::RateLimit;

use crate::batch::{BatchEncoding, Compression};
use destinations_core::config::duration_text;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

/// Options of an HTTP destination instance.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpOptions {
    /// Time allowed per attempt: DNS, connect, write, the server's time and the read
    /// (default 5 s).
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Non-public networks this instance may reach (CIDRs), e.g. `["127.0.0.0/8"]`. Empty by
    /// default: loopback, private, link-local, CGNAT and multicast addresses are refused.
    pub allow_networks: Vec<IpNet>,
    /// How many redirects to follow (default 0: a redirect is a permanent failure).
    pub follow_redirects: usize,
    /// Standard Webhooks secrets (`whsec_...`); when set, every request is signed. The first
    /// is current; the others stay valid during a rotation.
    pub signing_secrets: Vec<String>,
    /// Most requests at once to one host (default 64).
    pub per_host_concurrency: usize,
    /// Most requests per second (or minute) to one host, spaced rather than failed:
    /// `{ per_second = 20, burst = 5 }`. Default: none.
    pub per_host_rate_limit: Option<RateLimit>,
    /// Whether the requests at once to a host adapt to how it answers (default true): from
    /// one, growing while it answers as fast as usual, cut when it slows down, halved when it
    /// pushes back (429, 503, 408, timeouts); never above `per_host_concurrency`.
    pub adaptive_concurrency: bool,
    /// Send the sends of a batch that share method, URL, headers and credentials as one
    /// request, their `data` one JSON value per line (`"ndjson"`) or as a JSON array
    /// (`"json_array"`). Batches then fill up to the instance's `batch` (default 100 sends,
    /// 1 MiB, 1 s). Default: one request per send.
    pub encoding: Option<BatchEncoding>,
    /// Compress request bodies: `"gzip"` (default `"none"`).
    pub compression: Compression,
    /// `"per_host"`: each host gets its sends one request at a time, in the order they were
    /// accepted; a send waiting for its retry holds the ones behind it. `"per_key"`: the same
    /// for the sends to a host that share an `ordering_key`, while other keys go on (a send
    /// without a key keeps no order). Default `"none"`.
    pub ordering: DeliveryOrder,
    /// Trust only the CA certificates in this PEM file for `https` (a private CA); by default
    /// the system's trust store.
    pub ca_file: Option<PathBuf>,
}

/// The order a host gets its sends in (the instance's `ordering`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOrder {
    /// As fast as they go: a retried send may arrive after newer ones (the default).
    #[default]
    None,
    /// One request at a time per host, in the order accepted, retries in their place.
    PerHost,
    /// One request at a time per host and `ordering_key`, in the order accepted, retries in
    /// their place; other keys to the same host go on.
    PerKey,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            allow_networks: Vec::new(),
            follow_redirects: 0,
            signing_secrets: Vec::new(),
            per_host_concurrency: 64,
            per_host_rate_limit: None,
            adaptive_concurrency: true,
            encoding: None,
            compression: Compression::None,
            ordering: DeliveryOrder::None,
            ca_file: None,
        }
    }
}

impl std::fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOptions")
            .field("timeout", &self.timeout)
            .field("allow_networks", &self.allow_networks)
            .field("follow_redirects", &self.follow_redirects)
            .field(
                "signing_secrets",
                &format_args!("[{} hidden]", self.signing_secrets.len()),
            )
            .field("per_host_concurrency", &self.per_host_concurrency)
            .field("per_host_rate_limit", &self.per_host_rate_limit)
            .field("adaptive_concurrency", &self.adaptive_concurrency)
            .field("encoding", &self.encoding)
            .field("compression", &self.compression)
            .field("ordering", &self.ordering)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl HttpOptions {
    /// Options that also allow loopback (`127.0.0.0/8`, `::1`): for local receivers and tests.
    pub fn allowing_loopback() -> Self {
        Self {
            allow_networks: vec![
                IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::LOCALHOST, 8)),
                IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
            ],
            ..Self::default()
        }
    }
}
