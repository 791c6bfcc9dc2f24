//! The emit destination. An emit is delivered by fanning it out: one send of its own per
//! matching listener, queued into the same instance, so each listener is retried, dead-lettered
//! and reported on its own and a failing one never holds up the rest.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use destinations_core::{
    Batch, BatchOutcome, ConfigError, DeadLetter, Destination, EndpointChange, Envelope, Fanout,
    Hub, InvalidPayload, QueueError, Report, ResponseSummary, SendError, WeakHub, parse_strict,
};
use destinations_http::{HttpDestination, HttpOptions, HttpRequest};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::KIND;
use crate::history::{History, HistoryEntry, HistoryMetadata, RawEvent};
use crate::send::{ENDPOINTS_CHANNEL, ERRORS_CHANNEL, EmitSend, event_object};
use crate::subscriptions::{Subscription, Subscriptions, is_webhook};

/// Options of an emit destination instance.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmitOptions {
    /// How webhook listeners are called: the HTTP destination's options (timeout, SSRF guard
    /// allow-list, signing secrets, per-host limit).
    pub webhook: HttpOptions,
    /// An event re-emitted more than this many times in a row is dead-lettered (default 8).
    pub max_hops: u32,
    /// Events kept per emitter for `GET /v1/emitters/{id}/events` (default 100).
    pub history: usize,
    /// Emitters whose history is kept; past it the idlest is forgotten (default 10 000).
    pub max_emitters: usize,
    /// The most bytes of events the history keeps, all emitters together (default 64 MiB);
    /// past it the idlest emitters' oldest events go.
    pub history_bytes: usize,
    /// Where subscriptions are saved, so they survive a restart (default: memory only).
    pub subscriptions_file: Option<PathBuf>,
    /// Turn every dead letter of every destination into an event on `$errors` (default true).
    pub errors_channel: bool,
    /// Emit an event on `$endpoints` each time a target (an HTTP host) is paused or resumed
    /// (default true).
    pub endpoints_channel: bool,
}

impl Default for EmitOptions {
    fn default() -> Self {
        Self {
            webhook: HttpOptions::default(),
            max_hops: 8,
            history: 100,
            max_emitters: 10_000,
            history_bytes: 64 << 20,
            subscriptions_file: None,
            errors_channel: true,
            endpoints_channel: true,
        }
    }
}

/// An event as a listener receives it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Emitted {
    /// `<ms>-<seq>`, as in the emitter's history.
    pub id: String,
    /// Who emitted it.
    pub emitter_id: String,
    /// The emit's send id.
    pub emit_id: String,
    /// The channel; none for the default one.
    pub name: Option<String>,
    /// The listener it is delivered to.
    pub listener_id: String,
    /// How many emits led to this one.
    pub hops: u32,
    /// The event.
    pub event: Box<RawValue>,
}

impl Emitted {
    /// The event as a JSON value.
    pub fn event_json(&self) -> serde_json::Value {
        serde_json::from_str(self.event.get()).unwrap_or(serde_json::Value::Null)
    }

    /// An emit made in response to this event: emitted by this listener, one hop further, so
    /// the loop guard can stop a cycle of listeners. Send it with `hub.internal_sender()`, so it
    /// is taken while the hub drains at shutdown too.
    pub fn follow_up<T: Serialize + ?Sized>(&self, event: &T) -> EmitSend {
        let mut send = EmitSend::new(event).from_emitter(self.listener_id.clone());
        send.hops = self.hops + 1;
        send
    }
}

/// What an in-process listener returns: `Err` asks for the delivery to be retried.
pub type ListenerResult = Result<(), String>;

type Handler = Arc<dyn Fn(Emitted) -> BoxFuture<'static, ListenerResult> + Send + Sync>;

/// A send queued by the instance for one listener (never accepted from outside: the public
/// shape refuses the `$delivery` field).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Delivery {
    #[serde(rename = "$delivery")]
    emitted: Emitted,
}

/// The webhook body.
#[derive(Serialize)]
struct WebhookBody<'a> {
    id: &'a str,
    event: &'a RawValue,
    metadata: WebhookMetadata<'a>,
}

#[derive(Serialize)]
struct WebhookMetadata<'a> {
    emitter_id: &'a str,
    emit_id: &'a str,
    name: Option<&'a str>,
    listener_id: &'a str,
    hops: u32,
}

