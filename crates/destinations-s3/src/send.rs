//! One S3 send, `{bucket, prefix, payload}`, and the rules it is checked against at send time.

use destinations_core::InvalidPayload;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The longest prefix accepted: S3 keys end at 1 024 bytes and the date folders, time, hash
/// and extension take about 110 of them.
pub const MAX_PREFIX_BYTES: usize = 900;

/// One event for an object store: written, with the others of its (bucket, prefix) batch, as
/// one line of a compressed NDJSON object.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct S3Send {
    /// The bucket (S3 naming rules; a top-level folder on `file://` and `memory://` stores).
    pub bucket: String,
    /// Where in the bucket, e.g. `events/orders/`: the date folders go below it. A prefix
    /// without a trailing `/` gets one.
    #[serde(default)]
    pub prefix: String,
    /// The event, any JSON value; written as one line.
    #[cfg_attr(feature = "openapi", schema(value_type = Value))]
    pub payload: Box<RawValue>,
}

impl S3Send {
    /// An event for `bucket` under `prefix`. A payload that cannot be serialized is reported by
    /// [`check`](Self::check), with the field named.
    pub fn new<T: Serialize + ?Sized>(
        bucket: impl Into<String>,
        prefix: impl Into<String>,
        payload: &T,
    ) -> Self {
        let payload = destinations_core::raw_json(payload);
        Self {
            bucket: bucket.into(),
            prefix: prefix.into(),
            payload,
        }
    }

    /// Everything the send-time check enforces: bucket naming rules, a prefix that stays inside
    /// the bucket, a payload.
    pub fn check(&self) -> Result<(), InvalidPayload> {
        check_bucket(&self.bucket)?;
        check_prefix(&self.prefix)?;
        destinations_core::check_serialized("payload", &self.payload)
    }
}

/// The routing part of a stored send, read without copying the payload.
#[derive(Deserialize)]
pub(crate) struct Route<'a> {
    #[serde(borrow)]
    pub(crate) bucket: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    pub(crate) prefix: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) payload: &'a RawValue,
}

/// S3's bucket naming rules (general purpose buckets): 3–63 characters of lower-case letters,
/// digits, `.` and `-`, starting and ending with a letter or digit, no `..`, not an IPv4
/// address, none of the reserved prefixes and suffixes. The same rules keep a bucket a single,
/// safe folder name on a file store.
pub fn check_bucket(bucket: &str) -> Result<(), InvalidPayload> {
    let invalid = |why: &str| {
        Err(InvalidPayload::field(
            "bucket",
            format!("`{bucket}` is not a valid bucket name: {why}"),
        ))
    };
    if !(3..=63).contains(&bucket.len()) {
        return invalid("it must be 3 to 63 characters long");
    }
    if let Some(c) = bucket
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '.' || *c == '-'))
    {
        return invalid(&format!(
            "`{c}` is not allowed (lower-case letters, digits, `.` and `-` only)"
        ));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge_ok(bucket.chars().next()) || !edge_ok(bucket.chars().last()) {
        return invalid("it must start and end with a letter or digit");
    }
    if bucket.contains("..") {
        return invalid("it must not contain `..`");
    }
    if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return invalid("it must not look like an IP address");
    }
    for reserved in ["xn--", "sthree-", "amzn-s3-demo-"] {
        if bucket.starts_with(reserved) {
            return invalid(&format!("the prefix `{reserved}` is reserved"));
        }
    }
    for reserved in ["-s3alias", "--ol-s3", "--x-s3", "--table-s3", ".mrap"] {
        if bucket.ends_with(reserved) {
            return invalid(&format!("the suffix `{reserved}` is reserved"));
        }
    }
    Ok(())
}

