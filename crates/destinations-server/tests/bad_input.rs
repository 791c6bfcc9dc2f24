//! A corpus of bad input, against a real server on its embedded defaults (every destination
//! on, loopback allowed, so that a send wrongly accepted would arrive): each case is refused
//! with a JSON error that names the field — inside a run, with the send's index — and nothing
//! reaches a target.

mod common;

use common::Server;
use destinations_testkit::{Receiver, TempDir, files_under};
use serde_json::{Value, json};

/// A payload that must be refused, and the field its error must name.
struct BadSend {
    destination: &'static str,
    payload: Value,
    field: &'static str,
}

fn bad(destination: &'static str, field: &'static str, payload: Value) -> BadSend {
    BadSend {
        destination,
        payload,
        field,
    }
}

/// Bad payloads for every destination; `target` is a URL that would receive a send.
fn bad_sends(target: &str) -> Vec<BadSend> {
    let url = || Value::from(target);
    let long = "x".repeat(9000);
    vec![
        // HTTP: URLs in every form a guard or a parser could get wrong.
        bad("http", "url", json!({"url": "ftp://example.com/"})),
        bad("http", "url", json!({"url": "file:///etc/passwd"})),
        bad("http", "url", json!({"url": "javascript:alert(1)"})),
        bad("http", "url", json!({"url": "gopher://127.0.0.1:70/"})),
        bad("http", "url", json!({"url": "http://exa mple.com/"})),
        bad(
            "http",
            "url",
            json!({"url": format!("{target}\r\nX-Injected: 1")}),
        ),
        bad("http", "url", json!({"url": format!("{target}\n")})),
        bad("http", "url", json!({"url": format!("{target}\t")})),
        bad("http", "url", json!({"url": format!(" {target}")})),
        bad("http", "url", json!({"url": format!("{target}?a=b c")})),
        bad("http", "url", json!({"url": format!("{target}\u{0000}")})),
        bad("http", "url", json!({"url": "http://[::1"})),
        bad("http", "url", json!({"url": "http://"})),
        bad("http", "url", json!({"url": "not a url"})),
        bad("http", "url", json!({"url": ""})),
        bad(
            "http",
            "url",
            json!({"url": format!("http://example.com/{long}")}),
        ),
        bad(
            "http",
            "url",
            json!({"url": "http://user:pass@example.com/"}),
        ),
        bad("http", "url", json!({"url": "http://user@example.com/"})),
        bad("http", "url", json!({"url": 42})),
        bad("http", "url", json!({"url": null})),
        bad("http", "url", json!({"url": ["http://example.com/"]})),
        bad("http", "url", json!({"method": "POST"})),
        // Methods.
        bad("http", "method", json!({"url": url(), "method": "get"})),
        bad("http", "method", json!({"url": url(), "method": "CONNECT"})),
        bad("http", "method", json!({"url": url(), "method": "TRACE"})),
        bad("http", "method", json!({"url": url(), "method": "BREW"})),
        bad("http", "method", json!({"url": url(), "method": 1})),
        bad("http", "method", json!({"url": url(), "method": ""})),
        // Headers: injection, reserved names, wrong types.
        bad(
            "http",
            "headers",
            json!({"url": url(), "headers": {"X\r\nInjected": "1"}}),
        ),
        bad(
            "http",
            "headers.X-A",
            json!({"url": url(), "headers": {"X-A": "a\r\nInjected: 1"}}),
        ),
        bad(
            "http",
            "headers.X-A",
            json!({"url": url(), "headers": {"X-A": "a\nb"}}),
        ),
        bad(
            "http",
            "headers.X-A",
            json!({"url": url(), "headers": {"X-A": 1}}),
        ),
        bad(
            "http",
            "headers.X-A",
            json!({"url": url(), "headers": {"X-A": null}}),
        ),
        bad(
            "http",
            "headers",
            json!({"url": url(), "headers": {"bad name": "1"}}),
        ),
        bad(
            "http",
            "headers",
            json!({"url": url(), "headers": ["X-A: 1"]}),
        ),
        bad(
            "http",
            "headers.Host",
            json!({"url": url(), "headers": {"Host": "evil.example"}}),
        ),
        bad(
            "http",
            "headers.Content-Length",
            json!({"url": url(), "headers": {"Content-Length": "5"}}),
        ),
        bad(
            "http",
            "headers.Transfer-Encoding",
            json!({"url": url(), "headers": {"Transfer-Encoding": "chunked"}}),
        ),
        bad(
            "http",
            "headers.Proxy-Authorization",
            json!({"url": url(), "headers": {"Proxy-Authorization": "Basic eA=="}}),
        ),
        bad(
            "http",
            "headers.TE",
            json!({"url": url(), "headers": {"TE": "trailers"}}),
        ),
        bad(
            "http",
            "headers.Expect",
            json!({"url": url(), "headers": {"Expect": "100-continue"}}),
        ),
        bad(
            "http",
            "headers.Idempotency-Key",
            json!({"url": url(), "headers": {"Idempotency-Key": "mine"}}),
        ),
        bad(
            "http",
            "headers.Connection",
            json!({"url": url(), "headers": {"Connection": "close"}}),
        ),
        // Params and auth.
        bad(
            "http",
            "params.a",
            json!({"url": url(), "params": {"a": 1}}),
        ),
        bad("http", "params", json!({"url": url(), "params": "a=1"})),
        bad(
            "http",
            "auth",
            json!({"url": url(), "auth": {"bearer": "t", "username": "u"}}),
        ),
        bad(
            "http",
            "auth",
            json!({"url": url(), "auth": {"password": "p"}}),
        ),
        bad(
            "http",
            "auth",
            json!({"url": url(), "auth": {"bearer": "a\r\nb"}}),
        ),
        bad("http", "auth", json!({"url": url(), "auth": {}})),
        bad(
            "http",
            "auth.token",
            json!({"url": url(), "auth": {"token": "t"}}),
        ),
        // Unknown fields at every level, and payloads that are not objects.
        bad("http", "body", json!({"url": url(), "body": "hi"})),
        bad("http", "Url", json!({"Url": target})),
        bad("http", "", json!([])),
        bad("http", "", json!(["http://example.com/", "POST"])),
        bad("http", "", json!("http://example.com/")),
        bad("http", "", json!(null)),
        bad("http", "", json!(42)),
        bad("s3", "", json!([])),
        bad("email", "", json!(true)),
        bad("sse", "", json!([{"channel": "c"}])),
        bad("emit", "", json!("event")),
        // S3: bucket and prefix tricks.
        bad(
            "s3",
            "bucket",
            json!({"bucket": "../up", "prefix": "p", "payload": {}}),
        ),
        bad(
            "s3",
            "bucket",
            json!({"bucket": "a/b", "prefix": "p", "payload": {}}),
        ),
        bad(
            "s3",
            "bucket",
            json!({"bucket": "", "prefix": "p", "payload": {}}),
        ),
        bad(
            "s3",
            "bucket",
            json!({"bucket": "UPPER", "prefix": "p", "payload": {}}),
        ),
        bad(
            "s3",
            "bucket",
            json!({"bucket": "x", "prefix": "p", "payload": {}}),
        ),
        bad(
            "s3",
            "bucket",
            json!({"bucket": "a\u{0000}b", "prefix": "p", "payload": {}}),
        ),
        bad(
            "s3",
            "bucket",
            json!({"bucket": 1, "prefix": "p", "payload": {}}),
        ),
        bad("s3", "bucket", json!({"prefix": "p", "payload": {}})),
        bad(
            "s3",
            "prefix",
            json!({"bucket": "analytics", "prefix": "../etc", "payload": {}}),
        ),
        bad(
            "s3",
            "prefix",
            json!({"bucket": "analytics", "prefix": "a/../../b", "payload": {}}),
        ),
        bad(
            "s3",
            "prefix",
            json!({"bucket": "analytics", "prefix": "/absolute", "payload": {}}),
        ),
        bad(
            "s3",
            "prefix",
            json!({"bucket": "analytics", "prefix": "a//b", "payload": {}}),
        ),
        bad(
            "s3",
            "prefix",
            json!({"bucket": "analytics", "prefix": "a/./b", "payload": {}}),
        ),
        bad(
            "s3",
            "prefix",
            json!({"bucket": "analytics", "prefix": "a\u{0000}b", "payload": {}}),
        ),
        bad(
            "s3",
            "prefix",
            json!({"bucket": "analytics", "prefix": "a\r\nb", "payload": {}}),
        ),
        bad(
            "s3",
            "prefix",
            json!({"bucket": "analytics", "prefix": 5, "payload": {}}),
        ),
        bad(
            "s3",
            "payload",
            json!({"bucket": "analytics", "prefix": "p"}),
        ),
        bad(
            "s3",
            "key",
            json!({"bucket": "analytics", "prefix": "p", "payload": {}, "key": "x"}),
        ),
        // Email: header and address tricks.
        bad(
            "email",
            "subject",
            json!({"subject": "a\r\nBcc: x@evil.example", "text": "x"}),
        ),
        bad("email", "subject", json!({"subject": "a\nb", "text": "x"})),
        bad(
            "email",
            "subject",
            json!({"subject": "s".repeat(2000), "text": "x"}),
        ),
        bad("email", "subject", json!({"subject": 1, "text": "x"})),
        bad("email", "subject", json!({"text": "x"})),
        bad(
            "email",
            "to[0]",
            json!({"subject": "s", "text": "x", "to": ["x@else.example"]}),
        ),
        bad(
            "email",
            "to[0]",
            json!({"subject": "s", "text": "x", "to": ["Name <a@example.com>"]}),
        ),
        bad(
            "email",
            "to[0]",
            json!({"subject": "s", "text": "x", "to": ["a@example.com\r\nBcc: b@evil.example"]}),
        ),
        bad(
            "email",
            "to[0]",
            json!({"subject": "s", "text": "x", "to": ["a%evil.example@localhost"]}),
        ),
        bad(
            "email",
            "to[0]",
            json!({"subject": "s", "text": "x", "to": ["plain"]}),
        ),
        bad(
            "email",
            "to[1]",
            json!({"subject": "s", "text": "x", "to": ["owner@localhost", "a,b@localhost"]}),
        ),
        bad(
            "email",
            "to",
            json!({"subject": "s", "text": "x", "to": "owner@localhost"}),
        ),
        bad(
            "email",
            "cc[0]",
            json!({"subject": "s", "text": "x", "cc": ["a@x.example"]}),
        ),
        bad(
            "email",
            "attachments[0].filename",
            json!({"subject": "s", "text": "x", "attachments": [{"filename": "a\r\nb.txt", "content_type": "text/plain", "content": "eA=="}]}),
        ),
        bad(
            "email",
            "attachments[0].content",
            json!({"subject": "s", "text": "x", "attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "not base64!"}]}),
        ),
        bad(
            "email",
            "attachments[0]",
            json!({"subject": "s", "text": "x", "attachments": [{"filename": "a.txt"}]}),
        ),
        bad(
            "email",
            "bcc",
            json!({"subject": "s", "text": "x", "bcc": ["owner@localhost"]}),
        ),
        // SSE and emit names.
        bad("sse", "channel", json!({"channel": "a b", "payload": {}})),
        bad("sse", "channel", json!({"channel": "a\nb", "payload": {}})),
        bad("sse", "channel", json!({"channel": "", "payload": {}})),
        bad(
            "sse",
            "stream",
            json!({"channel": "c", "stream": "../x", "payload": {}}),
        ),
        bad(
            "sse",
            "stream",
            json!({"channel": "c", "stream": "s".repeat(300), "payload": {}}),
        ),
        bad("sse", "payload", json!({"channel": "c"})),
        bad(
            "sse",
            "id",
            json!({"channel": "c", "payload": {}, "id": "x"}),
        ),
        bad(
            "emit",
            "emitter_id",
            json!({"event": {}, "emitter_id": "a b"}),
        ),
        bad(
            "emit",
            "emitter_id",
            json!({"event": {}, "emitter_id": "x".repeat(300)}),
        ),
        bad("emit", "channel", json!({"event": {}, "channel": "a\nb"})),
        bad("emit", "$delivery", json!({"event": {}, "$delivery": {}})),
        bad("emit", "event", json!({"emitter_id": "e"})),
    ]
}

/// Read a refusal: its status, and its JSON error (code and message), or a failure saying
/// what came instead.
async fn refusal(response: reqwest::Response, what: &str) -> (u16, String, String) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = tokio::time::timeout(common::WITHIN, response.text())
        .await
        .unwrap_or_else(|_| panic!("{what}: {status} and a body that never ends (accepted?)"))
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{what}: {status} answered as `{content_type}`, not JSON: {text:?}"
    );
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("{what}: {status} with a body that is not JSON ({e}): {text:?}")
    });
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        !code.is_empty() && !message.is_empty(),
        "{what}: {status} without error.code and error.message: {text}"
    );
    (status, code, message)
}

