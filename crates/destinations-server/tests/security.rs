//! Safe by default: what a hostile page, a proxy variable or a slow client cannot make the
//! server do. Real server processes on 127.0.0.1.

mod common;

use std::time::Duration;

use common::Server;
use destinations_testkit::{Receiver, Reply};
use serde_json::json;

/// A proxy from the environment would resolve the target itself, out of the address guard's
/// sight: the server never uses one (review S2).
#[tokio::test]
async fn proxy_variables_do_not_carry_sends_past_the_address_guard() {
    // Stands in for a forward proxy: it answers 200 to whatever is sent through it.
    let proxy = Receiver::start().await;
    let target = Receiver::start().await;
    let proxy_url = proxy.url("");
    let server = Server::start_with(
        Some(
            r#"
            [destinations.web]
            kind = "http"
            "#,
        ),
        &[
            ("HTTP_PROXY", &proxy_url),
            ("http_proxy", &proxy_url),
            ("HTTPS_PROXY", &proxy_url),
            ("ALL_PROXY", &proxy_url),
        ],
    )
    .await;
    let (code, body) = server
        .post(
            "/v1/send/web",
            &json!({"url": format!("http://localhost:{}/internal", target.addr().port())}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let status = server.final_status(&id).await;
    assert_eq!(status["state"], "dead", "{status}");
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("refused to connect to `localhost`"),
        "{error}"
    );
    assert!(
        proxy.requests().is_empty(),
        "nothing went through the proxy: {:?}",
        proxy.requests().iter().map(|r| &r.uri).collect::<Vec<_>>()
    );
    assert!(target.requests().is_empty(), "nothing reached loopback");
}

/// A request a page could make: what it is, its headers, the status and error code expected.
type Attempt = (&'static str, Vec<(&'static str, String)>, u16, &'static str);

/// What a page on another site can send without the browser asking first (review S1): a form
/// or `text/plain` body, a no-cors fetch carrying its `Origin`, a rebound host name. Each is
/// refused as JSON, and nothing reaches the target.
#[tokio::test]
async fn a_page_on_another_site_cannot_make_the_server_send() {
    let target = Receiver::start().await;
    let server = Server::start(None).await;
    let send = json!({"url": target.url("/csrf"), "method": "DELETE"}).to_string();
    let port = server
        .base
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let attempts: Vec<Attempt> = vec![
        (
            "text/plain",
            vec![("content-type", "text/plain;charset=UTF-8".into())],
            415,
            "unsupported_media_type",
        ),
        (
            "a form",
            vec![("content-type", "application/x-www-form-urlencoded".into())],
            415,
            "unsupported_media_type",
        ),
        ("no content type", vec![], 415, "unsupported_media_type"),
        (
            "another origin",
            vec![
                ("content-type", "application/json".into()),
                ("origin", "http://evil.example".into()),
            ],
            403,
            "cross_site",
        ),
        (
            "a sandboxed page",
            vec![
                ("content-type", "application/json".into()),
                ("origin", "null".into()),
            ],
            403,
            "cross_site",
        ),
        (
            "the browser says cross-site",
            vec![
                ("content-type", "application/json".into()),
                ("sec-fetch-site", "cross-site".into()),
            ],
            403,
            "cross_site",
        ),
        (
            "a rebound host name",
            vec![
                ("content-type", "application/json".into()),
                ("host", format!("evil.example:{port}")),
            ],
            421,
            "unknown_host",
        ),
    ];
    for (what, headers, status, code) in attempts {
        let mut request = server
            .http
            .post(format!("{}/v1/send/http", server.base))
            .body(send.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.status().as_u16(), status, "{what}");
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        assert_eq!(common::error_code(&body), code, "{what}: {body}");
    }
    // A rebound name cannot read either.
    let read = server
        .http
        .get(format!("{}/v1/dead-letters", server.base))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read.status().as_u16(), 421);
    // Webhook subscriptions take query parameters on a body-less POST: still not cross-site.
    let subscribe = server
        .http
        .post(format!(
            "{}/v1/subscriptions?emitter_id=*&listener_id={}",
            server.base,
            target.url("/listener")
        ))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(subscribe.status().as_u16(), 403);
    let (_, listed) = server.get("/v1/subscriptions").await;
    assert_eq!(listed["subscriptions"], json!([]), "{listed}");
    // The same send from a program (JSON, or a same-origin page) goes out.
    let same_origin = server
        .http
        .post(format!("{}/v1/send/http", server.base))
        .header("content-type", "application/json")
        .header("origin", server.base.clone())
        .body(send)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(same_origin.status().as_u16(), 202);
    let body: serde_json::Value = same_origin.json().await.unwrap_or_default();
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(server.final_status(&id).await["state"], "delivered");
    let arrived = target.requests();
    assert_eq!(arrived.len(), 1, "only the program's send arrived");
    assert_eq!(arrived[0].method, "DELETE");
}

