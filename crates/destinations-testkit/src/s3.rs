//! A real S3-compatible server on 127.0.0.1 (s3s-fs, which verifies SigV4 signatures), and a
//! proxy in front of it that injects failures and counts requests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The access key the test server accepts.
pub const ACCESS_KEY: &str = "destinations-test";
/// The secret key the test server accepts.
pub const SECRET_KEY: &str = "destinations-test-secret";

/// Where `cargo xtask setup` installs s3s-fs.
pub fn s3s_fs_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("S3S_FS") {
        return PathBuf::from(path);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let installed = Path::new(&home).join(".cache/destinations-tools/bin/s3s-fs");
        if installed.is_file() {
            return installed;
        }
    }
    crate::require_command("s3s-fs", "the S3-compatible test server")
}

/// A folder of its own for one test, removed when dropped — unless the test failed, when it is
/// kept (and named on stderr) for a look at what was left.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty folder under the system's temporary folder.
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "destinations-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} (the test failed)", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// s3s-fs on a port of its own, storing into a temporary folder. Stopped (by its process id)
/// when dropped.
pub struct S3Server {
    child: Option<Child>,
    address: SocketAddr,
    root: TempDir,
}

impl S3Server {
    /// Start a server; fails the test, naming `cargo xtask setup`, if s3s-fs is missing.
    pub async fn start() -> Self {
        let mut server = Self {
            child: None,
            address: SocketAddr::from(([127, 0, 0, 1], crate::free_port())),
            root: TempDir::new("s3s"),
        };
        // The port was free when picked; another test may take it before s3s-fs binds it
        // (review T6): then try another.
        let mut tries = 0;
        while let Err(why) = server.launch().await {
            tries += 1;
            assert!(tries < 5, "{why}");
            server.address = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        }
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The listening address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Create a bucket (a folder of the server's root).
    pub fn create_bucket(&self, bucket: &str) {
        let path = self.root.path().join(bucket);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create bucket folder {}: {e}", path.display()));
    }

    /// The folder that holds a bucket's objects (s3s-fs keeps each as a file under it).
    pub fn bucket_folder(&self, bucket: &str) -> PathBuf {
        self.root.path().join(bucket)
    }

    /// Stop the server (its objects stay).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Start the server again on the same port and folder.
    pub async fn restart(&mut self) {
        if let Err(why) = self.launch().await {
            panic!("{why}");
        }
    }

    /// Start s3s-fs on this server's port; why not, if it did not come up.
    async fn launch(&mut self) -> Result<(), String> {
        self.stop().await;
        let binary = s3s_fs_binary();
        let mut child = Command::new(&binary)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.address.port().to_string(),
            ])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        // s3s-fs prints nothing when ready: wait for its port to accept connections, and for
        // it to be still running then (a port taken by another process answers too).
        let address = self.address;
        let exited = |child: &mut Child| match child.try_wait() {
            Ok(Some(status)) => Err(format!(
                "s3s-fs exited during startup ({status}) on {address}"
            )),
            _ => Ok(()),
        };
        for _ in 0..500 {
            exited(&mut child)?;
            if TcpStream::connect(address).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                exited(&mut child)?;
                self.child = Some(child);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "s3s-fs did not listen on {} within 10 s",
            self.address
        ))
    }
}

/// What the proxy does to write requests (every method but GET and HEAD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Answer `503 SlowDown` to the first `n` writes of each path, then forward.
    FailFirstWrites(u32),
    /// Answer every write with this status and S3 error code, e.g. `403 AccessDenied` or
    /// `404 NoSuchBucket`.
    RefuseWrites(u16, &'static str),
}

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct ProxiedRequest {
    /// The method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// What the proxy answered itself, if it did not forward.
    pub injected: Option<u16>,
    /// The status the client got (502 when the server behind was down).
    pub status: u16,
}

/// What the proxy saw, and a signal for each new request answered.
#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<ProxiedRequest>>,
    changed: tokio::sync::Notify,
}

/// An HTTP proxy on 127.0.0.1 in front of an S3 server: it forwards requests untouched (the
/// `Host` header too, so signatures still verify), injects failures, and records what it saw.
pub struct FaultProxy {
    address: SocketAddr,
    seen: Arc<Seen>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to `upstream` that applies `fault`.
    pub async fn start(upstream: SocketAddr, fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind the proxy: {e}"));
        let address = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("proxy address: {e}"));
        let seen = Arc::new(Seen::default());
        let task = tokio::spawn(serve(listener, upstream, fault, seen.clone()));
        Self {
            address,
            seen,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.seen
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Wait (up to a minute) until the requests answered so far satisfy `done`.
    pub async fn wait_for(&self, done: impl Fn(&[ProxiedRequest]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let changed = self.seen.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.requests()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "the proxy never saw what was awaited: {:?}",
                    self.requests()
                );
            }
        }
    }
}

/// Dropping the proxy stops it: no new connections, and those open are closed.
impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

async fn serve(listener: TcpListener, upstream: SocketAddr, fault: Fault, seen: Arc<Seen>) {
    let writes_by_path = Arc::new(Mutex::new(std::collections::HashMap::<String, u32>::new()));
    // The connections die with the proxy (a stopped proxy leaves no pooled connection alive).
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let seen = seen.clone();
        let writes_by_path = writes_by_path.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let seen = seen.clone();
                let writes_by_path = writes_by_path.clone();
                async move {
                    let method = request.method().to_string();
                    let uri = request.uri().to_string();
                    let is_write = !matches!(method.as_str(), "GET" | "HEAD");
                    let injected = if is_write {
                        match fault {
                            Fault::None => None,
                            Fault::RefuseWrites(status, code) => Some((status, code)),
                            Fault::FailFirstWrites(n) => {
                                let mut counts = writes_by_path
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner);
                                let count =
                                    counts.entry(request.uri().path().to_owned()).or_insert(0);
                                *count += 1;
                                (*count <= n).then_some((503, "SlowDown"))
                            }
                        }
                    } else {
                        None
                    };
                    let answer = match injected {
                        Some((status, code)) => Ok::<_, hyper::Error>(s3_error(status, code)),
                        None => forward(upstream, request).await,
                    };
                    seen.requests
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(ProxiedRequest {
                            method,
                            uri,
                            injected: injected.map(|(status, _)| status),
                            status: answer.as_ref().map_or(502, |a| a.status().as_u16()),
                        });
                    seen.changed.notify_waiters();
                    answer
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn s3_error(status: u16, code: &str) -> Response<ProxyBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
    );
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response
}

async fn forward(
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, hyper::Error> {
    let Ok(stream) = TcpStream::connect(upstream).await else {
        let mut response = s3_error(502, "BadGateway");
        *response.status_mut() = hyper::StatusCode::BAD_GATEWAY;
        return Ok(response);
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    Ok(response.map(BodyExt::boxed))
}
