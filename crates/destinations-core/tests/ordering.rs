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

    fn ordered_per_target(&self) -> bool {
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
