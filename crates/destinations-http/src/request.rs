//! The request of one HTTP send: `send.http({method, url, headers, params, auth, data})`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock, PoisonError};

use destinations_core::InvalidPayload;
use http::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use url::Url;

/// Longest URL accepted.
pub const MAX_URL_BYTES: usize = 8 * 1024;

/// Headers the destination sets itself, or that steer the connection or a proxy rather than
/// the request; a send may not set them.
const RESERVED_HEADERS: [&str; 15] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "idempotency-key",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "expect",
    "keep-alive",
];

/// An HTTP method, upper case as on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Method {
    Get,
    Head,
    #[default]
    Post,
    Put,
    Delete,
    Options,
    Patch,
}

impl Method {
    pub(crate) fn as_http(self) -> http::Method {
        match self {
            Self::Get => http::Method::GET,
            Self::Head => http::Method::HEAD,
            Self::Post => http::Method::POST,
            Self::Put => http::Method::PUT,
            Self::Delete => http::Method::DELETE,
            Self::Options => http::Method::OPTIONS,
            Self::Patch => http::Method::PATCH,
        }
    }
}

/// Credentials: `{username, password}` for Basic auth, or `{bearer}`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Auth {
    /// Basic auth user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Basic auth password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials.
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("bearer", &self.bearer.as_ref().map(|_| "***"))
            .finish()
    }
}

/// One HTTP request to make after the run. Build it with [`HttpRequest::post`] and friends,
/// or send it as JSON over the server API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HttpRequest {
    /// The method, upper case (default `POST`).
    #[serde(default)]
    pub method: Method,
    /// An absolute `http` or `https` URL.
    pub url: String,
    /// Request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Query parameters, appended to the URL's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Basic or bearer credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Auth>,
    /// The body: a string is sent as it is; a JSON object or array is sent as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Value>))]
    pub data: Option<Box<RawValue>>,
    /// For an instance with `ordering = "per_key"`: the sends to a host with the same key
    /// arrive one at a time, in the order sent, a retry holding the ones behind it. Not sent
    /// to the receiver. Refused by an instance that does not order by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
}

impl PartialEq for HttpRequest {
    fn eq(&self, other: &Self) -> bool {
        self.method == other.method
            && self.url == other.url
            && self.headers == other.headers
            && self.params == other.params
            && self.auth == other.auth
            && self.data.as_ref().map(|d| d.get()) == other.data.as_ref().map(|d| d.get())
            && self.ordering_key == other.ordering_key
    }
}

/// The body to send, read from `data`.
pub(crate) enum Body<'a> {
    None,
    Text(String),
    Json(&'a str),
}

