//! Concurrency slots. A task whose template has a `concurrency` rule carries its key and
//! holds one of the key's `limit` slots from its admission until it ends; until admitted it
//! is `waiting`, and every pending step of it counts one parent more (`pending_parents`), so
//! the readiness index never offers its steps and claims cost nothing more. Admission takes
//! that parent away in the transaction that frees a slot (a holder ended) or creates the
//! task, so a waiting task starts as soon as a slot frees.
//!
//! The limit holds across replicas: every transaction that admits for a key first takes the
//! key's lock (PostgreSQL: a transaction-level advisory lock; SQLite has one writer), and then
//! counts the holders. The locks are taken in one order (sorted), always before the event
//! sequencer's lock, so two transactions never wait for each other in a circle.

use crate::entities::{event, task};
use crate::progress::{Subjects, children_released};
use crate::sql::Sql;
use crate::write::WriteTxn;
use crate::{Error, Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, FromQueryResult};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tasker_domain::EventName;
use tasker_domain::concurrency::Strategy;
use uuid::Uuid;

/// A task waits for a slot.
pub(crate) const WAITING: &str = "waiting";
/// A task holds a slot.
pub(crate) const HELD: &str = "held";
/// A task ended: its slot (or its place in the queue) is given up.
pub(crate) const FREED: &str = "freed";

/// The first half of every concurrency key's advisory lock (the second is the key's hash):
/// two-number advisory locks never collide with the sequencer's one-number lock.
const LOCK_CLASS: i32 = 0x7461_736b; // "task"

/// The index every question about a key's slots reads.
const KEY_INDEX: &str = "ix_tasks_concurrency";

#[derive(Debug, FromQueryResult)]
struct Holders {
    held: i64,
    head_limit: Option<i32>,
}

/// One number a statement counted (as `n`).
#[derive(Debug, FromQueryResult)]
pub(crate) struct Counted {
    pub n: i64,
}

#[derive(Debug, FromQueryResult)]
struct Waiting {
    id: Uuid,
    concurrency_limit: Option<i32>,
}

/// What admissions did in a transaction.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    /// The tasks admitted, as they are now.
    pub tasks: Vec<task::Model>,
    /// Their steps that became claimable.
    pub ready_steps: usize,
}

/// The 32-bit FNV-1a hash of a key: the same on every replica, whatever its build.
fn key_hash(key: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// Takes the advisory locks of `keys` in lock class `class` for the rest of `txn`
/// (PostgreSQL; SQLite's single writer serializes already): one command for all of them, in
/// the order of their hashes, so two transactions never wait for each other's.
pub(crate) async fn lock_keys<'k>(
    txn: &WriteTxn,
    class: i32,
    keys: impl IntoIterator<Item = &'k str>,
) -> Result<()> {
    if txn.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    let hashes: BTreeSet<i32> = keys.into_iter().map(key_hash).collect();
    if hashes.is_empty() {
        return Ok(());
    }
    let mut sql = Sql::new(sea_orm::DbBackend::Postgres);
    sql.push("SELECT ");
    for (i, hash) in hashes.into_iter().enumerate() {
        if i > 0 {
            sql.push(", ");
        }
        sql.push(&format!("pg_advisory_xact_lock({class}, "))
            .bind(hash)
            .push(")");
    }
    txn.execute_raw(sql.build()).await?;
    Ok(())
}

impl Store {
    /// Takes the locks of `keys` for the rest of `txn` (PostgreSQL; SQLite's single writer
    /// serializes already). One command for all of them, in the order of their hashes.
    pub(crate) async fn lock_concurrency_keys<'k>(
        &self,
        txn: &WriteTxn,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Result<()> {
        lock_keys(txn, LOCK_CLASS, keys).await
    }

