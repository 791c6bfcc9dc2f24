//! The SQLite queue: the [`Queue`] contract over one file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_trait::async_trait;
use destinations_core::{
    Attempt, DeadLetterFilter, DeadLetterPage, DeadLetterStore, Durability, Envelope, EventFilter,
    EventId, EventPage, FinalWaiters, IdMap, Leased, Queue, QueueConsumer, QueueDepth, QueueError,
    Refused, SendStatus, Settled, Settlement, State, StatusRetention, StatusStore,
};
use rusqlite::Connection;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::chunk::{Outcome, Payloads, Stored, encode_record};
use crate::lines::{Delayed, Lines, Memory, Next, Slot};
use crate::options::{OpenError, SqliteOptions, SyncMode, describe};
use crate::resident::{ChunkState, Resident};
use crate::rows::{self, to_ms};
use crate::schema::{self, FileLock};
use crate::writer::{AttemptRow, ChunkUpdate, Command, DeadRow, Reply, Start, Writer, Written};

/// A durable queue in one SQLite file (WAL mode, one writer thread with group commit).
///
/// `enqueue` resolves once the sends are committed: with `sync = "normal"` they survive the
/// process crashing or being killed; with `"full"`, a power loss too. Sends are stored in
/// chunks — one row for the sends one change queued for one instance — so the file does work
/// per run and per batch, not per send. Statuses and dead letters live in the same file. At
/// start, everything not final is ready again (a lease held by a process that died is void)
/// and retries keep their attempt count and due time.
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
    /// The chunks with sends in memory: what a settlement rewrites.
    chunks: Mutex<Resident>,
    /// Envelopes leased by a dispatcher: where they are, and the attempt under way if any.
    leased: Mutex<IdMap<Lease>>,
    memory: Memory,
    next_batch: AtomicI64,
    stopped: AtomicBool,
    waiters: FinalWaiters,
    backlog: Vec<(String, QueueDepth)>,
    /// The longest time between the first and last send of a chunk (bounds a lookup by id).
    longest: Arc<AtomicI64>,
    /// Held until the queue closes: one process per file.
    lock: Mutex<Option<FileLock>>,
}

struct Lease {
    slot: Slot,
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
        let fail = |e: rusqlite::Error| OpenError::new(path, crate::options::describe_opening(&e));
        let pending = rows::pending_chunks(&conn).map_err(fail)?;
        let finished = rows::finished_chunks(&conn).map_err(fail)?;
        let dead = rows::dead_count(&conn).map_err(fail)?;
        let longest = Arc::new(AtomicI64::new(
            rows::meta(&conn, "longest_chunk_ms").map_err(fail)?,
        ));
        let next_batch = rows::last_batch(&pending);
        let (lines, backlog) = schedule(pending);
        let writer = Writer::start(Start {
            conn,
            path: path.to_path_buf(),
            retention,
            dead_letter_capacity,
            finished,
            dead,
            longest: longest.clone(),
        })
        .map_err(|e| OpenError::new(path, e))?;
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
                chunks: Mutex::new(Resident::default()),
                leased: Mutex::new(IdMap::default()),
                memory: Memory::new(options.memory_bytes),
                next_batch: AtomicI64::new(next_batch),
                stopped: AtomicBool::new(false),
                waiters: FinalWaiters::default(),
                backlog,
                longest,
                lock: Mutex::new(Some(lock)),
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

/// The schedule of the chunks found pending at start, and what each instance holds. The
/// chunks themselves stay on disk until their sends are leased.
fn schedule(pending: Vec<rows::StoredChunk>) -> (LinesByInstance, Vec<(String, QueueDepth)>) {
    let now_ms = to_ms(std::time::SystemTime::now());
    let now = Instant::now();
    let mut lines = LinesByInstance::new();
    let mut depths: HashMap<String, QueueDepth> = HashMap::new();
    let mut batches: HashMap<(Arc<str>, i64), (i64, Vec<Slot>)> = HashMap::new();
    for stored in pending {
        let destination: Arc<str> = Arc::from(stored.destination.as_str());
        let line = lines
            .entry(destination.clone())
            .or_insert_with(|| Arc::new(Lines::new()))
            .clone();
        let depth = depths.entry(stored.destination.clone()).or_default();
        for (index, record) in stored.records.iter().enumerate() {
            if record.state.is_final() {
                continue;
            }
            depth.events += 1;
            depth.bytes += record.size as usize;
            let slot = Slot {
                chunk: stored.seq,
                index: u32::try_from(index).unwrap_or(u32::MAX),
            };
            let outcome = (record.outcome as usize)
                .checked_sub(1)
                .and_then(|at| stored.outcomes.get(at));
            match (
                record.state,
                outcome.and_then(|o| Some((o.run_at_ms?, o.batch?))),
            ) {
                (Stored::Retrying, Some((run_at_ms, batch))) => {
                    batches
                        .entry((destination.clone(), batch))
                        .or_insert((run_at_ms, Vec::new()))
                        .1
                        .push(slot);
                }
                _ => line.push_spilled(slot),
            }
        }
    }
    for ((destination, batch), (run_at_ms, slots)) in batches {
        let wait = std::time::Duration::from_millis(u64::try_from(run_at_ms - now_ms).unwrap_or(0));
        if let Some(line) = lines.get(&destination) {
            line.delay(Delayed {
                due: now.checked_add(wait).unwrap_or(now),
                batch,
                slots,
            });
        }
    }
    let mut backlog: Vec<_> = depths.into_iter().collect();
    backlog.sort_by(|a, b| a.0.cmp(&b.0));
    (lines, backlog)
}

/// Sends grouped into chunks: one per destination, in the order given.
fn chunked(envelopes: Vec<Envelope>) -> Vec<Vec<Envelope>> {
    let mut groups: Vec<Vec<Envelope>> = Vec::new();
    for envelope in envelopes {
        match groups.iter_mut().find(|g| {
            g.first()
                .is_some_and(|e| Arc::ptr_eq(&e.destination, &envelope.destination))
        }) {
            Some(group) => group.push(envelope),
            None => groups.push(vec![envelope]),
        }
    }
    groups
}

impl Shared {
    fn lines_of(&self, destination: &Arc<str>) -> Arc<Lines> {
        if let Some(line) = self
            .lines
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(destination)
        {
            return line.clone();
        }
        self.lines
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(destination.clone())
            .or_insert_with(|| Arc::new(Lines::new()))
            .clone()
    }

