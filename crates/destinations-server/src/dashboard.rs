//! The dashboard: a page and its script and style, embedded in the binary (no build step, no
//! framework fetched at run time), served at `/` under a strict content security policy; the
//! sign-in that puts the API token in an HttpOnly cookie (never in a URL), and the live
//! stream of counts the page draws its rates from.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use destinations::metrics::InstanceTotals;
use serde::{Deserialize, Serialize};

use crate::api::{AppState, read_body};
use crate::error::{ApiError, ErrorBody};

const PAGE: &str = include_str!("../dashboard/index.html");
const SCRIPT: &str = include_str!("../dashboard/app.js");
const STYLE: &str = include_str!("../dashboard/app.css");

/// The cookie that carries a signed-in browser's session.
pub(crate) const SESSION_COOKIE: &str = "destinations_session";

/// How long a sign-in lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// The most sessions kept at once (the oldest go first).
const MAX_SESSIONS: usize = 1000;

/// Only this server's own page, script and style, and calls to itself: an injected tag can
/// neither run nor send anything elsewhere.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`: the dashboard.
#[utoipa::path(get, path = "/", tag = "dashboard",
    responses((status = 200, description = "the dashboard page", content_type = "text/html", body = String)))]
pub(crate) async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /dashboard/app.js`: the dashboard's script.
#[utoipa::path(get, path = "/dashboard/app.js", tag = "dashboard",
    responses((status = 200, content_type = "text/javascript", body = String)))]
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /dashboard/app.css`: the dashboard's style.
#[utoipa::path(get, path = "/dashboard/app.css", tag = "dashboard",
    responses((status = 200, content_type = "text/css", body = String)))]
pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// Signed-in browsers, by session id, with when each sign-in ends.
#[derive(Default)]
pub(crate) struct Sessions {
    open: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new session; its id.
    fn open(&self) -> Result<String, ApiError> {
        let mut id = [0u8; 32];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "no randomness for a session id",
            )
        })?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut open = self.lock();
        open.retain(|_, ends| *ends > now);
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, ends)| **ends)
                .map(|(k, _)| k.clone())
        {
            open.remove(&oldest);
        }
        open.insert(id.clone(), now + SESSION_LIFETIME);
        Ok(id)
    }

    /// Whether one of the request's session cookies names a session that has not ended (a
    /// page of another port on the same host may have set one of the same name).
    pub(crate) fn signed_in(&self, headers: &HeaderMap) -> bool {
        let now = Instant::now();
        let open = self.lock();
        sessions_of(headers).any(|id| open.get(id).is_some_and(|ends| *ends > now))
    }

    fn close(&self, headers: &HeaderMap) {
        let mut open = self.lock();
        for id in sessions_of(headers) {
            open.remove(id);
        }
    }
}

/// The session ids in a request's cookies (under either name).
fn sessions_of(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|cookie| {
            let (name, value) = cookie.trim().split_once('=')?;
            let ours = name == SESSION_COOKIE || name == SECURE_SESSION_COOKIE;
            (ours && !value.is_empty()).then_some(value)
        })
}

/// The cookie's name on a page served over HTTPS (behind a proxy that terminates TLS): the
/// browser then keeps it to this origin, over HTTPS only.
const SECURE_SESSION_COOKIE: &str = "__Host-destinations_session";

/// Whether the page must sign in, and whether it is.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct SessionState {
    /// The server has an `api_token`.
    required: bool,
    /// This browser may use the API (no token is required, or it signed in).
    signed_in: bool,
}

/// `GET /v1/session`: whether the page must sign in.
#[utoipa::path(get, path = "/v1/session", tag = "dashboard",
    responses((status = 200, body = SessionState)))]
pub(crate) async fn session_state(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Response {
    let required = state.api_token.is_some();
    Json(SessionState {
        required,
        signed_in: !required || state.authorized(&headers),
    })
    .into_response()
}

/// A sign-in: the server's API token, in the body (never in a URL).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignIn {
    token: String,
}

/// `POST /v1/session {"token"}`: sign the browser in with the API token; the session goes in
/// an HttpOnly, SameSite=Strict cookie that lasts 12 hours.
#[utoipa::path(post, path = "/v1/session", tag = "dashboard",
    request_body = SignIn,
    responses(
        (status = 200, description = "signed in; `Set-Cookie` carries the session", body = SessionState),
        (status = 401, description = "not this server's token", body = ErrorBody),
        (status = 404, description = "the server has no token: nothing to sign in to", body = ErrorBody),
    ))]
