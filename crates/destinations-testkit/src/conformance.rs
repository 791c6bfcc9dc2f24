//! One behaviour suite that every destination runs against a real sink: it delivers, retries a
//! transient failure, dead-letters a permanent one, rejects a bad payload naming the field,
//! flushes partial batches on shutdown, and loses nothing — counted.
//!
//! A destination's tests implement [`ConformanceTarget`] for their sink and call [`run_all`].

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use destinations_core::{
    EventId, Hub, HubConfig, InstanceConfig, Registry, SendError, SendStatus, State,
};
use serde_json::json;

/// How the sink behaves in one case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkBehaviour {
    /// Accept everything.
    Accept,
    /// Fail every send's first `n` attempts transiently, then accept.
    FailFirstAttempts(u32),
    /// Refuse everything permanently.
    RejectPermanently,
}

/// A destination under test, with a real sink it delivers to.
#[async_trait]
pub trait ConformanceTarget: Send + Sync {
    /// The destination kind.
    fn kind(&self) -> &'static str;
    /// Start a sink that behaves as asked; return the instance options that point at it.
    async fn start_sink(&mut self, behaviour: SinkBehaviour) -> serde_json::Value;
    /// A valid payload carrying `marker`, for the current sink.
    fn payload(&self, marker: u64) -> serde_json::Value;
    /// An invalid payload, and the field its error must name.
    fn invalid_payload(&self) -> (serde_json::Value, &'static str);
    /// The markers the sink accepted, duplicates included.
    async fn accepted_markers(&self) -> Vec<u64>;
}

/// Sends per case.
const SENDS: u64 = 40;
/// The instance name used by the suite.
const INSTANCE: &str = "target";

/// Run every case.
pub async fn run_all(target: &mut dyn ConformanceTarget) {
    delivers_every_send_once_or_more(target).await;
    retries_a_transient_failure(target).await;
    dead_letters_a_permanent_failure(target).await;
    rejects_a_bad_payload_naming_the_field(target).await;
    flushes_a_partial_batch_on_shutdown(target).await;
}

async fn hub_for(
    target: &mut dyn ConformanceTarget,
    behaviour: SinkBehaviour,
    extra: serde_json::Value,
) -> Hub {
    let mut table = target.start_sink(behaviour).await;
    let object = table
        .as_object_mut()
        .unwrap_or_else(|| panic!("start_sink must return a JSON object of options"));
    object.insert("kind".into(), json!(target.kind()));
    object.insert(
        "retry".into(),
        json!({"initial_delay": "5ms", "max_delay": "50ms", "max_attempts": 4}),
    );
    if let serde_json::Value::Object(extra) = extra {
        object.extend(extra);
    }
    let config = InstanceConfig::from_table(INSTANCE, table).unwrap_or_else(|e| panic!("{e}"));
    Hub::builder()
        .config(HubConfig::default())
        .configured(&Registry::linked(), INSTANCE, config)
        .unwrap_or_else(|e| {
            panic!("{e} (is the destination crate named by the test, so it is linked?)")
        })
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn send_all(target: &dyn ConformanceTarget, hub: &Hub) -> Vec<EventId> {
    let run = hub.begin_run("conformance");
    for marker in 0..SENDS {
        run.send()
            .to(INSTANCE, &target.payload(marker))
            .unwrap_or_else(|e| panic!("a valid payload was refused: {e}"));
    }
    run.finish().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn settle(hub: &Hub) {
    let report = hub.shutdown_within(Duration::from_secs(60)).await;
    assert_eq!(report.abandoned, 0, "shutdown had to abandon sends");
}

async fn status(hub: &Hub, id: EventId) -> SendStatus {
    hub.status(id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("send {id} has no status"))
}

async fn states(hub: &Hub, ids: &[EventId]) -> HashMap<State, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        let state = status(hub, *id).await.state;
        *counts.entry(state).or_insert(0) += 1;
    }
    counts
}

fn assert_each_marker_arrived(mut markers: Vec<u64>) {
    markers.sort_unstable();
    markers.dedup();
    assert_eq!(
        markers,
        (0..SENDS).collect::<Vec<_>>(),
        "every send must arrive (duplicates allowed)"
    );
}

/// Every accepted send arrives; every status says delivered.
pub async fn delivers_every_send_once_or_more(target: &mut dyn ConformanceTarget) {
    let hub = hub_for(target, SinkBehaviour::Accept, json!({})).await;
    let ids = send_all(target, &hub).await;
    settle(&hub).await;
    assert_eq!(
        states(&hub, &ids).await,
        HashMap::from([(State::Delivered, SENDS as usize)])
    );
    assert_each_marker_arrived(target.accepted_markers().await);
}

/// Transient failures are retried until the sink accepts.
pub async fn retries_a_transient_failure(target: &mut dyn ConformanceTarget) {
    let hub = hub_for(target, SinkBehaviour::FailFirstAttempts(2), json!({})).await;
    let ids = send_all(target, &hub).await;
    settle(&hub).await;
    assert_eq!(
        states(&hub, &ids).await,
        HashMap::from([(State::Delivered, SENDS as usize)])
    );
    for id in &ids {
        let status = status(&hub, *id).await;
        assert!(
            status.attempts >= 3,
            "{id} delivered after {} attempts, expected 3",
            status.attempts
        );
        assert!(status.last_error.is_some(), "the transient error is kept");
    }
    assert_each_marker_arrived(target.accepted_markers().await);
}

/// A permanent failure is dead-lettered after one attempt, with a reason.
pub async fn dead_letters_a_permanent_failure(target: &mut dyn ConformanceTarget) {
    let hub = hub_for(target, SinkBehaviour::RejectPermanently, json!({})).await;
    let ids = send_all(target, &hub).await;
    settle(&hub).await;
    assert_eq!(
        states(&hub, &ids).await,
        HashMap::from([(State::Dead, SENDS as usize)])
    );
    let letters = hub
        .dead_letters(usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(letters.len(), SENDS as usize);
    for letter in letters {
        assert_eq!(
            letter.envelope.attempts, 1,
            "a permanent failure is not retried"
        );
        assert!(!letter.reason.is_empty());
    }
    assert!(target.accepted_markers().await.is_empty());
}

/// A bad payload is refused at send time, naming the field; nothing is delivered.
pub async fn rejects_a_bad_payload_naming_the_field(target: &mut dyn ConformanceTarget) {
    let hub = hub_for(target, SinkBehaviour::Accept, json!({})).await;
    let (payload, field) = target.invalid_payload();
    let bytes = Bytes::from(serde_json::to_vec(&payload).unwrap_or_default());
    match hub.sender().json(INSTANCE, bytes) {
        Err(SendError::Invalid { error, .. }) => assert_eq!(error.field, field, "{error}"),
        other => panic!("expected an invalid-payload error naming `{field}`, got {other:?}"),
    }
    settle(&hub).await;
    assert!(target.accepted_markers().await.is_empty());
}

/// Sends waiting for a batch to fill are delivered at shutdown.
pub async fn flushes_a_partial_batch_on_shutdown(target: &mut dyn ConformanceTarget) {
    let hub = hub_for(
        target,
        SinkBehaviour::Accept,
        json!({"batch": {"max_events": 100_000, "max_bytes": 1_000_000_000, "max_age": "1h"}}),
    )
    .await;
    let ids = send_all(target, &hub).await;
    assert!(
        target.accepted_markers().await.is_empty(),
        "nothing is delivered before the batch fills or shutdown flushes it"
    );
    settle(&hub).await;
    assert_eq!(
        states(&hub, &ids).await,
        HashMap::from([(State::Delivered, SENDS as usize)])
    );
    assert_each_marker_arrived(target.accepted_markers().await);
}
