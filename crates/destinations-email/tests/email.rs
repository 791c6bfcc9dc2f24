//! The email destination against a real SMTP server on 127.0.0.1 (aiosmtpd, with STARTTLS from
//! a test CA and AUTH), and in outbox mode. Messages are parsed back with mail-parser and
//! counted.

use std::time::Duration;

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{HubConfig, InstanceConfig, Registry};
use destinations_email::{Attachment, EmailSend, SendEmail};
use destinations_testkit::{
    Capabilities, ConformanceTarget, SinkBehaviour, SmtpConfig, SmtpServer, TempDir, conformance,
};
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::json;

const USER: &str = "mailer";
const PASSWORD: &str = "correct horse battery staple";

fn hub(options: serde_json::Value) -> Hub {
    let config = InstanceConfig::from_table("email", options).unwrap_or_else(|e| panic!("{e}"));
    Hub::builder()
        .config(HubConfig::default())
        .configured(&Registry::linked(), "email", config)
        .unwrap_or_else(|e| panic!("{e}"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn secure_server() -> SmtpConfig {
    SmtpConfig {
        starttls: true,
        login: Some((USER.to_owned(), PASSWORD.to_owned())),
        ..SmtpConfig::default()
    }
}

/// The options of an instance that sends through `server` with STARTTLS and AUTH.
fn smtp_table(server: &SmtpServer, extra: serde_json::Value) -> serde_json::Value {
    let mut table = json!({
        "kind": "email",
        "from": "robot@example.com",
        "from_name": "Release Robot",
        "to": ["owner@example.com"],
        "allowed_recipients": ["*@example.com", "*@example.org"],
        "smtp": {
            "host": "127.0.0.1",
            "port": server.port(),
            "tls": "starttls",
            "username": USER,
            "password": PASSWORD,
            "ca_file": server.ca_file().map(|p| p.display().to_string()),
            "timeout": "10s",
        },
    });
    if let (Some(table), serde_json::Value::Object(extra)) = (table.as_object_mut(), extra) {
        for (key, value) in extra {
            match (table.get_mut(&key), value) {
                (Some(serde_json::Value::Object(inner)), serde_json::Value::Object(value)) => {
                    inner.extend(value);
                }
                (_, value) => {
                    table.insert(key, value);
                }
            }
        }
    }
    table
}

fn parse(raw: &[u8]) -> mail_parser::Message<'_> {
    MessageParser::default()
        .parse(raw)
        .unwrap_or_else(|| panic!("not a parseable message:\n{}", String::from_utf8_lossy(raw)))
}

fn addresses(address: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    address
        .into_iter()
        .flat_map(|a| a.iter())
        .filter_map(|a| a.address().map(str::to_owned))
        .collect()
}

struct SmtpTarget {
    server: Option<SmtpServer>,
}

#[async_trait]
impl ConformanceTarget for SmtpTarget {
    fn kind(&self) -> &'static str {
        "email"
    }

    async fn start_sink(&mut self, behaviour: SinkBehaviour) -> serde_json::Value {
        let mut config = secure_server();
        match behaviour {
            SinkBehaviour::Accept => {}
            // Every send names its own recipient, so each one is deferred `n` times.
            SinkBehaviour::FailFirstAttempts(n) => {
                config.defer = Some(("@example\\.com".into(), n));
            }
            SinkBehaviour::RejectPermanently => config.refuse = Some(".".into()),
        }
        let server = SmtpServer::start(config).await;
        let mut table = smtp_table(&server, json!({}));
        self.server = Some(server);
        table.as_object_mut().map(|t| t.remove("kind"));
        table
    }

    fn payload(&self, marker: u64) -> serde_json::Value {
        json!({"subject": format!("marker {marker}"), "text": "conformance", "to": [format!("m{marker}@example.com")]})
    }

    fn invalid_payload(&self) -> (serde_json::Value, &'static str) {
        (
            json!({"subject": "hi\r\nBcc: spy@evil.test", "text": "x"}),
            "subject",
        )
    }

    async fn accepted_markers(&self) -> Vec<u64> {
        self.server
            .as_ref()
            .map(SmtpServer::messages)
            .unwrap_or_default()
            .iter()
            .filter_map(|mail| {
                parse(&mail.raw)
                    .subject()
                    .and_then(|s| s.strip_prefix("marker "))
                    .and_then(|n| n.parse().ok())
            })
            .collect()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            instance_checks: true,
            health: true,
            // The capture server (aiosmtpd) takes about 80 messages a second: 10 000 would
            // take two minutes a queue to prove what 1 000 does.
            burst: 1_000,
            ..Capabilities::default()
        }
    }

    /// A recipient outside the instance's `allowed_recipients`.
    fn instance_check(&self) -> Option<(serde_json::Value, serde_json::Value, &'static str)> {
        let payload = json!({"subject": "marker 0", "text": "x", "to": ["someone@elsewhere.test"]});
        Some((json!({}), payload, "to[0]"))
    }

    async fn stop_sink(&mut self) {
        if let Some(server) = &mut self.server {
            server.stop().await;
        }
    }
}

