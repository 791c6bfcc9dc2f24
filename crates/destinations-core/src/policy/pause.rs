//! When a failing target is paused: after so many failures in a row, or too large a share of
//! failures over a window, nothing more is attempted for a while; then one probe goes, and the
//! target resumes if it answers. Sends held back by a pause stay queued and cost no attempt.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::duration_text;

/// The pause policy as configured (the HTTP destination's `pause_failing_hosts`).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PausePolicy {
    /// Whether failing targets are paused at all (default true).
    pub enabled: bool,
    /// Failures in a row that pause a target (default 5).
    pub after_failures: u32,
    /// The share of failed attempts over `window` that pauses a target (default 0.7)...
    pub failure_ratio: f64,
    /// ...once the window holds at least this many attempts (default 10).
    pub min_attempts: u32,
    /// How far back `failure_ratio` looks (default 60 s).
    #[serde(with = "duration_text")]
    pub window: Duration,
    /// The first pause (default 1 s); each pause whose probe fails doubles it.
    #[serde(with = "duration_text")]
    pub first_pause: Duration,
    /// The longest pause (default 5 min).
    #[serde(with = "duration_text")]
    pub longest_pause: Duration,
}

impl Default for PausePolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            after_failures: 5,
            failure_ratio: 0.7,
            min_attempts: 10,
            window: Duration::from_secs(60),
            first_pause: Duration::from_secs(1),
            longest_pause: Duration::from_secs(300),
        }
    }
}

impl PausePolicy {
    /// What is wrong with it, in words, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.after_failures == 0 {
            return Err("after_failures must be at least 1".into());
        }
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return Err(format!(
                "failure_ratio must be above 0 and at most 1, not {}",
                self.failure_ratio
            ));
        }
        if self.window < Duration::from_secs(1) {
            return Err("window must be at least 1s".into());
        }
        if self.first_pause.is_zero() {
            return Err("first_pause must be more than 0s".into());
        }
        if self.longest_pause < self.first_pause {
            return Err("longest_pause must not be shorter than first_pause".into());
        }
        Ok(())
    }

    /// The `trip`-th pause in a row (0 for the first): doubling from `first_pause` up to
    /// `longest_pause`, give or take a fifth so that targets paused together do not all
    /// come back at once.
    pub fn pause(&self, trip: u32) -> Duration {
        let steady = self
            .first_pause
            .saturating_mul(1u32 << trip.min(30))
            .min(self.longest_pause);
        steady.mul_f64(0.8 + 0.4 * fastrand::f64())
    }
}

/// What an attempt said about its target's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// It answered (a send delivered).
    Answered,
    /// It failed in a way that says the target is in trouble (could not connect, timed out,
    /// a server error without `Retry-After`).
    Failing,
    /// Nothing either way (a send refused as bad, a `Retry-After` already respected).
    Unknown,
}

/// A target's pause state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Attempts go.
    Open,
    /// Nothing goes before `until`; then one probe.
    Paused {
        /// When the probe may go.
        until: Instant,
    },
    /// One probe is under way; nothing else goes until it ends.
    Probing,
}

/// A change of a target's pause state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseChange {
    /// Paused for this long (after failures, or a failed probe).
    Paused(Duration),
    /// A probe went through: attempts go again.
    Resumed,
}

/// Whether an attempt may go to a target, as far as its pause is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerGate {
    /// It goes.
    Go,
    /// It goes as the probe of a paused target: its end decides.
    Probe,
    /// Not before this time.
    WaitUntil(Instant),
    /// Not until a probe under way ends, or an operator resumes the target.
    Blocked,
}

/// Attempts counted in slices of the window, so memory does not grow with the rate.
const SLICES: u32 = 12;

/// One target's circuit breaker: counts failures, pauses, probes. Pure: it is told the time.
#[derive(Clone, Debug)]
pub struct Breaker {
    policy: PausePolicy,
    state: BreakerState,
    /// Paused by an operator: nothing goes (not even a probe) until resumed by one.
    by_hand: bool,
    in_a_row: u32,
    /// Pauses since the target last answered.
    trips: u32,
    window: SlidingCounts,
}

impl Breaker {
    /// An open breaker keeping to `policy`.
    pub fn new(policy: PausePolicy) -> Self {
        Self {
            policy,
            state: BreakerState::Open,
            by_hand: false,
            in_a_row: 0,
            trips: 0,
            window: SlidingCounts::new(policy.window),
        }
    }

