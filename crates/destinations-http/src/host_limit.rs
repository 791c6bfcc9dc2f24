//! A concurrency limit per target host, so one slow receiver cannot take every slot of an
//! instance and a burst to one host cannot overwhelm it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most `limit` requests at once to each host.
pub(crate) struct PerHostLimit {
    limit: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Hosts remembered before idle ones are forgotten.
const FORGET_IDLE_ABOVE: usize = 4096;

impl PerHostLimit {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Wait for a slot for `host` (`host:port`).
    pub(crate) async fn acquire(&self, host: &str) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
            if hosts.len() > FORGET_IDLE_ABOVE {
                let limit = self.limit;
                hosts.retain(|_, s| s.available_permits() < limit);
            }
            hosts
                .entry(host.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.limit)))
                .clone()
        };
        semaphore.acquire_owned().await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limits_each_host_separately() {
        let limit = PerHostLimit::new(2);
        let a1 = limit.acquire("a:80").await;
        let _a2 = limit.acquire("a:80").await;
        let b =
            tokio::time::timeout(std::time::Duration::from_secs(5), limit.acquire("b:80")).await;
        assert!(b.is_ok(), "another host is not held up");
        let third = limit.acquire("a:80");
        tokio::pin!(third);
        assert!(
            futures_poll_once(&mut third).await.is_none(),
            "a third for `a` waits"
        );
        drop(a1);
        assert!(third.await.is_some());
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        tokio::select! { biased; out = f => Some(out), () = tokio::task::yield_now() => None }
    }
}
