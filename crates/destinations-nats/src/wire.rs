//! Sends as NATS messages.
//!
//! In the work stream, one message holds several sends of one destination instance (a run's
//! sends to it, or a batch to try again): a *bundle*, its instance and the sends' count in the
//! subject, each send framed in the body. A run costs nats-server one stored message per
//! instance instead of one per send. A dead letter is one message per send: the payload as the
//! body, the rest in headers.

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
/// A bundle not to be handed out before this time (ms since the epoch): a retry's due time.
const NOT_BEFORE: &str = "Destinations-Not-Before";
/// A bundle that is one batch to try again, as it is.
const RETRY: &str = "Destinations-Retry";
/// A bundle of dead letters queued again: their statuses hold attempts made before.
const REPLAYED: &str = "Destinations-Replayed";

/// The first byte of a bundle's body: its format.
const BUNDLE_FORMAT: u8 = 1;
/// A send's frame before its run and payload: id, created, budget start, attempts, run length,
/// payload length.
const FRAME: usize = 16 + 8 + 8 + 4 + 2 + 4;
/// The run length that says "no run".
const NO_RUN: u16 = u16::MAX;

/// Milliseconds since the epoch.
pub(crate) fn to_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The headers of a send stored as a message of its own (a dead letter): its id (in
/// `Nats-Msg-Id`, before the first `.` of `message_id`), instance, run and times.
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

/// The bytes a send takes in a bundle's body.
pub(crate) fn framed_len(envelope: &Envelope) -> usize {
    FRAME + envelope.run.as_ref().map_or(0, |run| run.len()) + envelope.payload.len()
}

/// A bundle's body: every send framed, in order.
pub(crate) fn bundle_body(envelopes: &[&Envelope]) -> Bytes {
    let size = 1 + envelopes.iter().map(|e| framed_len(e)).sum::<usize>();
    let mut body = Vec::with_capacity(size);
    body.push(BUNDLE_FORMAT);
    for envelope in envelopes {
        body.extend_from_slice(&envelope.id.to_bytes());
        body.extend_from_slice(&to_ms(envelope.created_at).to_le_bytes());
        body.extend_from_slice(&to_ms(envelope.budget_started_at()).to_le_bytes());
        body.extend_from_slice(&envelope.attempts.to_le_bytes());
        let run = envelope.run.as_deref().unwrap_or_default().as_bytes();
        // A run name is a short label; one too long for a frame is cut, not refused.
        let run = &run[..run.len().min(usize::from(NO_RUN - 1))];
        let run_len = if envelope.run.is_some() {
            u16::try_from(run.len()).unwrap_or(NO_RUN - 1)
        } else {
            NO_RUN
        };
        body.extend_from_slice(&run_len.to_le_bytes());
        let payload_len = u32::try_from(envelope.payload.len()).unwrap_or(u32::MAX);
        body.extend_from_slice(&payload_len.to_le_bytes());
        body.extend_from_slice(run);
        body.extend_from_slice(&envelope.payload);
    }
    Bytes::from(body)
}

/// How a bundle is to be handed out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Handling {
    /// Not before this time: a retry's due time.
    pub(crate) not_before: Option<SystemTime>,
    /// One batch to try again as it is.
    pub(crate) retry: bool,
    /// Dead letters queued again.
    pub(crate) replayed: bool,
}

/// The headers of a bundle: its message id (`None` for a bundle that may be published again
/// with other sends: a retry, or sends handed back) and how it is to be handed out.
pub(crate) fn bundle_headers(message_id: Option<&str>, handling: Handling) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(id) = message_id {
        headers.insert(NATS_MESSAGE_ID, id);
    }
    if let Some(at) = handling.not_before {
        headers.insert(NOT_BEFORE, to_ms(at).to_string().as_str());
    }
    if handling.retry {
        headers.insert(RETRY, "1");
    }
    if handling.replayed {
        headers.insert(REPLAYED, "1");
    }
    headers
}

/// How a stored bundle is to be handed out, from its headers.
pub(crate) fn handling(headers: Option<&HeaderMap>) -> Handling {
    Handling {
        not_before: headers.and_then(|h| header_ms(h, NOT_BEFORE)),
        retry: headers.and_then(|h| header(h, RETRY)).is_some(),
        replayed: headers.and_then(|h| header(h, REPLAYED)).is_some(),
    }
}

