//! The bounded in-memory queue: fast, and lost when the process ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{Queue, QueueConsumer, QueueDepth, QueueFull, Refused};
use crate::envelope::Envelope;

/// Bounds of the in-memory queue. Everything pending counts, retries included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueCapacity {
    /// Most sends pending at once (default 1 000 000).
    pub max_events: usize,
    /// Most payload bytes pending at once (default 1 GiB).
    pub max_bytes: usize,
}

impl Default for QueueCapacity {
    fn default() -> Self {
        Self {
            max_events: 1_000_000,
            max_bytes: 1 << 30,
        }
    }
}

/// A bounded queue in memory: one channel per destination instance, one shared bound.
pub struct MemoryQueue {
    capacity: QueueCapacity,
    events: AtomicUsize,
    bytes: AtomicUsize,
    routes: Mutex<Option<HashMap<Arc<str>, mpsc::UnboundedSender<Envelope>>>>,
}

impl MemoryQueue {
    /// An empty queue with these bounds.
    pub fn new(capacity: QueueCapacity) -> Self {
        Self {
            capacity,
            events: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            routes: Mutex::new(Some(HashMap::new())),
        }
    }

    /// Reserve room for `asked` more in `counter`, or say how full it is.
    fn reserve(counter: &AtomicUsize, asked: usize, limit: usize) -> Result<(), (usize, usize)> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                pending.checked_add(asked).filter(|total| *total <= limit)
            })
            .map(drop)
            .map_err(|pending| (pending, asked))
    }
}

impl MemoryQueue {
    /// Reserve room for every envelope, or none and say why.
    fn admit(
        &self,
        routes: &HashMap<Arc<str>, mpsc::UnboundedSender<Envelope>>,
        envelopes: &[Envelope],
    ) -> Result<(), QueueFull> {
        if let Some(e) = envelopes
            .iter()
            .find(|e| !routes.contains_key(&e.destination))
        {
            return Err(QueueFull::NoConsumer(e.destination.to_string()));
        }
        let count = envelopes.len();
        let bytes: usize = envelopes.iter().map(Envelope::size).sum();
        Self::reserve(&self.events, count, self.capacity.max_events).map_err(
            |(pending, asked)| QueueFull::Events {
                pending,
                limit: self.capacity.max_events,
                asked,
            },
        )?;
        if let Err((pending, asked)) = Self::reserve(&self.bytes, bytes, self.capacity.max_bytes) {
            self.events.fetch_sub(count, Ordering::AcqRel);
            return Err(QueueFull::Bytes {
                pending,
                limit: self.capacity.max_bytes,
                asked,
            });
        }
        Ok(())
    }
}

impl Queue for MemoryQueue {
    fn enqueue(&self, envelopes: Vec<Envelope>) -> Result<(), Refused> {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(routes) = routes.as_ref() else {
            return Err(Refused {
                why: QueueFull::Closed,
                envelopes,
            });
        };
        if let Err(why) = self.admit(routes, &envelopes) {
            return Err(Refused { why, envelopes });
        }
        for envelope in envelopes {
            if let Some(route) = routes.get(&envelope.destination) {
                // The receiver lives as long as its dispatcher, which outlives `close`.
                let _ = route.send(envelope);
            }
        }
        Ok(())
    }

    fn consumer(&self, destination: &str) -> Box<dyn QueueConsumer> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(routes) = self
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            routes.insert(destination.into(), tx);
        }
        Box::new(MemoryConsumer { rx })
    }

    fn settle(&self, envelope: &Envelope) {
        self.events.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(envelope.size(), Ordering::AcqRel);
    }

    fn close(&self) {
        // Dropping the senders lets each consumer drain its channel and then end.
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn depth(&self) -> QueueDepth {
        QueueDepth {
            events: self.events.load(Ordering::Acquire),
            bytes: self.bytes.load(Ordering::Acquire),
        }
    }
}

struct MemoryConsumer {
    rx: mpsc::UnboundedReceiver<Envelope>,
}

#[async_trait]
impl QueueConsumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Envelope> {
        self.rx.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn envelope(to: &str, size: usize) -> Envelope {
        Envelope::new(to.into(), None, Bytes::from(vec![b'x'; size]))
    }

    #[tokio::test]
    async fn all_or_nothing_within_the_bounds() {
        let q = MemoryQueue::new(QueueCapacity {
            max_events: 3,
            max_bytes: 100,
        });
        let mut c = q.consumer("a");
        assert!(
            q.enqueue(vec![envelope("a", 10), envelope("a", 10)])
                .is_ok()
        );
        let refused = q
            .enqueue(vec![envelope("a", 10), envelope("a", 10)])
            .unwrap_err();
        assert_eq!(refused.envelopes.len(), 2, "refused envelopes come back");
        let full = refused.why;
        assert!(
            matches!(
                full,
                QueueFull::Events {
                    pending: 2,
                    limit: 3,
                    asked: 2
                }
            ),
            "{full}"
        );
        assert!(matches!(
            q.enqueue(vec![envelope("a", 90)]).map_err(|r| r.why),
            Err(QueueFull::Bytes { .. })
        ));
        assert_eq!(
            q.depth(),
            QueueDepth {
                events: 2,
                bytes: 20
            }
        );
        assert!(matches!(
            q.enqueue(vec![envelope("b", 1)]).map_err(|r| r.why),
            Err(QueueFull::NoConsumer(_))
        ));

        let first = c.next().await;
        q.settle(first.as_ref().unwrap_or_else(|| panic!("an envelope")));
        assert_eq!(
            q.depth(),
            QueueDepth {
                events: 1,
                bytes: 10
            }
        );
        q.close();
        assert!(matches!(
            q.enqueue(vec![envelope("a", 1)]).map_err(|r| r.why),
            Err(QueueFull::Closed)
        ));
        assert!(c.next().await.is_some(), "drains after close");
        assert!(c.next().await.is_none(), "then ends");
    }
}
