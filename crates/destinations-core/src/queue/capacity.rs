//! How much the queue may hold: a bound per destination instance under a global one, and a
//! share of the global bound reserved for each instance, so that one instance that is down
//! (its sends retried for hours) cannot take the room every other instance needs.
//!
//! Each instance is charged at least its reserved share, used or not; the global bound caps
//! the sum of the charges. What is not reserved is an overflow any instance may borrow, up to
//! its own `max_events` / `max_bytes`. With the defaults, half the global bound is reserved,
//! split equally between the instances, and the other half is shared.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;

use super::QueueDepth;

/// Bounds of the whole queue (`[hub.queue]`): everything pending counts, retries included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueBounds {
    /// Most sends pending at once (default 1 000 000).
    pub max_events: usize,
    /// Most payload bytes pending at once (default 1 GiB).
    pub max_bytes: usize,
}

impl Default for QueueBounds {
    fn default() -> Self {
        Self {
            max_events: 1_000_000,
            max_bytes: 1 << 30,
        }
    }
}

/// One instance's part of the queue (`[destinations.NAME.queue]`); unset keys take the
/// defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceShare {
    /// Most sends this instance may have pending (default: the global bound).
    pub max_events: Option<usize>,
    /// Most payload bytes this instance may have pending (default: the global bound).
    pub max_bytes: Option<usize>,
    /// Sends always room for, whatever the other instances hold (default: half the global
    /// bound, split equally between the instances).
    pub reserved_events: Option<usize>,
    /// Payload bytes always room for (default as for events).
    pub reserved_bytes: Option<usize>,
}

/// What a bound counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Sends.
    Events,
    /// Payload bytes.
    Bytes,
}

impl Unit {
    fn noun(self) -> &'static str {
        match self {
            Self::Events => "sends",
            Self::Bytes => "payload bytes",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Bytes => "bytes",
        }
    }
}

/// Which bound was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullScope {
    /// The instance's own `max_events` / `max_bytes`.
    Instance,
    /// The global bound: the instance is past its reserved share and the shared room is in
    /// use.
    Shared,
}

/// No room: which instance, which bound, how full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapacityFull {
    /// The instance that asked.
    pub instance: String,
    /// What ran out.
    pub unit: Unit,
    /// Which bound.
    pub scope: FullScope,
    /// What is pending against that bound (for the shared bound: every instance's charge).
    pub pending: usize,
    /// The bound.
    pub limit: usize,
    /// What was asked for.
    pub asked: usize,
    /// The instance's reserved share.
    pub reserved: usize,
}

impl std::fmt::Display for CapacityFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (noun, key, instance) = (self.unit.noun(), self.unit.key(), &self.instance);
        match self.scope {
            FullScope::Instance => write!(
                f,
                "the queue is full for `{instance}`: {} {noun} pending, its limit is {}; this request needs {} more \
                 (it delivers slower than it is sent to; retry later, or raise destinations.{instance}.queue.max_{key})",
                self.pending, self.limit, self.asked
            ),
            FullScope::Shared => write!(
                f,
                "the queue is full: {} of its {} {noun} are pending or reserved, and `{instance}` is past its reserved \
                 share of {}; this request needs {} more (retry later, or raise hub.queue.max_{key} or \
                 destinations.{instance}.queue.reserved_{key})",
                self.pending, self.limit, self.reserved, self.asked
            ),
        }
    }
}

impl std::error::Error for CapacityFull {}

/// What one request asks of each instance: sends and bytes per capacity slot.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    entries: Vec<(usize, [usize; 2])>,
}

impl Tally {
    /// Count one send of `bytes` for the instance in `slot`.
    pub fn add(&mut self, slot: usize, bytes: usize) {
        self.add_many(slot, 1, bytes);
    }

    /// Count `events` sends of `bytes` in all for the instance in `slot`.
    pub fn add_many(&mut self, slot: usize, events: usize, bytes: usize) {
        match self.entries.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, counts)) => {
                counts[0] += events;
                counts[1] += bytes;
            }
            None => self.entries.push((slot, [events, bytes])),
        }
    }

    /// Whether nothing is counted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (slot, sends, bytes) for each instance counted.
    pub fn entries(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.entries.iter().map(|(s, [e, b])| (*s, *e, *b))
    }
}

struct Share {
    name: Arc<str>,
    max: [usize; 2],
    reserved: [usize; 2],
    used: [usize; 2],
}

