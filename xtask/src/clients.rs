//! The Python and TypeScript clients (in `clients/`): each one's tests run against the server
//! binary; the TypeScript package's committed `dist/` must be what its `src/` compiles to.

use std::path::Path;
use std::process::Command;

use crate::{TestCounts, root, run};

/// Build the server binary, then run each client's tests against it.
pub(crate) fn check() -> Result<Vec<(&'static str, TestCounts)>, String> {
    run(
        "cargo",
        &[
            "build",
            "-p",
            "destinations-server",
            "--bin",
            "destinations",
        ],
    )?;
    let binary = root().join("target/debug/destinations");
    Ok(vec![
        ("the Python client", python(&binary)?),
        ("the TypeScript client", typescript(&binary)?),
    ])
}

/// Run a test command with the server binary in `DESTINATIONS_BIN`; its output, both streams.
fn run_tests(program: &str, args: &[&str], binary: &Path) -> Result<(bool, String), String> {
    println!("$ {program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .current_dir(root())
        .env("DESTINATIONS_BIN", binary)
        .output()
        .map_err(|e| format!("cannot run `{program}`: {e} (run `cargo xtask setup`)"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    Ok((output.status.success(), text))
}

/// The number after `prefix` on the first line that has it.
fn number_after(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let rest = line.trim().strip_prefix(prefix)?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// `python3 -m unittest`: the standard library's runner (the client needs nothing else).
fn python(binary: &Path) -> Result<TestCounts, String> {
    let (success, text) = run_tests(
        "python3",
        &[
            "-m",
            "unittest",
            "discover",
            "-s",
            "clients/python/tests",
            "-v",
        ],
        binary,
    )?;
    let ran = number_after(&text, "Ran ");
    let failed = number_after(&text, "FAILED (failures=") + number_after(&text, "FAILED (errors=");
    let failed = if success { 0 } else { failed.max(1) };
    Ok(TestCounts {
        passed: ran.saturating_sub(failed),
        failed,
        ignored: 0,
        success: success && ran > 0,
    })
}

/// `node --test` on the committed build (`dist/`), which `lint` keeps current.
fn typescript(binary: &Path) -> Result<TestCounts, String> {
    let (success, text) = run_tests(
        "node",
        // TAP, whatever Node's default reporter: its `# pass` / `# fail` lines are counted.
        &[
            "--test",
            "--test-reporter=tap",
            "clients/typescript/test/client.test.mjs",
        ],
        binary,
    )?;
    let passed = number_after(&text, "# pass ");
    let failed = number_after(&text, "# fail ");
    Ok(TestCounts {
        passed,
        failed: if success { failed } else { failed.max(1) },
        ignored: 0,
        success: success && passed > 0,
    })
}

/// Compile the TypeScript client with its pinned compiler (`npm ci`) into a scratch folder
/// and fail if the committed `dist/` differs: `cargo xtask build-clients` writes it.
pub(crate) fn typescript_build_is_current() -> Result<(), String> {
    let package = root().join("clients/typescript");
    let scratch = root().join("target/clients-typescript-dist");
    let _ = std::fs::remove_dir_all(&scratch);
    npm_ci(&package)?;
    compile(&package, &scratch)?;
    for name in ["index.js", "index.d.ts"] {
        let built = std::fs::read(scratch.join(name)).map_err(|e| format!("{name}: {e}"))?;
        let committed = std::fs::read(package.join("dist").join(name)).unwrap_or_default();
        if built != committed {
            return Err(format!(
                "clients/typescript/dist/{name} is not what src/ compiles to: run `cargo xtask build-clients` and commit it"
            ));
        }
    }
    println!("clients/typescript/dist is current");
    Ok(())
}

/// `cargo xtask build-clients`: write the TypeScript client's `dist/`.
pub(crate) fn build() -> Result<(), String> {
    let package = root().join("clients/typescript");
    npm_ci(&package)?;
    compile(&package, &package.join("dist"))
}

fn npm_ci(package: &Path) -> Result<(), String> {
    // `lint` runs before `setup` in CI: Node comes from Debian here if the machine lacks it.
    if !crate::have("node") || !crate::have("npm") {
        crate::apt_install(&["nodejs", "npm"])?;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(package)
        .status()
        .map_err(|e| format!("cannot run npm: {e} (run `cargo xtask setup`)"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("npm ci failed in {} ({status})", package.display()))
}

fn compile(package: &Path, out: &Path) -> Result<(), String> {
    let out = out.display().to_string();
    let status = Command::new("node")
        .args([
            "node_modules/typescript/bin/tsc",
            "-p",
            "tsconfig.json",
            "--outDir",
            &out,
        ])
        .current_dir(package)
        .status()
        .map_err(|e| format!("cannot run node: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("tsc failed ({status})"))
}
