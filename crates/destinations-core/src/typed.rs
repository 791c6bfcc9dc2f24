//! Destinations written over their own send types: the core parses, checks and reports; the
//! destination delivers parsed sends.
//!
//! A destination crate declares what a program sends ([`SendType`]: serde, strict, with the
//! checks that need no instance), how a stored send is read back ([`TypedDestination::Stored`],
//! often a view that borrows from the stored bytes), and how to deliver a batch of them.
//! [`Typed`] makes that a [`Destination`]: it refuses a bad payload at send time with the field
//! named, parses each stored send once per attempt, fails a stored send that no longer parses
//! (a payload written by an older version) with the reason, and builds instances from their
//! config options. [`Sender::record`](crate::Sender::record) sends any [`SendType`] without a
//! crate of its own writing an extension trait (though one reads better: `send.demo(...)`).
//!
//! ```
//! use async_trait::async_trait;
//! use destinations_core::prelude::*;
//! use destinations_core::typed::{Parsed, SendType, Typed, TypedDestination};
//! use serde::{Deserialize, Serialize};
//!
//! /// What a program sends.
//! #[derive(Serialize, Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Shout { text: String }
//!
//! impl SendType for Shout {
//!     const KIND: &'static str = "shout";
//!     fn check(&self) -> Result<(), InvalidPayload> {
//!         if self.text.is_empty() {
//!             return Err(InvalidPayload::field("text", "is empty"));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! struct Shouter;
//!
//! #[async_trait]
//! impl TypedDestination for Shouter {
//!     type Send = Shout;
//!     type Stored<'a> = Shout;
//!     type Options = serde_json::Map<String, serde_json::Value>;
//!
//!     fn from_options(_instance: &str, _options: Self::Options) -> Result<Self, String> {
//!         Ok(Shouter)
//!     }
//!
//!     async fn deliver(&self, sends: &[Parsed<'_, Self::Stored<'_>>]) -> BatchOutcome {
//!         for send in sends {
//!             println!("{}!", send.send.text.to_uppercase());
//!         }
//!         BatchOutcome::All(Report::delivered())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let hub = Hub::builder()
//!     .destination("shout", std::sync::Arc::new(Typed(Shouter)), InstanceSettings::default())
//!     .build()
//!     .unwrap();
//! let id = hub.sender().record(&Shout { text: "hello".into() }).unwrap();
//! let refused = hub.sender().record(&Shout { text: String::new() }).unwrap_err();
//! assert!(refused.to_string().contains("`text`: is empty"));
//! # hub.shutdown().await; }
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::{Deserialize, DeserializeOwned};

use crate::config::ConfigError;
use crate::destination::{Batch, BatchOutcome, Destination, HealthError, Report};
use crate::envelope::Envelope;
use crate::payload::{InvalidPayload, parse_strict};
use crate::policy::BatchPolicy;

/// What a program sends to a destination of one kind. Derive `Serialize` and `Deserialize`
/// with `#[serde(deny_unknown_fields)]`: a misspelt field is then an error that names it.
pub trait SendType: Serialize + DeserializeOwned {
    /// The kind of destination that takes it; [`Sender::record`](crate::Sender::record) sends
    /// it to the instance of that name.
    const KIND: &'static str;

    /// The checks that need no instance (a URL that parses, a name within bounds), each error
    /// naming its field ([`InvalidPayload::field`]). Default: none beyond the type's shape.
    fn check(&self) -> Result<(), InvalidPayload> {
        Ok(())
    }

    /// Its JSON Schema, for the server's API document: with the `openapi` feature, derive
    /// `utoipa::ToSchema` and answer [`SendSchema::of::<Self>()`](SendSchema::of). Default:
    /// none (the document says "any object").
    fn schema() -> Option<SendSchema> {
        None
    }
}

