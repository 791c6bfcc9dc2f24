//! The options of one S3 destination instance, from `[destinations.NAME]`.

use std::collections::BTreeMap;
use std::time::Duration;

use destinations_core::config::duration_text;
use serde::Deserialize;

/// The smallest part S3 accepts in a multipart upload (all but the last part).
pub const MIN_PART_BYTES: usize = 5 * 1024 * 1024;

/// Options of an S3 destination instance.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Options {
    /// Where objects go: `s3://` (each send's `bucket` is an S3 bucket), `gs://`, `az://`,
    /// `file://PATH` or `memory://` (each bucket a top-level folder). Default
    /// `file://./data/objects`.
    pub url: String,
    /// Buckets sends may name; empty = any. Checked at send time, and by `health()`.
    pub buckets: Vec<String>,
    /// `s3://`: the region (else `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// `s3://`: an S3-compatible server, e.g. `http://127.0.0.1:9000` (path-style requests).
    pub endpoint: Option<String>,
    /// `s3://`: allow a plain-HTTP `endpoint`.
    pub allow_http: bool,
    /// `s3://`: the access key (else the usual AWS environment and instance credentials).
    pub access_key_id: Option<String>,
    /// `s3://`: the secret key that goes with `access_key_id`.
    pub secret_access_key: Option<String>,
    /// `s3://`: a session token for temporary credentials.
    pub session_token: Option<String>,
    /// Any other option of the store's builder, by its object_store name (e.g.
    /// `google_service_account`, `azure_storage_account_name`, `aws_sse_kms_key_id`).
    pub store_options: BTreeMap<String, String>,
    /// How objects are compressed: `gzip` (default), `zstd` or `none`.
    pub compression: Compression,
    /// The compression level (gzip 0–9, default 2; zstd 1–22, default 3).
    pub compression_level: Option<u32>,
    /// Objects larger than this (after compression) go up as a multipart upload
    /// (default 8 MiB).
    pub multipart_threshold: usize,
    /// The size of each multipart part (default 8 MiB; S3's minimum is 5 MiB).
    pub part_size: usize,
    /// Time allowed for each request to the store (default 30 s).
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Quick retries of one request inside an attempt, for a blip (default 2; 0 leaves every
    /// retry to the hub's policy, where each one shows in the send's status).
    pub store_retries: usize,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            url: "file://./data/objects".to_owned(),
            buckets: Vec::new(),
            region: None,
            endpoint: None,
            allow_http: false,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            store_options: BTreeMap::new(),
            compression: Compression::Gzip,
            compression_level: None,
            multipart_threshold: 8 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            timeout: Duration::from_secs(30),
            store_retries: 2,
        }
    }
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |secret: &Option<String>| secret.as_ref().map(|_| "[hidden]");
        f.debug_struct("S3Options")
            .field("url", &self.url)
            .field("buckets", &self.buckets)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("allow_http", &self.allow_http)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &hidden(&self.secret_access_key))
            .field("session_token", &hidden(&self.session_token))
            .field(
                "store_options",
                &self.store_options.keys().collect::<Vec<_>>(),
            )
            .field("compression", &self.compression)
            .field("compression_level", &self.compression_level)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .field("timeout", &self.timeout)
            .field("store_retries", &self.store_retries)
            .finish()
    }
}

impl S3Options {
    /// Options for an S3-compatible server at `endpoint` (plain HTTP allowed), with these keys.
    pub fn s3_compatible(endpoint: &str, access_key_id: &str, secret_access_key: &str) -> Self {
        Self {
            url: "s3://".to_owned(),
            endpoint: Some(endpoint.to_owned()),
            allow_http: endpoint.starts_with("http://"),
            access_key_id: Some(access_key_id.to_owned()),
            secret_access_key: Some(secret_access_key.to_owned()),
            region: Some("us-east-1".to_owned()),
            ..Self::default()
        }
    }

    /// The options' own consistency, with the option named.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.part_size < MIN_PART_BYTES {
            return Err(format!(
                "`part_size` {} is below S3's minimum part of {MIN_PART_BYTES} bytes",
                self.part_size
            ));
        }
        if self.multipart_threshold == 0 {
            return Err("`multipart_threshold` must be above 0".to_owned());
        }
        if let Some(level) = self.compression_level {
            let range = match self.compression {
                Compression::Gzip => 0..=9,
                Compression::Zstd => 1..=22,
                Compression::None => {
                    return Err(
                        "`compression_level` has no meaning with `compression = \"none\"`"
                            .to_owned(),
                    );
                }
            };
            if !range.contains(&level) {
                return Err(format!(
                    "`compression_level` {level} is out of range for {:?} ({}–{})",
                    self.compression,
                    range.start(),
                    range.end()
                ));
            }
        }
        for bucket in &self.buckets {
            crate::send::check_bucket(bucket).map_err(|e| format!("`buckets`: {}", e.message))?;
        }
        Ok(())
    }
}

/// How objects are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip (RFC 1952), `.gz`: readable by every tool, the default.
    #[default]
    Gzip,
    /// Zstandard, `.zst`: smaller and faster.
    Zstd,
    /// Plain NDJSON, `.ndjson`. Holds nothing but the payloads, so two batches with identical
    /// payloads flushed in the same second of one prefix share a key (the later overwrites the
    /// earlier, identical object); the compressed formats label each batch to prevent that.
    None,
}

impl Compression {
    /// The key's extension.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Gzip => "gz",
            Self::Zstd => "zst",
            Self::None => "ndjson",
        }
    }

    /// The object's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Gzip => "application/gzip",
            Self::Zstd => "application/zstd",
            Self::None => "application/x-ndjson",
        }
    }
}
