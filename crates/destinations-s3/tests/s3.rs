//! The S3 destination against s3s-fs on 127.0.0.1 (a real S3 API that verifies SigV4
//! signatures), with a proxy in front where a test needs failures or a count of requests.
//! Every test downloads what was written through the S3 API and counts.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{HubConfig, InstanceConfig, Registry};
use destinations_s3::{S3Options, S3Send, SendS3};
use destinations_testkit::s3::{ACCESS_KEY, SECRET_KEY};
use destinations_testkit::{
    Capabilities, ConformanceTarget, Fault, FaultProxy, S3Server, SinkBehaviour, TempDir,
    conformance, files_under,
};
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use serde_json::json;
use sha2::Digest;

/// A hub with one S3 instance named `s3`, built from a config table as the server builds it.
fn hub(options: serde_json::Value) -> Hub {
    let config = InstanceConfig::from_table("s3", options).unwrap_or_else(|e| panic!("{e}"));
    Hub::builder()
        .config(HubConfig::default())
        .configured(&Registry::linked(), "s3", config)
        .unwrap_or_else(|e| panic!("{e}"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Options for an S3-compatible endpoint, as a config table.
fn s3_table(endpoint: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut table = json!({
        "kind": "s3",
        "url": "s3://",
        "endpoint": endpoint,
        "allow_http": true,
        "region": "us-east-1",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
    });
    if let (Some(table), serde_json::Value::Object(extra)) = (table.as_object_mut(), extra) {
        table.extend(extra);
    }
    table
}

/// Every object of a bucket, downloaded through the S3 API: key → bytes.
async fn download(server: &S3Server, bucket: &str) -> BTreeMap<String, Vec<u8>> {
    let store = AmazonS3Builder::new()
        .with_endpoint(server.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(bucket)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let listed: Vec<_> = store
        .list(None)
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("listing {bucket}: {e}"));
    let mut objects = BTreeMap::new();
    for meta in listed {
        let bytes = store
            .get_opts(&meta.location, Default::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        objects.insert(meta.location.to_string(), bytes.to_vec());
    }
    objects
}

fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("the object is not valid gzip: {e}"));
    text
}

/// The `marker` of every line of an NDJSON text.
fn markers(ndjson: &str) -> Vec<u64> {
    ndjson
        .lines()
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("line {line:?}: {e}"));
            value["marker"]
                .as_u64()
                .unwrap_or_else(|| panic!("no marker in {line}"))
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Split a key into (folder, date folders, file time, identifier, extension), checking the
/// template `FOLDER/YYYY/MM/DD/HH/YYYY-MM-DD-HH-MM-SS-<64 hex>.EXT` on the way.
fn parse_key(key: &str, folder: &str) -> (String, String) {
    let rest = key
        .strip_prefix(folder)
        .unwrap_or_else(|| panic!("{key} is not under {folder}"));
    let parts: Vec<&str> = rest.split('/').collect();
    assert_eq!(parts.len(), 5, "{key}: expected YYYY/MM/DD/HH/FILE");
    let (file, ext) = parts[4]
        .rsplit_once('.')
        .unwrap_or_else(|| panic!("{key} has no extension"));
    assert_eq!(file.len(), 19 + 1 + 64, "{key}: time, dash, 64 hex");
    let (time, id) = file.split_at(19);
    let id = &id[1..];
    assert!(
        id.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "{key}: the identifier is lower-case hex"
    );
    let digits = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_digit());
    assert!(
        digits(parts[0], 4) && digits(parts[1], 2) && digits(parts[2], 2) && digits(parts[3], 2),
        "{key}"
    );
    assert_eq!(
        time[..13],
        format!("{}-{}-{}-{}", parts[0], parts[1], parts[2], parts[3]),
        "{key}: the date folders are the file's hour"
    );
    assert!(
        time.as_bytes()[13] == b'-' && digits(&time[14..16], 2) && digits(&time[17..19], 2),
        "{key}"
    );
    (id.to_owned(), ext.to_owned())
}

/// Conformance: a fresh bucket per case, behind a proxy that injects the case's failure.
struct S3Target {
    server: S3Server,
    proxy: Option<FaultProxy>,
    bucket: String,
    cases: u32,
}

#[async_trait]
impl ConformanceTarget for S3Target {
    fn kind(&self) -> &'static str {
        "s3"
    }

    async fn start_sink(&mut self, behaviour: SinkBehaviour) -> serde_json::Value {
        self.cases += 1;
        self.bucket = format!("conformance-{}", self.cases);
        self.server.create_bucket(&self.bucket);
        let fault = match behaviour {
            SinkBehaviour::Accept => Fault::None,
            SinkBehaviour::FailFirstAttempts(n) => Fault::FailFirstWrites(n),
            SinkBehaviour::RejectPermanently => Fault::RefuseWrites(403, "AccessDenied"),
        };
        let proxy = FaultProxy::start(self.server.address(), fault).await;
        // Every failure reaches the hub: no quick retries inside an attempt.
        // Its bucket allowed (and so known to the health check); others refused.
        let mut table = s3_table(
            &proxy.endpoint(),
            json!({"store_retries": 0, "buckets": [self.bucket]}),
        );
        self.proxy = Some(proxy);
        table
            .as_object_mut()
            .map(|t| t.remove("kind"))
            .unwrap_or_default();
        table
    }

    fn payload(&self, marker: u64) -> serde_json::Value {
        json!({"bucket": self.bucket, "prefix": "conformance", "payload": {"marker": marker}})
    }

    fn invalid_payload(&self) -> (serde_json::Value, &'static str) {
        (
            json!({"bucket": "Not_A_Bucket", "prefix": "", "payload": {}}),
            "bucket",
        )
    }

    async fn accepted_markers(&self) -> Vec<u64> {
        self.accepted_batches().await.concat()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            batches: true,
            groups: true,
            instance_checks: true,
            health: true,
            ..Capabilities::default()
        }
    }

    /// Each object's events.
    async fn accepted_batches(&self) -> Vec<Vec<u64>> {
        download(&self.server, &self.bucket)
            .await
            .values()
            .map(|bytes| markers(&gunzip(bytes)))
            .collect()
    }

    /// A prefix per group.
    fn payload_in_group(&self, marker: u64, group: u8) -> serde_json::Value {
        json!({"bucket": self.bucket, "prefix": format!("conformance-{group}"), "payload": {"marker": marker}})
    }

    /// A bucket the instance does not list.
    fn instance_check(&self) -> Option<(serde_json::Value, serde_json::Value, &'static str)> {
        let payload = json!({"bucket": "elsewhere", "prefix": "", "payload": {"marker": 0}});
        Some((json!({}), payload, "bucket"))
    }

    async fn stop_sink(&mut self) {
        self.proxy = None;
    }
}