    /// Admits waiting tasks of `keys` while their key has free slots: higher priority first,
    /// then oldest. Their steps lose the parent that held them back; those with no other
    /// become claimable (`task.steps_ready`). The keys must be locked already.
    pub(crate) async fn admit_waiting(
        &self,
        txn: &WriteTxn,
        keys: &BTreeSet<String>,
        now: DateTime<Utc>,
        events: &mut Vec<event::ActiveModel>,
    ) -> Result<Admitted> {
        self.admit_preferring(txn, keys, &[], now, events).await
    }

    /// [`Store::admit_waiting`], the tasks of `first` before any other (the new tasks a
    /// `cancel_in_progress` cancellation made room for).
    async fn admit_preferring(
        &self,
        txn: &WriteTxn,
        keys: &BTreeSet<String>,
        first: &[Uuid],
        now: DateTime<Utc>,
        events: &mut Vec<event::ActiveModel>,
    ) -> Result<Admitted> {
        let backend = txn.get_database_backend();
        let mut chosen = Vec::new();
        for key in keys {
            let mut sql = Sql::new(backend);
            sql.push("SELECT (SELECT COUNT(*) FROM tasks")
                .indexed_by(KEY_INDEX)
                .push(" WHERE concurrency_key = ")
                .bind(key.clone())
                .push(" AND slot = 'held') AS held, (SELECT concurrency_limit FROM tasks")
                .indexed_by(KEY_INDEX)
                .push(" WHERE concurrency_key = ")
                .bind(key.clone())
                .push(" AND slot = 'waiting' ORDER BY priority DESC, id LIMIT 1) AS head_limit");
            let Some(holders) = Holders::find_by_statement(sql.build()).one(txn).await? else {
                continue;
            };
            let free = i64::from(holders.head_limit.unwrap_or(0)) - holders.held;
            if free <= 0 {
                continue;
            }
            let mut sql = Sql::new(backend);
            sql.push("SELECT id, concurrency_limit FROM tasks")
                .indexed_by(KEY_INDEX)
                .push(" WHERE concurrency_key = ")
                .bind(key.clone())
                .push(" AND slot = 'waiting' ORDER BY ");
            if !first.is_empty() {
                sql.push("CASE WHEN id IN ")
                    .bind_list(first.iter().copied())
                    .push(" THEN 0 ELSE 1 END, ");
            }
            sql.push("priority DESC, id LIMIT ").bind(free);
            if backend == sea_orm::DbBackend::Postgres {
                // A waiting task another transaction is cancelling is passed over: waiting
                // for its row under the key's lock could close a circle with that one.
                sql.push(" FOR UPDATE SKIP LOCKED");
            }
            let waiting = Waiting::find_by_statement(sql.build()).all(txn).await?;
            // Versions of a template may differ in limit: each waits for its own.
            chosen.extend(
                (holders.held..)
                    .zip(waiting)
                    .take_while(|(held, waiting)| {
                        *held < i64::from(waiting.concurrency_limit.unwrap_or(0))
                    })
                    .map(|(_, waiting)| waiting.id),
            );
        }
        if chosen.is_empty() {
            return Ok(Admitted::default());
        }
        let mut sql = Sql::new(backend);
        sql.push("UPDATE tasks SET slot = 'held' WHERE slot = 'waiting' AND id IN ")
            .bind_list(chosen.iter().copied())
            .push(" RETURNING *");
        let tasks = task::Model::find_by_statement(sql.build()).all(txn).await?;
        if tasks.is_empty() {
            return Ok(Admitted::default());
        }
        let mut sql = Sql::new(backend);
        sql.push(
            "UPDATE workflow_steps SET pending_parents = pending_parents - 1, ready_since_ms = ",
        )
        .bind(now.timestamp_millis())
        .push(" WHERE state = 'pending' AND task_id IN ")
        .bind_list(tasks.iter().map(|task| task.id))
        .push(" RETURNING id, task_id, name, position, pending_parents");
        let ungated = txn.query_all_raw(sql.build()).await?;
        let subjects = Subjects::of_tasks(&tasks);
        let ready_steps = children_released(&ungated, &subjects, now, events)?;
        Ok(Admitted { tasks, ready_steps })
    }

