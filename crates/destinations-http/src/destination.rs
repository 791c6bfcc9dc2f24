//! The HTTP destination: one request per send.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use destinations_core::{
    Batch, BatchOutcome, BatchPolicy, ConfigError, Destination, Envelope, InvalidPayload, Outcome,
    PausePolicy, RateLimit, Report, ResponseSummary, parse_strict,
};
use http::header::{
    AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue,
    LOCATION, RETRY_AFTER, USER_AGENT,
};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::value::RawValue;
use url::Url;

use crate::KIND;
use crate::batch::{BatchEncoding, Compression};
use crate::client::{Answer, Client, ClientError, Origin, tls_config};
use crate::guard::AddressGuard;
use crate::options::{DeliveryOrder, HttpOptions};
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
    per_host_rate_limit: Option<RateLimit>,
    adaptive_concurrency: bool,
    encoding: Option<BatchEncoding>,
    compression: Compression,
    ordering: DeliveryOrder,
    timeout: Duration,
    follow_redirects: usize,
}

impl HttpDestination {
    /// An instance with these options.
    pub fn new(options: HttpOptions) -> Result<Self, String> {
        if let Some(rate) = &options.per_host_rate_limit {
            rate.check()
                .map_err(|e| format!("`per_host_rate_limit`: {e}"))?;
        }

        let guard = Arc::new(AddressGuard::allowing(options.allow_networks));
        let signer = if options.signing_secrets.is_empty() {
            None
        } else {
            Some(WebhookSigner::new(&options.signing_secrets).map_err(|e| e.to_string())?)
        };
        // The client dials what the guard admits, itself: never through a proxy from the
        // environment (a proxy resolves the target out of the guard's sight, and HTTP_PROXY
        // would turn every host name into a way in).
        let client = Client::new(
            guard.clone(),
            tls_config(options.ca_file.as_deref())?,
            options.per_host_concurrency.max(1),
        );
        Ok(Self {
            client,
            guard,
            signer,
            per_host_concurrency: options.per_host_concurrency.max(1),
            per_host_rate_limit: options.per_host_rate_limit,
            adaptive_concurrency: options.adaptive_concurrency,
            encoding: options.encoding,
            compression: options.compression,
            ordering: options.ordering,
            timeout: options.timeout,
            follow_redirects: options.follow_redirects,
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

    /// Of an instance with `ordering = "per_key"`: the host and `ordering_key` of a stored
    /// request (a request without a key keeps no order).
    fn keyed_sequence_of(payload: &[u8]) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct UrlAndKey<'a> {
            #[serde(borrow)]
            url: std::borrow::Cow<'a, str>,
            #[serde(borrow, default)]
            ordering_key: Option<std::borrow::Cow<'a, str>>,
        }
        let read: UrlAndKey<'_> = serde_json::from_slice(payload).ok()?;
        let key = read.ordering_key?;
        let mut host = Self::host_of(&read.url)?;
        host.push('\u{1f}');
        host.push_str(&key);
        Some(host)
    }

    /// An `ordering_key` on a send to an instance that does not order by key would be
    /// ignored: refused instead, naming the fix. Cheap when the payload does not mention the
    /// field (every send of a typed sender passes here).
    fn check_ordering_key_allowed(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        static FIELD: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"ordering_key\""));
        // A name written with escapes (`ordering\u005fkey`) is the same field: read those too.
        let may_name_it =
            FIELD.find(payload).is_some() || memchr::memmem::find(payload, b"\\u").is_some();
        if self.ordering == DeliveryOrder::PerKey || !may_name_it {
            return Ok(());
        }
        #[derive(serde::Deserialize)]
        struct KeyOnly {
            #[serde(default)]
            ordering_key: Option<serde::de::IgnoredAny>,
        }
        match serde_json::from_slice::<KeyOnly>(payload) {
            Ok(KeyOnly {
                ordering_key: Some(_),
            }) => Err(InvalidPayload::field(
                "ordering_key",
                "this instance does not order by key: set `ordering = \"per_key\"` on it, or leave the key out",
            )),
            _ => Ok(()),
        }
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

