//! Named streams: the last N events of each, for replay and resume, and a bounded queue per
//! subscriber, so one slow reader can neither stall the others nor grow memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use metrics::{Counter, Gauge, counter, gauge};
use tokio::sync::mpsc;

/// One published event.
#[derive(Debug)]
pub(crate) struct Event {
    /// The send's id: the SSE `id:`.
    pub(crate) id: String,
    /// The event as it goes on the wire (`id:`, `event:`, `data:` lines and a blank line),
    /// written once when published and shared by every subscriber.
    pub(crate) frame: Bytes,
}

impl Event {
    /// An event with its frame. `channel` is one line (checked at send time); the data's line
    /// breaks (pretty-printed JSON) become `data:` lines, which a client joins back.
    /// An event from its frame as [`new`](Self::new) wrote it (heard from another server);
    /// `None` if the frame does not start with its `id:` line.
    pub(crate) fn from_frame(frame: Bytes) -> Option<Self> {
        let line = frame.split(|b| *b == b'\n').next()?;
        let id = std::str::from_utf8(line.strip_prefix(b"id: ")?)
            .ok()?
            .to_owned();
        Some(Self { id, frame })
    }

    pub(crate) fn new(id: String, channel: &str, data: &str) -> Self {
        let mut frame = String::with_capacity(id.len() + channel.len() + data.len() + 24);
        frame.push_str("id: ");
        frame.push_str(&id);
        frame.push_str("\nevent: ");
        frame.push_str(channel);
        frame.push('\n');
        for line in data.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
            frame.push_str("data: ");
            frame.push_str(line);
            frame.push('\n');
        }
        frame.push('\n');
        Self {
            id,
            frame: Bytes::from(frame),
        }
    }
}

/// A subscriber as the publisher sees it.
struct Subscriber {
    queue: mpsc::Sender<Arc<Event>>,
    /// Set when the subscriber fell a whole buffer behind and was cut off.
    overflowed: Arc<AtomicBool>,
}

struct Stream {
    recent: VecDeque<Arc<Event>>,
    /// The bytes `recent` holds.
    recent_bytes: usize,
    subscribers: Vec<Subscriber>,
    last_active: Instant,
}

/// The streams of one SSE instance.
pub(crate) struct Streams {
    by_name: Mutex<HashMap<String, Stream>>,
    replay: usize,
    replay_bytes: usize,
    subscriber_buffer: usize,
    max_streams: usize,
    max_subscribers: usize,
    subscribers: Arc<AtomicUsize>,
    pub(crate) metrics: SseMetrics,
}

/// What a new subscriber gets: the events to replay, then its live queue.
pub(crate) struct Subscription {
    pub(crate) replay: Vec<Arc<Event>>,
    pub(crate) live: mpsc::Receiver<Arc<Event>>,
    pub(crate) overflowed: Arc<AtomicBool>,
    /// Counts the subscriber until dropped.
    pub(crate) _seat: Seat,
}

/// One subscriber's place in the count; given back when dropped.
pub(crate) struct Seat {
    subscribers: Arc<AtomicUsize>,
    gauge: Gauge,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::AcqRel);
        self.gauge.decrement(1.0);
    }
}

/// Too many subscribers already.
#[derive(Debug)]
pub(crate) struct Full(pub(crate) usize);

