//! What several load programs share: a destination that delivers at once, a target that never
//! answers, a queue large enough for a whole run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use destinations::http::{HttpDestination, HttpOptions};
use destinations::{
    Batch, BatchOutcome, Destination, HubConfig, InvalidPayload, QueueBounds, QueueConfig, Report,
};
use tokio::sync::Notify;

/// Delivers every batch at once and counts the sends: what is left of a send's cost is the
/// engine's (queue, dispatcher, statuses).
pub(crate) struct InstantDestination {
    delivered: AtomicUsize,
    target: usize,
    done: Notify,
}

impl InstantDestination {
    pub(crate) fn counting_to(target: usize) -> Arc<Self> {
        Arc::new(Self {
            delivered: AtomicUsize::new(0),
            target,
            done: Notify::new(),
        })
    }

    pub(crate) async fn all_delivered(&self) {
        loop {
            let notified = self.done.notified();
            if self.delivered.load(Ordering::Acquire) >= self.target {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn count(&self, sends: usize) {
        if self.delivered.fetch_add(sends, Ordering::AcqRel) + sends >= self.target {
            self.done.notify_waiters();
        }
    }
}

#[async_trait]
impl Destination for InstantDestination {
    fn kind(&self) -> &'static str {
        "instant"
    }

    fn validate(&self, _payload: &[u8]) -> Result<(), InvalidPayload> {
        Ok(())
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        self.count(batch.len());
        BatchOutcome::All(Report::delivered())
    }
}

/// A queue bound of `events` sends and no practical bound in bytes.
pub(crate) fn large_queue(events: usize) -> HubConfig {
    HubConfig {
        queue: QueueConfig {
            bounds: QueueBounds {
                max_events: events,
                max_bytes: usize::MAX / 2,
            },
            ..QueueConfig::default()
        },
        ..HubConfig::default()
    }
}

/// A target that listens and never accepts: connections wait in the backlog and no answer
/// ever comes. Lives as long as the value.
pub(crate) struct StoppedTarget {
    _listener: std::net::TcpListener,
    /// `http://127.0.0.1:PORT/PATH`.
    pub(crate) url: String,
}

impl StoppedTarget {
    pub(crate) fn at(path: &str) -> Result<Self, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let url = format!(
            "http://{}{path}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        Ok(Self {
            _listener: listener,
            url,
        })
    }

    /// An HTTP destination that waits an hour for an answer: its attempts to this target
    /// never end, so what is sent to it stays queued.
    pub(crate) fn patient_http() -> Result<HttpDestination, String> {
        let mut options = HttpOptions::allowing_loopback();
        options.timeout = Duration::from_secs(3600);
        HttpDestination::new(options)
    }
}
