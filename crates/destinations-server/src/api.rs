//! The HTTP API: runs and sends in, status, dead letters, health and metrics out.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use destinations::{
    DeadLetterFilter, DeadLetterSummary, EndpointView, EventId, EventPage, Hub, SendStatus,
    parse_strict,
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody};

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) hub: Hub,
    pub(crate) prometheus: Option<PrometheusHandle>,
    pub(crate) api_token: Option<String>,
    /// The last readiness check, shared by `/readyz` callers.
    pub(crate) readiness: Readiness,
    /// Largest request body accepted.
    pub(crate) max_request_bytes: usize,
    /// The OpenAPI document of what this server serves, as JSON (set once the routes are
    /// known).
    pub(crate) openapi: std::sync::OnceLock<Bytes>,
    /// Browsers signed in to the dashboard.
    pub(crate) sessions: crate::dashboard::Sessions,
    /// Set when the server stops: live streams end.
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
}

type Shared = State<Arc<AppState>>;

/// The longest `?wait=` a status request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The most dead letters one listing or replay call takes.
const MAX_DEAD_LETTERS: usize = 1000;

/// The OpenAPI document's frame: what the server is, the API token's scheme, the tags.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "destinations",
        description = "Asynchronous, batched, at-least-once event delivery: runs and sends in; statuses, attempt logs, dead letters and endpoints out. Every error is `{\"error\": {\"code\", \"message\"}}`.",
    ),
    modifiers(&ApiTokenScheme),
    tags(
        (name = "sends", description = "Runs and sends in, their statuses out"),
        (name = "dead letters", description = "Sends given up on: listed and replayed"),
        (name = "endpoints", description = "The hosts this server delivers to: state, rates, pause and resume"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
        (name = "emit", description = "Subscriptions of the emit destination"),
        (name = "sse", description = "Live streams of the SSE destination"),
    )
)]
struct ApiDoc;

/// `Authorization: Bearer <api_token>`, required by the operations that name it when the
/// server has an `api_token`.
struct ApiTokenScheme;

impl utoipa::Modify for ApiTokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_token",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("the server's `api_token`, when one is set"))
                        .build(),
                ),
            );
        openapi.info.version = env!("CARGO_PKG_VERSION").to_owned();
    }
}

