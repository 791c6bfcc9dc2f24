//! The fault suite: a real server (SQLite queue) delivering to a receiver that answers 503,
//! 429 with `Retry-After`, drops connections, stalls or trickles past the timeout or refuses
//! for good; to s3s-fs and an SMTP server, each stopped and started again mid-run; with a slow
//! client holding a half-sent request meanwhile. At the end every accepted send is delivered
//! or dead — counted by id at the targets — duplicates are counted, and the server's peak
//! memory is bounded.
//!
//! CI runs one round. `cargo xtask soak --minutes N` runs rounds for N minutes, with faults
//! drawn at random (`DESTINATIONS_SOAK_MINUTES`, `DESTINATIONS_SOAK_SEED`).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::Server;
use destinations_testkit::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use destinations_testkit::{Receiver, Reply, SmtpConfig, SmtpServer};
use serde_json::{Value, json};

/// How a send's target behaves, chosen per send.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Accept,
    /// 503 for the first attempts.
    Unavailable,
    /// 429 with `Retry-After: 1` on the first attempt.
    TooMany,
    /// The connection is closed without an answer on the first attempt.
    Dropped,
    /// No answer within the instance's timeout on the first attempt.
    Stalled,
    /// A 503 whose body trickles a byte every 100 ms, on the first attempt.
    Trickled,
    /// 410 every time: dead at once.
    Gone,
}

const FAULTS: [Fault; 7] = [
    Fault::Accept,
    Fault::Unavailable,
    Fault::TooMany,
    Fault::Dropped,
    Fault::Stalled,
    Fault::Trickled,
    Fault::Gone,
];

fn fault_of(path: &str) -> Fault {
    let index = path
        .rsplit('/')
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    FAULTS[index % FAULTS.len()]
}

fn reply(fault: Fault, attempt: u32) -> Reply {
    match (fault, attempt) {
        (Fault::Gone, _) => Reply::Full(410, vec![], "gone for good".into()),
        (Fault::Unavailable, 1 | 2) => Reply::Status(503),
        (Fault::TooMany, 1) => Reply::Full(429, vec![("retry-after", "1".into())], String::new()),
        (Fault::Dropped, 1) => Reply::Drop,
        (Fault::Stalled, 1) => Reply::After(Duration::from_secs(5), Box::new(Reply::Status(200))),
        (Fault::Trickled, 1) => Reply::Trickle {
            status: 503,
            bytes: 100,
            every: Duration::from_millis(100),
        },
        _ => Reply::Status(200),
    }
}

