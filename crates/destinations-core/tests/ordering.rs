//! Ordered targets: each target's sends are attempted one at a time in the order accepted,
//! and a send waiting for its retry holds the ones behind it — other targets go on. On a
//! paused clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{HubConfig, RetryPolicy};

mod common;
use common::{delivered, host_of, marker_of, send};

/// Orders per host; fails each attempt of a marker in `fail` while its count lasts.
struct Ordered {
    fail: Mutex<HashMap<(String, u64), u32>>,
    /// (host, marker, delivered) of each attempt, in the order made.
    attempts: Mutex<Vec<(String, u64, bool)>>,
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

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let payload = &batch.envelopes()[0].payload;
        let (host, marker) = (host_of(payload), marker_of(payload));
        // Each attempt takes a while, so that later sends are ready while it is under way.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let failing = {
            let mut fail = self.fail.lock().unwrap_or_else(PoisonError::into_inner);
            match fail.get_mut(&(host.clone(), marker)) {
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
            .push((host, marker, !failing));
        if failing {
            BatchOutcome::All(Report::retry("503 Service Unavailable"))
        } else {
            BatchOutcome::All(Report::delivered())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn each_hosts_sends_arrive_in_order_through_retries_and_other_hosts_go_on() {
    let ordered = Arc::new(Ordered {
        fail: Mutex::new(HashMap::from([(("a".to_owned(), 3), 2)])),
        attempts: Mutex::new(Vec::new()),
    });
    let hub = Hub::builder()
        .config(HubConfig::default())
        .destination(
            "d",
            ordered.clone(),
            InstanceSettings {
                retry: RetryPolicy {
                    initial_delay: Duration::from_secs(1),
                    ..RetryPolicy::default()
                },
                ..InstanceSettings::default()
            },
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<EventId> = (0..10u64)
        .flat_map(|marker| ["a", "b"].map(|host| send(&hub, host, marker)))
        .collect();
    delivered(&hub, &ids).await;
    let attempts = ordered
        .attempts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let of = |host: &str| -> Vec<(u64, bool)> {
        attempts
            .iter()
            .filter(|(h, _, _)| h == host)
            .map(|(_, marker, ok)| (*marker, *ok))
            .collect()
    };
    let mut expected_a: Vec<(u64, bool)> = (0..3).map(|m| (m, true)).collect();
    expected_a.extend([(3, false), (3, false), (3, true)]);
    expected_a.extend((4..10).map(|m| (m, true)));
    assert_eq!(of("a"), expected_a, "a retry holds the ones behind it");
    assert_eq!(
        of("b"),
        (0..10).map(|m| (m, true)).collect::<Vec<_>>(),
        "another host is not held"
    );
    let b_done = attempts.iter().rposition(|(h, _, _)| h == "b").unwrap_or(0);
    let a_retry = attempts
        .iter()
        .position(|(h, m, ok)| h == "a" && *m == 3 && *ok)
        .unwrap_or(0);
    assert!(b_done < a_retry, "b finished while a waited for its retry");
    hub.shutdown().await;
}

/// Orders per (host, key): the payload's `key` names its sequence; a payload without one keeps
/// no order. Fails each attempt of a marker in `fail` while its count lasts, and counts the
/// attempts under way to the host at once.
struct Keyed {
    fail: Mutex<HashMap<(String, u64), u32>>,
    /// (key, marker, delivered) of each attempt, in the order made.
    attempts: Mutex<Vec<(String, u64, bool)>>,
    under_way: std::sync::atomic::AtomicUsize,
    most_at_once: std::sync::atomic::AtomicUsize,
}

fn key_of(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(payload).ok()?["key"]
        .as_str()
        .map(str::to_owned)
}

#[async_trait]
impl Destination for Keyed {
    fn kind(&self) -> &'static str {
        "keyed"
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
        Some(format!("{}/{}", host_of(payload), key_of(payload)?))
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        use std::sync::atomic::Ordering::SeqCst;
        let payload = &batch.envelopes()[0].payload;
        let (key, marker) = (key_of(payload).unwrap_or_default(), marker_of(payload));
        let now = self.under_way.fetch_add(1, SeqCst) + 1;
        self.most_at_once.fetch_max(now, SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await;
        self.under_way.fetch_sub(1, SeqCst);
        let failing = {
            let mut fail = self.fail.lock().unwrap_or_else(PoisonError::into_inner);
            match fail.get_mut(&(key.clone(), marker)) {
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
            .push((key, marker, !failing));
        if failing {
            BatchOutcome::All(Report::retry("503 Service Unavailable"))
        } else {
            BatchOutcome::All(Report::delivered())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn each_keys_sends_arrive_in_order_through_retries_and_other_keys_to_the_same_host_go_on() {
    let keyed = Arc::new(Keyed {
        fail: Mutex::new(HashMap::from([(("a".to_owned(), 3), 2)])),
        attempts: Mutex::new(Vec::new()),
        under_way: std::sync::atomic::AtomicUsize::new(0),
        most_at_once: std::sync::atomic::AtomicUsize::new(0),
    });
    let hub = Hub::builder()
        .config(HubConfig::default())
        .destination(
            "d",
            keyed.clone(),
            InstanceSettings {
                retry: RetryPolicy {
                    initial_delay: Duration::from_secs(1),
                    ..RetryPolicy::default()
                },
                ..InstanceSettings::default()
            },
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let send_keyed = |key: Option<&str>, marker: u64| {
        let mut payload = serde_json::json!({ "host": "h", "marker": marker });
        if let Some(key) = key {
            payload["key"] = key.into();
        }
        hub.sender()
            .to("d", &payload)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let ids: Vec<EventId> = (0..10u64)
        .flat_map(|marker| [Some("a"), Some("b"), None].map(|key| send_keyed(key, marker)))
        .collect();
    delivered(&hub, &ids).await;
    let attempts = keyed
        .attempts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let of = |key: &str| -> Vec<(u64, bool)> {
        attempts
            .iter()
            .filter(|(k, _, _)| k == key)
            .map(|(_, marker, ok)| (*marker, *ok))
            .collect()
    };
    let mut expected_a: Vec<(u64, bool)> = (0..3).map(|m| (m, true)).collect();
    expected_a.extend([(3, false), (3, false), (3, true)]);
    expected_a.extend((4..10).map(|m| (m, true)));
    assert_eq!(of("a"), expected_a, "a retry holds the ones behind it");
    assert_eq!(
        of("b"),
        (0..10).map(|m| (m, true)).collect::<Vec<_>>(),
        "another key's sends keep their own order"
    );
    let b_done = attempts.iter().rposition(|(k, _, _)| k == "b").unwrap_or(0);
    let a_retry = attempts
        .iter()
        .position(|(k, m, ok)| k == "a" && *m == 3 && *ok)
        .unwrap_or(0);
    assert!(
        b_done < a_retry,
        "key b, to the same host, finished while key a waited for its retry"
    );
    let most = keyed.most_at_once.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        most > 1,
        "sequences to one host go at once (at most {most} attempt at a time)"
    );
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_long_retry_with_thousands_behind_it_holds_no_other_key_and_keeps_its_order() {
    // More sends behind key a's retry than the dispatcher keeps waiting in memory: they go
    // back to the queue in their places, and key b's sends, accepted after them, go on.
    const BEHIND: u64 = 5000;
    let keyed = Arc::new(Keyed {
        fail: Mutex::new(HashMap::from([(("a".to_owned(), 0), 1)])),
        attempts: Mutex::new(Vec::new()),
        under_way: std::sync::atomic::AtomicUsize::new(0),
        most_at_once: std::sync::atomic::AtomicUsize::new(0),
    });
    let hub = Hub::builder()
        .config(HubConfig::default())
        .destination(
            "d",
            keyed.clone(),
            InstanceSettings {
                retry: RetryPolicy {
                    initial_delay: Duration::from_secs(600),
                    ..RetryPolicy::default()
                },
                ..InstanceSettings::default()
            },
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let send_keyed = |key: &str, marker: u64| {
        hub.sender()
            .to(
                "d",
                &serde_json::json!({ "host": "h", "key": key, "marker": marker }),
            )
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let mut ids: Vec<EventId> = (0..=BEHIND).map(|marker| send_keyed("a", marker)).collect();
    ids.extend((0..10).map(|marker| send_keyed("b", marker)));
    delivered(&hub, &ids).await;
    let attempts = keyed
        .attempts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let delivered_a: Vec<u64> = attempts
        .iter()
        .filter(|(k, _, ok)| k == "a" && *ok)
        .map(|(_, m, _)| *m)
        .collect();
    assert_eq!(
        delivered_a,
        (0..=BEHIND).collect::<Vec<_>>(),
        "key a's sends arrive in the order accepted, once each"
    );
    assert_eq!(
        attempts.iter().filter(|(k, _, _)| k == "a").count() as u64,
        BEHIND + 2,
        "one failed attempt, then each once"
    );
    let b_done = attempts.iter().rposition(|(k, _, _)| k == "b").unwrap_or(0);
    let a_retry = attempts
        .iter()
        .position(|(k, m, ok)| k == "a" && *m == 0 && *ok)
        .unwrap_or(0);
    assert!(
        b_done < a_retry,
        "key b's sends went while key a waited ten minutes for its retry"
    );
    hub.shutdown().await;
}
