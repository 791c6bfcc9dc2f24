//! `cargo xtask new-destination NAME [--out DIR]`: a destination crate that builds, registers,
//! and passes the conformance suite as generated — inside this workspace (`crates/`), or
//! outside it (`--out DIR`), depending on this checkout by path with the workspace's versions
//! pinned (its `Cargo.lock` copied).

use std::path::{Path, PathBuf};

use crate::{TestCounts, cargo_test, root};

const LIB: &str = include_str!("../templates/new-destination/lib.rs.tmpl");
const CONFORMANCE: &str = include_str!("../templates/new-destination/conformance.rs.tmpl");
const MANIFEST: &str = include_str!("../templates/new-destination/Cargo.toml.tmpl");

/// What the crate depends on: (name, for the dependencies, for the dev-dependencies).
const DEPENDENCIES: [(&str, bool, bool); 7] = [
    ("async-trait", true, false),
    ("destinations-core", true, false),
    ("reqwest", true, false),
    ("serde", true, false),
    ("serde_json", true, true),
    ("destinations-testkit", false, true),
    ("tokio", false, true),
];

pub(crate) fn new_destination(args: &[String]) -> Result<(), String> {
    let (name, out) = match args {
        [name] => (name, None),
        [name, flag, dir] if flag == "--out" => (name, Some(PathBuf::from(dir))),
        _ => return Err("usage: cargo xtask new-destination NAME [--out DIR]".into()),
    };
    let kind = kind_of(name)?;
    let package = format!("destinations-{}", kind.replace('_', "-"));
    let crate_dir = match &out {
        Some(dir) => dir.join(&package),
        None => root().join("crates").join(&package),
    };
    if crate_dir.exists() {
        return Err(format!(
            "{} exists already: pick another name or remove it",
            crate_dir.display()
        ));
    }
    let manifest = match out {
        Some(_) => out_of_tree_manifest(&kind)?,
        None => in_tree_manifest(&kind),
    };
    let fill = |template: &str| {
        template
            .replace("{{package}}", &package)
            .replace("{{kind}}", &kind)
            .replace("{{Name}}", &type_name(&kind))
            .replace("{{crate_ident}}", &format!("destinations_{kind}"))
    };
    write(&crate_dir.join("Cargo.toml"), &fill(&manifest))?;
    write(&crate_dir.join("src/lib.rs"), &fill(LIB))?;
    write(&crate_dir.join("tests/conformance.rs"), &fill(CONFORMANCE))?;
    // Formatted as `cargo fmt` would, whatever the name's length.
    let sources = [
        crate_dir.join("src/lib.rs"),
        crate_dir.join("tests/conformance.rs"),
    ];
    let formatted = std::process::Command::new("rustfmt")
        .args(["--edition", "2024"])
        .args(&sources)
        .status();
    if !formatted.is_ok_and(|s| s.success()) {
        eprintln!("note: rustfmt did not run; `cargo fmt` will tidy the new files");
    }
    if out.is_some() {
        // The versions this checkout is tested with.
        std::fs::copy(root().join("Cargo.lock"), crate_dir.join("Cargo.lock"))
            .map_err(|e| format!("cannot copy Cargo.lock: {e}"))?;
    }
    let test = if out.is_some() {
        format!("cd {} && cargo test", crate_dir.display())
    } else {
        format!("cargo test -p {package}")
    };
    println!(
        "created {}\n\nnext:\n  cargo xtask setup        # in this checkout, once: the suite's servers (nats-server, ...)\n  {test}            # the conformance suite, as generated\n  edit src/lib.rs          # your send type, options and delivery\n  read docs/writing-a-destination.md",
        crate_dir.display()
    );
    Ok(())
}

