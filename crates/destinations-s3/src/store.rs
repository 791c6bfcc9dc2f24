//! The object stores of one instance, from its `url`: one per bucket for `s3://`, `gs://` and
//! `az://`; one for `file://` and `memory://`, where each bucket is a top-level folder.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::options::S3Options;

/// Where an object for a bucket goes: the store, and the folder inside it (the bucket's, on
/// stores that hold every bucket).
/// A store built for a bucket, and when it was last used (a count of uses).
type UsedStore = (Arc<dyn ObjectStore>, u64);

/// Stores kept built, one per bucket, when sends name the bucket (`buckets` empty).
const MAX_STORES: usize = 256;

/// Buckets a health check looks at when sends name them: the most recently used.
const HEALTH_BUCKETS: usize = 8;

pub(crate) struct Placement {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) folder: String,
    /// Whether the store keeps a content type (file stores do not).
    pub(crate) keeps_attributes: bool,
}

enum Kind {
    Cloud(Cloud),
    Local(PathBuf),
    Memory(Arc<InMemory>),
}

#[derive(Clone, Copy)]
enum Cloud {
    S3,
    Gcs,
    Azure,
}

/// Builds and caches the store of each bucket.
pub(crate) struct Stores {
    kind: Kind,
    options: S3Options,
    /// Stores built per bucket, with when each was last used; at most [`MAX_STORES`].
    by_bucket: Mutex<HashMap<String, UsedStore>>,
    /// A counter that orders uses, for forgetting the least recently used store.
    uses: std::sync::atomic::AtomicU64,
    local: Mutex<Option<Arc<dyn ObjectStore>>>,
}

/// A probe bucket name, to check a cloud store's options when the instance is built.
const PROBE_BUCKET: &str = "destinations-config-check";

