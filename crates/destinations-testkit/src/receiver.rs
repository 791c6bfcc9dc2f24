//! A real HTTP receiver on 127.0.0.1 that records every request and answers as a script says:
//! a status, a delay, or a dropped connection.

use std::collections::{HashMap, HashSet};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    /// The method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers, names lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// The `Idempotency-Key` header, if any.
    pub key: Option<String>,
    /// Which attempt this is for its key (1 for the first).
    pub attempt: u32,
}

impl ReceivedRequest {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// How the receiver answers one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Answer with this status and an empty body.
    Status(u16),
    /// Answer with this status, headers and body.
    Full(u16, Vec<(&'static str, String)>, String),
    /// Close the connection without answering.
    Drop,
    /// Wait, then answer.
    After(Duration, Box<Reply>),
    /// Answer this status at once, then send a body of `bytes` bytes one at a time, `every`
    /// apart: a target that trickles.
    Trickle {
        /// The status.
        status: u16,
        /// How many bytes the body has.
        bytes: usize,
        /// The wait before each.
        every: Duration,
    },
}

/// What the receiver answers with: a whole body, or one that trickles.
type Body = BoxBody<Bytes, std::convert::Infallible>;

/// Decides the reply to each request.
type Script = Arc<dyn Fn(&ReceivedRequest) -> Reply + Send + Sync>;

#[derive(Default)]
struct Record {
    /// TCP connections accepted.
    connections: usize,
    requests: Vec<ReceivedRequest>,
    attempts: HashMap<String, u32>,
    accepted: HashSet<String>,
    accepted_requests: Vec<ReceivedRequest>,
}

/// A running receiver. Stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    /// `https` receivers: the folder holding the test CA (`ca.pem`) and the server's key.
    tls: Option<crate::TempDir>,
    record: Arc<Mutex<Record>>,
    accepted: watch::Receiver<usize>,
    arrived: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Receiver {
    /// A receiver that answers 200 to everything.
    pub async fn start() -> Self {
        Self::scripted(|_| Reply::Status(200)).await
    }

    /// A receiver that answers as `script` says.
    pub async fn scripted(
        script: impl Fn(&ReceivedRequest) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind a receiver on 127.0.0.1: {e}"));
        Self::serve(listener, Arc::new(script), None)
    }

    /// An `https` receiver answering as `script` says, with a certificate for `localhost`
    /// and `127.0.0.1` from a test CA made for it ([`ca_file`](Self::ca_file)).
    pub async fn tls(script: impl Fn(&ReceivedRequest) -> Reply + Send + Sync + 'static) -> Self {
        let folder = crate::TempDir::new("tls-receiver");
        let (_, cert, key) = crate::smtp::make_certificates(folder.path()).await;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind a receiver on 127.0.0.1: {e}"));
        let acceptor = tls_acceptor(&cert, &key);
        let mut receiver = Self::serve(listener, Arc::new(script), Some(acceptor));
        receiver.tls = Some(folder);
        receiver
    }

    /// The PEM file of the CA an `https` receiver's certificate comes from.
    pub fn ca_file(&self) -> std::path::PathBuf {
        match &self.tls {
            Some(folder) => folder.path().join("ca.pem"),
            None => panic!("ca_file: this receiver speaks plain HTTP"),
        }
    }

    /// A receiver at `addr` (a port a test set aside: a target that was down comes up),
    /// answering as `script` says.
    pub async fn scripted_at(
        addr: SocketAddr,
        script: impl Fn(&ReceivedRequest) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot bind a receiver on {addr}: {e}"));
        Self::serve(listener, Arc::new(script), None)
    }

    /// An address on 127.0.0.1 where nothing listens (yet): a target that is down.
    pub fn unused_address() -> SocketAddr {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind on 127.0.0.1: {e}"));
        probe
            .local_addr()
            .unwrap_or_else(|e| panic!("no local address: {e}"))
    }

    fn serve(
        listener: TcpListener,
        script: Script,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("receiver has no address: {e}"));
        let record = Arc::new(Mutex::new(Record::default()));
        let (accepted_tx, accepted) = watch::channel(0usize);
        let (arrived_tx, arrived) = watch::channel(0usize);
        let counts = Arc::new(Counts {
            accepted: accepted_tx,
            arrived: arrived_tx,
        });
        let state = (record.clone(), script, counts);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (record, script, counts) = state.clone();
                record
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .connections += 1;
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        handle(request, record.clone(), script.clone(), counts.clone())
                    });
                    let http = http1::Builder::new();
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(stream), service).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                http.serve_connection(TokioIo::new(stream), service).await
                            }
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        Self {
            addr,
            tls: None,
            record,
            accepted,
            arrived,
            task,
        }
    }

    /// The receiver's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` + `path` (`https://localhost:PORT` for an `https` receiver,
    /// the name its certificate holds).
    pub fn url(&self, path: &str) -> String {
        match self.tls {
            None => format!("http://{}{path}", self.addr),
            Some(_) => format!("https://localhost:{}{path}", self.addr.port()),
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.lock().connections
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.lock().requests.clone()
    }

    /// The distinct idempotency keys the receiver answered with a 2xx — counted when the
    /// answer is made, so a key whose sender gave up before the answer reached it counts too:
    /// this says "arrived at least once", not "acknowledged" (review T6).
    pub fn accepted_keys(&self) -> HashSet<String> {
        self.lock().accepted.clone()
    }

    /// The requests answered with a 2xx, duplicates included, in arrival order.
    pub fn accepted_requests(&self) -> Vec<ReceivedRequest> {
        self.lock().accepted_requests.clone()
    }

    /// Wait until `count` distinct keys were answered with a 2xx. Panics after `within`
    /// (a guard against hanging forever, not a timing assertion).
    pub async fn wait_for_accepted(&self, count: usize, within: Duration) {
        let mut accepted = self.accepted.clone();
        let waited = tokio::time::timeout(within, accepted.wait_for(|n| *n >= count)).await;
        if waited.is_err() {
            panic!(
                "the receiver accepted {} distinct sends within {within:?}, expected {count}",
                self.lock().accepted.len()
            );
        }
    }

    /// Wait until `count` requests arrived, answered or not. Panics after `within` (a guard
    /// against hanging forever, not a timing assertion).
    pub async fn wait_for_requests(&self, count: usize, within: Duration) {
        let mut arrived = self.arrived.clone();
        let waited = tokio::time::timeout(within, arrived.wait_for(|n| *n >= count)).await;
        if waited.is_err() {
            panic!(
                "{} requests arrived within {within:?}, expected {count}",
                self.lock().requests.len()
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The connection is dropped without an answer.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the test script")
    }
}

impl std::error::Error for DropConnection {}

/// What waiters watch: requests arrived, distinct keys accepted.
struct Counts {
    accepted: watch::Sender<usize>,
    arrived: watch::Sender<usize>,
}

async fn handle(
    request: Request<Incoming>,
    record: Arc<Mutex<Record>>,
    script: Script,
    counts: Arc<Counts>,
) -> Result<Response<Body>, DropConnection> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let key = parts
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let received = {
        let mut record = record.lock().unwrap_or_else(PoisonError::into_inner);
        let attempt = match &key {
            Some(k) => {
                let n = record.attempts.entry(k.clone()).or_insert(0);
                *n += 1;
                *n
            }
            None => 1,
        };
        let received = ReceivedRequest {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers,
            body,
            key,
            attempt,
        };
        record.requests.push(received.clone());
        counts.arrived.send_replace(record.requests.len());
        received
    };
    let mut reply = script(&received);
    loop {
        match reply {
            Reply::After(wait, then) => {
                tokio::time::sleep(wait).await;
                reply = *then;
            }
            Reply::Drop => return Err(DropConnection),
            Reply::Trickle {
                status,
                bytes,
                every,
            } => {
                let mut response = answer(
                    status,
                    Vec::new(),
                    String::new(),
                    &received,
                    &record,
                    &counts.accepted,
                );
                let drip = futures::stream::unfold(bytes, move |left| async move {
                    if left == 0 {
                        return None;
                    }
                    tokio::time::sleep(every).await;
                    Some((
                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                            Bytes::from_static(b"x"),
                        )),
                        left - 1,
                    ))
                });
                *response.body_mut() = StreamBody::new(drip).boxed();
                return Ok(response);
            }
            Reply::Status(code) => {
                return Ok(answer(
                    code,
                    Vec::new(),
                    String::new(),
                    &received,
                    &record,
                    &counts.accepted,
                ));
            }
            Reply::Full(code, headers, body) => {
                return Ok(answer(
                    code,
                    headers,
                    body,
                    &received,
                    &record,
                    &counts.accepted,
                ));
            }
        }
    }
}

fn answer(
    code: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    received: &ReceivedRequest,
    record: &Mutex<Record>,
    accepted_tx: &watch::Sender<usize>,
) -> Response<Body> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_success() {
        let mut record = record.lock().unwrap_or_else(PoisonError::into_inner);
        record.accepted_requests.push(received.clone());
        if let Some(key) = &received.key {
            record.accepted.insert(key.clone());
        }
        accepted_tx.send_replace(record.accepted.len());
    }
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    for (name, value) in headers {
        if let Ok(value) = hyper::header::HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// A TLS acceptor serving this certificate and key (PEM files).
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .unwrap_or_else(|e| panic!("{}: {e}", cert.display()));
    let key =
        PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
        .unwrap_or_else(|e| panic!("the test certificate: {e}"));
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