    /// The sends of an ordered batch, one after the other: once one is to be tried again, the
    /// ones after it are not sent (they go back with it, keeping their places), and carry its
    /// answer, so the host is judged by what it said once, not as failing for the rest.
    async fn deliver_in_order(&self, envelopes: &[Envelope]) -> Vec<Report> {
        let mut reports = Vec::with_capacity(envelopes.len());
        let mut held: Option<Report> = None;
        for envelope in envelopes {
            if let Some(Report {
                outcome: Outcome::Retry { error, after },
                response,
            }) = &held
            {
                reports.push(Report {
                    outcome: Outcome::Retry {
                        error: format!(
                            "not sent: a send before it in its order is to be tried again ({error})"
                        ),
                        after: *after,
                    },
                    response: response.clone(),
                });
                continue;
            }
            let report = self.deliver_one(envelope).await;
            if matches!(report.outcome, Outcome::Retry { .. }) {
                held = Some(report.clone());
            }
            reports.push(report);
        }
        reports
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
        let id = envelope.id.to_string();
        let mut headers = match self.headers(&request, &id) {
            Ok(headers) => headers,
            Err(e) => return Report::failed(e.to_string()),
        };
        let body = body_of(body, &mut headers);
        let body = self.seal(&mut headers, &id, body);
        self.exchange(request.method.as_http(), url, headers, body)
            .await
    }

