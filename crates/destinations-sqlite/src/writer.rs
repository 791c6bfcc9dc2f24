//! The one writer. Every change to the file goes through one thread, which takes whatever has
//! gathered — enqueues and settlements from many tasks — and commits it in one transaction
//! (group commit). Each change sits in a savepoint of its own, so one that fails fails alone.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use destinations_core::{Envelope, EventId, QueueError, StatusRetention};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use crate::options::describe;
use crate::rows::{Names, count_state, to_ms};
use crate::schema::DEAD;

/// The most changes committed together.
const GROUP: usize = 512;
/// Commits this close together mean load.
const LINGER_UNDER_LOAD: Duration = Duration::from_millis(2);
/// How often finished statuses past their age are removed.
const AGE_PRUNE_EVERY: Duration = Duration::from_secs(5);

/// Sends handed back with the outcome of their enqueue.
pub(crate) type EnqueueReply = (Vec<Envelope>, Result<Vec<i64>, QueueError>);

/// One change for the writer.
pub(crate) enum Command {
    /// Insert sends; replies with their row numbers.
    Enqueue {
        envelopes: Vec<Envelope>,
        reply: oneshot::Sender<EnqueueReply>,
    },
    /// Record the outcome of an attempt and insert the sends it made; replies with their row
    /// numbers.
    Settle {
        rows: Vec<SettleRow>,
        follow_ups: Vec<Envelope>,
        reply: oneshot::Sender<EnqueueReply>,
    },
    /// Make these dead letters queued again; replies with what was moved.
    Replay {
        ids: Vec<EventId>,
        reply: oneshot::Sender<Result<Vec<(i64, Envelope)>, QueueError>>,
    },
    /// Checkpoint the file and stop.
    Close { reply: oneshot::Sender<()> },
}

/// The outcome of one send.
pub(crate) struct SettleRow {
    pub(crate) key: RowKey,
    pub(crate) change: Change,
    pub(crate) attempts: u32,
    pub(crate) error: Option<String>,
    /// The target's answer, as JSON (shared by the sends of a batch that share it).
    pub(crate) response: Option<Arc<str>>,
}

/// Which row: by number when the queue leased it, by id otherwise.
pub(crate) enum RowKey {
    Seq(i64),
    Id(EventId),
}

/// What becomes of a row.
pub(crate) enum Change {
    Delivered,
    Retry { run_at_ms: i64, batch: i64 },
    Dead,
}