impl HttpRequest {
    /// A request with this method and URL.
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Self {
            method,
            url: url.into(),
            headers: BTreeMap::new(),
            params: BTreeMap::new(),
            auth: None,
            data: None,
            ordering_key: None,
        }
    }

    /// A `POST` to `url`.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new(Method::Post, url)
    }

    /// A `GET` of `url`.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new(Method::Get, url)
    }

    /// A `PUT` to `url`.
    pub fn put(url: impl Into<String>) -> Self {
        Self::new(Method::Put, url)
    }

    /// Send this value as JSON. A value that cannot be serialized is reported by `.http()`.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.data = serde_json::value::to_raw_value(value).ok();
        if self.data.is_none() {
            // Leave a marker that `check` reports with the field named.
            self.data = RawValue::from_string("null".to_owned()).ok();
        }
        self
    }

    /// Send this text as it is.
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.data = serde_json::value::to_raw_value(&text.into()).ok();
        self
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Add a query parameter.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(name.into(), value.into());
        self
    }

    /// Authenticate with a bearer token.
    pub fn bearer(mut self, token: impl Into<String>) -> Self {
        self.auth = Some(Auth {
            bearer: Some(token.into()),
            ..Auth::default()
        });
        self
    }

    /// Authenticate with Basic auth.
    pub fn basic(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Some(Auth {
            username: Some(username.into()),
            password: Some(password.into()),
            bearer: None,
        });
        self
    }

    /// Keep this send's order among the sends to its host with the same key (an instance with
    /// `ordering = "per_key"`).
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Check everything that can be checked before the network: the URL, the headers, the
    /// credentials, the body's type. Errors name the field.
    pub fn check(&self) -> Result<(), InvalidPayload> {
        // A URL known good is not cloned out of the memory just to be dropped.
        if !(self.params.is_empty() && RecentUrls::knows(&self.url)) {
            self.parsed_url()?;
        }
        for (name, value) in &self.headers {
            check_header(name, value)?;
        }
        if let Some(auth) = &self.auth {
            check_auth(auth)?;
        }
        if let Some(key) = &self.ordering_key {
            check_ordering_key(key)?;
        }
        self.body()?;
        Ok(())
    }

    /// The URL with the params appended.
    pub(crate) fn parsed_url(&self) -> Result<Url, InvalidPayload> {
        if self.params.is_empty()
            && let Some(url) = RecentUrls::get(&self.url)
        {
            return Ok(url);
        }
        let url = self.parse_url()?;
        if self.params.is_empty() {
            RecentUrls::keep(&self.url, &url);
        }
        Ok(url)
    }

    fn parse_url(&self) -> Result<Url, InvalidPayload> {
        if self.url.len() > MAX_URL_BYTES {
            return Err(InvalidPayload::field(
                "url",
                format!(
                    "is {} bytes long, over the limit of {MAX_URL_BYTES}",
                    self.url.len()
                ),
            ));
        }
        // The URL parser would drop or re-encode these without a word; a URL is taken as
        // written or refused.
        if let Some((at, c)) = self
            .url
            .char_indices()
            .find(|(_, c)| c.is_control() || c.is_whitespace())
        {
            return Err(InvalidPayload::field(
                "url",
                format!(
                    "has {} at byte {at}; percent-encode it (a URL is taken as written, never rewritten)",
                    match c {
                        '\r' => "a carriage return (CR)".to_owned(),
                        '\n' => "a line feed (LF)".to_owned(),
                        '\t' => "a tab".to_owned(),
                        ' ' => "a space".to_owned(),
                        other => format!("the character U+{:04X}", other as u32),
                    }
                ),
            ));
        }
        let mut url = Url::parse(&self.url).map_err(|e| {
            InvalidPayload::field("url", format!("`{}` is not a valid URL: {e}", self.url))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(InvalidPayload::field(
                "url",
                format!(
                    "scheme `{}` is not allowed; use http or https",
                    url.scheme()
                ),
            ));
        }
        if url.host().is_none() {
            return Err(InvalidPayload::field("url", "has no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(InvalidPayload::field(
                "url",
                "carries credentials; put them in `auth` instead, so they are never logged",
            ));
        }
        if !self.params.is_empty() {
            url.query_pairs_mut().extend_pairs(&self.params);
        }
        Ok(url)
    }

    /// The body, by the type of `data`.
    pub(crate) fn body(&self) -> Result<Body<'_>, InvalidPayload> {
        let Some(data) = &self.data else {
            return Ok(Body::None);
        };
        let raw = data.get();
        match raw.trim_start().as_bytes().first() {
            Some(b'"') => serde_json::from_str::<String>(raw)
                .map(Body::Text)
                .map_err(|e| InvalidPayload::field("data", e.to_string())),
            Some(b'{' | b'[') => Ok(Body::Json(raw)),
            _ => Err(InvalidPayload::field(
                "data",
                format!("must be a string or a JSON object or array, not `{raw}`"),
            )),
        }
    }
}

/// URLs checked lately, by their text, as parsed: a service sends to the same few URLs over
/// and over, and each send's URL is checked when it is made and used again when it is
/// delivered. Parsing depends on the text alone, so what was parsed once holds.
struct RecentUrls;