/// The API and its OpenAPI document, from the same handlers. `guarded` (the subscriptions API
/// of the emit destination) sits behind the same token; `streams` (SSE) beside it, with their
/// own read tokens. Without `serves_api` (a delivery worker), only the probes, metrics and the
/// endpoints.
pub(crate) fn router(
    state: &Arc<AppState>,
    guarded: OpenApiRouter,
    streams: OpenApiRouter,
    serves_api: bool,
) -> Router {
    let max_request_bytes = state.max_request_bytes;
    let token = || middleware::from_fn_with_state(state.clone(), require_token);
    let guarded = if guarded.get_openapi().paths.paths.is_empty() {
        guarded
    } else {
        guarded.route_layer(token())
    };
    let api = OpenApiRouter::new()
        .routes(routes!(post_run))
        .routes(routes!(post_send))
        .routes(routes!(get_events))
        .routes(routes!(get_event))
        .routes(routes!(get_destinations))
        .routes(routes!(get_dead_letters))
        .routes(routes!(post_replay))
        .routes(routes!(crate::dashboard::live))
        .routes(routes!(openapi_json))
        .route_layer(token());
    // The dashboard: its page and sign-in are open (the page asks for the token).
    let dashboard = OpenApiRouter::new()
        .routes(routes!(crate::dashboard::page))
        .routes(routes!(crate::dashboard::script))
        .routes(routes!(crate::dashboard::style))
        .routes(routes!(
            crate::dashboard::session_state,
            crate::dashboard::sign_in,
            crate::dashboard::sign_out
        ));
    let (api, dashboard, guarded, streams) = if serves_api {
        (api, dashboard, guarded, streams)
    } else {
        (
            OpenApiRouter::new(),
            OpenApiRouter::new(),
            OpenApiRouter::new(),
            OpenApiRouter::new(),
        )
    };
    // What this server delivers to: served by every role that delivers (a worker too).
    let endpoints = OpenApiRouter::new()
        .routes(routes!(get_endpoints))
        .routes(routes!(post_pause_endpoint))
        .routes(routes!(post_resume_endpoint))
        .route_layer(token());
    let (router, document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(api)
        .merge(dashboard)
        .merge(endpoints)
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .fallback(|| async { ApiError::not_found("no such endpoint; see README.md for the API") })
        .with_state(state.clone())
        .merge(guarded)
        .merge(streams)
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .split_for_parts();
    let mut document = serde_json::to_value(&document).unwrap_or_default();
    if serves_api {
        add_send_paths(&mut document, state.hub.send_schemas());
    }
    let json = serde_json::to_vec(&document).unwrap_or_default();
    let _ = state.openapi.set(Bytes::from(json));
    router
}

/// One `POST /v1/send/NAME` per configured instance, taking the schema of its kind's sends
/// (the destination's own type, `HttpRequest` for `http`): the document says what each
/// instance of this server takes, and `/v1/send/{destination}` stays for the rest.
fn add_send_paths(
    document: &mut serde_json::Value,
    instances: Vec<(String, Option<destinations::SendSchema>)>,
) {
    let generic = document["paths"]["/v1/send/{destination}"]["post"].clone();
    if generic.is_null() {
        return;
    }
    for (name, schema) in instances {
        let Some(schema) = schema else { continue };
        let schemas = &mut document["components"]["schemas"];
        for (component, body) in schema.components {
            schemas[component] = body;
        }
        schemas[schema.name.as_str()] = schema.schema;
        let mut operation = generic.clone();
        operation["operationId"] = json!(format!("send_{name}"));
        operation["summary"] = json!(format!("One send to the `{name}` instance"));
        operation["parameters"] = json!([]);
        operation["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": {
                "$ref": format!("#/components/schemas/{}", schema.name)
            }}},
        });
        document["paths"][format!("/v1/send/{name}")] = json!({ "post": operation });
    }
}

/// `GET /openapi.json`: this document, as the server serves it (its SSE routes included), behind
/// the API token like the API it describes (it names every instance).
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "the OpenAPI 3.1 document", content_type = "application/json", body = Object)),
    security(("api_token" = [])))]
async fn openapi_json(State(state): Shared) -> Response {
    let document = state.openapi.get().cloned().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

/// A query string read strictly, refused as JSON (`invalid_query`) naming what is wrong.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(query)| Self(query))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))
    }
}

/// Every error the server answers is JSON, whoever made it: an extractor's plain-text
/// rejection (in a destination's own routes, say) is rewrapped as
/// `{"error": {"code", "message"}}` with a code for its status.
pub(crate) async fn errors_as_json(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_payload",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut rewrapped = (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    // Keep what the handler said besides its body (Retry-After, WWW-Authenticate, CORS).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewrapped.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewrapped
}

/// A route that exists, asked with a method it does not take: said as JSON, like every error.
pub(crate) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not take {method}; see README.md for the API",
            uri.path()
        ),
    )
}

async fn require_token(State(state): Shared, request: Request, next: Next) -> Response {
    if !state.authorized(request.headers()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server requires `Authorization: Bearer <api_token>`",
        )
        .into_response();
    }
    next.run(request).await
}

impl AppState {
    /// Whether a request may use the API: no token is set, or it carries the token, or it
    /// comes from a browser signed in to the dashboard with it.
    pub(crate) fn authorized(&self, headers: &axum::http::HeaderMap) -> bool {
        self.api_token.as_deref().is_none_or(|expected| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(destinations::secret::bearer_token)
                .is_some_and(|given| destinations::secret::tokens_match(given, expected))
                || self.sessions.signed_in(headers)
        })
    }
}

/// Read the body, up to the server's limit; 413 past it.
pub(crate) async fn read_body(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, state.max_request_bytes)
        .await
        .map_err(|error| {
            let causes =
                || std::iter::successors(std::error::Error::source(&error), |e| e.source());
            let too_large = causes().any(|cause| cause.is::<http_body_util::LengthLimitError>());
            if let Some(timed_out) =
                causes().find_map(|cause| cause.downcast_ref::<crate::listener::BodyTimedOut>())
            {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    timed_out.to_string(),
                )
            } else if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is over the server's max_request_bytes",
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("the request body could not be read: {error}"),
                )
            }
        })
}