/// The kind: lower-case letters, digits and `_`, starting with a letter (it is also a Rust
/// name: the `send.KIND(...)` method).
fn kind_of(name: &str) -> Result<String, String> {
    let kind = name.replace('-', "_");
    let mut chars = kind.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !starts_well
        || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        || kind.len() > 40
    {
        return Err(format!(
            "`{name}` cannot name a destination: use lower-case letters, digits and `_`, starting with a letter (at most 40)"
        ));
    }
    const TAKEN: [&str; 9] = [
        "http", "s3", "email", "sse", "emit", "core", "server", "testkit", "bench",
    ];
    if TAKEN.contains(&kind.as_str()) {
        return Err(format!(
            "`{kind}` is taken by this workspace: pick another name"
        ));
    }
    // It names the `send.KIND(...)` method: not a Rust keyword, nor a method `Sender` has.
    const KEYWORDS: [&str; 51] = [
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum",
        "extern", "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move",
        "mut", "pub", "ref", "return", "self", "static", "struct", "super", "trait", "true",
        "type", "unsafe", "use", "where", "while", "abstract", "become", "box", "do", "final",
        "gen", "macro", "override", "priv", "try", "typeof", "unsized", "virtual", "yield",
    ];
    const SENDER_METHODS: [&str; 8] = [
        "to",
        "json",
        "json_now",
        "checked",
        "typed",
        "record",
        "record_to",
        "run_id",
    ];
    if KEYWORDS.contains(&kind.as_str()) || SENDER_METHODS.contains(&kind.as_str()) {
        return Err(format!(
            "`{kind}` cannot be the `send.{kind}(...)` method (a Rust keyword, or a method senders have): pick another name"
        ));
    }
    Ok(kind)
}

