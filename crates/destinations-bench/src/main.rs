//! Load programs for `cargo xtask bench`.
//!
//! - `destinations-bench receiver ADDR`: answers 200 to everything, counts requests, and
//!   measures send-to-arrival latency from a `t` field (Unix nanoseconds) in JSON bodies.
//!   `GET /stats` reports; `POST /reset` clears.
//! - `destinations-bench http URL SENDS [QUEUE_FILE]`: the library sends SENDS requests of 256 B
//!   through the HTTP destination, in runs of 100, and prints one JSON line of results.
//! - `destinations-bench s3 ENDPOINT SENDS NDJSON_OUT [QUEUE_FILE]`: the library sends SENDS
//!   events of about 256 B through the S3 destination (gzip, default batching) to an
//!   S3-compatible server, prints one JSON line of results, and writes the same events as NDJSON
//!   to NDJSON_OUT so the reference (`gzip -1`) compresses exactly the bytes the objects hold.
//! - `destinations-bench http-batch ...`, `receivers ...`, `many-hosts ...`: delivering to many
//!   endpoints (see `hosts.rs`).
//! - `destinations-bench scaling ...` and `waiters ...`: the scaling cases (see `scaling.rs`).
//!
//! With a QUEUE_FILE, the hub runs on the SQLite queue in that file (created fresh); without
//! one, on the memory queue.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use destinations::http::{HttpOptions, HttpRequest, SendHttp};
use destinations::{Hub, HubBuilder, HubConfig, InstanceSettings};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

mod hosts;
mod memory;
mod scaling;
mod send_path;
mod shared;
mod sse;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let ["send-path", sends] = args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        let sends = sends.parse().map_err(|_| "SENDS must be a number")?;
        // One core: a current-thread runtime.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        return runtime.block_on(send_path::send_path(sends));
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let number = |text: &str| {
        text.parse::<usize>()
            .map_err(|_| format!("`{text}` must be a number"))
    };
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["receiver", addr] => runtime.block_on(receiver(addr)),
        ["http", url, sends, queue @ ..] if queue.len() <= 1 => {
            let sends = sends.parse().map_err(|_| "SENDS must be a number")?;
            runtime.block_on(http_load(url, sends, queue.first().copied()))
        }
        ["http-batch", url, sends] => runtime.block_on(hosts::http_batch(url, number(sends)?)),
        ["receivers", blackholed, count] => {
            runtime.block_on(hosts::receivers(number(blackholed)?, number(count)?))
        }
        ["many-hosts", sends, healthy, urls @ ..] => {
            runtime.block_on(hosts::many_hosts(number(sends)?, number(healthy)?, urls))
        }
        ["memory", sends, queue @ ..] if queue.len() <= 1 => {
            let sends = sends.parse().map_err(|_| "SENDS must be a number")?;
            runtime.block_on(memory::memory(sends, queue.first().copied()))
        }
        ["sse-reference", addr] => runtime.block_on(sse::reference(addr)),
        ["sse-clients", url, subscribers, events, rate, publish, style] => {
            runtime.block_on(sse::clients(
                url,
                number(subscribers)?,
                number(events)?,
                number(rate)? as u64,
                publish,
                style,
            ))
        }
        ["s3", endpoint, sends, ndjson, queue @ ..] if queue.len() <= 1 => {
            let sends = sends.parse().map_err(|_| "SENDS must be a number")?;
            runtime.block_on(s3_load(endpoint, sends, ndjson, queue.first().copied()))
        }
        ["scaling", "queued", waiting, queue @ ..] if queue.len() <= 1 => {
            let waiting = number(waiting)?;
            runtime.block_on(scaling::queued(waiting, queue.first().copied()))
        }
        ["scaling", "s3", endpoint, prefixes, events, batch] => runtime.block_on(scaling::s3(
            endpoint,
            number(prefixes)?,
            number(events)?,
            number(batch)?,
        )),
        ["scaling", "emit", subscriptions, emits] => {
            runtime.block_on(scaling::emit(number(subscriptions)?, number(emits)?))
        }
        ["waiters", server, count] => runtime.block_on(scaling::waiters(server, number(count)?)),
        _ => Err(
            "usage: destinations-bench scaling queued N [QUEUE_FILE] | scaling s3 ENDPOINT PREFIXES EVENTS BATCH | scaling emit SUBSCRIPTIONS EMITS | waiters SERVER N | destinations-bench receiver ADDR | receivers BLACKHOLED COUNT | http-batch URL SENDS | many-hosts SENDS HEALTHY URL... | http URL SENDS [QUEUE_FILE] | s3 ENDPOINT SENDS NDJSON_OUT [QUEUE_FILE] | send-path SENDS | memory SENDS [QUEUE_FILE] | sse-reference ADDR | sse-clients STREAM_URL SUBSCRIBERS EVENTS RATE PUBLISH_URL STYLE"
                .into(),
        ),
    }
}

pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

async fn receiver(addr: &str) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "receiving on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let stats = Arc::new(Stats::default());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stats = stats.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| answer(request, stats.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    stats: Arc<Stats>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match path.as_str() {
        "/stats" => {
            let mut latencies = stats
                .latencies_us
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            latencies.sort_unstable();
            let at = |q: f64| {
                latencies
                    .get(((latencies.len() as f64 - 1.0) * q) as usize)
                    .copied()
            };
            let report = json!({
                "requests": stats.requests.load(Ordering::Relaxed),
                "p50_us": at(0.5),
                "p99_us": at(0.99),
            });
            Ok(Response::new(Full::new(Bytes::from(report.to_string()))))
        }
        "/reset" => {
            stats.requests.store(0, Ordering::Relaxed);
            stats
                .latencies_us
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            Ok(Response::new(Full::new(Bytes::new())))
        }
        _ => {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            if let Some(sent) = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["t"].as_u64())
            {
                let micros = unix_nanos().saturating_sub(sent) / 1000;
                stats
                    .latencies_us
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(micros);
            }
            Ok(Response::new(Full::new(Bytes::new())))
        }
    }
}

/// A hub builder on `config`, on the SQLite queue in `queue` (a fresh file) if one is given.
pub(crate) fn builder_on(config: HubConfig, queue: Option<&str>) -> Result<HubBuilder, String> {
    let Some(path) = queue else {
        return Ok(Hub::builder().config(config));
    };
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    let queue = destinations::sqlite::SqliteQueue::open(
        &destinations::sqlite::SqliteOptions::at(path),
        config.status_retention(),
        config.dead_letter_capacity,
    )
    .map_err(|e| e.to_string())?;
    Ok(Hub::builder().config(config).queue(Arc::new(queue)))
}

async fn http_load(url: &str, sends: usize, queue: Option<&str>) -> Result<(), String> {
    let mut options = HttpOptions::allowing_loopback();
    options.per_host_concurrency = 64;
    let settings = InstanceSettings {
        concurrency: Some(64),
        ..InstanceSettings::default()
    };
    http_load_with(url, sends, queue, options, settings).await
}

/// SENDS sends of 256 B through an HTTP instance with these options and settings; prints one
/// JSON line of results.
pub(crate) async fn http_load_with(
    url: &str,
    sends: usize,
    queue: Option<&str>,
    options: HttpOptions,
    settings: InstanceSettings,
) -> Result<(), String> {
    let destination = destinations::http::HttpDestination::new(options)?;
    let hub = builder_on(HubConfig::default(), queue)?
        .destination("http", Arc::new(destination), settings)
        .build()
        .map_err(|e| e.to_string())?;
    let padding = "x".repeat(200);
    let started = Instant::now();
    let url = Arc::<str>::from(url);
    let padding = Arc::<str>::from(padding);
    producers(
        sends,
        move |hub, first, count| {
            let (url, padding) = (url.clone(), padding.clone());
            async move {
                let run = hub.begin_run("bench");
                for _ in first..first + count {
                    let body = json!({"t": unix_nanos(), "pad": &*padding});
                    run.send()
                        .http(HttpRequest::post(&*url).json(&body))
                        .map_err(|e| e.to_string())?;
                }
                finish(run).await
            }
        },
        &hub,
    )
    .await?;
    let recorded = started.elapsed();
    // Everything delivered (a durable queue's shutdown would keep what is left).
    let drained = hub.drained(std::time::Duration::from_secs(3600)).await;
    let report = hub.shutdown().await;
    let elapsed = started.elapsed();
    let rss_kib = peak_rss_kib();
    println!(
        "{}",
        json!({
            "sends": sends,
            "seconds": elapsed.as_secs_f64(),
            "sends_per_second": sends as f64 / elapsed.as_secs_f64(),
            "record_seconds": recorded.as_secs_f64(),
            "abandoned": report.abandoned,
            "drained": drained,
            "peak_rss_kib": rss_kib,
        })
    );
    Ok(())
}