#[tokio::test]
async fn conformance() {
    conformance::run_all(&mut SmtpTarget { server: None }).await;
}

#[tokio::test]
async fn every_send_arrives_once_with_its_headers_both_bodies_over_tls_as_the_user() {
    let server = SmtpServer::start(secure_server()).await;
    let hub = hub(smtp_table(&server, json!({})));
    let run = hub.begin_run("release");
    let mut ids = Vec::new();
    for n in 0..20 {
        let mut email = EmailSend::text(
            format!("Build {n} passed"),
            format!("Build {n}: all green."),
        )
        .with_html(format!("<p>Build <b>{n}</b>: all green.</p>"));
        if n % 2 == 1 {
            email = email.to(["dev@example.com"]).cc(["lead@example.org"]);
        }
        ids.push(run.send().email(email).unwrap_or_else(|e| panic!("{e}")));
    }
    run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        hub.shutdown_within(Duration::from_secs(60)).await.abandoned,
        0
    );

    let mails = server.messages();
    assert_eq!(mails.len(), 20, "one message per send");
    let mut seen = Vec::new();
    for mail in &mails {
        assert!(mail.tls, "sent after STARTTLS");
        assert_eq!(mail.login.as_deref(), Some(USER));
        assert_eq!(mail.mail_from, "robot@example.com");
        let message = parse(&mail.raw);
        let subject = message.subject().unwrap_or_default().to_owned();
        let n: usize = subject
            .strip_prefix("Build ")
            .and_then(|s| s.strip_suffix(" passed"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("subject {subject:?}"));
        seen.push(n);
        let from = message
            .from()
            .and_then(|f| f.first())
            .unwrap_or_else(|| panic!("no From"));
        assert_eq!(from.name(), Some("Release Robot"));
        assert_eq!(from.address(), Some("robot@example.com"));
        let (to, cc) = if n % 2 == 1 {
            (vec!["dev@example.com"], vec!["lead@example.org"])
        } else {
            (vec!["owner@example.com"], vec![])
        };
        assert_eq!(addresses(message.to()), to);
        assert_eq!(addresses(message.cc()), cc);
        let mut envelope: Vec<&str> = to.iter().chain(&cc).copied().collect();
        envelope.sort_unstable();
        let mut rcpts: Vec<&str> = mail.rcpt_tos.iter().map(String::as_str).collect();
        rcpts.sort_unstable();
        assert_eq!(rcpts, envelope, "the envelope names every recipient");
        assert_eq!(
            message.body_text(0).as_deref().map(str::trim_end),
            Some(format!("Build {n}: all green.").as_str())
        );
        assert_eq!(
            message.body_html(0).as_deref().map(str::trim_end),
            Some(format!("<p>Build <b>{n}</b>: all green.</p>").as_str())
        );
        let content_type = message
            .content_type()
            .unwrap_or_else(|| panic!("no content type"));
        assert_eq!(
            (content_type.ctype(), content_type.subtype()),
            ("multipart", Some("alternative"))
        );
        let message_id = message.message_id().unwrap_or_default().to_owned();
        let id = ids[n].to_string();
        assert_eq!(
            message_id,
            format!("{id}@example.com"),
            "the Message-ID carries the send id"
        );
        let status = destinations_testkit::status(&hub, ids[n]).await;
        assert_eq!(status.state, State::Delivered);
        let response = status.response.unwrap_or_else(|| panic!("a reply"));
        assert_eq!(response.status, Some(250));
        assert_eq!(
            response.location.as_deref(),
            Some(format!("<{id}@example.com>").as_str())
        );
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
    let mut sessions: Vec<u64> = mails.iter().map(|m| m.session).collect();
    sessions.sort_unstable();
    sessions.dedup();
    assert!(
        sessions.len() <= 4,
        "20 messages over at most 4 reused connections (the default pool), not {}",
        sessions.len()
    );
}

#[tokio::test]
async fn attachment_bytes_round_trip() {
    let server = SmtpServer::start(secure_server()).await;
    let hub = hub(smtp_table(&server, json!({"max_payload_bytes": 4_000_000})));
    let binary: Vec<u8> = (0..200_000).map(|_| fastrand::u8(..)).collect();
    let text = "line one\r\nline two\n".repeat(100).into_bytes();
    hub.sender()
        .email(
            EmailSend::text("Your report", "Attached.")
                .attach(Attachment::new(
                    "report.bin",
                    "application/octet-stream",
                    &binary,
                ))
                .attach(Attachment::new("notes.txt", "text/plain", &text)),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        hub.shutdown_within(Duration::from_secs(60)).await.abandoned,
        0
    );
    let mails = server.messages();
    assert_eq!(mails.len(), 1);
    let message = parse(&mails[0].raw);
    let attachments: Vec<_> = message.attachments().collect();
    assert_eq!(attachments.len(), 2);
    assert_eq!(attachments[0].attachment_name(), Some("report.bin"));
    assert_eq!(
        attachments[0].content_type().map(|c| c.ctype()),
        Some("application")
    );
    assert_eq!(
        attachments[0].contents(),
        &binary[..],
        "binary bytes intact"
    );
    assert_eq!(attachments[1].attachment_name(), Some("notes.txt"));
    assert_eq!(
        attachments[1].contents(),
        &text[..],
        "text bytes intact, line ends included"
    );
}

#[tokio::test]
async fn a_wrong_password_is_a_dead_letter_with_the_servers_reply_and_fails_health() {
    let server = SmtpServer::start(secure_server()).await;
    let hub = hub(smtp_table(&server, json!({"smtp": {"password": "wrong"}})));
    let health = hub.health().await;
    let problem = health[0].1.as_ref().expect_err("health must fail");
    assert!(problem.0.contains("535"), "{problem}");
    hub.sender()
        .email(EmailSend::text("hi", "there"))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(Duration::from_secs(60)).await;
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].envelope.attempts, 1, "not retried");
    assert!(
        letters[0].reason.contains("refused the credentials") && letters[0].reason.contains("535"),
        "{}",
        letters[0].reason
    );
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn a_deferred_recipient_is_retried_until_accepted_and_a_refused_one_is_dead() {
    let server = SmtpServer::start(SmtpConfig {
        defer: Some(("later@".into(), 2)),
        refuse: Some("never@".into()),
        ..secure_server()
    })
    .await;
    let hub = hub(smtp_table(
        &server,
        json!({"retry": {"initial_delay": "10ms", "max_delay": "50ms"}}),
    ));
    let later = hub
        .sender()
        .email(EmailSend::text("later", "x").to(["later@example.com"]))
        .unwrap_or_else(|e| panic!("{e}"));
    let never = hub
        .sender()
        .email(EmailSend::text("never", "x").to(["never@example.com"]))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(Duration::from_secs(60)).await;
    let later = destinations_testkit::status(&hub, later).await;
    assert_eq!((later.state, later.attempts), (State::Delivered, 3));
    assert!(
        later
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("451")),
        "{later:?}"
    );
    let never = destinations_testkit::status(&hub, never).await;
    assert_eq!((never.state, never.attempts), (State::Dead, 1));
    let error = never.last_error.unwrap_or_default();
    assert!(
        error.contains("550") && error.contains("never@example.com"),
        "{error}"
    );
    assert_eq!(never.response.and_then(|r| r.status), Some(550));
    let mails = server.messages();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].rcpt_tos, vec!["later@example.com"]);
}

