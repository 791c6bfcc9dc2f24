//! Delivery policies: how envelopes are grouped, and when a failure is tried again.

mod batch;
mod retry;

pub use batch::{BatchPolicy, BatchPolicyOverrides};
pub use retry::{RetryDecision, RetryPolicy};
