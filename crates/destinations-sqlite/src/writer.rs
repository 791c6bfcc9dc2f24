//! The one writer. Every change to the file goes through one thread, which takes whatever has
//! gathered — enqueues and settlements from many tasks — and commits it in one transaction
//! (group commit). If one change fails, the group is rolled back and each change is committed
//! on its own, so that only the failing one fails.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use destinations_core::{Envelope, EventId, QueueError, StatusRetention};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use crate::chunk::{RECORD, Record, Runs, Stored, encode_payloads, encode_records};
use crate::options::describe;
use crate::rows::{from_ms, id_ms, to_ms};

/// The most changes committed together.
const GROUP: usize = 512;
/// Commits this close together mean load.
const LINGER_UNDER_LOAD: Duration = Duration::from_millis(2);
/// How often finished statuses past their age are removed.
const AGE_PRUNE_EVERY: Duration = Duration::from_secs(5);

/// A chunk as written: its row, and its sends' records.
pub(crate) struct Written {
    pub(crate) seq: i64,
    pub(crate) records: Vec<Record>,
    pub(crate) runs: Runs,
    pub(crate) created_ms: i64,
    pub(crate) budget_ms: i64,
}

/// Sends handed back (one list per chunk) with the chunks they were written in.
pub(crate) type Reply = (Vec<Vec<Envelope>>, Result<Vec<Written>, QueueError>);

/// One change for the writer.
pub(crate) enum Command {
    /// Write each list of sends (one destination's) as a chunk.
    Enqueue {
        chunks: Vec<Vec<Envelope>>,
        reply: oneshot::Sender<Reply>,
    },
    /// Record what attempts came to, keep the dead letters, and write the sends the deliveries
    /// made as chunks.
    Settle {
        updates: Vec<ChunkUpdate>,
        dead: Vec<DeadRow>,
        attempts: Vec<AttemptRow>,
        follow_ups: Vec<Vec<Envelope>>,
        reply: oneshot::Sender<Reply>,
    },
    /// Queue these dead letters again, as chunks of their own.
    Replay {
        ids: Vec<EventId>,
        reply: oneshot::Sender<Reply>,
    },
    /// Checkpoint the file and stop.
    Close { reply: oneshot::Sender<()> },
}

/// A chunk's sends after a settlement: the records that changed, its outcomes if they
/// changed, and how many sends are still pending.
pub(crate) struct ChunkUpdate {
    pub(crate) seq: i64,
    pub(crate) records: Vec<(u32, [u8; RECORD])>,
    pub(crate) outcomes: Option<Arc<str>>,
    pub(crate) pending: u32,
    /// Its sends, for the retention once it is finished.
    pub(crate) count: usize,
}

/// An attempt that failed, for its send's log.
pub(crate) struct AttemptRow {
    pub(crate) id: EventId,
    /// The chunk that holds the send.
    pub(crate) chunk: i64,
    /// The attempt, as JSON.
    pub(crate) attempt: String,
}

/// A send given up on, kept whole for listing and replay.
pub(crate) struct DeadRow {
    pub(crate) id: EventId,
    pub(crate) destination: Arc<str>,
    pub(crate) run: Option<Arc<str>>,
    pub(crate) created_ms: i64,
    pub(crate) attempts: u32,
    pub(crate) reason: String,
    pub(crate) payload: Bytes,
}

