//! The options of one email destination instance, from `[destinations.NAME]`.

use std::path::PathBuf;
use std::time::Duration;

use destinations_core::config::duration_text;
use serde::Deserialize;

use crate::send::check_address;

/// Options of an email destination instance.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailOptions {
    /// The sender address (`MAIL FROM` and the `From` header).
    pub from: String,
    /// The sender's display name, if any.
    pub from_name: Option<String>,
    /// The owner: where a send that names no recipient goes.
    pub to: Vec<String>,
    /// Patterns (`*` = anything) that recipients named in a send must match, e.g.
    /// `["*@example.com"]`. Empty (the default): sends go to `to` only.
    pub allowed_recipients: Vec<String>,
    /// Where `.eml` files go when no `smtp` is configured (default `./data/outbox`).
    pub outbox: PathBuf,
    /// The SMTP server; without it, messages are written to `outbox`.
    pub smtp: Option<SmtpOptions>,
    /// At most this many messages a minute, evenly spaced (default: no limit).
    pub rate_limit_per_minute: Option<u32>,
    /// The most attachment bytes (decoded) in one message (default 10 MiB). Raise the
    /// instance's `max_payload_bytes` too: base64 makes a payload a third larger.
    pub max_attachment_bytes: usize,
}

impl Default for EmailOptions {
    fn default() -> Self {
        Self {
            from: "destinations@localhost".to_owned(),
            from_name: None,
            to: vec!["owner@localhost".to_owned()],
            allowed_recipients: Vec::new(),
            outbox: PathBuf::from("./data/outbox"),
            smtp: None,
            rate_limit_per_minute: None,
            max_attachment_bytes: 10 * 1024 * 1024,
        }
    }
}

/// How the SMTP connection is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS from the first byte (port 465).
    Implicit,
    /// STARTTLS, required: a server that does not offer it is an error (default; port 587).
    #[default]
    Starttls,
    /// STARTTLS when the server offers it, else plain text.
    Opportunistic,
    /// Plain text (a relay on the same host).
    None,
}

/// An SMTP server.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpOptions {
    /// Host name or address.
    pub host: String,
    /// Port (default: 465 for `implicit`, else 587).
    pub port: Option<u16>,
    /// `implicit`, `starttls` (default), `opportunistic` or `none`.
    pub tls: TlsMode,
    /// AUTH user name.
    pub username: Option<String>,
    /// AUTH password (never logged).
    pub password: Option<String>,
    /// A PEM file of the CA that signs the server's certificate; when set, only it is trusted.
    /// Default: the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// The name said in EHLO (default: this host's name).
    pub helo: Option<String>,
    /// Time allowed for connecting and for each command (default 30 s).
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Open connections kept for reuse (default 4).
    pub pool_size: usize,
}

impl Default for SmtpOptions {
    fn default() -> Self {
        Self {
            host: String::new(),
            port: None,
            tls: TlsMode::Starttls,
            username: None,
            password: None,
            ca_file: None,
            helo: None,
            timeout: Duration::from_secs(30),
            pool_size: 4,
        }
    }
}

impl std::fmt::Debug for SmtpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[hidden]"))
            .field("ca_file", &self.ca_file)
            .field("helo", &self.helo)
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl SmtpOptions {
    /// The port, from the TLS mode when not set.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            TlsMode::Implicit => 465,
            _ => 587,
        })
    }
}

impl EmailOptions {
    /// The options' own consistency, with the option named.
    pub(crate) fn check(&self) -> Result<(), String> {
        check_address(&self.from).map_err(|why| format!("`from` `{}`: {why}", self.from))?;
        if let Some(name) = &self.from_name
            && name.contains(['\r', '\n'])
        {
            return Err("`from_name` must be one line".to_owned());
        }
        if self.to.is_empty() {
            return Err("`to` must name at least one owner address".to_owned());
        }
        for address in &self.to {
            check_address(address).map_err(|why| format!("`to` `{address}`: {why}"))?;
        }
        if self.rate_limit_per_minute == Some(0) {
            return Err(
                "`rate_limit_per_minute` must be at least 1 (leave it out for no limit)".to_owned(),
            );
        }
        if let Some(smtp) = &self.smtp {
            if smtp.host.is_empty() {
                return Err("`smtp.host` is required when `smtp` is set".to_owned());
            }
            if smtp.username.is_some() != smtp.password.is_some() {
                return Err("`smtp.username` and `smtp.password` go together".to_owned());
            }
            if smtp.password.is_some() && smtp.tls == TlsMode::None {
                return Err(
                    "`smtp.password` over `tls = \"none\"` would send it in clear text; use starttls or implicit"
                        .to_owned(),
                );
            }
            if smtp.pool_size == 0 {
                return Err("`smtp.pool_size` must be at least 1".to_owned());
            }
        }
        Ok(())
    }
}
