//! `cargo xtask bench`: load scenarios, each beside a reference measured in the same run on the
//! same receiver. Prints a table and writes `target/bench/report.json`.
//!
//! Pinning: the receiver runs on CPU 0, the load (wrk or the library) on CPU 1, when `taskset`
//! is available.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use crate::{apt_install, have, root};

const SCENARIOS: [&str; 1] = ["http"];

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

/// wrk with a 256-byte JSON POST body, the same shape the library sends.
fn wrk(url: &str, seconds: u64) -> Result<f64, String> {
    let script = root().join("target/bench/post.lua");
    let body = format!(r#"{{"t":0,"pad":"{}"}}"#, "x".repeat(200));
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let out = pinned(1, "wrk")
        .args(["-t1", "-c64", &format!("-d{seconds}s"), "-s"])
        .arg(&script)
        .arg(format!("{url}/wrk"))
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("could not read wrk's output:\n{text}"))
}

struct Row {
    scenario: &'static str,
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
    let wrk_rps = wrk(&url, seconds)?;
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
    let field = |json: &str, key: &str| -> f64 {
        let needle = format!("\"{key}\":");
        json.find(&needle)
            .map(|at| &json[at + needle.len()..])
            .and_then(|rest| rest.split([',', '}']).next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let sends_per_second = field(&result, "sends_per_second");
    let row = Row {
        scenario: "http",
        measure: "sends/s, one request per send".into(),
        value: sends_per_second,
        reference_name: "wrk -t1 -c64, same receiver".into(),
        reference: wrk_rps,
        notes: format!(
            "N={sends} × 256 B; send→arrival p50 {:.1} ms, p99 {:.1} ms; peak RSS {:.0} MiB; received {}",
            field(&stats, "p50_us") / 1000.0,
            field(&stats, "p99_us") / 1000.0,
            field(&result, "peak_rss_kib") / 1024.0,
            field(&stats, "requests"),
        ),
    };
    let json = format!(
        r#"{{"scenario":"http","library":{result},"receiver":{},"wrk_requests_per_second":{wrk_rps}}}"#,
        stats.trim()
    );
    Ok((row, json))
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let options = parse(args)?;
    let mut missing = Vec::new();
    for (tool, package) in [("wrk", "wrk"), ("curl", "curl"), ("taskset", "util-linux")] {
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
        let (row, json) = match scenario.as_str() {
            "http" => http_scenario(options.quick)?,
            other => return Err(format!("scenario `{other}` is not built yet")),
        };
        rows.push(row);
        reports.push(json);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!("machine: {cpus} CPUs; receiver pinned to CPU 0, load to CPU 1 (taskset)");
    println!(
        "{:<6} {:<32} {:>12} {:>12} {:>7}  {:<30} notes",
        "scen.", "measure", "value", "reference", "ratio", "reference is"
    );
    for r in &rows {
        println!(
            "{:<6} {:<32} {:>12.0} {:>12.0} {:>7.2}  {:<30} {}",
            r.scenario,
            r.measure,
            r.value,
            r.reference,
            r.value / r.reference,
            r.reference_name,
            r.notes
        );
    }
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
