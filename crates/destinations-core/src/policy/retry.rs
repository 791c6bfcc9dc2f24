//! When a transient failure is tried again: exponential backoff with full jitter, capped by
//! attempts and by age, honouring the target's own `Retry-After`.

use std::time::Duration;

use serde::Deserialize;

use crate::config::duration_text;

/// Retry settings of one destination instance.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// The backoff ceiling before the first retry.
    #[serde(with = "duration_text")]
    pub initial_delay: Duration,
    /// How much the ceiling grows per attempt.
    pub multiplier: f64,
    /// The largest wait between two attempts.
    #[serde(with = "duration_text")]
    pub max_delay: Duration,
    /// Most delivery attempts, the first included.
    pub max_attempts: u32,
    /// No attempt is started later than this after the send.
    #[serde(with = "duration_text")]
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(600),
            max_attempts: 12,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// What to do after a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this wait.
    RetryIn(Duration),
    /// The attempt budget is spent.
    AttemptsExhausted,
    /// The next attempt would start past `max_age`.
    TooOld,
}

impl RetryPolicy {
    /// Never retry: the first failure is final.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The backoff ceiling after `attempts` failed attempts (1 = after the first).
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(64) as i32;
        let ceiling = self.initial_delay.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        Duration::from_secs_f64(ceiling.min(self.max_delay.as_secs_f64()))
    }

    /// Decide after `attempts` failed attempts of a send that is `age` old, with the target's
    /// own wait if it gave one. Jitter comes from a fast thread-local generator.
    pub fn decide(
        &self,
        attempts: u32,
        age: Duration,
        retry_after: Option<Duration>,
    ) -> RetryDecision {
        self.decide_with_jitter(attempts, age, retry_after, fastrand::f64())
    }

    /// [`decide`](Self::decide) with the jitter given: `unit` in `[0, 1)` picks the wait within
    /// the ceiling ("full jitter").
    pub fn decide_with_jitter(
        &self,
        attempts: u32,
        age: Duration,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> RetryDecision {
        if attempts >= self.max_attempts {
            return RetryDecision::AttemptsExhausted;
        }
        let jittered = self.ceiling(attempts).mul_f64(unit.clamp(0.0, 1.0));
        // The target knows its own load best: never come back sooner than it asked, but never
        // wait longer than the policy's ceiling either.
        let wait = match retry_after {
            Some(asked) => jittered.max(asked).min(self.max_delay),
            None => jittered,
        };
        if age + wait > self.max_age {
            return RetryDecision::TooOld;
        }
        RetryDecision::RetryIn(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn ceiling_doubles_from_one_second_to_ten_minutes() {
        let p = RetryPolicy::default();
        let ceilings: Vec<_> = (1..=12).map(|a| p.ceiling(a)).collect();
        assert_eq!(&ceilings[..5], &[S(1), S(2), S(4), S(8), S(16)]);
        assert_eq!(ceilings[9], S(512));
        assert_eq!(ceilings[10], S(600));
        assert_eq!(ceilings[11], S(600));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.decide_with_jitter(3, S(0), None, 0.0),
            RetryDecision::RetryIn(S(0))
        );
        assert_eq!(
            p.decide_with_jitter(3, S(0), None, 0.5),
            RetryDecision::RetryIn(S(2))
        );
        for _ in 0..1000 {
            match p.decide(4, S(0), None) {
                RetryDecision::RetryIn(d) => assert!(d <= S(8)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn retry_after_is_a_floor_capped_by_max_delay() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.decide_with_jitter(1, S(0), Some(S(30)), 0.1),
            RetryDecision::RetryIn(S(30))
        );
        assert_eq!(
            p.decide_with_jitter(1, S(0), Some(S(3600)), 0.1),
            RetryDecision::RetryIn(S(600))
        );
    }

    #[test]
    fn stops_at_the_attempt_cap_and_the_age_cap() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.decide_with_jitter(12, S(0), None, 0.5),
            RetryDecision::AttemptsExhausted
        );
        assert_eq!(
            p.decide_with_jitter(5, S(24 * 3600 - 1), None, 0.9),
            RetryDecision::TooOld
        );
        assert_eq!(
            RetryPolicy::never().decide(1, S(0), None),
            RetryDecision::AttemptsExhausted
        );
    }

    #[test]
    fn reads_overrides_from_config_text() {
        let p: RetryPolicy = serde_json::from_str(r#"{"initial_delay":"10ms","max_attempts":3}"#)
            .unwrap_or_default();
        assert_eq!(p.initial_delay, Duration::from_millis(10));
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.max_delay, S(600));
        assert!(serde_json::from_str::<RetryPolicy>(r#"{"attempts":3}"#).is_err());
    }
}