impl RecentUrls {
    /// How many are kept; past it, the memory starts again empty.
    const KEPT: usize = 1024;

    fn map() -> std::sync::MutexGuard<'static, HashMap<Box<str>, Url>> {
        static RECENT: OnceLock<Mutex<HashMap<Box<str>, Url>>> = OnceLock::new();
        RECENT
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn get(text: &str) -> Option<Url> {
        Self::map().get(text).cloned()
    }

    fn knows(text: &str) -> bool {
        Self::map().contains_key(text)
    }

    fn keep(text: &str, url: &Url) {
        if text.len() > 512 {
            return;
        }
        let mut map = Self::map();
        if map.len() >= Self::KEPT {
            map.clear();
        }
        map.insert(Box::from(text), url.clone());
    }
}

/// The longest `ordering_key`, in bytes.
pub(crate) const MAX_ORDERING_KEY_BYTES: usize = 256;

fn check_ordering_key(key: &str) -> Result<(), InvalidPayload> {
    if key.is_empty() {
        return Err(InvalidPayload::field(
            "ordering_key",
            "is empty; leave it out for a send that keeps no order",
        ));
    }
    if key.len() > MAX_ORDERING_KEY_BYTES {
        return Err(InvalidPayload::field(
            "ordering_key",
            format!(
                "is {} bytes long, over the limit of {MAX_ORDERING_KEY_BYTES}",
                key.len()
            ),
        ));
    }
    Ok(())
}

fn check_header(name: &str, value: &str) -> Result<(), InvalidPayload> {
    let field = || format!("headers.{name}");
    if name.contains(['\r', '\n']) || value.contains(['\r', '\n']) {
        return Err(InvalidPayload::field(
            field(),
            "contains a CR or LF character, which would inject headers",
        ));
    }
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| InvalidPayload::field(field(), "is not a valid header name"))?;
    HeaderValue::from_str(value).map_err(|_| {
        InvalidPayload::field(field(), "has a character not allowed in a header value")
    })?;
    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(InvalidPayload::field(
            field(),
            "is set by the destination itself and cannot be given in a send",
        ));
    }
    Ok(())
}

fn check_auth(auth: &Auth) -> Result<(), InvalidPayload> {
    match (&auth.username, &auth.password, &auth.bearer) {
        (None, None, Some(token)) => {
            if HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
                return Err(InvalidPayload::field(
                    "auth.bearer",
                    "has a character not allowed in a header (CR, LF or another control character)",
                ));
            }
            Ok(())
        }
        (Some(username), _, None) => {
            if username.contains(':') {
                return Err(InvalidPayload::field(
                    "auth.username",
                    "cannot contain `:` (Basic auth)",
                ));
            }
            Ok(())
        }
        (None, Some(_), None) => Err(InvalidPayload::field(
            "auth.username",
            "is required with a password",
        )),
        (None, None, None) => Err(InvalidPayload::field(
            "auth",
            "give {username, password} or {bearer}",
        )),
        _ => Err(InvalidPayload::field(
            "auth",
            "give either {username, password} or {bearer}, not both",
        )),
    }
}

impl destinations_core::SendType for HttpRequest {
    const KIND: &'static str = crate::KIND;