/// A run: sends released together, all or none.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RunRequest<'a> {
    /// Names the run (its emits' emitter, log lines); one is made when absent.
    #[serde(default)]
    run_id: Option<String>,
    /// Borrowed from the body: each payload is copied once, into its send.
    #[serde(borrow)]
    sends: Vec<RunSend<'a>>,
    /// The run failed: its sends follow `hub.on_run_error` (discarded by default).
    #[serde(default)]
    failed: bool,
}

/// One send of a run.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RunSend<'a> {
    /// The destination instance (`http`, `archive`).
    #[serde(borrow)]
    #[schema(value_type = String)]
    destination: std::borrow::Cow<'a, str>,
    /// What the instance's kind takes (see `POST /v1/send/{destination}`).
    #[serde(borrow)]
    #[schema(value_type = Object)]
    payload: &'a RawValue,
}

/// A run accepted: every send's id, in the order sent.
#[derive(Serialize, utoipa::ToSchema)]
struct RunAccepted {
    run_id: String,
    ids: Vec<EventId>,
}

/// A send accepted.
#[derive(Serialize, utoipa::ToSchema)]
struct SendAccepted {
    id: EventId,
}

/// `POST /v1/runs`: validate every send, then enqueue all or none. A queue with no room for
/// anything refuses before the body is read (after waiting up to `hub.queue.wait` for room).
#[utoipa::path(post, path = "/v1/runs", tag = "sends",
    request_body = RunRequest<'_>,
    responses(
        (status = 202, description = "every send validated and queued", body = RunAccepted),
        (status = 400, description = "`invalid_payload`: the message names the field, `sends[3].payload.url`", body = ErrorBody),
        (status = 404, description = "`unknown_destination`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`, `run_too_large`", body = ErrorBody),
        (status = 503, description = "`queue_full`, `queue_unavailable`, `shutting_down` (with `Retry-After`)", body = ErrorBody),
    ),
    security(("api_token" = [])))]
async fn post_run(State(state): Shared, body: Body) -> Result<Response, ApiError> {
    state
        .hub
        .wait_for_room(None)
        .await
        .map_err(|e| ApiError::from_send(e, ""))?;
    let raw = read_body(&state, body).await?;
    let request: RunRequest<'_> = parse_strict(&raw).map_err(|e| ApiError::invalid(&e))?;
    // A run id names the emitter of its emits, an SSE stream and log lines: a name, not a
    // payload (review C7).
    if let Some(run_id) = &request.run_id {
        destinations::check_name("run_id", run_id).map_err(|e| ApiError::invalid(&e))?;
    }
    let run_id = request
        .run_id
        .unwrap_or_else(|| format!("run-{}", EventId::new()));
    let run = state.hub.begin_run(run_id.clone());
    for (index, send) in request.sends.iter().enumerate() {
        let payload = Bytes::copy_from_slice(send.payload.get().as_bytes());
        run.send()
            .json(&send.destination, payload)
            .map_err(|e| ApiError::in_run(e, index))?;
    }
    let ids = if request.failed {
        run.fail().await
    } else {
        run.finish().await
    }
    .map_err(|refused| ApiError::from_send(refused.error, "sends"))?;
    Ok((StatusCode::ACCEPTED, Json(RunAccepted { run_id, ids })).into_response())
}

/// `POST /v1/send/{destination}`: one send outside any run, answered once it is queued. An
/// instance with no room refuses before the body is read.
#[utoipa::path(post, path = "/v1/send/{destination}", tag = "sends",
    params(("destination" = String, Path, description = "the destination instance")),
    request_body(content = Object, description = "the send, as the instance's kind takes it"),
    responses(
        (status = 202, description = "queued", body = SendAccepted),
        (status = 400, description = "`invalid_payload`, naming the field", body = ErrorBody),
        (status = 404, description = "`unknown_destination`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 503, description = "`queue_full`, `queue_unavailable`, `shutting_down`", body = ErrorBody),
    ),
    security(("api_token" = [])))]
