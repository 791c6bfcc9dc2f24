//! The targets a hub delivers to (an HTTP destination's hosts), shared by every instance of
//! the hub: what each asked for (`Retry-After`), whether it is paused for failing, how many
//! attempts each instance gives it at once, and what its attempts came to. A host that told
//! one instance to wait, or that fails, is held back for all of them.
//!
//! Nothing runs in the background: the state changes when an attempt is admitted or ends,
//! or when an operator pauses or resumes a target. Dispatchers hear of the changes that may
//! let their waiting batches go.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::policy::SlidingCounts;
use crate::policy::{Breaker, BreakerGate, BreakerState, Health, PauseChange, PausePolicy};

/// The most targets remembered; past it the quiet ones attempted longest ago are forgotten
/// (a payload naming a million hosts must not grow the hub without end).
const REMEMBERED: usize = 10_000;

/// How far back the rates shown look.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// A target, by destination kind (two kinds may name different things alike) and name.
pub(crate) type EndpointKey = (&'static str, String);

/// The targets by kind, then name: looked up by `&str`, with no key built per attempt.
type Table = HashMap<&'static str, HashMap<String, Endpoint>>;

/// Whether an attempt may go to a target, as far as the hub-wide state is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EndpointGate {
    /// It goes (as the probe of a paused target if `probe`).
    Go { probe: bool },
    /// Not before this time (a `Retry-After`, a pause).
    WaitUntil(Instant),
    /// Until a change is heard (a probe under way, an operator's pause).
    Blocked,
}

/// How an attempt to a target ended.
pub(crate) struct AttemptEnd {
    pub(crate) instance: Arc<str>,
    pub(crate) health: Health,
    pub(crate) probe: bool,
    /// The target asked for no attempt before this long (`Retry-After`).
    pub(crate) hold: Option<Duration>,
    pub(crate) error: Option<String>,
    /// The instance's limit of attempts at once to it, after this one.
    pub(crate) limit: usize,
}

/// A target paused or resumed, as told to observers (the emit destination makes `$endpoints`
/// events of them).
#[derive(Clone, Debug, Serialize)]
pub struct EndpointChange {
    /// The destination kind that sends to it (`http`).
    pub kind: &'static str,
    /// The target (`host:port` for HTTP).
    pub target: String,
    /// `paused` or `resumed`.
    pub change: &'static str,
    /// `failures` or `operator`.
    pub by: &'static str,
    /// Until when it is paused (a pause after failures).
    #[serde(serialize_with = "crate::status::rfc3339_option")]
    pub paused_until: Option<SystemTime>,
    /// Attempts that failed in a row when it changed.
    pub failures_in_a_row: u32,
    /// The last error an attempt to it gave.
    pub last_error: Option<String>,
}

/// Told of each target paused or resumed. Runs where the change happens: keep it quick.
pub type EndpointObserver = Arc<dyn Fn(&EndpointChange) + Send + Sync>;

/// A target as `GET /v1/endpoints` shows it.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EndpointView {
    /// The destination kind that sends to it (`http`).
    pub kind: &'static str,
    /// The target (`host:port` for HTTP).
    pub target: String,
    /// `open`, `paused` or `probing`.
    pub state: &'static str,
    /// `failures` or `operator`, when not open.
    pub paused_by: Option<&'static str>,
    /// When its pause after failures ends (then one probe goes).
    #[serde(serialize_with = "crate::status::rfc3339_option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub paused_until: Option<SystemTime>,
    /// No attempt before this (it answered `Retry-After`).
    #[serde(serialize_with = "crate::status::rfc3339_option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub retry_after_until: Option<SystemTime>,
    /// Attempts at once each instance gives it now (its adaptive limit, or the fixed one).
    pub concurrency: BTreeMap<String, usize>,
    /// Attempts to it under way now.
    pub in_flight: usize,
    /// Attempts that failed in a row (could not connect, timed out, a server error).
    pub failures_in_a_row: u32,
    /// Attempts a second over the last minute, and those that failed.
    pub attempts_per_second: f64,
    /// Failed attempts a second over the last minute.
    pub failures_per_second: f64,
    /// Totals since it was first seen.
    pub attempts: u64,
    /// Failed attempts since it was first seen.
    pub failures: u64,
    /// The last error an attempt to it gave.
    pub last_error: Option<String>,
    /// When an attempt to it last ended.
    #[serde(serialize_with = "crate::status::rfc3339_option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
    pub last_attempt_at: Option<SystemTime>,
}

