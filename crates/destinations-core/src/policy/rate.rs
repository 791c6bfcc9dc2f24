//! How fast a target may be sent to: at most so many attempts per second (or minute), with a
//! burst. The dispatcher holds a batch back until its turn instead of failing it, so a rate
//! limit never costs a send an attempt.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

/// A rate limit as configured: `{ per_second = 10 }`, `{ per_minute = 30, burst = 5 }`.
/// Counts attempts (one request, whatever the batch holds). Without `burst`, attempts are
/// evenly spaced and idle time is not saved up.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Attempts per second.
    #[serde(default)]
    pub per_second: Option<f64>,
    /// Attempts per minute (instead of `per_second`).
    #[serde(default)]
    pub per_minute: Option<f64>,
    /// Attempts that may go at once after an idle spell (default 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

impl RateLimit {
    /// At most `per_minute` attempts a minute, evenly spaced.
    pub fn per_minute(per_minute: u32) -> Self {
        Self {
            per_second: None,
            per_minute: Some(f64::from(per_minute)),
            burst: None,
        }
    }

    /// At most `per_second` attempts a second, evenly spaced.
    pub fn per_second(per_second: f64) -> Self {
        Self {
            per_second: Some(per_second),
            per_minute: None,
            burst: None,
        }
    }

    /// The same with room for `burst` attempts at once.
    #[must_use]
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    /// What is wrong with it, in words (the key is named by the caller).
    pub fn check(&self) -> Result<(), String> {
        let rate = match (self.per_second, self.per_minute) {
            (Some(_), Some(_)) => return Err("give per_second or per_minute, not both".into()),
            (None, None) => return Err("give per_second or per_minute".into()),
            (Some(rate), None) | (None, Some(rate)) => rate,
        };
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("the rate must be a positive number, not {rate}"));
        }
        if self.interval() < Duration::from_micros(1) {
            return Err(format!(
                "{rate} is more than a million attempts a second: leave the rate limit out"
            ));
        }
        if self.burst == Some(0) {
            return Err("burst must be at least 1".into());
        }
        Ok(())
    }

    /// The time between two attempts at the steady rate.
    pub fn interval(&self) -> Duration {
        let per_second = self
            .per_second
            .or(self.per_minute.map(|m| m / 60.0))
            .unwrap_or(f64::INFINITY);
        Duration::try_from_secs_f64(1.0 / per_second).unwrap_or(Duration::MAX)
    }

    /// Attempts that may go at once.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(1).max(1)
    }

    /// A gate that tasks wait at for their turn (a destination spacing its own requests).
    pub fn shared(&self) -> SharedRateGate {
        SharedRateGate(Mutex::new(self.gate()))
    }

    /// A gate keeping to this rate.
    pub fn gate(&self) -> RateGate {
        RateGate {
            interval: self.interval(),
            tolerance: self.interval() * (self.burst() - 1),
            theoretical_arrival: None,
        }
    }
}

/// The generic cell rate algorithm: one instant (when the next attempt would be due at the
/// steady rate) says whether an attempt may go now, and if not, from when. Nothing is taken
/// until an attempt goes, so work held back holds nothing; no task runs in the background.
#[derive(Debug, Clone)]
pub struct RateGate {
    interval: Duration,
    /// How far ahead of the steady rate a burst may run.
    tolerance: Duration,
    theoretical_arrival: Option<Instant>,
}

impl RateGate {
    /// When an attempt may go: `now` or later.
    pub fn ready_at(&self, now: Instant) -> Instant {
        match self.theoretical_arrival {
            Some(due) => due.checked_sub(self.tolerance).unwrap_or(now).max(now),
            None => now,
        }
    }

    /// An attempt goes now (call once [`ready_at`](Self::ready_at) is not later than `now`).
    pub fn take(&mut self, now: Instant) {
        let due = self.theoretical_arrival.map_or(now, |due| due.max(now));
        self.theoretical_arrival = Some(due + self.interval);
    }

    /// Whether the gate remembers nothing a fresh one would not (it may be dropped).
    pub fn is_idle(&self, now: Instant) -> bool {
        self.theoretical_arrival.is_none_or(|due| due <= now)
    }
}

/// A [`RateGate`] that tasks wait at, each for its own turn, in the order they ask.
#[derive(Debug)]
pub struct SharedRateGate(Mutex<RateGate>);

impl SharedRateGate {
    /// Wait for this attempt's turn (on tokio's clock, so a paused clock drives it).
    pub async fn acquire(&self) {
        let turn = {
            let mut gate = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let turn = gate.ready_at(Instant::now());
            gate.take(turn);
            turn
        };
        tokio::time::sleep_until(turn).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The times `count` attempts asking at once go, each taking its turn as soon as it may.
    fn turns(gate: &mut RateGate, start: Instant, count: usize) -> Vec<Duration> {
        let mut now = start;
        (0..count)
            .map(|_| {
                now = gate.ready_at(now);
                gate.take(now);
                now - start
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_spaced_at_the_rate_and_idle_time_is_not_saved_up() {
        let mut gate = RateLimit::per_minute(6).gate();
        let start = Instant::now();
        assert_eq!(
            turns(&mut gate, start, 4),
            [0, 10, 20, 30].map(Duration::from_secs)
        );
        // Ten idle minutes later: one at once, the next a full interval after.
        let later = start + Duration::from_secs(600);
        assert_eq!(turns(&mut gate, later, 2), [0, 10].map(Duration::from_secs));
        // Forgettable once the next turn it would give is no longer ahead.
        assert!(!gate.is_idle(later + Duration::from_secs(19)));
        assert!(gate.is_idle(later + Duration::from_secs(20)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_the_steady_rate_follows() {
        let mut gate = RateLimit::per_second(10.0).with_burst(3).gate();
        let start = Instant::now();
        assert_eq!(
            turns(&mut gate, start, 5),
            [0, 0, 0, 100, 200].map(Duration::from_millis)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_waiting_at_a_shared_gate_go_one_interval_apart() {
        let gate = std::sync::Arc::new(RateLimit::per_minute(6).shared());
        let start = Instant::now();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    gate.acquire().await;
                    Instant::now() - start
                })
            })
            .collect();
        let mut times = Vec::new();
        for waiter in waiters {
            times.push(waiter.await.unwrap_or_default());
        }
        times.sort();
        assert_eq!(times, [0, 10, 20].map(Duration::from_secs));
    }

    #[test]
    fn a_rate_says_what_is_wrong_with_it() {
        assert!(RateLimit::per_second(5.0).check().is_ok());
        let both = RateLimit {
            per_minute: Some(1.0),
            ..RateLimit::per_second(1.0)
        };
        assert!(both.check().unwrap_err().contains("not both"));
        assert!(
            RateLimit::per_second(0.0)
                .check()
                .unwrap_err()
                .contains("positive")
        );
        assert!(RateLimit::per_second(f64::NAN).check().is_err());
        assert!(RateLimit::per_second(1.0).with_burst(0).check().is_err());
        assert!(
            RateLimit::per_second(1e9)
                .check()
                .unwrap_err()
                .contains("million")
        );
    }
}
