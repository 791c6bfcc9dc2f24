//! `scaling ...`: what one send costs as the work around it grows. Each case prints one JSON
//! line with `ns_per_send` (wall clock over the measured sends); `cargo xtask bench scaling`
//! compares the sizes.
//!
//! - `scaling queued N [QUEUE_FILE]`: N sends wait for a receiver that never answers while
//!   100 000 more go through a destination that delivers at once (the engine's own cost).
//! - `scaling s3 ENDPOINT PREFIXES EVENTS BATCH`: EVENTS S3 events spread evenly over PREFIXES
//!   prefixes, every batch closed by size (BATCH events), so each case writes the same objects
//!   of the same size; only how many batches are open at once differs.
//! - `scaling emit SUBSCRIPTIONS EMITS`: SUBSCRIPTIONS subscriptions, one of them to the emitter
//!   the EMITS come from; each emit reaches one in-process listener.
//! - `waiters SERVER N`: N sends parked on the server's `parked` instance (their target
//!   never answers), then one `GET /v1/events/{id}?wait=60s` per send held open, again
//!   and again, until the process is killed.

use crate::shared::{InstantDestination, StoppedTarget, large_queue};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use destinations::emit::{EmitDestination, EmitOptions, EmitSend, SendEmit, Subscription};
use destinations::http::{HttpRequest, SendHttp};
use destinations::policy::BatchPolicyOverrides;
use destinations::s3::{S3Destination, S3Options, S3Send, SendS3};
use destinations::{InstanceSettings, InstanceShare};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::{builder_on, finish, peak_rss_kib, producers};

/// Sends measured in the `queued` case.
const MEASURED: usize = 100_000;

/// CPU time this process has used (user and system, every thread), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // The fields after the command name (which may hold spaces) in parentheses.
            let rest = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .collect::<Vec<_>>();
            let user: u64 = rest.get(11)?.parse().ok()?;
            let system: u64 = rest.get(12)?.parse().ok()?;
            Some(user + system)
        })
        .unwrap_or(0);
    // Linux reports in clock ticks of 1/100 s.
    Duration::from_millis(ticks * 10)
}

/// The measured sends' figures: wall clock, and CPU time (what a send costs, whatever the
/// overlap of its work with other work).
struct Measured {
    wall: Instant,
    cpu: Duration,
}

impl Measured {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    /// Wall clock and CPU time since the start.
    fn stop(self) -> (Duration, Duration) {
        (self.wall.elapsed(), cpu_time().saturating_sub(self.cpu))
    }

    fn report(self, case: &str, size: usize, sends: usize) {
        let (wall, cpu) = self.stop();
        report(case, size, sends, wall, cpu);
    }
}

fn report(case: &str, size: usize, sends: usize, elapsed: Duration, cpu: Duration) {
    println!(
        "{}",
        json!({
            "case": case,
            "size": size,
            "sends": sends,
            "seconds": elapsed.as_secs_f64(),
            "ns_per_send": elapsed.as_nanos() as f64 / sends as f64,
            "cpu_ns_per_send": cpu.as_nanos() as f64 / sends as f64,
            "peak_rss_kib": peak_rss_kib(),
        })
    );
}

/// `queued N [QUEUE_FILE]`.
pub(crate) async fn queued(waiting: usize, queue: Option<&str>) -> Result<(), String> {
    // The parked sends' attempts never end, so the rest stay queued.
    let stopped = StoppedTarget::at("/parked")?;
    let url = stopped.url.clone();
    let parked = StoppedTarget::patient_http()?;
    let instant = InstantDestination::counting_to(MEASURED);
    // Room for every parked send, and the measured ones' own share beside them.
    let share = |reserved: usize| InstanceSettings {
        queue: InstanceShare {
            reserved_events: Some(reserved),
            ..InstanceShare::default()
        },
        ..InstanceSettings::default()
    };
    let hub = builder_on(large_queue(waiting + 2 * MEASURED), queue)?
        .destination("parked", Arc::new(parked), share(0))
        .destination("instant", instant.clone(), share(2 * MEASURED))
        .build()
        .map_err(|e| e.to_string())?;
    let body = json!({"pad": "x".repeat(200)});
    let request = HttpRequest::post(&url).json(&body);
    for first in (0..waiting).step_by(1000) {
        let run = hub.begin_run("parked");
        for _ in first..waiting.min(first + 1000) {
            run.send()
                .http_to("parked", request.clone())
                .map_err(|e| e.to_string())?;
        }
        finish(run).await?;
    }
    let depth = hub.queue_depth().events;
    let payload = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let payload = bytes::Bytes::from(payload);
    // On stderr, for a profiler to attach to the measured part only.
    eprintln!("measuring {MEASURED} sends beside {depth} queued");
    let measured = Measured::start();
    producers(
        MEASURED,
        move |hub, first, count| {
            let payload = payload.clone();
            async move {
                let run = hub.begin_run("measured");
                for _ in first..first + count {
                    run.send()
                        .checked("instant", "instant", payload.clone())
                        .map_err(|e| e.to_string())?;
                }
                finish(run).await
            }
        },
        &hub,
    )
    .await?;
    instant.all_delivered().await;
    if depth + 1000 < waiting {
        return Err(format!("only {depth} of {waiting} sends were queued"));
    }
    measured.report("queued", waiting, MEASURED);
    // The parked sends will never be delivered: leave without the shutdown wait.
    std::process::exit(0)
}