async fn post_send(
    State(state): Shared,
    Path(destination): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    state
        .hub
        .wait_for_room(Some(&destination))
        .await
        .map_err(|e| ApiError::from_send(e, ""))?;
    let raw = read_body(&state, body).await?;
    // Answered once the send is as durable as the queue makes it.
    let id = state
        .hub
        .sender()
        .json_now(&destination, raw)
        .await
        .map_err(|e| ApiError::from_send(e, ""))?;
    Ok((StatusCode::ACCEPTED, Json(SendAccepted { id })).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Wait up to this long (at most 60 s) for the send to be delivered or dead (`10s`).
    wait: Option<String>,
}

/// One send's status, and its payload while the server keeps it (a dead letter's).
#[derive(Serialize, utoipa::ToSchema)]
struct EventDetail {
    #[serde(flatten)]
    status: SendStatus,
    /// The send's payload, for a dead letter (secrets hidden, as in the listing): a
    /// delivered send's payload is not kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    payload: Option<serde_json::Value>,
}

/// `GET /v1/events/{id}[?wait=10s]`: one send's status with every attempt.
#[utoipa::path(get, path = "/v1/events/{id}", tag = "sends",
    params(("id" = EventId, Path, description = "the send's id"), WaitQuery),
    responses(
        (status = 200, description = "the status, with `attempts_log`", body = EventDetail),
        (status = 400, description = "`invalid_id`, `invalid_wait`, `invalid_query`", body = ErrorBody),
        (status = 404, description = "unknown, or forgotten past `hub.status_retention`", body = ErrorBody),
    ),
    security(("api_token" = [])))]
async fn get_event(
    State(state): Shared,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<WaitQuery>,
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
        None => state.hub.status(id).await,
    }
    .map_err(|e| ApiError::from_send(e.into(), ""))?;
    let status = status.ok_or_else(|| {
        ApiError::not_found(format!(
            "no send with id {id}: unknown, not yet released by its run, or finished long enough ago to be forgotten (hub.status_retention)"
        ))
    })?;
    let payload = if status.state == destinations::State::Dead {
        let only = DeadLetterFilter {
            ids: Some(vec![id]),
            ..DeadLetterFilter::default()
        };
        let page = state.hub.dead_letter_page(&only, None, 1).await;
        page.ok()
            .and_then(|page| page.letters.into_iter().next())
            .map(|letter| state.hub.dead_letter_summary(&letter).payload)
    } else {
        None
    };
    Ok(Json(EventDetail { status, payload }).into_response())
}

/// Which sends: by destination, state, run, and a time range on when they were made
/// (RFC 3339).
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// At most this many (1 to 1 000; default 100).
    limit: Option<usize>,
    /// The `next` of the previous page.
    after: Option<String>,
    /// Only sends to this instance.
    destination: Option<String>,
    /// Only sends in this state.
    state: Option<destinations::State>,
    /// Only sends of this run.
    run: Option<String>,
    /// Only sends made at or after this time (RFC 3339).
    since: Option<String>,
    /// Only sends made before this time (RFC 3339).
    until: Option<String>,
}

/// `GET /v1/events?limit=&after=&destination=&state=&run=&since=&until=`: the sends the
/// server remembers, newest first, a page at a time (without their attempt logs: see
/// `GET /v1/events/{id}`).
#[utoipa::path(get, path = "/v1/events", tag = "sends",
    params(EventsQuery),
    responses(
        (status = 200, description = "newest first; `next` is the `after` of the next page", body = EventPage),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
    ),
    security(("api_token" = [])))]
async fn get_events(
    State(state): Shared,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let filter = destinations::EventFilter {
        destination: query.destination,
        state: query.state,
        run: query.run,
        since: time("since", query.since.as_deref(), "invalid_query")?,
        until: time("until", query.until.as_deref(), "invalid_query")?,
    };
    let page = state
        .hub
        .events(
            &filter,
            query.after.as_deref(),
            limit(query.limit, "invalid_query")?,
        )
        .await
        .map_err(|e| ApiError::from_send(e.into(), ""))?;
    Ok(Json(page).into_response())
}

