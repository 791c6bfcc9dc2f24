//! A send as a NATS message: the payload as the body, the rest in headers, the instance in the
//! subject.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::header::NATS_MESSAGE_ID;
use bytes::Bytes;
use destinations_core::{Envelope, EventId};

const RUN: &str = "Destinations-Run";
const CREATED: &str = "Destinations-Created";
const BUDGET: &str = "Destinations-Budget";
const INSTANCE: &str = "Destinations-Instance";
const ATTEMPTS: &str = "Destinations-Attempts";
const REASON: &str = "Destinations-Reason";
const DIED: &str = "Destinations-Died";

/// Milliseconds since the epoch.
pub(crate) fn to_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The headers of a send waiting in the work stream. `Nats-Msg-Id` is `message_id`: the send's
/// id for a first publish (a publish repeated after a lost answer is dropped as a duplicate).
pub(crate) fn send_headers(envelope: &Envelope, message_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MESSAGE_ID, message_id);
    headers.insert(INSTANCE, &*envelope.destination);
    if let Some(run) = &envelope.run {
        headers.insert(RUN, &**run);
    }
    headers.insert(CREATED, to_ms(envelope.created_at).to_string().as_str());
    headers.insert(
        BUDGET,
        to_ms(envelope.budget_started_at()).to_string().as_str(),
    );
    headers
}

/// The headers of a dead letter: the send's, and why and when it died.
pub(crate) fn dead_headers(envelope: &Envelope, reason: &str, died_at: SystemTime) -> HeaderMap {
    let mut headers = send_headers(
        envelope,
        &format!("{}.dead.{}", envelope.id, to_ms(died_at)),
    );
    headers.insert(ATTEMPTS, envelope.attempts.to_string().as_str());
    // Header values are one line.
    headers.insert(REASON, reason.replace(['\r', '\n'], " ").as_str());
    headers.insert(DIED, to_ms(died_at).to_string().as_str());
    headers
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<SystemTime> {
    header(headers, name)?.parse().ok().map(from_ms)
}

/// A stored send back as an envelope; `attempts` made before this delivery.
pub(crate) fn envelope(
    headers: &HeaderMap,
    payload: Bytes,
    attempts: u32,
) -> Result<Envelope, String> {
    let id: EventId = header(headers, NATS_MESSAGE_ID.as_ref())
        .and_then(|id| id.split('.').next())
        .ok_or("no Nats-Msg-Id header")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let instance = header(headers, INSTANCE).ok_or("no instance header")?;
    let created = header_ms(headers, CREATED).ok_or("no created header")?;
    let budget = header_ms(headers, BUDGET).unwrap_or(created);
    Ok(Envelope::restored(
        id,
        Arc::from(instance),
        header(headers, RUN).map(Arc::from),
        created,
        attempts,
        payload,
        budget,
    ))
}

/// A dead letter's envelope, reason and time of death.
pub(crate) fn dead_letter(
    headers: &HeaderMap,
    payload: Bytes,
) -> Result<destinations_core::DeadLetter, String> {
    let attempts = header(headers, ATTEMPTS)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    Ok(destinations_core::DeadLetter {
        envelope: envelope(headers, payload, attempts)?,
        reason: header(headers, REASON).unwrap_or_default().to_owned(),
        died_at: header_ms(headers, DIED).unwrap_or_else(SystemTime::now),
    })
}
