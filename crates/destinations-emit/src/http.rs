//! The emit API: `POST|DELETE|GET /v1/subscriptions` and `GET /v1/emitters/{id}/events`,
//! each handler documented for the server's OpenAPI document.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::destination::EmitDestination;
use crate::history::HistoryEntry;
use crate::subscriptions::Subscription;

/// The tag of these operations in the OpenAPI document.
const TAG: &str = "emit";

pub(crate) fn router(emit: Arc<EmitDestination>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list, subscribe, unsubscribe))
        .routes(routes!(history))
        .with_state(emit)
}

/// The subscription of a request: from the query (as the reference platform takes it, even on
/// POST) or, when the query names no listener, from a JSON body.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SubscriptionQuery {
    /// Emitters, as a pattern: `p_orders`, `p_*`, `*`.
    emitter_id: Option<String>,
    /// Where events go: a webhook URL, or an in-process listener's id.
    listener_id: Option<String>,
    /// The channel; empty or absent for the default one.
    event_name: Option<String>,
}

/// A subscription made (`created: false`: it existed).
#[derive(Serialize, utoipa::ToSchema)]
struct Subscribed {
    subscription: Subscription,
    created: bool,
}

/// A subscription removed.
#[derive(Serialize, utoipa::ToSchema)]
struct Unsubscribed {
    deleted: Subscription,
}

/// Every subscription.
#[derive(Serialize, utoipa::ToSchema)]
struct Subscriptions {
    subscriptions: Vec<Subscription>,
}

/// An emitter's last events, newest first.
#[derive(Serialize, utoipa::ToSchema)]
struct History {
    events: Vec<HistoryEntry>,
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

/// Subscribe a listener to emitters' events (from the query, or a JSON body).
#[utoipa::path(post, path = "/v1/subscriptions", tag = TAG,
    params(SubscriptionQuery),
    request_body(content = Option<Subscription>, description = "the subscription, when the query names none"),
    responses(
        (status = 201, description = "subscribed", body = Subscribed),
        (status = 200, description = "it existed", body = Subscribed),
        (status = 400, description = "`invalid_subscription`"),
    ),
    security(("api_token" = [])))]
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
                axum::Json(Subscribed {
                    subscription,
                    created,
                }),
            )
                .into_response()
        }
        Err(error) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "not_saved", &error),
    }
}

/// Remove a subscription (the same three fields it was made with).
#[utoipa::path(delete, path = "/v1/subscriptions", tag = TAG,
    params(SubscriptionQuery),
    request_body(content = Option<Subscription>, description = "the subscription, when the query names none"),
    responses(
        (status = 200, description = "removed", body = Unsubscribed),
        (status = 404, description = "there was none"),
    ),
    security(("api_token" = [])))]
async fn unsubscribe(
    State(emit): State<Arc<EmitDestination>>,
    RequestedSubscription(subscription): RequestedSubscription,
) -> Response {
    match emit.unsubscribe_everywhere(&subscription).await {
        Ok(true) => axum::Json(Unsubscribed {
            deleted: subscription,
        })
        .into_response(),
        Ok(false) => refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such subscription (pass the same emitter_id, listener_id and event_name it was made with)",
        ),
        Err(error) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "not_saved", &error),
    }
}

/// Every subscription.
#[utoipa::path(get, path = "/v1/subscriptions", tag = TAG,
    responses((status = 200, body = Subscriptions)),
    security(("api_token" = [])))]
async fn list(State(emit): State<Arc<EmitDestination>>) -> Response {
    axum::Json(Subscriptions {
        subscriptions: emit.subscriptions(),
    })
    .into_response()
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// At most this many (default 100).
    limit: Option<usize>,
}

/// An emitter's last events, newest first.
#[utoipa::path(get, path = "/v1/emitters/{id}/events", tag = TAG,
    params(("id" = String, Path, description = "the emitter"), HistoryQuery),
    responses(
        (status = 200, body = History),
        (status = 400, description = "`invalid_emitter`"),
    ),
    security(("api_token" = [])))]
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
    axum::Json(History {
        events: emit.history(&emitter, limit),
    })
    .into_response()
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}