impl Share {
    fn charge(&self, unit: usize, used: usize) -> usize {
        used.max(self.reserved[unit])
    }
}

struct State {
    shares: Vec<Share>,
    /// Σ max(used, reserved) per unit.
    charged: [usize; 2],
    /// Σ used per unit.
    used: [usize; 2],
}

const UNITS: [Unit; 2] = [Unit::Events, Unit::Bytes];

/// The queue's room, per instance and in all. Cheap to share behind an `Arc`.
pub struct Capacity {
    global: [usize; 2],
    state: Mutex<State>,
    room: Notify,
    waiting: AtomicUsize,
    /// Signalled when nothing is pending any more.
    empty: Notify,
}

impl Capacity {
    /// Room for these instances under `global`. Errors name the setting at fault.
    pub fn new(
        global: QueueBounds,
        instances: &[(Arc<str>, InstanceShare)],
    ) -> Result<Self, String> {
        let global = [global.max_events, global.max_bytes];
        let count = instances.len().max(1);
        let mut shares = Vec::with_capacity(instances.len());
        for (name, share) in instances {
            let max = [
                share.max_events.unwrap_or(global[0]),
                share.max_bytes.unwrap_or(global[1]),
            ];
            let mut reserved = [0, 0];
            for (unit, asked) in [share.reserved_events, share.reserved_bytes]
                .into_iter()
                .enumerate()
            {
                reserved[unit] = match asked {
                    Some(asked) if asked > max[unit] => {
                        let key = UNITS[unit].key();
                        return Err(format!(
                            "destinations.{name}.queue: reserved_{key} = {asked} is more than the instance's max_{key} = {}",
                            max[unit]
                        ));
                    }
                    Some(asked) => asked,
                    None => (global[unit] / 2 / count).min(max[unit]),
                };
            }
            shares.push(Share {
                name: name.clone(),
                max,
                reserved,
                used: [0, 0],
            });
        }
        let mut charged = [0, 0];
        for (unit, total) in charged.iter_mut().enumerate() {
            *total = shares.iter().map(|s| s.reserved[unit]).sum();
            if *total > global[unit] {
                let key = UNITS[unit].key();
                return Err(format!(
                    "the instances reserve {total} {} in all (queue.reserved_{key}), more than hub.queue.max_{key} = {}",
                    UNITS[unit].noun(),
                    global[unit]
                ));
            }
        }
        Ok(Self {
            global,
            state: Mutex::new(State {
                shares,
                charged,
                used: [0, 0],
            }),
            room: Notify::new(),
            waiting: AtomicUsize::new(0),
            empty: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot of an instance, for [`Tally::add`].
    pub fn slot(&self, instance: &str) -> Option<usize> {
        self.lock().shares.iter().position(|s| &*s.name == instance)
    }

    /// Take room for `tally` now, all or none.
    pub fn try_reserve(&self, tally: &Tally) -> Result<(), CapacityFull> {
        let mut state = self.lock();
        self.check(&state, tally)?;
        Self::apply(&mut state, tally, true);
        Ok(())
    }

    /// Take room for `tally`, waiting up to `wait` for deliveries to make it.
    pub async fn reserve(&self, tally: &Tally, wait: Duration) -> Result<(), CapacityFull> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let full = match self.try_reserve(tally) {
                Ok(()) => return Ok(()),
                Err(full) => full,
            };
            if !self.wait_until(room, deadline).await {
                return Err(full);
            }
        }
    }

    /// Wait up to `wait` until the instance in `slot` (any instance, for `None`) has room for
    /// at least one more send. Refuses with how full it is otherwise.
    pub async fn wait_for_room(
        &self,
        slot: Option<usize>,
        wait: Duration,
    ) -> Result<(), CapacityFull> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let full = {
                let state = self.lock();
                let slots: Vec<usize> = match slot {
                    Some(slot) => vec![slot],
                    None => (0..state.shares.len()).collect(),
                };
                let mut first = None;
                for slot in slots {
                    let mut one = Tally::default();
                    one.add(slot, 1);
                    match self.check(&state, &one) {
                        Ok(()) => return Ok(()),
                        Err(full) => {
                            first.get_or_insert(full);
                        }
                    }
                }
                match first {
                    Some(full) => full,
                    None => return Ok(()),
                }
            };
            if !self.wait_until(room, deadline).await {
                return Err(full);
            }
        }
    }

    /// Wait for room to be made, or the deadline; `false` at the deadline.
    async fn wait_until(
        &self,
        room: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        deadline: tokio::time::Instant,
    ) -> bool {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let woken = tokio::time::timeout_at(deadline, room).await.is_ok();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        woken
    }

    /// Count `tally` whatever the bounds say: sends the queue already holds (a durable
    /// backlog), or sends a delivery made, which must not wait on the room only settling makes.
    pub fn force(&self, tally: &Tally) {
        Self::apply(&mut self.lock(), tally, true);
    }

    /// Give back the room of `tally` (its sends were delivered, dead-lettered, or refused).
    pub fn release(&self, tally: &Tally) {
        if tally.is_empty() {
            return;
        }
        let emptied = {
            let mut state = self.lock();
            Self::apply(&mut state, tally, false);
            state.used[0] == 0
        };
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.room.notify_waiters();
        }
        if emptied {
            self.empty.notify_waiters();
        }
    }

    /// Wait until nothing is pending, or `deadline`; whether the queue is empty.
    pub async fn wait_empty(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let emptied = self.empty.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.depth().events == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return self.depth().events == 0;
            }
        }
    }

    fn check(&self, state: &State, tally: &Tally) -> Result<(), CapacityFull> {
        let mut charged = state.charged;
        for (slot, counts) in &tally.entries {
            let Some(share) = state.shares.get(*slot) else {
                continue;
            };
            for (unit, asked) in counts.iter().enumerate() {
                let after = share.used[unit].saturating_add(*asked);
                if after > share.max[unit] {
                    return Err(CapacityFull {
                        instance: share.name.to_string(),
                        unit: UNITS[unit],
                        scope: FullScope::Instance,
                        pending: share.used[unit],
                        limit: share.max[unit],
                        asked: *asked,
                        reserved: share.reserved[unit],
                    });
                }
                charged[unit] = charged[unit] - share.charge(unit, share.used[unit])
                    + share.charge(unit, after);
            }
        }
        for (unit, total) in charged.iter().enumerate() {
            if *total > self.global[unit] {
                // Name the instance that asks beyond its reserved share.
                let (slot, counts) = tally
                    .entries
                    .iter()
                    .find(|(slot, counts)| {
                        state.shares.get(*slot).is_some_and(|s| {
                            s.used[unit] + counts[unit] > s.reserved[unit] && counts[unit] > 0
                        })
                    })
                    .or(tally.entries.first())
                    .copied()
                    .unwrap_or((0, [0, 0]));
                let share = state.shares.get(slot);
                return Err(CapacityFull {
                    instance: share.map(|s| s.name.to_string()).unwrap_or_default(),
                    unit: UNITS[unit],
                    scope: FullScope::Shared,
                    pending: state.charged[unit],
                    limit: self.global[unit],
                    asked: counts[unit],
                    reserved: share.map_or(0, |s| s.reserved[unit]),
                });
            }
        }
        Ok(())
    }

    fn apply(state: &mut State, tally: &Tally, add: bool) {
        for (slot, counts) in &tally.entries {
            let Some(share) = state.shares.get(*slot) else {
                continue;
            };
            let mut used = share.used;
            for (unit, n) in counts.iter().enumerate() {
                let before = share.charge(unit, used[unit]);
                used[unit] = if add {
                    used[unit].saturating_add(*n)
                } else {
                    debug_assert!(used[unit] >= *n, "released more than was reserved");
                    used[unit].saturating_sub(*n)
                };
                let after = share.charge(unit, used[unit]);
                state.charged[unit] = state.charged[unit] - before + after;
                let applied = if add {
                    used[unit] - share.used[unit]
                } else {
                    share.used[unit] - used[unit]
                };
                state.used[unit] = if add {
                    state.used[unit].saturating_add(applied)
                } else {
                    state.used[unit].saturating_sub(applied)
                };
            }
            if let Some(share) = state.shares.get_mut(*slot) {
                share.used = used;
            }
        }
    }

    /// What is pending in all.
    pub fn depth(&self) -> QueueDepth {
        let used = self.lock().used;
        QueueDepth {
            events: used[0],
            bytes: used[1],
        }
    }

    /// What is pending per instance, with each instance's name.
    pub fn depths(&self) -> Vec<(Arc<str>, QueueDepth)> {
        self.lock()
            .shares
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    QueueDepth {
                        events: s.used[0],
                        bytes: s.used[1],
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(global: usize, shares: &[(&str, InstanceShare)]) -> Capacity {
        let shares: Vec<_> = shares.iter().map(|(n, s)| (Arc::from(*n), *s)).collect();
        Capacity::new(
            QueueBounds {
                max_events: global,
                max_bytes: usize::MAX / 4,
            },
            &shares,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn tally(slot: usize, events: usize) -> Tally {
        let mut t = Tally::default();
        t.add_many(slot, events, events);
        t
    }

    #[test]
    fn a_stuck_instance_cannot_take_the_room_reserved_for_the_others() {
        // 100 in all, two instances: 25 reserved each, 50 shared.
        let c = capacity(
            100,
            &[
                ("stuck", InstanceShare::default()),
                ("ok", InstanceShare::default()),
            ],
        );
        assert!(
            c.try_reserve(&tally(0, 75)).is_ok(),
            "its share and all the overflow"
        );
        let full = c.try_reserve(&tally(0, 1)).unwrap_err();
        assert_eq!(
            (full.scope, full.instance.as_str()),
            (FullScope::Shared, "stuck")
        );
        assert!(
            full.to_string()
                .contains("`stuck` is past its reserved share of 25"),
            "{full}"
        );
        assert!(
            c.try_reserve(&tally(1, 25)).is_ok(),
            "the other still has its 25"
        );
        assert!(c.try_reserve(&tally(1, 1)).is_err());
        c.release(&tally(0, 75));
        assert!(
            c.try_reserve(&tally(1, 50)).is_ok(),
            "the overflow is back for anyone"
        );
        assert_eq!(c.depth().events, 75);
    }

    #[test]
    fn an_instance_bound_names_the_instance_and_its_setting() {
        let c = capacity(
            100,
            &[(
                "s3",
                InstanceShare {
                    max_events: Some(10),
                    ..InstanceShare::default()
                },
            )],
        );
        assert!(c.try_reserve(&tally(0, 10)).is_ok());
        let full = c.try_reserve(&tally(0, 2)).unwrap_err();
        assert_eq!(full.scope, FullScope::Instance);
        assert!(
            full.to_string().contains(
                "full for `s3`: 10 sends pending, its limit is 10; this request needs 2 more"
            ),
            "{full}"
        );
        assert!(
            full.to_string()
                .contains("destinations.s3.queue.max_events")
        );
    }

    #[test]
    fn a_request_for_several_instances_is_all_or_nothing() {
        let c = capacity(
            10,
            &[
                ("a", InstanceShare::default()),
                (
                    "b",
                    InstanceShare {
                        max_events: Some(2),
                        ..InstanceShare::default()
                    },
                ),
            ],
        );
        let mut both = tally(0, 3);
        both.add_many(1, 3, 3);
        assert!(c.try_reserve(&both).is_err());
        assert_eq!(c.depth().events, 0, "nothing kept of a refused request");
    }

    #[test]
    fn reservations_beyond_the_global_bound_are_a_config_error() {
        let reserving = |n| InstanceShare {
            reserved_events: Some(n),
            ..InstanceShare::default()
        };
        let bounds = QueueBounds {
            max_events: 10,
            max_bytes: 10,
        };
        let shares = [
            (Arc::from("a"), reserving(6)),
            (Arc::from("b"), reserving(6)),
        ];
        let e = Capacity::new(bounds, &shares).err().unwrap_or_default();
        assert!(e.contains("reserve 12 sends in all (queue.reserved_events), more than hub.queue.max_events = 10"), "{e}");
        let e = Capacity::new(bounds, &[(Arc::from("a"), reserving(20))])
            .err()
            .unwrap_or_default();
        assert!(e.contains("destinations.a.queue: reserved_events = 20 is more than the instance's max_events = 10"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_room_up_to_its_bound() {
        let c = Arc::new(capacity(
            4,
            &[(
                "a",
                InstanceShare {
                    max_events: Some(2),
                    ..InstanceShare::default()
                },
            )],
        ));
        c.force(&tally(0, 2));
        let waiting = tokio::spawn({
            let c = c.clone();
            async move { c.reserve(&tally(0, 1), Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "waits while full");
        c.release(&tally(0, 1));
        assert!(matches!(waiting.await, Ok(Ok(()))), "room made → taken");
        let started = tokio::time::Instant::now();
        assert!(
            c.reserve(&tally(0, 1), Duration::from_secs(5))
                .await
                .is_err()
        );
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "refused at the bound"
        );
        assert!(c.wait_for_room(Some(0), Duration::ZERO).await.is_err());
        c.release(&tally(0, 2));
        assert!(c.wait_for_room(None, Duration::ZERO).await.is_ok());
    }
}
