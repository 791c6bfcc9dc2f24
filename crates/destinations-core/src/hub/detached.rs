//! Sends made outside any run (`hub.sender()`): admitted at once, against the queue's room,
//! and handed to the queue by a background task that takes whatever has gathered in one
//! `enqueue` (one commit for a durable queue). [`Hub::flush`](super::Hub::flush) waits until
//! everything sent so far is in the queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::HubShared;
use crate::envelope::Envelope;
use crate::queue::QueueError;

/// The most sends handed to the queue in one `enqueue`.
const GATHER: usize = 1024;

/// The intake of detached sends.
pub(crate) struct Detached {
    intake: Mutex<Option<mpsc::UnboundedSender<Envelope>>>,
    /// Sends submitted so far.
    submitted: AtomicU64,
    /// Sends handed to the queue (or given up on) so far.
    done: watch::Sender<u64>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Detached {
    pub(crate) fn new() -> (Self, mpsc::UnboundedReceiver<Envelope>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let detached = Self {
            intake: Mutex::new(Some(tx)),
            submitted: AtomicU64::new(0),
            done: watch::Sender::new(0),
            task: Mutex::new(None),
        };
        (detached, rx)
    }

    /// Start the task that hands detached sends to the queue.
    pub(crate) fn start(hub: &Arc<HubShared>, mut intake: mpsc::UnboundedReceiver<Envelope>) {
        let shared = hub.clone();
        let task = tokio::spawn(async move {
            let mut gathered = Vec::with_capacity(GATHER);
            while intake.recv_many(&mut gathered, GATHER).await > 0 {
                let count = gathered.len() as u64;
                hand_over(&shared, std::mem::take(&mut gathered)).await;
                shared.detached.done.send_modify(|done| *done += count);
            }
        });
        *hub.detached
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
    }

    /// Queue one admitted send; `false` once the intake is closed.
    pub(crate) fn submit(&self, envelope: Envelope) -> bool {
        let intake = self.intake.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(intake) = intake.as_ref() else {
            return false;
        };
        self.submitted.fetch_add(1, Ordering::AcqRel);
        intake.send(envelope).is_ok()
    }

    /// Whether sends submitted are still on their way to the queue.
    pub(crate) fn pending(&self) -> bool {
        self.submitted.load(Ordering::Acquire) > *self.done.borrow()
    }

    /// Wait until every send submitted so far is in the queue.
    pub(crate) async fn flush(&self) {
        let target = self.submitted.load(Ordering::Acquire);
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|done| *done >= target).await;
    }

    /// Take no more; the task ends once it has handed over what it holds.
    pub(crate) fn close(&self) -> Option<JoinHandle<()>> {
        self.intake
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Hand sends to the queue. They were admitted, so a queue that is unavailable for a while
/// (a full disk) is tried again until it takes them or stops.
async fn hand_over(hub: &HubShared, mut envelopes: Vec<Envelope>) {
    let mut wait = Duration::from_millis(50);
    loop {
        let tally = hub.tally(&envelopes);
        let refused = match hub.queue.enqueue(envelopes).await {
            Ok(()) => {
                hub.queue_took(&tally);
                return;
            }
            Err(refused) => refused,
        };
        envelopes = refused.envelopes;
        match refused.why {
            QueueError::Unavailable(cause) => {
                tracing::warn!(%cause, sends = envelopes.len(), "the queue cannot take sends made outside a run; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            why => {
                tracing::error!(%why, sends = envelopes.len(), "sends made outside a run could not be queued and are lost");
                hub.capacity.release(&hub.tally(&envelopes));
                hub.abandoned.fetch_add(envelopes.len(), Ordering::AcqRel);
                return;
            }
        }
    }
}