#[tokio::test]
async fn header_injection_and_recipients_outside_the_allowed_patterns_are_refused() {
    let folder = TempDir::new("email-refuse");
    let hub = hub(json!({
        "kind": "email",
        "to": ["owner@example.com"],
        "allowed_recipients": ["*@example.com"],
        "outbox": folder.path().display().to_string(),
    }));
    let cases = [
        (
            json!({"subject": "a\r\nBcc: spy@evil.test", "text": "x"}),
            "subject",
        ),
        (
            json!({"subject": "a", "text": "x", "to": ["x@example.com\r\nBcc: spy@evil.test"]}),
            "to[0]",
        ),
        (
            json!({"subject": "a", "text": "x", "cc": ["ok@example.com", "spy@evil.test"]}),
            "cc[1]",
        ),
        (
            json!({"subject": "a", "text": "x", "to": ["Name <x@example.com>"]}),
            "to[0]",
        ),
        (json!({"subject": "a"}), "text"),
        (
            json!({"subject": "a", "text": "x", "bcc": ["x@example.com"]}),
            "bcc",
        ),
        (
            json!({"subject": "a", "text": "x", "attachments": [{"filename": "a\r\n.pdf", "content_type": "application/pdf", "content": ""}]}),
            "attachments[0].filename",
        ),
        (
            json!({"subject": "a", "text": "x", "attachments": [{"filename": "a.pdf", "content_type": "application/pdf\r\nX: y", "content": ""}]}),
            "attachments[0].content_type",
        ),
    ];
    for (payload, field) in cases {
        match hub.sender().to("email", &payload) {
            Err(SendError::Invalid { error, .. }) => {
                assert_eq!(error.field, field, "{payload}: {error}");
            }
            other => panic!("{payload} was not refused: {other:?}"),
        }
    }
    match hub
        .sender()
        .email(EmailSend::text("a", "b").to(["spy@evil.test"]))
    {
        Err(SendError::Invalid { error, .. }) => {
            assert_eq!(error.field, "to[0]");
            assert!(error.message.contains("*@example.com"), "{error}");
        }
        other => panic!("typed send outside the patterns: {other:?}"),
    }
    hub.shutdown().await;
    assert!(
        !folder.path().exists()
            || std::fs::read_dir(folder.path())
                .map(|d| d.count())
                .unwrap_or(0)
                == 0
    );
}

