//! Runs and senders: recording sends without waiting on the network.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use serde::Serialize;

use crate::config::OnRunError;
use crate::envelope::{Envelope, EventId};
use crate::error::SendError;
use crate::hub::{HubShared, Instance};
use crate::payload::InvalidPayload;

/// Records sends. Inside a run they are held until the run finishes; outside one they are
/// released at once. Either way the caller never waits on the network.
///
/// Destination crates add typed methods through extension traits (`SendHttp::http`, ...).
#[derive(Clone)]
pub struct Sender {
    hub: Arc<HubShared>,
    run: Option<Arc<RunBuffer>>,
    /// Sends made by a destination while it delivers (emit fan-out): still taken while the
    /// hub drains at shutdown.
    internal: bool,
    /// The run sends outside a run buffer are made in, if any.
    detached_run: Option<Arc<str>>,
}

struct RunBuffer {
    id: Arc<str>,
    /// `None` once the run is finished or discarded.
    held: Mutex<Option<Vec<Envelope>>>,
    /// The payload bytes held.
    bytes: std::sync::atomic::AtomicUsize,
}

impl Sender {
    pub(crate) fn detached(hub: Arc<HubShared>, internal: bool) -> Self {
        Self {
            hub,
            run: None,
            internal,
            detached_run: None,
        }
    }

    /// Sends released at once, as [`detached`](Self::detached) ones, but in run `run`.
    pub(crate) fn detached_in(hub: Arc<HubShared>, internal: bool, run: Arc<str>) -> Self {
        Self {
            detached_run: Some(run),
            ..Self::detached(hub, internal)
        }
    }

    /// Send any serializable payload to instance `destination`; the destination checks it.
    pub fn to<T: Serialize + ?Sized>(
        &self,
        destination: &str,
        payload: &T,
    ) -> Result<EventId, SendError> {
        let bytes = serialize(destination, payload)?;
        self.json(destination, bytes)
    }

    /// Send a JSON payload to instance `destination`; the destination checks it.
    pub fn json(&self, destination: &str, payload: Bytes) -> Result<EventId, SendError> {
        let instance = self.validated(destination, &payload)?;
        self.admit(instance, payload)
    }

    /// Send a JSON payload to instance `destination` outside any run, and resolve once it is in
    /// the queue (durable, for a durable queue), waiting up to `hub.queue.wait` for room.
    pub async fn json_now(&self, destination: &str, payload: Bytes) -> Result<EventId, SendError> {
        let instance = self.validated(destination, &payload)?;
        let envelope = Envelope::new(instance.name.clone(), None, payload);
        let id = envelope.id;
        self.hub
            .release(vec![envelope], self.internal)
            .await
            .map_err(|(error, _)| error)?;
        Ok(id)
    }

    /// The instance, once the payload passed its size limit and its checks.
    fn validated(&self, destination: &str, payload: &[u8]) -> Result<&Instance, SendError> {
        let instance = self.hub.instance(destination)?;
        self.check_size(instance, payload)?;
        if let Err(error) = instance.destination.validate(payload) {
            instance.metrics.rejected_invalid.increment(1);
            return Err(SendError::Invalid {
                destination: destination.to_owned(),
                error,
            });
        }
        Ok(instance)
    }

    /// Send a payload a typed request already checked and serialized, to an instance of
    /// `kind`. Destination crates' extension traits use this so that nothing is parsed twice;
    /// only the instance's own rules
    /// ([`validate_for_instance`](crate::Destination::validate_for_instance)) are checked.
    pub fn checked(
        &self,
        destination: &str,
        kind: &'static str,
        payload: Bytes,
    ) -> Result<EventId, SendError> {
        let instance = self.hub.instance(destination)?;
        if instance.kind != kind {
            return Err(SendError::WrongKind {
                instance: destination.to_owned(),
                expected: kind,
                actual: instance.kind,
            });
        }
        self.check_size(instance, &payload)?;
        if let Err(error) = instance.destination.validate_for_instance(&payload) {
            instance.metrics.rejected_invalid.increment(1);
            return Err(SendError::Invalid {
                destination: destination.to_owned(),
                error,
            });
        }
        self.admit(instance, payload)
    }

