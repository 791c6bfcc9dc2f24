//! Test fixtures for `destinations`: real servers on 127.0.0.1 and the conformance suite that
//! every destination runs.

pub mod conformance;
pub mod inspect;
pub mod nats;
pub mod receiver;
pub mod s3;
pub mod smtp;
pub mod sse;

pub use conformance::{Capabilities, ConformanceTarget, SinkBehaviour};
pub use inspect::{dead_letters, delivered, final_status, state, status};
pub use nats::NatsServer;
pub use receiver::{ReceivedRequest, Receiver, Reply};
pub use s3::{Fault, FaultProxy, S3Server, TempDir};
pub use smtp::{CapturedMail, SmtpConfig, SmtpServer};
pub use sse::{SseClient, SseMessage};

/// Every file below `dir`, at any depth (none if it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Fail a test whose external server is missing, naming the command that installs it.
pub fn require_command(command: &str, what: &str) -> std::path::PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(command))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{command}` ({what}) is not installed; run `cargo xtask setup` first")
    })
}

/// A web site of a test's own on 127.0.0.1, bound before its pages are written (they often
/// need their own origin), then served and opened in a browser.
pub struct Site {
    listener: tokio::net::TcpListener,
    origin: String,
}

impl Site {
    /// Bind a free port.
    pub async fn bind() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind a page server: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        Self {
            listener,
            origin: format!("http://127.0.0.1:{port}"),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Serve `app` and open its `/` in headless Chromium (`what` names the test's need of it,
    /// for the message when Chromium is missing).
    pub fn open(self, app: axum::Router, what: &str) -> Browser {
        let url = format!("{}/", self.origin);
        let server = tokio::spawn(async move {
            let _ = axum::serve(self.listener, app).await;
        });
        Browser::open(&url, what, server)
    }
}

/// Headless Chromium on a page, with a profile of its own; closed, with its site, when
/// dropped. Fails the test, naming `cargo xtask setup`, if Chromium is missing.
pub struct Browser {
    child: tokio::process::Child,
    site: tokio::task::JoinHandle<()>,
    _profile: TempDir,
}

impl Browser {
    fn open(url: &str, what: &str, site: tokio::task::JoinHandle<()>) -> Self {
        let chromium = require_command("chromium", what);
        let profile = TempDir::new("chromium");
        let child = tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromium: {e}"));
        Self {
            child,
            site,
            _profile: profile,
        }
    }

    /// Close the browser and its site.
    pub async fn close(mut self) {
        let _ = self.child.kill().await;
        self.site.abort();
    }
}