    /// Chunks committed: their sends into their instances' lines; the chunks stay in memory
    /// while some of their sends do.
    fn make_ready(&self, groups: Vec<Vec<Envelope>>, written: Vec<Written>) {
        for (envelopes, written) in groups.into_iter().zip(written) {
            let Some(destination) = envelopes.first().map(|e| e.destination.clone()) else {
                continue;
            };
            let seq = written.seq;
            let count = envelopes.len();
            // In memory before any of its sends can be leased.
            self.chunks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(seq, ChunkState::written(destination.clone(), written));
            let slots = (0u32..).map(|index| Slot { chunk: seq, index });
            let kept = self
                .lines_of(&destination)
                .push_ready(slots.zip(envelopes), &self.memory);
            self.leave_memory(seq, count - kept);
        }
    }

    /// `count` sends of chunk `seq` left memory (spilled to disk, settled, or waiting for a
    /// retry): a chunk with none left goes too.
    fn leave_memory(&self, seq: i64, count: usize) {
        if count == 0 {
            return;
        }
        self.chunks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .leave(seq, u32::try_from(count).unwrap_or(u32::MAX));
    }

    /// Record the lease of these sends.
    fn lease(&self, sends: &[(Slot, Envelope)]) {
        let mut leased = self.leased.lock().unwrap_or_else(PoisonError::into_inner);
        for (slot, envelope) in sends {
            leased.insert(
                envelope.id,
                Lease {
                    slot: *slot,
                    attempting: None,
                },
            );
        }
    }

