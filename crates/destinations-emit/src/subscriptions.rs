//! Who listens to whom: `(emitter_id pattern, listener_id, event_name)`, kept in memory and,
//! when a file is configured, on disk (rewritten whole, atomically, on every change).

use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};

use destinations_core::{InvalidPayload, glob_match};
use serde::{Deserialize, Serialize};

use crate::send::check_name;

/// One subscription: events of emitters matching `emitter_id` (`*` = any run of characters)
/// on channel `event_name` (none = the default channel) go to `listener_id`: a webhook URL, or
/// the id of an in-process listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Emitters, as a pattern: `p_orders`, `p_*`, `*`.
    pub emitter_id: String,
    /// Where events go: `https://...` (a webhook) or an in-process listener's id.
    pub listener_id: String,
    /// The channel; none (or empty) = the default channel.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub event_name: Option<String>,
}

fn empty_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(d)?;
    Ok(value.filter(|v| !v.is_empty()))
}

impl Subscription {
    /// Valid names, and a listener that is either an http(s) URL or a plain name.
    pub fn check(&self) -> Result<(), InvalidPayload> {
        check_name("emitter_id", &self.emitter_id.replace('*', "x"))?;
        if is_webhook(&self.listener_id) {
            let url = url::Url::parse(&self.listener_id).map_err(|e| {
                InvalidPayload::field("listener_id", format!("not a valid URL: {e}"))
            })?;
            if !url.username().is_empty() || url.password().is_some() {
                return Err(InvalidPayload::field(
                    "listener_id",
                    "credentials in the URL would be stored and logged; use the webhook's signing instead",
                ));
            }
        } else {
            check_name("listener_id", &self.listener_id)?;
        }
        if let Some(name) = &self.event_name {
            check_name("event_name", name)?;
        }
        Ok(())
    }

    fn matches(&self, emitter: &str, channel: Option<&str>) -> bool {
        self.event_name.as_deref() == channel && glob_match(&self.emitter_id, emitter)
    }
}

/// Whether a listener id is a webhook URL.
pub(crate) fn is_webhook(listener_id: &str) -> bool {
    listener_id.starts_with("http://") || listener_id.starts_with("https://")
}

/// Every subscription of one emit instance.
pub(crate) struct Subscriptions {
    list: RwLock<Vec<Subscription>>,
    file: Option<PathBuf>,
}

impl Subscriptions {
    /// The subscriptions saved in `file` (none if it does not exist yet).
    pub(crate) fn load(file: Option<PathBuf>) -> Result<Self, String> {
        let list = match &file {
            Some(path) if path.exists() => {
                let text = std::fs::read(path).map_err(|e| {
                    format!("cannot read `subscriptions_file` {}: {e}", path.display())
                })?;
                serde_json::from_slice(&text).map_err(|e| {
                    format!("`subscriptions_file` {} is not valid: {e}", path.display())
                })?
            }
            _ => Vec::new(),
        };
        Ok(Self {
            list: RwLock::new(list),
            file,
        })
    }

    /// Add one; `false` if it was there already (creating is idempotent).
    pub(crate) fn add(&self, subscription: Subscription) -> Result<bool, String> {
        let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
        if list.contains(&subscription) {
            return Ok(false);
        }
        // Saved first: a subscription that could not be saved is not taken.
        let mut changed = list.clone();
        changed.push(subscription);
        self.save(&changed)?;
        *list = changed;
        Ok(true)
    }

    /// Remove one; `false` if there was no such subscription.
    pub(crate) fn remove(&self, subscription: &Subscription) -> Result<bool, String> {
        let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
        let mut changed = list.clone();
        changed.retain(|s| s != subscription);
        if changed.len() == list.len() {
            return Ok(false);
        }
        self.save(&changed)?;
        *list = changed;
        Ok(true)
    }

    pub(crate) fn list(&self) -> Vec<Subscription> {
        self.list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The listeners of an event, each once, in the order they subscribed.
    pub(crate) fn listeners(&self, emitter: &str, channel: Option<&str>) -> Vec<String> {
        let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
        let mut listeners: Vec<String> = Vec::new();
        for subscription in list.iter().filter(|s| s.matches(emitter, channel)) {
            if !listeners.contains(&subscription.listener_id) {
                listeners.push(subscription.listener_id.clone());
            }
        }
        listeners
    }

    fn save(&self, list: &[Subscription]) -> Result<(), String> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let write = || -> std::io::Result<()> {
            if let Some(folder) = path.parent() {
                std::fs::create_dir_all(folder)?;
            }
            let staging = path.with_extension("json.partial");
            std::fs::write(
                &staging,
                serde_json::to_vec_pretty(list).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(&staging, path)
        };
        write().map_err(|e| format!("cannot save subscriptions to {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(emitter: &str, listener: &str, name: Option<&str>) -> Subscription {
        Subscription {
            emitter_id: emitter.into(),
            listener_id: listener.into(),
            event_name: name.map(Into::into),
        }
    }

    #[test]
    fn matching_is_by_pattern_and_channel_and_each_listener_once() {
        let subs = Subscriptions::load(None).unwrap_or_else(|e| panic!("{e}"));
        for s in [
            sub("p_*", "a", None),
            sub("p_orders", "a", None),
            sub("p_orders", "b", None),
            sub("p_orders", "c", Some("refunds")),
            sub("q_*", "d", None),
        ] {
            assert_eq!(subs.add(s.clone()), Ok(true));
            assert_eq!(subs.add(s), Ok(false), "idempotent");
        }
        assert_eq!(subs.listeners("p_orders", None), ["a", "b"]);
        assert_eq!(subs.listeners("p_orders", Some("refunds")), ["c"]);
        assert_eq!(subs.listeners("p_x", None), ["a"]);
        assert!(subs.listeners("z", None).is_empty());
        assert_eq!(subs.remove(&sub("p_*", "a", None)), Ok(true));
        assert_eq!(subs.remove(&sub("p_*", "a", None)), Ok(false));
        assert_eq!(subs.listeners("p_x", None), Vec::<String>::new());
    }

    #[test]
    fn listener_ids_are_urls_or_names() {
        assert!(
            sub("p_*", "https://hooks.example.com/x", None)
                .check()
                .is_ok()
        );
        assert!(sub("p_*", "p_listener", Some("$errors")).check().is_ok());
        assert!(
            sub("p_*", "https://user:pw@hooks.example.com/", None)
                .check()
                .is_err()
        );
        assert!(sub("p_*", "not a name", None).check().is_err());
        assert!(sub("p /*", "l", None).check().is_err());
    }
}
