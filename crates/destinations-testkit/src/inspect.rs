//! What a test asks a hub, without the error plumbing: a status that must exist, a state that
//! may not, the dead letters.

use std::time::Duration;

use destinations_core::{DeadLetter, EventId, Hub, SendStatus, State};

/// The status of a send that must be known.
pub async fn status(hub: &Hub, id: EventId) -> SendStatus {
    hub.status(id)
        .await
        .unwrap_or_else(|e| panic!("status of {id}: {e}"))
        .unwrap_or_else(|| panic!("send {id} has no status"))
}

/// The state of a send, if it is known.
pub async fn state(hub: &Hub, id: EventId) -> Option<State> {
    hub.status(id)
        .await
        .unwrap_or_else(|e| panic!("status of {id}: {e}"))
        .map(|s| s.state)
}

/// The status of a send once final, or as it is after `timeout`.
pub async fn final_status(hub: &Hub, id: EventId, timeout: Duration) -> Option<SendStatus> {
    hub.wait_final(id, timeout)
        .await
        .unwrap_or_else(|e| panic!("status of {id}: {e}"))
}

/// Wait for each of `ids` to be final (up to `timeout` each) and require it delivered; the
/// test fails naming the first that is not, with its status. Their statuses, in order.
pub async fn delivered(hub: &Hub, ids: &[EventId], timeout: Duration) -> Vec<SendStatus> {
    let mut statuses = Vec::with_capacity(ids.len());
    for id in ids {
        let status = final_status(hub, *id, timeout)
            .await
            .unwrap_or_else(|| panic!("send {id} has no status"));
        assert_eq!(status.state, State::Delivered, "{status:?}");
        statuses.push(status);
    }
    statuses
}

/// Every dead letter, newest first.
pub async fn dead_letters(hub: &Hub) -> Vec<DeadLetter> {
    hub.dead_letters(usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("dead letters: {e}"))
}
