//! One batch as one object: newline-delimited JSON, compressed, under a key named by the time
//! of the batch's first send and the SHA-256 of the object's bytes.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::SystemTime;

use chrono::{DateTime, Utc};

use crate::options::Compression;

/// gzip's default level here: zlib-rs at level 2 is within a few per cent of level 1's speed
/// and writes objects about a third smaller (smaller than `gzip -1`'s).
const DEFAULT_GZIP_LEVEL: u32 = 2;

/// An object ready to upload.
pub(crate) struct EncodedObject {
    /// The compressed bytes.
    pub(crate) bytes: Vec<u8>,
    /// Lower-case hex SHA-256 of `bytes`.
    pub(crate) digest: String,
    /// The NDJSON size before compression.
    pub(crate) plain_bytes: usize,
}

/// Encode these payloads (one JSON value each) as compressed NDJSON. The same payloads in the
/// same order, with the same `batch` label, always give the same bytes, so a retried batch gets
/// the same key.
///
/// The label (the id of the batch's first send) goes into the compressed format's own metadata —
/// the gzip header's comment, a zstd skippable frame — where every decoder ignores it. It keeps
/// two different batches with identical payloads, flushed in the same second, from sharing a
/// key and overwriting each other. Plain NDJSON has no such place (see `Compression::None`).
pub(crate) fn encode<'a>(
    payloads: impl Iterator<Item = &'a str>,
    batch: &str,
    compression: Compression,
    level: Option<u32>,
    size_hint: usize,
) -> io::Result<EncodedObject> {
    let label = format!("destinations batch {batch}");
    // The lines are gathered first and compressed in one call: a call per line costs the
    // compressor's set-up and a checksum over a few bytes each time.
    let plain = ndjson(payloads, size_hint);
    let plain_bytes = plain.len();
    let bytes = match compression {
        Compression::Gzip => {
            let level = flate2::Compression::new(level.unwrap_or(DEFAULT_GZIP_LEVEL));
            let mut encoder = flate2::GzBuilder::new()
                .comment(label)
                .write(Vec::with_capacity(plain.len() / 4), level);
            encoder.write_all(&plain)?;
            encoder.finish()?
        }
        Compression::Zstd => {
            let level = level.map_or(3, |l| i32::try_from(l).unwrap_or(3));
            let mut out = Vec::with_capacity(plain.len() / 4 + label.len() + 8);
            out.extend_from_slice(&ZSTD_SKIPPABLE_MAGIC.to_le_bytes());
            out.extend_from_slice(&(label.len() as u32).to_le_bytes());
            out.extend_from_slice(label.as_bytes());
            let mut encoder = zstd::Encoder::new(out, level)?;
            encoder.include_checksum(true)?;
            encoder.write_all(&plain)?;
            encoder.finish()?
        }
        Compression::None => plain,
    };
    let digest = hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref());
    Ok(EncodedObject {
        bytes,
        digest,
        plain_bytes,
    })
}

/// The first magic number of zstd's skippable frames (RFC 8878, 3.1.2).
const ZSTD_SKIPPABLE_MAGIC: u32 = 0x184D_2A50;

/// The payloads as NDJSON: each payload one line. JSON strings cannot hold a raw line break, so
/// the only line breaks a payload can carry are whitespace between tokens: dropping them keeps
/// the value and makes it one line.
fn ndjson<'a>(payloads: impl Iterator<Item = &'a str>, size_hint: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size_hint);
    for payload in payloads {
        let payload = payload.trim();
        if payload.contains(['\n', '\r']) {
            out.extend(payload.bytes().filter(|b| *b != b'\n' && *b != b'\r'));
        } else {
            out.extend_from_slice(payload.as_bytes());
        }
        out.push(b'\n');
    }
    out
}

/// The key inside the bucket: `FOLDER/YYYY/MM/DD/HH/YYYY-MM-DD-HH-MM-SS-DIGEST.EXT`, in UTC.
pub(crate) fn object_key(
    folder: &str,
    at: SystemTime,
    digest: &str,
    compression: Compression,
) -> String {
    let at: DateTime<Utc> = at.into();
    format!(
        "{folder}{}-{digest}.{}",
        at.format("%Y/%m/%d/%H/%Y-%m-%d-%H-%M-%S"),
        compression.extension()
    )
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// Without flate2's `runtime_detection`, zlib-rs is built without `std` and never uses the
    /// CPU's vector instructions: its CRC-32 alone took a quarter of the S3 load's CPU.
    #[test]
    fn gzip_uses_the_cpus_vector_instructions() {
        let manifest = include_str!("../../../Cargo.toml");
        let flate2 = manifest
            .lines()
            .find(|line| line.starts_with("flate2 "))
            .unwrap_or_else(|| panic!("the workspace names flate2"));
        assert!(
            flate2.contains("\"runtime_detection\""),
            "the workspace's flate2 must keep the `runtime_detection` feature: {flate2}"
        );
    }

    #[test]
    fn key_layout_matches_the_reference() {
        let at = UNIX_EPOCH + Duration::from_secs(1_558_800_898); // 2019-05-25 16:14:58 UTC
        let key = object_key("test/", at, &"ab".repeat(32), Compression::Gzip);
        assert_eq!(
            key,
            format!(
                "test/2019/05/25/16/2019-05-25-16-14-58-{}.gz",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn pretty_payloads_become_one_line_and_the_bytes_are_deterministic() {
        let payloads = ["{\n  \"a\": \"x\\ny\",\n  \"b\": [1,\r\n 2]\n}", "3"];
        let one = encode(payloads.into_iter(), "b1", Compression::Gzip, None, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let two = encode(payloads.into_iter(), "b1", Compression::Gzip, None, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.bytes, two.bytes);
        assert_eq!(one.digest, two.digest);
        let mut text = String::new();
        flate2::read::GzDecoder::new(&one.bytes[..])
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text, "{  \"a\": \"x\\ny\",  \"b\": [1, 2]}\n3\n");
        assert_eq!(one.plain_bytes, text.len());
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        assert_eq!(lines[0]["a"], "x\ny");
    }

    #[test]
    fn identical_payloads_of_different_batches_differ_in_bytes() {
        for compression in [Compression::Gzip, Compression::Zstd] {
            let one = encode(["{}"].into_iter(), "b1", compression, None, 0)
                .unwrap_or_else(|e| panic!("{e}"));
            let two = encode(["{}"].into_iter(), "b2", compression, None, 0)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_ne!(one.digest, two.digest, "{compression:?}");
        }
    }

    #[test]
    fn zstd_and_none_round_trip() {
        let payloads = ["{\"n\":1}", "{\"n\":2}"];
        let zstd = encode(payloads.into_iter(), "b1", Compression::Zstd, None, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let plain = zstd::decode_all(&zstd.bytes[..]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain, b"{\"n\":1}\n{\"n\":2}\n");
        let none = encode(payloads.into_iter(), "b1", Compression::None, None, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(none.bytes, plain);
    }
}