    /// Gives up the slots (or queue places) of tasks that just ended, then admits the next
    /// waiting tasks of the keys whose slots freed. No statement when none of them has a key.
    pub(crate) async fn free_slots(
        &self,
        txn: &WriteTxn,
        ended: &[task::Model],
        now: DateTime<Utc>,
        events: &mut Vec<event::ActiveModel>,
    ) -> Result<Admitted> {
        if txn.defer_frees_of(ended) {
            return Ok(Admitted::default());
        }
        let freed_keys = self.give_up_slots(txn, ended).await?;
        self.admit_waiting(txn, &freed_keys, now, events).await
    }

    /// Marks the slots (or queue places) of tasks that just ended as given up, under their
    /// keys' locks; answers the keys whose slots freed. No statement when none has a key.
    async fn give_up_slots(
        &self,
        txn: &WriteTxn,
        ended: &[task::Model],
    ) -> Result<BTreeSet<String>> {
        let holding: Vec<&task::Model> = ended
            .iter()
            .filter(|task| matches!(task.slot.as_deref(), Some(HELD | WAITING)))
            .collect();
        if holding.is_empty() {
            return Ok(BTreeSet::new());
        }
        let freed_keys: BTreeSet<String> = holding
            .iter()
            .filter(|task| task.slot.as_deref() == Some(HELD))
            .filter_map(|task| task.concurrency_key.clone())
            .collect();
        self.lock_concurrency_keys(txn, freed_keys.iter().map(String::as_str))
            .await?;
        let mut sql = Sql::new(txn.get_database_backend());
        sql.push("UPDATE tasks SET slot = 'freed' WHERE id IN ")
            .bind_list(holding.iter().map(|task| task.id));
        txn.execute_raw(sql.build()).await?;
        Ok(freed_keys)
    }

    /// Frees the slots collected since [`WriteTxn::defer_slot_frees`], all at once.
    pub(crate) async fn free_deferred_slots(
        &self,
        txn: &WriteTxn,
        now: DateTime<Utc>,
        events: &mut Vec<event::ActiveModel>,
    ) -> Result<Admitted> {
        let ended = txn.take_deferred_frees();
        self.free_slots(txn, &ended, now, events).await
    }

    /// A failed task that runs again needs a slot again: taken when its key has one free, a
    /// conflict otherwise (the task stays failed).
    pub(crate) async fn take_slot_again(&self, txn: &WriteTxn, task: &task::Model) -> Result<()> {
        let (Some(key), Some(limit)) = (&task.concurrency_key, task.concurrency_limit) else {
            return Ok(());
        };
        if task.slot.as_deref() == Some(HELD) {
            return Ok(());
        }
        self.lock_concurrency_keys(txn, [key.as_str()]).await?;
        let mut sql = Sql::new(txn.get_database_backend());
        sql.push("SELECT COUNT(*) AS n FROM tasks")
            .indexed_by(KEY_INDEX)
            .push(" WHERE concurrency_key = ")
            .bind(key.clone())
            .push(" AND slot = 'held'");
        let held = Counted::find_by_statement(sql.build())
            .one(txn)
            .await?
            .map_or(0, |counted| counted.n);
        if held >= i64::from(limit) {
            return Err(Error::Conflict(format!(
                "task {} cannot run again now: {held} task(s) with its concurrency key {key:?} \
                 run, the limit is {limit}; retry it when one of them ends, or cancel one",
                task.id
            )));
        }
        let mut sql = Sql::new(txn.get_database_backend());
        sql.push("UPDATE tasks SET slot = 'held' WHERE id = ")
            .bind(task.id);
        txn.execute_raw(sql.build()).await?;
        Ok(())
    }
}