/// A destination instance and its kind.
#[derive(Serialize, utoipa::ToSchema)]
struct DestinationInfo {
    name: String,
    kind: String,
}

/// The configured instances.
#[derive(Serialize, utoipa::ToSchema)]
struct Destinations {
    destinations: Vec<DestinationInfo>,
}

/// `GET /v1/destinations`: the configured instances and their kinds.
#[utoipa::path(get, path = "/v1/destinations", tag = "sends",
    responses((status = 200, body = Destinations)),
    security(("api_token" = [])))]
async fn get_destinations(State(state): Shared) -> Response {
    let destinations = state
        .hub
        .destinations()
        .into_iter()
        .map(|(name, kind)| DestinationInfo {
            name,
            kind: kind.to_owned(),
        })
        .collect();
    Json(Destinations { destinations }).into_response()
}

/// The targets this server delivers to.
#[derive(Serialize, utoipa::ToSchema)]
struct Endpoints {
    endpoints: Vec<EndpointView>,
}

/// `GET /v1/endpoints`: the targets this server delivers to (an HTTP destination's hosts) with
/// their state, limits, rates and last error.
#[utoipa::path(get, path = "/v1/endpoints", tag = "endpoints",
    responses((status = 200, description = "the hosts delivered to lately (up to 10 000)", body = Endpoints)),
    security(("api_token" = [])))]
async fn get_endpoints(State(state): Shared) -> Response {
    Json(Endpoints {
        endpoints: state.hub.endpoints(),
    })
    .into_response()
}

/// A target's state after a pause or resume.
#[derive(Serialize, utoipa::ToSchema)]
struct EndpointChanged {
    target: String,
    /// `paused` or `open`.
    state: &'static str,
    /// `operator`, after a pause.
    #[serde(skip_serializing_if = "Option::is_none")]
    paused_by: Option<&'static str>,
    /// After a resume: whether it was paused or held by a `Retry-After`.
    #[serde(skip_serializing_if = "Option::is_none")]
    was_held: Option<bool>,
}

/// `POST /v1/endpoints/{target}/pause`: pause a target (`host:port`) by hand: its sends stay
/// queued, unattempted, until resumed.
#[utoipa::path(post, path = "/v1/endpoints/{target}/pause", tag = "endpoints",
    params(("target" = String, Path, description = "`host:port`")),
    responses(
        (status = 200, body = EndpointChanged),
        (status = 409, description = "`cannot_pause`: no instance pauses hosts", body = ErrorBody),
    ),
    security(("api_token" = [])))]
async fn post_pause_endpoint(State(state): Shared, Path(target): Path<String>) -> Response {
    match state.hub.pause_endpoint(&target) {
        Ok(()) => Json(EndpointChanged {
            target,
            state: "paused",
            paused_by: Some("operator"),
            was_held: None,
        })
        .into_response(),
        Err(why) => ApiError::new(StatusCode::CONFLICT, "cannot_pause", why).into_response(),
    }
}

/// `POST /v1/endpoints/{target}/resume`: resume a target paused by hand or after failures (or
/// held by a `Retry-After`).
#[utoipa::path(post, path = "/v1/endpoints/{target}/resume", tag = "endpoints",
    params(("target" = String, Path, description = "`host:port`")),
    responses((status = 200, body = EndpointChanged)),
    security(("api_token" = [])))]
async fn post_resume_endpoint(State(state): Shared, Path(target): Path<String>) -> Response {
    let was_held = state.hub.resume_endpoint(&target);
    Json(EndpointChanged {
        target,
        state: "open",
        paused_by: None,
        was_held: Some(was_held),
    })
    .into_response()
}

/// Which dead letters: `destination`, and a time range on when they died (RFC 3339).
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DeadLetterQuery {
    /// At most this many (1 to 1 000; default 100).
    limit: Option<usize>,
    /// The `next` of the previous page.
    after: Option<String>,
    /// Only letters of this instance.
    destination: Option<String>,
    /// Only letters that died at or after this time (RFC 3339).
    since: Option<String>,
    /// Only letters that died before this time (RFC 3339).
    until: Option<String>,
}

