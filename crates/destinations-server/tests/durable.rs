//! Nothing accepted is lost when the server dies: real `destinations serve` processes on the
//! embedded defaults (the SQLite queue in `./data`), real `kill -9`, real receivers; counted by
//! send id.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Server, WITHIN, cli, send_runs};
use destinations_testkit::{Receiver, Reply, TempDir};
use serde_json::{Value, json};

/// Retries that come quickly, and keep coming.
const FAST_RETRY: (&str, &str) = (
    "DESTINATIONS__DESTINATIONS__HTTP__RETRY",
    r#"{ initial_delay = "50ms", max_delay = "200ms", max_attempts = 1000 }"#,
);

/// Every id arrived (as the `Idempotency-Key` of at least one request), and nothing else did.
async fn assert_exactly_these_arrived(receiver: &Receiver, ids: &[String]) {
    receiver.wait_for_accepted(ids.len(), WITHIN).await;
    let expected: HashSet<String> = ids.iter().cloned().collect();
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let arrived = receiver.accepted_keys();
        if arrived == expected {
            break;
        }
        assert!(
            arrived.is_subset(&expected),
            "a request arrived for a send that was never accepted"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} sends arrived",
            arrived.len(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn kill_9_with_the_receiver_down_loses_nothing_accepted() {
    let dir = TempDir::new("durable-down");
    let target = Receiver::unused_address();
    let url = format!("http://{target}/hook");
    let server = Server::start_in(None, &[FAST_RETRY], Some(dir.path())).await;
    let ids = send_runs(&server, &url, 500, 50).await;
    // Let some attempts fail against the closed port first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill9().await;

    let receiver = Receiver::scripted_at(target, |_| Reply::Status(200)).await;
    let server = Server::start_in(None, &[FAST_RETRY], Some(dir.path())).await;
    assert_exactly_these_arrived(&receiver, &ids).await;
    for id in ids.iter().step_by(50) {
        let status = server.final_status(id).await;
        assert_eq!(status["state"], "delivered", "{status}");
        assert!(status["attempts"].as_u64().unwrap_or(0) >= 1);
    }
    assert!(server.terminate().await.success());
}

#[tokio::test]
async fn kill_9_in_the_middle_of_delivery_loses_nothing_accepted() {
    let dir = TempDir::new("durable-middle");
    let receiver = Receiver::scripted(|_| {
        Reply::After(Duration::from_millis(20), Box::new(Reply::Status(200)))
    })
    .await;
    let url = receiver.url("/hook");
    let server = Server::start_in(None, &[FAST_RETRY], Some(dir.path())).await;
    let ids = send_runs(&server, &url, 2000, 100).await;
    receiver.wait_for_accepted(100, WITHIN).await;
    server.kill9().await;
    let before = receiver.accepted_keys().len();
    assert!(
        before < ids.len(),
        "killed while delivering ({before} arrived)"
    );

    let server = Server::start_in(None, &[FAST_RETRY], Some(dir.path())).await;
    assert_exactly_these_arrived(&receiver, &ids).await;
    assert!(server.terminate().await.success());
}

#[tokio::test]
async fn retries_keep_their_attempt_count_and_due_time_across_kill_9() {
    let dir = TempDir::new("durable-retry");
    let accept = Arc::new(AtomicBool::new(false));
    let accepting = accept.clone();
    let receiver = Receiver::scripted(move |_| {
        if accepting.load(Ordering::SeqCst) {
            Reply::Status(200)
        } else {
            Reply::Full(
                503,
                vec![("retry-after", "4".to_owned())],
                "busy".to_owned(),
            )
        }
    })
    .await;
    let retry = (
        "DESTINATIONS__DESTINATIONS__HTTP__RETRY",
        r#"{ initial_delay = "1s", max_delay = "10s" }"#,
    );
    // All twenty attempted at once (an adaptive limit would start at one request and hear the
    // host's Retry-After before trying the others).
    let fixed = (
        "DESTINATIONS__DESTINATIONS__HTTP__ADAPTIVE_CONCURRENCY",
        "false",
    );
    let server = Server::start_in(None, &[retry, fixed], Some(dir.path())).await;
    let ids = send_runs(&server, &receiver.url("/busy"), 20, 20).await;
    let mut before = Vec::new();
    for id in &ids {
        loop {
            let (_, status) = server.get(&format!("/v1/events/{id}")).await;
            if status["state"] == "retrying" {
                before.push(status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    server.kill9().await;
    accept.store(true, Ordering::SeqCst);

    let server = Server::start_in(None, &[retry, fixed], Some(dir.path())).await;
    for (id, before) in ids.iter().zip(&before) {
        let (_, after) = server.get(&format!("/v1/events/{id}")).await;
        assert_eq!(after["state"], "retrying", "{after}");
        assert_eq!(after["attempts"], 1, "the attempt count survived: {after}");
        assert_eq!(
            after["next_attempt_at"], before["next_attempt_at"],
            "and the due time"
        );
        assert!(
            after["last_error"]
                .as_str()
                .unwrap_or_default()
                .contains("503"),
            "{after}"
        );
    }
    for (id, before) in ids.iter().zip(&before) {
        let status = server.final_status(id).await;
        assert_eq!(
            (&status["state"], &status["attempts"]),
            (&json!("delivered"), &json!(2))
        );
        let due = humantime::parse_rfc3339(before["next_attempt_at"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        let delivered = humantime::parse_rfc3339(status["updated_at"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            delivered + Duration::from_millis(5) >= due,
            "not retried before it was due"
        );
    }
    assert_eq!(receiver.accepted_keys().len(), ids.len());
    assert!(server.terminate().await.success());
}

#[tokio::test]
async fn dead_letters_survive_a_restart_and_are_replayed_by_the_cli() {
    let dir = TempDir::new("durable-dlq");
    let gone = Arc::new(AtomicBool::new(true));
    let is_gone = gone.clone();
    let receiver = Receiver::scripted(move |_| {
        if is_gone.load(Ordering::SeqCst) {
            Reply::Status(410)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let server = Server::start_in(None, &[], Some(dir.path())).await;
    let ids = send_runs(&server, &receiver.url("/gone"), 30, 30).await;
    for id in &ids {
        assert_eq!(server.final_status(id).await["state"], "dead");
    }
    assert!(server.terminate().await.success());

    gone.store(false, Ordering::SeqCst);
    let server = Server::start_in(None, &[], Some(dir.path())).await;
    let (_, listed) = server.get("/v1/dead-letters?limit=10").await;
    assert_eq!(listed["dead_letters"].as_array().map(Vec::len), Some(10));
    let next = listed["next"].as_str().unwrap_or_default().to_owned();
    assert!(!next.is_empty(), "a cursor to the next page: {listed}");
    let (_, rest) = server
        .get(&format!("/v1/dead-letters?limit=100&after={next}"))
        .await;
    assert_eq!(rest["dead_letters"].as_array().map(Vec::len), Some(20));
    assert!(rest["next"].is_null());
    let (ok, stdout, stderr) = cli(
        &[
            "dlq",
            "replay",
            "--destination",
            "http",
            "--server",
            &server.base,
        ],
        &[],
    )
    .await;
    assert!(ok, "{stderr}");
    let replayed: Value = serde_json::from_str(&stdout).unwrap_or_default();
    assert_eq!(
        replayed["replayed"].as_array().map(Vec::len),
        Some(30),
        "{stdout}"
    );
    for id in &ids {
        let status = server.final_status(id).await;
        assert_eq!(status["state"], "delivered", "{status}");
    }
    assert_eq!(receiver.accepted_keys().len(), 30);
    assert!(server.terminate().await.success());
}

#[tokio::test]
async fn a_damaged_queue_file_stops_the_server_with_its_name_and_is_left_alone() {
    let dir = TempDir::new("durable-damaged");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap_or_else(|e| panic!("{e}"));
    let queue = data.join("queue.db");
    let noise: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&queue, &noise).unwrap_or_else(|e| panic!("{e}"));
    let (status, stderr) = Server::refused_start(None, dir.path()).await;
    assert!(!status.success());
    assert!(
        stderr.contains("./data/queue.db") && stderr.contains("not an SQLite database"),
        "{stderr}"
    );
    assert!(
        std::fs::read(&queue).ok() == Some(noise),
        "the file is untouched"
    );
}

#[tokio::test]
async fn a_truncated_queue_file_is_refused_and_its_sends_exported() {
    let dir = TempDir::new("durable-truncated");
    let target = Receiver::unused_address();
    let server = Server::start_in(None, &[FAST_RETRY], Some(dir.path())).await;
    let pad = "x".repeat(3000);
    let mut ids = Vec::new();
    for n in 0..300 {
        let (code, body) = server
            .post(
                "/v1/send/http",
                &json!({"url": format!("http://{target}/t"), "data": {"n": n, "pad": pad}}),
            )
            .await;
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().unwrap_or_default().to_owned());
    }
    assert!(server.terminate().await.success());
    let queue = dir.path().join("data/queue.db");
    let size = std::fs::metadata(&queue).map(|m| m.len()).unwrap_or(0);
    assert!(size > 300 * 3000, "{size}");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&queue)
        .unwrap_or_else(|e| panic!("{e}"));
    file.set_len(size * 2 / 3).unwrap_or_else(|e| panic!("{e}"));
    drop(file);

    let (status, stderr) = Server::refused_start(None, dir.path()).await;
    assert!(!status.success());
    assert!(
        stderr.contains("queue.db")
            && stderr.contains("damaged")
            && stderr.contains("queue export"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::metadata(&queue).map(|m| m.len()).ok(),
        Some(size * 2 / 3),
        "left as it was"
    );
    let (ok, stdout, stderr) = common::cli_in(dir.path(), &["queue", "export"], &[]).await;
    assert!(ok, "{stderr}");
    let exported: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_default())
        .collect();
    assert!(
        exported.len() > 100,
        "{} exported; {stderr}",
        exported.len()
    );
    for line in &exported {
        assert!(ids.iter().any(|id| line["id"] == json!(id)), "{line}");
        assert_eq!(line["destination"], "http");
        assert!(
            line["state"] == "queued" || line["state"] == "retrying",
            "{line}"
        );
    }
}

/// Makes a directory unwritable for as long as it lives — for root too: root ignores
/// permissions, so it is made immutable (`chattr +i`) instead.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn new(dir: &std::path::Path) -> Self {
        let is_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if is_root {
            let made = std::process::Command::new("chattr")
                .arg("+i")
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                made,
                "as root, the test needs `chattr +i` (e2fsprogs) on a file system that supports it to make {} read-only",
                dir.display()
            );
        } else {
            let mut permissions = std::fs::metadata(dir)
                .map(|m| m.permissions())
                .unwrap_or_else(|e| panic!("{e}"));
            std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o555);
            std::fs::set_permissions(dir, permissions).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(
            std::fs::write(dir.join("probe"), b"x").is_err(),
            "{} is still writable",
            dir.display()
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
        if let Ok(metadata) = std::fs::metadata(&self.0) {
            let mut permissions = metadata.permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
            let _ = std::fs::set_permissions(&self.0, permissions);
        }
    }
}

#[tokio::test]
async fn a_read_only_data_directory_stops_the_server_with_its_name() {
    let dir = TempDir::new("durable-readonly");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap_or_else(|e| panic!("{e}"));
    let read_only = ReadOnly::new(&data);
    let (status, stderr) = Server::refused_start(None, dir.path()).await;
    assert!(!status.success());
    assert!(
        stderr.contains("./data/queue.db") && stderr.contains("writable"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(&data).map(|d| d.count()).ok() == Some(0),
        "nothing was written"
    );
    drop(read_only);
}

#[tokio::test]
async fn queue_check_reads_a_live_queue_and_a_stopped_one() {
    let dir = TempDir::new("durable-check");
    let target = Receiver::unused_address();
    let server = Server::start_in(None, &[FAST_RETRY], Some(dir.path())).await;
    send_runs(&server, &format!("http://{target}/c"), 25, 25).await;
    let (ok, stdout, stderr) = common::cli_in(dir.path(), &["queue", "check"], &[]).await;
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(stdout.split_once('\n').map_or("", |(_, json)| json))
        .unwrap_or_default();
    assert_eq!(report["in_use"], true, "{stdout}");
    let pending = report["sends"]["http"]["queued"].as_u64().unwrap_or(0)
        + report["sends"]["http"]["retrying"].as_u64().unwrap_or(0);
    assert_eq!(pending, 25, "{stdout}");
    assert!(server.terminate().await.success());
    let (ok, stdout, _) = common::cli_in(dir.path(), &["queue", "check"], &[]).await;
    assert!(ok);
    assert!(stdout.contains("\"in_use\": false"), "{stdout}");
}
