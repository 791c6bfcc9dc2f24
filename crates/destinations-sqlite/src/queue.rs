//! The SQLite queue: the [`Queue`] contract over one file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_trait::async_trait;
use destinations_core::{
    DeadLetterFilter, DeadLetterPage, DeadLetterStore, Durability, Envelope, EventId, FinalWaiters,
    IdMap, Leased, Queue, QueueConsumer, QueueDepth, QueueError, Refused, ResponseSummary,
    SendStatus, Settled, Settlement, State, StatusRetention, StatusStore,
};
use rusqlite::Connection;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::lines::{Delayed, Lines, Memory, Next};
use crate::options::{OpenError, SqliteOptions, SyncMode, describe};
use crate::rows;
use crate::schema::{self, FileLock};
use crate::writer::{Change, Command, RowKey, SettleRow, Writer};

/// A durable queue in one SQLite file (WAL mode, one writer thread with group commit).
///
/// `enqueue` resolves once the sends are committed: with `sync = "normal"` they survive the
/// process crashing or being killed; with `"full"`, a power loss too. Statuses and dead letters
/// live in the same file. At start, everything not final is ready again (a lease held by a
/// process that died is void) and retries keep their attempt count and due time.
pub struct SqliteQueue {
    shared: Arc<Shared>,
}

/// Each instance's schedule, by name.
type LinesByInstance = HashMap<Arc<str>, Arc<Lines>>;

struct Shared {
    path: PathBuf,
    durability: Durability,
    writer: Writer,
    readers: Arc<Readers>,
    lines: RwLock<LinesByInstance>,
    /// Envelopes leased by a dispatcher: their row, and the attempt under way if any.
    leased: Mutex<IdMap<Lease>>,
    memory: Memory,
    next_batch: AtomicI64,
    stopped: AtomicBool,
    waiters: FinalWaiters,
    backlog: Vec<(String, QueueDepth)>,
    /// Held until the queue closes: one process per file.
    lock: Mutex<Option<FileLock>>,
}

struct Lease {
    seq: i64,
    /// The attempt under way (the send shows `in_flight`).
    attempting: Option<u32>,
}

/// Connections for reading, beside the writer's (WAL: reads never wait for writes).
struct Readers {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
}

impl Readers {
    /// Run `read` on a reader connection, off the async threads.
    async fn read<R: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&Connection) -> Result<R, String> + Send + 'static,
    ) -> Result<R, QueueError> {
        let readers = self.clone();
        let path = self.path.clone();
        let unavailable = |e: String| QueueError::Unavailable(format!("{}: {e}", path.display()));
        tokio::task::spawn_blocking(move || {
            let conn = readers
                .pool
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let conn = match conn {
                Some(conn) => conn,
                None => schema::connect(&readers.path, true).map_err(|e| e.problem)?,
            };
            let result = read(&conn);
            readers
                .pool
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
            result
        })
        .await
        .map_err(|e| {
            QueueError::Unavailable(format!("{}: a read failed: {e}", self.path.display()))
        })?
        .map_err(unavailable)
    }
}