    /// Send a typed request its destination crate defines: `check` it (the rules that need no
    /// instance), serialize it once, and hand it to [`checked`](Self::checked). Destination
    /// crates' extension traits (`SendHttp`, `SendS3`, ...) are this one call.
    pub fn typed<T: Serialize>(
        &self,
        destination: &str,
        kind: &'static str,
        request: &T,
        check: impl FnOnce(&T) -> Result<(), InvalidPayload>,
    ) -> Result<EventId, SendError> {
        check(request).map_err(|error| SendError::Invalid {
            destination: destination.to_owned(),
            error,
        })?;
        let bytes = serialize(destination, request)?;
        self.checked(destination, kind, bytes)
    }

    /// Record a send of a [`SendType`](crate::typed::SendType) to the instance named after its
    /// kind (`send.record(&DemoSend::new(...))`): checked, serialized once, and the instance's
    /// own checks made.
    pub fn record<S: crate::typed::SendType>(&self, send: &S) -> Result<EventId, SendError> {
        self.record_to(S::KIND, send)
    }

    /// Record a send of a [`SendType`](crate::typed::SendType) to instance `destination`, which
    /// must be of the send's kind.
    pub fn record_to<S: crate::typed::SendType>(
        &self,
        destination: &str,
        send: &S,
    ) -> Result<EventId, SendError> {
        self.typed(destination, S::KIND, send, S::check)
    }

    /// The run this sender records into, if any.
    pub fn run_id(&self) -> Option<&str> {
        self.run.as_ref().map(|r| &*r.id)
    }

    fn check_size(&self, instance: &Instance, payload: &[u8]) -> Result<(), SendError> {
        if payload.len() > instance.max_payload_bytes {
            instance.metrics.rejected_invalid.increment(1);
            return Err(SendError::TooLarge {
                destination: instance.name.to_string(),
                size: payload.len(),
                limit: instance.max_payload_bytes,
            });
        }
        Ok(())
    }

    fn admit(&self, instance: &Instance, payload: Bytes) -> Result<EventId, SendError> {
        match &self.run {
            None => {
                let envelope =
                    Envelope::new(instance.name.clone(), self.detached_run.clone(), payload);
                let id = envelope.id;
                self.hub.release_detached(envelope, self.internal)?;
                Ok(id)
            }
            Some(run) => {
                let envelope = Envelope::new(instance.name.clone(), Some(run.id.clone()), payload);
                let id = envelope.id;
                let mut held = run.held.lock().unwrap_or_else(PoisonError::into_inner);
                let held = held.as_mut().ok_or_else(|| SendError::RunFinished {
                    run: run.id.to_string(),
                })?;
                // A run is released whole: one larger than the queue could ever take would be
                // held in memory, outside every bound, and then refused (review C6).
                let bounds = &self.hub.config.queue.bounds;
                let bytes = run.bytes.load(std::sync::atomic::Ordering::Relaxed);
                if held.len() >= bounds.max_events || bytes + envelope.size() > bounds.max_bytes {
                    return Err(SendError::RunTooLarge {
                        run: run.id.to_string(),
                        held: held.len(),
                        bytes,
                    });
                }
                run.bytes
                    .fetch_add(envelope.size(), std::sync::atomic::Ordering::Relaxed);
                held.push(envelope);
                Ok(id)
            }
        }
    }
}

thread_local! {
    /// Where sends are serialized before their bytes are copied out exactly: one allocation of
    /// the right size per send, no growing and no spare capacity held while it is pending.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest scratch buffer kept between sends.
const SCRATCH_KEEP: usize = 64 * 1024;

fn serialize<T: Serialize + ?Sized>(destination: &str, value: &T) -> Result<Bytes, SendError> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        let written = serde_json::to_writer(&mut *scratch, value);
        let bytes = written.map(|()| Bytes::copy_from_slice(&scratch));
        if scratch.capacity() > SCRATCH_KEEP {
            *scratch = Vec::new();
        }
        bytes.map_err(|e| SendError::Serialize {
            destination: destination.to_owned(),
            message: e.to_string(),
        })
    })
}