impl Streams {
    pub(crate) fn new(
        instance: &str,
        replay: usize,
        replay_bytes: usize,
        subscriber_buffer: usize,
        max_streams: usize,
        max_subscribers: usize,
    ) -> Self {
        Self {
            by_name: Mutex::new(HashMap::new()),
            replay,
            replay_bytes,
            subscriber_buffer,
            max_streams,
            max_subscribers,
            subscribers: Arc::new(AtomicUsize::new(0)),
            metrics: SseMetrics::new(instance),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stream>> {
        self.by_name.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stream named `name`, made if new (forgetting the idlest unwatched one past the
    /// limit).
    fn stream<'a>(&self, streams: &'a mut HashMap<String, Stream>, name: &str) -> &'a mut Stream {
        if !streams.contains_key(name) && streams.len() >= self.max_streams {
            for stream in streams.values_mut() {
                stream.subscribers.retain(|s| !s.queue.is_closed());
            }
            // Streams nothing was published to go first (a client can make them by
            // subscribing to new names), then the idlest.
            let idlest = streams
                .iter()
                .filter(|(_, s)| s.subscribers.is_empty())
                .min_by_key(|(_, s)| (!s.recent.is_empty(), s.last_active))
                .map(|(n, _)| n.clone());
            if let Some(idlest) = idlest {
                streams.remove(&idlest);
            }
        }
        streams.entry(name.to_owned()).or_insert_with(|| Stream {
            recent: VecDeque::with_capacity(self.replay.min(1024)),
            recent_bytes: 0,
            subscribers: Vec::new(),
            last_active: Instant::now(),
        })
    }

    /// Keep the event for replay and hand it to every subscriber of the stream. A subscriber
    /// whose queue is full is cut off (it is told why when it reads on) instead of holding up
    /// the rest.
    pub(crate) fn publish(&self, name: &str, event: Event) {
        let event = Arc::new(event);
        let mut streams = self.lock();
        let stream = self.stream(&mut streams, name);
        stream.last_active = Instant::now();
        if self.replay > 0 && event.frame.len() <= self.replay_bytes {
            stream.recent_bytes += event.frame.len();
            stream.recent.push_back(event.clone());
            // An event larger than `replay_bytes` is delivered live but not kept (above):
            // keeping the newest whatever its size let every stream hold one payload over the
            // bound (review C6).
            while stream.recent.len() > self.replay || stream.recent_bytes > self.replay_bytes {
                if let Some(old) = stream.recent.pop_front() {
                    stream.recent_bytes -= old.frame.len();
                }
            }
        }
        let metrics = &self.metrics;
        stream.subscribers.retain(
            |subscriber| match subscriber.queue.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subscriber.overflowed.store(true, Ordering::Release);
                    metrics.dropped.increment(1);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
        );
        self.metrics.published.increment(1);
    }

    /// The events a new subscriber to `name` would be replayed now, oldest first.
    pub(crate) fn recent(&self, name: &str) -> Vec<Arc<Event>> {
        self.lock()
            .get(name)
            .map(|stream| stream.recent.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Subscribe to `name`: replay the events after `last_event_id` if the buffer still holds
    /// it, else every buffered event; then live ones. Taken under the same lock as `publish`,
    /// so nothing falls between the replay and the live queue, and nothing is in both.
    pub(crate) fn subscribe(
        &self,
        name: &str,
        last_event_id: Option<&str>,
    ) -> Result<Subscription, Full> {
        let taken = self.subscribers.fetch_add(1, Ordering::AcqRel);
        if taken >= self.max_subscribers {
            self.subscribers.fetch_sub(1, Ordering::AcqRel);
            return Err(Full(self.max_subscribers));
        }
        let seat = Seat {
            subscribers: self.subscribers.clone(),
            gauge: self.metrics.subscribers.clone(),
        };
        self.metrics.subscribers.increment(1.0);
        let (queue, live) = mpsc::channel(self.subscriber_buffer);
        let overflowed = Arc::new(AtomicBool::new(false));
        let mut streams = self.lock();
        let stream = self.stream(&mut streams, name);
        let after = last_event_id
            .and_then(|id| stream.recent.iter().position(|e| e.id == id))
            .map_or(0, |at| at + 1);
        let replay = stream.recent.iter().skip(after).cloned().collect();
        stream.subscribers.push(Subscriber {
            queue,
            overflowed: overflowed.clone(),
        });
        Ok(Subscription {
            replay,
            live,
            overflowed,
            _seat: seat,
        })
    }
}

/// What an SSE instance records.
#[derive(Clone)]
pub(crate) struct SseMetrics {
    pub(crate) subscribers: Gauge,
    pub(crate) published: Counter,
    pub(crate) delivered: Counter,
    pub(crate) dropped: Counter,
}

/// Subscribers connected, per destination instance.
pub const SUBSCRIBERS: &str = "destinations_sse_subscribers";
/// Events published to streams, per destination instance.
pub const EVENTS_PUBLISHED: &str = "destinations_sse_events_published_total";
/// Events written to subscribers (replays included), per destination instance.
pub const EVENTS_DELIVERED: &str = "destinations_sse_events_delivered_total";
/// Subscribers cut off for falling a whole buffer behind, per destination instance.
pub const SUBSCRIBERS_DROPPED: &str = "destinations_sse_subscribers_dropped_total";

impl SseMetrics {
    fn new(instance: &str) -> Self {
        let d = instance.to_owned();
        Self {
            subscribers: gauge!(SUBSCRIBERS, "destination" => d.clone()),
            published: counter!(EVENTS_PUBLISHED, "destination" => d.clone()),
            delivered: counter!(EVENTS_DELIVERED, "destination" => d.clone()),
            dropped: counter!(SUBSCRIBERS_DROPPED, "destination" => d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> Event {
        Event::new(format!("id-{n}"), "c", &n.to_string())
    }

    #[test]
    fn frames_carry_every_data_line() {
        let event = Event::new("1".into(), "tick", "{\n  \"a\": 1\r\n}");
        assert_eq!(
            event.frame,
            "id: 1\nevent: tick\ndata: {\ndata:   \"a\": 1\ndata: }\n\n"
        );
    }

    fn ids(events: &[Arc<Event>]) -> Vec<String> {
        events.iter().map(|e| e.id.clone()).collect()
    }

    #[test]
    fn an_event_over_the_byte_bound_is_not_kept_for_replay() {
        let streams = Streams::new("t", 100, 100, 8, 10, 10);
        streams.publish("s", event(1));
        streams.publish("s", Event::new("big".into(), "c", &"x".repeat(500)));
        let kept = streams
            .subscribe("s", None)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            ids(&kept.replay),
            ["id-1"],
            "the 500-byte event is delivered live, never held"
        );
    }

    #[test]
    fn replay_keeps_the_last_n_and_resumes_after_a_known_id() {
        let streams = Streams::new("t", 3, 1 << 20, 8, 10, 10);
        for n in 0..5 {
            streams.publish("s", event(n));
        }
        let all = streams
            .subscribe("s", None)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(ids(&all.replay), ["id-2", "id-3", "id-4"]);
        let after = streams
            .subscribe("s", Some("id-3"))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(ids(&after.replay), ["id-4"]);
        let unknown = streams
            .subscribe("s", Some("id-0"))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            unknown.replay.len(),
            3,
            "an id no longer held replays what is held"
        );
    }

    #[test]
    fn a_full_subscriber_is_cut_off_and_the_others_keep_receiving() {
        let streams = Streams::new("t", 0, 1 << 20, 2, 10, 10);
        let mut slow = streams
            .subscribe("s", None)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let mut fast = streams
            .subscribe("s", None)
            .unwrap_or_else(|e| panic!("{e:?}"));
        for n in 0..5 {
            streams.publish("s", event(n));
            assert_eq!(
                fast.live.try_recv().map(|e| e.id.clone()).ok(),
                Some(format!("id-{n}"))
            );
        }
        assert!(slow.overflowed.load(Ordering::Acquire));
        assert_eq!(
            slow.live.try_recv().map(|e| e.id.clone()).ok(),
            Some("id-0".into())
        );
        assert_eq!(
            slow.live.try_recv().map(|e| e.id.clone()).ok(),
            Some("id-1".into())
        );
        assert!(matches!(
            slow.live.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn subscribers_and_streams_are_bounded() {
        let streams = Streams::new("t", 1, 1 << 20, 1, 2, 2);
        let _a = streams
            .subscribe("a", None)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let b = streams
            .subscribe("b", None)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(
            streams.subscribe("c", None).is_err(),
            "two subscribers at most"
        );
        drop(b);
        streams.publish("c", event(1));
        let names: Vec<String> = streams.lock().keys().cloned().collect();
        assert_eq!(
            names.len(),
            2,
            "the unwatched stream `b` made room: {names:?}"
        );
        assert!(names.contains(&"a".to_owned()) && names.contains(&"c".to_owned()));
    }
}