/// Fans events out to listeners.
pub struct EmitDestination {
    options: EmitOptions,
    pub(crate) subscriptions: Subscriptions,
    pub(crate) history: History,
    handlers: RwLock<HashMap<String, Handler>>,
    webhooks: HttpDestination,
    /// The hub and this instance's name in it, once attached.
    attached: OnceLock<(WeakHub, String)>,
    /// `$errors` events made per destination in the current second.
    errors_window: std::sync::Mutex<HashMap<String, (u64, u32)>>,
    /// On a shared queue: the hubs' fan-out and this instance's topic for subscription
    /// changes (`emit.INSTANCE.subscriptions`), which every server applies in one order.
    shared: OnceLock<(Arc<dyn Fanout>, String)>,
    /// The task that applies the other servers' subscription changes.
    hearing: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for EmitDestination {
    fn drop(&mut self) {
        if let Some(task) = self
            .hearing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// A subscription made or removed, as every server hears it.
#[derive(Serialize, Deserialize)]
struct Change {
    subscribe: bool,
    subscription: Subscription,
}

/// An emitted event kept in the history, as every server hears it.
#[derive(Serialize, Deserialize)]
struct Recorded {
    id: String,
    event: Box<RawValue>,
    emitter_id: String,
    emit_id: String,
    name: Option<String>,
}

/// A topic token for these parts (FNV-1a): what shares a token (a subscription's changes, an
/// emitter's events) shares a topic, so the fan-out keeps its newest messages together.
fn token(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([b'\n']) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

fn subscription_token(subscription: &Subscription) -> String {
    token(&[
        &subscription.emitter_id,
        &subscription.listener_id,
        subscription.event_name.as_deref().unwrap_or(""),
    ])
}

/// Apply here, in the order every server hears them, what the servers share: subscription
/// changes (`TOPIC.subscriptions.*`) and the events kept in emitters' histories
/// (`TOPIC.history.*`).
async fn hear_shared(me: std::sync::Weak<EmitDestination>, fanout: Arc<dyn Fanout>, topic: String) {
    let subscriptions = format!("{topic}.subscriptions.");
    let history = format!("{topic}.history.");
    destinations_core::hear(fanout, topic, move |message| {
        let Some(me) = me.upgrade() else {
            return false;
        };
        let applied = if message.topic.starts_with(&subscriptions) {
            match serde_json::from_slice::<Change>(&message.message) {
                Ok(change) if change.subscribe => {
                    me.subscriptions.add(change.subscription).map(drop)
                }
                Ok(change) => me.subscriptions.remove(&change.subscription).map(drop),
                Err(error) => Err(format!("a subscription change does not read: {error}")),
            }
        } else if message.topic.starts_with(&history) {
            serde_json::from_slice::<Recorded>(&message.message)
                .map(|recorded| me.history.record(recorded.into()))
                .map_err(|error| format!("a history entry does not read: {error}"))
        } else {
            Ok(())
        };
        if let Err(error) = applied {
            tracing::warn!(%error, "what another server shared was not kept here");
        }
        true
    })
    .await;
}

impl From<Recorded> for HistoryEntry {
    fn from(recorded: Recorded) -> Self {
        Self {
            id: recorded.id,
            event: RawEvent {
                raw_event: Arc::from(recorded.event),
            },
            metadata: HistoryMetadata {
                emitter_id: recorded.emitter_id,
                emit_id: recorded.emit_id,
                name: recorded.name,
            },
        }
    }
}

impl EmitDestination {
    /// An instance with these options.
    pub fn new(options: EmitOptions) -> Result<Self, String> {
        if options.history == 0 || options.max_emitters == 0 {
            return Err("`history` and `max_emitters` must be at least 1".to_owned());
        }
        Ok(Self {
            subscriptions: Subscriptions::load(options.subscriptions_file.clone())?,
            history: History::new(options.history, options.max_emitters, options.history_bytes),
            handlers: RwLock::new(HashMap::new()),
            webhooks: HttpDestination::new(options.webhook.clone())?,
            attached: OnceLock::new(),
            errors_window: std::sync::Mutex::new(HashMap::new()),
            shared: OnceLock::new(),
            hearing: std::sync::Mutex::new(None),
            options,
        })
    }

    /// Build an instance from its config options (the registry's entry point).
    pub fn from_config(
        instance: &str,
        options: serde_json::Value,
    ) -> Result<Arc<dyn Destination>, ConfigError> {
        let options: EmitOptions = destinations_core::parse_options(instance, options)?;
        Self::new(options)
            .map(|d| Arc::new(d) as Arc<dyn Destination>)
            .map_err(|message| ConfigError::new(instance, message))
    }

    /// Deliver events for `listener_id` to `handler`, in this process. An `Err` from the handler
    /// retries the delivery with the instance's retry policy.
    pub fn listen<F, Fut>(&self, listener_id: impl Into<String>, handler: F)
    where
        F: Fn(Emitted) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ListenerResult> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |emitted| Box::pin(handler(emitted)));
        self.handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(listener_id.into(), handler);
    }

    /// Subscribe `listener_id` to emitters matching `emitter_id` on `event_name`; `false` if
    /// the subscription existed already. On a shared queue the change also goes to every
    /// server, in the background ([`subscribe_everywhere`](Self::subscribe_everywhere) waits
    /// for it).
    pub fn subscribe(&self, subscription: Subscription) -> Result<bool, String> {
        subscription.check().map_err(|e| e.to_string())?;
        self.share_later(true, &subscription);
        self.subscriptions.add(subscription)
    }

    /// Remove a subscription; `false` if there was none (here). On a shared queue the change
    /// also goes to every server, in the background.
    pub fn unsubscribe(&self, subscription: &Subscription) -> Result<bool, String> {
        self.share_later(false, subscription);
        self.subscriptions.remove(subscription)
    }

    /// [`subscribe`](Self::subscribe), resolving once every server will have the subscription
    /// (on a shared queue; at once otherwise).
    ///
    /// The change applies here first (so the answer says whether it is new here), then goes
    /// to every server, this one included, which applies every change in the one order they
    /// all hear them in; if the others cannot be told, it is undone here.
    pub async fn subscribe_everywhere(&self, subscription: Subscription) -> Result<bool, String> {
        subscription.check().map_err(|e| e.to_string())?;
        let created = self.subscriptions.add(subscription.clone())?;
        if let Err(error) = self.share(true, &subscription).await {
            if created {
                let _ = self.subscriptions.remove(&subscription);
            }
            return Err(error);
        }
        Ok(created)
    }

    /// [`unsubscribe`](Self::unsubscribe), resolving once every server will have dropped it.
    pub async fn unsubscribe_everywhere(
        &self,
        subscription: &Subscription,
    ) -> Result<bool, String> {
        let removed = self.subscriptions.remove(subscription)?;
        if let Err(error) = self.share(false, subscription).await {
            if removed {
                let _ = self.subscriptions.add(subscription.clone());
            }
            return Err(error);
        }
        Ok(removed)
    }

    /// Tell every server of a subscription change (on a shared queue).
    async fn share(&self, subscribe: bool, subscription: &Subscription) -> Result<(), String> {
        let Some((fanout, topic)) = self.shared.get() else {
            return Ok(());
        };
        let change = Change {
            subscribe,
            subscription: subscription.clone(),
        };
        let message = serde_json::to_vec(&change).map_err(|e| e.to_string())?;
        fanout
            .publish(
                &format!("{topic}.subscriptions.{}", subscription_token(subscription)),
                Bytes::from(message),
            )
            .await
            .map_err(|e| format!("the other servers were not told: {e}"))
    }

    fn share_later(&self, subscribe: bool, subscription: &Subscription) {
        let Some((fanout, topic)) = self.shared.get().cloned() else {
            return;
        };
        let change = Change {
            subscribe,
            subscription: subscription.clone(),
        };
        let topic = format!("{topic}.subscriptions.{}", subscription_token(subscription));
        tokio::spawn(async move {
            let Ok(message) = serde_json::to_vec(&change) else {
                return;
            };
            if let Err(error) = fanout.publish(&topic, Bytes::from(message)).await {
                tracing::warn!(%error, "a subscription change did not reach the other servers");
            }
        });
    }

    /// Every subscription.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.subscriptions.list()
    }

    /// The newest `limit` events of an emitter.
    pub fn history(&self, emitter_id: &str, limit: usize) -> Vec<HistoryEntry> {
        self.history.recent(emitter_id, limit)
    }

    fn hub(&self) -> Option<(Hub, &str)> {
        let (hub, name) = self.attached.get()?;
        Some((hub.upgrade()?, name.as_str()))
    }

    /// Deliver an emit: one queued send per listener, all or none, then the history.
    async fn fan_out(&self, envelope: &Envelope, send: EmitSend) -> Report {
        let emitter = send
            .emitter_id
            .as_deref()
            .or(envelope.run.as_deref())
            .unwrap_or("default")
            .to_owned();
        if send.hops > self.options.max_hops {
            return Report::failed(format!(
                "loop guard: this event follows {} emits in a row (max_hops is {}); a listener probably emits back to the emitter that reached it",
                send.hops, self.options.max_hops
            ));
        }
        let event: Box<RawValue> = match event_object(&send.event) {
            Ok(event) => event.to_owned(),
            Err(error) => return Report::failed(error.to_string()),
        };
        let Some((hub, instance)) = self.hub() else {
            return Report::retry("the emit destination is not attached to a running hub");
        };
        let channel = send.channel.as_deref();
        let listeners = self.subscriptions.listeners(&emitter, channel);
        let id = self.history.next_id(&emitter);
        if !listeners.is_empty() {
            // Internal: taken while the hub drains at shutdown, so an emit still pending then
            // reaches its listeners.
            let run =
                hub.begin_internal_run(envelope.run.as_deref().unwrap_or(&emitter).to_owned());
            for listener_id in &listeners {
                let delivery = Delivery {
                    emitted: Emitted {
                        id: id.clone(),
                        emitter_id: emitter.clone(),
                        emit_id: envelope.id.to_string(),
                        name: send.channel.clone(),
                        listener_id: listener_id.clone(),
                        hops: send.hops,
                        event: event.clone(),
                    },
                };
                let queued = serde_json::to_vec(&delivery)
                    .map_err(|e| SendError::Serialize {
                        destination: instance.to_owned(),
                        message: e.to_string(),
                    })
                    .and_then(|bytes| run.send().checked(instance, KIND, Bytes::from(bytes)));
                if let Err(error) = queued {
                    return Report::failed(format!(
                        "cannot queue the delivery to `{listener_id}`: {error}"
                    ));
                }
            }
            // Inside a delivery the listeners' sends are queued with this emit's settlement;
            // a refusal can only come from a queue that is full or stopping.
            if let Err(refused) = run.finish().await {
                return match refused.error {
                    SendError::Queue(QueueError::Full(full)) => Report::retry(format!(
                        "the queue has no room for this emit's {} deliveries: {full}",
                        listeners.len()
                    )),
                    error => Report::failed(format!(
                        "this emit did not reach its listeners: {error} (replay the dead letter once the hub runs again)"
                    )),
                };
            }
        }
        let recorded = Recorded {
            id,
            event,
            emitter_id: emitter,
            emit_id: envelope.id.to_string(),
            name: send.channel,
        };
        match self.shared.get() {
            // Every server keeps the history (this one too, as it hears it).
            Some((fanout, topic)) => {
                let topic = format!("{topic}.history.{}", token(&[&recorded.emitter_id]));
                let published = match serde_json::to_vec(&recorded) {
                    Ok(message) => fanout.publish(&topic, Bytes::from(message)).await,
                    Err(error) => Err(QueueError::Unavailable(error.to_string())),
                };
                if let Err(error) = published {
                    // The listeners have the event; only the other servers' histories miss it.
                    tracing::warn!(%error, "an emitted event did not reach the other servers' histories");
                    self.history.record(recorded.into());
                }
            }
            None => self.history.record(recorded.into()),
        }
        Report::delivered().with_response(ResponseSummary {
            status: None,
            elapsed_ms: 0,
            body_excerpt: None,
            location: Some(format!("{} listener(s)", listeners.len())),
        })
    }

    /// Deliver one event to one listener.
    async fn deliver_to(&self, envelope: &Envelope, emitted: Emitted) -> Report {
        if is_webhook(&emitted.listener_id) {
            return self.call_webhook(envelope, &emitted).await;
        }
        let handler = self
            .handlers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&emitted.listener_id)
            .cloned();
        let Some(handler) = handler else {
            // Servers on a shared queue may register different listeners: leave it to one
            // that has it.
            if self.shared.get().is_some() {
                return Report::retry_after(
                    format!(
                        "no in-process listener `{}` is registered on this server; register it on every server that delivers",
                        emitted.listener_id
                    ),
                    Some(std::time::Duration::from_secs(1)),
                );
            }
            return Report::failed(format!(
                "no in-process listener `{}` is registered (EmitDestination::listen); replay this dead letter once it is",
                emitted.listener_id
            ));
        };
        match handler(emitted).await {
            Ok(()) => Report::delivered(),
            Err(error) => Report::retry(format!("the listener asked for a retry: {error}")),
        }
    }

