//! `memory SENDS`: what SENDS queued sends cost in memory, beside the bytes they carry. The
//! receiver is stopped — it listens but never accepts — so the sends stay queued.

use std::sync::Arc;
use std::time::Duration;

use destinations::http::{HttpOptions, HttpRequest, SendHttp};
use destinations::{HubConfig, InstanceSettings, QueueBounds, QueueConfig};
use serde_json::json;

/// This process's resident set now, from `/proc/self/status`.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) async fn memory(sends: usize, queue: Option<&str>) -> Result<(), String> {
    // Listens, never accepts: connections wait in the backlog and no answer ever comes.
    let stopped = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let url = format!(
        "http://{}/stopped",
        stopped.local_addr().map_err(|e| e.to_string())?
    );
    let mut options = HttpOptions::allowing_loopback();
    options.timeout = Duration::from_secs(3600);
    let destination = destinations::http::HttpDestination::new(options)?;
    let hub = crate::builder_on(
        HubConfig {
            queue: QueueConfig {
                bounds: QueueBounds {
                    max_events: sends + 1000,
                    max_bytes: usize::MAX / 2,
                },
                ..QueueConfig::default()
            },
            ..HubConfig::default()
        },
        queue,
    )?
    .destination("http", Arc::new(destination), InstanceSettings::default())
    .build()
    .map_err(|e| e.to_string())?;
    let pad = "x".repeat(200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let mut data_bytes = 0;
    for first in (0..sends).step_by(100) {
        let run = hub.begin_run("memory");
        for n in first..sends.min(first + 100) {
            let body = json!({"n": n, "pad": pad});
            data_bytes += serde_json::to_vec(&body).map_or(0, |b| b.len());
            run.send()
                .http(HttpRequest::post(&url).json(&body))
                .map_err(|e| e.to_string())?;
        }
        run.finish().await.map_err(|e| e.to_string())?;
    }
    // Let the dispatcher take what it can (a few hundred in flight, stuck) and settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib();
    let depth = hub.queue_depth();
    println!(
        "{}",
        json!({
            "sends": sends,
            "queued": depth.events,
            "queued_bytes": depth.bytes,
            "data_bytes": data_bytes,
            "rss_before_kib": before,
            "rss_after_kib": after,
        })
    );
    // Nothing will ever be delivered: leave without the shutdown wait.
    std::process::exit(0)
}
