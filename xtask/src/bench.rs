//! `cargo xtask bench`: load scenarios, each beside a reference measured in the same run on the
//! same receiver. Prints a table and writes `target/bench/report.json`.
//!
//! Pinning: the receiver runs on CPU 0, the load (wrk or the library) on CPU 1, when `taskset`
//! is available.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use crate::{apt_install, have, root};

const SCENARIOS: [&str; 6] = ["send-path", "http", "ingest", "s3", "sse", "memory"];

struct Options {
    quick: bool,
    scenarios: Vec<String>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        quick: false,
        scenarios: Vec::new(),
    };
    for arg in args {
        match arg.as_str() {
            "--quick" => options.quick = true,
            s if SCENARIOS.contains(&s) => options.scenarios.push(s.to_owned()),
            other => {
                return Err(format!(
                    "unknown bench argument `{other}`; scenarios: {}",
                    SCENARIOS.join(", ")
                ));
            }
        }
    }
    if options.scenarios.is_empty() {
        options.scenarios = SCENARIOS.iter().map(|s| (*s).to_owned()).collect();
    }
    Ok(options)
}

/// A background process, killed (by its pid) when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pinned(cpu: usize, program: &str) -> Command {
    if have("taskset") && std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        let mut command = Command::new("taskset");
        command.args(["-c", &cpu.to_string(), program]);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

fn bench_binary() -> String {
    root()
        .join("target/release/destinations-bench")
        .display()
        .to_string()
}

