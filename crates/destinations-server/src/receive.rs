//! `destinations receive`: a debug receiver that prints each request it gets.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};

pub(crate) async fn run(listen: SocketAddr, status: u16) -> anyhow::Result<()> {
    let status = StatusCode::from_u16(status).context("--status is not an HTTP status")?;
    let app = Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| async move {
            print_request(&method, &uri, &headers, &body);
            status
        },
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("receiving on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .await
        .context("the receiver failed")?;
    Ok(())
}

fn print_request(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{method} {uri}");
    for (name, value) in headers {
        let value = if name == "authorization" {
            "[hidden]".into()
        } else {
            String::from_utf8_lossy(value.as_bytes())
        };
        let _ = writeln!(out, "  {name}: {value}");
    }
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => serde_json::to_string_pretty(&json).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    if !text.is_empty() {
        let _ = writeln!(out, "{text}");
    }
    let _ = writeln!(out);
    let _ = out.flush();
}