#[tokio::test]
async fn the_outbox_holds_one_parseable_eml_file_per_send() {
    let folder = TempDir::new("email-outbox");
    let outbox = folder.path().join("outbox");
    let hub = hub(json!({
        "kind": "email",
        "from": "robot@example.com",
        "to": ["owner@example.com"],
        "outbox": outbox.display().to_string(),
    }));
    let ids: Vec<EventId> = (0..5)
        .map(|n| {
            hub.sender()
                .email(EmailSend::text(format!("note {n}"), "text").with_html("<i>html</i>"))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    hub.shutdown().await;
    let mut names: Vec<String> = std::fs::read_dir(&outbox)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| format!("{id}.eml")).collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "one file per send, named by its id, nothing half-written"
    );
    for (n, id) in ids.iter().enumerate() {
        let raw = std::fs::read(outbox.join(format!("{id}.eml"))).unwrap_or_else(|e| panic!("{e}"));
        let message = parse(&raw);
        assert_eq!(message.subject(), Some(format!("note {n}").as_str()));
        assert_eq!(addresses(message.to()), vec!["owner@example.com"]);
        assert_eq!(
            message.body_html(0).as_deref().map(str::trim_end),
            Some("<i>html</i>")
        );
        let location = destinations_testkit::status(&hub, *id)
            .await
            .response
            .and_then(|r| r.location);
        assert_eq!(
            location,
            Some(outbox.join(format!("{id}.eml")).display().to_string())
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_spaces_messages() {
    let folder = TempDir::new("email-rate");
    let hub = hub(json!({
        "kind": "email",
        "outbox": folder.path().display().to_string(),
        "rate_limit_per_minute": 6,
    }));
    let start = tokio::time::Instant::now();
    for n in 0..4 {
        hub.sender()
            .email(EmailSend::text(format!("n{n}"), "x"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    hub.shutdown_within(Duration::from_secs(3600)).await;
    assert_eq!(
        std::fs::read_dir(folder.path())
            .map(|d| d.count())
            .unwrap_or(0),
        4
    );
    // On the paused clock the spacing is exact: 10 s between messages, the first at once —
    // neither faster nor slower (review T5).
    let took = start.elapsed();
    assert!(
        (Duration::from_secs(30)..Duration::from_secs(31)).contains(&took),
        "4 messages at 6 a minute take 30 s, took {took:?}"
    );
}

#[tokio::test]
async fn starttls_is_required_unless_opportunistic_and_implicit_tls_works() {
    let plain = SmtpServer::start(SmtpConfig::default()).await;
    let table = |tls: &str| {
        json!({
            "kind": "email",
            "to": ["owner@example.com"],
            "smtp": {"host": "127.0.0.1", "port": plain.port(), "tls": tls},
        })
    };
    let strict = hub(table("starttls"));
    strict
        .sender()
        .email(EmailSend::text("s", "x"))
        .unwrap_or_else(|e| panic!("{e}"));
    strict.shutdown_within(Duration::from_secs(60)).await;
    let letters = destinations_testkit::dead_letters(&strict).await;
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].reason.contains("does not offer STARTTLS"),
        "{}",
        letters[0].reason
    );

    let relaxed = hub(table("opportunistic"));
    relaxed
        .sender()
        .email(EmailSend::text("o", "x"))
        .unwrap_or_else(|e| panic!("{e}"));
    relaxed.shutdown_within(Duration::from_secs(60)).await;
    assert!(
        destinations_testkit::dead_letters(&relaxed)
            .await
            .is_empty()
    );
    let mails = plain.messages();
    assert_eq!(mails.len(), 1);
    assert!(!mails[0].tls);

    let implicit = SmtpServer::start(SmtpConfig {
        implicit_tls: true,
        ..SmtpConfig::default()
    })
    .await;
    let hub = hub(json!({
        "kind": "email",
        "to": ["owner@example.com"],
        "smtp": {
            "host": "127.0.0.1",
            "port": implicit.port(),
            "tls": "implicit",
            "ca_file": implicit.ca_file().map(|p| p.display().to_string()),
        },
    }));
    hub.sender()
        .email(EmailSend::text("i", "x"))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(Duration::from_secs(60)).await;
    assert!(
        destinations_testkit::dead_letters(&hub).await.is_empty(),
        "{:?}",
        destinations_testkit::dead_letters(&hub)
            .await
            .first()
            .map(|l| &l.reason)
    );
    let mails = implicit.messages();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].tls);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_dead_letter() {
    let server = SmtpServer::start(secure_server()).await;
    let mut table = smtp_table(&server, json!({}));
    table["smtp"]
        .as_object_mut()
        .map(|smtp| smtp.remove("ca_file"));
    let hub = hub(table);
    hub.sender()
        .email(EmailSend::text("s", "x"))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(Duration::from_secs(60)).await;
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].reason.to_lowercase().contains("certificate"),
        "{}",
        letters[0].reason
    );
    assert!(server.messages().is_empty());
}

#[test]
fn bad_instance_options_are_refused_naming_the_option() {
    let build = |options: serde_json::Value| {
        let config = InstanceConfig::from_table("email", options).unwrap_or_else(|e| panic!("{e}"));
        Hub::builder()
            .configured(&Registry::linked(), "email", config)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let cases = [
        (json!({"kind": "email", "from": "nobody"}), "`from`"),
        (json!({"kind": "email", "to": []}), "`to`"),
        (json!({"kind": "email", "smtp": {"port": 25}}), "smtp.host"),
        (
            json!({"kind": "email", "smtp": {"host": "h", "tls": "none", "username": "u", "password": "p"}}),
            "clear text",
        ),
        (
            json!({"kind": "email", "smtp": {"host": "h", "username": "u"}}),
            "go together",
        ),
        (
            json!({"kind": "email", "smtp": {"host": "h", "tls": "ssl"}}),
            "tls",
        ),
        (
            json!({"kind": "email", "smtp": {"host": "h", "ca_file": "/nonexistent.pem"}}),
            "ca_file",
        ),
        (
            json!({"kind": "email", "rate_limit_per_minute": 0}),
            "rate_limit_per_minute",
        ),
        (json!({"kind": "email", "smtp_host": "h"}), "smtp_host"),
    ];
    for (options, expected) in cases {
        let error = build(options.clone());
        assert!(
            error.contains(expected),
            "{options}: {error:?} should mention {expected}"
        );
    }
}