/// `s3 ENDPOINT PREFIXES EVENTS BATCH`.
pub(crate) async fn s3(
    endpoint: &str,
    prefixes: usize,
    events: usize,
    batch: usize,
) -> Result<(), String> {
    let options = S3Options::s3_compatible(endpoint, "bench", "bench-secret");
    let destination = S3Destination::new("s3", options)?;
    let settings = InstanceSettings {
        batch: BatchPolicyOverrides {
            max_events: Some(batch),
            max_bytes: Some(usize::MAX / 2),
            max_age: Some(Duration::from_secs(3600)),
        },
        ..InstanceSettings::default()
    };
    let hub = builder_on(large_queue(events + 10_000), None)?
        .destination("s3", Arc::new(destination), settings)
        .build()
        .map_err(|e| e.to_string())?;
    let names: Arc<Vec<String>> = Arc::new((0..prefixes).map(|p| format!("p{p:05}/")).collect());
    let measured = Measured::start();
    producers(
        events,
        move |hub, first, count| {
            let names = names.clone();
            async move {
                let run = hub.begin_run("scaling");
                for n in first..first + count {
                    let event = json!({"n": n, "page": "/pricing", "ms": n % 3000});
                    run.send()
                        .s3(S3Send::new("bench", &names[n % names.len()], &event))
                        .map_err(|e| e.to_string())?;
                }
                finish(run).await
            }
        },
        &hub,
    )
    .await?;
    let drained = hub.drained(Duration::from_secs(3600)).await;
    let (wall, cpu) = measured.stop();
    let dead = hub.dead_letters(1).await.map_err(|e| e.to_string())?;
    hub.shutdown().await;
    if !drained || !dead.is_empty() {
        return Err(format!(
            "not everything was delivered (drained: {drained}, dead letters: {})",
            dead.len()
        ));
    }
    report("s3", prefixes, events, wall, cpu);
    Ok(())
}

/// `emit SUBSCRIPTIONS EMITS`.
pub(crate) async fn emit(subscriptions: usize, emits: usize) -> Result<(), String> {
    let emit = Arc::new(EmitDestination::new(EmitOptions::default())?);
    let heard = InstantDestination::counting_to(emits);
    let listener = heard.clone();
    emit.listen("listener", move |_| {
        listener.count(1);
        async { Ok(()) }
    });
    for s in 0..subscriptions {
        emit.subscribe(Subscription {
            emitter_id: format!("e{s}"),
            listener_id: "listener".into(),
            event_name: None,
        })?;
    }
    let hub = builder_on(large_queue(2 * emits + 10_000), None)?
        .destination("emit", emit, InstanceSettings::default())
        .build()
        .map_err(|e| e.to_string())?;
    let measured = Measured::start();
    producers(
        emits,
        move |hub, first, count| async move {
            let run = hub.begin_run("scaling");
            for n in first..first + count {
                run.send()
                    .emit(EmitSend::new(&json!({"n": n})).from_emitter("e0"))
                    .map_err(|e| e.to_string())?;
            }
            finish(run).await
        },
        &hub,
    )
    .await?;
    heard.all_delivered().await;
    measured.report("emit", subscriptions, emits);
    hub.shutdown().await;
    Ok(())
}

/// `waiters SERVER N`.
pub(crate) async fn waiters(server: &str, count: usize) -> Result<(), String> {
    // The parked sends' target never answers.
    let stopped = StoppedTarget::at("/parked")?;
    let park_url = stopped.url.clone();
    let address = server
        .strip_prefix("http://")
        .ok_or("SERVER must be an http:// URL")?
        .trim_end_matches('/')
        .to_owned();
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let mut ids = Vec::with_capacity(count);
    for first in (0..count).step_by(100) {
        let sends: Vec<_> = (first..count.min(first + 100))
            .map(|n| {
                json!({"destination": "parked", "payload": {"url": park_url, "method": "POST", "data": {"n": n}}})
            })
            .collect();
        let answer: serde_json::Value = client
            .post(format!("{server}/v1/runs"))
            .json(&json!({"sends": sends}))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let accepted = answer["ids"]
            .as_array()
            .ok_or_else(|| format!("the server did not accept the parked sends: {answer}"))?;
        ids.extend(
            accepted
                .iter()
                .filter_map(|id| id.as_str().map(str::to_owned)),
        );
    }
    let held = Arc::new(AtomicUsize::new(0));
    let all_held = Arc::new(Notify::new());
    for id in ids {
        let (address, held, all_held) = (address.clone(), held.clone(), all_held.clone());
        tokio::spawn(async move {
            let request = format!(
                "GET /v1/events/{id}?wait=60s HTTP/1.1\r\nHost: {address}\r\nConnection: keep-alive\r\n\r\n"
            );
            let mut first = true;
            loop {
                let Ok(mut stream) = tokio::net::TcpStream::connect(&address).await else {
                    return;
                };
                loop {
                    if stream.write_all(request.as_bytes()).await.is_err() {
                        break;
                    }
                    if first {
                        first = false;
                        if held.fetch_add(1, Ordering::AcqRel) + 1 == count {
                            all_held.notify_one();
                        }
                    }
                    // The answer comes when the wait ends; read it whole, then wait again.
                    let mut buffer = [0u8; 4096];
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
        });
    }
    all_held.notified().await;
    println!("holding {count} waiters");
    std::future::pending::<()>().await;
    Ok(())
}
