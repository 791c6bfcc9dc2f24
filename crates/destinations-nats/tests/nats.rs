//! The NATS queue against a real nats-server on 127.0.0.1 (`cargo xtask setup` installs it):
//! several hubs — servers, as far as the queue can tell — share one backlog.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use destinations_core::{
    AttemptOutcome, Batch, BatchOutcome, DeadLetterFilter, Destination, EventFilter, EventId, Hub,
    HubBuilder, HubConfig, InstanceSettings, InvalidPayload, Report, SendStatus, State,
};
use destinations_nats::{NatsOptions, NatsQueue};
use destinations_testkit::NatsServer;
use serde_json::json;
use tokio::sync::Notify;

/// Counts deliveries by send id; fails permanently while `refusing`; holds every delivery
/// while `holding`, until `release`.
#[derive(Default)]
struct Counting {
    delivered: Mutex<HashMap<EventId, u32>>,
    arrived: Notify,
    refusing: AtomicBool,
    holding: AtomicBool,
    release: Notify,
    /// Told when a delivery starts.
    entered: Notify,
    /// One attempt at a time, to keep the sends in order (as SSE does).
    in_order: bool,
    /// Fail the next attempt with an error worth retrying.
    failing_once: AtomicBool,
    /// Each attempt's sends, in order.
    attempts: Mutex<Vec<Vec<EventId>>>,
}

impl Counting {
    fn counts(&self) -> HashMap<EventId, u32> {
        self.delivered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Wait until every one of `ids` was delivered at least once.
    async fn wait_for(&self, ids: &[EventId]) {
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let arrived = self.arrived.notified();
                let counts = self.counts();
                if ids.iter().all(|id| counts.contains_key(id)) {
                    return;
                }
                arrived.await;
            }
        })
        .await;
        let counts = self.counts();
        let missing = ids.iter().filter(|id| !counts.contains_key(id)).count();
        assert!(
            waited.is_ok(),
            "{missing} of {} sends never arrived",
            ids.len()
        );
    }
}

#[async_trait]
impl Destination for Counting {
    fn kind(&self) -> &'static str {
        "counting"
    }

    fn validate(&self, _: &[u8]) -> Result<(), InvalidPayload> {
        Ok(())
    }

    fn max_concurrency(&self) -> Option<usize> {
        self.in_order.then_some(1)
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        self.entered.notify_waiters();
        while self.holding.load(Ordering::Acquire) {
            let released = self.release.notified();
            if !self.holding.load(Ordering::Acquire) {
                break;
            }
            released.await;
        }
        self.attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(batch.envelopes().iter().map(|e| e.id).collect());
        if self.refusing.load(Ordering::Acquire) {
            return BatchOutcome::All(Report::failed("refused: the test says no"));
        }
        if self.failing_once.swap(false, Ordering::AcqRel) {
            return BatchOutcome::All(Report::retry("busy: the test says later"));
        }
        {
            let mut delivered = self
                .delivered
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for envelope in batch.envelopes() {
                *delivered.entry(envelope.id).or_default() += 1;
            }
        }
        self.arrived.notify_waiters();
        BatchOutcome::All(Report::delivered())
    }
}

/// A hub on the shared queue, delivering instance `sink` to `destination`.
async fn node(server: &NatsServer, destination: Arc<Counting>) -> Hub {
    node_with(server, destination, HubConfig::default()).await
}

/// Two servers of a cluster may be named, comma-separated: one that is down is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_may_list_several_servers() {
    let server = NatsServer::start().await;
    let down = destinations_testkit::Receiver::unused_address();
    let options = NatsOptions::at(format!("nats://{down}, {}", server.url()));
    let sink = Arc::new(Counting::default());
    let hub = node_on(options, sink.clone(), HubConfig::default()).await;
    let ids = send_runs(&hub, 1, 3).await;
    sink.wait_for(&ids).await;
    hub.shutdown().await;
}

async fn node_with(server: &NatsServer, destination: Arc<Counting>, config: HubConfig) -> Hub {
    node_on(NatsOptions::at(server.url()), destination, config).await
}