    fn check(&self) -> Result<(), destinations_core::InvalidPayload> {
        HttpRequest::check(self).map(drop)
    }
    #[cfg(feature = "openapi")]
    fn schema() -> Option<destinations_core::SendSchema> {
        Some(destinations_core::SendSchema::of::<Self>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use destinations_core::parse_strict;

    fn parse(json: &str) -> Result<HttpRequest, InvalidPayload> {
        let request: HttpRequest = parse_strict(json.as_bytes())?;
        request.check()?;
        Ok(request)
    }

    #[test]
    fn accepts_the_reference_shape() {
        let r = parse(
            r#"{"method":"PUT","url":"https://example.com/x?a=1","headers":{"X-A":"b"},
                "params":{"q":"r s"},"auth":{"username":"u","password":"p"},"data":{"name":"Luke"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.method, Method::Put);
        assert_eq!(
            r.parsed_url().map(|u| u.to_string()).ok().as_deref(),
            Some("https://example.com/x?a=1&q=r+s")
        );
        assert!(matches!(r.body(), Ok(Body::Json(r#"{"name":"Luke"}"#))));
        let r = parse(r#"{"url":"http://example.com","data":"plain text"}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.method, Method::Post);
        assert!(matches!(r.body(), Ok(Body::Text(t)) if t == "plain text"));
    }

    #[test]
    fn refuses_body_instead_of_data() {
        let e = parse(r#"{"url":"http://example.com","body":"x"}"#).unwrap_err();
        assert_eq!(e.field, "body");
        assert!(e.message.contains("unknown field `body`"), "{e}");
        assert!(
            e.message.contains("`data`"),
            "the message lists the right name: {e}"
        );
    }

    #[test]
    fn refuses_lower_case_and_unknown_methods() {
        for method in ["post", "FETCH"] {
            let e = parse(&format!(
                r#"{{"method":"{method}","url":"http://example.com"}}"#
            ))
            .unwrap_err();
            assert_eq!(e.field, "method", "{e}");
            assert!(e.message.contains("`POST`"), "{e}");
        }
    }

    #[test]
    fn refuses_bad_urls() {
        for (url, says) in [
            ("ftp://example.com/f", "scheme `ftp`"),
            ("file:///etc/passwd", "scheme `file`"),
            ("not-a-url", "not a valid URL"),
            ("not a url", "a space at byte 3"),
            (
                "http://example.com/\\r\\nX: 1",
                "a carriage return (CR) at byte 19",
            ),
            ("http://example.com/\\t", "a tab"),
            ("http://user:pw@example.com", "credentials"),
        ] {
            let e = parse(&format!(r#"{{"url":"{url}"}}"#)).unwrap_err();
            assert_eq!(e.field, "url");
            assert!(e.message.contains(says), "{url}: {e}");
        }
        let e = parse(r#"{"method":"GET"}"#).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("url", "is required")
        );
    }

    #[test]
    fn refuses_header_injection_and_reserved_headers() {
        let e = parse(r#"{"url":"http://example.com","headers":{"X-A":"b\r\nX-Evil: 1"}}"#)
            .unwrap_err();
        assert_eq!(e.field, "headers.X-A");
        assert!(e.message.contains("CR or LF"), "{e}");
        let e = parse(r#"{"url":"http://example.com","headers":{"X-A\nB":"b"}}"#).unwrap_err();
        assert!(e.message.contains("CR or LF"), "{e}");
        let e =
            parse(r#"{"url":"http://example.com","headers":{"Idempotency-Key":"k"}}"#).unwrap_err();
        assert!(e.message.contains("set by the destination"), "{e}");
        let e = parse(r#"{"url":"http://example.com","auth":{"bearer":"a\r\nb"}}"#).unwrap_err();
        assert_eq!(e.field, "auth.bearer");
    }

    #[test]
    fn refuses_mixed_auth_and_odd_data() {
        let e = parse(r#"{"url":"http://example.com","auth":{"username":"u","bearer":"t"}}"#)
            .unwrap_err();
        assert_eq!(e.field, "auth");
        let e = parse(r#"{"url":"http://example.com","auth":{"user":"u"}}"#).unwrap_err();
        assert_eq!(e.field, "auth.user");
        let e = parse(r#"{"url":"http://example.com","data":42}"#).unwrap_err();
        assert_eq!(e.field, "data");
    }

    #[test]
    fn a_url_checked_twice_is_judged_the_same_twice() {
        for _ in 0..2 {
            let ok = parse(r#"{"url":"HTTP://Example.COM:8080/a?b=1"}"#)
                .and_then(|r| r.parsed_url())
                .map(|u| u.to_string());
            assert_eq!(ok.as_deref(), Ok("http://example.com:8080/a?b=1"));
            let refused = parse(r#"{"url":"http://user:pw@example.com/"}"#).unwrap_err();
            assert!(refused.to_string().contains("credentials"), "{refused}");
        }
        let with_params = parse(r#"{"url":"http://example.com/a","params":{"k":"v"}}"#)
            .and_then(|r| r.parsed_url())
            .map(|u| u.to_string());
        assert_eq!(with_params.as_deref(), Ok("http://example.com/a?k=v"));
    }

    #[test]
    fn builder_round_trips_through_json() {
        let r = HttpRequest::post("https://example.com/hook")
            .json(&serde_json::json!({"name": "Luke"}))
            .header("X-Trace", "1")
            .param("v", "2")
            .bearer("t0k");
        assert!(r.check().is_ok());
        let bytes = serde_json::to_vec(&r).unwrap_or_default();
        let back: HttpRequest = parse_strict(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, r);
        assert!(
            !format!("{r:?}").contains("t0k"),
            "Debug never shows credentials"
        );
    }
}

/// What a stored request shows of itself: credentials, header values, query and `params`
/// values, and a password in the URL replaced by `[redacted]`; the rest (method, host, path,
/// header and parameter names, body) kept so the send can still be recognised.
pub(crate) fn redact(payload: &mut serde_json::Value) {
    const HIDDEN: &str = "[redacted]";
    let Some(request) = payload.as_object_mut() else {
        return;
    };
    if let Some(auth) = request.get_mut("auth").and_then(|a| a.as_object_mut()) {
        for (name, value) in auth.iter_mut() {
            if name != "username" {
                *value = serde_json::Value::from(HIDDEN);
            }
        }
    }
    for table in ["headers", "params"] {
        if let Some(values) = request.get_mut(table).and_then(|t| t.as_object_mut()) {
            for value in values.values_mut() {
                *value = serde_json::Value::from(HIDDEN);
            }
        }
    }
    if let Some(serde_json::Value::String(text)) = request.get_mut("url") {
        *text = redact_url(text);
    }
}

/// A URL as it may be shown: a password and every query value replaced by `[redacted]`.
pub fn redact_url(text: &str) -> String {
    const HIDDEN: &str = "[redacted]";
    let Ok(mut url) = Url::parse(text) else {
        return text.to_owned();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some(HIDDEN));
    }
    if url.query().is_some() {
        let names: Vec<String> = url
            .query_pairs()
            .map(|(name, _)| name.into_owned())
            .collect();
        url.query_pairs_mut()
            .clear()
            .extend_pairs(names.iter().map(|name| (name.as_str(), HIDDEN)));
    }
    url.to_string()
}

#[cfg(test)]
mod redact_tests {
    use super::*;

    #[test]
    fn secrets_are_hidden_and_the_shape_kept() {
        let mut payload = serde_json::json!({
            "method": "POST",
            "url": "https://user:hunter2@hooks.example.com/path?token=s3cret&x=1",
            "headers": {"X-Token": "s3cret-header"},
            "params": {"api_key": "s3cret-param"},
            "auth": {"bearer": "s3cret-bearer"},
            "data": {"name": "Luke"}
        });
        redact(&mut payload);
        let shown = payload.to_string();
        for secret in ["hunter2", "s3cret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert_eq!(
            payload["url"],
            "https://user:%5Bredacted%5D@hooks.example.com/path?token=%5Bredacted%5D&x=%5Bredacted%5D"
        );
        assert_eq!(payload["headers"]["X-Token"], "[redacted]");
        assert_eq!(payload["params"]["api_key"], "[redacted]");
        assert_eq!(payload["auth"]["bearer"], "[redacted]");
        assert_eq!(payload["data"]["name"], "Luke");
        assert_eq!(payload["method"], "POST");
    }
}
