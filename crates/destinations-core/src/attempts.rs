//! Every delivery attempt of a send, kept beside its status: when it started, how long it
//! took, how it ended, what the target answered and the error.
//!
//! A queue backend keeps the attempts that failed (rare, and each needs its own record); the
//! attempt that delivered a send is read from the send's status (its answer and the time it
//! was delivered), so a delivery costs the log nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::envelope::EventId;
use crate::queue::Settlement;
use crate::status::{SendStatus, State};

/// The most attempts a send's log keeps: the first, and the newest after it (the status
/// counts them all). A send retried through an outage keeps its log small.
pub const MAX_LOGGED_ATTEMPTS: usize = 10;

/// The most bytes of a target's answer an attempt keeps.
pub const MAX_LOGGED_EXCERPT: usize = 256;

/// The most bytes of an error an attempt keeps.
pub const MAX_LOGGED_ERROR: usize = 512;

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AttemptOutcome {
    /// The target accepted the send.
    Delivered,
    /// It failed and is tried again.
    Retry,
    /// It failed and the send was given up on (dead-lettered).
    Failed,
}

/// One delivery attempt of a send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Attempt {
    /// Its number among the send's attempts, from 1 (a replayed dead letter counts from 1
    /// again).
    pub number: u32,
    /// When it started.
    #[serde(with = "crate::status::rfc3339_serde")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub started_at: SystemTime,
    /// How long it took, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The target's status code (HTTP status, SMTP reply code), if it answered with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// The start of the target's answer (at most 256 bytes), for failures. Shared by the
    /// sends of a batch that failed together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub response_excerpt: Option<Arc<str>>,
    /// What went wrong (for the last attempt of a dead send, why it was given up on), at most
    /// 512 bytes. Shared by the sends of a batch that failed together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub error: Option<Arc<str>>,
}

/// When a delivery attempt started and how long it took: given with the settlement of an
/// attempt (a settlement without one moved sends without attempting them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempted {
    /// When it started, by the wall clock.
    pub started_at: SystemTime,
    /// How long it took.
    pub took: Duration,
}

/// `text` cut to at most `max` bytes, on a character boundary, marked when cut.
fn bounded(text: &str, max: usize) -> Arc<str> {
    if text.len() <= max {
        return Arc::from(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Arc::from(format!("{}…", &text[..end]))
}

/// The same text shared: the sends of a batch that failed together keep one copy.
#[derive(Default)]
struct Shared(Option<(String, Arc<str>)>);

impl Shared {
    fn get(&mut self, text: &str, max: usize) -> Arc<str> {
        match &self.0 {
            Some((seen, shared)) if seen == text => shared.clone(),
            _ => {
                let shared = bounded(text, max);
                self.0 = Some((text.to_owned(), shared.clone()));
                shared
            }
        }
    }
}

impl Settlement {
    /// The attempts this settlement ends that failed, each with the send it was for: what a
    /// queue backend adds to the sends' logs. Nothing for a settlement that attempted nothing
    /// (sends held back, or given up on at shutdown).
    pub fn failed_attempts(&self) -> Vec<(EventId, Attempt)> {
        let Some(attempted) = self.attempted else {
            return Vec::new();
        };
        let retried = self
            .retry
            .iter()
            .flat_map(|retry| &retry.sends)
            // Without an error a send was held back behind another, not attempted.
            .filter(|settled| settled.error.is_some())
            .map(|settled| (settled, AttemptOutcome::Retry));
        let dead = self
            .dead
            .iter()
            .map(|settled| (settled, AttemptOutcome::Failed));
        let (mut excerpts, mut errors) = (Shared::default(), Shared::default());
        retried
            .chain(dead)
            .map(|(settled, outcome)| {
                let response = settled.response.as_deref();
                let attempt = Attempt {
                    number: settled.envelope.attempts,
                    started_at: attempted.started_at,
                    duration_ms: Some(attempted.took.as_millis() as u64),
                    outcome,
                    status_code: response.and_then(|r| r.status),
                    response_excerpt: response
                        .and_then(|r| r.body_excerpt.as_deref())
                        .map(|excerpt| excerpts.get(excerpt, MAX_LOGGED_EXCERPT)),
                    error: settled
                        .error
                        .as_deref()
                        .map(|error| errors.get(error, MAX_LOGGED_ERROR)),
                };
                (settled.envelope.id, attempt)
            })
            .collect()
    }
}

/// Add `attempt` to a log, keeping the first attempt and the newest after it,
/// [`MAX_LOGGED_ATTEMPTS`] in all.
pub fn log_attempt(log: &mut Vec<Attempt>, attempt: Attempt) {
    log.push(attempt);
    if log.len() > MAX_LOGGED_ATTEMPTS {
        let excess = log.len() - MAX_LOGGED_ATTEMPTS;
        log.drain(1..=excess);
    }
}

impl SendStatus {
    /// This status with its attempt log: the failed attempts a backend kept, then, for a
    /// delivered send, the attempt that delivered it (read from the status itself).
    #[must_use]
    pub fn with_attempts(mut self, mut failed: Vec<Attempt>) -> Self {
        if self.state == State::Delivered && self.attempts > 0 {
            let took = self.response.as_ref().map(|r| r.elapsed_ms);
            let started_at = took
                .and_then(|ms| self.updated_at.checked_sub(Duration::from_millis(ms)))
                .unwrap_or(self.updated_at);
            failed.push(Attempt {
                number: self.attempts,
                started_at,
                duration_ms: took,
                outcome: AttemptOutcome::Delivered,
                status_code: self.response.as_ref().and_then(|r| r.status),
                response_excerpt: None,
                error: None,
            });
        }
        self.attempts_log = Some(failed);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let text = "é".repeat(1000);
        let cut = bounded(&text, 11);
        assert_eq!(&*cut, format!("{}…", "é".repeat(5)));
        assert_eq!(&*bounded("short", 11), "short");
    }

    #[test]
    fn a_log_keeps_the_first_attempt_and_the_newest() {
        let mut log = Vec::new();
        for number in 1..=25 {
            log_attempt(
                &mut log,
                Attempt {
                    number,
                    started_at: SystemTime::UNIX_EPOCH,
                    duration_ms: None,
                    outcome: AttemptOutcome::Retry,
                    status_code: None,
                    response_excerpt: None,
                    error: None,
                },
            );
        }
        assert_eq!(log.len(), MAX_LOGGED_ATTEMPTS);
        let numbers: Vec<u32> = log.iter().map(|a| a.number).collect();
        assert_eq!(numbers, [1, 17, 18, 19, 20, 21, 22, 23, 24, 25]);
    }
}
