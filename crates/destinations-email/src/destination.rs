//! The email destination: one message per send, over SMTP or into an outbox folder.

use std::time::{Instant, UNIX_EPOCH};

use async_trait::async_trait;
use destinations_core::{
    BatchOutcome, Envelope, HealthError, InvalidPayload, Parsed, RateLimit, Report,
    ResponseSummary, SharedRateGate, TypedDestination,
};
use mail_builder::MessageBuilder;

use crate::options::EmailOptions;
use crate::send::{EmailSend, allowed, routes_onwards};
use crate::transport::{Outbox, Reply, Smtp};

/// Delivers each send as one email.
pub struct EmailDestination {
    options: EmailOptions,
    transport: Transport,
    rate: Option<SharedRateGate>,
    /// The domain of `from`, for Message-IDs.
    domain: String,
}

enum Transport {
    Smtp(Box<Smtp>),
    Outbox(Outbox),
}

impl EmailDestination {
    /// An instance with these options.
    pub fn new(options: EmailOptions) -> Result<Self, String> {
        options.check()?;
        let transport = match &options.smtp {
            Some(smtp) => Transport::Smtp(Box::new(Smtp::new(smtp)?)),
            None => Transport::Outbox(Outbox::new(options.outbox.clone())),
        };
        let domain = options
            .from
            .rsplit_once('@')
            .map_or("localhost", |(_, domain)| domain)
            .to_owned();
        Ok(Self {
            rate: options
                .rate_limit_per_minute
                .map(|n| RateLimit::per_minute(n).shared()),
            transport,
            domain,
            options,
        })
    }