/// Beyond loopback, anyone who reaches the port could use the server: it needs a token, and
/// a token must be one (review S1, S6).
#[tokio::test]
async fn listening_beyond_loopback_needs_a_real_token() {
    let dir = destinations_testkit::TempDir::new("exposure");
    let start = |listen: &'static str, token: Option<&'static str>| {
        let dir = dir.path().to_owned();
        async move {
            let mut env = vec![];
            if let Some(token) = token {
                env.push(("DESTINATIONS__API_TOKEN", token));
            }
            tokio::time::timeout(
                common::WITHIN,
                common::cli_in(&dir, &["serve", "--listen", listen], &env),
            )
            .await
            .unwrap_or_else(|_| panic!("serve --listen {listen} started; it should have refused"))
        }
    };
    let (ok, _, stderr) = start("0.0.0.0:0", None).await;
    assert!(!ok);
    assert!(
        stderr.contains("without an API token") && stderr.contains("api_token"),
        "{stderr}"
    );
    let (ok, _, stderr) = start("127.0.0.1:0", Some("")).await;
    assert!(!ok, "an empty token is not `no token`");
    assert!(
        stderr.contains("`api_token`") && stderr.contains("at least 16"),
        "{stderr}"
    );
    let (ok, _, stderr) = start("0.0.0.0:0", Some("short")).await;
    assert!(!ok);
    assert!(stderr.contains("`api_token`"), "{stderr}");
}

/// The server's address as host:port.
fn address(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Read from a raw connection until the server closes it; what it said.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut said = Vec::new();
    tokio::time::timeout(common::WITHIN, stream.read_to_end(&mut said))
        .await
        .unwrap_or_else(|_| panic!("the server kept the connection open"))
        .unwrap_or_default();
    String::from_utf8_lossy(&said).into_owned()
}