async fn node_on(options: NatsOptions, destination: Arc<Counting>, config: HubConfig) -> Hub {
    builder_on(options, destination, config)
        .await
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The builder of such a hub, for a test that changes more.
async fn builder_on(
    options: NatsOptions,
    destination: Arc<Counting>,
    config: HubConfig,
) -> HubBuilder {
    let queue = NatsQueue::connect(options, &config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    Hub::builder()
        .config(config)
        .queue(Arc::new(queue))
        .destination("sink", destination, InstanceSettings::default())
}

/// The status of `id` once it is final on `hub` (within `seconds`).
async fn final_status(hub: &Hub, id: EventId, seconds: u64) -> SendStatus {
    hub.wait_final(id, Duration::from_secs(seconds))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("{id} unknown to this server"))
}

/// Send `runs` runs of `size` from `hub`; their ids.
async fn send_runs(hub: &Hub, runs: usize, size: usize) -> Vec<EventId> {
    let mut ids = Vec::new();
    for r in 0..runs {
        let run = hub.begin_run(format!("run-{r}"));
        for n in 0..size {
            run.send()
                .to("sink", &json!({ "run": r, "n": n }))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        ids.extend(run.finish().await.unwrap_or_else(|e| panic!("{e}")));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_spread_over_three_servers_arrive_once_each() {
    let server = NatsServer::start().await;
    let sink = Arc::new(Counting::default());
    let nodes = [
        node(&server, sink.clone()).await,
        node(&server, sink.clone()).await,
        node(&server, sink.clone()).await,
    ];
    let mut ids = Vec::new();
    for hub in &nodes {
        ids.extend(send_runs(hub, 10, 30).await);
    }
    // One alone too (a single publish rather than an atomic batch).
    ids.extend(send_runs(&nodes[1], 1, 1).await);
    sink.wait_for(&ids).await;
    let counts = sink.counts();
    let duplicates: u32 = counts.values().map(|c| c - 1).sum();
    assert_eq!(counts.len(), ids.len(), "only the sends made arrived");
    assert_eq!(duplicates, 0, "no send arrived twice on a healthy run");
    // Nor was any handed out twice: a message nats-server sent that a server left unread
    // would come back after the lease time, its attempt count one higher.
    for id in &ids {
        let status = final_status(&nodes[0], *id, 10).await;
        assert_eq!(status.attempts, 1, "{id} was handed out more than once");
    }
    // Every server answers for every send.
    for id in [ids[0], ids[150], ids[ids.len() - 1]] {
        for hub in &nodes {
            let status = final_status(hub, id, 10).await;
            assert_eq!(status.state, State::Delivered, "{id}");
            assert_eq!(&*status.destination, "sink");
        }
    }
    // Every server lists every send, newest first, in pages (the status stream is read in
    // windows that grow: 301 sends and pages of 40 take several).
    for hub in [&nodes[0], &nodes[2]] {
        let mut listed = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = hub
                .events(&EventFilter::default(), after.as_deref(), 40)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            listed.extend(page.events.iter().map(|s| s.id));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let mut newest_first = ids.clone();
        newest_first.sort_unstable_by(|a, b| b.cmp(a));
        assert!(listed == newest_first, "every send once, newest first");
        let one_run = EventFilter {
            run: Some("run-3".to_owned()),
            state: Some(State::Delivered),
            ..EventFilter::default()
        };
        let page = hub.events(&one_run, None, 1000).await;
        assert_eq!(page.unwrap_or_else(|e| panic!("{e}")).events.len(), 90);
    }
    for hub in &nodes {
        hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_made_on_one_server_is_listed_and_replayed_on_another() {
    let server = NatsServer::start().await;
    let sink = Arc::new(Counting::default());
    sink.refusing.store(true, Ordering::Release);
    let a = node(&server, sink.clone()).await;
    let b = node(&server, sink.clone()).await;
    let ids = send_runs(&a, 1, 3).await;
    for id in &ids {
        let status = final_status(&b, *id, 30).await;
        assert_eq!(status.state, State::Dead);
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("the test says no")),
            "{status:?}"
        );
    }
    let listed = b.dead_letters(100).await.unwrap_or_else(|e| panic!("{e}"));
    let mut listed_ids: Vec<EventId> = listed.iter().map(|l| l.envelope.id).collect();
    listed_ids.sort();
    let mut made = ids.clone();
    made.sort();
    assert_eq!(listed_ids, made, "the other server lists every dead letter");
    assert!(listed.iter().all(|l| l.reason.contains("the test says no")));

    sink.refusing.store(false, Ordering::Release);
    let replayed = b
        .replay_dead_letters(&DeadLetterFilter::default(), 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(replayed.len(), 3);
    sink.wait_for(&ids).await;
    for id in &ids {
        let status = final_status(&a, *id, 10).await;
        assert_eq!(status.state, State::Delivered, "replayed and delivered");
        let log = status.attempts_log.unwrap_or_default();
        let outcomes: Vec<_> = log.iter().map(|a| (a.number, a.outcome)).collect();
        assert_eq!(
            outcomes,
            [(1, AttemptOutcome::Failed), (1, AttemptOutcome::Delivered)],
            "the attempt before the replay is kept, whichever server made it"
        );
        assert!(
            log[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains("the test says no"))
        );
    }
    assert!(
        a.dead_letters(100)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty(),
        "replayed letters leave the dead-letter stream"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_refused_while_nats_is_down_and_accepted_again_after() {
    let mut server = NatsServer::start().await;
    let sink = Arc::new(Counting::default());
    let hub = node(&server, sink.clone()).await;
    let before = send_runs(&hub, 1, 5).await;
    sink.wait_for(&before).await;

    server.kill().await;
    // The client notices the closed connection at once; a send then is refused, not kept in
    // memory.
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let run = hub.begin_run("during");
            run.send()
                .to("sink", &json!({ "during": true }))
                .unwrap_or_else(|e| panic!("{e}"));
            match run.finish().await {
                Err(error) => return error.to_string(),
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a send was still accepted 30 s after nats-server died"));
    assert!(
        refused.contains("not reachable") || refused.contains("unavailable"),
        "{refused}"
    );

    server.restart().await;
    let after = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let run = hub.begin_run("after");
            run.send()
                .to("sink", &json!({ "after": true }))
                .unwrap_or_else(|e| panic!("{e}"));
            if let Ok(ids) = run.finish().await {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("sends still refused 30 s after nats-server came back"));
    sink.wait_for(&after).await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_the_shared_bound_is_refused_whole() {
    let server = NatsServer::start().await;
    let sink = Arc::new(Counting::default());
    let mut config = HubConfig::default();
    // Room for one run of four 3 kB sends, not two.
    config.queue.bounds.max_bytes = 20_000;
    let hub = node_with(&server, sink.clone(), config).await;
    let pad = "x".repeat(3_000);
    let run_of_four = |name: &str| {
        let run = hub.begin_run(name);
        for n in 0..4 {
            run.send()
                .to("sink", &json!({ "n": n, "pad": pad }))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        run
    };
    // Four sends wait in the stream (leased, their delivery held)...
    sink.holding.store(true, Ordering::Release);
    let first = run_of_four("first")
        .finish()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // ... so four more do not fit, and none of them is stored.
    let refused = run_of_four("too-long")
        .finish()
        .await
        .err()
        .unwrap_or_else(|| panic!("24 kB of sends were accepted by a queue bounded at 20 kB"))
        .to_string();
    assert!(refused.contains("the shared queue is full"), "{refused}");
    sink.holding.store(false, Ordering::Release);
    sink.release.notify_waiters();
    sink.wait_for(&first).await;
    let fits = send_runs(&hub, 1, 3).await;
    sink.wait_for(&fits).await;
    assert_eq!(
        sink.counts().len(),
        7,
        "nothing of the refused run was delivered"
    );
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_keeps_what_it_holds_past_the_lease_time() {
    let server = NatsServer::start().await;
    let mut options = NatsOptions::at(server.url());
    options.lease = Duration::from_secs(1);
    let slow = Arc::new(Counting::default());
    slow.holding.store(true, Ordering::Release);
    let a = node_on(options.clone(), slow.clone(), HubConfig::default()).await;
    let entered = slow.entered.notified();
    let ids = send_runs(&a, 1, 5).await;
    entered.await;
    // Another server asks for work while the first holds the sends for several lease times:
    // it gets none of them.
    let other = Arc::new(Counting::default());
    let b = node_on(options, other.clone(), HubConfig::default()).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    slow.holding.store(false, Ordering::Release);
    slow.release.notify_waiters();
    slow.wait_for(&ids).await;
    for id in &ids {
        let status = final_status(&a, *id, 10).await;
        assert_eq!(status.state, State::Delivered);
    }
    assert!(
        other.counts().is_empty(),
        "the other server delivered sends the first still held: {:?}",
        other.counts()
    );
    assert!(slow.counts().values().all(|n| *n == 1));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_at_a_time_delivers_an_in_order_instance_and_hands_it_on_when_it_stops() {
    let server = NatsServer::start().await;
    let in_order = || {
        Arc::new(Counting {
            in_order: true,
            ..Counting::default()
        })
    };
    let (first, second) = (in_order(), in_order());
    let a = node(&server, first.clone()).await;
    let b = node(&server, second.clone()).await;
    let mut ids = send_runs(&a, 2, 10).await;
    ids.extend(send_runs(&b, 2, 10).await);
    let all = |sink: &Counting| ids.iter().all(|id| sink.counts().contains_key(id));
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let (one, two) = (first.arrived.notified(), second.arrived.notified());
            let (a_has, b_has) = (first.counts(), second.counts());
            if ids
                .iter()
                .all(|id| a_has.contains_key(id) || b_has.contains_key(id))
            {
                return;
            }
            tokio::select! {
                () = one => {}
                () = two => {}
            }
        }
    })
    .await;
    assert!(waited.is_ok(), "not all 40 sends arrived");
    assert!(
        all(&first) || all(&second),
        "no single server delivered all 40"
    );
    let (holder, other, holder_sink, other_sink) = if all(&first) {
        (a, b, first, second)
    } else {
        (b, a, second, first)
    };
    assert!(
        other_sink.counts().is_empty(),
        "both servers delivered the in-order instance"
    );
    // The holder stops: the other takes the instance at once (not after the lease time).
    holder.shutdown().await;
    drop(holder);
    let after = send_runs(&other, 1, 5).await;
    other_sink.wait_for(&after).await;
    assert_eq!(holder_sink.counts().len(), 40);
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_on_one_server_wakes_when_another_finishes_the_send() {
    let server = NatsServer::start().await;
    let sink = Arc::new(Counting::default());
    sink.holding.store(true, Ordering::Release);
    let delivering = node(&server, sink.clone()).await;
    // A server that delivers nothing: only the other can finish the send.
    let api = builder_on(
        NatsOptions::at(server.url()),
        Arc::new(Counting::default()),
        HubConfig::default(),
    )
    .await
    .delivering(false)
    .build()
    .unwrap_or_else(|e| panic!("{e}"));
    let entered = sink.entered.notified();
    let ids = send_runs(&api, 1, 1).await;
    entered.await;
    let waiting = {
        let api = api.clone();
        let id = ids[0];
        // An hour: only a wake ends it sooner.
        tokio::spawn(async move { api.wait_final(id, Duration::from_secs(3600)).await })
    };
    sink.holding.store(false, Ordering::Release);
    sink.release.notify_waiters();
    let status = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .unwrap_or_else(|_| panic!("the wait was not woken when the other server finished"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("unknown send"));
    assert_eq!(status.state, State::Delivered);
    delivering.shutdown().await;
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_failed_comes_back_whole() {
    let server = NatsServer::start().await;
    let sink = Arc::new(Counting::default());
    sink.failing_once.store(true, Ordering::Release);
    let config = HubConfig::default();
    let queue = NatsQueue::connect(NatsOptions::at(server.url()), &config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut settings = InstanceSettings::default();
    settings.batch.max_events = Some(10);
    settings.batch.max_age = Some(Duration::from_millis(200));
    settings.retry.initial_delay = Duration::from_millis(100);
    let hub = Hub::builder()
        .config(config)
        .queue(Arc::new(queue))
        .destination("sink", sink.clone(), settings)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let ids = send_runs(&hub, 1, 10).await;
    sink.wait_for(&ids).await;
    let attempts = sink
        .attempts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(
        attempts.len(),
        2,
        "one failed attempt, one delivered: {attempts:?}"
    );
    assert_eq!(
        attempts[0], ids,
        "the first attempt held the whole run, in order"
    );
    assert_eq!(
        attempts[1], attempts[0],
        "the retry was not the batch that failed"
    );
    hub.shutdown().await;
}

/// Delivers the first `delivering` sends it is given and never finishes the rest: a server
/// that dies mid-delivery.
struct DiesMidway {
    delivering: usize,
    delivered: Mutex<Vec<EventId>>,
    arrived: Notify,
}

#[async_trait]
impl Destination for DiesMidway {
    fn kind(&self) -> &'static str {
        "dies-midway"
    }

    fn validate(&self, _: &[u8]) -> Result<(), InvalidPayload> {
        Ok(())
    }

    async fn deliver(&self, batch: &Batch) -> BatchOutcome {
        {
            let mut delivered = self
                .delivered
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if delivered.len() < self.delivering {
                delivered.extend(batch.envelopes().iter().map(|e| e.id));
                self.arrived.notify_waiters();
                return BatchOutcome::All(Report::delivered());
            }
        }
        std::future::pending().await
    }
}

/// A server dies (its runtime and connection gone, nothing handed back) holding a run it had
/// half delivered: another server delivers only the half it had not finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_holding_a_run_hands_on_only_what_it_had_not_finished() {
    let server = NatsServer::start().await;
    let mut options = NatsOptions::at(server.url());
    options.lease = Duration::from_secs(1);
    let dying = Arc::new(DiesMidway {
        delivering: 5,
        delivered: Mutex::new(Vec::new()),
        arrived: Notify::new(),
    });
    let (ids, runtime) = {
        let (options, dying) = (options.clone(), dying.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            let ids = runtime.block_on(async {
                let config = HubConfig::default();
                let queue = NatsQueue::connect(options, &config)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let hub = Hub::builder()
                    .config(config)
                    .queue(Arc::new(queue))
                    .destination("sink", dying.clone(), InstanceSettings::default())
                    .build()
                    .unwrap_or_else(|e| panic!("{e}"));
                let ids = send_runs(&hub, 1, 10).await;
                tokio::time::timeout(Duration::from_secs(60), async {
                    loop {
                        let arrived = dying.arrived.notified();
                        if dying
                            .delivered
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .len()
                            >= 5
                        {
                            return;
                        }
                        arrived.await;
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("the first server never delivered half the run"));
                // Its statuses are written before it is killed.
                let delivered = dying
                    .delivered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                for id in delivered {
                    assert_eq!(final_status(&hub, id, 10).await.state, State::Delivered);
                }
                // Killed, not stopped: nothing of it runs after this.
                std::mem::forget(hub);
                ids
            });
            (ids, runtime)
        })
        .join()
        .unwrap_or_else(|_| panic!("the first server panicked"))
    };
    runtime.shutdown_background();
    let finished = dying
        .delivered
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(finished.len(), 5);
    let unfinished: Vec<EventId> = ids
        .iter()
        .filter(|id| !finished.contains(id))
        .copied()
        .collect();
    let sink = Arc::new(Counting::default());
    let other = node_on(options, sink.clone(), HubConfig::default()).await;
    sink.wait_for(&unfinished).await;
    for id in &unfinished {
        assert_eq!(final_status(&other, *id, 10).await.state, State::Delivered);
    }
    let again: Vec<EventId> = sink
        .counts()
        .keys()
        .filter(|id| finished.contains(id))
        .copied()
        .collect();
    assert!(
        again.is_empty(),
        "sends the dead server had delivered were delivered again: {again:?}"
    );
    assert_eq!(sink.counts().len(), 5);
    other.shutdown().await;
}
