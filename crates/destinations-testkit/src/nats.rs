//! A real nats-server with JetStream on 127.0.0.1, storing into a temporary folder.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::s3::TempDir;

/// Where `cargo xtask setup` installs nats-server (2.12.1 or later: atomic batch publish).
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(path);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let installed = Path::new(&home).join(".cache/destinations-tools/venv/bin/nats-server");
        if installed.is_file() {
            return installed;
        }
    }
    crate::require_command("nats-server", "NATS with JetStream, 2.12.1 or later")
}

/// nats-server with JetStream on a port of its own. Stopped (by its process id) when dropped;
/// [`restart`](Self::restart) brings it back on the same port and store.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: TempDir,
}

impl NatsServer {
    /// Start a server; fails the test, naming `cargo xtask setup`, if nats-server is missing.
    pub async fn start() -> Self {
        let mut server = Self {
            child: None,
            port: crate::free_port(),
            store: TempDir::new("nats"),
        };
        let mut tries = 0;
        while let Err(why) = server.launch().await {
            tries += 1;
            assert!(tries < 5, "{why}");
            server.port = crate::free_port();
        }
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kill the server (`kill -9`); its store stays.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Start the server again on the same port and store.
    pub async fn restart(&mut self) {
        if let Err(why) = self.launch().await {
            panic!("{why}");
        }
    }

    /// Start nats-server on this port; why not, if it did not come up.
    async fn launch(&mut self) -> Result<(), String> {
        self.kill().await;
        let binary = nats_server_binary();
        let mut child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .arg("-sd")
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        // Ready when the client port greets with an INFO line that offers JetStream.
        for _ in 0..500 {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "nats-server exited during startup ({status}) on port {}",
                    self.port
                ));
            }
            if self.offers_jetstream().await {
                self.child = Some(child);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "nats-server did not offer JetStream on port {} within 10 s",
            self.port
        ))
    }

    async fn offers_jetstream(&self) -> bool {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(stream);
        let read = tokio::time::timeout(Duration::from_secs(1), reader.read_line(&mut line)).await;
        matches!(read, Ok(Ok(_))) && line.starts_with("INFO") && line.contains("\"jetstream\":true")
    }
}