/// A prefix is a relative path inside the bucket: no leading `/`, no empty, `.` or `..`
/// segment, and only characters that need no escaping in any store (`A-Z a-z 0-9 - _ . ! * '
/// ( ) = /`).
pub fn check_prefix(prefix: &str) -> Result<(), InvalidPayload> {
    let invalid = |why: String| Err(InvalidPayload::field("prefix", why));
    if prefix.len() > MAX_PREFIX_BYTES {
        return invalid(format!(
            "{} bytes is too long (at most {MAX_PREFIX_BYTES})",
            prefix.len()
        ));
    }
    if let Some(c) = prefix.chars().find(|c| {
        !(c.is_ascii_alphanumeric()
            || matches!(
                c,
                '-' | '_' | '.' | '!' | '*' | '\'' | '(' | ')' | '=' | '/'
            ))
    }) {
        return invalid(format!(
            "{c:?} is not allowed; use letters, digits and - _ . ! * ' ( ) = /"
        ));
    }
    if prefix.starts_with('/') {
        return invalid("it must be relative to the bucket (no leading `/`)".to_owned());
    }
    let path = prefix.strip_suffix('/').unwrap_or(prefix);
    if !path.is_empty() {
        for segment in path.split('/') {
            match segment {
                "" => return invalid("it must not contain an empty folder (`//`)".to_owned()),
                "." | ".." => {
                    return invalid(format!(
                        "the folder `{segment}` is not allowed: a prefix stays inside its bucket"
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The prefix as a folder: empty, or ending with exactly one `/`.
pub(crate) fn folder(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    }
}

impl destinations_core::SendType for S3Send {
    const KIND: &'static str = crate::KIND;

    fn check(&self) -> Result<(), destinations_core::InvalidPayload> {
        S3Send::check(self).map(drop)
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
        /// A prefix that is accepted stays inside its bucket and makes a clean key: no
        /// leading `/`, no empty, `.` or `..` folder, whatever the characters tried.
        #[test]
        fn an_accepted_prefix_makes_a_clean_key(prefix in "[a-z./\\%: -]{0,16}") {
            if check_prefix(&prefix).is_ok() {
                let key = format!("{}2026/12/01/10/2026-12-01-10-00-00-ab.gz", folder(&prefix));
                prop_assert!(!key.starts_with('/'), "{key}");
                for segment in key.split('/') {
                    prop_assert!(!matches!(segment, "" | "." | ".."), "{key}");
                }
                prop_assert!(!key.contains(['\\', '%', ':', ' ']), "{key}");
            }
        }

        /// A bucket that is accepted is one path segment.
        #[test]
        fn an_accepted_bucket_is_one_segment(bucket in "[a-z0-9./-]{0,12}") {
            if check_bucket(&bucket).is_ok() {
                prop_assert!(!bucket.contains('/') && bucket != "." && bucket != "..", "{bucket}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_rules() {
        for good in ["abc", "my-bucket.logs", "a1b", "x".repeat(63).as_str()] {
            assert!(check_bucket(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            "My-Bucket",
            "-abc",
            "abc-",
            "a..b",
            "192.168.1.1",
            "xn--abc",
            "abc-s3alias",
            "a_b",
            "a/b",
            "x".repeat(64).as_str(),
        ] {
            let error = check_bucket(bad).expect_err(bad);
            assert_eq!(error.field, "bucket");
        }
    }

    #[test]
    fn prefix_rules() {
        for good in ["", "events", "events/", "a/b=1/c", "x.y/z_(1)"] {
            assert!(check_prefix(good).is_ok(), "{good}");
        }
        for bad in [
            "/abs",
            "a//b",
            "../up",
            "a/../b",
            "./a",
            "a b",
            "a\nb",
            "é",
            "s3://other/x",
        ] {
            let error = check_prefix(bad).expect_err(bad);
            assert_eq!(error.field, "prefix", "{bad}");
        }
        assert!(check_prefix(&"a".repeat(MAX_PREFIX_BYTES + 1)).is_err());
    }

    #[test]
    fn folder_adds_one_slash() {
        assert_eq!(folder(""), "");
        assert_eq!(folder("a"), "a/");
        assert_eq!(folder("a/"), "a/");
    }
}