    /// POST the event to a webhook listener, exactly as the HTTP destination would deliver a
    /// send: same guard, signing, retries classification, and the delivery's id as
    /// `Idempotency-Key`.
    async fn call_webhook(&self, envelope: &Envelope, emitted: &Emitted) -> Report {
        let body = WebhookBody {
            id: &emitted.id,
            event: &emitted.event,
            metadata: WebhookMetadata {
                emitter_id: &emitted.emitter_id,
                emit_id: &emitted.emit_id,
                name: emitted.name.as_deref(),
                listener_id: &emitted.listener_id,
                hops: emitted.hops,
            },
        };
        let request = HttpRequest::post(&emitted.listener_id)
            .json(&body)
            .header("x-destinations-emit-hops", emitted.hops.to_string());
        if let Err(error) = request.check() {
            return Report::failed(format!("the webhook listener cannot be called: {error}"));
        }
        let Ok(bytes) = serde_json::to_vec(&request) else {
            return Report::failed("the webhook request could not be serialized");
        };
        let mut call = envelope.clone();
        call.payload = Bytes::from(bytes);
        let batch = Batch::new(vec![call]);
        let outcome = self.webhooks.deliver(&batch).await;
        outcome
            .into_reports(1)
            .pop()
            .unwrap_or_else(|| Report::retry("the webhook gave no outcome"))
    }

