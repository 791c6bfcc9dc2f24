//! The harness of the server's end-to-end tests: `destinations serve` as a real process.

#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use destinations_testkit::TempDir;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_destinations");
pub const WITHIN: Duration = Duration::from_secs(60);

/// A running `destinations serve`, killed when dropped.
pub struct Server {
    child: Child,
    /// The working folder when the test gave none (the embedded defaults write `./data`).
    _dir: Option<TempDir>,
    /// Its config file, removed with it.
    _config: Option<TempConfig>,
    pub base: String,
    pub http: reqwest::Client,
}

/// A config file in the temporary folder, removed when dropped.
pub struct TempConfig(std::path::PathBuf);

impl std::ops::Deref for TempConfig {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempConfig {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn temp_config(text: &str) -> TempConfig {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "destinations-test-{}-{}.toml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    TempConfig(path)
}

impl Server {
    pub async fn start(config: Option<&str>) -> Self {
        Self::start_with(config, &[]).await
    }

    pub async fn start_with(config: Option<&str>, env: &[(&str, &str)]) -> Self {
        Self::start_in(config, env, None).await
    }

    /// Started from the folder `dir` (where the embedded defaults write `./data`).
    pub async fn start_in(config: Option<&str>, env: &[(&str, &str)], dir: Option<&Path>) -> Self {
        let mut command = Command::new(BIN);
        let own_dir = dir.is_none().then(|| TempDir::new("server"));
        command.current_dir(
            dir.or(own_dir.as_ref().map(TempDir::path))
                .unwrap_or(Path::new(".")),
        );
        command.args(["serve", "--listen", "127.0.0.1:0"]);
        let config = config.map(temp_config);
        if let Some(file) = &config {
            command.arg("--config").arg(file);
        }
        command
            .env_remove("DESTINATIONS_CONFIG")
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WITHIN, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the server did not say where it listens"))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("the server exited before listening"));
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_owned();
        Self {
            child,
            _dir: own_dir,
            _config: config,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .id()
            .unwrap_or_else(|| panic!("the server already exited"))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, serde_json::to_vec(body).unwrap_or_default())
            .await
    }

    /// POST one run of these sends, accepted (`202`); their ids, in order.
    pub async fn post_run(&self, sends: Vec<Value>) -> Vec<String> {
        let (code, body) = self.post("/v1/runs", &json!({ "sends": sends })).await;
        assert_eq!(code, 202, "{body}");
        body["ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect()
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn text(&self, path: &str) -> String {
        let response = self.http.get(format!("{}{path}", self.base)).send().await;
        response
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .text()
            .await
            .unwrap_or_default()
    }

    /// POST a payload that must be refused with 400; the error's message.
    pub async fn refused(&self, path: &str, body: &Value) -> String {
        let (code, answer) = self.post(path, body).await;
        assert_eq!(code, 400, "{answer}");
        assert_eq!(error_code(&answer), "invalid_payload", "{answer}");
        answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The status of a send once it is final.
    pub async fn final_status(&self, id: &str) -> Value {
        let (code, status) = self.get(&format!("/v1/events/{id}?wait=30s")).await;
        assert_eq!(code, 200, "{status}");
        status
    }

    /// `kill -9`: no shutdown of any kind.
    pub async fn kill9(mut self) {
        let pid = self
            .child
            .id()
            .unwrap_or_else(|| panic!("the server already exited"));
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .await;
        assert!(killed.is_ok_and(|s| s.success()), "kill -KILL {pid}");
        let _ = self.child.wait().await;
    }

    /// Start a server that must refuse to start: its exit status and what it said.
    pub async fn refused_start(
        config: Option<&str>,
        dir: &Path,
    ) -> (std::process::ExitStatus, String) {
        Self::refused_start_with(config, dir, &[]).await
    }

    /// The same, with these environment variables.
    pub async fn refused_start_with(
        config: Option<&str>,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> (std::process::ExitStatus, String) {
        let mut command = Command::new(BIN);
        command.envs(env.iter().copied());
        command
            .current_dir(dir)
            .args(["serve", "--listen", "127.0.0.1:0"]);
        let config = config.map(temp_config);
        if let Some(file) = &config {
            command.arg("--config").arg(file);
        }
        let output = tokio::time::timeout(
            WITHIN,
            command
                .env_remove("DESTINATIONS_CONFIG")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("the server did not exit: it should have refused to start"))
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !stdout.contains("listening on"),
            "the server started: {stdout}"
        );
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// SIGTERM, then the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self
            .child
            .id()
            .unwrap_or_else(|| panic!("the server already exited"));
        let killed = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        assert!(killed.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        tokio::time::timeout(WITHIN, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the server did not stop after SIGTERM"))
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// POST runs of `per_run` sends to `url` until `total` are accepted; their ids.
pub async fn send_runs(server: &Server, url: &str, total: usize, per_run: usize) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < total {
        let sends: Vec<Value> = (ids.len()..(ids.len() + per_run).min(total))
            .map(|n| json!({"destination": "http", "payload": {"url": url, "data": {"n": n}}}))
            .collect();
        ids.extend(server.post_run(sends).await);
    }
    ids
}

pub fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Run the CLI; (success, stdout, stderr).
pub async fn cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .env_remove("DESTINATIONS_CONFIG")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Run the CLI from the folder `dir` (where the embedded defaults find `./data`).
pub async fn cli_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env_remove("DESTINATIONS_CONFIG")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
