//! The HTTP destination: one request per send.

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use destinations_core::{
    Batch, BatchOutcome, ConfigError, Destination, Envelope, InvalidPayload, Report,
    ResponseSummary, parse_strict,
};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Client, StatusCode, redirect};

use crate::KIND;
use crate::guard::{AddressGuard, GuardedResolver, Refused};
use crate::options::HttpOptions;
use crate::request::{Body, HttpRequest};
use crate::signing::WebhookSigner;

/// The most of an error body kept in a send's status.
const ERROR_EXCERPT_BYTES: usize = 4096;
/// The most of an error body repeated in the error text.
const ERROR_HEADLINE_CHARS: usize = 200;
/// The most of a response body read (then dropped) to keep the connection reusable.
const DRAIN_BYTES: usize = 1 << 20;

/// Delivers each send as one HTTP request.
pub struct HttpDestination {
    client: Client,
    guard: Arc<AddressGuard>,
    signer: Option<WebhookSigner>,
    per_host_concurrency: usize,
    timeout: Duration,
}

impl HttpDestination {
    /// An instance with these options.
    pub fn new(options: HttpOptions) -> Result<Self, String> {
        let guard = Arc::new(AddressGuard::allowing(options.allow_networks));
        let signer = if options.signing_secrets.is_empty() {
            None
        } else {
            Some(WebhookSigner::new(&options.signing_secrets).map_err(|e| e.to_string())?)
        };
        let client = Client::builder()
            // Never through a proxy from the environment: a proxy resolves the target itself,
            // out of the guard's sight (HTTP_PROXY would turn every host name into a way in).
            .no_proxy()
            .timeout(options.timeout)
            .redirect(redirect_policy(options.follow_redirects, guard.clone()))
            .dns_resolver(Arc::new(GuardedResolver {
                guard: guard.clone(),
            }))
            .pool_max_idle_per_host(options.per_host_concurrency)
            .tcp_nodelay(true)
            .user_agent(concat!("destinations/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            client,
            guard,
            signer,
            per_host_concurrency: options.per_host_concurrency.max(1),
            timeout: options.timeout,
        })
    }

    /// Build an instance from its config options (the registry's entry point).
    pub fn from_config(
        instance: &str,
        options: serde_json::Value,
    ) -> Result<Arc<dyn Destination>, ConfigError> {
        let options: HttpOptions = destinations_core::parse_options(instance, options)?;
        Self::new(options)
            .map(|d| Arc::new(d) as Arc<dyn Destination>)
            .map_err(|message| ConfigError::new(instance, message))
    }