    /// Open, paused or probing (an operator's pause aside: see [`paused_by_hand`](Self::paused_by_hand)).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether an operator paused it.
    pub fn paused_by_hand(&self) -> bool {
        self.by_hand
    }

    /// Failures in a row.
    pub fn failures_in_a_row(&self) -> u32 {
        self.in_a_row
    }

    /// Whether it holds anything back now or remembers anything worth keeping.
    pub fn is_quiet(&self) -> bool {
        self.state == BreakerState::Open && !self.by_hand && self.in_a_row == 0
    }

    /// Whether an attempt may go at `now`; a paused target whose pause is over lets one
    /// attempt through as its probe.
    pub fn gate(&mut self, now: Instant) -> BreakerGate {
        if self.by_hand {
            return BreakerGate::Blocked;
        }
        match self.state {
            BreakerState::Open => BreakerGate::Go,
            BreakerState::Probing => BreakerGate::Blocked,
            BreakerState::Paused { until } if until > now => BreakerGate::WaitUntil(until),
            BreakerState::Paused { .. } => {
                self.state = BreakerState::Probing;
                BreakerGate::Probe
            }
        }
    }

    /// An attempt ended; `probe` if it was let through as one. Returns the change it made.
    pub fn ended(&mut self, now: Instant, health: Health, probe: bool) -> Option<PauseChange> {
        if probe {
            return match health {
                Health::Failing => Some(self.pause(now)),
                Health::Answered | Health::Unknown => {
                    self.in_a_row = 0;
                    self.trips = 0;
                    self.window.clear();
                    self.state = BreakerState::Open;
                    (!self.by_hand).then_some(PauseChange::Resumed)
                }
            };
        }
        // Attempts that began before a pause say nothing new.
        if self.state != BreakerState::Open {
            return None;
        }
        match health {
            Health::Unknown => return None,
            Health::Answered => self.in_a_row = 0,
            Health::Failing => self.in_a_row += 1,
        }
        let (answered, failing) = match health {
            Health::Answered => self.window.add(now, 1, 0),
            _ => self.window.add(now, 0, 1),
        };
        let seen = answered + failing;
        let tripped = self.in_a_row >= self.policy.after_failures
            || (seen >= self.policy.min_attempts
                && f64::from(failing) >= self.policy.failure_ratio * f64::from(seen));
        (tripped && health == Health::Failing).then(|| self.pause(now))
    }

    /// Paused by an operator until resumed by one.
    pub fn pause_by_hand(&mut self) {
        self.by_hand = true;
    }

    /// Resumed by an operator: attempts go at once, the failures forgotten. Returns whether
    /// it was held back at all.
    pub fn resume_by_hand(&mut self) -> bool {
        let held = self.by_hand || self.state != BreakerState::Open;
        self.by_hand = false;
        self.in_a_row = 0;
        self.trips = 0;
        self.window.clear();
        if self.state != BreakerState::Probing {
            self.state = BreakerState::Open;
        }
        held
    }

    fn pause(&mut self, now: Instant) -> PauseChange {
        let pause = self.policy.pause(self.trips);
        self.trips = self.trips.saturating_add(1);
        self.state = BreakerState::Paused { until: now + pause };
        self.window.clear();
        PauseChange::Paused(pause)
    }
}

/// Attempts that answered and that failed over a sliding window, counted in slices of it so
/// memory does not grow with the rate.
#[derive(Clone, Debug)]
pub(crate) struct SlidingCounts {
    window: Duration,
    /// (start of slice, answered, failing), oldest first.
    slices: VecDeque<(Instant, u32, u32)>,
}

