//! Delivering to many endpoints: batched requests to one receiver, and one load spread over a
//! hundred receivers of which some never answer.
//!
//! - `destinations-bench http-batch URL SENDS`: SENDS sends of 256 B through an HTTP instance
//!   that batches them (`encoding = "json_array"`, 100 a request).
//! - `destinations-bench receivers BLACKHOLED COUNT`: COUNT receivers on ports of their own,
//!   announced as `receiving on PORT,PORT,...`; each answers 200, except the first
//!   BLACKHOLED, which take connections and read what comes but never answer.
//! - `destinations-bench many-hosts SENDS HEALTHY URL...`: SENDS sends spread evenly over the
//!   URLs; the first HEALTHY URLs answer. Reports the sends to those delivered per second.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use destinations::http::{BatchEncoding, HttpOptions, HttpRequest, SendHttp};
use destinations::policy::BatchPolicyOverrides;
use destinations::{EventId, HubConfig, InstanceSettings};
use serde_json::json;

use crate::{builder_on, finish, peak_rss_kib, producers, unix_nanos};

pub(crate) async fn http_batch(url: &str, sends: usize) -> Result<(), String> {
    let options = HttpOptions {
        encoding: Some(BatchEncoding::JsonArray),
        ..HttpOptions::allowing_loopback()
    };
    let settings = InstanceSettings {
        batch: BatchPolicyOverrides {
            max_events: Some(100),
            max_age: Some(Duration::from_millis(50)),
            ..BatchPolicyOverrides::default()
        },
        ..InstanceSettings::default()
    };
    crate::http_load_with(url, sends, None, options, settings).await
}

pub(crate) async fn receivers(blackholed: usize, count: usize) -> Result<(), String> {
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..count {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("127.0.0.1:0: {e}"))?;
        ports.push(
            listener
                .local_addr()
                .map_err(|e| e.to_string())?
                .port()
                .to_string(),
        );
        listeners.push(listener);
    }
    println!("receiving on {}", ports.join(","));
    let mut tasks = Vec::new();
    for (n, listener) in listeners.into_iter().enumerate() {
        let answers = n >= blackholed;
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                if answers {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(|_request| async {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                } else {
                    // Read everything, answer nothing.
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                    });
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

pub(crate) async fn many_hosts(sends: usize, healthy: usize, urls: &[&str]) -> Result<(), String> {
    let destination = destinations::http::HttpDestination::new(HttpOptions::allowing_loopback())?;
    let hub = builder_on(HubConfig::default(), None)?
        .destination("http", Arc::new(destination), InstanceSettings::default())
        .build()
        .map_err(|e| e.to_string())?;
    let urls: Arc<Vec<String>> = Arc::new(urls.iter().map(|u| format!("{u}/hook")).collect());
    let padding: Arc<str> = Arc::from("x".repeat(200));
    let to_healthy: Arc<Mutex<Vec<EventId>>> = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    {
        let to_healthy = to_healthy.clone();
        producers(
            sends,
            move |hub, first, count| {
                let (urls, padding, to_healthy) =
                    (urls.clone(), padding.clone(), to_healthy.clone());
                async move {
                    let run = hub.begin_run("bench");
                    let mut healthy_ids = Vec::new();
                    for n in first..first + count {
                        let host = n % urls.len();
                        let body = json!({"t": unix_nanos(), "pad": &*padding});
                        let id = run
                            .send()
                            .http(HttpRequest::post(&urls[host]).json(&body))
                            .map_err(|e| e.to_string())?;
                        if host < healthy {
                            healthy_ids.push(id);
                        }
                    }
                    finish(run).await?;
                    to_healthy
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend(healthy_ids);
                    Ok(())
                }
            },
            &hub,
        )
        .await?;
    }
    let ids = std::mem::take(&mut *to_healthy.lock().unwrap_or_else(PoisonError::into_inner));
    let mut delivered = 0usize;
    for id in &ids {
        let status = hub
            .wait_final(*id, Duration::from_secs(3600))
            .await
            .map_err(|e| e.to_string())?;
        if status.is_some_and(|s| s.state == destinations::State::Delivered) {
            delivered += 1;
        }
    }
    let elapsed = started.elapsed();
    let paused = hub.endpoints().iter().filter(|e| e.state != "open").count();
    hub.shutdown_within(Duration::from_millis(200)).await;
    println!(
        "{}",
        json!({
            "sends": sends,
            "to_healthy": ids.len(),
            "delivered": delivered,
            "seconds": elapsed.as_secs_f64(),
            "sends_per_second": delivered as f64 / elapsed.as_secs_f64(),
            "hosts_paused": paused,
            "peak_rss_kib": peak_rss_kib(),
        })
    );
    Ok(())
}