    /// Deliver a batch as one request (the instance has an `encoding`): the sends' `data` in
    /// one body, the batch's key as its `Idempotency-Key`, the sends' ids in
    /// `Destinations-Ids`. The answer decides for every send of the batch.
    async fn deliver_batched(
        &self,
        envelopes: &[Envelope],
        encoding: BatchEncoding,
    ) -> BatchOutcome {
        let mut reports: Vec<Option<Report>> = vec![None; envelopes.len()];
        // Alike but for their `data` (they batched together): the first is read whole, the
        // others for their `data` alone.
        let first = envelopes.iter().enumerate().find_map(|(n, envelope)| {
            match serde_json::from_slice::<HttpRequest>(&envelope.payload) {
                Ok(request) => Some((n, request)),
                Err(e) => {
                    reports[n] = Some(Report::failed(format!(
                        "the stored request no longer parses: {e}"
                    )));
                    None
                }
            }
        });
        let mut members: Vec<(usize, Option<&RawValue>)> = Vec::with_capacity(envelopes.len());
        if let Some((at, request)) = &first {
            members.push((*at, request.data.as_deref()));
            for (n, envelope) in envelopes.iter().enumerate().skip(at + 1) {
                match crate::batch::data_of(&envelope.payload) {
                    Ok(data) => members.push((n, data)),
                    Err(e) => {
                        reports[n] = Some(Report::failed(format!(
                            "the stored request no longer parses: {e}"
                        )));
                    }
                }
            }
        }
        if let Some((_, first)) = &first {
            let report = self
                .deliver_members(first, envelopes, &members, encoding)
                .await;
            for (n, _) in &members {
                reports[*n] = Some(report.clone());
            }
        }
        BatchOutcome::Each(
            reports
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Report::retry("not attempted")))
                .collect(),
        )
    }

    /// One request for the batch's `members` (all alike but for their `data`).
    async fn deliver_members(
        &self,
        first: &HttpRequest,
        envelopes: &[Envelope],
        members: &[(usize, Option<&RawValue>)],
        encoding: BatchEncoding,
    ) -> Report {
        let url = match first.parsed_url() {
            Ok(url) => url,
            Err(e) => return Report::failed(e.to_string()),
        };
        if let Err(refused) = self.guard.check_url(&url) {
            return Report::failed(refused.to_string());
        }
        let ids: Vec<String> = members
            .iter()
            .map(|(n, _)| envelopes[*n].id.to_string())
            .collect();
        let key = crate::batch::key_of(ids.iter().map(String::as_str));
        let mut headers = match self.headers(first, &key) {
            Ok(headers) => headers,
            Err(e) => return Report::failed(e.to_string()),
        };
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(encoding.content_type()),
        );
        if let Ok(value) = HeaderValue::from_str(&ids.join(",")) {
            headers.insert(HeaderName::from_static("destinations-ids"), value);
        }
        let body = encoding.encode(members.iter().map(|(_, data)| *data));
        let body = self.seal(&mut headers, &key, body);
        self.exchange(first.method.as_http(), url, headers, body)
            .await
    }

    /// Sign the body (as the receiver reads it, before compression) and compress it.
    fn seal(&self, headers: &mut HeaderMap, id: &str, body: Bytes) -> Bytes {
        if let Some(signer) = &self.signer {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let signature = signer.signature(id, timestamp, &body);
            for (name, value) in [
                ("webhook-id", id.to_owned()),
                ("webhook-timestamp", timestamp.to_string()),
                ("webhook-signature", signature),
            ] {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
        }
        let (body, encoding) = self.compression.apply(body);
        if let Some(encoding) = encoding {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding));
        }
        body
    }

    /// The exchange within the instance's `timeout`, classified.
    async fn exchange(&self, method: Method, url: Url, headers: HeaderMap, body: Bytes) -> Report {
        let started = Instant::now();
        let exchange = self.follow(method, url, headers, body);
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => classify(&answer, started),
            Ok(Err(error)) => classify_error(error, started),
            Err(_) => Report::retry(format!(
                "timed out after {:?} (the instance's `timeout`)",
                self.timeout
            ))
            .with_response(no_answer(started)),
        }
    }

    /// The exchange, following up to `follow_redirects` redirects, each held to the guard
    /// like the first request. A 303 (and a 301 or 302 answering a POST) is followed with a
    /// GET without a body, as browsers do; 307 and 308 keep the method and body. Credentials
    /// do not follow a redirect to another origin.
    async fn follow(
        &self,
        mut method: Method,
        mut url: Url,
        mut headers: HeaderMap,
        mut body: Bytes,
    ) -> Result<Answer, ClientError> {
        let mut redirects = 0;
        loop {
            let origin = Origin::of(&url).ok_or_else(|| {
                ClientError::Redirect(format!(
                    "`{}` is not an http(s) URL with a host",
                    redact(&url)
                ))
            })?;
            let mut request = Request::new(Full::new(body.clone()));
            *request.method_mut() = method.clone();
            *request.uri_mut() = path_and_query(&url)
                .parse()
                .map_err(|e| ClientError::Exchange(format!("the URL's path: {e}")))?;
            // Kept for a redirect only when one may be followed; otherwise moved, not copied.
            *request.headers_mut() = if self.follow_redirects > redirects {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            if let Ok(host) = HeaderValue::from_str(Origin::host_header(&url)) {
                request.headers_mut().insert(HOST, host);
            }
            let answer = self
                .client
                .exchange(&origin, request, keep_of, DRAIN_BYTES)
                .await?;
            let location = answer.headers.get(LOCATION).and_then(|v| v.to_str().ok());
            let (true, Some(location)) = (
                answer.status.is_redirection() && self.follow_redirects > 0,
                location,
            ) else {
                return Ok(answer);
            };
            if redirects == self.follow_redirects {
                return Err(ClientError::Redirect(format!(
                    "more than {} redirects (the instance's `follow_redirects`)",
                    self.follow_redirects
                )));
            }
            redirects += 1;
            let next = url.join(location).map_err(|e| {
                ClientError::Redirect(format!("the location `{location}` is not a URL: {e}"))
            })?;
            if !matches!(next.scheme(), "http" | "https") {
                return Err(ClientError::Redirect(format!(
                    "to a `{}:` URL; only http and https are followed",
                    next.scheme()
                )));
            }
            self.guard.check_url(&next).map_err(ClientError::Refused)?;
            let status = answer.status.as_u16();
            if status == 303 || (matches!(status, 301 | 302) && method == Method::POST) {
                method = Method::GET;
                body = Bytes::new();
                headers.remove(CONTENT_TYPE);
            }
            if Origin::of(&next) != Some(origin) {
                headers.remove(AUTHORIZATION);
            }
            url = next;
        }
    }

    /// The request's headers and credentials, with `id` as its `Idempotency-Key`.
    fn headers(&self, request: &HttpRequest, id: &str) -> Result<HeaderMap, InvalidPayload> {
        let mut headers = HeaderMap::with_capacity(request.headers.len() + 7);
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("destinations/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                InvalidPayload::field(format!("headers.{name}"), "is not a valid header name")
            })?;
            let value = HeaderValue::from_str(value).map_err(|_| {
                InvalidPayload::field(format!("headers.{name}"), "is not a valid header value")
            })?;
            headers.append(name, value);
        }
        if let Some(auth) = &request.auth {
            let value = match (&auth.bearer, &auth.username) {
                (Some(token), _) => Some(format!("Bearer {token}")),
                (None, Some(user)) => Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!(
                        "{user}:{}",
                        auth.password.as_deref().unwrap_or_default()
                    ))
                )),
                (None, None) => None,
            };
            if let Some(value) = value {
                let mut value = HeaderValue::from_str(&value).map_err(|_| {
                    InvalidPayload::field("auth", "holds characters a header cannot carry")
                })?;
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
        }
        if let Ok(value) = HeaderValue::from_str(id) {
            headers.insert(HeaderName::from_static("idempotency-key"), value);
        }
        Ok(headers)
    }
}

/// A send's body; JSON is labelled as such unless the request says otherwise.
fn body_of(body: Body<'_>, headers: &mut HeaderMap) -> Bytes {
    match body {
        Body::None => Bytes::new(),
        Body::Text(text) => Bytes::from(text.into_bytes()),
        Body::Json(json) => {
            if !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Bytes::copy_from_slice(json.as_bytes())
        }
    }
}