/// Runs of 100 recorded by concurrent producers, as a service's request handlers would
/// (`DESTINATIONS_BENCH_PRODUCERS`, default 8): `run(hub, first, count)` records and finishes
/// one run.
pub(crate) async fn producers<F, Fut>(sends: usize, run: F, hub: &Hub) -> Result<(), String>
where
    F: Fn(Hub, usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let count = std::env::var("DESTINATIONS_BENCH_PRODUCERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8usize)
        .max(1);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let run = Arc::new(run);
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let (next, run, hub) = (next.clone(), run.clone(), hub.clone());
            tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(100, std::sync::atomic::Ordering::Relaxed);
                    if first >= sends {
                        return Ok::<(), String>(());
                    }
                    run(hub.clone(), first, 100.min(sends - first)).await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Finish a run; a full queue waits for room, then refuses it whole: finish it again.
pub(crate) async fn finish(mut run: destinations::Run) -> Result<(), String> {
    loop {
        match run.finish().await {
            Ok(_) => return Ok(()),
            Err(refused)
                if matches!(
                    refused.error,
                    destinations::SendError::Queue(destinations::QueueError::Full(_))
                ) =>
            {
                run = refused.into_run();
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// This process's peak resident set, from `/proc/self/status`.
pub(crate) fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// One analytics-style event of about 256 bytes; fields vary as real events do, so the
/// compressor has honest work.
fn s3_event(n: usize) -> serde_json::Value {
    const PAGES: [&str; 5] = [
        "/",
        "/pricing",
        "/docs/getting-started",
        "/blog/launch",
        "/signup",
    ];
    json!({
        "event": "page_view",
        "n": n,
        "at": 1_763_900_000_000u64 + n as u64 * 7,
        "user": format!("u_{:08x}", fastrand::u32(..)),
        "session": format!("{:016x}", fastrand::u64(..)),
        "page": PAGES[n % PAGES.len()],
        "referrer": "https://search.example.com/?q=event+delivery",
        "ua": "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0",
        "ms": fastrand::u32(5..3000),
    })
}

async fn s3_load(
    endpoint: &str,
    sends: usize,
    ndjson: &str,
    queue: Option<&str>,
) -> Result<(), String> {
    use std::io::Write as _;

    use destinations::s3::{S3Destination, S3Options, S3Send, SendS3};

    let mut options = S3Options::s3_compatible(endpoint, "bench", "bench-secret");
    // `DESTINATIONS_BENCH_GZIP_LEVEL` tries another level (the default is the instance's).
    options.compression_level = std::env::var("DESTINATIONS_BENCH_GZIP_LEVEL")
        .ok()
        .and_then(|level| level.parse().ok());
    let destination = S3Destination::new("s3", options)?;
    let hub = builder_on(HubConfig::default(), queue)?
        .destination("s3", Arc::new(destination), InstanceSettings::default())
        .build()
        .map_err(|e| e.to_string())?;
    // The events are built (as JSON text) before the clock starts, so the figure is the
    // library's; the reference file holds exactly these bytes.
    let events: Vec<Box<serde_json::value::RawValue>> = (0..sends)
        .map(|n| serde_json::value::to_raw_value(&s3_event(n)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(ndjson).map_err(|e| format!("{ndjson}: {e}"))?,
    );
    for event in &events {
        file.write_all(event.get().as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .map_err(|e| e.to_string())?;
    }
    file.flush().map_err(|e| e.to_string())?;
    let event_bytes: usize = events.iter().map(|e| e.get().len()).sum();
    let started = Instant::now();
    let events = Arc::new(events);
    producers(
        sends,
        move |hub, first, count| {
            let events = events.clone();
            async move {
                let run = hub.begin_run("bench");
                for event in &events[first..first + count] {
                    run.send()
                        .s3(S3Send::new("bench", "events", event))
                        .map_err(|e| e.to_string())?;
                }
                finish(run).await
            }
        },
        &hub,
    )
    .await?;
    let recorded = started.elapsed();
    // Everything delivered (a durable queue's shutdown would keep what is left).
    let drained = hub.drained(std::time::Duration::from_secs(3600)).await;
    let report = hub.shutdown().await;
    let elapsed = started.elapsed();
    let delivered = drained
        && hub
            .dead_letters(1)
            .await
            .map_err(|e| e.to_string())?
            .is_empty()
        && report.abandoned == 0;
    println!(
        "{}",
        json!({
            "sends": sends,
            "seconds": elapsed.as_secs_f64(),
            "sends_per_second": sends as f64 / elapsed.as_secs_f64(),
            "record_seconds": recorded.as_secs_f64(),
            "all_delivered": delivered,
            "peak_rss_kib": peak_rss_kib(),
            "prebuilt_event_bytes": event_bytes,
        })
    );
    Ok(())
}
