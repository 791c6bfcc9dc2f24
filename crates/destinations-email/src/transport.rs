//! Where a message goes: an SMTP server (connections reused, at most so many at once), or an
//! outbox folder of `.eml` files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use mail_send::smtp::message::Message;
use mail_send::{Credentials, SmtpClient, SmtpClientBuilder};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::options::{SmtpOptions, TlsMode};

/// An SMTP reply, kept for the send's status.
pub(crate) type Reply = smtp_proto::Response<String>;

/// One open SMTP session.
enum Connection {
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
    Plain(SmtpClient<TcpStream>),
}

impl Connection {
    async fn send(&mut self, message: Message<'_>) -> mail_send::Result<Reply> {
        match self {
            Self::Tls(client) => client.send(message).await,
            Self::Plain(client) => client.send(message).await,
        }
    }

    async fn quit(self) {
        let _ = match self {
            Self::Tls(client) => client.quit().await,
            Self::Plain(client) => client.quit().await,
        };
    }
}

/// Sends messages to one SMTP server.
pub(crate) struct Smtp {
    builder: SmtpClientBuilder<String>,
    mode: TlsMode,
    has_credentials: bool,
    idle: Mutex<Vec<Connection>>,
    connections: Semaphore,
    keep_idle: usize,
}

impl Smtp {
    pub(crate) fn new(options: &SmtpOptions) -> Result<Self, String> {
        let port = options.port();
        let mut builder = match &options.ca_file {
            Some(ca_file) => SmtpClientBuilder::new_with_tls_connector(
                options.host.clone(),
                port,
                connector_trusting(ca_file)?,
            ),
            None => SmtpClientBuilder::new(options.host.clone(), port)
                .map_err(|e| format!("cannot set up TLS for `smtp`: {e}"))?,
        }
        .implicit_tls(options.tls == TlsMode::Implicit)
        .timeout(options.timeout);
        if let Some(helo) = &options.helo {
            builder = builder.helo_host(helo.clone());
        }
        if let (Some(username), Some(password)) = (&options.username, &options.password) {
            builder = builder.credentials(Credentials::new(username.clone(), password.clone()));
        }
        Ok(Self {
            builder,
            mode: options.tls,
            has_credentials: options.username.is_some(),
            idle: Mutex::new(Vec::new()),
            connections: Semaphore::new(options.pool_size),
            keep_idle: options.pool_size,
        })
    }

    async fn connect(&self) -> mail_send::Result<Connection> {
        match self.mode {
            TlsMode::Implicit | TlsMode::Starttls => self
                .builder
                .connect()
                .await
                .map(|c| Connection::Tls(Box::new(c))),
            TlsMode::None => self.builder.connect_plain().await.map(Connection::Plain),
            TlsMode::Opportunistic => match self.builder.connect().await {
                Ok(client) => Ok(Connection::Tls(Box::new(client))),
                // Without TLS a password would travel in clear text: refuse rather than fall back.
                Err(mail_send::Error::MissingStartTls) if !self.has_credentials => {
                    self.builder.connect_plain().await.map(Connection::Plain)
                }
                Err(error) => Err(error),
            },
        }
    }

    /// Send one message. A reused connection that turns out closed is replaced once.
    pub(crate) async fn send(
        &self,
        from: &str,
        recipients: &[String],
        body: &[u8],
    ) -> mail_send::Result<Reply> {
        let _slot = self.connections.acquire().await;
        let message = || Message::new(from, recipients.iter().map(String::as_str), body);
        let reused = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let (mut connection, result) = match reused {
            Some(mut connection) => {
                let result = connection.send(message()).await;
                match result {
                    Err(mail_send::Error::Io(_) | mail_send::Error::Timeout) => {
                        let mut fresh = self.connect().await?;
                        let result = fresh.send(message()).await;
                        (fresh, result)
                    }
                    Err(mail_send::Error::UnexpectedReply(ref reply)) if reply.code == 421 => {
                        let mut fresh = self.connect().await?;
                        let result = fresh.send(message()).await;
                        (fresh, result)
                    }
                    result => (connection, result),
                }
            }
            None => {
                let mut fresh = self.connect().await?;
                let result = fresh.send(message()).await;
                (fresh, result)
            }
        };
        match &result {
            Ok(_) => self.keep(connection),
            // The server answered: the session is sound once the transaction is reset.
            Err(mail_send::Error::UnexpectedReply(reply)) if reply.code != 421 => {
                if reset(&mut connection).await {
                    self.keep(connection);
                }
            }
            Err(_) => {}
        }
        result
    }

    fn keep(&self, connection: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.keep_idle {
            idle.push(connection);
        }
    }

    /// Connect, greet (and authenticate), say goodbye.
    pub(crate) async fn check(&self) -> mail_send::Result<()> {
        let connection = self.connect().await?;
        connection.quit().await;
        Ok(())
    }
}

async fn reset(connection: &mut Connection) -> bool {
    match connection {
        Connection::Tls(client) => client.rset().await.is_ok(),
        Connection::Plain(client) => client.rset().await.is_ok(),
    }
}

/// A TLS connector that trusts only the CA certificates in this PEM file.
fn connector_trusting(ca_file: &Path) -> Result<TlsConnector, String> {
    let shown = ca_file.display();
    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("`smtp.ca_file` {shown}: {e}"))?;
    for certificate in certificates {
        let certificate = certificate.map_err(|e| format!("`smtp.ca_file` {shown}: {e}"))?;
        roots
            .add(certificate)
            .map_err(|e| format!("`smtp.ca_file` {shown}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("`smtp.ca_file` {shown} holds no certificate"));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Writes each message as `ID.eml` into a folder, atomically: a reader never sees half a file,
/// and a retry overwrites the same file.
pub(crate) struct Outbox {
    folder: PathBuf,
}

impl Outbox {
    pub(crate) fn new(folder: PathBuf) -> Self {
        Self { folder }
    }

    pub(crate) fn folder(&self) -> &Path {
        &self.folder
    }

    /// Write `NAME.eml`; returns its path.
    pub(crate) async fn write(&self, name: &str, message: Vec<u8>) -> std::io::Result<PathBuf> {
        let folder = self.folder.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            std::fs::create_dir_all(&folder)?;
            let path = folder.join(format!("{name}.eml"));
            let staging = folder.join(format!(".{name}.eml.partial"));
            let mut file = std::fs::File::create(&staging)?;
            file.write_all(&message)?;
            file.sync_all()?;
            std::fs::rename(&staging, &path)?;
            Ok(path)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}