    /// Read sends back from the file, in the order asked (those that are gone are left out);
    /// their chunks come into memory with them.
    async fn read_back(&self, slots: Vec<Slot>) -> Result<Vec<(Slot, Envelope)>, QueueError> {
        let mut seqs: Vec<i64> = slots.iter().map(|s| s.chunk).collect();
        seqs.sort_unstable();
        seqs.dedup();
        loop {
            let reading = self
                .chunks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .begin_read(&seqs);
            let (all, cold) = (seqs.clone(), reading.cold.clone());
            let read = self
                .readers
                .read(move |conn| {
                    let data = rows::payloads(conn, &all).map_err(|e| describe(&e))?;
                    let stored = rows::chunks(conn, &cold).map_err(|e| describe(&e))?;
                    Ok((data, stored))
                })
                .await;
            let mut chunks = self.chunks.lock().unwrap_or_else(PoisonError::into_inner);
            let (data, stored) = match read {
                Ok(read) => read,
                Err(error) => {
                    chunks.arrived(&reading, Vec::new());
                    chunks.end_read(reading);
                    return Err(error);
                }
            };
            if !chunks.arrived(&reading, stored) {
                chunks.end_read(reading);
                continue;
            }
            let mut sends = Vec::with_capacity(slots.len());
            for &slot in &slots {
                let envelope = chunks.get_mut(slot.chunk).and_then(|chunk| {
                    let (_, mut payloads) = Payloads::read(data.get(&slot.chunk)?)?;
                    let entry = payloads.nth(slot.index as usize)?;
                    let envelope = chunk.envelope(slot.index as usize, entry.payload)?;
                    chunk.resident += 1;
                    Some(envelope)
                });
                match envelope {
                    Some(envelope) => sends.push((slot, envelope)),
                    None => tracing::error!(
                        path = %self.path.display(),
                        chunk = slot.chunk,
                        index = slot.index,
                        "a queued send could not be read back from the file; `destinations queue check` verifies it"
                    ),
                }
            }
            chunks.end_read(reading);
            return Ok(sends);
        }
    }

    /// Where a settled send is: its lease, or (a send settled without one) a search.
    fn slot_of(leased: &IdMap<Lease>, chunks: &Resident, id: EventId) -> Option<Slot> {
        if let Some(lease) = leased.get(&id) {
            return Some(lease.slot);
        }
        chunks.iter().find_map(|(seq, chunk)| {
            let index = chunk.records.iter().position(|r| r.id == id)?;
            Some(Slot {
                chunk: *seq,
                index: u32::try_from(index).ok()?,
            })
        })
    }

    async fn write(&self, command: Command, reply: oneshot::Receiver<Reply>) -> Reply {
        let closed =
            || QueueError::Unavailable(format!("{}: the queue is closed", self.path.display()));
        if let Err(command) = self.writer.send(command) {
            let groups = match command {
                Command::Enqueue { chunks, .. } => chunks,
                Command::Settle { follow_ups, .. } => follow_ups,
                _ => Vec::new(),
            };
            return (groups, Err(closed()));
        }
        reply.await.unwrap_or_else(|_| (Vec::new(), Err(closed())))
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
        let line = self.shared.lines_of(&Arc::from(instance));
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
        let groups = chunked(envelopes);
        if let Some(unknown) = groups.iter().find_map(|group| {
            let destination = &group.first()?.destination;
            let known = shared
                .lines
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(destination)
                .is_some_and(|line| line.consumed());
            (!known).then(|| destination.to_string())
        }) {
            return Err(Refused {
                why: QueueError::NoConsumer(unknown),
                envelopes: groups.into_iter().flatten().collect(),
            });
        }
        let (reply, answer) = oneshot::channel();
        let (groups, written) = shared
            .write(
                Command::Enqueue {
                    chunks: groups,
                    reply,
                },
                answer,
            )
            .await;
        match written {
            Ok(written) => {
                shared.make_ready(groups, written);
                Ok(())
            }
            Err(why) => Err(Refused {
                why,
                envelopes: groups.into_iter().flatten().collect(),
            }),
        }
    }