#[tokio::test]
async fn conformance() {
    let mut target = S3Target {
        server: S3Server::start().await,
        proxy: None,
        bucket: String::new(),
        cases: 0,
    };
    conformance::run_all(&mut target).await;
}

#[tokio::test]
async fn every_payload_lands_once_in_its_bucket_and_prefix_under_a_content_addressed_key() {
    let server = S3Server::start().await;
    let buckets = ["orders-eu", "orders-us"];
    for bucket in buckets {
        server.create_bucket(bucket);
    }
    let prefixes = ["orders", "audit/eu/"];
    let hub = hub(s3_table(
        &server.endpoint(),
        json!({"buckets": buckets, "batch": {"max_events": 64}}),
    ));
    let started = SystemTime::now();
    let mut expected: HashMap<(String, String), Vec<u64>> = HashMap::new();
    let mut ids = Vec::new();
    for run_number in 0..10u64 {
        let run = hub.begin_run(format!("run-{run_number}"));
        for i in 0..100u64 {
            let marker = run_number * 100 + i;
            let bucket = buckets[(marker % 2) as usize];
            let prefix = prefixes[(marker / 2 % 2) as usize];
            let folder = if prefix.ends_with('/') {
                prefix.to_owned()
            } else {
                format!("{prefix}/")
            };
            // Pretty-printed payloads must still be one line each.
            let payload = json!({"marker": marker, "note": "line\nbreak", "nested": {"n": [1, 2]}});
            ids.push(
                run.send()
                    .s3(S3Send::new(bucket, prefix, &payload))
                    .unwrap_or_else(|e| panic!("{e}")),
            );
            expected
                .entry((bucket.to_owned(), folder))
                .or_default()
                .push(marker);
        }
        run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    }
    let report = hub.shutdown_within(Duration::from_secs(60)).await;
    assert_eq!(report.abandoned, 0);
    let finished = SystemTime::now();

    let mut found: HashMap<(String, String), Vec<u64>> = HashMap::new();
    let mut keys = Vec::new();
    for bucket in buckets {
        for (key, bytes) in download(&server, bucket).await {
            let folder = prefixes
                .iter()
                .map(|p| {
                    if p.ends_with('/') {
                        p.to_string()
                    } else {
                        format!("{p}/")
                    }
                })
                .find(|f| key.starts_with(f.as_str()))
                .unwrap_or_else(|| panic!("{key} is under neither prefix"));
            let (id, ext) = parse_key(&key, &folder);
            assert_eq!(ext, "gz");
            assert_eq!(
                id,
                sha256_hex(&bytes),
                "{key}: the identifier is the SHA-256 of the bytes"
            );
            let text = gunzip(&bytes);
            assert!(text.ends_with('\n'));
            for line in text.lines() {
                let value: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(value["note"], "line\nbreak");
            }
            let in_object = markers(&text);
            assert!(in_object.len() <= 64, "batches hold at most max_events");
            found
                .entry((bucket.to_owned(), folder))
                .or_default()
                .extend(in_object);
            keys.push(format!("{bucket}/{key}"));
        }
    }
    for markers in found.values_mut() {
        markers.sort_unstable();
    }
    assert_eq!(
        found, expected,
        "every payload exactly once, in its own bucket and prefix"
    );

    // Key times lie within the test, in UTC.
    let hour = |t: SystemTime| {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        secs / 3600
    };
    assert!(hour(finished) - hour(started) <= 1);

    // Each send's status names the object it went into.
    for id in ids {
        let status = destinations_testkit::status(&hub, id).await;
        assert_eq!(status.state, State::Delivered);
        let location = status
            .response
            .and_then(|r| r.location)
            .unwrap_or_else(|| panic!("{id} has no object in its status"));
        assert!(keys.contains(&location), "{location} was not written");
    }
}