#[tokio::test]
async fn every_bad_input_is_refused_as_json_naming_the_field_and_nothing_arrives() {
    let receiver = Receiver::start().await;
    let dir = TempDir::new("bad-input");
    let server = Server::start_in(None, &[], Some(dir.path())).await;
    let target = receiver.url("/must-not-arrive");
    let mut cases = 0;

    for (index, case) in bad_sends(&target).into_iter().enumerate() {
        // Alone, on the destination's own endpoint...
        let response = server
            .http
            .post(format!("{}/v1/send/{}", server.base, case.destination))
            .header("content-type", "application/json")
            .body(case.payload.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let what = format!("case {index} ({} {})", case.destination, case.payload);
        let (status, code, message) = refusal(response, &what).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_payload"),
            "{what}: {message}"
        );
        let named = if case.field.is_empty() {
            message.contains("must be a JSON object")
        } else {
            message.contains(&format!("`{}", case.field))
        };
        assert!(
            named,
            "{what}: the message should name `{}`: {message}",
            case.field
        );
        cases += 1;
        // ...and as the fourth send of a run whose other sends are good: the run is refused
        // whole, naming the send by its index.
        let good = json!({"destination": "http", "payload": {"url": target}});
        let run = json!({"sends": [good, good, good, {"destination": case.destination, "payload": case.payload}]});
        let (status, body) = server.post("/v1/runs", &run).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(
            (status, common::error_code(&body)),
            (400, "invalid_payload"),
            "{what} in a run: {body}"
        );
        let path = if case.field.is_empty() {
            "`sends[3].payload`".to_owned()
        } else {
            format!("`sends[3].payload.{}", case.field)
        };
        assert!(
            message.contains(&path),
            "{what} in a run: the message should name `sends[3].payload.{}`: {message}",
            case.field
        );
        // The field is given apart too, for programs: its whole path.
        let field = body["error"]["field"].as_str().unwrap_or_default();
        assert!(
            field.starts_with(path.trim_matches('`')),
            "{what} in a run: `error.field` should be the path {path}…: {body}"
        );
        cases += 1;
    }

    // A run names the send at fault by its index, whatever is wrong with it.
    let good = json!({"destination": "http", "payload": {"url": target}});
    for (send, status, code, field) in [
        (
            json!({"destination": "nowhere", "payload": {}}),
            404,
            "unknown_destination",
            "`sends[2].destination`",
        ),
        (
            json!({"destination": "http", "payload": {"url": target, "data": "x".repeat(2 << 20)}}),
            413,
            "payload_too_large",
            "`sends[2].payload`",
        ),
    ] {
        let (got, body) = server
            .post("/v1/runs", &json!({"sends": [good, good, send]}))
            .await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!((got, common::error_code(&body)), (status, code), "{body}");
        assert!(message.contains(field), "{field}: {message}");
        assert_eq!(body["error"]["field"], field.trim_matches('`'), "{body}");
        cases += 1;
    }

    // The API itself: bodies, routes, methods, query strings.
    let raw: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": [".to_vec(),
            400,
            "invalid_payload",
        ),
        ("POST", "/v1/runs", b"".to_vec(), 400, "invalid_payload"),
        ("POST", "/v1/runs", b"null".to_vec(), 400, "invalid_payload"),
        ("POST", "/v1/runs", b"[]".to_vec(), 400, "invalid_payload"),
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": \"x\"}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": [], \"extra\": 1}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": [{\"destination\": \"http\"}]}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": [{\"payload\": {}}]}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": [{\"destination\": \"http\", \"payload\": {}, \"x\": 1}]}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"run_id\": \"a b\", \"sends\": []}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            format!("{{\"run_id\": \"{}\", \"sends\": []}}", "r".repeat(10_000)).into_bytes(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"run_id\": 7, \"sends\": []}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": [], \"failed\": \"yes\"}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": [\xff\xfe]}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"\xef\xbb\xbf{\"sends\": []}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": []}\x00".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/runs",
            b"{\"sends\": []} {}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/send/http",
            b"{\"url\": \"http://a\xc3\x28/\"}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/send/http",
            format!(
                "{{\"url\": \"{target}\", \"data\": \"{}\"}}",
                "x".repeat(2 << 20)
            )
            .into_bytes(),
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/send/http",
            vec![b' '; 17 << 20],
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/send/nowhere",
            b"{}".to_vec(),
            404,
            "unknown_destination",
        ),
        ("POST", "/v1/send/", b"{}".to_vec(), 404, "not_found"),
        ("GET", "/v1/runs", vec![], 405, "method_not_allowed"),
        (
            "PUT",
            "/v1/send/http",
            b"{}".to_vec(),
            405,
            "method_not_allowed",
        ),
        ("DELETE", "/v1/runs", vec![], 405, "method_not_allowed"),
        ("GET", "/v1/nothing-here", vec![], 404, "not_found"),
        ("GET", "/v1/events/not-an-id", vec![], 400, "invalid_id"),
        (
            "GET",
            "/v1/events/01a208c6-6307-7f2f-8594-f5794d754c2e?wait=forever",
            vec![],
            400,
            "invalid_wait",
        ),
        (
            "GET",
            "/v1/events/01a208c6-6307-7f2f-8594-f5794d754c2e?hold=1",
            vec![],
            400,
            "invalid_query",
        ),
        ("GET", "/v1/events?state=lost", vec![], 400, "invalid_query"),
        ("GET", "/v1/events?after=nope", vec![], 400, "invalid_query"),
        ("GET", "/v1/events?limit=0", vec![], 400, "invalid_query"),
        ("GET", "/v1/events?until=soon", vec![], 400, "invalid_query"),
        ("GET", "/v1/events?colour=red", vec![], 400, "invalid_query"),
        (
            "GET",
            "/v1/dead-letters?limit=abc",
            vec![],
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v1/dead-letters?limit=100000",
            vec![],
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v1/dead-letters?since=yesterday",
            vec![],
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/v1/dead-letters?after=%ff",
            vec![],
            400,
            "invalid_query",
        ),
        (
            "POST",
            "/v1/dead-letters/replay",
            b"{\"ids\": [\"x\"]}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/dead-letters/replay",
            b"{\"limit\": -1}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/dead-letters/replay",
            b"{\"all\": true}".to_vec(),
            400,
            "invalid_payload",
        ),
        (
            "POST",
            "/v1/subscriptions",
            b"{\"emitter_id\": \"a b\", \"listener_id\": \"l\"}".to_vec(),
            400,
            "invalid_subscription",
        ),
        (
            "POST",
            "/v1/subscriptions",
            b"{\"emitter_id\": \"e\"}".to_vec(),
            400,
            "invalid_subscription",
        ),
        (
            "POST",
            "/v1/subscriptions",
            b"{\"emitter_id\": \"e\", \"listener_id\": \"ftp://x/\"}".to_vec(),
            400,
            "invalid_subscription",
        ),
        (
            "POST",
            "/v1/subscriptions",
            b"{\"emitter_id\": \"e\", \"listener_id\": \"l\", \"x\": 1}".to_vec(),
            400,
            "invalid_subscription",
        ),
        (
            "DELETE",
            "/v1/subscriptions",
            vec![],
            400,
            "invalid_subscription",
        ),
        (
            "GET",
            "/v1/emitters/a%20b/events",
            vec![],
            400,
            "invalid_emitter",
        ),
        (
            "GET",
            "/v1/emitters/e/events?limit=x",
            vec![],
            400,
            "bad_request",
        ),
        ("GET", "/v1/sse/bad%20name", vec![], 400, "invalid_stream"),
        ("GET", "/v1/sse/x?from=0", vec![], 400, "bad_request"),
    ];
    // A connection per request: a server that refuses a large body early closes it.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    for (method, path, body, status, code) in raw {
        let mut request = fresh.request(
            method.parse().unwrap_or_else(|e| panic!("{e}")),
            format!("{}{path}", server.base),
        );
        if !body.is_empty() {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{e}"));
        let (got_status, got_code, message) = refusal(response, &format!("{method} {path}")).await;
        assert_eq!(
            (got_status, got_code.as_str()),
            (status, code),
            "{method} {path}: {message}"
        );
        cases += 1;
    }

    // Authentication, on a server with a token.
    let guarded = Server::start_with(
        None,
        &[("DESTINATIONS__API_TOKEN", "a-token-for-the-corpus-0001")],
    )
    .await;
    for authorization in [
        None,
        Some("Bearer wrong-token-for-the-corpus-01"),
        Some("Bearer "),
        Some("Basic YTpi"),
        Some("a-token-for-the-corpus-0001"),
        Some("Bearer a-token-for-the-corpus-0001x"),
    ] {
        let mut request = guarded
            .http
            .post(format!("{}/v1/send/http", guarded.base))
            .header("content-type", "application/json")
            .body(json!({"url": target}).to_string());
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{e}"));
        let (status, code, _) = refusal(response, &format!("{authorization:?}")).await;
        assert_eq!(
            (status, code.as_str()),
            (401, "unauthorized"),
            "{authorization:?}"
        );
        cases += 1;
    }

    assert!(cases >= 150, "only {cases} cases");
    eprintln!("bad inputs: {cases} refused as JSON, each naming its field");
    assert!(server.terminate().await.success());
    assert!(
        receiver.requests().is_empty(),
        "a bad input reached the receiver"
    );
    for folder in ["data/objects", "data/outbox"] {
        let written = files_under(&dir.path().join(folder));
        assert!(written.is_empty(), "a bad input was written: {written:?}");
    }
}
