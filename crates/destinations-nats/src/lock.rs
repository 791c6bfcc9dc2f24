//! One server at a time for an instance whose sends go out in order: it holds the instance's
//! key in a key-value bucket, writing it again a third of the lease time apart; a server that
//! stops (or dies) loses the key after the lease time, and another takes it.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tokio::time::Instant;

/// The lock bucket.
pub(crate) async fn bucket(
    context: &jetstream::Context,
    name: &str,
    lease: Duration,
    replicas: usize,
) -> Result<kv::Store, String> {
    context
        .create_or_update_key_value(kv::Config {
            bucket: name.to_owned(),
            history: 1,
            // A key nobody writes again is gone after the lease time.
            max_age: lease,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot open the lock bucket `{name}`: {e}"))
}

/// This server's hold on one instance.
pub(crate) struct InstanceLock {
    store: kv::Store,
    key: String,
    holder: Bytes,
    renew_every: Duration,
    /// The key's revision while this server holds it, and when it was written.
    held: tokio::sync::Mutex<Option<(u64, Instant)>>,
}

impl InstanceLock {
    pub(crate) fn new(store: kv::Store, instance: &str, holder: &str, lease: Duration) -> Self {
        Self {
            store,
            key: instance.to_owned(),
            holder: Bytes::from(holder.to_owned()),
            renew_every: lease / 3,
            held: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether this server holds the instance now: taken if free, written again if due.
    pub(crate) async fn hold(&self) -> bool {
        let mut held = self.held.lock().await;
        *held = match *held {
            Some((revision, at)) if at.elapsed() < self.renew_every => Some((revision, at)),
            Some((revision, _)) => self
                .store
                .update(&self.key, self.holder.clone(), revision)
                .await
                .ok()
                .map(|revision| (revision, Instant::now())),
            None => self
                .store
                .create(&self.key, self.holder.clone())
                .await
                .ok()
                .map(|revision| (revision, Instant::now())),
        };
        held.is_some()
    }

    /// Let the next server take the instance now (this one is stopping).
    pub(crate) async fn release(&self) {
        let mut held = self.held.lock().await;
        if held.take().is_some() {
            let _ = self.store.delete(&self.key).await;
        }
    }
}