#[tokio::test]
async fn identical_batches_in_the_same_second_do_not_overwrite_each_other() {
    let server = S3Server::start().await;
    server.create_bucket("pings");
    for compression in ["gzip", "zstd"] {
        let hub = hub(s3_table(
            &server.endpoint(),
            json!({"compression": compression, "batch": {"max_events": 1}}),
        ));
        for _ in 0..20 {
            hub.sender()
                .s3(S3Send::new("pings", compression, &json!({"type": "ping"})))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(
            hub.shutdown_within(Duration::from_secs(60)).await.abandoned,
            0
        );
    }
    let objects = download(&server, "pings").await;
    let count = |prefix: &str| objects.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(
        (count("gzip/"), count("zstd/")),
        (20, 20),
        "{:?}",
        objects.keys()
    );
    for (key, bytes) in &objects {
        let text = if key.ends_with(".gz") {
            gunzip(bytes)
        } else {
            String::from_utf8(zstd_decode(bytes)).unwrap_or_else(|e| panic!("{e}"))
        };
        assert_eq!(text, "{\"type\":\"ping\"}\n", "{key}");
    }
}

fn zstd_decode(bytes: &[u8]) -> Vec<u8> {
    zstd::decode_all(bytes).unwrap_or_else(|e| panic!("the object is not valid zstd: {e}"))
}

#[tokio::test]
async fn a_batch_above_the_multipart_threshold_arrives_whole() {
    let server = S3Server::start().await;
    server.create_bucket("big");
    let proxy = FaultProxy::start(server.address(), Fault::None).await;
    let hub = hub(s3_table(
        &proxy.endpoint(),
        json!({
            "compression": "none",
            "multipart_threshold": 5 * 1024 * 1024,
            "part_size": 5 * 1024 * 1024,
            "batch": {"max_events": 1000, "max_bytes": 100_000_000, "max_age": "1h"},
        }),
    ));
    let filler: String = (0..120_000).map(|_| fastrand::alphanumeric()).collect();
    let run = hub.begin_run("big");
    for marker in 0..60u64 {
        run.send()
            .s3(S3Send::new(
                "big",
                "bulk",
                &json!({"marker": marker, "filler": filler}),
            ))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        hub.shutdown_within(Duration::from_secs(60)).await.abandoned,
        0
    );

    let objects = download(&server, "big").await;
    assert_eq!(objects.len(), 1, "one batch, one object");
    let (key, bytes) = objects.into_iter().next().unwrap_or_default();
    let (id, ext) = parse_key(&key, "bulk/");
    assert_eq!(ext, "ndjson");
    assert!(bytes.len() > 6 * 1024 * 1024, "{} bytes", bytes.len());
    assert_eq!(
        id,
        sha256_hex(&bytes),
        "the parts were put together in order"
    );
    let text = String::from_utf8(bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(markers(&text), (0..60).collect::<Vec<_>>());
    let requests = proxy.requests();
    let parts = requests
        .iter()
        .filter(|r| r.method == "PUT" && r.uri.contains("partNumber="))
        .count();
    assert!(parts >= 2, "uploaded in {parts} parts: {requests:?}");
    assert!(
        requests
            .iter()
            .any(|r| r.method == "POST" && r.uri.contains("uploads")),
        "a multipart upload was started"
    );
}

#[tokio::test]
async fn the_server_stopped_mid_run_loses_and_duplicates_nothing() {
    let mut server = S3Server::start().await;
    server.create_bucket("outage");
    // Through the proxy, which says when a request met the stopped server; every failure is
    // the hub's to retry.
    let proxy = FaultProxy::start(server.address(), Fault::None).await;
    let hub = hub(s3_table(
        &proxy.endpoint(),
        json!({
            "store_retries": 0,
            "batch": {"max_events": 25, "max_age": "20ms"},
            "retry": {"initial_delay": "20ms", "max_delay": "200ms", "max_attempts": 100_000, "max_age": "1h"},
        }),
    ));
    let send_run = |from: u64| {
        let run = hub.begin_run(format!("from-{from}"));
        let ids: Vec<EventId> = (from..from + 100)
            .map(|marker| {
                run.send()
                    .s3(S3Send::new("outage", "events", &json!({"marker": marker})))
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        (run, ids)
    };
    let (run, before) = send_run(0);
    run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    for id in &before {
        let status = destinations_testkit::final_status(&hub, *id, Duration::from_secs(30)).await;
        assert_eq!(status.map(|s| s.state), Some(State::Delivered));
    }

    server.stop().await;
    let (run, during) = send_run(100);
    run.finish().await.unwrap_or_else(|e| panic!("{e}"));
    // Wait until an upload met the stopped server, then bring it back.
    proxy
        .wait_for(|requests| requests.iter().any(|r| r.status == 502))
        .await;
    server.restart().await;

    assert_eq!(
        hub.shutdown_within(Duration::from_secs(120))
            .await
            .abandoned,
        0
    );
    for id in before.iter().chain(&during) {
        assert_eq!(
            destinations_testkit::state(&hub, *id).await,
            Some(State::Delivered)
        );
    }
    let mut retried = 0;
    for id in &during {
        if destinations_testkit::status(&hub, *id).await.attempts >= 2 {
            retried += 1;
        }
    }
    assert!(retried > 0, "some sends were retried through the outage");
    let mut all: Vec<u64> = download(&server, "outage")
        .await
        .values()
        .flat_map(|bytes| markers(&gunzip(bytes)))
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..200).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
}

#[tokio::test]
async fn wrong_credentials_dead_letter_with_the_stores_reason_and_fail_health() {
    let server = S3Server::start().await;
    server.create_bucket("locked");
    let mut table = s3_table(&server.endpoint(), json!({"buckets": ["locked"]}));
    table["secret_access_key"] = json!("not-the-secret");
    let hub = hub(table);
    let health = hub.health().await;
    let problem = health[0].1.as_ref().expect_err("health must fail");
    assert!(
        problem.0.contains("locked") && problem.0.contains("credentials"),
        "{problem}"
    );
    let ids: Vec<EventId> = (0..5)
        .map(|marker| {
            hub.sender()
                .s3(S3Send::new("locked", "x", &json!({"marker": marker})))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    assert_eq!(
        hub.shutdown_within(Duration::from_secs(60)).await.abandoned,
        0
    );
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(letters.len(), 5);
    for letter in &letters {
        assert_eq!(
            letter.envelope.attempts, 1,
            "a credentials error is not retried"
        );
        assert!(
            letter.reason.contains("refused the credentials")
                && letter.reason.contains("SignatureDoesNotMatch"),
            "{}",
            letter.reason
        );
    }
    for id in ids {
        assert_eq!(
            destinations_testkit::state(&hub, id).await,
            Some(State::Dead)
        );
    }
    assert!(download(&server, "locked").await.is_empty());
}

#[tokio::test]
async fn a_missing_bucket_fails_health_and_dead_letters_a_write() {
    let server = S3Server::start().await;
    let hub = hub(s3_table(
        &server.endpoint(),
        json!({"buckets": ["nowhere"]}),
    ));
    let health = hub.health().await;
    let problem = health[0].1.as_ref().expect_err("health must fail");
    assert!(problem.0.contains("`nowhere` does not exist"), "{problem}");
    hub.shutdown().await;

    // s3s-fs creates a bucket's folder on the first write; the 404 that S3 answers a write to
    // a missing bucket comes from the proxy.
    let proxy = FaultProxy::start(server.address(), Fault::RefuseWrites(404, "NoSuchBucket")).await;
    let hub = self::hub(s3_table(&proxy.endpoint(), json!({})));
    hub.sender()
        .s3(S3Send::new("nowhere", "", &json!({"marker": 1})))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(Duration::from_secs(60)).await;
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].reason.contains("bucket does not exist")
            && letters[0].reason.contains("NoSuchBucket"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].envelope.attempts, 1);
}

/// A 400 that the store answers for real is permanent: one attempt, then a dead letter —
/// classified from object_store's own error, not from a string the test wrote (review T3).
/// A 500 is transient and retried.
#[tokio::test]
async fn store_errors_are_classified_from_real_answers() {
    let server = S3Server::start().await;
    server.create_bucket("events");
    let refusing =
        FaultProxy::start(server.address(), Fault::RefuseWrites(400, "InvalidRequest")).await;
    let hub = self::hub(s3_table(&refusing.endpoint(), json!({"store_retries": 0})));
    hub.sender()
        .s3(S3Send::new("events", "", &json!({"marker": 1})))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(Duration::from_secs(60)).await;
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].envelope.attempts, 1, "{}", letters[0].reason);
    assert!(
        letters[0].reason.contains("InvalidRequest"),
        "{}",
        letters[0].reason
    );

    let failing =
        FaultProxy::start(server.address(), Fault::RefuseWrites(500, "InternalError")).await;
    let table = s3_table(
        &failing.endpoint(),
        json!({"store_retries": 0, "retry": {"initial_delay": "10ms", "max_delay": "20ms", "max_attempts": 3}}),
    );
    let hub = self::hub(table);
    hub.sender()
        .s3(S3Send::new("events", "", &json!({"marker": 2})))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown_within(Duration::from_secs(60)).await;
    let letters = destinations_testkit::dead_letters(&hub).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].envelope.attempts, 3,
        "a 500 is retried: {}",
        letters[0].reason
    );
}