fn take<const N: usize>(body: &[u8], at: &mut usize) -> Result<[u8; N], String> {
    let bytes = body
        .get(*at..*at + N)
        .ok_or("the bundle ends inside a send's frame")?;
    *at += N;
    Ok(bytes.try_into().unwrap_or([0; N]))
}

/// A bundle's sends back as envelopes, sharing the body's memory.
pub(crate) fn unbundle(instance: &Arc<str>, body: &Bytes) -> Result<Vec<Envelope>, String> {
    match body.first() {
        Some(&BUNDLE_FORMAT) => {}
        Some(other) => return Err(format!("a bundle of format {other}, not {BUNDLE_FORMAT}")),
        None => return Err("an empty bundle".into()),
    }
    let mut at = 1;
    let mut envelopes = Vec::new();
    while at < body.len() {
        let id = EventId::from_bytes(take::<16>(body, &mut at)?);
        let created = from_ms(u64::from_le_bytes(take::<8>(body, &mut at)?));
        let budget = from_ms(u64::from_le_bytes(take::<8>(body, &mut at)?));
        let attempts = u32::from_le_bytes(take::<4>(body, &mut at)?);
        let run_len = u16::from_le_bytes(take::<2>(body, &mut at)?);
        let payload_len = u32::from_le_bytes(take::<4>(body, &mut at)?) as usize;
        let run = if run_len == NO_RUN {
            None
        } else {
            let end = at + usize::from(run_len);
            let run = body
                .get(at..end)
                .ok_or("the bundle ends inside a run name")?;
            at = end;
            Some(Arc::from(
                std::str::from_utf8(run).map_err(|_| "a run name that is not UTF-8")?,
            ))
        };
        let end = at + payload_len;
        if end > body.len() {
            return Err("the bundle ends inside a payload".into());
        }
        let payload = body.slice(at..end);
        at = end;
        envelopes.push(Envelope::restored(
            id,
            instance.clone(),
            run,
            created,
            attempts,
            payload,
            budget,
        ));
    }
    if envelopes.is_empty() {
        return Err("a bundle with no sends".into());
    }
    Ok(envelopes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(run: Option<&str>, payload: &'static [u8], attempts: u32) -> Envelope {
        let mut envelope = Envelope::new(
            Arc::from("http"),
            run.map(Arc::from),
            Bytes::from_static(payload),
        );
        envelope.attempts = attempts;
        envelope
    }

    #[test]
    fn a_bundle_gives_back_every_send_as_it_went_in() {
        let sends = [
            envelope(Some("run-1"), br#"{"url":"http://a"}"#, 0),
            envelope(None, b"", 3),
            envelope(Some(""), br#"{"n":2}"#, 1),
        ];
        let body = bundle_body(&sends.iter().collect::<Vec<_>>());
        assert_eq!(body.len(), 1 + sends.iter().map(framed_len).sum::<usize>());
        let back = unbundle(&Arc::from("http"), &body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.len(), sends.len());
        for (sent, got) in sends.iter().zip(&back) {
            assert_eq!(got.id, sent.id);
            assert_eq!(got.run, sent.run);
            assert_eq!(got.payload, sent.payload);
            assert_eq!(got.attempts, sent.attempts);
            assert_eq!(to_ms(got.created_at), to_ms(sent.created_at));
            assert_eq!(&*got.destination, "http");
        }
    }

    #[test]
    fn a_cut_bundle_is_refused_not_misread() {
        let sends = [envelope(Some("run"), br#"{"n":1}"#, 0)];
        let body = bundle_body(&sends.iter().collect::<Vec<_>>());
        for cut in 1..body.len() {
            assert!(
                unbundle(&Arc::from("http"), &body.slice(..cut)).is_err(),
                "a bundle cut at {cut} of {} bytes was read",
                body.len()
            );
        }
        assert!(unbundle(&Arc::from("http"), &Bytes::new()).is_err());
        assert!(unbundle(&Arc::from("http"), &Bytes::from_static(&[9])).is_err());
    }

    #[test]
    fn handling_round_trips_through_headers() {
        let at = from_ms(1_700_000_000_123);
        for handling in [
            Handling::default(),
            Handling {
                not_before: Some(at),
                retry: true,
                replayed: false,
            },
            Handling {
                replayed: true,
                ..Handling::default()
            },
        ] {
            let headers = bundle_headers(Some("id"), handling);
            assert_eq!(super::handling(Some(&headers)), handling);
        }
        assert_eq!(handling(None), Handling::default());
    }
}