impl SlidingCounts {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            slices: VecDeque::new(),
        }
    }

    /// Count attempts at `now`; the window's totals (answered, failing).
    pub(crate) fn add(&mut self, now: Instant, answered: u32, failing: u32) -> (u32, u32) {
        self.forget_before(now);
        let slice = self.window / SLICES;
        if self
            .slices
            .back()
            .is_none_or(|(start, _, _)| *start + slice <= now)
        {
            self.slices.push_back((now, 0, 0));
        }
        if let Some((_, a, f)) = self.slices.back_mut() {
            *a += answered;
            *f += failing;
        }
        self.totals_kept()
    }

    /// The window's totals at `now` (answered, failing).
    pub(crate) fn totals(&mut self, now: Instant) -> (u32, u32) {
        self.forget_before(now);
        self.totals_kept()
    }

    pub(crate) fn clear(&mut self) {
        self.slices.clear();
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some((start, _, _)) = self.slices.front()
            && *start + self.window <= now
        {
            self.slices.pop_front();
        }
    }

    fn totals_kept(&self) -> (u32, u32) {
        self.slices
            .iter()
            .fold((0, 0), |(a, f), (_, answered, failing)| {
                (a + answered, f + failing)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PausePolicy {
        PausePolicy::default()
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_in_a_row_pause_then_one_probe_decides() {
        let mut breaker = Breaker::new(policy());
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(breaker.ended(now, Health::Failing, false), None);
        }
        let Some(PauseChange::Paused(pause)) = breaker.ended(now, Health::Failing, false) else {
            panic!("the fifth failure in a row pauses");
        };
        assert!((800..=1200).contains(&pause.as_millis()), "{pause:?}");
        assert_eq!(breaker.gate(now), BreakerGate::WaitUntil(now + pause));
        let later = now + pause;
        assert_eq!(breaker.gate(later), BreakerGate::Probe);
        assert_eq!(breaker.gate(later), BreakerGate::Blocked, "one probe only");
        // The probe fails: paused again, about twice as long.
        let Some(PauseChange::Paused(second)) = breaker.ended(later, Health::Failing, true) else {
            panic!("a failed probe pauses again");
        };
        assert!((1600..=2400).contains(&second.as_millis()), "{second:?}");
        let again = later + second;
        assert_eq!(breaker.gate(again), BreakerGate::Probe);
        assert_eq!(
            breaker.ended(again, Health::Answered, true),
            Some(PauseChange::Resumed)
        );
        assert_eq!(breaker.gate(again), BreakerGate::Go);
        assert!(breaker.is_quiet());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_between_failures_keeps_it_open_until_the_ratio_trips() {
        let mut breaker = Breaker::new(policy());
        let now = Instant::now();
        // Three failures, one answer, repeated: never five in a row, but 75 % failing.
        let mut tripped = None;
        for i in 0..12 {
            let health = if i % 4 == 3 {
                Health::Answered
            } else {
                Health::Failing
            };
            if let Some(t) = breaker.ended(now, health, false) {
                tripped = Some((i, t));
                break;
            }
        }
        let (at, PauseChange::Paused(_)) = tripped.expect("the failure ratio pauses") else {
            panic!("a pause");
        };
        assert_eq!(
            at, 9,
            "the tenth attempt is the first the ratio is judged on"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_are_forgotten() {
        let mut breaker = Breaker::new(PausePolicy {
            after_failures: 100,
            ..policy()
        });
        let now = Instant::now();
        for _ in 0..9 {
            breaker.ended(now, Health::Failing, false);
        }
        let later = now + Duration::from_secs(61);
        assert_eq!(breaker.ended(later, Health::Failing, false), None);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_pause_holds_until_an_operator_resumes() {
        let mut breaker = Breaker::new(policy());
        let now = Instant::now();
        breaker.pause_by_hand();
        assert_eq!(
            breaker.gate(now + Duration::from_secs(3600)),
            BreakerGate::Blocked
        );
        assert!(breaker.resume_by_hand());
        assert_eq!(breaker.gate(now), BreakerGate::Go);
        assert!(!breaker.resume_by_hand(), "nothing held it back");
    }

    #[test]
    fn pauses_double_up_to_the_longest() {
        let policy = policy();
        for trip in [9, 20, 40] {
            let pause = policy.pause(trip);
            assert!(pause <= policy.longest_pause.mul_f64(1.2), "{pause:?}");
            assert!(pause >= policy.longest_pause.mul_f64(0.8), "{pause:?}");
        }
    }

    #[test]
    fn every_mistake_is_named() {
        for (bad, field) in [
            (
                PausePolicy {
                    after_failures: 0,
                    ..policy()
                },
                "after_failures",
            ),
            (
                PausePolicy {
                    failure_ratio: 1.5,
                    ..policy()
                },
                "failure_ratio",
            ),
            (
                PausePolicy {
                    window: Duration::ZERO,
                    ..policy()
                },
                "window",
            ),
            (
                PausePolicy {
                    first_pause: Duration::ZERO,
                    ..policy()
                },
                "first_pause",
            ),
            (
                PausePolicy {
                    longest_pause: Duration::from_millis(1),
                    ..policy()
                },
                "longest_pause",
            ),
        ] {
            assert!(bad.check().unwrap_err().contains(field), "{field}");
        }
        assert!(policy().check().is_ok());
    }
}
