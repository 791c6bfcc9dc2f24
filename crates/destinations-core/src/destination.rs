//! The trait a destination implements, and what it answers for each envelope.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::payload::InvalidPayload;
use crate::policy::{BatchPolicy, PausePolicy, RateLimit};

/// A place sends are delivered to: an HTTP endpoint, an object store, a mailbox...
///
/// Kept small on purpose: validate a payload at send time, say how to batch, deliver a batch.
/// Retries, concurrency, dead letters and status are the hub's job.
///
/// `Any` lets a program (the server) find the instances of a concrete destination type in a
/// hub — to mount the SSE destination's HTTP routes, for one — see
/// [`Hub::instances_of`](crate::Hub::instances_of).
#[async_trait]
pub trait Destination: Any + Send + Sync {
    /// The kind this destination is (`http`, `s3`, ...), as registered.
    fn kind(&self) -> &'static str;

    /// Check one payload at send time. Strict: unknown fields are an error.
    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload>;

    /// The checks that depend on this instance's configuration — an allow-list of buckets or
    /// recipients — for a payload whose shape a typed sender has already checked (see
    /// [`Sender::checked`](crate::Sender::checked)). `validate` must make them too. Default:
    /// none.
    fn validate_for_instance(&self, _payload: &[u8]) -> Result<(), InvalidPayload> {
        Ok(())
    }

    /// How this destination wants its envelopes grouped. Default: one per send, at once.
    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::one_per_send()
    }

    /// Which open batch a payload joins. Payloads of different groups never share a batch, and
    /// each group fills and ages on its own (the S3 destination groups by bucket and prefix,
    /// since one object lands in one place). Default: every payload in one group.
    fn batch_group(&self, _payload: &[u8]) -> Option<String> {
        None
    }

    /// The most batches this destination takes at once, whatever the instance's
    /// `concurrency` says; `Some(1)` delivers strictly in order (the SSE destination publishes a
    /// stream's events in the order they were sent). Default: no limit of its own.
    fn max_concurrency(&self) -> Option<usize> {
        None
    }

    /// Which target a payload goes to (the HTTP destination names `host:port`), for
    /// [`per_target_concurrency`](Self::per_target_concurrency). A batch waiting for a busy
    /// target holds no delivery slot of the instance, so one slow target never holds up the
    /// others. Batches take the target of their first payload (a destination that names
    /// targets should batch within one). Default: none (one target for everything).
    fn target(&self, _payload: &[u8]) -> Option<String> {
        None
    }

    /// The most batches delivered to one [`target`](Self::target) at once. Default: no limit
    /// of its own.
    fn per_target_concurrency(&self) -> Option<usize> {
        None
    }

    /// The most attempts per second to one [`target`](Self::target), spaced rather than
    /// failed (the HTTP destination's `per_host_rate_limit`). Default: none.
    fn per_target_rate_limit(&self) -> Option<RateLimit> {
        None
    }

    /// Whether this instance keeps its sends in order: the sends of one
    /// [`sequence`](Self::sequence) go one attempt at a time, in the order they were
    /// accepted, a send waiting for its retry holding the ones behind it, while other
    /// sequences go on (the HTTP destination's `ordering`). Default: false.
    fn ordered(&self) -> bool {
        false
    }

    /// Of an [`ordered`](Self::ordered) instance: the sequence a payload keeps its place in,
    /// or `None` for a payload that keeps no order. Batches take the sequence of their first
    /// payload (a destination that orders should batch within one). Default: its
    /// [`target`](Self::target) — each target gets its sends in order.
    fn sequence(&self, payload: &[u8]) -> Option<String> {
        Some(self.target(payload).unwrap_or_default())
    }

    /// Whether the attempts at once to one [`target`](Self::target) adapt to how it answers
    /// (grow while it answers as fast as usual, shrink when it slows down or pushes back),
    /// up to [`per_target_concurrency`](Self::per_target_concurrency). Default: false (the
    /// fixed limit).
    fn adaptive_concurrency(&self) -> bool {
        false
    }

    /// When a failing [`target`](Self::target) is paused: nothing more is attempted to it
    /// for a while (its sends stay queued and cost no attempt), then one probe decides.
    /// Default: never paused.
    fn pause_policy(&self) -> Option<PausePolicy> {
        None
    }

    /// Hide the secrets a stored payload carries (credentials, header values, secret parts of
    /// a URL) before it is shown: in dead-letter listings and `$errors` events. Redaction is
    /// for display only; replay uses the stored payload. Default: nothing to hide.
    fn redact(&self, _payload: &mut serde_json::Value) {}

    /// Deliver one batch and say, per envelope, what happened.
    async fn deliver(&self, batch: &Batch) -> BatchOutcome;

    /// Called once when the hub that holds this instance is built: a destination that sends
    /// into its hub (the emit destination fans an event out to its listeners as sends of their
    /// own) keeps a [`WeakHub`](crate::hub::WeakHub) here. Default: nothing.
    fn attach(&self, _hub: &crate::Hub) {}

    /// Can the target be reached at all? Used at startup and by `/readyz`.
    async fn health(&self) -> Result<(), HealthError> {
        Ok(())
    }

    /// The JSON Schema of what this instance takes, for the server's API document (see
    /// [`SendType::schema`](crate::SendType::schema)). Default: none (any object).
    fn send_schema(&self) -> Option<crate::typed::SendSchema> {
        None
    }
}

