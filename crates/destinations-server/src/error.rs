//! API errors as `{"error": {"code", "message"}}` with the right status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use destinations::{InvalidPayload, QueueError, SendError};

/// An API error.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The path of the field at fault (`sends[3].payload.url`), when one is.
    field: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// Naming the field at fault (none for an empty path: the whole body).
    fn at(mut self, field: &str) -> Self {
        self.field = (!field.is_empty()).then(|| field.to_owned());
        self
    }

    pub(crate) fn invalid(error: &InvalidPayload) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_payload",
            error.to_string(),
        )
        .at(&error.field)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A send error, with the path of the send in the request prefixed to the field
    /// (`sends[3].payload`).
    pub(crate) fn from_send(error: SendError, field_prefix: &str) -> Self {
        let status = match &error {
            SendError::Invalid { .. }
            | SendError::Serialize { .. }
            | SendError::WrongKind { .. } => StatusCode::BAD_REQUEST,
            SendError::UnknownDestination { .. } => StatusCode::NOT_FOUND,
            SendError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            SendError::Queue(QueueError::NoConsumer(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            SendError::Queue(QueueError::InvalidCursor(_)) => StatusCode::BAD_REQUEST,
            SendError::Queue(_) | SendError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            SendError::RunFinished { .. } => StatusCode::CONFLICT,
            SendError::RunTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        };
        let code = error.code();
        let (message, field) = match error {
            SendError::Invalid { destination, error } => {
                let error = error.within(field_prefix);
                let field = error.field.clone();
                (format!("send to `{destination}` refused: {error}"), field)
            }
            other => (other.to_string(), field_prefix.to_owned()),
        };
        Self::new(status, code, message).at(&field)
    }
}

impl ApiError {
    /// A send of a run was refused: the error names it by its index (`sends[3]`), whatever
    /// was wrong with it.
    pub(crate) fn in_run(error: SendError, index: usize) -> Self {
        let field = match &error {
            SendError::UnknownDestination { .. } | SendError::WrongKind { .. } => {
                format!("sends[{index}].destination")
            }
            _ => format!("sends[{index}].payload"),
        };
        let named = matches!(error, SendError::Invalid { .. });
        let mut refused = Self::from_send(error, &field);
        if !named {
            refused.message = format!("`{field}`: {}", refused.message);
        }
        refused
    }
}

/// Every error the server answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable, for programs (`invalid_payload`, `queue_full`).
    code: String,
    /// For people: what is wrong and what to do, naming the field.
    message: String,
    /// The path of the field at fault, when one is: `sends[3].payload.url`, `ids[0]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

impl ErrorBody {
    pub(crate) fn new(code: &str, message: impl Into<String>, field: Option<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                field,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody::new(self.code, self.message, self.field));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Full, unavailable or stopping: worth trying again shortly.
            return (self.status, [(axum::http::header::RETRY_AFTER, "1")], body).into_response();
        }
        (self.status, body).into_response()
    }
}
