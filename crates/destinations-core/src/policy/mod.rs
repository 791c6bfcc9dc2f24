//! Delivery policies: how envelopes are grouped, when a failure is tried again, and how fast a
//! target may be sent to, how many attempts it gets at once, and when a failing one is paused.

mod adaptive;
mod batch;
mod pause;
mod rate;
mod retry;

pub use adaptive::{AdaptiveLimit, Pressure};
pub use batch::{BatchPolicy, BatchPolicyOverrides};
pub(crate) use pause::SlidingCounts;
pub use pause::{Breaker, BreakerGate, BreakerState, Health, PauseChange, PausePolicy};
pub use rate::{RateGate, RateLimit, SharedRateGate};
pub use retry::{RetryDecision, RetryPolicy};
