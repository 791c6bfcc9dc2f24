//! The CLI's side of the API: `send`, `status`, `dlq`.

use anyhow::{Context, bail};
use serde_json::Value;

fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(90))
        .build()
        .context("cannot build an HTTP client")
}

async fn call(request: reqwest::RequestBuilder, token: Option<&str>) -> anyhow::Result<Value> {
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let response = request
        .send()
        .await
        .context("cannot reach the server (is `destinations serve` running? see --server)")?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or("no error message");
        bail!("{status}: {message}");
    }
    Ok(body)
}

fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub(crate) async fn send(
    server: &str,
    token: Option<&str>,
    destination: &str,
    payload: &str,
) -> anyhow::Result<()> {
    serde_json::from_str::<Value>(payload).context("the payload is not valid JSON")?;
    let request = client()?
        .post(format!("{server}/v1/send/{destination}"))
        .header("content-type", "application/json")
        .body(payload.to_owned());
    print(&call(request, token).await?);
    Ok(())
}

pub(crate) async fn status(
    server: &str,
    token: Option<&str>,
    id: &str,
    wait: Option<&str>,
) -> anyhow::Result<()> {
    let url = match wait {
        Some(wait) => format!("{server}/v1/events/{id}?wait={wait}"),
        None => format!("{server}/v1/events/{id}"),
    };
    let request = client()?.get(url);
    print(&call(request, token).await?);
    Ok(())
}

pub(crate) async fn dlq_list(
    server: &str,
    token: Option<&str>,
    limit: usize,
) -> anyhow::Result<()> {
    let request = client()?.get(format!("{server}/v1/dead-letters?limit={limit}"));
    print(&call(request, token).await?);
    Ok(())
}

pub(crate) async fn dlq_replay(
    server: &str,
    token: Option<&str>,
    ids: &[String],
) -> anyhow::Result<()> {
    let body = if ids.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::json!({ "ids": ids })
    };
    let request = client()?
        .post(format!("{server}/v1/dead-letters/replay"))
        .json(&body);
    print(&call(request, token).await?);
    Ok(())
}
