//! Batched requests: sends to the same method, URL, headers and credentials share one request
//! whose body holds each send's `data` — one JSON value per line (`ndjson`) or a JSON array
//! (`json_array`) — in the order they were sent. The response decides for the whole batch;
//! each send keeps its own id and status. Request bodies may be gzipped.

use std::io::Write;

use aws_lc_rs::digest::{SHA256, digest};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

#[cfg(test)]
use crate::request::HttpRequest;

/// How a batch's sends make one body (the instance's `encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchEncoding {
    /// One JSON value per line (`application/x-ndjson`).
    Ndjson,
    /// A JSON array (`application/json`).
    JsonArray,
}

impl BatchEncoding {
    /// The content type of a body in this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Ndjson => "application/x-ndjson",
            Self::JsonArray => "application/json",
        }
    }

    /// One body of the sends' `data`, in order (a send without `data` is `null`).
    pub fn encode<'a>(self, data: impl ExactSizeIterator<Item = Option<&'a RawValue>>) -> Bytes {
        let mut body = Vec::with_capacity(data.len() * 64 + 2);
        if self == Self::JsonArray {
            body.push(b'[');
        }
        for (n, value) in data.enumerate() {
            if self == Self::JsonArray && n > 0 {
                body.push(b',');
            }
            body.extend_from_slice(value.map_or("null", RawValue::get).as_bytes());
            if self == Self::Ndjson {
                body.push(b'\n');
            }
        }
        if self == Self::JsonArray {
            body.push(b']');
        }
        Bytes::from(body)
    }
}

/// How request bodies are compressed (the instance's `compression`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// As they are (the default).
    #[default]
    None,
    /// Gzip, with `Content-Encoding: gzip`.
    Gzip,
}

impl Compression {
    /// The body compressed, and its `Content-Encoding`, if any.
    pub fn apply(self, body: Bytes) -> (Bytes, Option<&'static str>) {
        match self {
            Self::None => (body, None),
            Self::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(
                    Vec::with_capacity(body.len() / 4 + 64),
                    flate2::Compression::fast(),
                );
                // Writing to memory cannot fail.
                let _ = encoder.write_all(&body);
                let gzipped = encoder.finish().unwrap_or_default();
                (Bytes::from(gzipped), Some("gzip"))
            }
        }
    }
}

/// Which batch a stored request joins: the same method, URL, query, headers and credentials,
/// as written (two sends that write the same headers differently batch apart, which is only
/// less batching). Read without the `data`, which the dispatcher asks about for every send.
pub(crate) fn group_of(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Identity<'a> {
        #[serde(borrow, default)]
        method: Option<&'a RawValue>,
        #[serde(borrow)]
        url: &'a RawValue,
        #[serde(borrow, default)]
        headers: Option<&'a RawValue>,
        #[serde(borrow, default)]
        params: Option<&'a RawValue>,
        #[serde(borrow, default)]
        auth: Option<&'a RawValue>,
        #[serde(borrow, default)]
        ordering_key: Option<&'a RawValue>,
    }
    let identity: Identity<'_> = serde_json::from_slice(payload).ok()?;
    let mut key = String::with_capacity(identity.url.get().len() + 16);
    for part in [
        identity.method,
        Some(identity.url),
        identity.headers,
        identity.params,
        identity.auth,
        identity.ordering_key,
    ] {
        key.push_str(part.map_or("", RawValue::get));
        key.push('\u{1f}');
    }
    Some(key)
}

/// A batch member's `data`, read alone.
pub(crate) fn data_of(payload: &[u8]) -> Result<Option<&RawValue>, serde_json::Error> {
    #[derive(Deserialize)]
    struct DataOnly<'a> {
        #[serde(borrow, default)]
        data: Option<&'a RawValue>,
    }
    serde_json::from_slice::<DataOnly<'_>>(payload).map(|d| d.data)
}

/// The idempotency key of a batch: the same sends make the same key, so a retried batch is
/// recognised; `b_` and 32 hex digits.
pub(crate) fn key_of<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let mut joined = String::new();
    for id in ids {
        joined.push_str(id);
        joined.push(',');
    }
    format!(
        "b_{}",
        hex(&digest(&SHA256, joined.as_bytes()).as_ref()[..16])
    )
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn bodies_keep_each_sends_data_in_order() {
        let (a, b) = (raw(r#"{"n":1}"#), raw(r#""text""#));
        let data = || [Some(a.as_ref()), None, Some(b.as_ref())].into_iter();
        assert_eq!(
            BatchEncoding::JsonArray.encode(data()),
            Bytes::from_static(br#"[{"n":1},null,"text"]"#)
        );
        assert_eq!(
            BatchEncoding::Ndjson.encode(data()),
            Bytes::from_static(b"{\"n\":1}\nnull\n\"text\"\n")
        );
    }

    #[test]
    fn keys_follow_the_ids_and_their_order() {
        let key = key_of(["a", "b"].into_iter());
        assert_eq!(key, key_of(["a", "b"].into_iter()));
        assert_ne!(key, key_of(["b", "a"].into_iter()));
        assert_eq!(key.len(), 34);
    }

    #[test]
    fn requests_group_by_what_makes_them_one_request() {
        let group = |request: HttpRequest| group_of(&serde_json::to_vec(&request).unwrap());
        let post = |url: &str| HttpRequest::post(url);
        assert_eq!(group(post("http://a/x")), group(post("http://a/x")));
        assert_eq!(
            group(post("http://a/x").json(&1)),
            group(post("http://a/x").json(&2)),
            "data aside"
        );
        assert_ne!(group(post("http://a/x")), group(post("http://a/y")));
        assert_ne!(
            group(post("http://a/x")),
            group(post("http://a/x").header("x-tenant", "1"))
        );
        assert_ne!(
            group(post("http://a/x")),
            group(HttpRequest::new(crate::Method::Put, "http://a/x"))
        );
        assert_ne!(
            group(post("http://a/x").ordering_key("1")),
            group(post("http://a/x").ordering_key("2")),
            "a batch keeps one key's order"
        );
    }
}