/// The writer thread's handle.
pub(crate) struct Writer {
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Start the writer on `conn`.
    pub(crate) fn start(
        conn: Connection,
        path: PathBuf,
        retention: StatusRetention,
        dead_letter_capacity: usize,
        delivered: Vec<(i64, i64)>,
    ) -> rusqlite::Result<Self> {
        let delivered = VecDeque::from(delivered);
        let dead = count_state(&conn, DEAD)?;
        let (tx, rx) = mpsc::channel();
        let mut state = WriterState {
            conn,
            path,
            retention,
            dead_letter_capacity,
            delivered,
            dead,
            last_age_prune: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("destinations-sqlite-writer".into())
            .spawn(move || state.run(&rx))
            .map_err(|e| {
                rusqlite::Error::ModuleError(format!("cannot start the writer thread: {e}"))
            })?;
        Ok(Self {
            commands: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hand a change to the writer; `false` once it stopped.
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

/// The writer's view: the connection and the counts retention needs.
struct WriterState {
    conn: Connection,
    path: PathBuf,
    retention: StatusRetention,
    dead_letter_capacity: usize,
    /// Delivered rows kept for their status, as (seq, when), oldest delivery first: what the
    /// retention removes first.
    delivered: VecDeque<(i64, i64)>,
    /// Dead rows kept (the dead letters).
    dead: usize,
    last_age_prune: Instant,
}

/// What one change did, before the commit says whether it stands.
enum Applied {
    Seqs(Vec<i64>),
    Moved(Vec<(i64, Envelope)>),
    Failed(QueueError),
}

impl WriterState {
    fn run(&mut self, commands: &mpsc::Receiver<Command>) {
        let mut last_commit = Instant::now() - LINGER_UNDER_LOAD;
        while let Ok(first) = commands.recv() {
            let mut group = vec![first];
            gather(commands, &mut group);
            // Under load, letting the threads that are ready run first lets the tasks under way
            // add their changes to this commit: far fewer commits (each writes its pages to the
            // log) and thread switches, at no cost when nothing else is ready.
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

    /// Apply a group of changes in one transaction and answer each. If one change fails, the
    /// group is rolled back and each change is committed on its own, so that only the failing
    /// one fails.
    fn commit(&mut self, group: Vec<Command>) {
        if group.is_empty() {
            return;
        }
        let now_ms = to_ms(SystemTime::now());
        match self.apply(&group, now_ms) {
            Ok((applied, delivered, dead)) => {
                self.delivered
                    .extend(delivered.into_iter().map(|seq| (seq, now_ms)));
                self.dead = self.dead.saturating_add_signed(dead);
                for (command, done) in group.into_iter().zip(applied) {
                    answer(command, done);
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
                    answer(command, Applied::Failed(why.clone()));
                }
            }
        }
    }

    /// Apply every change in one transaction: what each did, and the delivered and dead rows
    /// it added (a replay removes dead ones).
    fn apply(
        &mut self,
        group: &[Command],
        now_ms: i64,
    ) -> rusqlite::Result<(Vec<Applied>, Vec<i64>, isize)> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut applied = Vec::with_capacity(group.len());
        let (mut delivered, mut dead) = (Vec::new(), 0isize);
        for command in group {
            applied.push(match command {
                Command::Enqueue { envelopes, .. } => {
                    Applied::Seqs(insert(&tx, envelopes, now_ms)?)
                }
                Command::Settle {
                    rows, follow_ups, ..
                } => {
                    dead += settle(&tx, rows, now_ms, &mut delivered)? as isize;
                    Applied::Seqs(insert(&tx, follow_ups, now_ms)?)
                }
                Command::Replay { ids, .. } => {
                    let moved = replay(&tx, ids, now_ms)?;
                    dead -= moved.len() as isize;
                    Applied::Moved(moved)
                }
                Command::Close { .. } => Applied::Seqs(Vec::new()),
            });
        }
        tx.commit()?;
        Ok((applied, delivered, dead))
    }

    /// Keep finished statuses and dead letters within their bounds.
    fn prune(&mut self) {
        let retention = self.retention;
        let slack = (retention.count / 64).max(64);
        let by_age = self.last_age_prune.elapsed() >= AGE_PRUNE_EVERY;
        let over_count = self.delivered.len() > retention.count + slack;
        let over_dead = self.dead > self.dead_letter_capacity;
        if !(by_age || over_count || over_dead) {
            return;
        }
        let oldest = to_ms(SystemTime::now()) - retention.age.as_millis() as i64;
        let mut gone = Vec::new();
        while self.delivered.len() > retention.count
            || (by_age && self.delivered.front().is_some_and(|(_, at)| *at < oldest))
        {
            if let Some((seq, _)) = self.delivered.pop_front() {
                gone.push(Value::Integer(seq));
            }
        }
        if by_age {
            self.last_age_prune = Instant::now();
        }
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction()?;
            if !gone.is_empty() {
                tx.prepare_cached("DELETE FROM sends WHERE seq IN rarray(?1) AND state = 2")?
                    .execute([Rc::new(gone)])?;
            }
            if over_dead {
                let excess = self.dead - self.dead_letter_capacity;
                let removed = tx.execute(
                    "DELETE FROM sends WHERE seq IN
                     (SELECT seq FROM sends WHERE state = 3 ORDER BY updated_ms LIMIT ?1)",
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

fn answer(command: Command, done: Applied) {
    match (command, done) {
        (Command::Enqueue { envelopes, reply }, Applied::Seqs(seqs))
        | (
            Command::Settle {
                follow_ups: envelopes,
                reply,
                ..
            },
            Applied::Seqs(seqs),
        ) => {
            let _ = reply.send((envelopes, Ok(seqs)));
        }
        (Command::Enqueue { envelopes, reply }, Applied::Failed(why))
        | (
            Command::Settle {
                follow_ups: envelopes,
                reply,
                ..
            },
            Applied::Failed(why),
        ) => {
            let _ = reply.send((envelopes, Err(why)));
        }
        (Command::Replay { reply, .. }, Applied::Moved(moved)) => {
            let _ = reply.send(Ok(moved));
        }
        (Command::Replay { reply, .. }, Applied::Failed(why)) => {
            let _ = reply.send(Err(why));
        }
        (Command::Close { reply }, _) => {
            let _ = reply.send(());
        }
        _ => {}
    }
}

fn insert(tx: &Connection, envelopes: &[Envelope], now_ms: i64) -> rusqlite::Result<Vec<i64>> {
    if envelopes.is_empty() {
        return Ok(Vec::new());
    }
    let mut statement = tx.prepare_cached(
        "INSERT INTO sends (id, destination, run, created_ms, budget_ms, state, attempts, updated_ms, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8)",
    )?;
    let mut seqs = Vec::with_capacity(envelopes.len());
    for e in envelopes {
        statement.execute(params![
            e.id.to_bytes(),
            &*e.destination,
            e.run.as_deref(),
            to_ms(e.created_at),
            to_ms(e.budget_started_at()),
            e.attempts,
            now_ms,
            &e.payload[..],
        ])?;
        seqs.push(tx.last_insert_rowid());
    }
    Ok(seqs)
}

/// Apply the outcomes: delivered rows go in groups that share an answer (one statement for a
/// whole batch), failures one by one. Adds the delivered rows to `delivered`; returns how many
/// died.
fn settle(
    tx: &Connection,
    rows: &[SettleRow],
    now_ms: i64,
    delivered: &mut Vec<i64>,
) -> rusqlite::Result<usize> {
    let mut groups: HashMap<(u32, Option<&str>), Vec<Value>> = HashMap::new();
    let mut dead = 0;
    for row in rows {
        match (&row.change, &row.key) {
            (Change::Delivered, RowKey::Seq(seq)) => {
                groups
                    .entry((row.attempts, row.response.as_deref()))
                    .or_default()
                    .push(Value::Integer(*seq));
                delivered.push(*seq);
            }
            (Change::Delivered, RowKey::Id(id)) => {
                let seq: Option<i64> = tx
                    .prepare_cached(
                        "UPDATE sends SET state = 2, attempts = ?2, updated_ms = ?3, response = ?4,
                         run_at_ms = NULL, batch = NULL, payload = NULL WHERE id = ?1 RETURNING seq",
                    )?
                    .query_row(
                        params![id.to_bytes(), row.attempts, now_ms, row.response.as_deref()],
                        |r| r.get(0),
                    )
                    .optional()?;
                delivered.extend(seq);
            }
            (Change::Retry { run_at_ms, batch }, key) => {
                let (column, key) = key_of(key);
                tx.prepare_cached(&format!(
                    "UPDATE sends SET state = 1, attempts = ?2, updated_ms = ?3, response = ?4,
                     last_error = ?5, run_at_ms = ?6, batch = ?7 WHERE {column} = ?1"
                ))?
                .execute(params![
                    key,
                    row.attempts,
                    now_ms,
                    row.response.as_deref(),
                    row.error,
                    run_at_ms,
                    batch
                ])?;
            }
            (Change::Dead, key) => {
                let (column, key) = key_of(key);
                dead += tx
                    .prepare_cached(&format!(
                        "UPDATE sends SET state = 3, attempts = ?2, updated_ms = ?3, response = ?4,
                         last_error = ?5, run_at_ms = NULL, batch = NULL WHERE {column} = ?1"
                    ))?
                    .execute(params![
                        key,
                        row.attempts,
                        now_ms,
                        row.response.as_deref(),
                        row.error
                    ])?;
            }
        }
    }
    let mut statement = tx.prepare_cached(
        "UPDATE sends SET state = 2, attempts = ?1, updated_ms = ?2, response = ?3,
         run_at_ms = NULL, batch = NULL, payload = NULL WHERE seq IN rarray(?4)",
    )?;
    for ((attempts, response), seqs) in groups {
        statement.execute(params![attempts, now_ms, response, Rc::new(seqs)])?;
    }
    Ok(dead)
}

/// The column and value that find a row.
fn key_of(key: &RowKey) -> (&'static str, Value) {
    match key {
        RowKey::Seq(seq) => ("seq", Value::Integer(*seq)),
        RowKey::Id(id) => ("id", Value::Blob(id.to_bytes().to_vec())),
    }
}

fn replay(tx: &Connection, ids: &[EventId], now_ms: i64) -> rusqlite::Result<Vec<(i64, Envelope)>> {
    let mut statement = tx.prepare_cached(
        "UPDATE sends SET state = 0, attempts = 0, budget_ms = ?2, updated_ms = ?2, run_at_ms = NULL,
         batch = NULL WHERE id = ?1 AND state = 3
         RETURNING seq, id, destination, run, created_ms, budget_ms, attempts, payload",
    )?;
    let mut names = Names::default();
    let mut moved = Vec::new();
    for id in ids {
        let row = statement
            .query_row(params![id.to_bytes(), now_ms], |row| {
                crate::rows::envelope_of(row, &mut names)
            })
            .optional()?;
        moved.extend(row);
    }
    Ok(moved)
}
