//! The HTTP/1.1 client deliveries go through, on hyper's connection API: a pool of idle
//! connections per origin, the address guard on every address actually dialled, TLS with
//! rustls. A request costs what HTTP/1.1 costs: no proxy, cookie, redirect or retry layers to
//! pass through (redirects are followed by the destination, under the guard), no URL parsed
//! again on the way.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::Url;

use crate::guard::{AddressGuard, Refused};

/// Where a request goes: scheme, host and port, the key of a connection pool. Borrowed from
/// the URL: nothing is allocated to find a pooled connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Origin<'a> {
    pub(crate) https: bool,
    /// The host as the URL writes it, without brackets around an IPv6 address.
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    /// `scheme://host[:port]` as the parsed URL writes it (lower case, no default port).
    key: &'a str,
}

impl<'a> Origin<'a> {
    /// The origin of an `http` or `https` URL with a host.
    pub(crate) fn of(url: &'a Url) -> Option<Self> {
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        let host = url.host_str()?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Some(Self {
            https,
            host,
            port: url.port_or_known_default()?,
            key: &url[..url::Position::BeforePath],
        })
    }

    /// The `Host` header's value: the host, and the port when it is not the scheme's (as the
    /// parsed URL writes them).
    pub(crate) fn host_header(url: &Url) -> &str {
        &url[url::Position::BeforeHost..url::Position::AfterPort]
    }
}

/// Why an exchange did not produce an answer.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// The guard refused every address of the host.
    Refused(Refused),
    /// No connection: DNS, TCP or TLS.
    Connect(String),
    /// The connection failed during the exchange.
    Exchange(String),
    /// A redirect that may not be followed.
    Redirect(String),
}

/// What the target answered: its status, headers, and the start of its body (the rest was
/// read and dropped, so the connection could be used again).
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) excerpt: Vec<u8>,
}

/// One end of an HTTP/1.1 connection: where requests go in.
type Connection = SendRequest<Full<Bytes>>;

/// Connections per origin, and how to make new ones.
pub(crate) struct Client {
    idle: Mutex<HashMap<Box<str>, Vec<Connection>>>,
    guard: Arc<AddressGuard>,
    tls: TlsConnector,
    max_idle_per_origin: usize,
}