/// How much of a body to keep: nothing of a success, an excerpt of anything else.
fn keep_of(status: StatusCode) -> usize {
    if status.is_success() {
        0
    } else {
        ERROR_EXCERPT_BYTES
    }
}

/// The request target of a URL: its path and query (origin form).
fn path_and_query(url: &Url) -> &str {
    &url[url::Position::BeforePath..url::Position::AfterQuery]
}

/// A URL for an error text, without what may be a secret (credentials, query).
fn redact(url: &Url) -> String {
    crate::request::redact_url(url.as_str())
}

fn no_answer(started: Instant) -> ResponseSummary {
    ResponseSummary {
        status: None,
        elapsed_ms: started.elapsed().as_millis() as u64,
        body_excerpt: None,
        location: None,
    }
}

/// Without the URL: its query or path may hold a secret, and the error reaches statuses, dead
/// letters and logs.
fn classify_error(error: ClientError, started: Instant) -> Report {
    let summary = no_answer(started);
    match error {
        ClientError::Refused(refused) => Report::failed(refused.to_string()),
        ClientError::Redirect(why) => Report::failed(format!("redirect refused: {why}")),
        ClientError::Connect(why) => Report::retry(format!("could not connect: {why}")),
        ClientError::Exchange(why) => Report::retry(format!("request failed: {why}")),
    }
    .with_response(summary)
}

#[async_trait]
impl Destination for HttpDestination {
    fn send_schema(&self) -> Option<destinations_core::SendSchema> {
        <crate::request::HttpRequest as destinations_core::SendType>::schema()
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        parse_strict::<HttpRequest>(payload)?.check()?;
        self.check_ordering_key_allowed(payload)
    }

    fn validate_for_instance(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        self.check_ordering_key_allowed(payload)
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

    fn per_target_rate_limit(&self) -> Option<RateLimit> {
        self.per_host_rate_limit
    }

    fn adaptive_concurrency(&self) -> bool {
        self.adaptive_concurrency
    }

    fn ordered(&self) -> bool {
        self.ordering != DeliveryOrder::None
    }

    /// Per host, or per host and `ordering_key`.
    fn sequence(&self, payload: &[u8]) -> Option<String> {
        match self.ordering {
            DeliveryOrder::None => None,
            DeliveryOrder::PerHost => Self::target_of(payload),
            DeliveryOrder::PerKey => Self::keyed_sequence_of(payload),
        }
    }

    /// A failing host is paused (the instance's `pause` tunes it, or turns it off).
    fn pause_policy(&self) -> Option<PausePolicy> {
        Some(PausePolicy::default())
    }

    /// With an `encoding`, sends batch by what makes them one request; without, by host, so
    /// a batch (when the instance's `batch` asks for them) has one host's limits.
    fn batch_group(&self, payload: &[u8]) -> Option<String> {
        if self.encoding.is_none() {
            if self.ordering == DeliveryOrder::PerKey {
                return Self::keyed_sequence_of(payload).or_else(|| Self::target_of(payload));
            }
            return Self::target_of(payload);
        }
        crate::batch::group_of(payload)
    }

    /// Batched instances fill batches of up to 100 sends, 1 MiB, waiting at most 1 s (the
    /// instance's `batch` changes it); others send each on its own.
    fn batch_policy(&self) -> BatchPolicy {
        if self.encoding.is_none() {
            return BatchPolicy::one_per_send();
        }
        BatchPolicy {
            max_events: 100,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(1),
        }
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        if let Some(encoding) = self.encoding {
            return self.deliver_batched(batch.envelopes(), encoding).await;
        }
        match batch.envelopes() {
            [one] => BatchOutcome::Each(vec![self.deliver_one(one).await]),
            // A batch keeps one sequence's sends (a keyless one keeps no order).
            many if self.sequence(&many[0].payload).is_some() => {
                BatchOutcome::Each(self.deliver_in_order(many).await)
            }
            many => BatchOutcome::Each(
                futures::future::join_all(many.iter().map(|e| self.deliver_one(e))).await,
            ),
        }
    }
}

/// 2xx: delivered. 408, 429 and 5xx but 501: retry, honouring `Retry-After`. Anything else
/// (3xx not followed, 4xx, 501): permanent.
fn classify(answer: &Answer, started: Instant) -> Report {
    let status = answer.status;
    let retry_after = answer
        .headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let location = answer
        .headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let excerpt = String::from_utf8_lossy(&answer.excerpt).into_owned();
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