    /// Whether another `$errors` event may be made for `destination` this second.
    fn errors_allowed(&self, destination: &str) -> bool {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut windows = self
            .errors_window
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let window = windows.entry(destination.to_owned()).or_insert((second, 0));
        if window.0 != second {
            *window = (second, 0);
        }
        window.1 += 1;
        if window.1 == ERRORS_PER_SECOND + 1 {
            tracing::warn!(
                destination,
                "more than {ERRORS_PER_SECOND} dead letters this second: their $errors events are skipped (they stay in the dead-letter list)"
            );
        }
        window.1 <= ERRORS_PER_SECOND
    }

    /// Turn a dead letter into an event on `$errors`, emitted by the run (or the destination)
    /// whose send died.
    fn report_dead_letter(&self, letter: &DeadLetter) {
        let Some((hub, instance)) = self.hub() else {
            return;
        };
        // A `$errors` event that cannot be delivered must not make another, nor may anything
        // a failure report set off (it all belongs to the `$errors` run): a listener whose
        // own alerts fail would otherwise feed `$errors` for ever.
        if (&*letter.envelope.destination == instance
            && mentions_errors_channel(&letter.envelope.payload))
            || letter.envelope.run.as_deref() == Some(ERRORS_CHANNEL)
        {
            return;
        }
        if !self.errors_allowed(&letter.envelope.destination) {
            return;
        }
        // What the destination calls secret is hidden: `$errors` events go to listeners and
        // into the history.
        let payload = hub.shown_payload(&letter.envelope.destination, &letter.envelope.payload);
        let event = serde_json::json!({
            "destination": &*letter.envelope.destination,
            "send_id": letter.envelope.id.to_string(),
            "run": letter.envelope.run.as_deref(),
            "attempts": letter.envelope.attempts,
            "error": letter.reason,
            "payload": payload,
        });
        let mut send = EmitSend::new(&event).on_channel(ERRORS_CHANNEL);
        send.emitter_id = Some(
            letter
                .envelope
                .run
                .as_deref()
                .unwrap_or(&letter.envelope.destination)
                .to_owned(),
        );
        let queued = serde_json::to_vec(&send)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                hub.internal_sender_in(ERRORS_CHANNEL)
                    .checked(instance, KIND, Bytes::from(bytes))
                    .map_err(|e| e.to_string())
            });
        if let Err(error) = queued {
            tracing::warn!(%error, send = %letter.envelope.id, "a dead letter could not be emitted on $errors");
        }
    }
}