    /// The `host:port` a stored request goes to: the target the hub limits to
    /// `per_host_concurrency` attempts at once.
    pub fn target_of(payload: &[u8]) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct UrlOnly<'a> {
            #[serde(borrow)]
            url: std::borrow::Cow<'a, str>,
        }
        Self::host_of(&serde_json::from_slice::<UrlOnly<'_>>(payload).ok()?.url)
    }

    /// The `host:port` of a URL, lower case, the scheme's port when none is written. Read
    /// from the text, not by a full URL parse: the dispatcher asks for every send, and the
    /// URL was checked when it was sent.
    pub fn host_of(url: &str) -> Option<String> {
        let (scheme, rest) = url.split_once("://")?;
        let default_port = if scheme.eq_ignore_ascii_case("https") {
            443
        } else if scheme.eq_ignore_ascii_case("http") {
            80
        } else {
            return None;
        };
        let authority = rest.split(['/', '?', '#']).next()?;
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host_port.is_empty() {
            return None;
        }
        // A port is what follows the last `:` outside brackets (`[::1]:8080`).
        let has_port = host_port.rsplit_once(':').is_some_and(|(host, port)| {
            !port.is_empty()
                && !host.ends_with(':')
                && (!host.starts_with('[') || host.ends_with(']'))
        });
        let mut key = host_port.to_ascii_lowercase();
        if !has_port {
            key.push(':');
            key.push_str(&default_port.to_string());
        }
        Some(key)
    }

    /// The most requests at once to one host.
    pub fn per_host_concurrency(&self) -> usize {
        self.per_host_concurrency
    }

    async fn deliver_one(&self, envelope: &Envelope) -> Report {
        // Checked strictly at send time; plain parsing is enough here (no path tracking).
        let request: HttpRequest = match serde_json::from_slice(&envelope.payload) {
            Ok(request) => request,
            Err(e) => return Report::failed(format!("the stored request no longer parses: {e}")),
        };
        let (url, body) = match request
            .parsed_url()
            .and_then(|url| Ok((url, request.body()?)))
        {
            Ok(parts) => parts,
            Err(e) => return Report::failed(e.to_string()),
        };
        if let Err(refused) = self.guard.check_url(&url) {
            return Report::failed(refused.to_string());
        }
        let (headers, body) = match self.headers_and_body(&request, envelope, body) {
            Ok(parts) => parts,
            Err(e) => return Report::failed(e.to_string()),
        };
        let mut builder = self
            .client
            .request(request.method.as_reqwest(), url)
            .headers(headers);
        if let Some(auth) = &request.auth {
            builder = match (&auth.bearer, &auth.username) {
                (Some(token), _) => builder.bearer_auth(token),
                (None, Some(user)) => builder.basic_auth(user, auth.password.as_ref()),
                (None, None) => builder,
            };
        }
        if let Some(body) = body {
            builder = builder.body(body);
        }
        let started = Instant::now();
        match builder.send().await {
            Ok(response) => classify(response, started).await,
            // Without the URL: its query or path may hold a secret, and the error reaches statuses,
            // dead letters and logs.
            Err(error) => self.classify_error(&error.without_url(), started),
        }
    }

    fn headers_and_body(
        &self,
        request: &HttpRequest,
        envelope: &Envelope,
        body: Body<'_>,
    ) -> Result<(HeaderMap, Option<Vec<u8>>), InvalidPayload> {
        let mut headers = HeaderMap::with_capacity(request.headers.len() + 5);
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                InvalidPayload::field(format!("headers.{name}"), "is not a valid header name")
            })?;
            let value = HeaderValue::from_str(value).map_err(|_| {
                InvalidPayload::field(format!("headers.{name}"), "is not a valid header value")
            })?;
            headers.append(name, value);
        }
        let id = envelope.id.to_string();
        if let Ok(value) = HeaderValue::from_str(&id) {
            headers.insert(HeaderName::from_static("idempotency-key"), value);
        }
        let body = match body {
            Body::None => None,
            Body::Text(text) => Some(text.into_bytes()),
            Body::Json(json) => {
                if !headers.contains_key(CONTENT_TYPE) {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                Some(json.as_bytes().to_vec())
            }
        };
        if let Some(signer) = &self.signer {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let signature = signer.signature(&id, timestamp, body.as_deref().unwrap_or_default());
            for (name, value) in [
                ("webhook-id", id),
                ("webhook-timestamp", timestamp.to_string()),
                ("webhook-signature", signature),
            ] {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
        }
        Ok((headers, body))
    }

    fn classify_error(&self, error: &reqwest::Error, started: Instant) -> Report {
        let summary = ResponseSummary {
            status: None,
            elapsed_ms: started.elapsed().as_millis() as u64,
            body_excerpt: None,
            location: None,
        };
        if let Some(refused) = find_source::<Refused>(error) {
            return Report::failed(refused.to_string()).with_response(summary);
        }
        let message = if error.is_timeout() {
            format!(
                "timed out after {:?} (the instance's `timeout`)",
                self.timeout
            )
        } else if error.is_connect() {
            format!("could not connect: {}", error_chain(error))
        } else if error.is_redirect() {
            return Report::failed(format!("redirect refused: {}", error_chain(error)))
                .with_response(summary);
        } else if error.is_builder() {
            return Report::failed(format!("invalid request: {}", error_chain(error)))
                .with_response(summary);
        } else {
            format!("request failed: {}", error_chain(error))
        };
        Report::retry(message).with_response(summary)
    }
}

#[async_trait]
impl Destination for HttpDestination {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        parse_strict::<HttpRequest>(payload)?.check()
    }

    fn target(&self, payload: &[u8]) -> Option<String> {
        Self::target_of(payload)
    }

    fn redact(&self, payload: &mut serde_json::Value) {
        crate::request::redact(payload);
    }

    fn per_target_concurrency(&self) -> Option<usize> {
        Some(self.per_host_concurrency)
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        match batch.envelopes() {
            [one] => BatchOutcome::Each(vec![self.deliver_one(one).await]),
            many => BatchOutcome::Each(
                futures::future::join_all(many.iter().map(|e| self.deliver_one(e))).await,
            ),
        }
    }
}

