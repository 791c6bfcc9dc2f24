//! The one writer. Every change to the file goes through one thread, which takes whatever has
//! gathered — enqueues and settlements from many tasks — and commits it in one transaction
//! (group commit). Each change sits in a savepoint of its own, so one that fails fails alone.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use destinations_core::{Envelope, EventId, QueueError, StatusRetention};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use crate::options::describe;
use crate::rows::{Names, count_state, to_ms};
use crate::schema::{DEAD, DELIVERED};

/// The most changes committed together.
const GROUP: usize = 512;
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
    /// The target's answer, as JSON.
    pub(crate) response: Option<String>,
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
    ) -> rusqlite::Result<Self> {
        let delivered = count_state(&conn, DELIVERED)?;
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
    /// Delivered rows kept (for their status).
    delivered: usize,
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
        while let Ok(first) = commands.recv() {
            let mut group = vec![first];
            while group.len() < GROUP {
                match commands.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            let close = group
                .iter()
                .position(|c| matches!(c, Command::Close { .. }));
            let closing = close.map(|at| group.remove(at));
            self.commit(group);
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
        let outcome = (|| -> rusqlite::Result<(Vec<Applied>, usize, isize)> {
            let mut tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut applied = Vec::with_capacity(group.len());
            let (mut delivered, mut dead) = (0usize, 0isize);
            for command in &group {
                let savepoint = tx.savepoint()?;
                let result = match command {
                    Command::Enqueue { envelopes, .. } => {
                        insert(&savepoint, envelopes, now_ms).map(Applied::Seqs)
                    }
                    Command::Settle {
                        rows, follow_ups, ..
                    } => settle(&savepoint, rows, now_ms).and_then(|(d, x)| {
                        delivered += d;
                        dead += x as isize;
                        insert(&savepoint, follow_ups, now_ms).map(Applied::Seqs)
                    }),
                    Command::Replay { ids, .. } => replay(&savepoint, ids, now_ms).map(|moved| {
                        dead -= moved.len() as isize;
                        Applied::Moved(moved)
                    }),
                    Command::Close { .. } => Ok(Applied::Seqs(Vec::new())),
                };
                match result {
                    Ok(done) => {
                        savepoint.commit()?;
                        applied.push(done);
                    }
                    Err(error) => {
                        drop(savepoint); // rolls back this change only
                        applied.push(Applied::Failed(QueueError::Unavailable(format!(
                            "{}: {}",
                            self.path.display(),
                            describe(&error)
                        ))));
                    }
                }
            }
            tx.commit()?;
            Ok((applied, delivered, dead))
        })();
        match outcome {
            Ok((applied, delivered, dead)) => {
                self.delivered += delivered;
                self.dead = self.dead.saturating_add_signed(dead);
                for (command, done) in group.into_iter().zip(applied) {
                    answer(command, done);
                }
            }
            Err(error) => {
                let why = QueueError::Unavailable(format!(
                    "{}: {}",
                    self.path.display(),
                    describe(&error)
                ));
                tracing::error!(%why, changes = group.len(), "a commit to the queue failed; nothing of it was kept");
                for command in group {
                    answer(command, Applied::Failed(why.clone()));
                }
            }
        }
    }

    /// Keep finished statuses and dead letters within their bounds.
    fn prune(&mut self) {
        let retention = self.retention;
        let slack = (retention.count / 64).max(64);
        let by_age = self.last_age_prune.elapsed() >= AGE_PRUNE_EVERY;
        let over_count = self.delivered > retention.count + slack;
        let over_dead = self.dead > self.dead_letter_capacity;
        if !(by_age || over_count || over_dead) {
            return;
        }
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction()?;
            if over_count {
                let excess = self.delivered - retention.count;
                let removed = tx.execute(
                    "DELETE FROM sends WHERE seq IN
                     (SELECT seq FROM sends WHERE state = 2 ORDER BY updated_ms LIMIT ?1)",
                    [excess as i64],
                )?;
                self.delivered = self.delivered.saturating_sub(removed);
            }
            if by_age {
                let oldest = to_ms(SystemTime::now()) - retention.age.as_millis() as i64;
                let removed = tx.execute(
                    "DELETE FROM sends WHERE state = 2 AND updated_ms < ?1",
                    [oldest],
                )?;
                self.delivered = self.delivered.saturating_sub(removed);
                self.last_age_prune = Instant::now();
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
            tracing::warn!(path = %self.path.display(), error = %describe(&error), "could not remove old statuses; trying again later");
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

/// Apply the outcomes; returns (delivered, dead) counts.
fn settle(tx: &Connection, rows: &[SettleRow], now_ms: i64) -> rusqlite::Result<(usize, usize)> {
    const DELIVERED_SQL: &str =
        "UPDATE sends SET state = 2, attempts = ?2, updated_ms = ?3, response = ?4,
        run_at_ms = NULL, batch = NULL, payload = NULL WHERE";
    const RETRY_SQL: &str =
        "UPDATE sends SET state = 1, attempts = ?2, updated_ms = ?3, response = ?4,
        last_error = ?5, run_at_ms = ?6, batch = ?7 WHERE";
    const DEAD_SQL: &str =
        "UPDATE sends SET state = 3, attempts = ?2, updated_ms = ?3, response = ?4,
        last_error = ?5, run_at_ms = NULL, batch = NULL WHERE";
    let (mut delivered, mut dead) = (0, 0);
    for row in rows {
        let (sql, key): (&str, rusqlite::types::Value) = {
            let base = match row.change {
                Change::Delivered => DELIVERED_SQL,
                Change::Retry { .. } => RETRY_SQL,
                Change::Dead => DEAD_SQL,
            };
            match row.key {
                RowKey::Seq(seq) => (base, seq.into()),
                RowKey::Id(id) => (base, id.to_bytes().to_vec().into()),
            }
        };
        let column = match row.key {
            RowKey::Seq(_) => "seq = ?1",
            RowKey::Id(_) => "id = ?1",
        };
        let mut statement = tx.prepare_cached(&format!("{sql} {column}"))?;
        let changed = match row.change {
            Change::Delivered => {
                statement.execute(params![key, row.attempts, now_ms, row.response])?
            }
            Change::Retry { run_at_ms, batch } => statement.execute(params![
                key,
                row.attempts,
                now_ms,
                row.response,
                row.error,
                run_at_ms,
                batch
            ])?,
            Change::Dead => {
                statement.execute(params![key, row.attempts, now_ms, row.response, row.error])?
            }
        };
        if changed > 0 {
            match row.change {
                Change::Delivered => delivered += 1,
                Change::Dead => dead += 1,
                Change::Retry { .. } => {}
            }
        }
    }
    Ok((delivered, dead))
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