impl EmitDestination {
    /// Turn a target paused or resumed into an event on `$endpoints`, emitted by the target.
    fn report_endpoint_change(&self, change: &EndpointChange) {
        let Some((hub, instance)) = self.hub() else {
            return;
        };
        let queued = serde_json::to_value(change)
            .map_err(|e| e.to_string())
            .and_then(|event| {
                let send = EmitSend::new(&event)
                    .on_channel(ENDPOINTS_CHANNEL)
                    .from_emitter(change.target.clone());
                serde_json::to_vec(&send).map_err(|e| e.to_string())
            })
            .and_then(|bytes| {
                hub.internal_sender_in(ENDPOINTS_CHANNEL)
                    .checked(instance, KIND, Bytes::from(bytes))
                    .map_err(|e| e.to_string())
            });
        if let Err(error) = queued {
            tracing::warn!(%error, target = %change.target, "an endpoint change could not be emitted on $endpoints");
        }
    }
}

/// The most `$errors` events one destination makes a second: a listener whose own sends fail
/// (an alert email through a broken SMTP server) cannot feed `$errors` without end. Dead
/// letters past it stay in the dead-letter list; only their `$errors` event is skipped.
const ERRORS_PER_SECOND: u32 = 100;

/// Whether a stored emit or delivery is on the `$errors` channel.
fn mentions_errors_channel(payload: &[u8]) -> bool {
    match serde_json::from_slice::<Delivery>(payload) {
        Ok(delivery) => delivery.emitted.name.as_deref() == Some(ERRORS_CHANNEL),
        Err(_) => serde_json::from_slice::<EmitSend>(payload)
            .is_ok_and(|send| send.channel.as_deref() == Some(ERRORS_CHANNEL)),
    }
}

