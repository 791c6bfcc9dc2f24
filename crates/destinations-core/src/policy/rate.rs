//! At most so many deliveries per minute, evenly spaced: a destination that must not flood its
//! target (an SMTP relay's sending limit) waits for its turn before each delivery.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Spaces deliveries at least `60 s / per_minute` apart, in the order they ask. Waiting
/// happens on tokio's clock, so tests can drive it with a paused clock.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    next_free: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// At most `per_minute` deliveries in any minute (`per_minute` ≥ 1).
    pub fn per_minute(per_minute: u32) -> Self {
        Self {
            interval: Duration::from_secs(60) / per_minute.max(1),
            next_free: Mutex::new(None),
        }
    }

    /// The time between two deliveries.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Wait for this delivery's turn. Turns are handed out when asked, so callers that ask
    /// together are spaced one interval apart.
    pub async fn acquire(&self) {
        let turn = {
            let mut next_free = self
                .next_free
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let turn = next_free.map_or(now, |free| free.max(now));
            *next_free = Some(turn + self.interval);
            turn
        };
        tokio::time::sleep_until(turn).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn turns_are_one_interval_apart_and_idle_time_is_not_saved_up() {
        let limit = Arc::new(RateLimit::per_minute(6));
        assert_eq!(limit.interval(), Duration::from_secs(10));
        let start = Instant::now();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let limit = limit.clone();
                tokio::spawn(async move {
                    limit.acquire().await;
                    Instant::now()
                })
            })
            .collect();
        let mut times = Vec::new();
        for waiter in waiters {
            times.push(waiter.await.unwrap_or(start) - start);
        }
        times.sort();
        assert_eq!(
            times,
            [0, 10, 20, 30].map(Duration::from_secs),
            "evenly spaced from the first"
        );
        // A long idle spell does not build up a burst.
        tokio::time::sleep(Duration::from_secs(600)).await;
        let idle_end = Instant::now();
        limit.acquire().await;
        limit.acquire().await;
        assert_eq!(Instant::now() - idle_end, Duration::from_secs(10));
    }
}
