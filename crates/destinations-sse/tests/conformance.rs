//! The shared conformance suite on every queue. The sink is the hub's own streams: a send is
//! delivered once it is in its stream, for every subscriber and for replay; what a stream
//! holds is read as a new subscriber would be replayed it.

use async_trait::async_trait;
use destinations_core::{Hub, Typed};
use destinations_sse::SseDestination;
use destinations_testkit::conformance::{self, Capabilities, ConformanceTarget, SinkBehaviour};
use serde_json::json;

const STREAM: &str = "conformance";

/// The hubs of the current case (a restart makes two).
struct Streams {
    hubs: Vec<Hub>,
}

#[async_trait]
impl ConformanceTarget for Streams {
    fn kind(&self) -> &'static str {
        destinations_sse::KIND
    }

    /// Publishing to a stream has no receiver to fail; it keeps the order sent.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            failures: false,
            ordered: true,
            ..Capabilities::default()
        }
    }

    async fn start_sink(&mut self, behaviour: SinkBehaviour) -> serde_json::Value {
        assert_eq!(
            behaviour,
            SinkBehaviour::Accept,
            "streams cannot be told to fail"
        );
        self.hubs.clear();
        // Replay holds the whole burst, so it can be counted.
        json!({ "replay": 20_000, "replay_bytes": 64 << 20 })
    }

    async fn attach(&mut self, hub: &Hub) {
        self.hubs.push(hub.clone());
    }

    fn payload(&self, marker: u64) -> serde_json::Value {
        json!({ "channel": "conformance", "stream": STREAM, "payload": { "marker": marker } })
    }

    fn invalid_payload(&self) -> (serde_json::Value, &'static str) {
        (json!({ "channel": "two words", "payload": 1 }), "channel")
    }

    async fn accepted_markers(&self) -> Vec<u64> {
        let mut markers = Vec::new();
        for hub in &self.hubs {
            for (_, destination) in hub.instances_of::<Typed<SseDestination>>() {
                for frame in destination.recent(STREAM) {
                    let text = String::from_utf8_lossy(&frame).into_owned();
                    let data = text.lines().find_map(|l| l.strip_prefix("data: "));
                    let value: serde_json::Value =
                        serde_json::from_str(data.unwrap_or_default()).unwrap_or_default();
                    markers.extend(value["marker"].as_u64());
                }
            }
        }
        markers
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    conformance::run_all(&mut Streams { hubs: Vec::new() }).await;
}