    async fn replay(&self, ids: &[EventId]) -> Result<Vec<Envelope>, QueueError> {
        let shared = &self.shared;
        if shared.stopped.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        let (groups, written) = shared
            .write(
                Command::Replay {
                    ids: ids.to_vec(),
                    reply,
                },
                answer,
            )
            .await;
        let written = written?;
        let now = Instant::now();
        let groups: Vec<Vec<Envelope>> = groups
            .into_iter()
            .map(|group| {
                group
                    .into_iter()
                    .map(|mut envelope| {
                        envelope.restart_budget(now);
                        envelope
                    })
                    .collect()
            })
            .collect();
        let envelopes = groups.iter().flatten().cloned().collect();
        shared.make_ready(groups, written);
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
                Next::Retry(delayed) => match shared.read_back(delayed.slots.clone()).await {
                    Ok(sends) => {
                        shared.lease(&sends);
                        return Some(Leased::Retry(sends.into_iter().map(|(_, e)| e).collect()));
                    }
                    Err(error) => {
                        tracing::error!(%error, "could not read a retry batch back; trying again in a second");
                        self.line.delay(Delayed {
                            due: Instant::now() + std::time::Duration::from_secs(1),
                            ..delayed
                        });
                    }
                },
                Next::Ready(mut sends, spilled) => {
                    if !spilled.is_empty() {
                        match shared.read_back(spilled.clone()).await {
                            Ok(read) => sends.extend(read),
                            Err(error) => {
                                tracing::error!(%error, "could not read queued sends back; trying again in a second");
                                self.line.unspill(spilled);
                                if sends.is_empty() {
                                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                                    continue;
                                }
                            }
                        }
                    }
                    if sends.is_empty() {
                        continue;
                    }
                    shared.lease(&sends);
                    return Some(Leased::Ready(sends.into_iter().map(|(_, e)| e).collect()));
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
        let now_ms = to_ms(std::time::SystemTime::now());
        let batch = settlement
            .retry
            .as_ref()
            .map(|_| shared.next_batch.fetch_add(1, Ordering::AcqRel) + 1);
        let mut retry_slots = Vec::new();
        let written_outcomes: Vec<(i64, u64)>;
        let (reply, answer) = oneshot::channel();
        {
            let leased = shared.leased.lock().unwrap_or_else(PoisonError::into_inner);
            let mut chunks = shared.chunks.lock().unwrap_or_else(PoisonError::into_inner);
            let mut touched: Vec<(i64, Vec<u32>)> = Vec::new();
            let mut dead = Vec::new();
            let mut failed: IdMap<Attempt> = settlement.failed_attempts().into_iter().collect();
            let mut attempts = Vec::new();
            let retry = settlement.retry.as_ref();
            let changes = settlement
                .delivered
                .iter()
                .map(|s| (s, Stored::Delivered))
                .chain(settlement.dead.iter().map(|s| (s, Stored::Dead)))
                .chain(
                    retry
                        .into_iter()
                        .flat_map(|r| &r.sends)
                        .map(|s| (s, Stored::Retrying)),
                );
            for (settled, state) in changes {
                let id = settled.envelope.id;
                let Some(slot) = Shared::slot_of(&leased, &chunks, id) else {
                    tracing::warn!(%id, "a settlement names a send this queue does not hold");
                    continue;
                };
                let Some(chunk) = chunks.get_mut(slot.chunk) else {
                    continue;
                };
                // A send delivered after failures keeps the error of its last failed attempt.
                let earlier_error = chunk
                    .outcome_of(slot.index as usize)
                    .and_then(|outcome| outcome.error.clone());
                let elapsed_ms = settled.response.as_ref().map_or(0, |r| r.elapsed_ms);
                let outcome = Outcome {
                    run_at_ms: (state == Stored::Retrying)
                        .then(|| retry.map(|r| to_ms(r.at)))
                        .flatten(),
                    batch: (state == Stored::Retrying).then_some(batch).flatten(),
                    error: settled.error.clone().or(earlier_error),
                    response: settled.response.as_deref().cloned().map(|mut response| {
                        response.elapsed_ms = 0;
                        response
                    }),
                };
                let outcome = chunk.add_outcome(outcome);
                let Some(record) = chunk.records.get_mut(slot.index as usize) else {
                    continue;
                };
                if !record.state.is_final() && state.is_final() {
                    chunk.pending = chunk.pending.saturating_sub(1);
                }
                record.state = state;
                record.attempts = u16::try_from(settled.envelope.attempts).unwrap_or(u16::MAX);
                record.outcome = outcome;
                record.updated_ms = now_ms;
                record.elapsed_ms = u32::try_from(elapsed_ms).unwrap_or(u32::MAX);
                match touched.iter_mut().find(|(seq, _)| *seq == slot.chunk) {
                    Some((_, indices)) => indices.push(slot.index),
                    None => touched.push((slot.chunk, vec![slot.index])),
                }
                if let Some(attempt) = failed.remove(&id) {
                    attempts.push(AttemptRow {
                        id,
                        chunk: slot.chunk,
                        attempt: serde_json::to_string(&attempt).unwrap_or_default(),
                    });
                }
                match state {
                    Stored::Dead => dead.push(dead_row(settled)),
                    Stored::Retrying => retry_slots.push(slot),
                    _ => {}
                }
            }
            let updates = touched
                .iter()
                .filter_map(|(seq, indices)| {
                    let chunk = chunks.get_mut(*seq)?;
                    // Outcomes no send refers to any more go; every record is renumbered then.
                    let all: Vec<u32>;
                    let indices = if chunk.compact_outcomes() {
                        all = (0..u32::try_from(chunk.records.len()).unwrap_or(u32::MAX)).collect();
                        &all
                    } else {
                        indices
                    };
                    let records = indices
                        .iter()
                        .filter_map(|index| {
                            Some((*index, encode_record(chunk.records.get(*index as usize)?)))
                        })
                        .collect();
                    // Outcomes the file lacks go with every update until one is committed.
                    let outcomes = chunk.outcomes_to_write();
                    Some(ChunkUpdate {
                        seq: *seq,
                        records,
                        outcomes,
                        pending: chunk.pending,
                        count: chunk.records.len(),
                    })
                })
                .collect();
            written_outcomes = touched
                .iter()
                .filter_map(|(seq, _)| Some((*seq, chunks.get(*seq)?.outcomes_version)))
                .collect();
            // Handed to the writer under the lock, so the writer gets each chunk's records in
            // the order they changed.
            let command = Command::Settle {
                updates,
                dead,
                attempts,
                follow_ups: chunked(settlement.follow_ups.clone()),
                reply,
            };
            if shared.writer.send(command).is_err() {
                return Err(QueueError::Unavailable(format!(
                    "{}: the queue is closed",
                    shared.path.display()
                )));
            }
        }
        let (follow_ups, written) = answer.await.map_err(|_| {
            QueueError::Unavailable(format!("{}: the writer stopped", shared.path.display()))
        })?;
        let written = written?;
        {
            // The settled sends leave their leases, and memory (a retry waits on disk); chunks
            // with none left in memory go.
            let mut leased = shared.leased.lock().unwrap_or_else(PoisonError::into_inner);
            let mut chunks = shared.chunks.lock().unwrap_or_else(PoisonError::into_inner);
            for &(seq, version) in &written_outcomes {
                if let Some(chunk) = chunks.get_mut(seq) {
                    chunk.outcomes_written = chunk.outcomes_written.max(version);
                }
            }
            for settled in settlement
                .delivered
                .iter()
                .chain(&settlement.dead)
                .chain(settlement.retry.iter().flat_map(|r| &r.sends))
            {
                if let Some(lease) = leased.remove(&settled.envelope.id) {
                    chunks.leave(lease.slot.chunk, 1);
                }
            }
            for (seq, _) in &written_outcomes {
                chunks.drop_if_idle(*seq);
            }
        }
        if let (Some(retry), Some(batch)) = (&settlement.retry, batch) {
            let now = Instant::now();
            self.line.delay(Delayed {
                due: now
                    .checked_add(retry.wait)
                    .unwrap_or(now + std::time::Duration::from_secs(100 * 365 * 86_400)),
                batch,
                slots: retry_slots,
            });
        }
        shared.make_ready(follow_ups, written);
        shared
            .waiters
            .finished(settlement.finished().map(|e| &e.id));
        Ok(())
    }

    async fn release(&self, envelopes: Vec<Envelope>) {
        let sends: Vec<(Slot, Envelope)> = {
            let mut leased = self
                .shared
                .leased
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            envelopes
                .into_iter()
                .filter_map(|e| leased.remove(&e.id).map(|lease| (lease.slot, e)))
                .collect()
        };
        self.line.push_front(sends, &self.shared.memory);
    }
}

/// Where the file has a send.
enum Found {
    Nowhere,
    /// In a chunk, with its status as stored.
    InChunk {
        seq: i64,
        index: usize,
        stored: Option<SendStatus>,
    },
    /// Only among the dead letters (the retention removed its chunk).
    Dead(SendStatus),
}

fn found(conn: &Connection, id: EventId, longest: i64) -> rusqlite::Result<Found> {
    if let Some((chunk, index)) = rows::chunk_of(conn, id, longest)? {
        let destination: Arc<str> = Arc::from(chunk.destination.as_str());
        let stored = chunk.records.get(index).map(|record| {
            rows::status_in(
                &destination,
                &chunk.runs,
                &chunk.outcomes,
                chunk.created_ms,
                record,
            )
        });
        return Ok(Found::InChunk {
            seq: chunk.seq,
            index,
            stored,
        });
    }
    Ok(rows::dead_status(conn, id)?.map_or(Found::Nowhere, Found::Dead))
}

fn dead_row(settled: &Settled) -> DeadRow {
    let envelope = &settled.envelope;
    DeadRow {
        id: envelope.id,
        destination: envelope.destination.clone(),
        run: envelope.run.clone(),
        created_ms: to_ms(envelope.created_at),
        attempts: envelope.attempts,
        reason: settled.error.clone().unwrap_or_default(),
        payload: envelope.payload.clone(),
    }
}

impl Shared {
    /// What memory knows ahead of the file about a listed send: its chunk's changes not yet
    /// written, an attempt under way.
    fn fresher(&self, listed: rows::Listed) -> SendStatus {
        let attempting = self
            .leased
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&listed.status.id)
            .and_then(|lease| lease.attempting);
        let mut status = self
            .chunks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(listed.seq)
            .and_then(|chunk| Some(chunk.status(chunk.records.get(listed.index)?)))
            .unwrap_or(listed.status);
        if let Some(attempts) = attempting
            && !status.state.is_final()
        {
            status.state = State::InFlight;
            status.attempts = attempts;
            status.next_attempt_at = None;
        }
        status
    }

