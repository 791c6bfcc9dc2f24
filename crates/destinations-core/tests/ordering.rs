//! Ordered delivery: each sequence's sends are attempted one at a time in the order accepted,
//! and a send waiting for its retry holds the ones behind it — other sequences go on, to other
//! hosts and (ordered by key) to the same host. On a paused clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{HubConfig, RetryPolicy};

mod common;
use common::{delivered, host_of, marker_of, send};

/// What names a send's sequence.
#[derive(Clone, Copy)]
enum Sequences {
    /// Its host (the default of an ordered destination).
    PerHost,
    /// Its host and its `key`; a send without a key keeps no order.
    PerKey,
}

/// Orders by `sequences`; fails each attempt of a (line, marker) in `fail` while its count
/// lasts — the line being the host, or the key — and counts the attempts under way at once.
struct Ordered {
    sequences: Sequences,
    fail: Mutex<HashMap<(String, u64), u32>>,
    /// (line, marker, delivered) of each attempt, in the order made.
    attempts: Mutex<Vec<(String, u64, bool)>>,
    under_way: AtomicUsize,
    most_at_once: AtomicUsize,
    /// A (line, marker) whose first attempt hangs for ten minutes.
    hang: Option<(String, u64)>,
}

impl Ordered {
    fn new(sequences: Sequences, fail: &[(&str, u64, u32)]) -> Arc<Self> {
        Arc::new(Self::unshared(sequences, fail))
    }

    fn unshared(sequences: Sequences, fail: &[(&str, u64, u32)]) -> Self {
        Self {
            sequences,
            fail: Mutex::new(
                fail.iter()
                    .map(|(line, marker, times)| (((*line).to_owned(), *marker), *times))
                    .collect(),
            ),
            attempts: Mutex::new(Vec::new()),
            under_way: AtomicUsize::new(0),
            most_at_once: AtomicUsize::new(0),
            hang: None,
        }
    }

    fn line_of(&self, payload: &[u8]) -> String {
        match self.sequences {
            Sequences::PerHost => host_of(payload),
            Sequences::PerKey => key_of(payload).unwrap_or_default(),
        }
    }

    /// (marker, delivered) of each attempt of `line`, in the order made.
    fn attempts_of(&self, line: &str) -> Vec<(u64, bool)> {
        self.attempts()
            .iter()
            .filter(|(l, _, _)| l == line)
            .map(|(_, marker, ok)| (*marker, *ok))
            .collect()
    }

    /// The markers of `line` delivered, in the order delivered.
    fn delivered_of(&self, line: &str) -> Vec<u64> {
        self.attempts_of(line)
            .into_iter()
            .filter(|(_, ok)| *ok)
            .map(|(marker, _)| marker)
            .collect()
    }

    fn attempts(&self) -> Vec<(String, u64, bool)> {
        self.attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether every attempt of `other` came before `line`'s `marker` got through.
    fn finished_before(&self, other: &str, line: &str, marker: u64) -> bool {
        let attempts = self.attempts();
        let other_done = attempts.iter().rposition(|(l, _, _)| l == other);
        let through = attempts
            .iter()
            .position(|(l, m, ok)| l == line && *m == marker && *ok);
        other_done < through
    }
}

fn key_of(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(payload).ok()?["key"]
        .as_str()
        .map(str::to_owned)
}

#[async_trait]
impl Destination for Ordered {
    fn kind(&self) -> &'static str {
        "ordered"
    }

    fn validate(&self, _: &[u8]) -> Result<(), InvalidPayload> {
        Ok(())
    }

    fn target(&self, payload: &[u8]) -> Option<String> {
        Some(host_of(payload))
    }

    fn per_target_concurrency(&self) -> Option<usize> {
        Some(64)
    }

    fn ordered(&self) -> bool {
        true
    }

    fn sequence(&self, payload: &[u8]) -> Option<String> {
        match self.sequences {
            Sequences::PerHost => self.target(payload),
            Sequences::PerKey => Some(format!("{}/{}", host_of(payload), key_of(payload)?)),
        }
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let payload = &batch.envelopes()[0].payload;
        let (line, marker) = (self.line_of(payload), marker_of(payload));
        let now = self.under_way.fetch_add(1, SeqCst) + 1;
        self.most_at_once.fetch_max(now, SeqCst);
        // Each attempt takes a while, so that later sends are ready while it is under way.
        let hangs = self.hang.as_ref() == Some(&(line.clone(), marker))
            && !self
                .attempts()
                .iter()
                .any(|(l, m, _)| *l == line && *m == marker);
        let takes = if hangs {
            Duration::from_secs(600)
        } else {
            Duration::from_millis(10)
        };
        tokio::time::sleep(takes).await;
        self.under_way.fetch_sub(1, SeqCst);
        let failing = {
            let mut fail = self.fail.lock().unwrap_or_else(PoisonError::into_inner);
            match fail.get_mut(&(line.clone(), marker)) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    true
                }
                _ => false,
            }
        };
        self.attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((line, marker, !failing));
        if failing {
            BatchOutcome::All(Report::retry("503 Service Unavailable"))
        } else {
            BatchOutcome::All(Report::delivered())
        }
    }
}