#[tokio::test]
async fn a_reachable_bucket_is_healthy() {
    let server = S3Server::start().await;
    server.create_bucket("fine");
    let hub = hub(s3_table(&server.endpoint(), json!({"buckets": ["fine"]})));
    let health = hub.health().await;
    assert!(health[0].1.is_ok(), "{health:?}");
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_is_written_when_its_age_is_reached() {
    let folder = TempDir::new("s3-age");
    let hub = hub(json!({
        "kind": "s3",
        "url": format!("file://{}", folder.path().display()),
        "batch": {"max_age": "60s"},
    }));
    let ids: Vec<EventId> = (0..3)
        .map(|marker| {
            hub.sender()
                .s3(S3Send::new("local", "aged", &json!({"marker": marker})))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(
        destinations_testkit::state(&hub, ids[0]).await,
        Some(State::Queued)
    );
    assert!(
        !folder.path().join("local").exists(),
        "nothing written before the age"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &ids {
        let status = destinations_testkit::final_status(&hub, *id, Duration::from_secs(5)).await;
        assert_eq!(status.map(|s| s.state), Some(State::Delivered));
    }
    let files = files_under(&folder.path().join("local"));
    assert_eq!(files.len(), 1, "{files:?}");
    let relative = files[0]
        .strip_prefix(folder.path().join("local"))
        .unwrap_or_else(|e| panic!("{e}"))
        .to_string_lossy()
        .into_owned();
    let bytes = std::fs::read(&files[0]).unwrap_or_else(|e| panic!("{e}"));
    let (id, _) = parse_key(&relative, "aged/");
    assert_eq!(id, sha256_hex(&bytes));
    assert_eq!(markers(&gunzip(&bytes)), vec![0, 1, 2]);
    hub.shutdown().await;
}

#[tokio::test]
async fn bad_sends_are_refused_naming_the_field() {
    let folder = TempDir::new("s3-validate");
    let hub = hub(json!({
        "kind": "s3",
        "url": format!("file://{}", folder.path().display()),
        "buckets": ["allowed"],
    }));
    let cases = [
        (
            json!({"bucket": "other", "prefix": "", "payload": {}}),
            "bucket",
        ),
        (
            json!({"bucket": "allowed", "prefix": "../up", "payload": {}}),
            "prefix",
        ),
        (
            json!({"bucket": "allowed", "prefix": "/abs", "payload": {}}),
            "prefix",
        ),
        (
            json!({"bucket": "allowed", "prefix": "a", "payload": {}, "body": 1}),
            "body",
        ),
        (json!({"bucket": "allowed", "prefix": "a"}), "payload"),
        (json!({"bucket": 7, "payload": {}}), "bucket"),
    ];
    for (payload, field) in cases {
        match hub.sender().to("s3", &payload) {
            Err(SendError::Invalid { error, .. }) => {
                assert_eq!(error.field, field, "{payload}: {error}");
                if field.is_empty() {
                    assert!(error.message.contains("payload"), "{error}");
                }
            }
            other => panic!("{payload} was not refused: {other:?}"),
        }
    }
    for bucket in ["Bad_Name", "other"] {
        match hub.sender().s3(S3Send::new(bucket, "", &json!({}))) {
            Err(SendError::Invalid { error, .. }) => assert_eq!(error.field, "bucket", "{error}"),
            other => panic!("typed send to bucket {bucket}: {other:?}"),
        }
    }
    hub.shutdown().await;
    assert!(
        !folder.path().join("allowed").exists(),
        "nothing was written"
    );
}

#[test]
fn bad_instance_options_are_refused_naming_the_option() {
    let build = |options: serde_json::Value| {
        let config = InstanceConfig::from_table("s3", options).unwrap_or_else(|e| panic!("{e}"));
        Hub::builder()
            .configured(&Registry::linked(), "s3", config)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let cases = [
        (json!({"kind": "s3", "url": "ftp://x"}), "scheme `ftp`"),
        (
            json!({"kind": "s3", "url": "s3://my-bucket"}),
            "bucket comes from each send",
        ),
        (json!({"kind": "s3", "url": "file://"}), "needs a folder"),
        (json!({"kind": "s3", "part_size": 1024}), "part_size"),
        (
            json!({"kind": "s3", "compression": "brotli"}),
            "compression",
        ),
        (
            json!({"kind": "s3", "compression_level": 12}),
            "compression_level",
        ),
        (
            json!({"kind": "s3", "endpoint": "http://x"}),
            "`endpoint` applies to s3://",
        ),
        (
            json!({"kind": "s3", "url": "s3://", "store_options": {"no_such_key": "1"}}),
            "no_such_key",
        ),
        (json!({"kind": "s3", "buckets": ["UPPER"]}), "buckets"),
        (json!({"kind": "s3", "bucket": "x"}), "bucket"),
    ];
    for (options, expected) in cases {
        let error = build(options.clone());
        assert!(
            error.contains(expected),
            "{options}: {error:?} should mention {expected}"
        );
    }
}

#[tokio::test]
async fn a_memory_store_takes_sends_and_names_their_objects() {
    let hub = hub(json!({"kind": "s3", "url": "memory://", "compression": "zstd"}));
    let id = hub
        .sender()
        .s3(S3Send::new("scratch", "tmp", &json!({"marker": 1})))
        .unwrap_or_else(|e| panic!("{e}"));
    hub.shutdown().await;
    let status = destinations_testkit::status(&hub, id).await;
    assert_eq!(status.state, State::Delivered);
    let location = status.response.and_then(|r| r.location).unwrap_or_default();
    assert!(
        location.starts_with("scratch/tmp/") && location.ends_with(".zst"),
        "{location}"
    );
}

#[test]
fn options_for_an_s3_compatible_server_are_ready_to_use() {
    let options = S3Options::s3_compatible("http://127.0.0.1:9000", "k", "s");
    assert!(options.allow_http);
    assert!(
        !format!("{options:?}").contains("\"s\""),
        "the secret is not printed"
    );
}
