//! What the S3 destination records, besides the hub's own per-instance metrics (sends and
//! bytes accepted, attempts, batch sizes, delivery time).

use metrics::{Counter, Histogram, counter, histogram};

/// Objects written, per destination instance.
pub const OBJECTS_WRITTEN: &str = "destinations_s3_objects_written_total";
/// Object bytes written (after compression), per destination instance.
pub const OBJECT_BYTES_WRITTEN: &str = "destinations_s3_object_bytes_written_total";
/// Events written into objects, per destination instance.
pub const EVENTS_WRITTEN: &str = "destinations_s3_events_written_total";
/// NDJSON bytes written into objects (before compression), per destination instance.
pub const NDJSON_BYTES_WRITTEN: &str = "destinations_s3_ndjson_bytes_written_total";
/// Events per object written, per destination instance.
pub const OBJECT_EVENTS: &str = "destinations_s3_object_events";
/// Time to upload one object, per destination instance.
pub const UPLOAD_SECONDS: &str = "destinations_s3_upload_seconds";
/// Time to parse and compress one batch, per destination instance.
pub const COMPRESS_SECONDS: &str = "destinations_s3_compress_seconds";

pub(crate) struct S3Metrics {
    pub(crate) objects: Counter,
    pub(crate) object_bytes: Counter,
    pub(crate) events: Counter,
    pub(crate) ndjson_bytes: Counter,
    pub(crate) object_events: Histogram,
    pub(crate) upload_seconds: Histogram,
    pub(crate) compress_seconds: Histogram,
}

impl S3Metrics {
    pub(crate) fn new(instance: &str) -> Self {
        let d = instance.to_owned();
        Self {
            objects: counter!(OBJECTS_WRITTEN, "destination" => d.clone()),
            object_bytes: counter!(OBJECT_BYTES_WRITTEN, "destination" => d.clone()),
            events: counter!(EVENTS_WRITTEN, "destination" => d.clone()),
            ndjson_bytes: counter!(NDJSON_BYTES_WRITTEN, "destination" => d.clone()),
            object_events: histogram!(OBJECT_EVENTS, "destination" => d.clone()),
            upload_seconds: histogram!(UPLOAD_SECONDS, "destination" => d.clone()),
            compress_seconds: histogram!(COMPRESS_SECONDS, "destination" => d),
        }
    }
}
