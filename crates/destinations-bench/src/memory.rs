//! `memory SENDS`: what SENDS queued sends cost in memory, beside the bytes they carry. The
//! receiver is stopped — it listens but never accepts — so the sends stay queued.

use crate::shared::{StoppedTarget, large_queue};
use std::sync::Arc;
use std::time::Duration;

use destinations::InstanceSettings;
use destinations::http::{HttpRequest, SendHttp};
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
    let stopped = StoppedTarget::at("/stopped")?;
    let url = stopped.url.clone();
    let destination = StoppedTarget::patient_http()?;
    let hub = crate::builder_on(large_queue(sends + 1000), queue)?
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
