//! Test fixtures for `destinations`: real servers on 127.0.0.1 and the conformance suite that
//! every destination runs.

pub mod conformance;
pub mod receiver;
pub mod s3;
pub mod smtp;

pub use conformance::{ConformanceTarget, SinkBehaviour};
pub use receiver::{ReceivedRequest, Receiver, Reply};
pub use s3::{Fault, FaultProxy, S3Server, TempDir};
pub use smtp::{CapturedMail, SmtpConfig, SmtpServer};

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