    /// The rules of this instance: who may be named, how much may be attached.
    fn check_recipients_and_size(&self, send: &EmailSend) -> Result<(), InvalidPayload> {
        for (field, list) in [("to", &send.to), ("cc", &send.cc)] {
            for (i, address) in list.iter().enumerate() {
                if !allowed(address, &self.options.allowed_recipients) {
                    let why = if routes_onwards(address) {
                        "a `%` or `!` in the local part can route the message on to another domain through an old relay; write the address without it".to_owned()
                    } else if self.options.allowed_recipients.is_empty() {
                        "this instance sends to its owner only (list patterns in `allowed_recipients` to allow others)".to_owned()
                    } else {
                        format!(
                            "not allowed by this instance (allowed: {})",
                            self.options.allowed_recipients.join(", ")
                        )
                    };
                    return Err(InvalidPayload::field(
                        format!("{field}[{i}]"),
                        format!("`{address}`: {why}"),
                    ));
                }
            }
        }
        let attached: usize = send
            .attachments
            .iter()
            .map(|a| decoded_len(&a.content))
            .sum();
        if attached > self.options.max_attachment_bytes {
            return Err(InvalidPayload::field(
                "attachments",
                format!(
                    "{attached} bytes attached, over this instance's max_attachment_bytes ({})",
                    self.options.max_attachment_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The message's recipients and RFC 5322 bytes.
    fn compose(
        &self,
        envelope: &Envelope,
        send: &EmailSend,
    ) -> Result<(Vec<String>, Vec<u8>), String> {
        let to = if send.to.is_empty() {
            self.options.to.clone()
        } else {
            send.to.clone()
        };
        let from: mail_builder::headers::address::Address<'_> = match &self.options.from_name {
            Some(name) => (name.as_str(), self.options.from.as_str()).into(),
            None => self.options.from.as_str().into(),
        };
        let sent_at = envelope
            .created_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut message = MessageBuilder::new()
            .from(from)
            .to(to.iter().map(String::as_str).collect::<Vec<_>>())
            .subject(send.subject.as_str())
            .message_id(format!("{}@{}", envelope.id, self.domain))
            .date(sent_at);
        if !send.cc.is_empty() {
            message = message.cc(send.cc.iter().map(String::as_str).collect::<Vec<_>>());
        }
        if let Some(text) = &send.text {
            message = message.text_body(text.as_str());
        }
        if let Some(html) = &send.html {
            message = message.html_body(html.as_str());
        }
        for attachment in &send.attachments {
            let bytes = attachment.bytes().map_err(|e| {
                format!(
                    "attachment `{}` no longer decodes: {e}",
                    attachment.filename
                )
            })?;
            message = message.attachment(
                attachment.content_type.as_str(),
                attachment.filename.as_str(),
                bytes,
            );
        }
        let bytes = message
            .write_to_vec()
            .map_err(|e| format!("cannot build the message: {e}"))?;
        let mut recipients = to;
        recipients.extend(send.cc.iter().cloned());
        Ok((recipients, bytes))
    }

    async fn deliver_one(&self, parsed: &Parsed<'_, EmailSend>) -> Report {
        let (envelope, send) = (parsed.envelope, &parsed.send);
        let (recipients, message) = match self.compose(envelope, send) {
            Ok(composed) => composed,
            Err(error) => return Report::failed(error),
        };
        if let Some(rate) = &self.rate {
            rate.acquire().await;
        }
        let started = Instant::now();
        let message_id = format!("<{}@{}>", envelope.id, self.domain);
        match &self.transport {
            Transport::Outbox(outbox) => {
                match outbox.write(&envelope.id.to_string(), message).await {
                    Ok(path) => Report::delivered().with_response(ResponseSummary {
                        status: None,
                        elapsed_ms: started.elapsed().as_millis() as u64,
                        body_excerpt: None,
                        location: Some(path.display().to_string()),
                    }),
                    Err(e) => Report::retry(format!(
                        "cannot write to the outbox {}: {e}",
                        outbox.folder().display()
                    )),
                }
            }
            Transport::Smtp(smtp) => {
                let result = smtp.send(&self.options.from, &recipients, &message).await;
                classify(result, started, &message_id)
            }
        }
    }
}

/// The decoded size of padded base64 text.
fn decoded_len(base64: &str) -> usize {
    let padding = base64.bytes().rev().take_while(|b| *b == b'=').count();
    (base64.len() / 4 * 3).saturating_sub(padding)
}

/// 4xx replies and broken connections are transient; 5xx replies, TLS and authentication
/// problems are permanent. The server's reply is kept.
fn classify(result: mail_send::Result<Reply>, started: Instant, message_id: &str) -> Report {
    use mail_send::Error;
    let summary = |reply: Option<&Reply>| ResponseSummary {
        status: reply.map(|r| r.code),
        elapsed_ms: started.elapsed().as_millis() as u64,
        body_excerpt: reply.map(|r| r.message.clone()),
        location: Some(message_id.to_owned()),
    };
    let error = match result {
        Ok(reply) => return Report::delivered().with_response(summary(Some(&reply))),
        Err(error) => error,
    };
    match &error {
        Error::UnexpectedReply(reply) | Error::AuthenticationFailed(reply) => {
            let what = if matches!(error, Error::AuthenticationFailed(_)) {
                "the SMTP server refused the credentials"
            } else {
                "the SMTP server refused the message"
            };
            let text = format!("{what}: {} {}", reply.code, reply.message);
            if reply.code / 100 == 4 {
                Report::retry(text).with_response(summary(Some(reply)))
            } else {
                Report::failed(text).with_response(summary(Some(reply)))
            }
        }
        Error::Io(_) | Error::Timeout | Error::UnparseableReply => {
            Report::retry(format!("SMTP: {error}")).with_response(summary(None))
        }
        Error::MissingStartTls => Report::failed(
            "the SMTP server does not offer STARTTLS (set `smtp.tls` to \"implicit\", or to \"opportunistic\" to allow clear text)",
        )
        .with_response(summary(None)),
        _ => Report::failed(format!("SMTP: {error}")).with_response(summary(None)),
    }
}

#[async_trait]
impl TypedDestination for EmailDestination {
    type Send = EmailSend;
    type Stored<'a> = EmailSend;
    type Options = EmailOptions;

    fn from_options(_instance: &str, options: EmailOptions) -> Result<Self, String> {
        Self::new(options)
    }

    fn check_for_instance(&self, send: &EmailSend) -> Result<(), InvalidPayload> {
        self.check_recipients_and_size(send)
    }

    async fn deliver(&self, sends: &[Parsed<'_, Self::Stored<'_>>]) -> BatchOutcome {
        let mut reports = Vec::with_capacity(sends.len());
        for send in sends {
            reports.push(self.deliver_one(send).await);
        }
        BatchOutcome::Each(reports)
    }

    async fn health(&self) -> Result<(), HealthError> {
        match &self.transport {
            Transport::Outbox(outbox) => std::fs::create_dir_all(outbox.folder()).map_err(|e| {
                HealthError(format!(
                    "cannot create the outbox {}: {e}",
                    outbox.folder().display()
                ))
            }),
            Transport::Smtp(smtp) => smtp
                .check()
                .await
                .map_err(|e| HealthError(format!("SMTP: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_lengths() {
        use base64::Engine as _;
        for n in 0..10 {
            let text = base64::engine::general_purpose::STANDARD.encode(vec![0u8; n]);
            assert_eq!(decoded_len(&text), n);
        }
    }
}
