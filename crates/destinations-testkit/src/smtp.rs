//! A real SMTP server on 127.0.0.1 that captures messages: aiosmtpd (Python), run by
//! `smtp/capture.py` from the venv that `cargo xtask setup` makes. Optional STARTTLS or implicit
//! TLS with a certificate from a test CA made here with `openssl`, AUTH, and recipients it
//! refuses (550) or defers (451 a few times, then accepts).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::s3::TempDir;

/// How the test server behaves.
#[derive(Clone, Debug, Default)]
pub struct SmtpConfig {
    /// Offer STARTTLS (required before AUTH and MAIL).
    pub starttls: bool,
    /// Speak TLS from the first byte instead.
    pub implicit_tls: bool,
    /// Require AUTH with this user and password.
    pub login: Option<(String, String)>,
    /// Answer 550 to recipients matching this regular expression.
    pub refuse: Option<String>,
    /// Answer 451 to the first `n` RCPTs of each recipient matching this regular expression.
    pub defer: Option<(String, u32)>,
}

/// One message the server accepted.
#[derive(Clone, Debug)]
pub struct CapturedMail {
    /// The raw message (DATA).
    pub raw: Vec<u8>,
    /// Which connection it came on (numbered from 1 as they are first used).
    pub session: u64,
    /// `MAIL FROM`.
    pub mail_from: String,
    /// `RCPT TO`s accepted.
    pub rcpt_tos: Vec<String>,
    /// The user that authenticated, if any.
    pub login: Option<String>,
    /// Whether the session was encrypted.
    pub tls: bool,
}

/// The capture server on a port of its own, stopped (by its process id) when dropped.
pub struct SmtpServer {
    child: Option<Child>,
    port: u16,
    folder: TempDir,
    config: SmtpConfig,
    /// The CA, server certificate and key, when the server speaks TLS.
    certificates: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// Where `cargo xtask setup` makes the Python with aiosmtpd.
pub fn python_with_aiosmtpd() -> PathBuf {
    if let Some(path) = std::env::var_os("DESTINATIONS_TEST_PYTHON") {
        return PathBuf::from(path);
    }
    let venv = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache/destinations-tools/venv/bin/python");
    if venv.is_file() {
        return venv;
    }
    panic!(
        "the SMTP test server needs Python with aiosmtpd ({} is missing); run `cargo xtask setup` first",
        venv.display()
    )
}

impl SmtpServer {
    /// Start a server that behaves as `config` says.
    pub async fn start(config: SmtpConfig) -> Self {
        let folder = TempDir::new("smtp");
        let certificates = if config.starttls || config.implicit_tls {
            Some(make_certificates(folder.path()).await)
        } else {
            None
        };
        let mut server = Self {
            child: None,
            port: crate::free_port(),
            folder,
            config,
            certificates,
        };
        // The port was free when picked; another test may take it before the server binds it
        // (review T6): then try another.
        let mut tries = 0;
        while let Err(why) = server.launch().await {
            tries += 1;
            assert!(tries < 5, "{why}");
            server.port = crate::free_port();
        }
        server
    }

    /// Stop the server (what it received stays).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }

    /// Start the server again on the same port and folder.
    pub async fn restart(&mut self) {
        self.stop().await;
        if let Err(why) = self.launch().await {
            panic!("{why}");
        }
    }

    /// Start the server on its port; why not, if it did not come up.
    async fn launch(&mut self) -> Result<(), String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("smtp/capture.py");
        let mut command = Command::new(python_with_aiosmtpd());
        command
            .arg(&script)
            .args(["--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.folder.path().join("mail"));
        if let Some((_, cert, key)) = &self.certificates {
            command.arg("--cert").arg(cert).arg("--key").arg(key);
            if self.config.implicit_tls {
                command.arg("--implicit-tls");
            }
        }
        if let Some((user, password)) = &self.config.login {
            command.args(["--login", &format!("{user}:{password}")]);
        }
        if let Some(refuse) = &self.config.refuse {
            command.args(["--refuse", refuse]);
        }
        if let Some((defer, times)) = &self.config.defer {
            command.args(["--defer", defer, "--defer-times", &times.to_string()]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the SMTP test server: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(Ok(Some(line))) if line == "ready" => {
                self.child = Some(child);
                Ok(())
            }
            other => Err(format!(
                "the SMTP test server did not start on port {}: {other:?}",
                self.port
            )),
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many EHLO greetings the server has answered: one per session a client opened.
    pub fn greetings(&self) -> u64 {
        std::fs::read_to_string(self.folder.path().join("mail/greetings.count"))
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The PEM file of the CA that signed the server's certificate (with TLS).
    pub fn ca_file(&self) -> Option<&Path> {
        self.certificates.as_ref().map(|(ca, _, _)| ca.as_path())
    }

    /// Every message accepted so far, in order.
    pub fn messages(&self) -> Vec<CapturedMail> {
        let folder = self.folder.path().join("mail");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&folder)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|meta_path| {
                let meta: serde_json::Value = std::fs::read(&meta_path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                let raw = std::fs::read(meta_path.with_extension("eml")).unwrap_or_default();
                CapturedMail {
                    raw,
                    session: meta["session"].as_u64().unwrap_or_default(),
                    mail_from: meta["mail_from"].as_str().unwrap_or_default().to_owned(),
                    rcpt_tos: meta["rcpt_tos"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                    login: meta["login"].as_str().map(str::to_owned),
                    tls: meta["tls"].as_bool().unwrap_or(false),
                }
            })
            .collect()
    }
}

/// A test CA and a server certificate it signs for `localhost` and `127.0.0.1`.
pub(crate) async fn make_certificates(folder: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let at = |name: &str| folder.join(name).display().to_string();
    let (ca_key, ca, key, csr, cert, ext) = (
        at("ca.key"),
        at("ca.pem"),
        at("server.key"),
        at("server.csr"),
        at("server.pem"),
        at("server.ext"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    // Paths under the temporary folder hold no spaces, so splitting on them is safe.
    for step in [
        format!("req -x509 {ec} -days 2 -subj /CN=destinations-test-ca -keyout {ca_key} -out {ca}"),
        format!("req {ec} -subj /CN=localhost -keyout {key} -out {csr}"),
        format!(
            "x509 -req -days 2 -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -extfile {ext} -out {cert}"
        ),
    ] {
        let output = Command::new(crate::require_command("openssl", "test certificates"))
            .args(step.split(' '))
            .output()
            .await
            .unwrap_or_else(|e| panic!("openssl: {e}"));
        assert!(
            output.status.success(),
            "openssl {step}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (PathBuf::from(ca), PathBuf::from(cert), PathBuf::from(key))
}
