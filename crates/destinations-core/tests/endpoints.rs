//! Targets that fail or push back: a failing one is paused (its sends wait unattempted and
//! arrive once it answers again), an operator pauses and resumes one by hand, and a target's
//! limit of attempts at once adapts to how it answers. On a paused clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use destinations_core::prelude::*;
use destinations_core::{EndpointChange, HubConfig, PausePolicy, ResponseSummary, RetryPolicy};
use tokio::time::Instant;

mod common;
use common::{final_status, host_of, send};

/// Names the host in the payload as the target. A host in `down` fails (could not connect)
/// until `up_at`; every host answers 429 while `push_back`; each attempt takes `round_trip`.
struct Hosts {
    down: Mutex<HashMap<String, Instant>>,
    push_back: AtomicBool,
    adaptive: bool,
    per_host: usize,
    round_trip: Duration,
    attempts: Mutex<Vec<(Instant, String, bool)>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl Hosts {
    fn new() -> Self {
        Self {
            down: Mutex::new(HashMap::new()),
            push_back: AtomicBool::new(false),
            adaptive: false,
            per_host: 1,
            round_trip: Duration::from_millis(10),
            attempts: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        }
    }

    fn down_until(&self, host: &str, up_at: Instant) {
        self.down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(host.to_owned(), up_at);
    }

    /// Attempts to `host`: when, and whether it answered.
    fn attempts_to(&self, host: &str) -> Vec<(Instant, bool)> {
        self.attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, h, _)| h == host)
            .map(|(at, _, ok)| (*at, *ok))
            .collect()
    }

    /// The most attempts under way at once since the last call.
    fn take_most_in_flight(&self) -> usize {
        self.most_in_flight
            .swap(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst)
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
        Some(self.per_host)
    }

    fn adaptive_concurrency(&self) -> bool {
        self.adaptive
    }

    fn pause_policy(&self) -> Option<PausePolicy> {
        Some(PausePolicy::default())
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.round_trip).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let host = host_of(&batch.envelopes()[0].payload);
        let down = self
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&host)
            .is_some_and(|up_at| *up_at > Instant::now());
        let pushing_back = self.push_back.load(Ordering::SeqCst);
        self.attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((Instant::now(), host, !down && !pushing_back));
        let answer = |status| ResponseSummary {
            status,
            elapsed_ms: 10,
            body_excerpt: None,
            location: None,
        };
        if pushing_back {
            return BatchOutcome::All(
                Report::retry("429 Too Many Requests").with_response(answer(Some(429))),
            );
        }
        if down {
            return BatchOutcome::All(
                Report::retry("could not connect: connection refused").with_response(answer(None)),
            );
        }
        BatchOutcome::All(Report::delivered().with_response(answer(Some(200))))
    }
}