/// The writer thread's handle.
pub(crate) struct Writer {
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the writer starts from.
pub(crate) struct Start {
    pub(crate) conn: Connection,
    pub(crate) path: PathBuf,
    pub(crate) retention: StatusRetention,
    pub(crate) dead_letter_capacity: usize,
    /// Finished chunks as (seq, sends, when), oldest finish first.
    pub(crate) finished: Vec<(i64, usize, i64)>,
    pub(crate) dead: usize,
    /// The longest time between the first and last send of a chunk, shared with the readers.
    pub(crate) longest: Arc<AtomicI64>,
}

impl Writer {
    /// Start the writer.
    pub(crate) fn start(start: Start) -> Result<Self, String> {
        let finished_sends = start.finished.iter().map(|(_, count, _)| count).sum();
        let (tx, rx) = mpsc::channel();
        let mut state = WriterState {
            conn: start.conn,
            path: start.path,
            retention: start.retention,
            dead_letter_capacity: start.dead_letter_capacity,
            finished: VecDeque::from(start.finished),
            finished_sends,
            dead: start.dead,
            longest: start.longest,
            last_age_prune: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("destinations-sqlite-writer".into())
            .spawn(move || state.run(&rx))
            .map_err(|e| format!("cannot start the writer thread: {e}"))?;
        Ok(Self {
            commands: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hand a change to the writer; it comes back once the writer stopped.
    pub(crate) fn send(&self, command: Command) -> Result<(), Command> {
        let commands = self.commands.lock().unwrap_or_else(PoisonError::into_inner);
        match commands.as_ref() {
            Some(tx) => tx.send(command).map_err(|e| e.0),
            None => Err(command),
        }
    }

    /// Checkpoint and stop the writer; waits for it.
    pub(crate) async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.send(Command::Close { reply }).is_ok() {
            let _ = done.await;
        }
        self.commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The writer's view: the connection and what retention needs.
struct WriterState {
    conn: Connection,
    path: PathBuf,
    retention: StatusRetention,
    dead_letter_capacity: usize,
    /// Finished chunks as (seq, sends, when), oldest finish first.
    finished: VecDeque<(i64, usize, i64)>,
    /// Sends of the finished chunks.
    finished_sends: usize,
    /// Dead letters kept.
    dead: usize,
    longest: Arc<AtomicI64>,
    last_age_prune: Instant,
}

/// Chunks a commit finished: (seq, sends).
type Finished = Vec<(i64, usize)>;

/// What one change did, before the commit says whether it stands.
struct Applied {
    written: Vec<Written>,
    /// Dead letters added (or, negative, replayed).
    dead: isize,
    /// Sends a replay took from the dead letters, grouped as written.
    replayed: Option<Vec<Vec<Envelope>>>,
}

impl WriterState {
    fn run(&mut self, commands: &mpsc::Receiver<Command>) {
        let mut last_commit = Instant::now() - LINGER_UNDER_LOAD;
        while let Ok(first) = commands.recv() {
            let mut group = vec![first];
            gather(commands, &mut group);
            // Under load, letting the threads that are ready run first lets the tasks under
            // way add their changes to this commit: far fewer commits (each writes its pages to
            // the log) and thread switches, at no cost when nothing else is ready.
            if group.len() < GROUP && last_commit.elapsed() < LINGER_UNDER_LOAD {
                std::thread::yield_now();
                gather(commands, &mut group);
            }
            let close = group
                .iter()
                .position(|c| matches!(c, Command::Close { .. }));
            let closing = close.map(|at| group.remove(at));
            self.commit(group);
            last_commit = Instant::now();
            self.prune();
            if let Some(Command::Close { reply }) = closing {
                if let Err(error) =
                    self.conn
                        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                {
                    tracing::warn!(path = %self.path.display(), error = %describe(&error), "final checkpoint failed; the next start replays the log");
                }
                let _ = reply.send(());
                return;
            }
        }
    }

    /// Apply a group of changes in one transaction and answer each.
    fn commit(&mut self, group: Vec<Command>) {
        if group.is_empty() {
            return;
        }
        let now_ms = to_ms(SystemTime::now());
        match self.apply(&group, now_ms) {
            Ok((applied, finished)) => {
                for (seq, count) in finished {
                    self.finished.push_back((seq, count, now_ms));
                    self.finished_sends += count;
                }
                for (command, done) in group.into_iter().zip(applied) {
                    self.dead = self.dead.saturating_add_signed(done.dead);
                    answer(command, Ok(done));
                }
            }
            Err(_) if group.len() > 1 => {
                for command in group {
                    self.commit(vec![command]);
                }
            }
            Err(error) => {
                let why = QueueError::Unavailable(format!(
                    "{}: {}",
                    self.path.display(),
                    describe(&error)
                ));
                tracing::error!(%why, "a change to the queue failed; nothing of it was kept");
                for command in group {
                    answer(command, Err(why.clone()));
                }
            }
        }
    }

    /// Apply every change in one transaction; what each did, and the chunks finished.
    fn apply(
        &mut self,
        group: &[Command],
        now_ms: i64,
    ) -> rusqlite::Result<(Vec<Applied>, Finished)> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut longest = self.longest.load(Ordering::Acquire);
        let mut applied = Vec::with_capacity(group.len());
        // The settlements' changes to each chunk, written once for the group.
        let mut changes = ChunkChanges::default();
        for command in group {
            let mut done = Applied {
                written: Vec::new(),
                dead: 0,
                replayed: None,
            };
            match command {
                Command::Enqueue { chunks, .. } => {
                    for envelopes in chunks {
                        done.written
                            .push(insert_chunk(&tx, envelopes, now_ms, &mut longest)?);
                    }
                }
                Command::Settle {
                    updates,
                    dead,
                    attempts,
                    follow_ups,
                    ..
                } => {
                    changes.add(updates);
                    for row in dead {
                        insert_dead(&tx, row, now_ms)?;
                    }
                    for row in attempts {
                        insert_attempt(&tx, row)?;
                    }
                    done.dead = dead.len() as isize;
                    for envelopes in follow_ups {
                        done.written
                            .push(insert_chunk(&tx, envelopes, now_ms, &mut longest)?);
                    }
                }
                Command::Replay { ids, .. } => {
                    let groups = take_dead(&tx, ids, now_ms)?;
                    done.dead = -(groups.iter().map(Vec::len).sum::<usize>() as isize);
                    for envelopes in &groups {
                        let written = insert_chunk(&tx, envelopes, now_ms, &mut longest)?;
                        // Their earlier attempts now go with the chunk they are in again.
                        let mut moved =
                            tx.prepare_cached("UPDATE attempts SET chunk = ?1 WHERE id = ?2")?;
                        for envelope in envelopes {
                            moved.execute(params![written.seq, envelope.id.to_bytes()])?;
                        }
                        done.written.push(written);
                    }
                    done.replayed = Some(groups);
                }
                Command::Close { .. } => {}
            }
            applied.push(done);
        }
        let finished = settle(&tx, changes, now_ms)?;
        if longest > self.longest.load(Ordering::Acquire) {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'longest_chunk_ms'",
                [longest],
            )?;
        }
        tx.commit()?;
        self.longest.fetch_max(longest, Ordering::AcqRel);
        Ok((applied, finished))
    }

    /// Keep finished statuses and dead letters within their bounds.
    fn prune(&mut self) {
        let retention = self.retention;
        let slack = (retention.count / 64).max(64);
        let by_age = self.last_age_prune.elapsed() >= AGE_PRUNE_EVERY;
        let over_count = self.finished_sends > retention.count + slack;
        let over_dead = self.dead > self.dead_letter_capacity;
        if !(by_age || over_count || over_dead) {
            return;
        }
        let oldest = to_ms(SystemTime::now()) - retention.age.as_millis() as i64;
        let mut gone = Vec::new();
        while let Some((seq, count, at)) = self.finished.front().copied() {
            let too_many = self.finished_sends > retention.count;
            if !(too_many || (by_age && at < oldest)) {
                break;
            }
            self.finished.pop_front();
            self.finished_sends -= count;
            gone.push(Value::Integer(seq));
        }
        if by_age {
            self.last_age_prune = Instant::now();
        }
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction()?;
            if !gone.is_empty() {
                let gone = Rc::new(gone);
                tx.prepare_cached("DELETE FROM chunks WHERE seq IN rarray(?1)")?
                    .execute([gone.clone()])?;
                tx.prepare_cached("DELETE FROM payloads WHERE seq IN rarray(?1)")?
                    .execute([gone.clone()])?;
                // A dead letter's attempts stay as long as it does.
                tx.prepare_cached(
                    "DELETE FROM attempts WHERE chunk IN rarray(?1)
                     AND id NOT IN (SELECT id FROM dead)",
                )?
                .execute([gone])?;
            }
            if over_dead {
                let excess = self.dead - self.dead_letter_capacity;
                // The attempts of evicted letters whose chunk the retention already took.
                tx.execute(
                    "DELETE FROM attempts WHERE id IN
                     (SELECT id FROM dead ORDER BY died_ms, seq LIMIT ?1)
                     AND chunk NOT IN (SELECT seq FROM chunks)",
                    [excess as i64],
                )?;
                let removed = tx.execute(
                    "DELETE FROM dead WHERE seq IN
                     (SELECT seq FROM dead ORDER BY died_ms, seq LIMIT ?1)",
                    [excess as i64],
                )?;
                tx.execute(
                    "UPDATE meta SET value = value + ?1 WHERE key = 'dead_letters_evicted'",
                    [removed as i64],
                )?;
                self.dead = self.dead.saturating_sub(removed);
            }
            tx.commit()
        })();
        if let Err(error) = result {
            tracing::warn!(path = %self.path.display(), error = %describe(&error), "could not remove old statuses; they go at the next start");
        }
    }
}

/// Take what else is waiting, up to a group.
fn gather(commands: &mpsc::Receiver<Command>, group: &mut Vec<Command>) {
    while group.len() < GROUP {
        match commands.try_recv() {
            Ok(command) => group.push(command),
            Err(_) => break,
        }
    }
}

fn answer(command: Command, done: Result<Applied, QueueError>) {
    match command {
        Command::Enqueue { chunks, reply }
        | Command::Settle {
            follow_ups: chunks,
            reply,
            ..
        } => {
            let _ = reply.send((chunks, done.map(|d| d.written)));
        }
        Command::Replay { reply, .. } => {
            let _ = reply.send(match done {
                Ok(done) => (done.replayed.unwrap_or_default(), Ok(done.written)),
                Err(why) => (Vec::new(), Err(why)),
            });
        }
        Command::Close { reply } => {
            let _ = reply.send(());
        }
    }
}

/// Write one destination's sends as a chunk.
fn insert_chunk(
    tx: &Connection,
    envelopes: &[Envelope],
    now_ms: i64,
    longest: &mut i64,
) -> rusqlite::Result<Written> {
    let mut runs = Runs::default();
    let records: Vec<Record> = envelopes
        .iter()
        .map(|e| Record {
            id: e.id,
            created_ms: to_ms(e.created_at),
            updated_ms: 0,
            size: u32::try_from(e.size()).unwrap_or(u32::MAX),
            elapsed_ms: 0,
            attempts: u16::try_from(e.attempts).unwrap_or(u16::MAX),
            state: Stored::Queued,
            run: runs.index(e.run.as_ref()),
            outcome: 0,
        })
        .collect();
    let (Some(first), Some(last)) = (
        records.iter().map(|r| r.id).min(),
        records.iter().map(|r| r.id).max(),
    ) else {
        return Err(rusqlite::Error::InvalidQuery);
    };
    *longest = (*longest).max(id_ms(last) - id_ms(first));
    let destination = &envelopes[0].destination;
    let budget_ms = envelopes
        .iter()
        .map(|e| to_ms(e.budget_started_at()))
        .min()
        .unwrap_or(now_ms);
    tx.prepare_cached(
        "INSERT INTO chunks (destination, first_ms, last_id, created_ms, budget_ms, count,
         finished_ms, records, runs, outcomes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7, ?8, '[]')",
    )?
    .execute(params![
        &**destination,
        id_ms(first),
        last.to_bytes(),
        now_ms,
        budget_ms,
        records.len() as i64,
        encode_records(&records),
        runs.to_json(),
    ])?;
    let seq = tx.last_insert_rowid();
    let data = encode_payloads(
        destination,
        envelopes
            .iter()
            .map(|e| (e.id, to_ms(e.created_at), e.run.as_deref(), &e.payload[..])),
        envelopes.iter().map(Envelope::size).sum(),
    );
    tx.prepare_cached("INSERT INTO payloads (seq, data) VALUES (?1, ?2)")?
        .execute(params![seq, data])?;
    Ok(Written {
        seq,
        records,
        runs,
        created_ms: now_ms,
        budget_ms,
    })
}

/// What a group's settlements changed in each chunk, in the order they came: the last word on
/// each record, the count and the outcomes wins.
#[derive(Default)]
struct ChunkChanges {
    chunks: Vec<MergedUpdate>,
    at: HashMap<i64, usize>,
}

struct MergedUpdate {
    seq: i64,
    records: Vec<(u32, [u8; RECORD])>,
    outcomes: Option<Arc<str>>,
    pending: u32,
    count: usize,
}

impl ChunkChanges {
    fn add(&mut self, updates: &[ChunkUpdate]) {
        for update in updates {
            let at = *self.at.entry(update.seq).or_insert_with(|| {
                self.chunks.push(MergedUpdate {
                    seq: update.seq,
                    records: Vec::new(),
                    outcomes: None,
                    pending: update.pending,
                    count: update.count,
                });
                self.chunks.len() - 1
            });
            let merged = &mut self.chunks[at];
            // Written in order, so a later record overwrites an earlier one.
            merged.records.extend_from_slice(&update.records);
            merged.pending = update.pending;
            if update.outcomes.is_some() {
                merged.outcomes.clone_from(&update.outcomes);
            }
        }
    }
}

/// Write the records the settlements changed (in place: records have a fixed size, so only
/// their page is written) and outcomes that changed, once per chunk; a chunk whose sends are
/// all final is marked finished and loses its payloads at once. Returns the chunks it
/// finished, with their sends.
fn settle(tx: &Connection, changes: ChunkChanges, now_ms: i64) -> rusqlite::Result<Finished> {
    let mut finished = Vec::new();
    if changes.chunks.is_empty() {
        return Ok(finished);
    }
    let mut outcomes = tx.prepare_cached("UPDATE chunks SET outcomes = ?2 WHERE seq = ?1")?;
    let mut finish = tx.prepare_cached(
        "UPDATE chunks SET finished_ms = ?2 WHERE seq = ?1 AND finished_ms IS NULL",
    )?;
    let mut exists = tx.prepare_cached("SELECT 1 FROM chunks WHERE seq = ?1")?;
    let mut drop_payloads = tx.prepare_cached("DELETE FROM payloads WHERE seq = ?1")?;
    let mut blob: Option<rusqlite::blob::Blob<'_>> = None;
    for chunk in changes.chunks {
        let opened = match blob.as_mut() {
            Some(open) => open.reopen(chunk.seq),
            None => tx
                .blob_open(rusqlite::MAIN_DB, "chunks", "records", chunk.seq, false)
                .map(|open| {
                    blob = Some(open);
                }),
        };
        if opened.is_err() {
            // A failed reopen leaves the handle unusable: a fresh one, if the chunk is there.
            blob = None;
            if !exists.exists([chunk.seq])? {
                continue; // gone (the retention took it): nothing to write
            }
            blob = Some(tx.blob_open(rusqlite::MAIN_DB, "chunks", "records", chunk.seq, false)?);
        }
        if let Some(records) = blob.as_mut() {
            for (index, record) in &chunk.records {
                records.write_at(record, *index as usize * RECORD)?;
            }
        }
        if let Some(changed) = chunk.outcomes.as_deref() {
            outcomes.execute(params![chunk.seq, changed])?;
        }
        // Finished now (not already, by a settlement applied before): its payloads go.
        if chunk.pending == 0 && finish.execute(params![chunk.seq, now_ms])? > 0 {
            drop_payloads.execute([chunk.seq])?;
            finished.push((chunk.seq, chunk.count));
        }
    }
    Ok(finished)
}

/// Log a failed attempt, keeping its send's first and newest, `MAX_LOGGED_ATTEMPTS` in all.
fn insert_attempt(tx: &Connection, row: &AttemptRow) -> rusqlite::Result<()> {
    let id = row.id.to_bytes();
    tx.prepare_cached("INSERT INTO attempts (id, chunk, attempt) VALUES (?1, ?2, ?3)")?
        .execute(params![id, row.chunk, row.attempt])?;
    tx.prepare_cached(
        "DELETE FROM attempts WHERE id = ?1
         AND seq <> (SELECT min(seq) FROM attempts WHERE id = ?1)
         AND seq NOT IN (SELECT seq FROM attempts WHERE id = ?1 ORDER BY seq DESC LIMIT ?2)",
    )?
    .execute(params![
        id,
        destinations_core::attempts::MAX_LOGGED_ATTEMPTS as i64 - 1
    ])?;
    Ok(())
}

fn insert_dead(tx: &Connection, row: &DeadRow, now_ms: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO dead (id, destination, run, created_ms, attempts, died_ms, reason, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        row.id.to_bytes(),
        &*row.destination,
        row.run.as_deref(),
        row.created_ms,
        row.attempts,
        now_ms,
        row.reason,
        &row.payload[..],
    ])?;
    Ok(())
}

