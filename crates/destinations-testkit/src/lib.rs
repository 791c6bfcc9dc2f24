//! Test fixtures for `destinations`: real servers on 127.0.0.1 and the conformance suite that
//! every destination runs.

pub mod conformance;
pub mod inspect;
pub mod receiver;
pub mod s3;
pub mod smtp;
pub mod sse;

pub use conformance::{ConformanceTarget, SinkBehaviour};
pub use inspect::{dead_letters, final_status, state, status};
pub use receiver::{ReceivedRequest, Receiver, Reply};
pub use s3::{Fault, FaultProxy, S3Server, TempDir};
pub use smtp::{CapturedMail, SmtpConfig, SmtpServer};
pub use sse::{SseClient, SseMessage};

/// Every file below `dir`, at any depth (none if it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Fail a test whose external server is missing, naming the command that installs it.
pub fn require_command(command: &str, what: &str) -> std::path::PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(command))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{command}` ({what}) is not installed; run `cargo xtask setup` first")
    })
}