fn hub(destination: Arc<Hosts>, retry: RetryPolicy) -> Hub {
    Hub::builder()
        .config(HubConfig::default())
        .destination(
            "d",
            destination,
            InstanceSettings {
                retry,
                ..InstanceSettings::default()
            },
        )
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The changes heard: target, `paused` or `resumed`, and by whom.
type Heard = Arc<Mutex<Vec<(String, &'static str, &'static str)>>>;

fn changes(hub: &Hub) -> Heard {
    let told = Arc::new(Mutex::new(Vec::new()));
    let seen = told.clone();
    hub.on_endpoint_change(Arc::new(move |change: &EndpointChange| {
        seen.lock().unwrap_or_else(PoisonError::into_inner).push((
            change.target.clone(),
            change.change,
            change.by,
        ));
    }));
    told
}

#[tokio::test(start_paused = true)]
async fn a_failing_host_is_paused_its_sends_wait_unattempted_and_all_arrive_once_it_answers() {
    let hosts = Arc::new(Hosts::new());
    let start = Instant::now();
    let up_at = start + Duration::from_secs(20);
    hosts.down_until("down", up_at);
    // Three attempts each: without the pause, twenty sends to a host down for 20 s would all
    // be dead-lettered long before it came back.
    let retry = RetryPolicy {
        max_attempts: 3,
        ..RetryPolicy::default()
    };
    let hub = hub(hosts.clone(), retry);
    let told = changes(&hub);
    let down: Vec<EventId> = (0..20).map(|n| send(&hub, "down", n)).collect();
    let up: Vec<EventId> = (0..20).map(|n| send(&hub, "up", n)).collect();
    for id in &up {
        let status = final_status(&hub, *id).await;
        assert_eq!(
            status.state,
            State::Delivered,
            "another host is not held up"
        );
    }
    let mut tries = 0;
    for id in &down {
        let status = final_status(&hub, *id).await;
        assert_eq!(
            status.state,
            State::Delivered,
            "{id}: nothing is dead-lettered while the host is paused: {status:?}"
        );
        tries += status.attempts;
        // Held back while paused is no attempt: what it shows is its last attempt's error.
        match status.attempts {
            1 => assert_eq!(status.last_error, None, "{status:?}"),
            _ => assert!(
                status
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("connection refused")),
                "{status:?}"
            ),
        }
    }
    let attempts = hosts.attempts_to("down");
    let failed: Vec<Instant> = attempts
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(at, _)| *at)
        .collect();
    // Five failures pause it; then one probe per pause, each pause about twice as long.
    assert!(
        (5..=5 + 6).contains(&failed.len()),
        "{} failed attempts: {failed:?}",
        failed.len()
    );
    for pair in failed[5..].windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(800),
            "probes are a pause apart: {failed:?}"
        );
    }
    assert!(
        attempts.iter().all(|(at, ok)| *ok == (*at >= up_at)),
        "it answers once it is up"
    );
    assert_eq!(tries as usize, attempts.len(), "each attempt counted once");
    let told = told.lock().unwrap_or_else(PoisonError::into_inner).clone();
    assert_eq!(
        told.first(),
        Some(&("down".to_owned(), "paused", "failures"))
    );
    assert_eq!(
        told.last(),
        Some(&("down".to_owned(), "resumed", "failures"))
    );
    let view = hub
        .endpoints()
        .into_iter()
        .find(|e| e.target == "down")
        .expect("listed");
    assert_eq!(view.state, "open");
    assert_eq!(view.failures as usize, failed.len());
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_operator_pause_holds_every_send_unattempted_until_resumed() {
    let hosts = Arc::new(Hosts::new());
    let hub = hub(hosts.clone(), RetryPolicy::default());
    let told = changes(&hub);
    hub.pause_endpoint("a").unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<EventId> = (0..5).map(|n| send(&hub, "a", n)).collect();
    let other = send(&hub, "b", 0);
    assert_eq!(final_status(&hub, other).await.state, State::Delivered);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(
        hosts.attempts_to("a").is_empty(),
        "nothing goes to a paused host"
    );
    for id in &ids {
        let status = hub.status(*id).await.unwrap().unwrap();
        assert_eq!((status.state, status.attempts), (State::Queued, 0));
    }
    let view = hub
        .endpoints()
        .into_iter()
        .find(|e| e.target == "a")
        .unwrap();
    assert_eq!((view.state, view.paused_by), ("paused", Some("operator")));
    assert!(hub.resume_endpoint("a"));
    for id in &ids {
        let status = final_status(&hub, *id).await;
        assert_eq!((status.state, status.attempts), (State::Delivered, 1));
    }
    assert_eq!(
        *told.lock().unwrap_or_else(PoisonError::into_inner),
        [
            ("a".to_owned(), "paused", "operator"),
            ("a".to_owned(), "resumed", "operator")
        ]
    );
    assert!(!hub.resume_endpoint("a"), "nothing holds it back any more");
    hub.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hosts_limit_of_attempts_at_once_halves_when_it_pushes_back_and_grows_back() {
    let hosts = Arc::new(Hosts {
        adaptive: true,
        per_host: 16,
        ..Hosts::new()
    });
    let hub = hub(hosts.clone(), RetryPolicy::default());
    let limit = |hub: &Hub| {
        hub.endpoints()
            .into_iter()
            .find(|e| e.target == "a")
            .map_or(0, |e| e.concurrency["d"])
    };
    // A steady backlog: far more sends than the limit lets go at once.
    let ids: Vec<EventId> = (0..6000).map(|n| send(&hub, "a", n)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(limit(&hub), 16, "grows to its bound while the host answers");
    assert_eq!(hosts.take_most_in_flight(), 16, "and uses it");
    hosts.push_back.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pushed = limit(&hub);
    assert!(pushed <= 2, "halved each period it pushes back: {pushed}");
    hosts.take_most_in_flight();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        hosts.take_most_in_flight() <= pushed.max(2),
        "it gets no more than the limit"
    );
    hosts.push_back.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back = limit(&hub);
    assert!(
        back > pushed,
        "grows back once it answers: {pushed} -> {back}"
    );
    for id in ids {
        assert_eq!(final_status(&hub, id).await.state, State::Delivered);
    }
    hub.shutdown().await;
}