/// Take these dead letters out, as envelopes with a fresh retry budget, grouped by
/// destination in the order asked.
fn take_dead(
    tx: &Connection,
    ids: &[EventId],
    now_ms: i64,
) -> rusqlite::Result<Vec<Vec<Envelope>>> {
    let mut statement = tx.prepare_cached(
        "DELETE FROM dead WHERE id = ?1 RETURNING seq, id, destination, run, created_ms, attempts, died_ms, reason, payload",
    )?;
    let mut groups: Vec<Vec<Envelope>> = Vec::new();
    for id in ids {
        let Some((_, letter)) = statement
            .query_row([id.to_bytes()], crate::rows::dead_letter)
            .optional()?
        else {
            continue;
        };
        let mut envelope = letter.envelope;
        envelope.attempts = 0;
        let envelope = Envelope::restored(
            envelope.id,
            envelope.destination,
            envelope.run,
            envelope.created_at,
            0,
            envelope.payload,
            from_ms(now_ms),
        );
        match groups.iter_mut().find(|g| {
            g.first()
                .is_some_and(|e| e.destination == envelope.destination)
        }) {
            Some(group) => group.push(envelope),
            None => groups.push(vec![envelope]),
        }
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(
        seq: i64,
        records: &[(u32, u8)],
        outcomes: Option<&str>,
        pending: u32,
    ) -> ChunkUpdate {
        ChunkUpdate {
            seq,
            records: records.iter().map(|(i, b)| (*i, [*b; RECORD])).collect(),
            outcomes: outcomes.map(Arc::from),
            pending,
            count: 3,
        }
    }

    #[test]
    fn a_chunk_changed_by_several_settlements_of_a_group_ends_with_the_last() {
        let mut changes = ChunkChanges::default();
        changes.add(&[
            update(7, &[(0, 1)], Some("[a]"), 2),
            update(8, &[(2, 9)], None, 1),
        ]);
        changes.add(&[update(7, &[(1, 2), (0, 3)], None, 0)]);
        let seven = &changes.chunks[0];
        assert_eq!(seven.seq, 7);
        // Written in this order, the record at 0 ends as the later one.
        let written: Vec<(u32, u8)> = seven.records.iter().map(|(i, r)| (*i, r[0])).collect();
        assert_eq!(written, [(0, 1), (1, 2), (0, 3)]);
        assert_eq!(seven.pending, 0);
        assert_eq!(
            seven.outcomes.as_deref(),
            Some("[a]"),
            "kept when a later one has none"
        );
        assert_eq!(changes.chunks[1].seq, 8);
        assert_eq!(changes.chunks.len(), 2);
    }
}