    /// The status of a send as memory or the file has it, without its attempts.
    async fn status_of(&self, id: EventId) -> Result<Option<SendStatus>, QueueError> {
        let lease = self
            .leased
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .map(|lease| (lease.slot, lease.attempting));
        if let Some((slot, attempting)) = lease
            && let Some(mut status) = self
                .chunks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(slot.chunk)
                .and_then(|chunk| Some(chunk.status(chunk.records.get(slot.index as usize)?)))
        {
            if let Some(attempts) = attempting
                && !status.state.is_final()
            {
                status.state = State::InFlight;
                status.attempts = attempts;
                status.next_attempt_at = None;
            }
            return Ok(Some(status));
        }
        let longest = self.longest.load(Ordering::Acquire);
        let found = self
            .readers
            .read(move |conn| found(conn, id, longest).map_err(|e| describe(&e)))
            .await?;
        Ok(match found {
            Found::Nowhere => None,
            Found::Dead(status) => Some(status),
            Found::InChunk { seq, index, stored } => {
                // A chunk still pending is ahead in memory of what the file says.
                let fresher = self
                    .chunks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(seq)
                    .and_then(|chunk| Some(chunk.status(chunk.records.get(index)?)));
                fresher.or(stored)
            }
        })
    }
}

#[async_trait]
impl StatusStore for Shared {
    async fn get(&self, id: EventId) -> Result<Option<SendStatus>, QueueError> {
        let Some(status) = self.status_of(id).await? else {
            return Ok(None);
        };
        let failed = self
            .readers
            .read(move |conn| rows::attempts_of(conn, id).map_err(|e| describe(&e)))
            .await?;
        Ok(Some(status.with_attempts(failed)))
    }

