//! The S3 destination: each batch of a (bucket, prefix) becomes one compressed NDJSON object.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use destinations_core::{
    Batch, BatchOutcome, BatchPolicy, ConfigError, Destination, EventId, HealthError,
    InvalidPayload, Report, ResponseSummary, parse_strict,
};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, PutMultipartOptions, PutOptions, PutPayload, WriteMultipart,
};

use crate::KIND;
use crate::metrics::S3Metrics;
use crate::object::{EncodedObject, encode, object_key};
use crate::options::{Compression, S3Options};
use crate::send::{Route, S3Send, folder};
use crate::store::Stores;

/// Writes each batch as one object.
pub struct S3Destination {
    options: S3Options,
    stores: Stores,
    metrics: S3Metrics,
}

impl S3Destination {
    /// An instance named `instance` (for its metrics) with these options.
    pub fn new(instance: &str, options: S3Options) -> Result<Self, String> {
        options.check()?;
        let stores = Stores::new(&options)?;
        Ok(Self {
            options,
            stores,
            metrics: S3Metrics::new(instance),
        })
    }

    /// Build an instance from its config options (the registry's entry point).
    pub fn from_config(
        instance: &str,
        options: serde_json::Value,
    ) -> Result<Arc<dyn Destination>, ConfigError> {
        let options: S3Options = destinations_core::parse_options(instance, options)?;
        Self::new(instance, options)
            .map(|d| Arc::new(d) as Arc<dyn Destination>)
            .map_err(|message| ConfigError::new(instance, message))
    }

    /// Sends may only name the buckets the instance lists, when it lists any.
    fn check_bucket_allowed(&self, bucket: &str) -> Result<(), InvalidPayload> {
        if self.options.buckets.is_empty() || self.options.buckets.iter().any(|b| b == bucket) {
            return Ok(());
        }
        Err(InvalidPayload::field(
            "bucket",
            format!(
                "`{bucket}` is not one of this instance's buckets ({})",
                self.options.buckets.join(", ")
            ),
        ))
    }

    /// Write one group's object and say how it went.
    async fn write(&self, group: EncodedGroup) -> Report {
        let started = Instant::now();
        let summary = |location: Option<String>| ResponseSummary {
            status: None,
            elapsed_ms: started.elapsed().as_millis() as u64,
            body_excerpt: None,
            location,
        };
        let placement = match self.stores.placement(&group.bucket) {
            Ok(placement) => placement,
            Err(error) => return classify(&error).with_response(summary(None)),
        };
        let key = object_key(
            &group.folder,
            group.first_sent_at,
            &group.object.digest,
            self.options.compression,
        );
        let path = match Path::parse(format!("{}{key}", placement.folder)) {
            Ok(path) => path,
            Err(error) => {
                return Report::failed(format!("the object key `{key}` is not valid: {error}"));
            }
        };
        let mut attributes = Attributes::new();
        if placement.keeps_attributes {
            attributes.insert(
                Attribute::ContentType,
                self.options.compression.content_type().into(),
            );
        }
        let size = group.object.bytes.len();
        let bytes = Bytes::from(group.object.bytes);
        let result = if size > self.options.multipart_threshold {
            let upload = placement
                .store
                .put_multipart_opts(
                    &path,
                    PutMultipartOptions {
                        attributes,
                        ..PutMultipartOptions::default()
                    },
                )
                .await;
            match upload {
                Ok(upload) => {
                    let mut writer =
                        WriteMultipart::new_with_chunk_size(upload, self.options.part_size);
                    writer.put(bytes);
                    writer.finish().await.map(drop)
                }
                Err(error) => Err(error),
            }
        } else {
            placement
                .store
                .put_opts(&path, PutPayload::from(bytes), PutOptions::from(attributes))
                .await
                .map(drop)
        };
        self.metrics.upload_seconds.record(started.elapsed());
        let location = format!("{}/{key}", group.bucket);
        match result {
            Ok(()) => {
                self.metrics.objects.increment(1);
                self.metrics.object_bytes.increment(size as u64);
                self.metrics.events.increment(group.indices.len() as u64);
                self.metrics
                    .ndjson_bytes
                    .increment(group.object.plain_bytes as u64);
                self.metrics
                    .object_events
                    .record(group.indices.len() as f64);
                tracing::debug!(object = %location, events = group.indices.len(), bytes = size, "object written");
                Report::delivered().with_response(summary(Some(location)))
            }
            Err(error) => {
                tracing::debug!(object = %location, %error, "object write failed");
                classify(&error).with_response(summary(Some(location)))
            }
        }
    }
}