impl Client {
    pub(crate) fn new(
        guard: Arc<AddressGuard>,
        tls: rustls::ClientConfig,
        max_idle_per_origin: usize,
    ) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            guard,
            tls: TlsConnector::from(Arc::new(tls)),
            max_idle_per_origin,
        }
    }

    /// Send `request` to `origin` and read the answer, keeping at most `keep(status)` bytes
    /// of its body and reading at most `drain` in all.
    pub(crate) async fn exchange(
        &self,
        origin: &Origin<'_>,
        mut request: Request<Full<Bytes>>,
        keep: impl Fn(StatusCode) -> usize,
        drain: usize,
    ) -> Result<Answer, ClientError> {
        loop {
            let (mut sender, pooled) = match self.checkout(origin).await {
                Some(sender) => (sender, true),
                None => (self.connect(origin).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (answer, whole) = read(response, &keep, drain).await?;
                    if whole {
                        self.checkin(origin, sender);
                    }
                    return Ok(answer);
                }
                Err(mut failed) => match failed.take_message() {
                    // A pooled connection the target had closed, found before anything was
                    // written: the request was not sent; try it on another.
                    Some(unsent) if pooled => request = unsent,
                    _ => return Err(ClientError::Exchange(chain(failed.error()))),
                },
            }
        }
    }

    /// An idle connection to `origin` that can take a request, if there is one.
    async fn checkout(&self, origin: &Origin<'_>) -> Option<Connection> {
        loop {
            let mut sender = {
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                idle.get_mut(origin.key)?.pop()?
            };
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, origin: &Origin<'_>, sender: Connection) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        match idle.get_mut(origin.key) {
            Some(senders) if senders.len() < self.max_idle_per_origin => senders.push(sender),
            Some(_) => {}
            None => {
                idle.insert(Box::from(origin.key), vec![sender]);
            }
        }
    }

    /// A new connection: the host's addresses through the guard, TCP, TLS for `https`, and
    /// the HTTP/1.1 handshake.
    async fn connect(&self, origin: &Origin<'_>) -> Result<Connection, ClientError> {
        let addresses = self.addresses(origin).await?;
        let mut last = None;
        let mut stream = None;
        for address in addresses {
            match TcpStream::connect(address).await {
                Ok(connected) => {
                    stream = Some(connected);
                    break;
                }
                Err(error) => last = Some(error),
            }
        }
        let stream = stream.ok_or_else(|| {
            ClientError::Connect(
                last.map_or_else(|| "no address to connect to".to_owned(), |e| e.to_string()),
            )
        })?;
        let _ = stream.set_nodelay(true);
        if !origin.https {
            return handshake(stream).await;
        }
        let name = ServerName::try_from(origin.host.to_owned())
            .map_err(|e| ClientError::Connect(format!("`{}`: {e}", origin.host)))?;
        let stream = self
            .tls
            .connect(name, stream)
            .await
            .map_err(|e| ClientError::Connect(format!("TLS: {}", chain(&e))))?;
        handshake(stream).await
    }

    /// The addresses to dial: an IP literal as written, a name as resolved, each admitted by
    /// the guard (checked on what is dialled, so DNS rebinding cannot slip past it).
    async fn addresses(&self, origin: &Origin<'_>) -> Result<Vec<SocketAddr>, ClientError> {
        if let Ok(ip) = origin.host.parse::<IpAddr>() {
            self.guard.check(ip).map_err(|class| {
                ClientError::Refused(Refused {
                    host: origin.host.to_owned(),
                    addresses: vec![(ip, class)],
                })
            })?;
            return Ok(vec![SocketAddr::new(ip, origin.port)]);
        }
        let found: Vec<SocketAddr> = tokio::net::lookup_host((origin.host, origin.port))
            .await
            .map_err(|e| ClientError::Connect(format!("cannot resolve `{}`: {e}", origin.host)))?
            .collect();
        self.guard.filter(origin.host, found).map_err(|refused| {
            // The addresses go to the operator's log only, never into a send's status.
            tracing::info!(host = %refused.host, addresses = ?refused.addresses, "the address guard refused a connection");
            ClientError::Refused(refused)
        })
    }
}

async fn handshake<S>(stream: S) -> Result<Connection, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Connect(chain(&e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Read an answer: its head, the first `keep(status)` bytes of its body, the rest up to
/// `drain` dropped. Whether the body was read whole (the connection can take another
/// request).
async fn read(
    response: Response<Incoming>,
    keep: impl Fn(StatusCode) -> usize,
    drain: usize,
) -> Result<(Answer, bool), ClientError> {
    let (head, mut body) = response.into_parts();
    let keep = keep(head.status);
    let mut excerpt = Vec::new();
    let mut read = 0;
    let whole = loop {
        if read > drain {
            break false;
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read += data.len();
                    if excerpt.len() < keep {
                        let room = keep - excerpt.len();
                        excerpt.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
            }
            Some(Err(error)) if head.status.is_success() || read > 0 => {
                // The answer came; only its body broke off. What came is what counts.
                tracing::debug!(error = %chain(&error), "the answer's body broke off");
                break false;
            }
            Some(Err(error)) => return Err(ClientError::Exchange(chain(&error))),
            None => break true,
        }
    };
    Ok((
        Answer {
            status: head.status,
            headers: head.headers,
            excerpt,
        },
        whole,
    ))
}

/// An error and its causes, on one line.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = source.and_then(|s| s.source());
    }
    text
}

/// The TLS settings: the system's trust (the platform verifier), or only the CA certificates
/// of a PEM file; HTTP/1.1 offered by ALPN.
pub(crate) fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = match ca_file {
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider)
                .map_err(|e| format!("cannot load the system's certificate trust: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
        Some(file) => {
            let shown = file.display();
            let mut roots = rustls::RootCertStore::empty();
            let certificates = rustls::pki_types::pem::PemObject::pem_file_iter(file)
                .map_err(|e| format!("`ca_file` {shown}: {e}"))?;
            for certificate in certificates {
                let certificate: rustls::pki_types::CertificateDer<'static> =
                    certificate.map_err(|e| format!("`ca_file` {shown}: {e}"))?;
                roots
                    .add(certificate)
                    .map_err(|e| format!("`ca_file` {shown}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("`ca_file` {shown} holds no certificate"));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