/// A page of dead letters.
#[derive(Serialize, utoipa::ToSchema)]
struct DeadLetters {
    dead_letters: Vec<DeadLetterSummary>,
    /// The `after` of the next page; `null` on the last.
    next: Option<String>,
    /// Letters dropped because the store was full.
    evicted: u64,
}

/// A time bound, RFC 3339; `code` says where it came from (`invalid_query`, `invalid_payload`).
fn time(
    field: &str,
    text: Option<&str>,
    code: &'static str,
) -> Result<Option<std::time::SystemTime>, ApiError> {
    text.map(|text| {
        humantime::parse_rfc3339_weak(text).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                code,
                format!("`{field}`: `{text}` is not a time ({e}); write e.g. 2026-12-01T10:00:00Z"),
            )
        })
    })
    .transpose()
}

/// A page size: 100 unless asked, 1 to 1 000 if asked (more is refused, not cut: page with
/// `after`). `code` says where it came from (`invalid_query`, `invalid_payload`).
fn limit(asked: Option<usize>, code: &'static str) -> Result<usize, ApiError> {
    match asked {
        None => Ok(100),
        Some(n) if (1..=MAX_DEAD_LETTERS).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            code,
            format!(
                "`limit` is {n}; it must be 1 to {MAX_DEAD_LETTERS} (page on with `after`, or replay again while `more` is true)"
            ),
        )),
    }
}

/// `GET /v1/dead-letters?limit=&after=&destination=&since=&until=`: newest first, a page at a
/// time.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "dead letters",
    params(DeadLetterQuery),
    responses(
        (status = 200, body = DeadLetters),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
    ),
    security(("api_token" = [])))]
async fn get_dead_letters(
    State(state): Shared,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Response, ApiError> {
    let filter = DeadLetterFilter {
        ids: None,
        destination: query.destination,
        since: time("since", query.since.as_deref(), "invalid_query")?,
        until: time("until", query.until.as_deref(), "invalid_query")?,
    };
    let unavailable = |e: destinations::QueueError| ApiError::from_send(e.into(), "");
    let page = state
        .hub
        .dead_letter_page(
            &filter,
            query.after.as_deref(),
            limit(query.limit, "invalid_query")?,
        )
        .await
        .map_err(unavailable)?;
    let evicted = state
        .hub
        .dead_letters_evicted()
        .await
        .map_err(unavailable)?;
    let letters: Vec<DeadLetterSummary> = page
        .letters
        .iter()
        .map(|letter| state.hub.dead_letter_summary(letter))
        .collect();
    Ok(Json(DeadLetters {
        dead_letters: letters,
        next: page.next,
        evicted,
    })
    .into_response())
}

/// Which dead letters to replay: by ids, by destination, by when they died; all of them when
/// nothing is given. Up to `limit` (at most 1 000) per call.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    /// These letters (at most 1 000).
    #[serde(default)]
    ids: Option<Vec<EventId>>,
    /// Letters of this instance.
    #[serde(default)]
    destination: Option<String>,
    /// Letters that died at or after this time (RFC 3339).
    #[serde(default)]
    since: Option<String>,
    /// Letters that died before this time (RFC 3339).
    #[serde(default)]
    until: Option<String>,
    /// At most this many (1 to 1 000; default 1 000).
    #[serde(default)]
    limit: Option<usize>,
}

/// Letters queued again.
#[derive(Serialize, utoipa::ToSchema)]
struct Replayed {
    replayed: Vec<EventId>,
    /// Whether more letters match (replay again for them).
    more: bool,
}

/// `POST /v1/dead-letters/replay`: in one step, so a refusal replays none.
#[utoipa::path(post, path = "/v1/dead-letters/replay", tag = "dead letters",
    request_body(content = Option<ReplayRequest>, description = "which letters; all of them when empty"),
    responses(
        (status = 202, description = "queued again: same ids, fresh retry budget", body = Replayed),
        (status = 400, description = "`invalid_payload`", body = ErrorBody),
    ),
    security(("api_token" = [])))]