/// A send type's JSON Schema, for the server's API document (OpenAPI 3.1 takes JSON Schema as
/// it is).
#[derive(Clone, Debug, PartialEq)]
pub struct SendSchema {
    /// Its name among the document's schemas (`HttpRequest`).
    pub name: String,
    /// The schema; it refers to `components` as `#/components/schemas/NAME`.
    pub schema: serde_json::Value,
    /// The schemas it refers to, by name.
    pub components: Vec<(String, serde_json::Value)>,
}

#[cfg(feature = "openapi")]
impl SendSchema {
    /// The schema `utoipa::ToSchema` derives for `T`, with those it refers to.
    pub fn of<T: utoipa::ToSchema>() -> Self {
        let mut referred = Vec::new();
        T::schemas(&mut referred);
        let json = |schema: &utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>| {
            serde_json::to_value(schema).unwrap_or_default()
        };
        Self {
            name: T::name().into_owned(),
            schema: json(&T::schema()),
            components: referred
                .iter()
                .map(|(name, schema)| (name.clone(), json(schema)))
                .collect(),
        }
    }
}

/// A stored send read back for delivery, and its envelope (id, run, attempts).
pub struct Parsed<'a, T> {
    /// The send's envelope.
    pub envelope: &'a Envelope,
    /// The send as [`TypedDestination::Stored`] reads it.
    pub send: T,
}

/// A destination over typed sends; [`Typed`] makes it a [`Destination`].
#[async_trait]
pub trait TypedDestination: Send + Sync + Sized + 'static {
    /// What a program sends.
    type Send: SendType;

    /// How a stored send is read for delivery, batch groups and the instance's own checks:
    /// `Self::Send` itself, or a view that borrows what it needs from the stored bytes
    /// (`&'a str`, `&'a RawValue`) and skips the rest. Read leniently: the payload was checked
    /// strictly when it was sent.
    type Stored<'a>: Deserialize<'a> + Send + Sync;

    /// The instance's options in the config file (`[destinations.NAME]` without `kind`):
    /// derive `Deserialize` with `#[serde(deny_unknown_fields)]` and defaults.
    type Options: DeserializeOwned;

    /// An instance named `instance` with these options; an error says what to fix.
    fn from_options(instance: &str, options: Self::Options) -> Result<Self, String>;

    /// The checks that depend on this instance's configuration (an allow-list of buckets or
    /// recipients), each error naming its field. Default: none.
    fn check_for_instance(&self, _send: &Self::Stored<'_>) -> Result<(), InvalidPayload> {
        Ok(())
    }

    /// How sends are batched. Default: one per send, at once.
    fn batch_policy(&self) -> BatchPolicy {
        BatchPolicy::one_per_send()
    }

    /// Which open batch a send joins: sends of different groups never share a batch (an
    /// object store groups by bucket). Default: one group.
    fn batch_group(&self, _send: &Self::Stored<'_>) -> Option<String> {
        None
    }

    /// The most batches delivered at once, whatever the instance's `concurrency`; `Some(1)`
    /// delivers in order. Default: no limit of its own.
    fn max_concurrency(&self) -> Option<usize> {
        None
    }

    /// Hide the secrets a stored payload carries before it is shown (dead letters, `$errors`
    /// events). Default: nothing to hide.
    fn redact(&self, _payload: &mut serde_json::Value) {}

    /// Called once when the hub that holds this instance is built (see
    /// [`Destination::attach`]). Default: nothing.
    fn attach(&self, _hub: &crate::Hub) {}

    /// Whether what it delivers to can be reached (for `/readyz`). Default: ready.
    async fn health(&self) -> Result<(), HealthError> {
        Ok(())
    }

    /// Deliver a batch of parsed sends (never empty), in the order sent. Say what happened
    /// with [`BatchOutcome::All`] for the whole batch or [`BatchOutcome::Each`], one report per
    /// send in order: [`Report::delivered`], [`Report::retry`] for what may work later (the
    /// hub retries with backoff), [`Report::failed`] for what never will (dead-lettered with
    /// the error). Write the signature as it is here (`&[Parsed<'_, Self::Stored<'_>>]`), also
    /// when `Stored` is `Self::Send`.
    async fn deliver(&self, sends: &[Parsed<'_, Self::Stored<'_>>]) -> BatchOutcome;
}