/// `chat_ops` → `ChatOps`.
fn type_name(kind: &str) -> String {
    kind.split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

fn in_tree_manifest(_kind: &str) -> String {
    let list = |pick: fn(&(&str, bool, bool)) -> bool| -> String {
        DEPENDENCIES
            .iter()
            .filter(|d| pick(d))
            .map(|(name, _, _)| format!("{name}.workspace = true\n"))
            .collect()
    };
    MANIFEST
        .replace(
            "{{package_settings}}",
            "version.workspace = true\nedition.workspace = true\nrust-version.workspace = true\nlicense.workspace = true\npublish.workspace = true\n",
        )
        .replace("{{dependencies}}", &list(|d| d.1))
        .replace("{{dev_dependencies}}", &list(|d| d.2))
        .replace("{{tail}}", "[lints]\nworkspace = true")
}

/// Each dependency as the workspace declares it (the same version requirement and features),
/// a path into this checkout for its own crates; a workspace of its own.
fn out_of_tree_manifest(_kind: &str) -> Result<String, String> {
    let workspace = std::fs::read_to_string(root().join("Cargo.toml"))
        .map_err(|e| format!("cannot read the workspace's Cargo.toml: {e}"))?;
    let declared = |name: &str| -> Result<String, String> {
        let line = workspace
            .lines()
            .find(|line| line.split_once(" = ").is_some_and(|(n, _)| n == name))
            .ok_or_else(|| format!("the workspace does not declare `{name}`"))?;
        let crate_dir = root().join("crates").join(name);
        Ok(if crate_dir.exists() {
            format!(
                "{name} = {{ path = {:?} }}\n",
                crate_dir.display().to_string()
            )
        } else {
            format!("{line}\n")
        })
    };
    let list = |pick: fn(&(&str, bool, bool)) -> bool| -> Result<String, String> {
        DEPENDENCIES
            .iter()
            .filter(|d| pick(d))
            .map(|(name, _, _)| declared(name))
            .collect()
    };
    Ok(MANIFEST
        .replace(
            "{{package_settings}}",
            "version = \"0.1.0\"\nedition = \"2024\"\nrust-version = \"1.95\"\npublish = false\n",
        )
        .replace("{{dependencies}}", &list(|d| d.1)?)
        .replace("{{dev_dependencies}}", &list(|d| d.2)?)
        .replace("{{tail}}", "# A workspace of its own.\n[workspace]"))
}

/// Prove the scaffold on a copy of this checkout (tracked and new files, nothing ignored):
/// `cargo xtask new-destination demo && cargo test -p destinations-demo` passes, the crate is
/// clippy- and fmt-clean; and one generated with `--out` passes on its own.
pub(crate) fn check_generated() -> Result<Vec<(&'static str, TestCounts)>, String> {
    // Always the same place, so the shared target folder reuses what the last check built
    // (a new path each time would add the whole workspace's artifacts again, gigabytes a run).
    let copy = TempCopy(root().join("target/scaffold-check"));
    let _ = std::fs::remove_dir_all(&copy.0);
    if let Err(why) = copy_checkout(&copy.0) {
        println!("scaffold check skipped: {why}");
        return Ok(vec![(
            "the scaffold check (skipped)",
            TestCounts::skipped(),
        )]);
    }
    // A crate of that name the developer generated (untracked) is not the one under test.
    let _ = std::fs::remove_dir_all(copy.0.join("crates/destinations-demo"));
    let copy = &copy.0;
    let outside = copy.join("outside");
    let outside_arg = outside.display().to_string();
    let manifest = outside.join("destinations-demo-outside/Cargo.toml");
    let manifest_arg = manifest.display().to_string();
    // The copy's xtask builds apart: built into the shared target folder, it would replace
    // the binary of the xtask running now (`target/debug/xtask`, whose root is this checkout).
    let xtask_target = root().join("target/scaffold-xtask").display().to_string();
    let xtask = |command: &[&'static str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--quiet",
            "--target-dir",
            &xtask_target,
            "-p",
            "xtask",
            "--",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        args.extend(command.iter().map(|a| (*a).to_owned()));
        args
    };
    let new_demo = xtask(&["new-destination", "demo"]);
    let mut new_outside = xtask(&["new-destination", "demo_outside", "--out"]);
    new_outside.push(outside_arg);
    let owned = |args: &[&str]| -> Vec<String> { args.iter().map(|a| (*a).to_owned()).collect() };
    let steps: [(&'static str, Vec<String>); 6] = [
        ("new-destination demo", new_demo),
        (
            "the generated crate's tests",
            owned(&["test", "-p", "destinations-demo"]),
        ),
        (
            "the generated crate's clippy",
            owned(&[
                "clippy",
                "-p",
                "destinations-demo",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
        (
            "the generated crate's format",
            owned(&["fmt", "-p", "destinations-demo", "--check"]),
        ),
        ("new-destination --out", new_outside),
        (
            "the out-of-tree crate's tests",
            owned(&["test", "--manifest-path", &manifest_arg]),
        ),
    ];
    let mut results = Vec::new();
    for (what, args) in steps {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let counts = cargo_test(&args, copy)?;
        let counts = if args[0] == "test" {
            counts
        } else {
            TestCounts::step(counts.success)
        };
        let stop = !counts.success;
        results.push((what, counts));
        if stop {
            break;
        }
    }
    Ok(results)
}

/// The copy, removed however the check ends.
struct TempCopy(PathBuf);

impl Drop for TempCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The files git knows of or would add, copied under `to`.
fn copy_checkout(to: &Path) -> Result<(), String> {
    let listed = std::process::Command::new("git")
        .args(["ls-files", "-co", "--exclude-standard", "-z"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !listed.status.success() {
        return Err("`git ls-files` failed: the scaffold check needs a git checkout".into());
    }
    for file in listed.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let file = String::from_utf8_lossy(file).into_owned();
        let (from, to) = (root().join(&file), to.join(&file));
        if !from.is_file() {
            continue;
        }
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        std::fs::copy(&from, &to).map_err(|e| format!("cannot copy {file}: {e}"))?;
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(kind_of("demo").as_deref(), Ok("demo"));
        assert_eq!(kind_of("chat-ops").as_deref(), Ok("chat_ops"));
        assert_eq!(type_name("chat_ops"), "ChatOps");
        for bad in [
            "", "Demo", "1x", "a b", "http", "a.b", "type", "match", "record", "json",
        ] {
            assert!(kind_of(bad).is_err(), "{bad}");
        }
    }
}
