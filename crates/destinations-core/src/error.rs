//! Why a send was refused.

use crate::payload::InvalidPayload;
use crate::queue::QueueError;

/// A send was refused; nothing was recorded.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No destination instance has this name.
    #[error("unknown destination `{name}`; configured: {known}")]
    UnknownDestination {
        /// The name asked for.
        name: String,
        /// The configured instance names.
        known: String,
    },
    /// A typed send went to an instance of another kind.
    #[error("destination `{instance}` is of kind `{actual}`, not `{expected}`")]
    WrongKind {
        /// The instance.
        instance: String,
        /// The kind of the typed send.
        expected: &'static str,
        /// The instance's kind.
        actual: &'static str,
    },
    /// The payload does not fit the destination.
    #[error("send to `{destination}` refused: {error}")]
    Invalid {
        /// The instance.
        destination: String,
        /// What is wrong, and where.
        #[source]
        error: InvalidPayload,
    },
    /// The payload is larger than the instance accepts.
    #[error(
        "send to `{destination}` refused: the payload is {size} bytes, over the limit of {limit} \
         (raise max_payload_bytes for this destination to allow it)"
    )]
    TooLarge {
        /// The instance.
        destination: String,
        /// The payload's size.
        size: usize,
        /// The instance's limit.
        limit: usize,
    },
    /// The queue refused: no room, unavailable, or closed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The hub is shutting down and takes no more sends.
    #[error("the hub is shutting down and takes no more sends")]
    ShuttingDown,
    /// The run holds as much as the whole queue could: it could never be finished.
    #[error(
        "run `{run}` already holds {held} sends ({bytes} bytes), as much as the whole queue can hold \
         (hub.queue.max_events / max_bytes); finish it and send the rest in another run"
    )]
    RunTooLarge {
        /// The run.
        run: String,
        /// The sends it holds.
        held: usize,
        /// Their payload bytes.
        bytes: usize,
    },
    /// The run was already finished or discarded.
    #[error("run `{run}` is already finished; begin a new run to send more")]
    RunFinished {
        /// The run.
        run: String,
    },
    /// The typed request could not be serialized.
    #[error("send to `{destination}` refused: the payload could not be serialized: {message}")]
    Serialize {
        /// The instance.
        destination: String,
        /// The serializer's message.
        message: String,
    },
}

impl SendError {
    /// A short machine-readable code (`invalid_payload`, `queue_full`, ...), used by the API.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownDestination { .. } => "unknown_destination",
            Self::WrongKind { .. } => "wrong_kind",
            Self::Invalid { .. } | Self::Serialize { .. } => "invalid_payload",
            Self::TooLarge { .. } => "payload_too_large",
            Self::Queue(QueueError::Closed) | Self::ShuttingDown => "shutting_down",
            Self::Queue(QueueError::Full(_)) => "queue_full",
            Self::Queue(QueueError::Unavailable(_)) => "queue_unavailable",
            Self::Queue(QueueError::NoConsumer(_)) => "no_consumer",
            Self::Queue(QueueError::InvalidCursor(_)) => "invalid_query",
            Self::RunFinished { .. } => "run_finished",
            Self::RunTooLarge { .. } => "run_too_large",
        }
    }
}
