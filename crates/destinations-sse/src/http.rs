//! `GET ROUTE/{stream}`: replay, then live events, as `text/event-stream`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt, stream};
use serde::Deserialize;
use tokio::sync::watch;
use utoipa::openapi::path::HttpMethod;

use crate::options::SseOptions;
use crate::send::check_name;
use crate::streams::{Streams, Subscription};

/// What the routes of one instance share.
pub(crate) struct Served {
    pub(crate) streams: Arc<Streams>,
    pub(crate) options: SseOptions,
    /// Set when the server stops: open responses end, new ones are refused.
    pub(crate) closing: watch::Sender<bool>,
}

/// The instance's routes: `GET ROUTE/{stream}` (and `OPTIONS` for CORS preflights), with
/// their part of the OpenAPI document (the path is the instance's `route`, known at run time).
pub(crate) fn router(served: Arc<Served>) -> utoipa_axum::router::OpenApiRouter {
    let path = format!("{}/{{stream}}", served.options.route);
    let mut router = utoipa_axum::router::OpenApiRouter::new()
        .route(&path, get(subscribe).options(preflight))
        .with_state(served);
    let paths = &mut router.get_openapi_mut().paths;
    paths.add_path_operation(&path, vec![HttpMethod::Get], subscribe_operation());
    paths.add_path_operation(&path, vec![HttpMethod::Options], preflight_operation());
    router
}

/// `GET ROUTE/{stream}` as the OpenAPI document describes it.
fn subscribe_operation() -> utoipa::openapi::path::Operation {
    let text = |description: &str| {
        utoipa::openapi::path::ParameterBuilder::new()
            .schema(Some(
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String),
            ))
            .description(Some(description))
    };
    let events = utoipa::openapi::ResponseBuilder::new()
        .description("the stream's last events (`replay`), then live ones: `id:` the send's id, `event:` its channel, `data:` its payload")
        .content(
            "text/event-stream",
            utoipa::openapi::ContentBuilder::new()
                .schema(Some(
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String),
                ))
                .build(),
        );
    let refused =
        |description: &str| utoipa::openapi::ResponseBuilder::new().description(description);
    utoipa::openapi::path::OperationBuilder::new()
        .tag("sse")
        .summary(Some("Subscribe to a stream: replay, then live events"))
        .operation_id(Some("sse_subscribe"))
        .parameter(
            text("the stream's name")
                .name("stream")
                .parameter_in(utoipa::openapi::path::ParameterIn::Path)
                .required(utoipa::openapi::Required::True),
        )
        .parameter(
            text("a read token, for streams that have them (not the API token)")
                .name("token")
                .parameter_in(utoipa::openapi::path::ParameterIn::Query),
        )
        .parameter(
            text("resume after this event (as the `Last-Event-ID` header does)")
                .name("lastEventId")
                .parameter_in(utoipa::openapi::path::ParameterIn::Query),
        )
        .parameter(
            text("resume after this event")
                .name("Last-Event-ID")
                .parameter_in(utoipa::openapi::path::ParameterIn::Header),
        )
        .response("200", events)
        .response("400", refused("`invalid_stream`"))
        .response("401", refused("the stream needs a read token"))
        .response("403", refused("a read token the stream does not take"))
        .build()
}