pub(crate) async fn sign_in(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let raw = read_body(&state, body).await?;
    let request: SignIn = destinations::parse_strict(&raw).map_err(|e| ApiError::invalid(&e))?;
    let Some(expected) = state.api_token.as_deref() else {
        return Err(ApiError::not_found(
            "this server has no api_token: the dashboard needs no sign-in",
        ));
    };
    if !destinations::secret::tokens_match(&request.token, expected) {
        // A moment's pause makes guessing slower still (a token is 16 characters or more).
        tokio::time::sleep(Duration::from_millis(300)).await;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "that is not this server's api_token",
        ));
    }
    let id = state.sessions.open()?;
    // A page loaded over HTTPS gets a cookie bound to its origin and to HTTPS.
    let https = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|origin| origin.starts_with("https://"));
    let (name, secure) = if https {
        (SECURE_SESSION_COOKIE, "; Secure")
    } else {
        (SESSION_COOKIE, "")
    };
    let cookie = format!(
        "{name}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_LIFETIME.as_secs()
    );
    let mut response = Json(SessionState {
        required: true,
        signed_in: true,
    })
    .into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// `DELETE /v1/session`: sign out.
#[utoipa::path(delete, path = "/v1/session", tag = "dashboard",
    responses((status = 204, description = "signed out")))]
pub(crate) async fn sign_out(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    state.sessions.close(&headers);
    let mut response = StatusCode::NO_CONTENT.into_response();
    for cleared in [
        "destinations_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        "__Host-destinations_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0; Secure",
    ] {
        response
            .headers_mut()
            .append(header::SET_COOKIE, HeaderValue::from_static(cleared));
    }
    response
}

/// Whether two looks at the counts say the same.
fn same_counts(a: &[InstanceTotals], b: &[InstanceTotals]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            (a.accepted, a.delivered, a.dead, a.failed_attempts, a.queued)
                == (b.accepted, b.delivered, b.dead, b.failed_attempts, b.queued)
        })
}

/// What the live stream says when the counts change, and each second.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Tick {
    /// When, RFC 3339.
    time: String,
    /// Each instance's counts since the server started, and what waits.
    destinations: Vec<InstanceTotals>,
}

/// How often the live stream looks at the counts, and the longest it stays silent.
const LIVE_LOOK: Duration = Duration::from_millis(250);
const LIVE_HEARTBEAT: Duration = Duration::from_secs(1);

/// `GET /v1/live`: `text/event-stream`, an event `tick` with every instance's counts as soon as
/// they change (looked at four times a second) and at least once a second (the page draws
/// rates from their differences and reloads its lists when they change). Ends when the server
/// stops.
#[utoipa::path(get, path = "/v1/live", tag = "dashboard",
    responses((status = 200, description = "`event: tick`, `data:` a Tick, when counts change and at least each second", content_type = "text/event-stream", body = Tick)),
    security(("api_token" = [])))]
pub(crate) async fn live(State(state): State<Arc<AppState>>) -> Response {
    let hub = state.hub.clone();
    let mut stopping = state.stopping.subscribe();
    let mut interval = tokio::time::interval(LIVE_LOOK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (the interval, the counts last sent, when they were sent)
    let ticks = futures::stream::unfold(
        (interval, None::<Vec<InstanceTotals>>, Instant::now()),
        move |(mut interval, mut last, mut sent_at)| {
            let hub = hub.clone();
            async move {
                let destinations = loop {
                    interval.tick().await;
                    let now = hub.totals();
                    let changed = last.as_ref().is_none_or(|last| !same_counts(last, &now));
                    if changed || sent_at.elapsed() >= LIVE_HEARTBEAT {
                        break now;
                    }
                };
                last = Some(destinations.clone());
                sent_at = Instant::now();
                let tick = Tick {
                    time: humantime::format_rfc3339_millis(std::time::SystemTime::now())
                        .to_string(),
                    destinations,
                };
                let event = Event::default()
                    .event("tick")
                    .json_data(&tick)
                    .unwrap_or_else(|_| Event::default().comment("unserializable"));
                Some((Ok::<Event, Infallible>(event), (interval, last, sent_at)))
            }
        },
    );
    let stopped = async move {
        let _ = stopping.wait_for(|stopping| *stopping).await;
    };
    let ticks = futures::StreamExt::take_until(ticks, stopped);
    let mut response = Sse::new(ticks)
        .keep_alive(KeepAlive::default())
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
