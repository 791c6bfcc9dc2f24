//! Delivery policies: how envelopes are grouped, when a failure is tried again, and how fast a
//! target may be sent to.

mod batch;
mod rate;
mod retry;

pub use batch::{BatchPolicy, BatchPolicyOverrides};
pub use rate::{RateGate, RateLimit, SharedRateGate};
pub use retry::{RetryDecision, RetryPolicy};