impl SqliteQueue {
    /// Open (or create) the queue in `options.path`, keeping finished statuses within
    /// `retention` and up to `dead_letter_capacity` dead letters.
    ///
    /// Refuses, naming the file and what to do, a file it must not touch: one that is not a
    /// queue, from a newer version, damaged, in use by another process, or not writable.
    /// Nothing already on disk is removed.
    pub fn open(
        options: &SqliteOptions,
        retention: StatusRetention,
        dead_letter_capacity: usize,
    ) -> Result<Self, OpenError> {
        let path = options.path.as_path();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                OpenError::new(
                    path,
                    format!(
                        "cannot create its directory {}: {e}; make it writable or choose another --data-dir",
                        dir.display()
                    ),
                )
            })?;
        }
        let lock = schema::lock(path)?;
        schema::check_header(path)?;
        let mut conn = schema::connect(path, false)?;
        schema::prepare(&mut conn, path, options.sync)?;
        let fail = |e: rusqlite::Error| OpenError::new(path, describe(&e));
        let found = rows::found(&conn).map_err(fail)?;
        let last_batch = rows::last_batch(&conn).map_err(fail)?;
        let (lines, backlog) = schedule(found.pending);
        let writer = Writer::start(
            conn,
            path.to_path_buf(),
            retention,
            dead_letter_capacity,
            found.delivered,
        )
        .map_err(fail)?;
        Ok(Self {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                durability: match options.sync {
                    SyncMode::Normal => Durability::Process,
                    SyncMode::Full => Durability::Machine,
                },
                writer,
                readers: Arc::new(Readers {
                    path: path.to_path_buf(),
                    pool: Mutex::new(Vec::new()),
                }),
                lines: RwLock::new(lines),
                leased: Mutex::new(IdMap::default()),
                memory: Memory::new(options.memory_bytes),
                next_batch: AtomicI64::new(last_batch),
                stopped: AtomicBool::new(false),
                waiters: FinalWaiters::default(),
                backlog,
                lock: Mutex::new(Some(lock)),
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

/// The schedule of the rows found pending at start, and what each instance holds.
fn schedule(pending: Vec<rows::PendingRow>) -> (LinesByInstance, Vec<(String, QueueDepth)>) {
    let now_ms = rows::to_ms(std::time::SystemTime::now());
    let now = Instant::now();
    let mut lines = LinesByInstance::new();
    let mut depths: HashMap<String, QueueDepth> = HashMap::new();
    let mut batches: HashMap<(String, i64), (i64, Vec<i64>)> = HashMap::new();
    for row in pending {
        let depth = depths.entry(row.destination.clone()).or_default();
        depth.events += 1;
        depth.bytes += row.size;
        let line = lines
            .entry(Arc::from(row.destination.as_str()))
            .or_insert_with(|| Arc::new(Lines::new()));
        match row.retry {
            None => line.push_spilled(row.seq),
            Some((run_at_ms, batch)) => {
                let entry = batches
                    .entry((row.destination, batch))
                    .or_insert((run_at_ms, Vec::new()));
                entry.1.push(row.seq);
            }
        }
    }
    for ((destination, batch), (run_at_ms, seqs)) in batches {
        let wait = std::time::Duration::from_millis(u64::try_from(run_at_ms - now_ms).unwrap_or(0));
        if let Some(line) = lines.get(destination.as_str()) {
            line.delay(Delayed {
                due: now.checked_add(wait).unwrap_or(now),
                batch,
                seqs,
            });
        }
    }
    let mut backlog: Vec<_> = depths.into_iter().collect();
    backlog.sort_by(|a, b| a.0.cmp(&b.0));
    (lines, backlog)
}

impl Shared {
    fn lines_of(&self, destination: &str) -> Option<Arc<Lines>> {
        self.lines
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(destination)
            .cloned()
    }

    /// Rows committed: into their instances' lines, in order.
    fn make_ready(&self, rows: impl IntoIterator<Item = (i64, Envelope)>) {
        let mut run: Vec<(i64, Envelope)> = Vec::new();
        for (seq, envelope) in rows {
            if run
                .last()
                .is_some_and(|(_, last)| !Arc::ptr_eq(&last.destination, &envelope.destination))
            {
                self.push_run(std::mem::take(&mut run));
            }
            run.push((seq, envelope));
        }
        self.push_run(run);
    }

    fn push_run(&self, run: Vec<(i64, Envelope)>) {
        let Some((_, first)) = run.first() else {
            return;
        };
        let line = {
            let mut lines = self.lines.write().unwrap_or_else(PoisonError::into_inner);
            lines
                .entry(first.destination.clone())
                .or_insert_with(|| Arc::new(Lines::new()))
                .clone()
        };
        line.push_ready(run, &self.memory);
    }

    /// Record the lease of these rows.
    fn lease(&self, rows: &[(i64, Envelope)]) {
        let mut leased = self.leased.lock().unwrap_or_else(PoisonError::into_inner);
        for (seq, envelope) in rows {
            leased.insert(
                envelope.id,
                Lease {
                    seq: *seq,
                    attempting: None,
                },
            );
        }
    }

    async fn write<R>(
        &self,
        command: Command,
        reply: oneshot::Receiver<R>,
    ) -> Result<R, QueueError> {
        if self.writer.send(command).is_err() {
            return Err(QueueError::Unavailable(format!(
                "{}: the queue is closed",
                self.path.display()
            )));
        }
        reply.await.map_err(|_| {
            QueueError::Unavailable(format!("{}: the writer stopped", self.path.display()))
        })
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    fn durability(&self) -> Durability {
        self.shared.durability
    }

    fn describe(&self) -> String {
        format!("sqlite {}", self.shared.path.display())
    }

    fn consumer(&self, instance: &str) -> Result<Arc<dyn QueueConsumer>, QueueError> {
        let line = {
            let mut lines = self
                .shared
                .lines
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            lines
                .entry(Arc::from(instance))
                .or_insert_with(|| Arc::new(Lines::new()))
                .clone()
        };
        line.consume();
        Ok(Arc::new(SqliteConsumer {
            shared: self.shared.clone(),
            line,
        }))
    }

    fn backlog(&self) -> Result<Vec<(String, QueueDepth)>, QueueError> {
        Ok(self.shared.backlog.clone())
    }

    async fn enqueue(&self, envelopes: Vec<Envelope>) -> Result<(), Refused> {
        let shared = &self.shared;
        if shared.stopped.load(Ordering::Acquire) {
            return Err(Refused {
                why: QueueError::Closed,
                envelopes,
            });
        }
        let mut last: Option<&Arc<str>> = None;
        for envelope in &envelopes {
            if last.is_some_and(|l| Arc::ptr_eq(l, &envelope.destination)) {
                continue;
            }
            if !shared
                .lines_of(&envelope.destination)
                .is_some_and(|l| l.consumed())
            {
                let why = QueueError::NoConsumer(envelope.destination.to_string());
                return Err(Refused { why, envelopes });
            }
            last = Some(&envelope.destination);
        }
        let (reply, answer) = oneshot::channel();
        let command = Command::Enqueue { envelopes, reply };
        if let Err(Command::Enqueue { envelopes, .. }) = shared.writer.send(command) {
            return Err(Refused {
                why: QueueError::Unavailable(format!(
                    "{}: the queue is closed",
                    shared.path.display()
                )),
                envelopes,
            });
        }
        match answer.await {
            Ok((envelopes, Ok(seqs))) => {
                shared.make_ready(seqs.into_iter().zip(envelopes));
                Ok(())
            }
            Ok((envelopes, Err(why))) => Err(Refused { why, envelopes }),
            Err(_) => Err(Refused {
                why: QueueError::Unavailable(format!(
                    "{}: the writer stopped",
                    shared.path.display()
                )),
                envelopes: Vec::new(),
            }),
        }
    }

    async fn replay(&self, ids: &[EventId]) -> Result<Vec<Envelope>, QueueError> {
        let shared = &self.shared;
        if shared.stopped.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        let moved = shared
            .write(
                Command::Replay {
                    ids: ids.to_vec(),
                    reply,
                },
                answer,
            )
            .await??;
        let now = Instant::now();
        let moved: Vec<(i64, Envelope)> = moved
            .into_iter()
            .map(|(seq, mut envelope)| {
                envelope.restart_budget(now);
                (seq, envelope)
            })
            .collect();
        let envelopes = moved.iter().map(|(_, e)| e.clone()).collect();
        shared.make_ready(moved);
        Ok(envelopes)
    }

    async fn stop(&self) -> Vec<Envelope> {
        self.shared.stopped.store(true, Ordering::Release);
        for line in self
            .shared
            .lines
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            line.stop();
        }
        Vec::new()
    }

    async fn close(&self) {
        self.shared.writer.close().await;
        // The file is free for the next process (or the next hub of this one).
        self.shared
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn statuses(&self) -> &dyn StatusStore {
        &*self.shared
    }

    fn dead_letters(&self) -> &dyn DeadLetterStore {
        &*self.shared
    }
}

/// One instance's consumer.
struct SqliteConsumer {
    shared: Arc<Shared>,
    line: Arc<Lines>,
}

impl SqliteConsumer {
    /// Read rows back from the file, in the order asked.
    async fn read_back(&self, seqs: Vec<i64>) -> Result<Vec<(i64, Envelope)>, QueueError> {
        let wanted = seqs.clone();
        let mut found = self
            .shared
            .readers
            .read(move |conn| rows::envelopes_by_seq(conn, &wanted).map_err(|e| describe(&e)))
            .await?;
        Ok(seqs
            .into_iter()
            .filter_map(|seq| found.remove(&seq).map(|e| (seq, e)))
            .collect())
    }
}

#[async_trait]
impl QueueConsumer for SqliteConsumer {
    async fn lease(&self, max: usize) -> Option<Leased> {
        let shared = &self.shared;
        loop {
            let woken = self.line.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.line.next(max, &shared.memory) {
                Next::Stopped => return None,
                Next::Retry(delayed) => match self.read_back(delayed.seqs.clone()).await {
                    Ok(rows) => {
                        shared.lease(&rows);
                        return Some(Leased::Retry(rows.into_iter().map(|(_, e)| e).collect()));
                    }
                    Err(error) => {
                        tracing::error!(%error, "could not read a retry batch back; trying again in a second");
                        self.line.delay(Delayed {
                            due: Instant::now() + std::time::Duration::from_secs(1),
                            ..delayed
                        });
                    }
                },
                Next::Ready(mut rows, spilled) => {
                    if !spilled.is_empty() {
                        match self.read_back(spilled.clone()).await {
                            Ok(read) => rows.extend(read),
                            Err(error) => {
                                tracing::error!(%error, "could not read queued sends back; trying again in a second");
                                self.line.unspill(spilled);
                                if rows.is_empty() {
                                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                                    continue;
                                }
                            }
                        }
                    }
                    if rows.is_empty() {
                        continue;
                    }
                    shared.lease(&rows);
                    return Some(Leased::Ready(rows.into_iter().map(|(_, e)| e).collect()));
                }
                Next::Wait(due) => match due {
                    Some(due) => {
                        tokio::select! {
                            () = &mut woken => {}
                            () = tokio::time::sleep_until(due) => {}
                        }
                    }
                    None => woken.await,
                },
            }
        }
    }

    async fn settle(&self, settlement: &Settlement) -> Result<(), QueueError> {
        let shared = &self.shared;
        let batch = settlement
            .retry
            .as_ref()
            .map(|_| shared.next_batch.fetch_add(1, Ordering::AcqRel) + 1);
        let mut retry_seqs = Vec::new();
        let rows = {
            let leased = shared.leased.lock().unwrap_or_else(PoisonError::into_inner);
            // Sends of a batch share their answer: serialize it once.
            let mut last: Option<(ResponseSummary, Arc<str>)> = None;
            let mut row = |settled: &Settled, change: Change| {
                let key = match leased.get(&settled.envelope.id) {
                    Some(lease) => RowKey::Seq(lease.seq),
                    None => RowKey::Id(settled.envelope.id),
                };
                let response = settled.response.as_ref().and_then(|response| {
                    if let Some((seen, json)) = &last
                        && seen == response
                    {
                        return Some(json.clone());
                    }
                    let json: Arc<str> = serde_json::to_string(response).ok()?.into();
                    last = Some((response.clone(), json.clone()));
                    Some(json)
                });
                SettleRow {
                    key,
                    change,
                    attempts: settled.envelope.attempts,
                    error: settled.error.clone(),
                    response,
                }
            };
            let mut rows = Vec::new();
            rows.extend(
                settlement
                    .delivered
                    .iter()
                    .map(|s| row(s, Change::Delivered)),
            );
            rows.extend(settlement.dead.iter().map(|s| row(s, Change::Dead)));
            if let (Some(retry), Some(batch)) = (&settlement.retry, batch) {
                let run_at_ms = rows::to_ms(retry.at);
                for settled in &retry.sends {
                    let row = row(settled, Change::Retry { run_at_ms, batch });
                    if let RowKey::Seq(seq) = row.key {
                        retry_seqs.push(seq);
                    }
                    rows.push(row);
                }
            }
            rows
        };
        let (reply, answer) = oneshot::channel();
        let (follow_ups, written) = shared
            .write(
                Command::Settle {
                    rows,
                    follow_ups: settlement.follow_ups.clone(),
                    reply,
                },
                answer,
            )
            .await?;
        let seqs = written?;
        {
            let mut leased = shared.leased.lock().unwrap_or_else(PoisonError::into_inner);
            for settled in settlement
                .delivered
                .iter()
                .chain(&settlement.dead)
                .chain(settlement.retry.iter().flat_map(|r| &r.sends))
            {
                leased.remove(&settled.envelope.id);
            }
        }
        if let (Some(retry), Some(batch)) = (&settlement.retry, batch) {
            let now = Instant::now();
            self.line.delay(Delayed {
                due: now
                    .checked_add(retry.wait)
                    .unwrap_or(now + std::time::Duration::from_secs(100 * 365 * 86_400)),
                batch,
                seqs: retry_seqs,
            });
        }
        shared.make_ready(seqs.into_iter().zip(follow_ups));
        shared
            .waiters
            .finished(settlement.finished().map(|e| &e.id));
        Ok(())
    }

    async fn release(&self, envelopes: Vec<Envelope>) {
        let rows: Vec<(i64, Envelope)> = {
            let mut leased = self
                .shared
                .leased
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            envelopes
                .into_iter()
                .filter_map(|e| leased.remove(&e.id).map(|lease| (lease.seq, e)))
                .collect()
        };
        self.line.push_front(rows, &self.shared.memory);
    }
}

#[async_trait]
impl StatusStore for Shared {
    async fn get(&self, id: EventId) -> Result<Option<SendStatus>, QueueError> {
        let attempting = self
            .leased
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .and_then(|lease| lease.attempting);
        let stored = self
            .readers
            .read(move |conn| rows::status(conn, id).map_err(|e| describe(&e)))
            .await?;
        Ok(stored.map(|mut status| {
            if let Some(attempts) = attempting
                && !status.state.is_final()
            {
                status.state = State::InFlight;
                status.attempts = attempts;
                status.next_attempt_at = None;
            }
            status
        }))
    }

    fn attempting(&self, envelopes: &[Envelope]) {
        let mut leased = self.leased.lock().unwrap_or_else(PoisonError::into_inner);
        for envelope in envelopes {
            if let Some(lease) = leased.get_mut(&envelope.id) {
                lease.attempting = Some(envelope.attempts);
            }
        }
    }

    fn waiters(&self) -> &FinalWaiters {
        &self.waiters
    }
}

#[async_trait]
impl DeadLetterStore for Shared {
    async fn list(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterPage, QueueError> {
        let filter = filter.clone();
        let after = after.map(str::to_owned);
        self.readers
            .read(move |conn| rows::dead_letters(conn, &filter, after.as_deref(), limit))
            .await
    }

    async fn evicted(&self) -> Result<u64, QueueError> {
        self.readers
            .read(|conn| rows::evicted(conn).map_err(|e| describe(&e)))
            .await
    }
}
