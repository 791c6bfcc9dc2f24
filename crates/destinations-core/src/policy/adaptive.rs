//! Adaptive concurrency: how many attempts one target gets at once, found by watching it
//! answer (additive increase, multiplicative decrease, after Vector's adaptive request
//! concurrency). The limit grows while the target answers as fast as it usually does and
//! while the limit is what holds attempts back; it is cut by a tenth when answers slow down
//! well past their usual spread, and halved when the target pushes back (429, 503, 408, a
//! timeout, a `Retry-After`).
//!
//! Unlike Vector's, every attempt is judged on its own (a retried request is a new sample, a
//! 429 before a success is not lost in it), a target pushing back halves the limit rather than
//! cutting a tenth, and a fresh target doubles its limit each period until the first cut, so it
//! reaches a large limit in a few round trips instead of one per period.

use std::time::Duration;

use tokio::time::Instant;

/// What one attempt said, for the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    /// Answered; its round trip is a sample.
    Answered,
    /// The target pushed back: 429, 503, 408, a timeout, a `Retry-After`.
    PushedBack,
    /// Nothing either way (a refused send, a connection that failed: the pause decides those).
    Unknown,
}

/// Smoothing of the usual round trip (Vector's `ewma_alpha`).
const ALPHA: f64 = 0.4;
/// How many deviations past the usual round trip count as slowing down.
const DEVIATIONS: f64 = 2.5;
/// The cut when answers slow down.
const SLOWING_CUT: f64 = 0.9;
/// The longest period between two decisions.
const LONGEST_PERIOD: Duration = Duration::from_secs(2);

/// One target's limit. Pure: it is told the time.
#[derive(Clone, Debug)]
pub struct AdaptiveLimit {
    max: usize,
    limit: usize,
    /// Doubling, until the first cut.
    slow_start: bool,
    /// The usual round trip in seconds: mean and variance, smoothed over periods.
    usual: Option<(f64, f64)>,
    /// This period's round trips: sum in seconds and count.
    period: (f64, u32),
    next_decision: Option<Instant>,
    pushed_back: bool,
    /// Whether attempts were held back by the limit this period (growth needs it).
    reached: bool,
}

impl AdaptiveLimit {
    /// Starting at one attempt at once, never more than `max`.
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            limit: 1,
            slow_start: true,
            usual: None,
            period: (0.0, 0),
            next_decision: None,
            pushed_back: false,
            reached: false,
        }
    }

    /// Attempts allowed at once now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// An attempt started; `in_flight` counts it.
    pub fn started(&mut self, in_flight: usize) {
        if in_flight >= self.limit {
            self.reached = true;
        }
    }

    /// An attempt ended after `round_trip`. Returns whether the limit changed.
    pub fn ended(&mut self, now: Instant, round_trip: Duration, pressure: Pressure) -> bool {
        match pressure {
            Pressure::Answered => {
                self.period.0 += round_trip.as_secs_f64();
                self.period.1 += 1;
            }
            Pressure::PushedBack => self.pushed_back = true,
            Pressure::Unknown => {}
        }
        let Some(next) = self.next_decision else {
            // The first answer starts the first period, one round trip long.
            self.next_decision = Some(now + round_trip.min(LONGEST_PERIOD));
            return false;
        };
        if now < next {
            return false;
        }
        let before = self.limit;
        self.decide();
        let period = self.usual.map_or(round_trip, |(mean, _)| {
            Duration::from_secs_f64(mean.max(0.0))
        });
        self.next_decision = Some(now + period.min(LONGEST_PERIOD));
        before != self.limit
    }

    fn decide(&mut self) {
        let current = (self.period.1 > 0).then(|| self.period.0 / f64::from(self.period.1));
        if self.pushed_back {
            self.limit = (self.limit / 2).max(1);
            self.slow_start = false;
        } else if let (Some(current), Some((mean, variance))) = (current, self.usual)
            && current >= mean + DEVIATIONS * variance.sqrt()
            && self.limit > 1
            && variance > 0.0
        {
            self.limit = ((self.limit as f64 * SLOWING_CUT) as usize)
                .min(self.limit - 1)
                .max(1);
            self.slow_start = false;
        } else if self.reached
            && self.limit < self.max
            && current.is_some_and(|current| self.usual.is_none_or(|(mean, _)| current <= mean))
        {
            self.limit = if self.slow_start {
                self.limit * 2
            } else {
                self.limit + 1
            }
            .min(self.max);
        }
        if let Some(current) = current {
            self.usual = Some(match self.usual {
                None => (current, 0.0),
                Some((mean, variance)) => {
                    let diff = current - mean;
                    let step = ALPHA * diff;
                    (mean + step, (1.0 - ALPHA) * (variance + diff * step))
                }
            });
        }
        self.period = (0.0, 0);
        self.pushed_back = false;
        self.reached = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(10);

    /// Run `periods` periods of full load answered in `rtt`, each ending with `pressure`.
    fn load(limit: &mut AdaptiveLimit, now: &mut Instant, periods: usize, pressure: Pressure) {
        for _ in 0..periods {
            for _ in 0..limit.limit() {
                limit.started(limit.limit());
            }
            *now += RTT;
            limit.ended(*now, RTT, pressure);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_fast_from_one_then_halves_when_pushed_back_and_grows_again() {
        let mut limit = AdaptiveLimit::new(64);
        let mut now = Instant::now();
        load(&mut limit, &mut now, 10, Pressure::Answered);
        assert_eq!(limit.limit(), 64, "doubling until the first cut");
        load(&mut limit, &mut now, 1, Pressure::PushedBack);
        assert_eq!(limit.limit(), 32, "halved");
        load(&mut limit, &mut now, 1, Pressure::PushedBack);
        assert_eq!(limit.limit(), 16, "halved again");
        load(&mut limit, &mut now, 4, Pressure::Answered);
        assert_eq!(limit.limit(), 20, "one more per period after a cut");
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_grow_when_the_limit_holds_nothing_back() {
        let mut limit = AdaptiveLimit::new(64);
        let mut now = Instant::now();
        for _ in 0..10 {
            limit.started(1);
            limit.started(1);
            now += RTT;
            limit.ended(now, RTT, Pressure::Answered);
            limit.ended(now, RTT, Pressure::Answered);
            // Only ever one under way once the limit is two or more.
        }
        assert!(limit.limit() <= 2, "{}", limit.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn answers_slowing_well_past_their_spread_cut_a_tenth() {
        let mut limit = AdaptiveLimit::new(64);
        let mut now = Instant::now();
        // Round trips that vary a little, so there is a spread.
        for i in 0..12u32 {
            limit.started(limit.limit());
            let rtt = RTT + Duration::from_micros(u64::from(i % 3) * 500);
            now += rtt;
            limit.ended(now, rtt, Pressure::Answered);
        }
        let before = limit.limit();
        assert!(before > 1);
        now += RTT * 10;
        limit.ended(now, RTT * 10, Pressure::Answered);
        assert!(limit.limit() < before, "{before} -> {}", limit.limit());
        assert!(limit.limit() >= before * 8 / 10, "a tenth, not half");
    }

    #[tokio::test(start_paused = true)]
    async fn never_above_its_max_nor_below_one() {
        let mut limit = AdaptiveLimit::new(3);
        let mut now = Instant::now();
        load(&mut limit, &mut now, 10, Pressure::Answered);
        assert_eq!(limit.limit(), 3);
        load(&mut limit, &mut now, 10, Pressure::PushedBack);
        assert_eq!(limit.limit(), 1);
    }
}