/// One execution of a workflow, job or request handler. Its sends are held, and released
/// together when it finishes; a run that is dropped unfinished sends nothing.
pub struct Run {
    sender: Sender,
}

impl Run {
    pub(crate) fn begin(hub: Arc<HubShared>, id: String, internal: bool) -> Self {
        let buffer = Arc::new(RunBuffer {
            id: id.into(),
            held: Mutex::new(Some(Vec::new())),
            bytes: std::sync::atomic::AtomicUsize::new(0),
        });
        Self {
            sender: Sender {
                hub,
                run: Some(buffer),
                internal,
                detached_run: None,
            },
        }
    }

    fn buffer(&self) -> &RunBuffer {
        // A run's sender always has its buffer; see `begin`.
        self.sender
            .run
            .as_deref()
            .unwrap_or_else(|| unreachable!("a run's sender has a buffer"))
    }

    /// The run's id.
    pub fn id(&self) -> &str {
        &self.buffer().id
    }

    /// The sender that records into this run.
    pub fn send(&self) -> &Sender {
        &self.sender
    }

    /// How many sends the run holds.
    pub fn held(&self) -> usize {
        self.buffer()
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, Vec::len)
    }

    fn take(&self) -> Vec<Envelope> {
        self.buffer()
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default()
    }

    /// Hold these sends again (a refused finish).
    fn put_back(&self, envelopes: Vec<Envelope>) {
        *self
            .buffer()
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(envelopes);
    }

    /// The run succeeded: release every send it recorded, atomically. Resolves once they are
    /// in the queue (durable, for a durable queue), waiting up to `hub.queue.wait` for room;
    /// returns their ids. If the queue refuses them, none is queued and the error gives the
    /// run back, its sends still held, so that `finish` can be tried again.
    pub async fn finish(self) -> Result<Vec<EventId>, FinishError> {
        let envelopes = self.take();
        let ids = envelopes.iter().map(|e| e.id).collect();
        match self
            .sender
            .hub
            .release(envelopes, self.sender.internal)
            .await
        {
            Ok(()) => Ok(ids),
            Err((error, envelopes)) => {
                self.put_back(envelopes);
                Err(FinishError { error, run: self })
            }
        }
    }

    /// The run failed: its sends are discarded or delivered, as `on_run_error` says. Returns
    /// the ids released (none when discarded).
    pub async fn fail(self) -> Result<Vec<EventId>, FinishError> {
        match self.sender.hub.config.on_run_error {
            OnRunError::Deliver => self.finish().await,
            OnRunError::Discard => {
                let discarded = self.take().len();
                tracing::debug!(
                    run = self.id(),
                    discarded,
                    "run failed: its sends were discarded"
                );
                Ok(Vec::new())
            }
        }
    }

    /// Drop every send the run recorded. Returns how many.
    pub fn discard(self) -> usize {
        self.take().len()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let discarded = self.take().len();
        if discarded > 0 {
            tracing::debug!(
                run = self.id(),
                discarded,
                "run dropped without finish: its sends were discarded"
            );
        }
    }
}

/// A run whose sends the queue refused: why, and the run itself, its sends still held, to
/// [`finish`](Run::finish) again later or to [`discard`](Run::discard).
pub struct FinishError {
    /// Why the sends were refused.
    pub error: SendError,
    run: Run,
}

impl FinishError {
    /// The run, with every send it recorded.
    pub fn into_run(self) -> Run {
        self.run
    }
}

impl std::fmt::Debug for FinishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FinishError")
            .field("error", &self.error)
            .field("run", &self.run.id())
            .field("held", &self.run.held())
            .finish()
    }
}

impl std::fmt::Display for FinishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for FinishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl From<FinishError> for SendError {
    fn from(refused: FinishError) -> Self {
        refused.error
    }
}
