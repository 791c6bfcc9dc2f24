//! `send-path SENDS`: what recording a send and finishing its run costs, on one core, beside
//! the floor every send pays anyway — serializing its payload once.

use crate::shared::{InstantDestination, large_queue};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use destinations::http::{HttpOptions, HttpRequest, SendHttp};
use destinations::{Hub, InstanceSettings};
use serde_json::json;

fn hub(sends: usize) -> Result<Hub, String> {
    let http = destinations::http::HttpDestination::new(HttpOptions::allowing_loopback())?;
    Hub::builder()
        .config(large_queue(sends * 2 + 1000))
        // Delivers at once: the hub's own cost, with no destination's.
        .destination(
            "null",
            InstantDestination::counting_to(usize::MAX),
            InstanceSettings::default(),
        )
        .destination("http", Arc::new(http), InstanceSettings::default())
        .build()
        .map_err(|e| e.to_string())
}

/// Nanoseconds per send of `record`, in runs of 100 finished as they fill. Runs on a
/// current-thread runtime and never yields, so delivery work does not mix into the figure.
async fn per_send(
    hub: &Hub,
    sends: usize,
    record: impl Fn(&destinations::Sender) -> Result<(), String>,
) -> Result<f64, String> {
    let started = Instant::now();
    let mut done = 0;
    while done < sends {
        let run = hub.begin_run("bench");
        for _ in 0..100.min(sends - done) {
            record(run.send())?;
            done += 1;
        }
        run.finish().await.map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed().as_nanos() as f64 / sends as f64)
}

pub(crate) async fn send_path(sends: usize) -> Result<(), String> {
    let body = json!({"t": 0, "pad": "x".repeat(200)});
    let bytes = Bytes::from(serde_json::to_vec(&body).map_err(|e| e.to_string())?);

    let floor_started = Instant::now();
    for _ in 0..sends {
        black_box(serde_json::to_vec(black_box(&body)).map_err(|e| e.to_string())?);
    }
    let serialize_ns = floor_started.elapsed().as_nanos() as f64 / sends as f64;

    let raw_hub = hub(sends)?;
    let raw_ns = per_send(&raw_hub, sends, |sender| {
        sender
            .json("null", bytes.clone())
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await?;
    raw_hub.shutdown().await;

    let typed_hub = hub(sends)?;
    // The HTTP destination's typed send: build, check (URL, headers), serialize once.
    let typed_ns = per_send(&typed_hub, sends, |sender| {
        sender
            .http(HttpRequest::post("http://127.0.0.1:9/bench").json(&body))
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await?;
    // Nothing listens on port 9: dead-letter what is queued at once rather than retrying.
    typed_hub.shutdown_within(std::time::Duration::ZERO).await;

    println!(
        "{}",
        json!({
            "sends": sends,
            "serialize_ns": serialize_ns,
            "json_send_ns": raw_ns,
            "typed_http_send_ns": typed_ns,
        })
    );
    Ok(())
}
