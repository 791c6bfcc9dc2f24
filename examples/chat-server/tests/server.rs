//! The third-party server binary: the stock command line, with the chat kind added.

use std::process::Stdio;
use std::time::Duration;

use destinations_testkit::{Receiver, TempDir};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_chat-destinations");
const WITHIN: Duration = Duration::from_secs(60);

#[tokio::test]
async fn list_shows_the_chat_kind_beside_the_stock_ones() {
    let out = Command::new(BIN)
        .arg("list")
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout);
    let kinds: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for kind in ["chat", "http", "s3", "email", "sse", "emit"] {
        assert!(kinds.contains(&kind), "`{kind}` missing from:\n{listed}");
    }
}

#[tokio::test]
async fn it_serves_chat_sends_over_the_api_and_refuses_a_bad_one_naming_the_field() {
    let webhook = Receiver::start().await;
    let dir = TempDir::new("chat-server");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[hub.queue]\nkind = \"memory\"\n\n[destinations.team]\nkind = \"chat\"\nwebhook_url = \"{}\"\nchannels = [\"ops\"]\n",
            webhook.url("/hook")
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let checked = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success() && said.contains("destination team: kind chat"),
        "{said}"
    );

    let mut server = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    let stdout = server.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let line = tokio::time::timeout(WITHIN, BufReader::new(stdout).lines().next_line())
        .await
        .unwrap_or_else(|_| panic!("the server did not say where it listens"))
        .ok()
        .flatten()
        .unwrap_or_default();
    let base = format!("http://{}", line.trim_start_matches("listening on "));
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let request = http.post(format!("{base}/v1/runs")).json(&body);
        async move {
            let response = request.send().await.unwrap_or_else(|e| panic!("{e}"));
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.unwrap_or_default())
        }
    };
    let (code, body) = post(json!({"sends": [
        {"destination": "team", "payload": {"text": "deploy finished", "channel": "ops"}}
    ]}))
    .await;
    assert_eq!(code, 202, "{body}");
    webhook.wait_for_requests(1, WITHIN).await;
    let posted = webhook.requests()[0].json();
    assert_eq!(posted, json!({"text": "deploy finished", "channel": "ops"}));

    let (code, body) = post(json!({"sends": [
        {"destination": "team", "payload": {"text": "ok"}},
        {"destination": "team", "payload": {"text": "hi", "channel": "dev"}}
    ]}))
    .await;
    assert_eq!(code, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("sends[1].payload.channel"), "{body}");
    server.kill().await.unwrap_or_else(|e| panic!("{e}"));
}
