//! The email destination of `destinations`: `send.email({subject, text?, html?, to?, cc?,
//! attachments?})` sends one message per send after the run — to the instance's owner unless the
//! send names recipients the instance allows — over SMTP (implicit TLS or STARTTLS, AUTH,
//! connections reused, an optional rate limit), or, with no SMTP configured, as `.eml` files in
//! an outbox folder.
//!
//! ```no_run
//! use destinations_core::prelude::*;
//! use destinations_email::{EmailSend, SendEmail};
//!
//! # async fn demo(hub: Hub) -> Result<(), SendError> {
//! let run = hub.begin_run("nightly-report");
//! run.send().email(EmailSend::text("Nightly report", "All 42 jobs passed.").with_html("<p>All <b>42</b> jobs passed.</p>"))?;
//! run.finish().await?;
//! # Ok(()) }
//! ```

mod destination;
mod options;
mod send;
mod transport;

use destinations_core::{DestinationPlugin, EventId, Registry, SendError, Sender, Typed};

pub use destination::EmailDestination;
pub use options::{EmailOptions, SmtpOptions, TlsMode};
pub use send::{Attachment, EmailSend, MAX_RECIPIENTS, MAX_SUBJECT_CHARS, allowed, check_address};

/// The kind name of this destination in config (`kind = "email"`), and the default instance.
pub const KIND: &str = "email";

/// This destination's registration.
pub const PLUGIN: DestinationPlugin = DestinationPlugin {
    kind: KIND,
    describe: "one email per send over SMTP (TLS, AUTH, rate limit), or .eml files in an outbox folder",
    build: Typed::<EmailDestination>::from_config,
};

destinations_core::register_destination!(PLUGIN);

/// Register this destination explicitly (when link-time registration is not wanted).
pub fn register(registry: &mut Registry) {
    registry.register(PLUGIN);
}

/// `send.email(...)` on a [`Sender`].
pub trait SendEmail {
    /// Send an email through the instance named `email`.
    fn email(&self, email: EmailSend) -> Result<EventId, SendError>;
    /// Send an email through the email instance named `instance`.
    fn email_to(&self, instance: &str, email: EmailSend) -> Result<EventId, SendError>;
}

impl SendEmail for Sender {
    fn email(&self, email: EmailSend) -> Result<EventId, SendError> {
        self.email_to(KIND, email)
    }

    fn email_to(&self, instance: &str, email: EmailSend) -> Result<EventId, SendError> {
        // The instance adds its own rules (recipients, sizes) when it takes the send.
        self.record_to(instance, &email)
    }
}
