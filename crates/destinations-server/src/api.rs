//! The HTTP API: runs and sends in, status, dead letters, health and metrics out.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use destinations::{DeadLetterSummary, EventId, Hub, parse_strict};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::error::ApiError;

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) hub: Hub,
    pub(crate) prometheus: Option<PrometheusHandle>,
    pub(crate) api_token: Option<String>,
}

type Shared = State<Arc<AppState>>;

/// The longest `?wait=` a status request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The API; `guarded` (the subscriptions API of the emit destination) sits behind the same
/// token.
pub(crate) fn router(state: Arc<AppState>, max_request_bytes: usize, guarded: Router) -> Router {
    let guarded = if guarded.has_routes() {
        guarded.route_layer(middleware::from_fn_with_state(state.clone(), require_token))
    } else {
        guarded
    };
    let api = Router::new()
        .route("/v1/runs", post(post_run))
        .route("/v1/send/{destination}", post(post_send))
        .route("/v1/events/{id}", get(get_event))
        .route("/v1/destinations", get(get_destinations))
        .route("/v1/dead-letters", get(get_dead_letters))
        .route("/v1/dead-letters/replay", post(post_replay))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such endpoint; see README.md for the API") })
        .with_state(state)
        .merge(guarded)
        .layer(DefaultBodyLimit::max(max_request_bytes))
}

async fn require_token(State(state): Shared, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.api_token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this server requires `Authorization: Bearer <api_token>`",
            )
            .into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body, or a JSON error: 413 past the size limit.
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is over the server's max_request_bytes",
            )
        } else {
            ApiError::new(rejection.status(), "bad_request", rejection.body_text())
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    #[serde(default)]
    run_id: Option<String>,
    sends: Vec<RunSend>,
    /// The run failed: its sends follow `hub.on_run_error` (discarded by default).
    #[serde(default)]
    failed: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSend {
    destination: String,
    payload: Box<RawValue>,
}

/// `POST /v1/runs`: validate every send, then enqueue all or none.
async fn post_run(
    State(state): Shared,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(raw)?;
    let request: RunRequest = parse_strict(&raw).map_err(|e| ApiError::invalid(&e))?;
    let run_id = request
        .run_id
        .unwrap_or_else(|| format!("run-{}", EventId::new()));
    let run = state.hub.begin_run(run_id.clone());
    for (index, send) in request.sends.iter().enumerate() {
        let payload = Bytes::copy_from_slice(send.payload.get().as_bytes());
        run.send()
            .json(&send.destination, payload)
            .map_err(|e| ApiError::from_send(e, &format!("sends[{index}].payload")))?;
    }
    let ids = if request.failed {
        run.fail().await
    } else {
        run.finish().await
    }
    .map_err(|e| ApiError::from_send(e, "sends"))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"run_id": run_id, "ids": ids})),
    )
        .into_response())
}

/// `POST /v1/send/{destination}`: one send outside any run.
async fn post_send(
    State(state): Shared,
    Path(destination): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(raw)?;
    let id = state
        .hub
        .sender()
        .json(&destination, raw)
        .map_err(|e| ApiError::from_send(e, ""))?;
    Ok((StatusCode::ACCEPTED, Json(json!({"id": id}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Wait up to this long for the send to be delivered or dead (`"10s"`).
    wait: Option<String>,
}

/// `GET /v1/events/{id}[?wait=10s]`.
async fn get_event(
    State(state): Shared,
    Path(id): Path<String>,
    Query(query): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    let id: EventId = id
        .parse()
        .map_err(|e: destinations::envelope::InvalidEventId| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", e.to_string())
        })?;
    let status = match query.wait {
        Some(wait) => {
            let wait = humantime::parse_duration(&wait).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_wait",
                    format!("`wait={wait}`: {e}; write e.g. 10s"),
                )
            })?;
            state.hub.wait_final(id, wait.min(MAX_WAIT)).await
        }
        None => state.hub.status(id),
    };
    let status = status.ok_or_else(|| {
        ApiError::not_found(format!(
            "no send with id {id}: unknown, not yet released by its run, or finished long enough ago to be forgotten (hub.status_retention)"
        ))
    })?;
    Ok(Json(status).into_response())
}

async fn get_destinations(State(state): Shared) -> Response {
    let list: Vec<_> = state
        .hub
        .destinations()
        .into_iter()
        .map(|(name, kind)| json!({"name": name, "kind": kind}))
        .collect();
    Json(json!({ "destinations": list })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn get_dead_letters(State(state): Shared, Query(query): Query<LimitQuery>) -> Response {
    let letters: Vec<DeadLetterSummary> = state
        .hub
        .dead_letters(query.limit.unwrap_or(100))
        .iter()
        .map(DeadLetterSummary::from)
        .collect();
    Json(json!({"dead_letters": letters, "evicted": state.hub.dead_letters_evicted()}))
        .into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default)]
    ids: Option<Vec<EventId>>,
}

async fn post_replay(
    State(state): Shared,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(raw)?;
    let request: ReplayRequest = if raw.is_empty() {
        ReplayRequest::default()
    } else {
        parse_strict(&raw).map_err(|e| ApiError::invalid(&e))?
    };
    let replayed = state
        .hub
        .replay_dead_letters(request.ids.as_deref())
        .map_err(|e| ApiError::from_send(e, ""))?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "replayed": replayed }))).into_response())
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Ready when every destination can reach its target.
async fn readyz(State(state): Shared) -> Response {
    let checks = tokio::time::timeout(Duration::from_secs(10), state.hub.health()).await;
    let Ok(checks) = checks else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "health checks timed out",
        )
        .into_response();
    };
    let ready = checks.iter().all(|(_, r)| r.is_ok());
    let destinations: serde_json::Map<String, serde_json::Value> = checks
        .into_iter()
        .map(|(name, result)| {
            let value = match result {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            };
            (name, value)
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"ready": ready, "destinations": destinations})),
    )
        .into_response()
}

async fn metrics(State(state): Shared) -> Response {
    destinations::metrics::record_queue_depth(state.hub.queue_depth());
    let text = state
        .prometheus
        .as_ref()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