/// One (bucket, folder) of a batch, encoded.
struct EncodedGroup {
    bucket: String,
    folder: String,
    /// Positions in the batch.
    indices: Vec<usize>,
    /// When the group's first send was made: the time in the key, the same on every retry.
    first_sent_at: SystemTime,
    object: EncodedObject,
}

/// Parse, group and compress a batch's payloads, off the async threads.
fn encode_groups(
    payloads: &[(Bytes, SystemTime, EventId)],
    compression: Compression,
    level: Option<u32>,
) -> (Vec<EncodedGroup>, Vec<(usize, String)>) {
    /// The envelopes of one (bucket, folder) while they are gathered.
    struct Gathering<'a> {
        bucket: std::borrow::Cow<'a, str>,
        prefix: std::borrow::Cow<'a, str>,
        indices: Vec<usize>,
        lines: Vec<&'a str>,
        first_sent_at: SystemTime,
        first_id: EventId,
        size: usize,
    }
    // A batch holds one group's sends (the dispatcher batches by group), so the groups here
    // are few: found by comparing, with no key built per send.
    let mut groups: Vec<Gathering<'_>> = Vec::new();
    let mut unreadable = Vec::new();
    for (index, (payload, sent_at, id)) in payloads.iter().enumerate() {
        match serde_json::from_slice::<Route<'_>>(payload) {
            Ok(route) => {
                let known = groups.iter().position(|g| {
                    g.bucket == route.bucket && same_folder(&g.prefix, &route.prefix)
                });
                let at = known.unwrap_or_else(|| {
                    groups.push(Gathering {
                        bucket: route.bucket,
                        prefix: route.prefix,
                        indices: Vec::new(),
                        lines: Vec::new(),
                        first_sent_at: *sent_at,
                        first_id: *id,
                        size: 0,
                    });
                    groups.len() - 1
                });
                let group = &mut groups[at];
                group.indices.push(index);
                group.lines.push(route.payload.get());
                group.first_sent_at = group.first_sent_at.min(*sent_at);
                group.size += payload.len();
            }
            Err(error) => {
                unreadable.push((index, format!("the stored send no longer parses: {error}")));
            }
        }
    }
    let mut encoded = Vec::with_capacity(groups.len());
    for group in groups {
        let (bucket, folder) = (group.bucket.into_owned(), folder(&group.prefix));
        let label = group.first_id.to_string();
        match encode(
            group.lines.into_iter(),
            &label,
            compression,
            level,
            group.size,
        ) {
            Ok(object) => encoded.push(EncodedGroup {
                bucket,
                folder,
                indices: group.indices,
                first_sent_at: group.first_sent_at,
                object,
            }),
            Err(error) => {
                for index in group.indices {
                    unreadable.push((index, format!("compressing the object failed: {error}")));
                }
            }
        }
    }
    (encoded, unreadable)
}

/// Whether two prefixes name the same folder, as [`folder`] makes them (`a` and `a/` do; the
/// empty prefix is the bucket's root).
fn same_folder(a: &str, b: &str) -> bool {
    fn named(prefix: &str) -> Option<&str> {
        (!prefix.is_empty()).then(|| prefix.strip_suffix('/').unwrap_or(prefix))
    }
    named(a) == named(b)
}

/// Transient or permanent, with the store's own message.
fn classify(error: &object_store::Error) -> Report {
    let message = error.to_string();
    match store_status(error) {
        Some(404) => Report::failed(format!(
            "the bucket does not exist or the path is not writable: {message}"
        )),
        Some(401 | 403) => Report::failed(format!("the store refused the credentials: {message}")),
        Some(408 | 429) | None => Report::retry(message),
        Some(status) if (400..500).contains(&status) => Report::failed(message),
        Some(_) => Report::retry(message),
    }
}

/// The HTTP status behind a store error. object_store names some as variants and leaves the
/// rest (list requests, 400s, 5xx after its own retries) in the text of `Generic`:
/// `... status code: 400 Bad Request ...`. Errors with no status — connection refused,
/// timeouts — give `None`, and are transient. Local errors with no HTTP meaning map to 400.
fn store_status(error: &object_store::Error) -> Option<u16> {
    use object_store::Error;
    match error {
        Error::NotFound { .. } => Some(404),
        Error::PermissionDenied { .. } => Some(403),
        Error::Unauthenticated { .. } => Some(401),
        Error::Generic { .. } | Error::JoinError { .. } => status_in(&error.to_string()),
        _ => Some(400),
    }
}