impl Store {
    /// Settles new tasks with concurrency keys, in the transaction that wrote them (their keys
    /// locked before it wrote anything): `cancel_in_progress` cancels the oldest holders that
    /// stand in their way, waiting tasks are admitted while slots are free, and those still
    /// waiting are cancelled (`cancel_newest`) or stay queued (`task.queued`). Transitions go
    /// to `rows`, events to `events`, for the caller to insert. Answers the new tasks and the
    /// cancelled holders as they are now, by id.
    pub(crate) async fn settle_new_tasks(
        &self,
        txn: &WriteTxn,
        created: Vec<(task::Model, Strategy)>,
        now: DateTime<Utc>,
        rows: &mut crate::events::Rows,
        events: &mut Vec<event::ActiveModel>,
    ) -> Result<HashMap<Uuid, task::Model>> {
        let backend = txn.get_database_backend();
        let mut settled: HashMap<Uuid, task::Model> = HashMap::new();
        let mut arriving: BTreeMap<&str, (i64, i32)> = BTreeMap::new();
        for (task, strategy) in &created {
            if let (Strategy::CancelInProgress, Some(key)) = (strategy, &task.concurrency_key) {
                let entry = arriving
                    .entry(key.as_str())
                    .or_insert((0, task.concurrency_limit.unwrap_or(0)));
                entry.0 += 1;
            }
        }
        for (key, (count, limit)) in arriving {
            let mut sql = Sql::new(backend);
            sql.push("SELECT COUNT(*) AS n FROM tasks")
                .indexed_by(KEY_INDEX)
                .push(" WHERE concurrency_key = ")
                .bind(key.to_owned())
                .push(" AND slot = 'held'");
            let held = Counted::find_by_statement(sql.build())
                .one(txn)
                .await?
                .map_or(0, |counted| counted.n);
            let excess = (held + count - i64::from(limit)).min(held);
            if excess <= 0 {
                continue;
            }
            let oldest = self.idle_holders(txn, key, excess).await?;
            let reason = format!(
                "a newer task with concurrency key {key:?} took its slot (strategy cancel_in_progress)"
            );
            let mut cancelled = Vec::with_capacity(oldest.len());
            for holder in &oldest {
                cancelled.push(
                    self.cancel_rows(txn, holder, Some(&reason), now, rows, events)
                        .await?,
                );
            }
            // The room made goes to the new tasks, before any that waited already.
            let newest: Vec<Uuid> = created
                .iter()
                .filter(|(task, _)| task.concurrency_key.as_deref() == Some(key))
                .map(|(task, _)| task.id)
                .collect();
            let freed_keys = self.give_up_slots(txn, &cancelled).await?;
            let admitted = self
                .admit_preferring(txn, &freed_keys, &newest, now, events)
                .await?;
            settled.extend(admitted.tasks.into_iter().map(|task| (task.id, task)));
            for mut task in cancelled {
                mark_freed(&mut task);
                settled.insert(task.id, task);
            }
        }
        let keys: BTreeSet<String> = created
            .iter()
            .filter_map(|(task, _)| task.concurrency_key.clone())
            .collect();
        let admitted = self.admit_waiting(txn, &keys, now, events).await?;
        settled.extend(admitted.tasks.into_iter().map(|task| (task.id, task)));
        let subjects = Subjects::of_tasks(
            &created
                .iter()
                .map(|(task, _)| task.clone())
                .collect::<Vec<_>>(),
        );
        let mut refused = Vec::new();
        for (task, strategy) in &created {
            if settled.contains_key(&task.id) {
                continue;
            }
            match strategy {
                Strategy::CancelNewest => {
                    let reason = format!(
                        "its concurrency key {:?} is at its limit of {} (strategy cancel_newest)",
                        task.concurrency_key.as_deref().unwrap_or_default(),
                        task.concurrency_limit.unwrap_or_default()
                    );
                    refused.push(
                        self.cancel_rows(txn, task, Some(&reason), now, rows, events)
                            .await?,
                    );
                }
                Strategy::Queue | Strategy::CancelInProgress => {
                    events.push(queued_event(&subjects, task, now));
                }
            }
        }
        // Waiting ones: their places go, and no slot frees.
        self.free_slots(txn, &refused, now, events).await?;
        for mut task in refused {
            mark_freed(&mut task);
            settled.insert(task.id, task);
        }
        Ok(settled)
    }
}