struct Endpoint {
    hold_until: Option<Instant>,
    breaker: Option<Breaker>,
    limits: HashMap<Arc<str>, usize>,
    in_flight: usize,
    recent: SlidingCounts,
    /// When it was first seen, for the rates of a target seen less than a window ago.
    seen_at: Instant,
    attempts: u64,
    failures: u64,
    last_error: Option<String>,
    last_attempt: Option<Instant>,
}

impl Endpoint {
    fn new(policy: Option<PausePolicy>, now: Instant) -> Self {
        Self {
            hold_until: None,
            breaker: policy.filter(|p| p.enabled).map(Breaker::new),
            limits: HashMap::new(),
            in_flight: 0,
            recent: SlidingCounts::new(RATE_WINDOW),
            seen_at: now,
            attempts: 0,
            failures: 0,
            last_error: None,
            last_attempt: None,
        }
    }

    /// Whether an attempt may go now; if it goes, it is counted under way.
    fn enter(&mut self, now: Instant) -> EndpointGate {
        if let Some(until) = self.hold_until {
            if until > now {
                return EndpointGate::WaitUntil(until);
            }
            self.hold_until = None;
        }
        let probe = match self.breaker.as_mut().map(|b| b.gate(now)) {
            None | Some(BreakerGate::Go) => false,
            Some(BreakerGate::Probe) => true,
            Some(BreakerGate::WaitUntil(until)) => return EndpointGate::WaitUntil(until),
            Some(BreakerGate::Blocked) => return EndpointGate::Blocked,
        };
        self.in_flight += 1;
        EndpointGate::Go { probe }
    }

    fn forgettable(&self, now: Instant) -> bool {
        self.in_flight == 0
            && self.hold_until.is_none_or(|until| until <= now)
            && self.breaker.as_ref().is_none_or(Breaker::is_quiet)
    }

    fn change(
        &self,
        (kind, target): (&'static str, &str),
        transition: PauseChange,
        by: &'static str,
    ) -> EndpointChange {
        let (change, paused_until) = match transition {
            PauseChange::Paused(pause) => ("paused", SystemTime::now().checked_add(pause)),
            PauseChange::Resumed => ("resumed", None),
        };
        EndpointChange {
            kind,
            target: target.to_owned(),
            change,
            by,
            paused_until,
            failures_in_a_row: self.breaker.as_ref().map_or(0, Breaker::failures_in_a_row),
            last_error: self.last_error.clone(),
        }
    }
}

/// The hub's targets.
pub(crate) struct Endpoints {
    entries: Mutex<Table>,
    changes: broadcast::Sender<EndpointKey>,
    observers: RwLock<Vec<EndpointObserver>>,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            changes: broadcast::channel(1024).0,
            observers: RwLock::default(),
        }
    }
}

impl Endpoints {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hear of targets whose state changed in a way that may let waiting batches go.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<EndpointKey> {
        self.changes.subscribe()
    }

    pub(crate) fn observe(&self, observer: EndpointObserver) {
        self.observers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(observer);
    }

    /// Whether an attempt may go to `target` of `kind` now; if it goes, it is counted under
    /// way (end it with [`ended`](Self::ended)).
    pub(crate) fn enter(
        &self,
        kind: &'static str,
        target: &str,
        policy: Option<PausePolicy>,
        now: Instant,
    ) -> EndpointGate {
        let mut entries = self.lock();
        // The usual case, a target seen before: one lookup, nothing built.
        if let Some(endpoint) = entries.get_mut(kind).and_then(|of| of.get_mut(target)) {
            return endpoint.enter(now);
        }
        if entries.values().map(HashMap::len).sum::<usize>() >= REMEMBERED {
            forget_quiet(&mut entries, now);
        }
        entries
            .entry(kind)
            .or_default()
            .entry(target.to_owned())
            .or_insert_with(|| Endpoint::new(policy, now))
            .enter(now)
    }

    /// An attempt let in by [`enter`](Self::enter) ended.
    pub(crate) fn ended(&self, kind: &'static str, target: &str, end: AttemptEnd, now: Instant) {
        let change = {
            let mut entries = self.lock();
            let Some(endpoint) = entries.get_mut(kind).and_then(|of| of.get_mut(target)) else {
                return;
            };
            endpoint.in_flight = endpoint.in_flight.saturating_sub(1);
            endpoint.limits.insert(end.instance, end.limit);
            endpoint.attempts += 1;
            endpoint.last_attempt = Some(now);
            let failing = end.health == Health::Failing;
            if failing {
                endpoint.failures += 1;
            }
            if end.error.is_some() {
                endpoint.last_error = end.error;
            }
            endpoint
                .recent
                .add(now, u32::from(!failing), u32::from(failing));
            if let Some(hold) = end.hold {
                let until = now + hold;
                endpoint.hold_until = Some(endpoint.hold_until.map_or(until, |h| h.max(until)));
            }
            let transition = endpoint
                .breaker
                .as_mut()
                .and_then(|breaker| breaker.ended(now, end.health, end.probe));
            // A probe that ended decides for the batches blocked behind it, either way.
            (transition.is_some() || end.probe)
                .then(|| transition.map(|t| endpoint.change((kind, target), t, "failures")))
        };
        if let Some(change) = change {
            self.tell((kind, target.to_owned()), change.as_ref());
        }
    }

