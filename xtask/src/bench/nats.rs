//! `cargo xtask bench nats`: the server-http load through 1, 2 and 3 servers on one
//! nats-server, beside the same load through one server on the memory and SQLite queues, in one
//! run: sends/s from the first request to the last delivery, and the servers' CPU time per
//! 1 000 delivered sends (on two cores throughput cannot grow with servers; a flat cost per send
//! is what shows it would).

use super::{
    Background, Row, WrkRun, all_cpus, free_port, http_run_body, metric, start_receiver,
    start_server_on, wrk_post,
};
use crate::root;

/// One round: `nodes` servers on one queue config, under wrk.
struct Round {
    rate: f64,
    accepted: f64,
    /// Each server's CPU seconds during the round.
    cpu: Vec<f64>,
}

impl Round {
    /// The servers' CPU milliseconds per 1 000 delivered sends, all of them together.
    fn cost(&self) -> f64 {
        self.cpu.iter().sum::<f64>() * 1000.0 / (self.accepted / 1000.0)
    }

    fn describe(&self) -> String {
        let cpu: Vec<String> = self.cpu.iter().map(|c| format!("{c:.1}")).collect();
        format!(
            "{:.0}/s, {:.0} CPU-ms per 1 000 (servers: {} s)",
            self.rate,
            self.cost(),
            cpu.join(" + ")
        )
    }
}

/// A process's CPU time so far (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces), from field 3 on.
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15: 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// nats-server with JetStream on a free port and a fresh store; it and its URL.
fn start_nats(name: &str) -> Result<(Background, String), String> {
    let binary = crate::tools_root().join("venv/bin/nats-server");
    if !binary.is_file() {
        crate::setup()?;
    }
    let store = root().join(format!("target/bench/{name}-store"));
    let _ = std::fs::remove_dir_all(&store);
    let port = free_port()?;
    let child = super::pinned(0, &binary.display().to_string())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start nats-server: {e}"))?;
    let server = Background(child);
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((server, format!("nats://127.0.0.1:{port}")));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err("nats-server did not listen within 10 s".into())
}

/// `nodes` servers with this config, each under its own wrk posting `body` for `seconds`.
fn round(
    name: &str,
    config: &str,
    nodes: usize,
    body: &str,
    seconds: u64,
) -> Result<Round, String> {
    let servers = (0..nodes)
        .map(|i| start_server_on(&format!("{name}-{i}"), config, &all_cpus()))
        .collect::<Result<Vec<_>, _>>()?;
    let pids: Vec<u32> = servers.iter().map(|(server, _)| server.0.id()).collect();
    let before: Vec<f64> = pids.iter().map(|pid| cpu_seconds(*pid)).collect();
    let connections = u32::try_from((16 / nodes).max(4)).unwrap_or(4);
    let started = std::time::Instant::now();
    let loads: Vec<Result<WrkRun, String>> = std::thread::scope(|scope| {
        let running: Vec<_> = servers
            .iter()
            .map(|(_, port)| {
                let url = format!("http://127.0.0.1:{port}/v1/runs");
                scope.spawn(move || wrk_post(&url, body, seconds, connections))
            })
            .collect();
        running
            .into_iter()
            .map(|load| load.join().unwrap_or_else(|_| Err("wrk panicked".into())))
            .collect()
    });
    let mut accepted = 0.0;
    for load in loads {
        let load = load?;
        accepted += ((load.requests - load.non_2xx) * 100) as f64;
    }
    let ports: Vec<u16> = servers.iter().map(|(_, port)| *port).collect();
    let deadline = started + std::time::Duration::from_secs(600);
    let delivered_at = loop {
        let delivered: f64 = ports
            .iter()
            .map(|port| metric(*port, "destinations_delivered_total"))
            .sum();
        if delivered >= accepted {
            break std::time::Instant::now();
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "{name}: {delivered} of {accepted} sends delivered in 600 s"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let cpu = pids
        .iter()
        .zip(&before)
        .map(|(pid, before)| cpu_seconds(*pid) - before)
        .collect();
    drop(servers);
    Ok(Round {
        rate: accepted / (delivered_at - started).as_secs_f64(),
        accepted,
        cpu,
    })
}

pub(super) fn nats_scenario(quick: bool) -> Result<Vec<(Row, String)>, String> {
    let seconds = if quick { 5 } else { 10 };
    let (_receiver, receiver_url) = start_receiver()?;
    let body = http_run_body(&format!("{receiver_url}/nats"));
    let http = "[destinations.http]\nkind = \"http\"\nallow_networks = [\"127.0.0.0/8\"]\n";
    let memory = round(
        "nats-memory",
        &format!("[hub.queue]\nkind = \"memory\"\n\n{http}"),
        1,
        &body,
        seconds,
    )?;
    let sqlite = round("nats-sqlite", http, 1, &body, seconds)?;
    let mut on_nats = Vec::new();
    for nodes in 1..=3 {
        let name = format!("nats-{nodes}");
        let (_nats, url) = start_nats(&name)?;
        let config = format!("[hub.queue]\nkind = \"nats\"\nurl = \"{url}\"\n\n{http}");
        on_nats.push(round(&name, &config, nodes, &body, seconds)?);
    }
    let notes = format!(
        "wrk posting runs of 100 × 256 B for {seconds} s to each server (16 connections shared), servers on both CPUs, nats-server and the receiver on CPU 0, wrk on CPU 1; memory {}; sqlite {}; nats 1 node {}; 2 nodes {}; 3 nodes {}",
        memory.describe(),
        sqlite.describe(),
        on_nats[0].describe(),
        on_nats[1].describe(),
        on_nats[2].describe()
    );
    let rounds: Vec<String> = on_nats
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                r#"{{"nodes":{},"per_second":{},"cpu_ms_per_1000":{},"cpu":{:?}}}"#,
                i + 1,
                r.rate,
                r.cost(),
                r.cpu
            )
        })
        .collect();
    let json = format!(
        r#"{{"scenario":"nats","memory_per_second":{},"memory_cpu_ms_per_1000":{},"sqlite_per_second":{},"sqlite_cpu_ms_per_1000":{},"nats":[{}]}}"#,
        memory.rate,
        memory.cost(),
        sqlite.rate,
        sqlite.cost(),
        rounds.join(",")
    );
    Ok(vec![
        (
            Row {
                scenario: "nats",
                goal: "ratio ≥ 0.5",
                measure: "HTTP sends/s end to end, 1 server on nats".into(),
                value: on_nats[0].rate,
                reference_name: "the same through the memory queue".into(),
                reference: memory.rate,
                notes: notes.clone(),
            },
            json,
        ),
        (
            Row {
                scenario: "nats",
                goal: "ratio ≤ 1.2",
                measure: "CPU-ms per 1 000 sends, 3 servers (lower wins)".into(),
                value: on_nats[2].cost(),
                reference_name: "the same with 1 server".into(),
                reference: on_nats[0].cost(),
                notes,
            },
            r#"{"scenario":"nats-cost"}"#.to_owned(),
        ),
    ])
}
