//! The emit API: `POST|DELETE|GET /v1/subscriptions` and `GET /v1/emitters/{id}/events`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use crate::destination::EmitDestination;
use crate::subscriptions::Subscription;

pub(crate) fn router(emit: Arc<EmitDestination>) -> Router {
    Router::new()
        .route(
            "/v1/subscriptions",
            get(list).post(subscribe).delete(unsubscribe),
        )
        .route("/v1/emitters/{id}/events", get(history))
        .with_state(emit)
}

/// The subscription of a request: from the query (as the reference platform takes it, even on
/// POST) or, when the query names no listener, from a JSON body.
#[derive(Deserialize)]
struct SubscriptionQuery {
    emitter_id: Option<String>,
    listener_id: Option<String>,
    event_name: Option<String>,
}

/// A valid subscription taken from a request, or the 400 that says what is wrong.
struct RequestedSubscription(Subscription);

impl<S: Send + Sync> axum::extract::FromRequest<S> for RequestedSubscription {
    type Rejection = Response;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Response> {
        let invalid =
            |message: String| refuse(StatusCode::BAD_REQUEST, "invalid_subscription", &message);
        let Query(query) = Query::<SubscriptionQuery>::try_from_uri(request.uri())
            .map_err(|e| invalid(e.body_text()))?;
        let body = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        subscription(query, &body).map(Self).map_err(invalid)
    }
}

fn subscription(query: SubscriptionQuery, body: &Bytes) -> Result<Subscription, String> {
    let subscription =
        if query.listener_id.is_some() || query.emitter_id.is_some() || body.is_empty() {
            let missing =
                |field: &str| format!("`{field}` is required (query parameter or JSON body)");
            Subscription {
                emitter_id: query.emitter_id.ok_or_else(|| missing("emitter_id"))?,
                listener_id: query.listener_id.ok_or_else(|| missing("listener_id"))?,
                event_name: query.event_name.filter(|n| !n.is_empty()),
            }
        } else {
            destinations_core::parse_strict::<Subscription>(body).map_err(|e| e.to_string())?
        };
    subscription.check().map_err(|e| e.to_string())?;
    Ok(subscription)
}

async fn subscribe(
    State(emit): State<Arc<EmitDestination>>,
    RequestedSubscription(subscription): RequestedSubscription,
) -> Response {
    match emit.subscribe_everywhere(subscription.clone()).await {
        Ok(created) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (
                status,
                axum::Json(json!({"subscription": subscription, "created": created})),
            )
                .into_response()
        }
        Err(error) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "not_saved", &error),
    }
}

async fn unsubscribe(
    State(emit): State<Arc<EmitDestination>>,
    RequestedSubscription(subscription): RequestedSubscription,
) -> Response {
    match emit.unsubscribe_everywhere(&subscription).await {
        Ok(true) => axum::Json(json!({"deleted": subscription})).into_response(),
        Ok(false) => refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such subscription (pass the same emitter_id, listener_id and event_name it was made with)",
        ),
        Err(error) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "not_saved", &error),
    }
}

async fn list(State(emit): State<Arc<EmitDestination>>) -> Response {
    axum::Json(json!({"subscriptions": emit.subscriptions()})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    limit: Option<usize>,
}

async fn history(
    State(emit): State<Arc<EmitDestination>>,
    Path(emitter): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    if let Err(error) = destinations_core::check_name("emitter_id", &emitter) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_emitter",
            &error.to_string(),
        );
    }
    let limit = query.limit.unwrap_or(100);
    axum::Json(json!({"events": emit.history(&emitter, limit)})).into_response()
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}