    /// An operator paused `target` for every kind given (with its pause policy): nothing goes
    /// to it until an operator resumes it.
    pub(crate) fn pause_by_hand(&self, kinds: &[(&'static str, PausePolicy)], target: &str) {
        let now = Instant::now();
        let mut changes = Vec::new();
        {
            let mut entries = self.lock();
            for (kind, policy) in kinds {
                let endpoint = entries
                    .entry(kind)
                    .or_default()
                    .entry(target.to_owned())
                    .or_insert_with(|| Endpoint::new(Some(*policy), now));
                let breaker = endpoint
                    .breaker
                    .get_or_insert_with(|| Breaker::new(*policy));
                if !breaker.paused_by_hand() {
                    breaker.pause_by_hand();
                    let mut change = endpoint.change(
                        (kind, target),
                        PauseChange::Paused(Duration::ZERO),
                        "operator",
                    );
                    change.paused_until = None;
                    changes.push(((*kind, target.to_owned()), change));
                }
            }
        }
        for (key, change) in changes {
            self.tell(key, Some(&change));
        }
    }

    /// An operator resumed `target`: attempts go at once, its failures forgotten. Returns
    /// whether anything held it back.
    pub(crate) fn resume_by_hand(&self, target: &str) -> bool {
        let mut changes = Vec::new();
        {
            let mut entries = self.lock();
            for (kind, of) in entries.iter_mut() {
                let Some(endpoint) = of.get_mut(target) else {
                    continue;
                };
                let held = endpoint.hold_until.take().is_some();
                let paused = endpoint
                    .breaker
                    .as_mut()
                    .is_some_and(Breaker::resume_by_hand);
                if held || paused {
                    let change = endpoint.change((kind, target), PauseChange::Resumed, "operator");
                    changes.push(((*kind, target.to_owned()), change));
                }
            }
        }
        let any = !changes.is_empty();
        for (key, change) in changes {
            self.tell(key, Some(&change));
        }
        any
    }

    /// Wake the dispatchers waiting for `key` and tell the observers of the change.
    fn tell(&self, key: EndpointKey, change: Option<&EndpointChange>) {
        if let Some(change) = change {
            tracing::warn!(kind = change.kind, target = %change.target, change = change.change, by = change.by, last_error = ?change.last_error, "endpoint {}", change.change);
            let observers = self
                .observers
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            for observe in observers {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| observe(change)))
                    .is_err()
                {
                    tracing::error!("an endpoint observer panicked");
                }
            }
        }
        let _ = self.changes.send(key);
    }

    /// Every target remembered, by name.
    pub(crate) fn list(&self) -> Vec<EndpointView> {
        let now = Instant::now();
        let wall = SystemTime::now();
        // A monotonic instant as wall-clock time, either side of now.
        let at = |instant: Instant| {
            if instant >= now {
                wall.checked_add(instant - now)
            } else {
                wall.checked_sub(now - instant)
            }
        };
        let mut entries = self.lock();
        let mut views: Vec<EndpointView> = entries
            .iter_mut()
            .flat_map(|(kind, of)| of.iter_mut().map(move |(target, e)| (*kind, target, e)))
            .map(|(kind, target, e)| {
                let (state, paused_by, paused_until) = match &e.breaker {
                    Some(b) if b.paused_by_hand() => ("paused", Some("operator"), None),
                    Some(b) => match b.state() {
                        BreakerState::Open => ("open", None, None),
                        BreakerState::Paused { until } => ("paused", Some("failures"), at(until)),
                        BreakerState::Probing => ("probing", Some("failures"), None),
                    },
                    None => ("open", None, None),
                };
                let (answered, failing) = e.recent.totals(now);
                let span = (now - e.seen_at).clamp(Duration::from_secs(1), RATE_WINDOW);
                EndpointView {
                    kind,
                    target: target.clone(),
                    state,
                    paused_by,
                    paused_until,
                    retry_after_until: e.hold_until.filter(|u| *u > now).and_then(at),
                    concurrency: e.limits.iter().map(|(i, l)| (i.to_string(), *l)).collect(),
                    in_flight: e.in_flight,
                    failures_in_a_row: e.breaker.as_ref().map_or(0, Breaker::failures_in_a_row),
                    attempts_per_second: f64::from(answered + failing) / span.as_secs_f64(),
                    failures_per_second: f64::from(failing) / span.as_secs_f64(),
                    attempts: e.attempts,
                    failures: e.failures,
                    last_error: e.last_error.clone(),
                    last_attempt_at: e.last_attempt.and_then(at),
                }
            })
            .collect();
        views.sort_by(|a, b| (&a.target, a.kind).cmp(&(&b.target, b.kind)));
        views
    }
}