fn hub(ordered: &Arc<Ordered>, first_retry: Duration) -> Hub {
    Hub::builder()
        .config(HubConfig::default())
        .destination(
            "d",
            ordered.clone(),
            InstanceSettings {
                retry: RetryPolicy {
                    initial_delay: first_retry,
                    ..RetryPolicy::default()
                },
                attempt_timeout: Some(Duration::from_secs(2 * 3600)),
                ..InstanceSettings::default()
            },
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Send `{host: "h", key, marker}` to instance `d`.
fn send_keyed(hub: &Hub, key: Option<&str>, marker: u64) -> EventId {
    let mut payload = serde_json::json!({ "host": "h", "marker": marker });
    if let Some(key) = key {
        payload["key"] = key.into();
    }
    hub.sender()
        .to("d", &payload)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// 0…9 delivered once each, but 3, which fails twice first.
fn with_3_retried_twice() -> Vec<(u64, bool)> {
    let mut expected: Vec<(u64, bool)> = (0..3).map(|m| (m, true)).collect();
    expected.extend([(3, false), (3, false), (3, true)]);
    expected.extend((4..10).map(|m| (m, true)));
    expected
}

#[tokio::test(start_paused = true)]
async fn each_hosts_sends_arrive_in_order_through_retries_and_other_hosts_go_on() {
    let ordered = Ordered::new(Sequences::PerHost, &[("a", 3, 2)]);
    let hub = hub(&ordered, Duration::from_secs(1));
    let ids: Vec<EventId> = (0..10u64)
        .flat_map(|marker| ["a", "b"].map(|host| send(&hub, host, marker)))
        .collect();
    delivered(&hub, &ids).await;
    assert_eq!(
        ordered.attempts_of("a"),
        with_3_retried_twice(),
        "a retry holds the ones behind it"
    );
    assert_eq!(
        ordered.attempts_of("b"),
        (0..10).map(|m| (m, true)).collect::<Vec<_>>(),
        "another host is not held"
    );
    assert!(
        ordered.finished_before("b", "a", 3),
        "b finished while a waited for its retry"
    );
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn each_keys_sends_arrive_in_order_through_retries_and_other_keys_to_the_same_host_go_on() {
    let ordered = Ordered::new(Sequences::PerKey, &[("a", 3, 2)]);
    let hub = hub(&ordered, Duration::from_secs(1));
    let ids: Vec<EventId> = (0..10u64)
        .flat_map(|marker| [Some("a"), Some("b"), None].map(|key| send_keyed(&hub, key, marker)))
        .collect();
    delivered(&hub, &ids).await;
    assert_eq!(
        ordered.attempts_of("a"),
        with_3_retried_twice(),
        "a retry holds the ones behind it"
    );
    assert_eq!(
        ordered.attempts_of("b"),
        (0..10).map(|m| (m, true)).collect::<Vec<_>>(),
        "another key's sends keep their own order"
    );
    assert!(
        ordered.finished_before("b", "a", 3),
        "key b, to the same host, finished while key a waited for its retry"
    );
    let most = ordered.most_at_once.load(SeqCst);
    assert!(
        most > 1,
        "sequences to one host go at once (at most {most} attempt at a time)"
    );
    hub.shutdown().await;
}

/// More sends behind key a's first than the dispatcher keeps waiting in memory.
const BEHIND: u64 = 5000;

/// Key a's sends 0…BEHIND, then key b's 0…9, all delivered.
async fn send_behind_then_other_key(hub: &Hub) {
    let mut ids: Vec<EventId> = (0..=BEHIND)
        .map(|marker| send_keyed(hub, Some("a"), marker))
        .collect();
    ids.extend((0..10).map(|marker| send_keyed(hub, Some("b"), marker)));
    delivered(hub, &ids).await;
}

#[tokio::test(start_paused = true)]
async fn a_long_retry_with_thousands_behind_it_holds_no_other_key_and_keeps_its_order() {
    // More sends behind key a's retry than the dispatcher keeps waiting in memory: they go
    // back to the queue in their places, and key b's sends, accepted after them, go on.
    let ordered = Ordered::new(Sequences::PerKey, &[("a", 0, 1)]);
    let hub = hub(&ordered, Duration::from_secs(600));
    send_behind_then_other_key(&hub).await;
    assert_eq!(
        ordered.delivered_of("a"),
        (0..=BEHIND).collect::<Vec<_>>(),
        "key a's sends arrive in the order accepted, once each"
    );
    assert_eq!(
        ordered.attempts_of("a").len() as u64,
        BEHIND + 2,
        "one failed attempt, then each once"
    );
    assert!(
        ordered.finished_before("b", "a", 0),
        "key b's sends went while key a waited ten minutes for its retry"
    );
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_hangs_with_thousands_behind_it_holds_no_other_key() {
    // Key a's first send hangs for ten minutes with more behind it than the dispatcher keeps
    // waiting in memory: they go back to the queue in their places, and key b's sends,
    // accepted after them, go on meanwhile.
    let ordered = Arc::new(Ordered {
        hang: Some(("a".to_owned(), 0)),
        ..Ordered::unshared(Sequences::PerKey, &[])
    });
    let hub = hub(&ordered, Duration::from_secs(1));
    send_behind_then_other_key(&hub).await;
    assert_eq!(
        ordered.delivered_of("a"),
        (0..=BEHIND).collect::<Vec<_>>(),
        "key a's sends arrive in the order accepted, once each"
    );
    assert!(
        ordered.finished_before("b", "a", 0),
        "key b's sends went while key a's first attempt hung"
    );
    hub.shutdown().await;
}