/// A [`TypedDestination`] as a [`Destination`]: `Arc::new(Typed(MyDestination))`. It derefs to
/// the destination inside; [`Hub::instances_of::<Typed<D>>`](crate::Hub::instances_of) finds
/// a hub's instances of `D`.
pub struct Typed<D>(pub D);

impl<D> std::ops::Deref for Typed<D> {
    type Target = D;

    fn deref(&self) -> &D {
        &self.0
    }
}

impl<D: TypedDestination> Typed<D> {
    /// Build an instance from its config options, strictly: the registry's entry point
    /// ([`DestinationPlugin::build`](crate::DestinationPlugin)).
    pub fn from_config(
        instance: &str,
        options: serde_json::Value,
    ) -> Result<Arc<dyn Destination>, ConfigError> {
        let options: D::Options = crate::config::parse_options(instance, options)?;
        let destination =
            D::from_options(instance, options).map_err(|e| ConfigError::new(instance, e))?;
        Ok(Arc::new(Self(destination)))
    }

    fn stored(payload: &[u8]) -> Result<D::Stored<'_>, InvalidPayload> {
        serde_json::from_slice(payload).map_err(|e| InvalidPayload::whole(e.to_string()))
    }
}

#[async_trait]
impl<D: TypedDestination> Destination for Typed<D> {
    fn kind(&self) -> &'static str {
        D::Send::KIND
    }

    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        parse_strict::<D::Send>(payload)?.check()?;
        self.validate_for_instance(payload)
    }

    fn validate_for_instance(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        self.0.check_for_instance(&Self::stored(payload)?)
    }

    fn batch_policy(&self) -> BatchPolicy {
        self.0.batch_policy()
    }

    fn batch_group(&self, payload: &[u8]) -> Option<String> {
        self.0.batch_group(&Self::stored(payload).ok()?)
    }

    fn max_concurrency(&self) -> Option<usize> {
        self.0.max_concurrency()
    }

    fn redact(&self, payload: &mut serde_json::Value) {
        self.0.redact(payload);
    }

    fn attach(&self, hub: &crate::Hub) {
        self.0.attach(hub);
    }

    async fn health(&self) -> Result<(), HealthError> {
        self.0.health().await
    }

    fn send_schema(&self) -> Option<SendSchema> {
        D::Send::schema()
    }

    /// Each stored send parsed once; one that no longer parses fails with the reason, and the
    /// rest are delivered.
    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let mut parsed = Vec::with_capacity(batch.len());
        let mut unreadable = Vec::new();
        for (index, envelope) in batch.envelopes().iter().enumerate() {
            match serde_json::from_slice::<D::Stored<'_>>(&envelope.payload) {
                Ok(send) => parsed.push(Parsed { envelope, send }),
                Err(error) => unreadable.push((
                    index,
                    Report::failed(format!("the stored send no longer parses: {error}")),
                )),
            }
        }
        if unreadable.is_empty() {
            return self.0.deliver(&parsed).await;
        }
        let mut delivered = if parsed.is_empty() {
            Vec::new()
        } else {
            self.0.deliver(&parsed).await.into_reports(parsed.len())
        }
        .into_iter();
        let mut unreadable = unreadable.into_iter().peekable();
        let reports = (0..batch.len())
            .map(|index| match unreadable.next_if(|(at, _)| *at == index) {
                Some((_, report)) => report,
                None => delivered
                    .next()
                    .unwrap_or_else(|| Report::retry("the destination reported on fewer sends")),
            })
            .collect();
        BatchOutcome::Each(reports)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use serde::Deserialize;

    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Note {
        shelf: String,
        text: String,
    }

    impl SendType for Note {
        const KIND: &'static str = "notes";

        fn check(&self) -> Result<(), InvalidPayload> {
            if self.text.is_empty() {
                return Err(InvalidPayload::field("text", "is empty"));
            }
            Ok(())
        }
    }

    /// The shelf alone, borrowed.
    #[derive(Deserialize)]
    struct Shelf<'a> {
        shelf: &'a str,
    }

    #[derive(Default)]
    struct Notes {
        delivered: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl TypedDestination for Notes {
        type Send = Note;
        type Stored<'a> = Shelf<'a>;
        type Options = serde_json::Map<String, serde_json::Value>;

        fn from_options(_: &str, options: Self::Options) -> Result<Self, String> {
            match options.keys().next() {
                Some(key) => Err(format!("`{key}` is not an option")),
                None => Ok(Self::default()),
            }
        }

        fn check_for_instance(&self, send: &Shelf<'_>) -> Result<(), InvalidPayload> {
            if send.shelf == "locked" {
                return Err(InvalidPayload::field("shelf", "is locked on this instance"));
            }
            Ok(())
        }

        fn batch_group(&self, send: &Shelf<'_>) -> Option<String> {
            Some(send.shelf.to_owned())
        }

        async fn deliver(&self, sends: &[Parsed<'_, Self::Stored<'_>>]) -> BatchOutcome {
            let mut delivered = self.delivered.lock().unwrap_or_else(|e| e.into_inner());
            delivered.extend(sends.iter().map(|s| s.send.shelf.to_owned()));
            BatchOutcome::All(Report::delivered())
        }
    }

    fn envelope(payload: &str) -> Envelope {
        Envelope::new(Arc::from("notes"), None, Bytes::from(payload.to_owned()))
    }

    #[tokio::test]
    async fn a_stored_send_that_no_longer_parses_fails_with_the_reason_and_the_rest_go() {
        let notes = Typed(Notes::default());
        let batch = Batch::new(vec![
            envelope(r#"{"shelf":"a","text":"1"}"#),
            envelope(r#"{"text":"no shelf"}"#),
            envelope(r#"{"shelf":"b","text":"3"}"#),
        ]);
        let reports = notes.deliver(&batch).await.into_reports(3);
        assert_eq!(reports[0], Report::delivered());
        assert_eq!(reports[2], Report::delivered());
        match &reports[1].outcome {
            crate::Outcome::Failed { error } => assert!(
                error.contains("no longer parses") && error.contains("shelf"),
                "{error}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            *notes.delivered.lock().unwrap_or_else(|e| e.into_inner()),
            ["a", "b"]
        );
    }

    #[test]
    fn sends_are_checked_strictly_then_by_the_instance_with_the_field_named() {
        let notes = Typed(Notes::default());
        let error = |payload: &str| {
            notes
                .validate(payload.as_bytes())
                .expect_err(payload)
                .to_string()
        };
        assert!(error(r#"{"shelf":"a","text":"1","colour":1}"#).contains("colour"));
        assert!(error(r#"{"shelf":"a","text":""}"#).contains("`text`: is empty"));
        assert!(error(r#"{"shelf":"locked","text":"1"}"#).contains("`shelf`: is locked"));
        assert!(notes.validate(br#"{"shelf":"a","text":"1"}"#).is_ok());
        assert_eq!(
            notes.batch_group(br#"{"shelf":"a","text":"1"}"#).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn instances_are_built_from_strict_options_naming_the_instance() {
        let built = Typed::<Notes>::from_config("mine", serde_json::json!({}));
        assert_eq!(built.map(|d| d.kind()).ok(), Some("notes"));
        let refused = Typed::<Notes>::from_config("mine", serde_json::json!({"colour": 1}))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("mine") && refused.contains("colour"),
            "{refused}"
        );
    }
}