impl Store {
    /// Up to `count` of the oldest holders of `key` that this transaction can cancel without
    /// waiting. On PostgreSQL a holder another transaction is changing (a step completing, a
    /// claim starting it) is passed over: waiting for its rows while holding the key's lock
    /// could close a circle with that transaction, which waits for the key to free its slot.
    /// Their rows stay locked to the end of this transaction.
    async fn idle_holders(
        &self,
        txn: &WriteTxn,
        key: &str,
        count: i64,
    ) -> Result<Vec<task::Model>> {
        let backend = txn.get_database_backend();
        let postgres = backend == sea_orm::DbBackend::Postgres;
        let mut sql = Sql::new(backend);
        sql.push("SELECT * FROM tasks")
            .indexed_by(KEY_INDEX)
            .push(" WHERE concurrency_key = ")
            .bind(key.to_owned())
            .push(" AND slot = 'held' ORDER BY id");
        if postgres {
            sql.push(" FOR UPDATE SKIP LOCKED");
        } else {
            sql.push(" LIMIT ").bind(count);
        }
        let holders = task::Model::find_by_statement(sql.build()).all(txn).await?;
        if !postgres {
            return Ok(holders);
        }
        self.idle_tasks(txn, holders, count).await
    }

    /// PostgreSQL: up to `count` of `tasks` (whose rows `txn` holds locked) whose unfinished
    /// steps no other transaction is changing, locking those steps for `txn`: cancelling them
    /// then waits for nobody. A task with a step another transaction holds is passed over.
    pub(crate) async fn idle_tasks(
        &self,
        txn: &WriteTxn,
        tasks: Vec<task::Model>,
        count: i64,
    ) -> Result<Vec<task::Model>> {
        let mut idle = Vec::new();
        for task in tasks {
            if idle.len() as i64 >= count {
                break;
            }
            let unfinished = "workflow_steps WHERE task_id = ";
            let mut sql = Sql::new(txn.get_database_backend());
            sql.push("SELECT (SELECT COUNT(*) FROM ")
                .push(unfinished)
                .bind(task.id)
                .push(" AND state IN ('pending', 'in_progress', 'error')) - (SELECT COUNT(*) FROM (SELECT id FROM ")
                .push(unfinished)
                .bind(task.id)
                .push(" AND state IN ('pending', 'in_progress', 'error') FOR UPDATE SKIP LOCKED) AS mine) AS n");
            let busy = Counted::find_by_statement(sql.build())
                .one(txn)
                .await?
                .map_or(0, |counted| counted.n);
            if busy == 0 {
                idle.push(task);
            }
        }
        Ok(idle)
    }
}

/// A task model as [`Store::free_slots`] left its row.
pub(crate) fn mark_freed(task: &mut task::Model) {
    if matches!(task.slot.as_deref(), Some(HELD | WAITING)) {
        task.slot = Some(FREED.to_owned());
    }
}

/// `task.queued`: a new task waits for a slot of its key.
pub(crate) fn queued_event(
    subjects: &Subjects,
    task: &task::Model,
    now: DateTime<Utc>,
) -> event::ActiveModel {
    subjects.subject(task.id).event(
        EventName::TaskQueued.as_str(),
        None,
        json!({
            "concurrency_key": task.concurrency_key,
            "limit": task.concurrency_limit,
        }),
        &Value::Null,
        now,
    )
}

#[cfg(test)]
mod tests {
    use super::key_hash;

    #[test]
    fn key_hashes_are_fixed_values() {
        // Replicas of different builds must lock the same key the same way.
        assert_eq!(
            key_hash(""),
            i32::from_ne_bytes(0x811c_9dc5_u32.to_ne_bytes())
        );
        assert_eq!(
            key_hash("a"),
            i32::from_ne_bytes(0xe40c_292c_u32.to_ne_bytes())
        );
        assert_ne!(key_hash("shop/order:1"), key_hash("shop/order:2"));
    }
}