fn http_get(url: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            if url.ends_with("/reset") {
                "POST"
            } else {
                "GET"
            },
            url,
        ])
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn start_receiver() -> Result<(Background, String), String> {
    let port = free_port()?;
    let mut child = pinned(0, &bench_binary())
        .args(["receiver", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the bench receiver: {e}"))?;
    let stdout = child.stdout.take().ok_or("receiver has no stdout")?;
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .map_err(|e| e.to_string())?;
    if !first.starts_with("receiving on") {
        return Err(format!("the receiver did not start: {first}"));
    }
    Ok((Background(child), format!("http://127.0.0.1:{port}")))
}

struct Row {
    scenario: &'static str,
    /// The issue's target for this figure.
    goal: &'static str,
    measure: String,
    value: f64,
    reference_name: String,
    reference: f64,
    notes: String,
}

/// The library's sends/s into a receiver beside wrk's requests/s into the same receiver;
/// returns the table row and the scenario's JSON report.
fn http_scenario(quick: bool) -> Result<(Row, String), String> {
    let (_receiver, url) = start_receiver()?;
    let seconds = if quick { 5 } else { 10 };
    // wrk with a 256-byte JSON body, the same shape the library sends.
    let body = format!(r#"{{"t":0,"pad":"{}"}}"#, "x".repeat(200));
    let reference = wrk_post(&format!("{url}/wrk"), &body, seconds, 64)?;
    let wrk_rps = reference.requests as f64 / reference.seconds;
    http_get(&format!("{url}/reset"))?;
    let sends = if quick { 50_000 } else { 200_000 };
    let out = pinned(1, &bench_binary())
        .args(["http", &format!("{url}/lib"), &sends.to_string()])
        .output()
        .map_err(|e| format!("cannot run the library load: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "library load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let result = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stats = http_get(&format!("{url}/stats"))?;
    let sends_per_second = json_field(&result, "sends_per_second");
    let row = Row {
        scenario: "http",
        goal: "ratio ≥ 0.7",
        measure: "sends/s, one request per send".into(),
        value: sends_per_second,
        reference_name: "wrk -t1 -c64, same receiver".into(),
        reference: wrk_rps,
        notes: format!(
            "N={sends} × 256 B; send→arrival p50 {:.1} ms, p99 {:.1} ms; peak RSS {:.0} MiB; received {}",
            json_field(&stats, "p50_us") / 1000.0,
            json_field(&stats, "p99_us") / 1000.0,
            json_field(&result, "peak_rss_kib") / 1024.0,
            json_field(&stats, "requests"),
        ),
    };
    let json = format!(
        r#"{{"scenario":"http","library":{result},"receiver":{},"wrk_requests_per_second":{wrk_rps}}}"#,
        stats.trim()
    );
    Ok((row, json))
}

/// Start s3s-fs (the test suite's S3-compatible server) on CPU 0 with a fresh folder holding a
/// `bench` bucket; returns it and its endpoint.
fn start_s3_server() -> Result<(Background, String, std::path::PathBuf), String> {
    let binary = crate::tools_root().join("bin/s3s-fs");
    if !binary.is_file() {
        crate::setup()?;
    }
    let data = root().join("target/bench/s3s");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(data.join("bench")).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let child = pinned(0, &binary.display().to_string())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "bench", "--secret-key", "bench-secret"])
        .arg(&data)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start s3s-fs: {e}"))?;
    let server = Background(child);
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((
                server,
                format!("http://127.0.0.1:{port}"),
                data.join("bench"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err("s3s-fs did not listen within 10 s".into())
}

/// Files and bytes under a folder.
fn folder_size(dir: &std::path::Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(meta) = entry.metadata() {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    (files, bytes)
}

/// The library's events/s into gzip NDJSON objects on s3s-fs, beside `gzip -1` compressing the
/// same NDJSON bytes on the same core.
fn s3_scenario(quick: bool) -> Result<(Row, String), String> {
    let (_server, endpoint, bucket) = start_s3_server()?;
    let sends = if quick { 100_000 } else { 500_000 };
    let ndjson = root().join("target/bench/events.ndjson");
    let out = pinned(1, &bench_binary())
        .args(["s3", &endpoint, &sends.to_string()])
        .arg(&ndjson)
        .output()
        .map_err(|e| format!("cannot run the library load: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "library load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let result = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let (objects, object_bytes) = folder_size(&bucket);
    let ndjson_bytes = std::fs::metadata(&ndjson).map_or(0, |m| m.len());
    // The reference: gzip -1 over the same bytes, on the load's core; best of three.
    let mut gzip_seconds = f64::INFINITY;
    let mut gzip_bytes = 0;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let out = pinned(1, "gzip")
            .args(["-1", "-c"])
            .arg(&ndjson)
            .output()
            .map_err(|e| format!("gzip: {e}"))?;
        gzip_seconds = gzip_seconds.min(started.elapsed().as_secs_f64());
        gzip_bytes = out.stdout.len();
    }
    let gzip_events = sends as f64 / gzip_seconds;
    let value = json_field(&result, "sends_per_second");
    let row = Row {
        scenario: "s3",
        goal: "ratio ≥ 0.8",
        measure: "events/s into gzip NDJSON objects".into(),
        value,
        reference_name: "gzip -1, same NDJSON bytes".into(),
        reference: gzip_events,
        notes: format!(
            "N={sends} × {:.0} B; {objects} objects, {:.1} MiB NDJSON → {:.1} MiB (gzip -1: {:.1} MiB); all delivered: {}; peak RSS {:.0} MiB (incl. the events, built before timing)",
            ndjson_bytes as f64 / sends as f64,
            ndjson_bytes as f64 / 1048576.0,
            object_bytes as f64 / 1048576.0,
            gzip_bytes as f64 / 1048576.0,
            result.contains("\"all_delivered\":true"),
            json_field(&result, "peak_rss_kib") / 1024.0,
        ),
    };
    let json = format!(
        r#"{{"scenario":"s3","library":{result},"objects":{objects},"object_bytes":{object_bytes},"ndjson_bytes":{ndjson_bytes},"gzip_seconds":{gzip_seconds},"gzip_bytes":{gzip_bytes}}}"#
    );
    let _ = std::fs::remove_file(&ndjson);
    Ok((row, json))
}

/// A number field of a flat JSON object, or NaN.
fn json_field(json: &str, key: &str) -> f64 {
    let needle = format!("\"{key}\":");
    json.find(&needle)
        .map(|at| &json[at + needle.len()..])
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Run the bench binary with these arguments on CPU 1; its one line of JSON.
fn bench_json(args: &[&str]) -> Result<String, String> {
    let out = pinned(1, &bench_binary())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run the bench binary: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`destinations-bench {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// ns per send of recording and finishing runs, beside serializing the same payload once.
fn send_path_scenario(quick: bool) -> Result<(Row, String), String> {
    let sends = if quick { 200_000 } else { 1_000_000 };
    let result = bench_json(&["send-path", &sends.to_string()])?;
    let json_ns = json_field(&result, "json_send_ns");
    let typed_ns = json_field(&result, "typed_http_send_ns");
    let serialize_ns = json_field(&result, "serialize_ns");
    let row = Row {
        scenario: "send-path",
        goal: "≤ 200 ns",
        measure: "ns/send, record + finish (lower wins)".into(),
        value: json_ns,
        reference_name: "serde_json::to_vec of the payload".into(),
        reference: serialize_ns,
        notes: format!(
            "N={sends}, one core, runs of 100; typed HTTP send (URL check, build, serialize): {typed_ns:.0} ns; {:.0} sends/s",
            1e9 / json_ns
        ),
    };
    Ok((
        row,
        format!(r#"{{"scenario":"send-path","result":{result}}}"#),
    ))
}

/// RSS of queued sends behind a stopped receiver, beside the bytes they hold.
fn memory_scenario(quick: bool) -> Result<(Row, String), String> {
    let sends = if quick { 200_000 } else { 1_000_000 };
    let result = bench_json(&["memory", &sends.to_string()])?;
    let grown =
        (json_field(&result, "rss_after_kib") - json_field(&result, "rss_before_kib")) * 1024.0;
    let queued = json_field(&result, "queued_bytes");
    let row = Row {
        scenario: "memory",
        goal: "ratio ≤ 1.5",
        measure: "MiB RSS for queued sends (lower wins)".into(),
        value: grown / 1048576.0,
        reference_name: "MiB of payload bytes queued".into(),
        reference: queued / 1048576.0,
        notes: format!(
            "{sends} sends of a 256 B body queued behind a receiver that never accepts; {:.0} B/send in memory, {:.0} B/send of payload",
            grown / sends as f64,
            queued / sends as f64
        ),
    };
    Ok((row, format!(r#"{{"scenario":"memory","result":{result}}}"#)))
}

/// The server's `POST /v1/runs` (100 sends of 256 B a run) under wrk, beside wrk posting the
/// same body to the counting receiver.
fn ingest_scenario(quick: bool) -> Result<(Row, String), String> {
    let (_receiver, receiver_url) = start_receiver()?;
    let (server, port) = start_server(
        "ingest",
        "[hub.queue]\nmax_events = 5000000\nmax_bytes = 4294967296\n[destinations.http]\nkind = \"http\"\nallow_networks = [\"127.0.0.0/8\"]\n",
    )?;
    let sends: Vec<String> = (0..100)
        .map(|n| {
            format!(
                r#"{{"destination":"http","payload":{{"url":"{receiver_url}/ingested","data":{{"n":{n},"pad":"{}"}}}}}}"#,
                "x".repeat(200)
            )
        })
        .collect();
    let body = format!(r#"{{"sends":[{}]}}"#, sends.join(","));
    let seconds = if quick { 5 } else { 10 };
    let reference = wrk_post(&format!("{receiver_url}/wrk"), &body, seconds, 32)?;
    let ingest = wrk_post(
        &format!("http://127.0.0.1:{port}/v1/runs"),
        &body,
        seconds,
        32,
    )?;
    drop(server);
    let accepted = (ingest.requests - ingest.non_2xx) as f64 / ingest.seconds;
    let reference_runs = reference.requests as f64 / reference.seconds;
    let row = Row {
        scenario: "ingest",
        goal: "—",
        measure: "sends/s into POST /v1/runs".into(),
        value: accepted * 100.0,
        reference_name: "wrk, same body, to the receiver".into(),
        reference: reference_runs * 100.0,
        notes: format!(
            "runs of 100 × 256 B ({:.1} KiB a request) → the server (CPU 0) also delivers each to the receiver; {:.1} MB/s accepted; {} refused (queue full)",
            body.len() as f64 / 1024.0,
            accepted * body.len() as f64 / 1e6,
            ingest.non_2xx
        ),
    };
    let json = format!(
        r#"{{"scenario":"ingest","requests":{},"refused":{},"seconds":{},"body_bytes":{},"reference_requests":{}}}"#,
        ingest.requests,
        ingest.non_2xx,
        ingest.seconds,
        body.len(),
        reference.requests
    );
    Ok((row, json))
}

/// The release `destinations` server on CPU 0, on a free port, with this config (written to
/// `target/bench/NAME.toml`); it and its port.
fn start_server(name: &str, config: &str) -> Result<(Background, u16), String> {
    let port = free_port()?;
    let path = root().join(format!("target/bench/{name}.toml"));
    std::fs::write(&path, format!("listen = \"127.0.0.1:{port}\"\n{config}"))
        .map_err(|e| e.to_string())?;
    let binary = root()
        .join("target/release/destinations")
        .display()
        .to_string();
    let server = start_printing(&binary, &["serve", "--config", &path.display().to_string()])?;
    Ok((server, port))
}

/// Start a server on CPU 0 that prints its address as its first line (`listening on` /
/// `serving on`).
fn start_printing(program: &str, args: &[&str]) -> Result<Background, String> {
    let mut child = pinned(0, program)
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let child = Background(child);
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .map_err(|e| e.to_string())?;
    if !(first.starts_with("listening on") || first.starts_with("serving on")) {
        return Err(format!("{program} did not start: {first}"));
    }
    Ok(child)
}

/// Fan-out to `subscribers` SSE subscribers at 1 000 events/s through the server (publish =
/// `POST /v1/send/sse`, through the hub), beside a bare tokio broadcast server on the same
/// clients.
fn sse_scenario(subscribers: usize, events: usize) -> Result<(Row, String), String> {
    let clients = |stream: &str, publish: &str, style: &str| {
        bench_json(&[
            "sse-clients",
            stream,
            &subscribers.to_string(),
            &events.to_string(),
            "1000",
            publish,
            style,
        ])
    };
    let (server, port) = start_server(
        "sse",
        "[destinations.sse]\nkind = \"sse\"\nreplay = 0\nsubscriber_buffer = 1000000\n",
    )?;
    let ours = clients(
        &format!("http://127.0.0.1:{port}/v1/sse/bench"),
        &format!("http://127.0.0.1:{port}/v1/send/sse"),
        "destinations",
    )?;
    drop(server);
    let reference_port = free_port()?;
    let reference_addr = format!("127.0.0.1:{reference_port}");
    let reference_server = start_printing(&bench_binary(), &["sse-reference", &reference_addr])?;
    let reference = clients(
        &format!("http://{reference_addr}/stream"),
        &format!("http://{reference_addr}/publish"),
        "reference",
    )?;
    drop(reference_server);
    let row = Row {
        scenario: "sse",
        goal: "p99 ≤ 50 ms",
        measure: format!("deliveries/s, {subscribers} subscribers"),
        value: json_field(&ours, "deliveries_per_second"),
        reference_name: "bare tokio broadcast server".into(),
        reference: json_field(&reference, "deliveries_per_second"),
        notes: format!(
            "{events} events published at 1 000/s; p50 {:.1} ms, p99 {:.1} ms (reference p99 {:.1} ms); missing {}",
            json_field(&ours, "p50_us") / 1000.0,
            json_field(&ours, "p99_us") / 1000.0,
            json_field(&reference, "p99_us") / 1000.0,
            json_field(&ours, "missing"),
        ),
    };
    let json = format!(
        r#"{{"scenario":"sse","subscribers":{subscribers},"destinations":{ours},"reference":{reference}}}"#
    );
    Ok((row, json))
}

/// What wrk reported.
struct WrkRun {
    requests: u64,
    non_2xx: u64,
    seconds: f64,
}

/// wrk -t1 with `connections` posting `body` to `url` for `seconds`, on CPU 1.
fn wrk_post(url: &str, body: &str, seconds: u64, connections: u32) -> Result<WrkRun, String> {
    let script = root().join("target/bench/post-body.lua");
    let escaped = body.replace('\\', "\\\\").replace('"', "\\\"");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = \"{escaped}\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let out = pinned(1, "wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let requests = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.trim().to_owned())
        })
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("could not read wrk's output:\n{text}"))?;
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Ok(WrkRun {
        requests,
        non_2xx,
        seconds: seconds as f64,
    })
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let options = parse(args)?;
    let mut missing = Vec::new();
    for (tool, package) in [
        ("wrk", "wrk"),
        ("curl", "curl"),
        ("taskset", "util-linux"),
        ("gzip", "gzip"),
    ] {
        if !have(tool) {
            missing.push(package);
        }
    }
    apt_install(&missing)?;
    crate::run(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "destinations-bench",
            "-p",
            "destinations-server",
        ],
    )?;
    std::fs::create_dir_all(root().join("target/bench")).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut reports = Vec::new();
    for scenario in &options.scenarios {
        let results = match scenario.as_str() {
            "send-path" => vec![send_path_scenario(options.quick)?],
            "http" => vec![http_scenario(options.quick)?],
            "ingest" => vec![ingest_scenario(options.quick)?],
            "s3" => vec![s3_scenario(options.quick)?],
            "sse" => {
                let events = if options.quick { 300 } else { 1000 };
                vec![
                    sse_scenario(1000, events)?,
                    sse_scenario(10_000, events / 3)?,
                ]
            }
            "memory" => vec![memory_scenario(options.quick)?],
            other => return Err(format!("scenario `{other}` is not built yet")),
        };
        for (row, json) in results {
            rows.push(row);
            reports.push(json);
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!(
        "machine: {cpus} CPUs; receiver / s3s-fs pinned to CPU 0, load and gzip to CPU 1 (taskset)"
    );
    println!(
        "{:<9} {:<38} {:>12} {:>12} {:>7}  {:<12} {:<34} notes",
        "scen.", "measure", "value", "reference", "ratio", "goal", "reference is"
    );
    for r in &rows {
        println!(
            "{:<9} {:<38} {:>12.0} {:>12.0} {:>7.2}  {:<12} {:<34} {}",
            r.scenario,
            r.measure,
            r.value,
            r.reference,
            r.value / r.reference,
            r.goal,
            r.reference_name,
            r.notes
        );
    }
    println!("queues    not measured: only the memory queue exists (no durable queue yet)");
    let report = format!(
        r#"{{"cpus":{cpus},"quick":{},"scenarios":[{}]}}"#,
        options.quick,
        reports.join(",")
    );
    let path = root().join("target/bench/report.json");
    std::fs::write(&path, report).map_err(|e| e.to_string())?;
    println!("\nreport: {}", path.display());
    Ok(())
}
