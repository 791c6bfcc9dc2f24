//! Sends a delivery makes (the emit destination's fan-out, `$errors` events) belong to that
//! delivery's settlement: they are queued in the same step that settles it, so a crash cannot
//! keep one without the other.
//!
//! While a dispatcher runs a destination's `deliver` (and the dead-letter observers), a
//! collector sits in a task-local; internal sends of the same hub made in that task land in it
//! instead of going to the queue on their own. A send made outside any run joins the run of
//! the send being delivered: what a delivery causes is part of its run (the `$errors` run
//! marks everything a failure report set off, so it is never reported again).

use std::sync::{Arc, Mutex, PoisonError};

use super::HubShared;
use crate::envelope::Envelope;

tokio::task_local! {
    static COLLECTING: Collector;
}

/// The sends one delivery attempt made.
#[derive(Clone)]
pub(crate) struct Collector {
    /// The hub whose delivery this is (its address: a send into another hub is not ours).
    hub: usize,
    sends: Arc<Mutex<Vec<Envelope>>>,
    /// The run of the send being delivered, given to sends made outside any run.
    lineage: Option<Arc<str>>,
}

impl Collector {
    pub(crate) fn new(hub: &HubShared, lineage: Option<Arc<str>>) -> Self {
        Self {
            hub: std::ptr::from_ref(hub) as usize,
            sends: Arc::default(),
            lineage,
        }
    }

    /// Run `future` with this collector in place.
    pub(crate) async fn scope<F: Future>(&self, future: F) -> F::Output {
        COLLECTING.scope(self.clone(), future).await
    }

    /// Run `f` with this collector in place.
    pub(crate) fn sync_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        COLLECTING.sync_scope(self.clone(), f)
    }

    /// What was collected.
    pub(crate) fn take(&self) -> Vec<Envelope> {
        std::mem::take(&mut *self.sends.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// If a delivery of `hub` is under way in this task, keep `envelopes` for its settlement;
/// otherwise hand them back.
pub(crate) fn capture(hub: &HubShared, envelopes: Vec<Envelope>) -> Result<(), Vec<Envelope>> {
    let mut envelopes = Some(envelopes);
    let _ = COLLECTING.try_with(|collector| {
        if collector.hub == std::ptr::from_ref(hub) as usize
            && let Some(mut envelopes) = envelopes.take()
        {
            if let Some(lineage) = &collector.lineage {
                for envelope in envelopes.iter_mut().filter(|e| e.run.is_none()) {
                    envelope.run = Some(lineage.clone());
                }
            }
            collector
                .sends
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(envelopes);
        }
    });
    match envelopes {
        None => Ok(()),
        Some(envelopes) => Err(envelopes),
    }
}