/// `OPTIONS ROUTE/{stream}`: the CORS preflight of a page on an allowed origin.
fn preflight_operation() -> utoipa::openapi::path::Operation {
    utoipa::openapi::path::OperationBuilder::new()
        .tag("sse")
        .summary(Some("CORS preflight (origins in `allowed_origins`)"))
        .operation_id(Some("sse_preflight"))
        .parameter(
            utoipa::openapi::path::ParameterBuilder::new()
                .name("stream")
                .parameter_in(utoipa::openapi::path::ParameterIn::Path)
                .required(utoipa::openapi::Required::True)
                .schema(Some(
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String),
                )),
        )
        .response(
            "204",
            utoipa::openapi::ResponseBuilder::new().description("allowed"),
        )
        .build()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeQuery {
    token: Option<String>,
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

async fn subscribe(
    State(served): State<Arc<Served>>,
    Path(name): Path<String>,
    Query(query): Query<SubscribeQuery>,
    headers: HeaderMap,
) -> Response {
    let cors = allowed_origin(&served.options, &headers);
    let mut response = match open(&served, &name, &query, &headers) {
        Ok(subscription) => {
            let mut closing = served.closing.subscribe();
            let closed = async move {
                let _ = closing.wait_for(|closing| *closing).await;
            };
            let frames = frames(subscription, &served.streams, served.options.keepalive)
                .take_until(closed)
                .map(Ok::<Bytes, Infallible>);
            let mut response = Response::new(Body::from_stream(frames));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Tell buffering proxies (nginx) to pass events through at once.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            response
        }
        Err(refusal) => refusal.into_response(),
    };
    if let Some(origin) = cors {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

/// Check the stream name and its token, then subscribe.
fn open(
    served: &Served,
    name: &str,
    query: &SubscribeQuery,
    headers: &HeaderMap,
) -> Result<Subscription, Refusal> {
    if *served.closing.borrow() {
        return Err(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is stopping".to_owned(),
        ));
    }
    check_name("stream", name)
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, "invalid_stream", e.to_string()))?;
    let accepted = tokens_for(&served.options, name);
    if !accepted.is_empty() {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(destinations_core::secret::bearer_token);
        let Some(given) = query.token.as_deref().or(bearer) else {
            return Err(Refusal(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "stream `{name}` needs a read token: add ?token=... or Authorization: Bearer ..."
                ),
            ));
        };
        if !accepted
            .iter()
            .any(|token| destinations_core::secret::tokens_match(given, token))
        {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("that token does not open stream `{name}`"),
            ));
        }
    }
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(query.last_event_id.as_deref());
    served
        .streams
        .subscribe(name, last_event_id)
        .map_err(|full| {
            Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_subscribers",
                format!(
                    "{} subscribers already (max_subscribers); try again later",
                    full.0
                ),
            )
        })
}

/// The frame that tells a subscriber it fell behind, before its response ends.
const FELL_BEHIND: &str = "event: error\ndata: {\"error\":\"fell behind: more events were waiting than this connection's buffer holds\",\"resume\":\"reconnect with the Last-Event-ID header (EventSource does it by itself)\"}\n\n";

/// The replay, then live events, as the frames written when they were published (shared by
/// every subscriber, nothing formatted per subscriber); a `:keepalive` comment every
/// `keepalive`; if the subscriber fell a whole buffer behind, the `error` event, and the end.
fn frames(
    subscription: Subscription,
    streams: &Streams,
    keepalive: Duration,
) -> impl Stream<Item = Bytes> + use<> {
    let Subscription {
        replay,
        live,
        overflowed,
        _seat: seat,
    } = subscription;
    let live = stream::unfold((live, seat), |(mut live, seat)| async move {
        live.recv().await.map(|event| (event, (live, seat)))
    });
    let delivered = streams.metrics.delivered.clone();
    let behind = stream::once(async move {
        overflowed
            .load(Ordering::Acquire)
            .then_some(Bytes::from_static(FELL_BEHIND.as_bytes()))
    })
    .filter_map(std::future::ready);
    let events = stream::iter(replay)
        .chain(live)
        .map(move |event| {
            delivered.increment(1);
            event.frame.clone()
        })
        .chain(behind)
        .map(Some)
        // The end of the events ends the response, keepalives or not.
        .chain(stream::once(std::future::ready(None)));
    let start = tokio::time::Instant::now() + keepalive;
    let ticks = stream::unfold(
        tokio::time::interval_at(start, keepalive),
        |mut ticks| async move {
            ticks.tick().await;
            Some((Some(Bytes::from_static(b":keepalive\n\n")), ticks))
        },
    );
    stream::select(events, ticks)
        .take_while(|frame| std::future::ready(frame.is_some()))
        .filter_map(std::future::ready)
}

/// The tokens that open `stream`: its own and those for every stream (`*`).
fn tokens_for<'a>(options: &'a SseOptions, stream: &str) -> Vec<&'a String> {
    options
        .tokens
        .get(stream)
        .into_iter()
        .chain(options.tokens.get("*"))
        .flatten()
        .collect()
}

fn allowed_origin(options: &SseOptions, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    options
        .cors_origins
        .iter()
        .any(|allowed| allowed == "*" || allowed == text)
        .then(|| origin.clone())
}

async fn preflight(State(served): State<Arc<Served>>, headers: HeaderMap) -> Response {
    let Some(origin) = allowed_origin(&served.options, &headers) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET"),
            ),
            (
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, last-event-id"),
            ),
            (header::VARY, HeaderValue::from_static("origin")),
        ],
    )
        .into_response()
}

/// Why a subscription is refused: a status, a code and a message, as the API's errors are.
struct Refusal(StatusCode, &'static str, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let Self(status, code, message) = self;
        let body = serde_json::json!({"error": {"code": code, "message": message}});
        (status, axum::Json(body)).into_response()
    }
}
