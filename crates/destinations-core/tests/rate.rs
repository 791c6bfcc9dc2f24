//! Rate limits and a target's `Retry-After`: attempts are held back until their turn — spaced,
//! never failed — on a paused clock, so every time asserted is exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{HubConfig, RateLimit};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

mod common;
use common::{delivered, host_of, marker_of, send};

/// Records each attempt (when, to which host, which marker); names the host in the payload as
/// the target; answers the first attempt to each host in `busy_once` with a `Retry-After`.
struct Hosts {
    per_host_rate: Option<RateLimit>,
    busy_once: HashMap<&'static str, Duration>,
    attempts: Mutex<Vec<(Instant, String, u64)>>,
    /// Told of each attempt.
    attempted: Notify,
}

impl Hosts {
    fn new() -> Self {
        Self {
            per_host_rate: None,
            busy_once: HashMap::new(),
            attempts: Mutex::new(Vec::new()),
            attempted: Notify::new(),
        }
    }

    /// Wait until some attempt has been made.
    async fn first_attempt(&self) {
        loop {
            let attempted = self.attempted.notified();
            if !self
                .attempts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
            {
                return;
            }
            attempted.await;
        }
    }

    /// Each host's attempts, as offsets from `start`, in order.
    fn times(&self, start: Instant) -> HashMap<String, Vec<Duration>> {
        let mut times: HashMap<String, Vec<Duration>> = HashMap::new();
        for (at, host, _) in self
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            times.entry(host.clone()).or_default().push(*at - start);
        }
        times
    }
}

#[async_trait]
impl Destination for Hosts {
    fn kind(&self) -> &'static str {
        "hosts"
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

    fn per_target_rate_limit(&self) -> Option<RateLimit> {
        self.per_host_rate
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let envelope = &batch.envelopes()[0];
        let host = host_of(&envelope.payload);
        let marker = marker_of(&envelope.payload);
        let first_to_host = {
            let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
            let first = !attempts.iter().any(|(_, h, _)| *h == host);
            attempts.push((Instant::now(), host.clone(), marker));
            first
        };
        self.attempted.notify_waiters();
        match self.busy_once.get(host.as_str()) {
            Some(wait) if first_to_host => {
                BatchOutcome::All(Report::retry_after("429 Too Many Requests", Some(*wait)))
            }
            _ => BatchOutcome::All(Report::delivered()),
        }
    }
}

fn hub(destination: Arc<Hosts>, settings: InstanceSettings) -> Hub {
    Hub::builder()
        .config(HubConfig::default())
        .destination("d", destination, settings)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn delivered_first_time(hub: &Hub, ids: &[EventId]) {
    for status in delivered(hub, ids).await {
        assert_eq!(status.attempts, 1, "waiting for its turn cost an attempt");
    }
}

fn ms(list: &[u64]) -> Vec<Duration> {
    list.iter().copied().map(Duration::from_millis).collect()
}

#[tokio::test(start_paused = true)]
async fn an_instance_rate_limit_spaces_attempts_instead_of_failing_them() {
    let hosts = Arc::new(Hosts::new());
    let settings = InstanceSettings {
        rate_limit: Some(RateLimit::per_second(10.0)),
        ..InstanceSettings::default()
    };
    let hub = hub(hosts.clone(), settings);
    let start = Instant::now();
    // Two hosts: the instance's limit covers both.
    let ids: Vec<EventId> = (0..6)
        .map(|n| send(&hub, if n % 2 == 0 { "a" } else { "b" }, n))
        .collect();
    delivered_first_time(&hub, &ids).await;
    let mut all: Vec<Duration> = hosts.times(start).into_values().flatten().collect();
    all.sort();
    assert_eq!(
        all,
        ms(&[0, 100, 200, 300, 400, 500]),
        "one attempt each 100 ms, none sooner, none later"
    );
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_per_host_rate_limit_spaces_each_host_on_its_own_with_its_burst() {
    let hosts = Arc::new(Hosts {
        per_host_rate: Some(RateLimit::per_second(10.0).with_burst(2)),
        ..Hosts::new()
    });
    let hub = hub(hosts.clone(), InstanceSettings::default());
    let start = Instant::now();
    let ids: Vec<EventId> = (0..8)
        .map(|n| send(&hub, if n % 2 == 0 { "a" } else { "b" }, n))
        .collect();
    delivered_first_time(&hub, &ids).await;
    let times = hosts.times(start);
    for host in ["a", "b"] {
        assert_eq!(
            times[host],
            ms(&[0, 0, 100, 200]),
            "host {host}: a burst of two, then one each 100 ms"
        );
    }
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_holds_every_batch_for_that_host_and_only_that_host() {
    let hosts = Arc::new(Hosts {
        busy_once: HashMap::from([("a", Duration::from_secs(30))]),
        ..Hosts::new()
    });
    let hub = hub(hosts.clone(), InstanceSettings::default());
    let start = Instant::now();
    let first = send(&hub, "a", 0);
    // Once host a has said "not for 30 s", more for a and some for b.
    hosts.first_attempt().await;
    let ids = [
        first,
        send(&hub, "a", 1),
        send(&hub, "b", 2),
        send(&hub, "a", 3),
    ];
    delivered(&hub, &ids).await;
    let times = hosts.times(start);
    assert!(
        times["b"][0] < Duration::from_secs(1),
        "host b waited for host a's Retry-After: {:?}",
        times["b"]
    );
    let a = &times["a"];
    assert_eq!(
        a.len(),
        4,
        "the refused attempt, its retry, and the two others"
    );
    assert!(
        a[1..].iter().all(|t| *t >= Duration::from_secs(30)),
        "host a was sent to within its Retry-After: {a:?}"
    );
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_host_that_said_retry_after_to_one_instance_is_held_for_every_instance() {
    let told = Arc::new(Hosts {
        busy_once: HashMap::from([("a", Duration::from_secs(30))]),
        ..Hosts::new()
    });
    let other = Arc::new(Hosts::new());
    let hub = Hub::builder()
        .config(HubConfig::default())
        .destination("told", told.clone(), InstanceSettings::default())
        .destination("other", other.clone(), InstanceSettings::default())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let first = hub
        .sender()
        .to("told", &json!({ "host": "a", "marker": 0 }))
        .unwrap_or_else(|e| panic!("{e}"));
    told.first_attempt().await;
    let to_other = |host: &str, marker: u64| {
        hub.sender()
            .to("other", &json!({ "host": host, "marker": marker }))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let ids = [first, to_other("a", 1), to_other("b", 2)];
    delivered(&hub, &ids).await;
    let times = other.times(start);
    assert!(
        times["a"][0] >= Duration::from_secs(30),
        "another instance sent to host a within its Retry-After: {:?}",
        times["a"]
    );
    assert!(
        times["b"][0] < Duration::from_secs(1),
        "host b was held too: {:?}",
        times["b"]
    );
    hub.shutdown().await;
}