/// Forget the quiet targets attempted longest ago, down to nine in ten of what is remembered.
fn forget_quiet(entries: &mut Table, now: Instant) {
    let mut quiet: Vec<(Option<Instant>, &'static str, String)> = entries
        .iter()
        .flat_map(|(kind, of)| {
            of.iter()
                .filter(|(_, e)| e.forgettable(now))
                .map(|(target, e)| (e.last_attempt, *kind, target.clone()))
        })
        .collect();
    quiet.sort();
    let remembered: usize = entries.values().map(HashMap::len).sum();
    let excess = remembered.saturating_sub(REMEMBERED * 9 / 10);
    for (_, kind, target) in quiet.into_iter().take(excess) {
        if let Some(of) = entries.get_mut(kind) {
            of.remove(&target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(health: Health, hold: Option<Duration>) -> AttemptEnd {
        AttemptEnd {
            instance: Arc::from("hooks"),
            health,
            probe: false,
            hold,
            error: None,
            limit: 8,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_lasts_until_its_time_for_its_kind_and_target_only() {
        let endpoints = Endpoints::default();
        let now = Instant::now();
        assert_eq!(
            endpoints.enter("http", "a:80", None, now),
            EndpointGate::Go { probe: false }
        );
        endpoints.ended(
            "http",
            "a:80",
            end(Health::Unknown, Some(Duration::from_secs(30))),
            now,
        );
        let until = now + Duration::from_secs(30);
        assert_eq!(
            endpoints.enter("http", "a:80", None, now),
            EndpointGate::WaitUntil(until)
        );
        assert_eq!(
            endpoints.enter("http", "b:80", None, now),
            EndpointGate::Go { probe: false }
        );
        assert_eq!(
            endpoints.enter("other", "a:80", None, now),
            EndpointGate::Go { probe: false }
        );
        assert_eq!(
            endpoints.enter("http", "a:80", None, until),
            EndpointGate::Go { probe: false }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_pause_a_target_for_everyone_and_tell_the_observers() {
        let endpoints = Endpoints::default();
        let told = Arc::new(Mutex::new(Vec::new()));
        let seen = told.clone();
        endpoints.observe(Arc::new(move |change: &EndpointChange| {
            seen.lock()
                .unwrap()
                .push((change.target.clone(), change.change));
        }));
        let policy = Some(PausePolicy::default());
        let now = Instant::now();
        for _ in 0..5 {
            assert!(matches!(
                endpoints.enter("http", "a:80", policy, now),
                EndpointGate::Go { .. }
            ));
            endpoints.ended("http", "a:80", end(Health::Failing, None), now);
        }
        assert!(matches!(
            endpoints.enter("http", "a:80", policy, now),
            EndpointGate::WaitUntil(_)
        ));
        assert_eq!(*told.lock().unwrap(), [("a:80".to_owned(), "paused")]);
        let view = &endpoints.list()[0];
        assert_eq!(
            (
                view.state,
                view.paused_by,
                view.failures,
                view.failures_in_a_row
            ),
            ("paused", Some("failures"), 5, 5)
        );
        assert!(endpoints.resume_by_hand("a:80"));
        assert_eq!(
            endpoints.enter("http", "a:80", policy, now),
            EndpointGate::Go { probe: false }
        );
        assert_eq!(told.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_targets_are_forgotten_past_the_bound() {
        let endpoints = Endpoints::default();
        let now = Instant::now();
        for i in 0..REMEMBERED + 1 {
            let target = format!("h{i}:80");
            endpoints.enter("http", &target, None, now);
            endpoints.ended("http", &target, end(Health::Answered, None), now);
        }
        let remembered: usize = endpoints.lock().values().map(HashMap::len).sum();
        assert!(remembered <= REMEMBERED);
    }
}
