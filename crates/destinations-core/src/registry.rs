//! Which destination kinds exist in this program, and how to build an instance of one.
//!
//! Each destination crate registers a [`DestinationPlugin`] at link time with
//! [`inventory`], and also exports `register(&mut Registry)` for linkers or programs that
//! would rather be explicit.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::ConfigError;
use crate::destination::Destination;

/// Builds one destination instance from its name and its own options (JSON, strict).
pub type BuildDestination =
    fn(&str, serde_json::Value) -> Result<Arc<dyn Destination>, ConfigError>;

/// A destination kind, as registered by its crate.
#[derive(Clone, Copy)]
pub struct DestinationPlugin {
    /// The kind name used in config (`kind = "http"`).
    pub kind: &'static str,
    /// One line saying what it does, for `destinations list`.
    pub describe: &'static str,
    /// Builds an instance.
    pub build: BuildDestination,
}

inventory::collect!(DestinationPlugin);

/// The destination kinds a program can build.
#[derive(Clone, Default)]
pub struct Registry {
    plugins: BTreeMap<&'static str, DestinationPlugin>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every kind linked into this program through `inventory`.
    ///
    /// A crate's registration is linked only if the program names the crate; the
    /// `destinations` facade names every enabled one.
    pub fn linked() -> Self {
        let mut registry = Self::new();
        for plugin in inventory::iter::<DestinationPlugin> {
            registry.register(*plugin);
        }
        registry
    }

    /// Add a kind (replacing one of the same name).
    pub fn register(&mut self, plugin: DestinationPlugin) -> &mut Self {
        self.plugins.insert(plugin.kind, plugin);
        self
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.plugins.keys().copied().collect()
    }

    /// The registered plugins, sorted by kind.
    pub fn plugins(&self) -> impl Iterator<Item = &DestinationPlugin> {
        self.plugins.values()
    }

    /// The plugin of a kind.
    pub fn get(&self, kind: &str) -> Option<&DestinationPlugin> {
        self.plugins.get(kind)
    }

    /// Build instance `instance` of kind `kind` from its options.
    pub fn build(
        &self,
        kind: &str,
        instance: &str,
        options: serde_json::Value,
    ) -> Result<Arc<dyn Destination>, ConfigError> {
        let plugin = self.get(kind).ok_or_else(|| {
            ConfigError::new(
                instance,
                format!(
                    "unknown kind `{kind}`; this build has: {} (enable a Cargo feature of the `destinations` crate for more)",
                    self.kinds().join(", ")
                ),
            )
        })?;
        (plugin.build)(instance, options)
    }
}

/// Register a destination kind at link time: `register_destination!(PLUGIN);`.
#[macro_export]
macro_rules! register_destination {
    ($plugin:expr) => {
        $crate::inventory::submit! { $plugin }
    };
}