/// The server's peak resident memory, from /proc.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Wait until a send has failed at least once and waits for a retry (bounded: a guard
/// against hanging, not a timing assertion).
async fn retrying(server: &Server, id: &str) {
    let give_up = Instant::now() + common::WITHIN;
    loop {
        let (_, status) = server.get(&format!("/v1/events/{id}")).await;
        if status["state"] == "retrying" {
            return;
        }
        assert!(Instant::now() < give_up, "{id} never failed: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A send's status once it is final; a long soak leaves a backlog, so this waits in rounds of
/// 30 s, up to 15 minutes (a guard against hanging).
async fn settled(server: &Server, id: &str) -> Value {
    for _ in 0..30 {
        let (code, status) = server.get(&format!("/v1/events/{id}?wait=30s")).await;
        assert_eq!(code, 200, "{status}");
        if matches!(status["state"].as_str(), Some("delivered" | "dead")) {
            return status;
        }
    }
    panic!("{id} was not final within 15 minutes");
}

#[tokio::test]
async fn under_faults_every_accepted_send_is_delivered_or_dead() {
    let minutes: f64 = std::env::var("DESTINATIONS_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0.0);
    let seed: u64 = std::env::var("DESTINATIONS_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut random = fastrand::Rng::with_seed(seed);
    let receiver =
        Receiver::scripted(|request| reply(fault_of(&request.uri), request.attempt)).await;
    let mut s3 = S3Server::start().await;
    s3.create_bucket("events");
    let mut smtp = SmtpServer::start(SmtpConfig::default()).await;
    let server = Server::start(Some(&format!(
        r#"
        [clients]
        header_timeout = "2s"
        [destinations.http]
        kind = "http"
        allow_networks = ["127.0.0.0/8"]
        timeout = "1s"
        per_host_concurrency = 16
        retry = {{ initial_delay = "50ms", max_delay = "1s", max_attempts = 8 }}
        [destinations.s3]
        kind = "s3"
        url = "s3://"
        endpoint = "{endpoint}"
        allow_http = true
        region = "us-east-1"
        access_key_id = "{ACCESS_KEY}"
        secret_access_key = "{SECRET_KEY}"
        store_retries = 0
        batch = {{ max_age = "200ms", max_events = 50 }}
        retry = {{ initial_delay = "100ms", max_delay = "1s", max_attempts = 30 }}
        [destinations.mail]
        kind = "email"
        from = "robot@example.com"
        to = ["owner@example.com"]
        retry = {{ initial_delay = "100ms", max_delay = "1s", max_attempts = 30 }}
        [destinations.mail.smtp]
        host = "127.0.0.1"
        port = {smtp_port}
        tls = "none"
        "#,
        endpoint = s3.endpoint(),
        smtp_port = smtp.port(),
    )))
    .await;
    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let (mut accepted, mut http_ids, mut s3_markers, mut mails) =
        (Vec::<String>::new(), HashSet::new(), 0usize, 0usize);
    let mut round = 0;
    let (mut s3_ids, mut mail_ids) = (Vec::new(), Vec::new());
    let mut faults_injected = 0;
    loop {
        round += 1;
        // A slow client holds a half-sent request through the round.
        let mut slow = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::io::AsyncWriteExt::write_all(
            &mut slow,
            b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        // The object store and the mail server go away in CI's round, and in a third of the
        // rounds when soaking (every round would leave them down most of the time).
        let outage = minutes == 0.0 || random.usize(0..3) == 0;
        for run in 0..10 {
            let mut sends: Vec<Value> = (0..30)
                .map(|n| {
                    // Every fault in turn in CI; drawn at random when soaking.
                    let index = random.usize(0..1000) * FAULTS.len()
                        + if minutes > 0.0 { random.usize(0..FAULTS.len()) } else { n % FAULTS.len() };
                    if !matches!(FAULTS[index % FAULTS.len()], Fault::Accept) {
                        faults_injected += 1;
                    }
                    json!({"destination": "http", "payload": {"url": receiver.url(&format!("/r{round}/{index}")), "data": {"n": n}}})
                })
                .collect();
            for n in 0..20 {
                s3_markers += 1;
                sends.push(json!({"destination": "s3", "payload": {"bucket": "events", "prefix": format!("round-{round}"), "payload": {"marker": format!("{round}-{run}-{n}")}}}));
            }
            mails += 1;
            sends.push(json!({"destination": "mail", "payload": {"subject": format!("round {round} run {run}"), "text": "fault suite"}}));
            let ids = server.post_run(sends).await;
            http_ids.extend(ids[..30].iter().cloned());
            let first_event = ids[30].clone();
            let mail = ids[50].clone();
            s3_ids.extend(ids[30..50].iter().cloned());
            mail_ids.push(mail.clone());
            accepted.extend(ids);
            if outage && run == 3 {
                // The object store goes away mid-run — until a batch has failed on it — and
                // comes back a few runs later.
                s3.stop().await;
                faults_injected += 1;
                retrying(&server, &first_event).await;
            }
            if outage && run == 7 {
                s3.restart().await;
            }
            if outage && run == 2 {
                // So does the mail server.
                smtp.stop().await;
                faults_injected += 1;
                retrying(&server, &mail).await;
            }
            if outage && run == 6 {
                smtp.restart().await;
            }
        }
        faults_injected += 1; // the slow client
        drop(slow);
        if Instant::now() >= deadline {
            break;
        }
    }

    // Every accepted send ends delivered or dead.
    let (mut delivered, mut dead) = (0usize, 0usize);
    let mut dead_ids = HashSet::new();
    for id in &accepted {
        let status = settled(&server, id).await;
        match status["state"].as_str() {
            Some("delivered") => delivered += 1,
            Some("dead") => {
                dead += 1;
                dead_ids.insert(id.clone());
            }
            other => panic!("{id} is {other:?}: {status}"),
        }
    }
    assert_eq!(delivered + dead, accepted.len());
    // At the targets, by id: every HTTP send that is not dead arrived. A dead one may have
    // arrived too — its last attempts timed out, so their result is unknown — and is counted.
    let arrived = receiver.accepted_keys();
    let lost: Vec<&String> = http_ids
        .iter()
        .filter(|id| !dead_ids.contains(*id) && !arrived.contains(*id))
        .collect();
    assert!(lost.is_empty(), "delivered yet never arrived: {lost:?}");
    let dead_but_arrived = dead_ids.iter().filter(|id| arrived.contains(*id)).count();
    // In CI's round, the only dead are the scripted 410s, which never answer 2xx.
    if minutes == 0.0 {
        assert_eq!(dead_but_arrived, 0);
    }
    let duplicates = receiver.accepted_requests().len() - arrived.len();
    let peak = peak_rss_mib(server.pid());
    assert!(server.terminate().await.success());
    // Every S3 event is in an object, once or more; every mail was received.
    let mut markers = HashSet::new();
    let mut lines = 0;
    for object in destinations_testkit::files_under(&s3.bucket_folder("events")) {
        let bytes = std::fs::read(&object).unwrap_or_else(|e| panic!("{e}"));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
            .unwrap_or_else(|e| panic!("{e}"));
        for line in text.lines() {
            lines += 1;
            markers.insert(line.to_owned());
        }
    }
    // What is not dead arrived; a dead one may have too (its result was unknown).
    let s3_delivered = s3_ids.iter().filter(|id| !dead_ids.contains(*id)).count();
    assert!(
        (s3_delivered..=s3_markers).contains(&markers.len()),
        "{} S3 events in objects for {s3_delivered} delivered of {s3_markers}",
        markers.len()
    );
    let mails_delivered = mail_ids.iter().filter(|id| !dead_ids.contains(*id)).count();
    let subjects: HashSet<String> = smtp
        .messages()
        .iter()
        .filter_map(|mail| {
            String::from_utf8_lossy(&mail.raw)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        })
        .collect();
    let received = subjects.len();
    assert!(
        (mails_delivered..=mails).contains(&received),
        "{received} distinct mails received for {mails_delivered} delivered of {mails}"
    );
    if minutes == 0.0 {
        assert_eq!(
            (markers.len(), received),
            (s3_markers, mails),
            "in CI's round every S3 event and every mail arrives"
        );
    }
    eprintln!(
        "faults: {round} rounds, {} accepted, {delivered} delivered, {dead} dead ({dead_but_arrived} of them arrived, their result unknown to the server), {faults_injected} faults injected; HTTP duplicates {duplicates}, S3 events written {lines} for {s3_markers}; server peak RSS {peak:.0} MiB",
        accepted.len()
    );
    assert!(peak < 400.0, "peak RSS {peak:.0} MiB");
}
