//! SSE fan-out load: `sse-clients STREAM_URL SUBSCRIBERS EVENTS RATE PUBLISH_URL STYLE` opens
//! SUBSCRIBERS streams over raw TCP, publishes EVENTS events at RATE a second (each carrying
//! the time it was published), and measures when each arrives at each subscriber.
//! `sse-reference ADDR` is the floor to compare with: a bare tokio fan-out server (no
//! framework, no queue, no replay) that speaks just enough HTTP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use crate::unix_nanos;

/// One subscriber: connect, ask, then read `data:` lines until `events` arrived or the time
/// runs out; the latency of each in microseconds.
async fn subscriber(
    addr: String,
    path: String,
    events: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> Vec<u64> {
    let Ok(mut stream) = TcpStream::connect(&addr).await else {
        return Vec::new();
    };
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Vec::new();
    }
    let mut lines = BufReader::new(stream).lines();
    // The answer's head ends with an empty line.
    while let Ok(Some(line)) = lines.next_line().await {
        if line.is_empty() {
            break;
        }
    }
    let _ = ready.send(()).await;
    let mut latencies = Vec::with_capacity(events);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while latencies.len() < events {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            _ => break,
        };
        // Chunked framing lines and other fields carry no `"t":`.
        if let Some(at) = line.find("\"t\":") {
            let digits: String = line[at + 4..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(sent) = digits.parse::<u64>() {
                latencies.push(unix_nanos().saturating_sub(sent) / 1000);
            }
        }
    }
    latencies
}

pub(crate) async fn clients(
    stream_url: &str,
    subscribers: usize,
    events: usize,
    rate: u64,
    publish_url: &str,
    style: &str,
) -> Result<(), String> {
    let without_scheme = stream_url
        .strip_prefix("http://")
        .ok_or("STREAM_URL must be http://")?;
    let (addr, path) =
        without_scheme.split_at(without_scheme.find('/').unwrap_or(without_scheme.len()));
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel(subscribers.max(1));
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        tasks.push(tokio::spawn(subscriber(
            addr.to_owned(),
            path.to_owned(),
            events,
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let mut connected = 0;
    while connected < subscribers && ready.recv().await.is_some() {
        connected += 1;
    }
    let http = reqwest::Client::new();
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let started = Instant::now();
    let mut next = tokio::time::Instant::now();
    for _ in 0..events {
        let body = match style {
            // The destinations server: a send to the SSE instance.
            "destinations" => {
                json!({"channel": "tick", "stream": "bench", "payload": {"t": unix_nanos()}})
            }
            _ => json!({"t": unix_nanos()}),
        };
        http.post(publish_url)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("publish: {e}"))?;
        next += interval;
        tokio::time::sleep_until(next).await;
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap_or_default());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{}",
        json!({
            "subscribers": connected,
            "events": events,
            "deliveries": latencies.len(),
            "missing": subscribers * events - latencies.len(),
            "seconds": elapsed,
            "deliveries_per_second": latencies.len() as f64 / elapsed,
            "p50_us": at(0.5),
            "p99_us": at(0.99),
        })
    );
    Ok(())
}

/// The reference: accept, answer `GET` with an event stream fed by one broadcast channel,
/// `POST` with 202 after broadcasting its body.
pub(crate) async fn reference(addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
    println!(
        "serving on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let (events, _) = broadcast::channel::<Arc<str>>(1 << 16);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let events = events.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            if head.starts_with("POST") {
                // One publish per connection is enough for the load generator's client, which
                // keeps the connection and posts again: loop over requests.
                let mut reader = reader;
                let mut length = length;
                loop {
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let _ = events.send(Arc::from(String::from_utf8_lossy(&body).as_ref()));
                    if reader
                        .get_mut()
                        .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(value) =
                            line.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                }
            }
            let mut stream = reader.into_inner();
            let mut subscription = events.subscribe();
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            while let Ok(event) = subscription.recv().await {
                let frame = format!("data: {event}\n\n");
                if stream.write_all(frame.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}
