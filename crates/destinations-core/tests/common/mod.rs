//! What the target tests share (rate limits, pauses, ordering, on a paused clock): a send
//! names its host (the target) and a marker, and goes to instance `d`.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use destinations_core::SendStatus;
use destinations_core::prelude::*;
use serde_json::{Value, json};

/// The host a stored send names.
pub fn host_of(payload: &[u8]) -> String {
    field(payload, "host")
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The marker a stored send carries.
pub fn marker_of(payload: &[u8]) -> u64 {
    field(payload, "marker").as_u64().unwrap_or_default()
}

fn field(payload: &[u8], name: &str) -> Value {
    serde_json::from_slice::<Value>(payload).unwrap_or_default()[name].take()
}

/// Send `{host, marker}` to instance `d`.
pub fn send(hub: &Hub, host: &str, marker: u64) -> EventId {
    hub.sender()
        .to("d", &json!({ "host": host, "marker": marker }))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The status of a send once final (a day is nothing on a paused clock).
pub async fn final_status(hub: &Hub, id: EventId) -> SendStatus {
    hub.wait_final(id, Duration::from_secs(24 * 3600))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("{id} unknown"))
}

/// Each of `ids` delivered; their statuses.
pub async fn delivered(hub: &Hub, ids: &[EventId]) -> Vec<SendStatus> {
    let mut statuses = Vec::new();
    for id in ids {
        let status = final_status(hub, *id).await;
        assert_eq!(status.state, State::Delivered, "{status:?}");
        statuses.push(status);
    }
    statuses
}
