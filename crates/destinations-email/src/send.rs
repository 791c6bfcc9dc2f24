//! One email send, `{subject, text?, html?, to?, cc?, attachments?}`, and the rules it is
//! checked against at send time.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use destinations_core::InvalidPayload;
use serde::{Deserialize, Serialize};

/// The longest subject accepted (RFC 5322 lines end at 998 characters; folding aside, a
/// subject past this is a mistake).
pub const MAX_SUBJECT_CHARS: usize = 998;
/// The most recipients (`to` and `cc` together) one send may name.
pub const MAX_RECIPIENTS: usize = 50;

/// One email: sent to the instance's owner (`to` in its config) unless it names recipients the
/// instance allows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EmailSend {
    /// The subject (required; one line).
    pub subject: String,
    /// The plain-text body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The HTML body; with `text` too, the message is multipart/alternative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Recipients; default the instance's `to`. Each must match `allowed_recipients`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Copy recipients; each must match `allowed_recipients`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cc: Vec<String>,
    /// Files to attach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
}

/// A file attached to an email.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Attachment {
    /// The file's name as the recipient sees it (no folders).
    pub filename: String,
    /// Its type, e.g. `application/pdf`.
    pub content_type: String,
    /// Its bytes, base64 (standard alphabet, padded).
    pub content: String,
}

impl Attachment {
    /// An attachment of these bytes.
    pub fn new(filename: impl Into<String>, content_type: impl Into<String>, bytes: &[u8]) -> Self {
        Self {
            filename: filename.into(),
            content_type: content_type.into(),
            content: STANDARD.encode(bytes),
        }
    }

    /// The decoded bytes (checked at send time).
    pub fn bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        STANDARD.decode(&self.content)
    }
}

impl EmailSend {
    /// An email with this subject and plain-text body, to the instance's owner.
    pub fn text(subject: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            text: Some(text.into()),
            ..Self::default()
        }
    }

    /// The same email with an HTML body too (multipart/alternative).
    pub fn with_html(mut self, html: impl Into<String>) -> Self {
        self.html = Some(html.into());
        self
    }

    /// The same email to these recipients instead of the owner.
    pub fn to<I: IntoIterator<Item = S>, S: Into<String>>(mut self, recipients: I) -> Self {
        self.to = recipients.into_iter().map(Into::into).collect();
        self
    }

    /// The same email with these copy recipients.
    pub fn cc<I: IntoIterator<Item = S>, S: Into<String>>(mut self, recipients: I) -> Self {
        self.cc = recipients.into_iter().map(Into::into).collect();
        self
    }

    /// The same email with one more attachment.
    pub fn attach(mut self, attachment: Attachment) -> Self {
        self.attachments.push(attachment);
        self
    }

    /// The checks that need no instance: a one-line subject, a body, valid addresses and
    /// attachments. Returns the attachments' decoded size.
    pub fn check(&self) -> Result<usize, InvalidPayload> {
        if self.subject.trim().is_empty() {
            return Err(InvalidPayload::field("subject", "must not be empty"));
        }
        check_one_line("subject", &self.subject)?;
        if self.subject.chars().count() > MAX_SUBJECT_CHARS {
            return Err(InvalidPayload::field(
                "subject",
                format!("is longer than {MAX_SUBJECT_CHARS} characters"),
            ));
        }
        if self.text.is_none() && self.html.is_none() {
            return Err(InvalidPayload::field(
                "text",
                "give `text`, `html` or both: an email needs a body",
            ));
        }
        if self.to.len() + self.cc.len() > MAX_RECIPIENTS {
            return Err(InvalidPayload::field(
                "to",
                format!("at most {MAX_RECIPIENTS} recipients (to and cc together)"),
            ));
        }
        for (field, list) in [("to", &self.to), ("cc", &self.cc)] {
            for (i, address) in list.iter().enumerate() {
                check_address(address).map_err(|why| {
                    InvalidPayload::field(
                        format!("{field}[{i}]"),
                        format!("`{}`: {why}", address.escape_debug()),
                    )
                })?;
            }
        }
        let mut total = 0;
        for (i, attachment) in self.attachments.iter().enumerate() {
            let at = |field: &str| format!("attachments[{i}].{field}");
            check_one_line(&at("filename"), &attachment.filename)?;
            if attachment.filename.is_empty()
                || attachment.filename.contains(['/', '\\'])
                || attachment.filename.chars().any(char::is_control)
            {
                return Err(InvalidPayload::field(
                    at("filename"),
                    "must be a plain file name (no folders, no control characters)",
                ));
            }
            if !is_content_type(&attachment.content_type) {
                return Err(InvalidPayload::field(
                    at("content_type"),
                    format!(
                        "`{}` is not a media type like `application/pdf`",
                        attachment.content_type.escape_debug()
                    ),
                ));
            }
            let bytes = attachment.bytes().map_err(|e| {
                InvalidPayload::field(at("content"), format!("is not valid base64: {e}"))
            })?;
            total += bytes.len();
        }
        Ok(total)
    }
}

fn check_one_line(field: &str, value: &str) -> Result<(), InvalidPayload> {
    if value.contains(['\r', '\n']) {
        return Err(InvalidPayload::field(
            field,
            "must be one line: CR and LF would inject headers",
        ));
    }
    Ok(())
}