impl Stores {
    /// The stores this instance's options describe; cloud options are checked now, by
    /// building a store for a probe bucket (no request is made).
    pub(crate) fn new(options: &S3Options) -> Result<Self, String> {
        let url = options.url.as_str();
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("`url` {url:?} needs a scheme: s3://, gs://, az://, file://PATH or memory://")
        })?;
        let kind = match scheme {
            "s3" | "gs" | "az" => {
                if !rest.is_empty() && rest != "/" {
                    return Err(format!(
                        "`url` {url:?}: write `{scheme}://` alone; the bucket comes from each send \
                         (limit which with `buckets = [...]`)"
                    ));
                }
                Kind::Cloud(match scheme {
                    "s3" => Cloud::S3,
                    "gs" => Cloud::Gcs,
                    _ => Cloud::Azure,
                })
            }
            "file" => {
                if rest.is_empty() {
                    return Err(format!(
                        "`url` {url:?} needs a folder, e.g. file://./data/objects"
                    ));
                }
                Kind::Local(PathBuf::from(rest))
            }
            "memory" => Kind::Memory(Arc::new(InMemory::new())),
            other => {
                return Err(format!(
                    "`url` scheme `{other}` is not supported: use s3://, gs://, az://, file://PATH or memory://"
                ));
            }
        };
        let s3_only = [
            ("region", options.region.is_some()),
            ("endpoint", options.endpoint.is_some()),
            ("allow_http", options.allow_http),
            ("access_key_id", options.access_key_id.is_some()),
            ("secret_access_key", options.secret_access_key.is_some()),
            ("session_token", options.session_token.is_some()),
        ];
        if !matches!(kind, Kind::Cloud(Cloud::S3))
            && let Some((name, _)) = s3_only.iter().find(|(_, set)| *set)
        {
            return Err(format!(
                "`{name}` applies to s3:// stores only (this one is {scheme}://); \
                 other stores take `store_options`"
            ));
        }
        if matches!(kind, Kind::Local(_) | Kind::Memory(_)) && !options.store_options.is_empty() {
            return Err(format!(
                "`store_options` apply to cloud stores only (this one is {scheme}://)"
            ));
        }
        let stores = Self {
            kind,
            options: options.clone(),
            by_bucket: Mutex::new(HashMap::new()),
            uses: std::sync::atomic::AtomicU64::new(0),
            local: Mutex::new(None),
        };
        if let Kind::Cloud(cloud) = stores.kind {
            stores
                .build_cloud(cloud, PROBE_BUCKET)
                .map_err(|e| format!("the store options are not valid: {e}"))?;
        }
        Ok(stores)
    }

    /// Where objects of `bucket` go, building its store on first use.
    pub(crate) fn placement(&self, bucket: &str) -> Result<Placement, object_store::Error> {
        let shared = |store: Arc<dyn ObjectStore>| Placement {
            store,
            folder: format!("{bucket}/"),
            keeps_attributes: false,
        };
        match &self.kind {
            Kind::Memory(memory) => Ok(shared(memory.clone())),
            Kind::Local(root) => {
                let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(store) = &*local {
                    return Ok(shared(store.clone()));
                }
                std::fs::create_dir_all(root).map_err(|e| object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: format!("cannot create {}: {e}", root.display()).into(),
                })?;
                let store: Arc<dyn ObjectStore> =
                    Arc::new(LocalFileSystem::new_with_prefix(root)?.with_fsync(true));
                *local = Some(store.clone());
                Ok(shared(store))
            }
            Kind::Cloud(cloud) => {
                let mut cache = self
                    .by_bucket
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let now = self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let store = match cache.get_mut(bucket) {
                    Some((store, used)) => {
                        *used = now;
                        store.clone()
                    }
                    None => {
                        let store = self.build_cloud(*cloud, bucket)?;
                        if cache.len() >= MAX_STORES
                            && let Some(oldest) = cache
                                .iter()
                                .min_by_key(|(_, (_, used))| *used)
                                .map(|(name, _)| name.clone())
                        {
                            // Senders name buckets: a client per bucket must not pile up.
                            cache.remove(&oldest);
                        }
                        cache.insert(bucket.to_owned(), (store.clone(), now));
                        store
                    }
                };
                Ok(Placement {
                    store,
                    folder: String::new(),
                    keeps_attributes: true,
                })
            }
        }
    }

    /// The buckets to check for health: the allowed ones, else those written to so far.
    pub(crate) fn known_buckets(&self) -> Vec<String> {
        if !self.options.buckets.is_empty() {
            return self.options.buckets.clone();
        }
        // The most recently used few: a check per bucket ever named would make /readyz slow.
        let cache = self
            .by_bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut recent: Vec<(&String, u64)> = cache
            .iter()
            .map(|(name, (_, used))| (name, *used))
            .collect();
        recent.sort_by_key(|(_, used)| std::cmp::Reverse(*used));
        recent
            .into_iter()
            .take(HEALTH_BUCKETS)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The folder of a file store, for health checks.
    pub(crate) fn local_root(&self) -> Option<&std::path::Path> {
        match &self.kind {
            Kind::Local(root) => Some(root),
            _ => None,
        }
    }

    fn build_cloud(
        &self,
        cloud: Cloud,
        bucket: &str,
    ) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
        let o = &self.options;
        let client = ClientOptions::new()
            .with_timeout(o.timeout)
            .with_connect_timeout(Duration::from_secs(5).min(o.timeout));
        // The hub owns retries (with backoff, budgets and dead letters); the store's own loop
        // only smooths over a blip within one attempt.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: o.store_retries,
            retry_timeout: o.timeout,
        };
        let store: Arc<dyn ObjectStore> = match cloud {
            Cloud::S3 => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(client)
                    .with_retry(retry)
                    .with_allow_http(o.allow_http);
                if let Some(region) = &o.region {
                    builder = builder.with_region(region);
                }
                if let Some(endpoint) = &o.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(key) = &o.access_key_id {
                    builder = builder.with_access_key_id(key);
                }
                if let Some(secret) = &o.secret_access_key {
                    builder = builder.with_secret_access_key(secret);
                }
                if let Some(token) = &o.session_token {
                    builder = builder.with_token(token);
                }
                for (key, value) in &o.store_options {
                    builder = builder.with_config(AmazonS3ConfigKey::from_str(key)?, value);
                }
                Arc::new(builder.build()?)
            }
            Cloud::Gcs => {
                let mut builder = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(client)
                    .with_retry(retry);
                for (key, value) in &o.store_options {
                    builder = builder.with_config(GoogleConfigKey::from_str(key)?, value);
                }
                Arc::new(builder.build()?)
            }
            Cloud::Azure => {
                let mut builder = MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .with_client_options(client)
                    .with_retry(retry);
                for (key, value) in &o.store_options {
                    builder = builder.with_config(AzureConfigKey::from_str(key)?, value);
                }
                Arc::new(builder.build()?)
            }
        };
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets named by senders build a store each: at most MAX_STORES are kept (the least
    /// recently used go), and health looks at the few most recently used (review C6).
    #[test]
    fn stores_per_bucket_are_bounded_and_health_looks_at_the_recent_ones() {
        let options = S3Options {
            url: "s3://".to_owned(),
            endpoint: Some("http://127.0.0.1:9".to_owned()),
            allow_http: true,
            region: Some("us-east-1".to_owned()),
            access_key_id: Some("k".to_owned()),
            secret_access_key: Some("s".to_owned()),
            ..S3Options::default()
        };
        let stores = Stores::new(&options).unwrap_or_else(|e| panic!("{e}"));
        for n in 0..MAX_STORES + 100 {
            stores
                .placement(&format!("bucket-{n}"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // The first bucket is used again: it is recent now.
        stores
            .placement("bucket-0")
            .unwrap_or_else(|e| panic!("{e}"));
        let kept = stores
            .by_bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        assert_eq!(kept, MAX_STORES);
        let known = stores.known_buckets();
        assert_eq!(known.len(), HEALTH_BUCKETS);
        assert_eq!(known[0], "bucket-0");
        assert_eq!(known[1], format!("bucket-{}", MAX_STORES + 99));
    }
}