async fn post_replay(State(state): Shared, body: Body) -> Result<Response, ApiError> {
    let raw = read_body(&state, body).await?;
    let request: ReplayRequest = if raw.is_empty() {
        ReplayRequest::default()
    } else {
        parse_strict(&raw).map_err(|e| ApiError::invalid(&e))?
    };
    if let Some(ids) = &request.ids
        && ids.len() > MAX_DEAD_LETTERS
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_payload",
            format!(
                "`ids`: {} ids, at most {MAX_DEAD_LETTERS} per call",
                ids.len()
            ),
        ));
    }
    let limit = match (&request.ids, request.limit) {
        (Some(ids), None) => ids.len().max(1),
        (_, asked) => limit(asked.or(Some(MAX_DEAD_LETTERS)), "invalid_payload")?,
    };
    let filter = DeadLetterFilter {
        ids: request.ids,
        destination: request.destination,
        since: time("since", request.since.as_deref(), "invalid_payload")?,
        until: time("until", request.until.as_deref(), "invalid_payload")?,
    };
    let replayed = state
        .hub
        .replay_dead_letters(&filter, limit)
        .await
        .map_err(|e| ApiError::from_send(e, ""))?;
    // Whether more letters match (the caller replays again for them).
    let more = !state
        .hub
        .dead_letter_page(&filter, None, 1)
        .await
        .map_err(|e| ApiError::from_send(e.into(), ""))?
        .letters
        .is_empty();
    Ok((StatusCode::ACCEPTED, Json(Replayed { replayed, more })).into_response())
}

/// `GET /healthz`: the process serves.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object)))]
async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Ready when every destination can reach its target.
/// What the last readiness check found, kept for `readiness_cache`: `/readyz` answers from
/// it, so anonymous callers cannot make the server log in to SMTP or list buckets on demand
/// (review S5). Concurrent callers share one check.
pub(crate) struct Readiness {
    keep: Duration,
    last: tokio::sync::Mutex<Option<(std::time::Instant, Arc<Checked>)>>,
}

/// One readiness check: ready or not, and each destination's answer.
struct Checked {
    ready: bool,
    destinations: serde_json::Map<String, serde_json::Value>,
}

impl Readiness {
    pub(crate) fn new(keep: Duration) -> Self {
        Self {
            keep,
            last: tokio::sync::Mutex::new(None),
        }
    }

    async fn current(&self, hub: &Hub) -> Arc<Checked> {
        let mut last = self.last.lock().await;
        if let Some((at, checked)) = last.as_ref()
            && at.elapsed() < self.keep
        {
            return checked.clone();
        }
        let checked = Arc::new(
            match tokio::time::timeout(Duration::from_secs(10), hub.health()).await {
                Ok(checks) => Checked {
                    ready: checks.iter().all(|(_, r)| r.is_ok()),
                    destinations: checks
                        .into_iter()
                        .map(|(name, result)| {
                            let value = match result {
                                Ok(()) => json!({"ok": true}),
                                Err(e) => json!({"ok": false, "error": e.to_string()}),
                            };
                            (name, value)
                        })
                        .collect(),
                },
                Err(_) => Checked {
                    ready: false,
                    destinations: serde_json::Map::from_iter([(
                        "*".to_owned(),
                        json!({"ok": false, "error": "the health checks took over 10 s"}),
                    )]),
                },
            },
        );
        *last = Some((std::time::Instant::now(), checked.clone()));
        checked
    }
}

/// `GET /readyz`: 200 or 503 from the last check (at most `readiness_cache` old). The
/// destinations' details (host names, bucket names, errors) only for callers with the API
/// token when one is set.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "`{\"ready\": true}`, and each destination's answer for callers with the API token", body = Object),
        (status = 503, description = "a destination could not reach its target at the last check", body = Object),
    ))]
async fn readyz(State(state): Shared, headers: axum::http::HeaderMap) -> Response {
    let checked = state.readiness.current(&state.hub).await;
    let status = if checked.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = if state.authorized(&headers) {
        json!({"ready": checked.ready, "destinations": checked.destinations})
    } else {
        json!({"ready": checked.ready})
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
async fn metrics(State(state): Shared) -> Response {
    destinations::metrics::record_queue_depths(&state.hub.queue_depths());
    destinations::metrics::record_endpoints(&state.hub.endpoints());
    let text = state
        .prometheus
        .as_ref()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
