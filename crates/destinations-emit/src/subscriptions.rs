//! Who listens to whom: `(emitter_id pattern, listener_id, event_name)`, kept in memory and,
//! when a file is configured, on disk (rewritten whole, atomically, on every change).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};

use destinations_core::{InvalidPayload, glob_match};
use serde::{Deserialize, Serialize};

use crate::send::check_name;

/// One subscription: events of emitters matching `emitter_id` (`*` = any run of characters)
/// on channel `event_name` (none = the default channel) go to `listener_id`: a webhook URL, or
/// the id of an in-process listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    table: RwLock<Table>,
    file: Option<PathBuf>,
}

/// The subscriptions in the order they were made, indexed so that finding an emit's
/// listeners costs what matches, not how many subscriptions there are: exact emitter ids by
/// hash, patterns (`p_*`) scanned.
#[derive(Default)]
struct Table {
    /// The subscriptions of each exact emitter id, with their place in the order.
    exact: HashMap<String, Vec<(u64, Subscription)>>,
    /// The subscriptions whose emitter is a pattern, with their place in the order.
    patterns: Vec<(u64, Subscription)>,
    /// The next place in the order.
    next: u64,
}

impl Table {
    fn from_list(list: Vec<Subscription>) -> Self {
        let mut table = Self::default();
        for subscription in list {
            if !table.contains(&subscription) {
                table.insert(subscription);
            }
        }
        table
    }

    fn contains(&self, subscription: &Subscription) -> bool {
        if subscription.emitter_id.contains('*') {
            self.patterns.iter().any(|(_, s)| s == subscription)
        } else {
            self.exact
                .get(&subscription.emitter_id)
                .is_some_and(|subs| subs.iter().any(|(_, s)| s == subscription))
        }
    }

    fn insert(&mut self, subscription: Subscription) {
        let place = self.next;
        self.next += 1;
        if subscription.emitter_id.contains('*') {
            self.patterns.push((place, subscription));
        } else {
            self.exact
                .entry(subscription.emitter_id.clone())
                .or_default()
                .push((place, subscription));
        }
    }

    fn remove(&mut self, subscription: &Subscription) -> bool {
        if !self.contains(subscription) {
            return false;
        }
        if subscription.emitter_id.contains('*') {
            self.patterns.retain(|(_, s)| s != subscription);
        } else if let Some(subs) = self.exact.get_mut(&subscription.emitter_id) {
            subs.retain(|(_, s)| s != subscription);
            if subs.is_empty() {
                self.exact.remove(&subscription.emitter_id);
            }
        }
        true
    }

    /// Every subscription, in the order they were made: what is listed and saved.
    fn ordered(&self) -> Vec<Subscription> {
        let mut all: Vec<&(u64, Subscription)> = self
            .exact
            .values()
            .flatten()
            .chain(&self.patterns)
            .collect();
        all.sort_unstable_by_key(|(place, _)| *place);
        all.into_iter().map(|(_, s)| s.clone()).collect()
    }
}

impl Subscriptions {
    /// The subscriptions saved in `file` (none if it does not exist yet).
    pub(crate) fn load(file: Option<PathBuf>) -> Result<Self, String> {
        let list: Vec<Subscription> = match &file {
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
            table: RwLock::new(Table::from_list(list)),
            file,
        })
    }

    /// Add one; `false` if it was there already (creating is idempotent).
    pub(crate) fn add(&self, subscription: Subscription) -> Result<bool, String> {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if table.contains(&subscription) {
            return Ok(false);
        }
        // Saved first: a subscription that could not be saved is not taken.
        if self.file.is_some() {
            let mut changed = table.ordered();
            changed.push(subscription.clone());
            self.save(&changed)?;
        }
        table.insert(subscription);
        Ok(true)
    }

    /// Remove one; `false` if there was no such subscription.
    pub(crate) fn remove(&self, subscription: &Subscription) -> Result<bool, String> {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if !table.contains(subscription) {
            return Ok(false);
        }
        if self.file.is_some() {
            let mut changed = table.ordered();
            changed.retain(|s| s != subscription);
            self.save(&changed)?;
        }
        Ok(table.remove(subscription))
    }

    pub(crate) fn list(&self) -> Vec<Subscription> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .ordered()
    }

    /// The listeners of an event, each once, in the order they subscribed.
    pub(crate) fn listeners(&self, emitter: &str, channel: Option<&str>) -> Vec<String> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let mut matching: Vec<&(u64, Subscription)> = table
            .exact
            .get(emitter)
            .into_iter()
            .flatten()
            .filter(|(_, s)| s.event_name.as_deref() == channel)
            .chain(
                table
                    .patterns
                    .iter()
                    .filter(|(_, s)| s.matches(emitter, channel)),
            )
            .collect();
        matching.sort_unstable_by_key(|(place, _)| *place);
        let mut listeners: Vec<String> = Vec::with_capacity(matching.len());
        for (_, subscription) in matching {
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
    fn many_exact_emitters_and_patterns_keep_the_subscription_order() {
        let subs = Subscriptions::load(None).unwrap_or_else(|e| panic!("{e}"));
        for n in 0..10_000 {
            assert_eq!(
                subs.add(sub(&format!("e{n}"), &format!("l{n}"), None)),
                Ok(true)
            );
        }
        assert_eq!(subs.add(sub("e*", "pattern", None)), Ok(true));
        assert_eq!(subs.add(sub("e7", "late", None)), Ok(true));
        assert_eq!(subs.add(sub("e7", "l7", Some("other"))), Ok(true));
        assert_eq!(subs.listeners("e7", None), ["l7", "pattern", "late"]);
        assert_eq!(subs.listeners("e7", Some("other")), ["l7"]);
        assert_eq!(subs.listeners("x", None), Vec::<String>::new());
        assert_eq!(subs.remove(&sub("e7", "l7", None)), Ok(true));
        assert_eq!(subs.listeners("e7", None), ["pattern", "late"]);
        assert_eq!(subs.list().len(), 10_002);
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