/// 2xx: delivered. 408, 429 and 5xx but 501: retry, honouring `Retry-After`. Anything else
/// (3xx not followed, 4xx, 501): permanent.
async fn classify(mut response: reqwest::Response, started: Instant) -> Report {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let keep = if status.is_success() {
        0
    } else {
        ERROR_EXCERPT_BYTES
    };
    let excerpt = read_excerpt(&mut response, keep).await;
    let summary = ResponseSummary {
        status: Some(status.as_u16()),
        elapsed_ms: started.elapsed().as_millis() as u64,
        body_excerpt: (!excerpt.is_empty()).then_some(excerpt),
        location: None,
    };
    if status.is_success() {
        return Report::delivered().with_response(summary);
    }
    let described = describe(status, summary.body_excerpt.as_deref());
    if is_transient(status) {
        Report::retry_after(described, retry_after).with_response(summary)
    } else if status.is_redirection() {
        Report::failed(format!(
            "{described}: redirect to {} not followed (set `follow_redirects` on the instance to follow)",
            location.as_deref().unwrap_or("an unspecified location")
        ))
        .with_response(summary)
    } else {
        Report::failed(described).with_response(summary)
    }
}

fn is_transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429)
        || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
}

fn describe(status: StatusCode, excerpt: Option<&str>) -> String {
    let reason = status.canonical_reason().unwrap_or("");
    match excerpt {
        Some(body) => format!("HTTP {} {reason}: {}", status.as_u16(), headline(body)),
        None => format!("HTTP {} {reason}", status.as_u16()),
    }
}

/// The start of an error body, for the error text: one line, at most
/// [`ERROR_HEADLINE_CHARS`] characters. The whole excerpt (4 KiB) is kept once, in the
/// response summary, not twice (review C6).
fn headline(body: &str) -> String {
    let mut line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(ERROR_HEADLINE_CHARS)
        .collect();
    if body.chars().nth(ERROR_HEADLINE_CHARS).is_some() {
        line.push('…');
    }
    line
}

/// Read the body: keep its first `keep` bytes as text, drain a bounded rest so the
/// connection can be reused.
async fn read_excerpt(response: &mut reqwest::Response, keep: usize) -> String {
    let mut kept = Vec::new();
    let mut read = 0;
    while read < DRAIN_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                if kept.len() < keep {
                    let room = keep - kept.len();
                    kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// `Retry-After`: seconds, or an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod host_tests {
    use super::HttpDestination;

    #[test]
    fn host_keys_name_host_and_port() {
        for (url, key) in [
            ("http://Example.com/x", "example.com:80"),
            ("https://example.com", "example.com:443"),
            ("http://example.com:8080/x?y#z", "example.com:8080"),
            ("http://127.0.0.1:9000/hook", "127.0.0.1:9000"),
            ("http://[::1]:8080/", "[::1]:8080"),
            ("http://[::1]/", "[::1]:80"),
            ("HTTPS://Hooks.Example.com?x=1", "hooks.example.com:443"),
        ] {
            assert_eq!(HttpDestination::host_of(url).as_deref(), Some(key), "{url}");
        }
        assert_eq!(HttpDestination::host_of("ftp://x/"), None);
        assert_eq!(HttpDestination::host_of("no scheme"), None);
    }
}

fn redirect_policy(follow: usize, guard: Arc<AddressGuard>) -> redirect::Policy {
    if follow == 0 {
        return redirect::Policy::none();
    }
    redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > follow {
            return attempt.error(format!("more than {follow} redirects"));
        }
        match guard.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    })
}

fn find_source<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        let later = SystemTime::now() + Duration::from_secs(90);
        let parsed = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap_or_default();
        assert!(
            parsed > Duration::from_secs(80) && parsed <= Duration::from_secs(90),
            "{parsed:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn transient_statuses() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(
                is_transient(StatusCode::from_u16(code).unwrap_or(StatusCode::OK)),
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 410, 422, 501, 301] {
            assert!(
                !is_transient(StatusCode::from_u16(code).unwrap_or(StatusCode::OK)),
                "{code}"
            );
        }
    }
}