#[async_trait]
impl Destination for EmitDestination {
    fn send_schema(&self) -> Option<destinations_core::SendSchema> {
        <crate::send::EmitSend as destinations_core::SendType>::schema()
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self, payload: &[u8]) -> Result<(), InvalidPayload> {
        let send: EmitSend = parse_strict(payload)?;
        send.check()
    }

    fn attach(&self, hub: &Hub) {
        let Some((name, me)) = hub
            .instances_of::<Self>()
            .into_iter()
            .find(|(_, instance)| std::ptr::eq(instance.as_ref(), self))
        else {
            return;
        };
        if self.attached.set((hub.downgrade(), name.clone())).is_err() {
            return;
        }
        if let Some(fanout) = hub.fanout() {
            let topic = format!("emit.{name}");
            if self.shared.set((fanout.clone(), topic.clone())).is_ok() {
                let task = tokio::spawn(hear_shared(Arc::downgrade(&me), fanout, topic));
                *self.hearing.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
            }
        }
        if self.options.endpoints_channel {
            let me = Arc::downgrade(&me);
            hub.on_endpoint_change(Arc::new(move |change| {
                if let Some(me) = me.upgrade() {
                    me.report_endpoint_change(change);
                }
            }));
        }
        if self.options.errors_channel {
            let me = Arc::downgrade(&me);
            hub.on_dead_letter(Arc::new(move |letter| {
                if let Some(me) = me.upgrade() {
                    me.report_dead_letter(letter);
                }
            }));
        }
    }

    /// A delivery's listener: a webhook's `host:port` (limited like the HTTP destination's
    /// hosts), or the in-process listener by name. One listener that hangs or one webhook
    /// host that stalls then holds only its own slots.
    fn target(&self, payload: &[u8]) -> Option<String> {
        #[derive(Deserialize)]
        struct ListenerOnly {
            #[serde(rename = "$delivery")]
            delivery: ListenerId,
        }
        #[derive(Deserialize)]
        struct ListenerId {
            listener_id: String,
        }
        let listener = serde_json::from_slice::<ListenerOnly>(payload)
            .ok()?
            .delivery
            .listener_id;
        if is_webhook(&listener) {
            HttpDestination::host_of(&listener)
        } else {
            Some(format!("listener {listener}"))
        }
    }

    fn per_target_concurrency(&self) -> Option<usize> {
        Some(self.webhooks.per_host_concurrency())
    }

    /// A webhook listener's URL may carry a token in its query: hidden where it is shown.
    fn redact(&self, payload: &mut serde_json::Value) {
        if let Some(serde_json::Value::String(listener)) =
            payload.pointer_mut("/$delivery/listener_id")
            && is_webhook(listener)
        {
            *listener = destinations_http::redact_url(listener);
        }
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        let mut reports = Vec::with_capacity(batch.len());
        for envelope in batch.envelopes() {
            let report = match serde_json::from_slice::<Delivery>(&envelope.payload) {
                Ok(delivery) => self.deliver_to(envelope, delivery.emitted).await,
                Err(_) => match serde_json::from_slice::<EmitSend>(&envelope.payload) {
                    Ok(send) => self.fan_out(envelope, send).await,
                    Err(e) => Report::failed(format!("the stored emit no longer parses: {e}")),
                },
            };
            reports.push(report);
        }
        BatchOutcome::Each(reports)
    }
}