/// A plain address, `local@domain`: what SMTP's `RCPT TO:<...>` carries. Display names are not
/// taken (the instance's config names people; sends name mailboxes).
pub fn check_address(address: &str) -> Result<(), String> {
    if address.len() > 254 {
        return Err("is longer than 254 characters".to_owned());
    }
    if let Some(c) = address.chars().find(|c| {
        c.is_control()
            || c.is_whitespace()
            || matches!(
                c,
                '<' | '>' | ',' | ';' | '"' | '(' | ')' | '[' | ']' | '\\'
            )
    }) {
        return Err(format!("{c:?} is not allowed in an address"));
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err("is not an address like `name@example.com`".to_owned());
    };
    if local.is_empty() || local.len() > 64 || local.contains('@') {
        return Err("the part before `@` must be 1 to 64 characters, without `@`".to_owned());
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err("the part before `@` must not start or end with `.` or hold `..`".to_owned());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_alphanumeric() || c == '-')
    };
    if labels.len() < 2 && domain != "localhost" || !labels.iter().all(label_ok) {
        return Err(format!("`{domain}` is not a domain like `example.com`"));
    }
    Ok(())
}

fn is_content_type(value: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "!#$&-^_.+".contains(c))
    };
    value
        .split_once('/')
        .is_some_and(|(kind, sub)| token(kind) && token(sub))
}

/// Whether `address` matches one of `patterns` (`*` matches any run of characters; case does
/// not matter), e.g. `*@example.com`, `ops+*@example.com`, `owner@example.com`.
///
/// An address whose local part holds `%` or `!` never matches: old relays route
/// `a%evil.com@example.com` (and `evil.com!a@example.com`) on to another domain, which would
/// walk past a pattern like `*@example.com`.
pub fn allowed(address: &str, patterns: &[String]) -> bool {
    if routes_onwards(address) {
        return false;
    }
    let address = address.to_ascii_lowercase();
    patterns
        .iter()
        .any(|p| destinations_core::glob_match(&p.to_ascii_lowercase(), &address))
}

/// Whether the local part of `address` holds a relay-routing character (`%` or `!`).
pub(crate) fn routes_onwards(address: &str) -> bool {
    address
        .rsplit_once('@')
        .map_or(address, |(local, _)| local)
        .contains(['%', '!'])
}

impl destinations_core::SendType for EmailSend {
    const KIND: &'static str = crate::KIND;

    fn check(&self) -> Result<(), InvalidPayload> {
        EmailSend::check(self).map(drop)
    }
    #[cfg(feature = "openapi")]
    fn schema() -> Option<destinations_core::SendSchema> {
        Some(destinations_core::SendSchema::of::<Self>())
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// An accepted address is one line with one `@` and nothing a header could be split
        /// or extended with; one that an allow-list admits routes nowhere else.
        #[test]
        fn accepted_addresses_cannot_inject_or_route(address in "[a-z%!@.<>,;: \r\n\"-]{0,16}") {
            if check_address(&address).is_ok() {
                prop_assert!(!address.contains(['\r', '\n', '<', '>', ',', ';', '"', ' ']), "{address:?}");
                prop_assert_eq!(address.matches('@').count(), 1, "{:?}", address);
            }
            if allowed(&address, &["*".to_owned()]) {
                prop_assert!(!routes_onwards(&address), "{address:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_routing_local_parts_never_match_an_allow_list() {
        let patterns = vec!["*@example.com".to_owned()];
        assert!(allowed("ops@example.com", &patterns));
        for routed in [
            "a%evil.com@example.com",
            "evil.com!a@example.com",
            "A%EVIL.COM@EXAMPLE.COM",
        ] {
            assert!(!allowed(routed, &patterns), "{routed}");
        }
    }

    #[test]
    fn addresses() {
        for good in [
            "a@example.com",
            "ops+alerts@mail.example.co.uk",
            "x@localhost",
            "é@exämple.com",
        ] {
            assert!(check_address(good).is_ok(), "{good}");
        }
        for bad in [
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a b@example.com",
            "a@example.com\r\nBcc: x@evil.com",
            "Name <a@example.com>",
            "a..b@example.com",
            "a@-x.com",
            "a@example..com",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        let patterns = vec!["*@example.com".to_owned(), "ops+*@corp.io".to_owned()];
        assert!(allowed("Luke@Example.com", &patterns));
        assert!(allowed("ops+pager@corp.io", &patterns));
        assert!(!allowed("luke@example.com.evil.io", &patterns));
        assert!(!allowed("ops@corp.io", &patterns));
        assert!(!allowed("a@example.com", &[]));
    }

    #[test]
    fn send_checks_name_the_field() {
        let field = |send: EmailSend| send.check().map(|_| ()).err().map(|e| e.field);
        assert_eq!(field(EmailSend::text("hi", "body")), None);
        assert_eq!(field(EmailSend::text("", "body")), Some("subject".into()));
        assert_eq!(
            field(EmailSend::text("a\r\nBcc: x@y.z", "b")),
            Some("subject".into())
        );
        assert_eq!(
            field(EmailSend {
                subject: "s".into(),
                ..EmailSend::default()
            }),
            Some("text".into())
        );
        assert_eq!(
            field(EmailSend::text("s", "b").cc(["ok@example.com", "bad"])),
            Some("cc[1]".into())
        );
        let mut bad = Attachment::new("../x.pdf", "application/pdf", b"1");
        assert_eq!(
            field(EmailSend::text("s", "b").attach(bad.clone())),
            Some("attachments[0].filename".into())
        );
        bad.filename = "x.pdf".into();
        bad.content = "%%%".into();
        assert_eq!(
            field(EmailSend::text("s", "b").attach(bad.clone())),
            Some("attachments[0].content".into())
        );
        bad.content_type = "pdf".into();
        assert_eq!(
            field(EmailSend::text("s", "b").attach(bad)),
            Some("attachments[0].content_type".into())
        );
        let good = Attachment::new("r.pdf", "application/pdf", &[1, 2, 3]);
        assert_eq!(EmailSend::text("s", "b").attach(good).check().ok(), Some(3));
    }
}
