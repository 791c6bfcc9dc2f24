//! What a web page cannot make the server do (review S1): requests are checked before any
//! route sees them.
//!
//! - **DNS rebinding**: a server listening on loopback answers only to loopback `Host` names
//!   (`localhost`, `*.localhost`, loopback addresses) and to the names in `allowed_hosts`; a page
//!   on `evil.example` that rebinds its name to 127.0.0.1 is refused, so it can neither send nor
//!   read. Listening beyond loopback needs an API token, and `allowed_hosts` (if set) applies
//!   there too.
//! - **Cross-site requests**: a request that changes something (any method but GET, HEAD and
//!   OPTIONS) is refused when the browser says it comes from another site (`Origin` not this
//!   server's, or `Sec-Fetch-Site` other than `same-origin` / `none`).
//! - **Simple requests**: a body must be JSON (`Content-Type: application/json`), which a page
//!   cannot send to another origin without the browser asking first (CORS preflight, which this
//!   server never grants).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The `Host` names a server answers to.
#[derive(Debug, Clone)]
pub(crate) struct RequestGuard {
    /// Loopback names and addresses are answered to (the server listens on loopback).
    loopback: bool,
    /// Names answered to besides (lower case, no port); empty with `loopback` off: any.
    allowed_hosts: Vec<String>,
}

impl RequestGuard {
    /// The guard for a server listening on `listen` with these extra host names.
    pub(crate) fn new(listen: SocketAddr, allowed_hosts: &[String]) -> Self {
        Self {
            loopback: listen.ip().is_loopback(),
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether any `Host` is answered to.
    fn any_host(&self) -> bool {
        !self.loopback && self.allowed_hosts.is_empty()
    }

    /// Whether `host` (a `Host` header value, port included or not) is one this server answers
    /// to.
    fn answers_to(&self, host: &str) -> bool {
        if self.any_host() {
            return true;
        }
        let Some(name) = host_name(host) else {
            return false;
        };
        if self.allowed_hosts.contains(&name) {
            return true;
        }
        self.loopback
            && (name == "localhost"
                || name.ends_with(".localhost")
                || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()))
    }
}

/// The name of a `Host` value, lower case, without port, brackets or a trailing dot.
fn host_name(host: &str) -> Option<String> {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split_once(']')?.0
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// The `Host` of a request: the header, or the authority of an absolute-form or HTTP/2 URI.
fn request_host(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
}

/// Whether the method changes something (a browser sends these cross-site only as forms or
/// no-cors fetches, which is what is refused).
fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Why a request from a browser on another site is refused, if it is.
fn cross_site(headers: &HeaderMap, host: &str) -> Option<String> {
    if let Some(site) = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .filter(|site| !matches!(*site, "same-origin" | "none"))
    {
        return Some(format!(
            "the browser says this request comes from another site (Sec-Fetch-Site: {site})"
        ));
    }
    let origin = headers.get(header::ORIGIN)?;
    let same = origin
        .to_str()
        .ok()
        .and_then(|origin| {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
        })
        .is_some_and(|authority| authority.eq_ignore_ascii_case(host));
    (!same).then(|| {
        format!(
            "requests from pages on another origin ({}) are refused; call the API from a program",
            origin.to_str().unwrap_or("not text")
        )
    })
}

/// Whether a request carries a body.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|length| length.trim() != "0")
}

/// Whether the body is declared JSON: `application/json` or `application/*+json`, any
/// parameters.
fn declared_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|essence| essence.trim().to_ascii_lowercase())
        .is_some_and(|essence| {
            essence == "application/json"
                || (essence.starts_with("application/") && essence.ends_with("+json"))
        })
}

/// The middleware: refuses what a page on another site could send, before any route runs.
pub(crate) async fn guard_requests(
    State(guard): State<Arc<RequestGuard>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request_host(&request).unwrap_or_default().to_owned();
    if !guard.answers_to(&host) {
        return ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
            format!(
                "this server does not answer to Host `{host}`: it listens on loopback and answers to loopback names only; add the name to `allowed_hosts` to reach it by that name"
            ),
        )
        .into_response();
    }
    if changes_state(request.method()) {
        if let Some(why) = cross_site(request.headers(), &host) {
            return ApiError::new(StatusCode::FORBIDDEN, "cross_site", why).into_response();
        }
        if has_body(request.headers()) && !declared_json(request.headers()) {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "a request body must be JSON, sent with `Content-Type: application/json` (this one says {}); with curl, use --json",
                    request
                        .headers()
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map_or_else(|| "nothing".to_owned(), |v| format!("`{v}`"))
                ),
            )
            .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> RequestGuard {
        RequestGuard::new(
            "127.0.0.1:8080".parse().unwrap_or_else(|e| panic!("{e}")),
            &[],
        )
    }

    #[test]
    fn a_loopback_server_answers_to_loopback_names_only() {
        let guard = loopback();
        for host in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.:8080",
            "app.localhost:8080",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:8080",
        ] {
            assert!(guard.answers_to(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::ffff:7f00:1]:8080",
            "127.0.0.1.nip.io",
        ] {
            assert!(!guard.answers_to(host), "{host}");
        }
    }

    #[test]
    fn allowed_hosts_add_names_and_bind_a_public_server_to_them() {
        let names = vec!["Hooks.Example.com".to_owned()];
        let local = RequestGuard::new(
            "127.0.0.1:8080".parse().unwrap_or_else(|e| panic!("{e}")),
            &names,
        );
        assert!(local.answers_to("hooks.example.com:443"));
        let public = RequestGuard::new(
            "0.0.0.0:8080".parse().unwrap_or_else(|e| panic!("{e}")),
            &names,
        );
        assert!(public.answers_to("hooks.example.com"));
        assert!(!public.answers_to("other.example.com"));
        let open = RequestGuard::new(
            "0.0.0.0:8080".parse().unwrap_or_else(|e| panic!("{e}")),
            &[],
        );
        assert!(open.answers_to("anything.example"), "the token guards it");
    }

    #[test]
    fn json_is_recognised_with_parameters_and_suffixes() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(value),
            );
            declared_json(&headers)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!with("multipart/form-data; boundary=x"));
        assert!(!with("text/json+html"));
    }

    #[test]
    fn another_origin_or_site_is_cross_site() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, header::HeaderValue::from_static(value));
            }
            cross_site(&headers, "127.0.0.1:8080")
        };
        assert!(with(&[]).is_none(), "a program sends neither header");
        assert!(with(&[("origin", "http://127.0.0.1:8080")]).is_none());
        assert!(with(&[("sec-fetch-site", "same-origin")]).is_none());
        assert!(with(&[("origin", "http://evil.example")]).is_some());
        assert!(with(&[("origin", "null")]).is_some());
        assert!(with(&[("origin", "http://127.0.0.1:9999")]).is_some());
        assert!(with(&[("sec-fetch-site", "cross-site")]).is_some());
        assert!(with(&[("sec-fetch-site", "same-site")]).is_some());
    }
}
