//! The metrics the hub records, through the `metrics` crate.
//!
//! Install a recorder (the server installs a Prometheus one) before building the hub: handles
//! are resolved once per destination instance, off the hot path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Sends accepted into the queue, per destination instance.
pub const SENDS_ACCEPTED: &str = "destinations_sends_accepted_total";
/// Payload bytes of the sends accepted, per destination instance.
pub const SEND_BYTES_ACCEPTED: &str = "destinations_send_bytes_accepted_total";
/// Sends refused at send time, per destination instance and reason.
pub const SENDS_REJECTED: &str = "destinations_sends_rejected_total";
/// Delivery attempts per envelope, per destination instance and outcome.
pub const ATTEMPTS: &str = "destinations_attempts_total";
/// Sends delivered, per destination instance.
pub const DELIVERED: &str = "destinations_delivered_total";
/// Sends dead-lettered, per destination instance.
pub const DEAD_LETTERED: &str = "destinations_dead_lettered_total";
/// Time of one batch delivery, per destination instance.
pub const DELIVERY_SECONDS: &str = "destinations_delivery_seconds";
/// Envelopes per delivered batch, per destination instance.
pub const BATCH_EVENTS: &str = "destinations_batch_events";
/// Envelopes in a delivery attempt right now, per destination instance.
pub const IN_FLIGHT: &str = "destinations_in_flight";
/// Sends pending in the queue (retries included), per destination instance.
pub const QUEUE_EVENTS: &str = "destinations_queue_events";
/// Payload bytes pending in the queue, per destination instance.
pub const QUEUE_BYTES: &str = "destinations_queue_bytes";

/// Attempts at once an instance gives a target now (its adaptive limit), per destination
/// instance and target.
pub const ENDPOINT_CONCURRENCY: &str = "destinations_endpoint_concurrency";
/// Whether a target is paused (1) or not (0), per destination kind and target.
pub const ENDPOINT_PAUSED: &str = "destinations_endpoint_paused";

/// Metric handles of one destination instance.
#[derive(Clone)]
pub(crate) struct InstanceMetrics {
    pub(crate) accepted: Counter,
    pub(crate) accepted_bytes: Counter,
    pub(crate) rejected_invalid: Counter,
    pub(crate) rejected_full: Counter,
    pub(crate) attempts_delivered: Counter,
    pub(crate) attempts_retry: Counter,
    pub(crate) attempts_failed: Counter,
    pub(crate) delivered: Counter,
    pub(crate) dead: Counter,
    pub(crate) delivery_seconds: Histogram,
    pub(crate) batch_events: Histogram,
    pub(crate) in_flight: Gauge,
    /// The same counts, readable in process (the dashboard's rates), whatever recorder is
    /// installed.
    pub(crate) totals: Arc<Totals>,
}

/// What one destination instance has done since the hub started.
#[derive(Default, Debug)]
pub(crate) struct Totals {
    pub(crate) accepted: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dead: AtomicU64,
    /// Attempts that failed (retried or given up on), counted per send.
    pub(crate) failed_attempts: AtomicU64,
    /// The error of the last attempt that failed, and when.
    pub(crate) last_error: std::sync::Mutex<Option<(String, std::time::SystemTime)>>,
}

impl Totals {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// An attempt failed with `error` (once per batch).
    pub(crate) fn failed_with(&self, error: &str) {
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = Some((error.to_owned(), std::time::SystemTime::now()));
    }

    pub(crate) fn last_error(&self) -> Option<(String, std::time::SystemTime)> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// One destination instance's counts since the hub started, and what waits in its queue.
#[derive(Clone, Debug, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceTotals {
    /// The instance.
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// Sends accepted.
    pub accepted: u64,
    /// Sends delivered.
    pub delivered: u64,
    /// Sends dead-lettered.
    pub dead: u64,
    /// Attempts that failed (a send tried three times before delivery counts two).
    pub failed_attempts: u64,
    /// Sends waiting now (retries included).
    pub queued: usize,
    /// The error of the last attempt that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When that attempt failed, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<String>,
}

impl InstanceMetrics {
    pub(crate) fn new(instance: &str) -> Self {
        let d = instance.to_owned();
        Self {
            accepted: counter!(SENDS_ACCEPTED, "destination" => d.clone()),
            accepted_bytes: counter!(SEND_BYTES_ACCEPTED, "destination" => d.clone()),
            rejected_invalid: counter!(SENDS_REJECTED, "destination" => d.clone(), "reason" => "invalid"),
            rejected_full: counter!(SENDS_REJECTED, "destination" => d.clone(), "reason" => "queue_full"),
            attempts_delivered: counter!(ATTEMPTS, "destination" => d.clone(), "outcome" => "delivered"),
            attempts_retry: counter!(ATTEMPTS, "destination" => d.clone(), "outcome" => "retry"),
            attempts_failed: counter!(ATTEMPTS, "destination" => d.clone(), "outcome" => "failed"),
            delivered: counter!(DELIVERED, "destination" => d.clone()),
            dead: counter!(DEAD_LETTERED, "destination" => d.clone()),
            delivery_seconds: histogram!(DELIVERY_SECONDS, "destination" => d.clone()),
            batch_events: histogram!(BATCH_EVENTS, "destination" => d.clone()),
            in_flight: gauge!(IN_FLIGHT, "destination" => d),
            totals: Arc::default(),
        }
    }
}

/// Publish what is pending per destination instance (called when metrics are scraped).
pub fn record_queue_depths(per_instance: &[(String, crate::queue::QueueDepth)]) {
    for (instance, depth) in per_instance {
        gauge!(QUEUE_EVENTS, "destination" => instance.clone()).set(depth.events as f64);
        gauge!(QUEUE_BYTES, "destination" => instance.clone()).set(depth.bytes as f64);
    }
}

/// Publish each target's limits and pause state (called when metrics are scraped; the hub
/// remembers at most 10 000 targets, which bounds the series).
pub fn record_endpoints(endpoints: &[crate::EndpointView]) {
    for endpoint in endpoints {
        for (instance, limit) in &endpoint.concurrency {
            gauge!(ENDPOINT_CONCURRENCY, "destination" => instance.clone(), "target" => endpoint.target.clone())
                .set(*limit as f64);
        }
        gauge!(ENDPOINT_PAUSED, "kind" => endpoint.kind, "target" => endpoint.target.clone())
            .set(if endpoint.state == "open" { 0.0 } else { 1.0 });
    }
}