/// A client that sends half a request head, or trickles a body, is cut off; a stopping server
/// does not wait for it (review S3).
#[tokio::test]
async fn slow_clients_are_cut_off_and_cannot_hold_a_stopping_server() {
    use tokio::io::AsyncWriteExt;
    let stalled_receiver = Receiver::scripted(|_| {
        Reply::After(Duration::from_secs(3600), Box::new(Reply::Status(200)))
    })
    .await;
    let server = Server::start(Some(
        r#"
        [clients]
        header_timeout = "1s"
        body_timeout = "1s"
        drain_timeout = "2s"
        [hub]
        shutdown_timeout = "1s"
        [destinations.http]
        kind = "http"
        timeout = "1h"
        allow_networks = ["127.0.0.0/8"]
        "#,
    ))
    .await;
    let (code, body) = server
        .post(
            "/v1/send/http",
            &json!({"url": stalled_receiver.url("/slow")}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let pending = body["id"].as_str().unwrap_or_default().to_owned();
    let addr = address(&server);
    // Half a head, then nothing: the connection is closed at the header timeout.
    let mut half_head = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    half_head
        .write_all(b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    read_until_closed(&mut half_head).await;
    // A body announced and then trickled: 408, as JSON.
    let mut trickle = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    trickle
        .write_all(
            b"POST /v1/send/http HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"url\":",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = read_until_closed(&mut trickle).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    // A stopping server closes what is still busy at the drain deadline: a half-sent head and
    // a status wait that would last a minute.
    let mut stalled = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    stalled
        .write_all(b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let waiting = server
        .http
        .get(format!("{}/v1/events/{pending}?wait=60s", server.base));
    let waiting = tokio::spawn(waiting.send());
    let started = std::time::Instant::now();
    let exit = server.terminate().await;
    let took = started.elapsed();
    assert!(exit.success(), "{exit:?}");
    eprintln!("SIGTERM to exit with a stalled client and a status wait: {took:?}");
    let _ = waiting.await;
}

/// The README's examples must pass the checks above: a body sent with curl says it is JSON.
#[test]
fn the_readme_sends_bodies_as_json() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .unwrap_or_else(|e| panic!("README.md: {e}"));
    let with_body: Vec<&str> = readme
        .lines()
        .filter(|line| line.contains("curl ") && (line.contains(" -d ") || line.contains("--data")))
        .collect();
    assert!(
        with_body.is_empty(),
        "use `curl --json` (the server takes JSON bodies only): {with_body:#?}"
    );
    assert!(readme.contains("--json '"), "the tour sends with --json");
}

/// A secret in a URL (a query token) or in credentials never shows in a status, a dead letter
/// or its listing (review S4).
#[tokio::test]
async fn secrets_in_sends_stay_out_of_statuses_and_dead_letters() {
    let gone = Receiver::unused_address();
    let server = Server::start(Some(
        r#"
        [destinations.http]
        kind = "http"
        allow_networks = ["127.0.0.0/8"]
        retry = { max_attempts = 1 }
        "#,
    ))
    .await;
    let (code, body) = server
        .post(
            "/v1/send/http",
            &json!({
                "url": format!("http://{gone}/hook?token=S3CRET-2"),
                "headers": {"X-Api-Key": "S3CRET-3"},
                "auth": {"bearer": "S3CRET-4"},
                "params": {"sig": "S3CRET-5"},
            }),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let status = server.final_status(&id).await;
    assert_eq!(status["state"], "dead", "{status}");
    let (_, letters) = server.get("/v1/dead-letters").await;
    assert_eq!(letters["dead_letters"][0]["id"], id.as_str(), "{letters}");
    for shown in [status.to_string(), letters.to_string()] {
        assert!(!shown.contains("S3CRET"), "a secret shows: {shown}");
    }
    assert_eq!(
        letters["dead_letters"][0]["payload"]["headers"]["X-Api-Key"],
        "[redacted]"
    );
}

/// `/readyz` answers from a recent check: a crowd of anonymous calls makes one SMTP session,
/// not one each, and the details (host names, errors) are for token holders (review S5).
#[tokio::test]
async fn readiness_is_cached_and_its_details_need_the_token() {
    let smtp = destinations_testkit::smtp::SmtpServer::start(
        destinations_testkit::smtp::SmtpConfig::default(),
    )
    .await;
    let token = "a-token-for-readiness-0001";
    let server = Server::start_with(
        Some(&format!(
            r#"
            readiness_cache = "1h"
            [destinations.mail]
            kind = "email"
            from = "robot@example.com"
            to = ["owner@example.com"]
            [destinations.mail.smtp]
            host = "127.0.0.1"
            port = {}
            tls = "none"
            "#,
            smtp.port()
        )),
        &[("DESTINATIONS__API_TOKEN", token)],
    )
    .await;
    let before = smtp.greetings();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let request = server.http.get(format!("{}/readyz", server.base));
            tokio::spawn(request.send())
        })
        .collect();
    for call in calls {
        let response = call
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.status().as_u16(), 200);
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        assert_eq!(body, json!({"ready": true}), "no details without the token");
    }
    let made = smtp.greetings() - before;
    assert!(made <= 1, "200 calls made {made} SMTP sessions");
    let detailed: serde_json::Value = server
        .http
        .get(format!("{}/readyz", server.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(detailed["destinations"]["mail"]["ok"], true, "{detailed}");
}

/// Headless Chromium on a page of another origin tries what a hostile page can: no-cors
/// POSTs with a `text/plain`, a form-encoded and a JSON-looking body, and a subscription by
/// query string. The page runs (it reports back), the server refuses each, nothing arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_page_in_a_real_browser_cannot_make_the_server_send() {
    let target = Receiver::start().await;
    let server = Server::start(None).await;
    let site = destinations_testkit::Site::bind().await;
    let send = json!({"url": target.url("/csrf"), "method": "DELETE"}).to_string();
    let page = format!(
        r#"<!doctype html><meta charset="utf-8"><title>hostile</title><script>
        const server = "{server}";
        const body = {send:?};
        const attempts = [
          fetch(server + "/v1/send/http", {{method: "POST", mode: "no-cors", body}}),
          fetch(server + "/v1/send/http", {{method: "POST", mode: "no-cors", body: new URLSearchParams({{payload: body}})}}),
          fetch(server + "/v1/send/http", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}}),
          fetch(server + "/v1/subscriptions?emitter_id=*&listener_id={listener}", {{method: "POST", mode: "no-cors"}}),
        ];
        Promise.allSettled(attempts).then(() => fetch("/report", {{method: "POST", body: "done"}}));
        </script>"#,
        server = server.base,
        listener = target.url("/listener"),
    );
    let (reported, mut report) = tokio::sync::mpsc::unbounded_channel::<()>();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || async move { axum::response::Html(page) }),
        )
        .route(
            "/report",
            axum::routing::post(move || async move {
                let _ = reported.send(());
            }),
        );
    let browser = site.open(app, "the browser for the cross-site test");
    tokio::time::timeout(common::WITHIN, report.recv())
        .await
        .unwrap_or_else(|_| panic!("the page never reported that it ran"));
    browser.close().await;
    // Every attempt was answered (the page reported after all settled): none was accepted,
    // none arrived, no subscription was made.
    let metrics = server.text("/metrics").await;
    let accepted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("destinations_sends_accepted_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        accepted, 0.0,
        "a cross-site request was accepted:\n{metrics}"
    );
    assert!(
        target.requests().is_empty(),
        "a cross-site request reached the target"
    );
    let (_, listed) = server.get("/v1/subscriptions").await;
    assert_eq!(listed["subscriptions"], json!([]), "{listed}");
}