/// Envelopes handed to a destination together.
#[derive(Clone, Debug)]
pub struct Batch {
    envelopes: Vec<Envelope>,
}

impl Batch {
    /// A batch of these envelopes, in this order.
    pub fn new(envelopes: Vec<Envelope>) -> Self {
        Self { envelopes }
    }

    /// The envelopes, in order.
    pub fn envelopes(&self) -> &[Envelope] {
        &self.envelopes
    }

    /// How many envelopes the batch holds.
    pub fn len(&self) -> usize {
        self.envelopes.len()
    }

    /// Whether the batch holds no envelope.
    pub fn is_empty(&self) -> bool {
        self.envelopes.is_empty()
    }

    /// The payload bytes of the whole batch.
    pub fn size(&self) -> usize {
        self.envelopes.iter().map(Envelope::size).sum()
    }

    /// The envelopes, taken out.
    pub fn into_envelopes(self) -> Vec<Envelope> {
        self.envelopes
    }
}

/// What happened to one envelope in a delivery attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The target accepted it.
    Delivered,
    /// A transient failure: try again, no sooner than `after` if the target said so.
    Retry {
        /// What went wrong.
        error: String,
        /// The target's own wait (`Retry-After`), if it gave one.
        after: Option<Duration>,
    },
    /// A permanent failure: dead-letter it now.
    Failed {
        /// What went wrong.
        error: String,
    },
}

/// The outcome of one envelope, with what the target answered if it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// What happened.
    pub outcome: Outcome,
    /// The target's answer, kept in the send's status: shared by every send it answers for
    /// (one object holds thousands of sends).
    pub response: Option<Arc<ResponseSummary>>,
}

impl Report {
    /// Delivered.
    pub fn delivered() -> Self {
        Outcome::Delivered.into()
    }

    /// A transient failure.
    pub fn retry(error: impl Into<String>) -> Self {
        Outcome::Retry {
            error: error.into(),
            after: None,
        }
        .into()
    }

    /// A transient failure with the target's own wait.
    pub fn retry_after(error: impl Into<String>, after: Option<Duration>) -> Self {
        Outcome::Retry {
            error: error.into(),
            after,
        }
        .into()
    }

    /// A permanent failure.
    pub fn failed(error: impl Into<String>) -> Self {
        Outcome::Failed {
            error: error.into(),
        }
        .into()
    }

    /// The same report, with the target's answer attached.
    pub fn with_response(mut self, response: ResponseSummary) -> Self {
        self.response = Some(Arc::new(response));
        self
    }
}

impl From<Outcome> for Report {
    fn from(outcome: Outcome) -> Self {
        Self {
            outcome,
            response: None,
        }
    }
}

/// What a target answered, kept short.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResponseSummary {
    /// A protocol status code (HTTP status, SMTP reply code), if there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// How long the attempt took.
    pub elapsed_ms: u64,
    /// The start of an error body (at most 4 KiB), for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_excerpt: Option<String>,
    /// Where the target put it, when that is worth knowing: an object's key, a message id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// The outcome of a whole batch.
#[derive(Clone, Debug)]
pub enum BatchOutcome {
    /// One report for every envelope (an object-store write succeeds or fails as a whole).
    All(Report),
    /// One report per envelope, in the batch's order.
    Each(Vec<Report>),
}

impl BatchOutcome {
    /// The longest wait the target asked for (`Retry-After`) in any report.
    pub fn retry_after(&self) -> Option<Duration> {
        let after = |report: &Report| match &report.outcome {
            Outcome::Retry { after, .. } => *after,
            _ => None,
        };
        match self {
            Self::All(report) => after(report),
            Self::Each(reports) => reports.iter().filter_map(after).max(),
        }
    }

    /// One report per envelope of a batch of `len`, filling a missing one with a retry so that a
    /// destination that answers for too few envelopes cannot lose the rest.
    pub fn into_reports(self, len: usize) -> Vec<Report> {
        match self {
            Self::All(report) => vec![report; len],
            Self::Each(mut reports) => {
                reports.truncate(len);
                while reports.len() < len {
                    reports.push(Report::retry(
                        "the destination gave no outcome for this send",
                    ));
                }
                reports
            }
        }
    }
}

/// The destination cannot reach its target.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HealthError(pub String);
