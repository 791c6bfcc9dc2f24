//! Targets that asked to be left alone (`Retry-After`), shared by every instance of a hub: a
//! host that answered one instance "not before" is held for all of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

/// Holds by destination kind, then target (targets are named by their destination: two kinds
/// may name different things alike).
#[derive(Default)]
pub(crate) struct TargetHolds {
    /// Whether any hold may be in force: the usual answer, "none", without a lock.
    any: AtomicBool,
    holds: Mutex<HashMap<&'static str, HashMap<String, Instant>>>,
}

impl TargetHolds {
    /// Nothing goes to `target` of `kind` before `until` (a later hold in force stays).
    pub(crate) fn hold(&self, kind: &'static str, target: &str, until: Instant) {
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        let held = holds
            .entry(kind)
            .or_default()
            .entry(target.to_owned())
            .or_insert(until);
        *held = (*held).max(until);
        self.any.store(true, Ordering::Release);
    }

    /// Until when `target` of `kind` is held, if it is held after `now`. Holds that ended are
    /// forgotten as they are met.
    pub(crate) fn until(&self, kind: &'static str, target: &str, now: Instant) -> Option<Instant> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        let of_kind = holds.get_mut(kind)?;
        let until = *of_kind.get(target)?;
        if until > now {
            return Some(until);
        }
        of_kind.remove(target);
        if of_kind.is_empty() {
            holds.remove(kind);
            if holds.is_empty() {
                self.any.store(false, Ordering::Release);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_hold_lasts_until_its_time_for_its_kind_and_target_only() {
        let holds = TargetHolds::default();
        let now = Instant::now();
        assert_eq!(holds.until("http", "a:80", now), None);
        let until = now + Duration::from_secs(30);
        holds.hold("http", "a:80", until);
        holds.hold("http", "a:80", now + Duration::from_secs(1));
        assert_eq!(
            holds.until("http", "a:80", now),
            Some(until),
            "the later hold stays"
        );
        assert_eq!(holds.until("http", "b:80", now), None);
        assert_eq!(holds.until("other", "a:80", now), None);
        assert_eq!(holds.until("http", "a:80", until), None, "over at its time");
        assert!(!holds.any.load(Ordering::Acquire), "forgotten once over");
    }
}
