//! The shared conformance suite. The sink is an in-process listener subscribed to the emitter:
//! an emit is delivered once fanned out, and the listener's own delivery is a send of its own,
//! which the hub finishes before it stops — on the memory and SQLite queues. On the shared
//! queue a stopping hub leaves it to the other servers: the server's scale-out tests cover
//! emits across servers.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use destinations_core::Hub;
use destinations_testkit::conformance::{self, Capabilities, ConformanceTarget, SinkBehaviour};
use serde_json::json;

const EMITTER: &str = "conformance-emitter";

struct Listener {
    markers: Arc<Mutex<Vec<u64>>>,
}

#[async_trait]
impl ConformanceTarget for Listener {
    fn kind(&self) -> &'static str {
        destinations_emit::KIND
    }

    /// A fan-out succeeds whatever its listeners do (each listener's delivery is retried on its
    /// own): there is no failing sink for the emit itself.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            failures: false,
            shared_queue: false,
            ..Capabilities::default()
        }
    }

    async fn start_sink(&mut self, behaviour: SinkBehaviour) -> serde_json::Value {
        assert_eq!(
            behaviour,
            SinkBehaviour::Accept,
            "a fan-out cannot be told to fail"
        );
        self.markers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        json!({})
    }

    async fn attach(&mut self, hub: &Hub) {
        let markers = self.markers.clone();
        destinations_emit::listen(hub, "conformance", move |emitted| {
            let markers = markers.clone();
            async move {
                markers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(emitted.event_json()["marker"].as_u64());
                Ok(())
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        destinations_emit::subscribe(hub, EMITTER, "conformance", None)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn payload(&self, marker: u64) -> serde_json::Value {
        json!({ "event": { "marker": marker }, "emitter_id": EMITTER })
    }

    fn invalid_payload(&self) -> (serde_json::Value, &'static str) {
        (
            json!({ "event": { "marker": 0 }, "colour": "red" }),
            "colour",
        )
    }

    async fn accepted_markers(&self) -> Vec<u64> {
        self.markers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    conformance::run_all(&mut Listener {
        markers: Arc::default(),
    })
    .await;
}