    async fn list(
        &self,
        filter: &EventFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EventPage, QueueError> {
        let before = EventPage::before(after)?;
        let longest = self.longest.load(Ordering::Acquire);
        // The file knows no attempt under way: in-flight sends are found among those not
        // final, and told apart by what memory knows.
        let in_flight = filter.state == Some(State::InFlight);
        let mut asked = filter.clone();
        if in_flight {
            asked.state = None;
        }
        let mut listed = self
            .readers
            .read(move |conn| {
                rows::events(conn, &asked, in_flight, before, limit, longest)
                    .map_err(|e| describe(&e))
            })
            .await?;
        // The page ends where the file's rows do: whether more follow is the file's to say.
        let next = EventPage::cut(&mut listed, limit, |listed| listed.status.id);
        // Memory may be ahead of the file; a send whose fresher state no longer matches is
        // left out (the page may then hold fewer than `limit`).
        let events = listed
            .into_iter()
            .map(|listed| self.fresher(listed))
            .filter(|status| filter.matches(status))
            .collect();
        Ok(EventPage { events, next })
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
        rows::check_cursor(after)?;
        let filter = filter.clone();
        let after = after.map(str::to_owned);
        self.readers
            .read(move |conn| rows::dead_letters(conn, &filter, after.as_deref(), limit))
            .await
    }

    async fn evicted(&self) -> Result<u64, QueueError> {
        self.readers
            .read(|conn| {
                rows::meta(conn, "dead_letters_evicted")
                    .map(|n| u64::try_from(n).unwrap_or(0))
                    .map_err(|e| describe(&e))
            })
            .await
    }
}