/// The status code in a store error's text, if any.
fn status_in(message: &str) -> Option<u16> {
    let (_, after) = message.split_once("status code: ")?;
    after.get(..3)?.parse().ok()
}

#[async_trait]
impl Destination for S3Destination {
    fn send_schema(&self) -> Option<destinations_core::SendSchema> {
        <crate::send::S3Send as destinations_core::SendType>::schema()
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        let send: S3Send = parse_strict(payload)?;
        send.check()?;
        self.check_bucket_allowed(&send.bucket)
    }

    fn validate_for_instance(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        if self.options.buckets.is_empty() {
            return Ok(());
        }
        let route: Route<'_> = serde_json::from_slice(payload)
            .map_err(|e| InvalidPayload::field("", e.to_string()))?;
        self.check_bucket_allowed(&route.bucket)
    }

    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy {
            max_events: 10_000,
            max_bytes: 8 * 1024 * 1024,
            max_age: Duration::from_secs(60),
        }
    }

    fn batch_group(&self, payload: &[u8]) -> Option<String> {
        // Once per send on the dispatcher's path: one allocation, the key of `folder` built in.
        let route: Route<'_> = serde_json::from_slice(payload).ok()?;
        let mut group = String::with_capacity(route.bucket.len() + route.prefix.len() + 2);
        group.push_str(&route.bucket);
        group.push('\n');
        group.push_str(&route.prefix);
        if !route.prefix.is_empty() && !route.prefix.ends_with('/') {
            group.push('/');
        }
        Some(group)
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let payloads: Vec<(Bytes, SystemTime, EventId)> = batch
            .envelopes()
            .iter()
            .map(|e| (e.payload.clone(), e.created_at, e.id))
            .collect();
        let (compression, level) = (self.options.compression, self.options.compression_level);
        let started = Instant::now();
        let encoded =
            tokio::task::spawn_blocking(move || encode_groups(&payloads, compression, level)).await;
        self.metrics.compress_seconds.record(started.elapsed());
        let (groups, unreadable) = match encoded {
            Ok(encoded) => encoded,
            Err(error) => {
                return BatchOutcome::All(Report::retry(format!(
                    "encoding the batch failed: {error}"
                )));
            }
        };
        let mut reports = vec![None; batch.len()];
        for (index, error) in unreadable {
            reports[index] = Some(Report::failed(error));
        }
        let written = futures::future::join_all(groups.into_iter().map(|group| async move {
            let indices = group.indices.clone();
            (indices, self.write(group).await)
        }))
        .await;
        for (indices, report) in written {
            for index in indices {
                reports[index] = Some(report.clone());
            }
        }
        BatchOutcome::Each(
            reports
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Report::retry("no object was written for this send")))
                .collect(),
        )
    }

    async fn health(&self) -> Result<(), HealthError> {
        if let Some(root) = self.stores.local_root() {
            return std::fs::create_dir_all(root).map_err(|e| {
                HealthError(format!("cannot create the folder {}: {e}", root.display()))
            });
        }
        let probe = Path::from(".destinations-health");
        for bucket in self.stores.known_buckets() {
            let placement = self
                .stores
                .placement(&bucket)
                .map_err(|e| HealthError(format!("bucket `{bucket}`: {e}")))?;
            if let Err(error) = placement.store.list_with_delimiter(Some(&probe)).await {
                let why = match store_status(&error) {
                    Some(404) => "does not exist",
                    Some(401 | 403) => {
                        "refused the credentials (the health check lists the bucket: grant s3:ListBucket)"
                    }
                    _ => "is not reachable",
                };
                return Err(HealthError(format!("bucket `{bucket}` {why}: {error}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_share_a_group_exactly_when_they_share_a_folder() {
        let prefixes = ["", "/", "a", "a/", "a//", "ab", "a/b", "a/b/"];
        for a in prefixes {
            for b in prefixes {
                assert_eq!(same_folder(a, b), folder(a) == folder(b), "`{a}` and `{b}`");
            }
        }
    }

    #[test]
    fn statuses_are_read_from_store_errors() {
        assert_eq!(
            status_in(
                "Error performing PUT http://x in 1ms - Server returned non-2xx status code: 400 Bad Request: <Error>"
            ),
            Some(400)
        );
        assert_eq!(status_in("Error after 2 retries: connection refused"), None);
    }
}
