//! The retention policy's deletes: finished tasks that ended before a cutoff go, with their
//! steps, edges, tags, transitions and events, a small batch per transaction so that claims
//! and completions interleave with the sweep. The event log keeps its cursor order (positions
//! are never reused or renumbered); the highest cursor deleted is recorded, and a reader that
//! resumes from an older cursor is told (`Error::CursorExpired`) instead of being answered
//! with a silent gap.

use crate::event_log::EventCursor;
use crate::sql::Sql;
use crate::write::WriteTxn;
use crate::{Error, Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, FromQueryResult};
use tasker_domain::{StateMachine, TaskState};
use uuid::Uuid;

/// What one pruning batch deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub tasks: u64,
    pub events: u64,
}

#[derive(Debug, FromQueryResult)]
struct TaskId {
    id: Uuid,
}

#[derive(Debug, FromQueryResult)]
struct Through {
    through: Option<i64>,
}

/// The task states that never change again by themselves; a person may still retry an
/// `error` task, until the policy deletes it.
const FINISHED: [TaskState; 4] = [
    TaskState::Complete,
    TaskState::Error,
    TaskState::Cancelled,
    TaskState::ResolvedManually,
];

impl Store {
    /// Deletes up to `batch` finished tasks that ended before `cutoff` (oldest first), with
    /// their steps, edges, tags, transitions and events, and up to `batch` events about no
    /// task that occurred before it; one transaction. Raises the log's pruned-through cursor
    /// to the highest cursor deleted. A caller repeats it until it deletes nothing.
    pub async fn prune_finished(&self, cutoff: DateTime<Utc>, batch: u32) -> Result<Pruned> {
        self.writing(async {
            // PostgreSQL: every committed event has its number before any is deleted, so the
            // recorded cursor covers them all. Readers here hear of newly numbered ones (the
            // NOTIFY reaches only the other replicas).
            if self.number_events().await? > 0 {
                self.note_events_appended();
            }
            let txn = self.begin_write().await?;
            let backend = self.db.get_database_backend();
            let cursor = crate::event_log::cursor_column(backend);
            let mut candidates = Sql::new(backend);
            push_aged_out_tasks(&mut candidates, cutoff, batch);
            let tasks: Vec<Uuid> = TaskId::find_by_statement(candidates.build())
                .all(&txn)
                .await?
                .into_iter()
                .map(|row| row.id)
                .collect();
            let mut through = None;
            let mut pruned = Pruned::default();
            if !tasks.is_empty() {
                let mut highest = Sql::new(backend);
                highest
                    .push("SELECT MAX(")
                    .push(cursor)
                    .push(") AS through FROM events WHERE task_id IN ")
                    .bind_list(tasks.iter().copied());
                through = through.max(highest_cursor(&txn, highest).await?);
                pruned.events += delete(&txn, backend, "events", "task_id", &tasks).await?;
                // Step transitions are keyed by their step: reached through the steps' index.
                let mut step_transitions = Sql::new(backend);
                step_transitions
                    .push("DELETE FROM step_transitions WHERE step_id IN (SELECT id FROM workflow_steps WHERE task_id IN ")
                    .bind_list(tasks.iter().copied())
                    .push(")");
                txn.execute_raw(step_transitions.build()).await?;
                for table in [
                    "task_transitions",
                    "workflow_step_edges",
                    "task_tags",
                    "workflow_steps",
                ] {
                    delete(&txn, backend, table, "task_id", &tasks).await?;
                }
                pruned.tasks = delete(&txn, backend, "tasks", "id", &tasks).await?;
            }
            // Events about no task (templates registered, …) age out on their own.
            let mut old_events = Sql::new(backend);
            old_events
                .push("SELECT position AS id, ")
                .push(cursor)
                .push(" AS through FROM events WHERE task_id IS NULL AND occurred_at < ")
                .bind(cutoff)
                .push(" ORDER BY position LIMIT ")
                .bind(i64::from(batch));
            let loose = LooseEvent::find_by_statement(old_events.build())
                .all(&txn)
                .await?;
            if !loose.is_empty() {
                through = through.max(loose.iter().filter_map(|event| event.through).max());
                let mut remove = Sql::new(backend);
                remove
                    .push("DELETE FROM events WHERE position IN ")
                    .bind_list(loose.iter().map(|event| event.id));
                pruned.events += txn.execute_raw(remove.build()).await?.rows_affected();
            }
            if let Some(through) = through {
                let mut record = Sql::new(backend);
                record
                    .push("UPDATE event_retention SET pruned_through = ")
                    .bind(through)
                    .push(" WHERE id = 1 AND pruned_through < ")
                    .bind(through);
                txn.execute_raw(record.build()).await?;
            }
            if pruned == Pruned::default() {
                // Nothing written: no news about whether writes work.
                txn.commit().await?;
            } else {
                self.commit(txn).await?;
            }
            Ok(pruned)
        })
        .await
    }

    /// The highest cursor among the events the retention policy deleted (0 when none).
    pub async fn pruned_through(&self) -> Result<EventCursor> {
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT pruned_through AS through FROM event_retention WHERE id = 1");
        Ok(EventCursor(
            highest_cursor(&self.db, sql).await?.unwrap_or(0),
        ))
    }

    /// Refuses a cursor older than what the log retains: events after it may have been
    /// deleted, so reading on from it could skip some without a word.
    pub async fn check_cursor(&self, cursor: EventCursor) -> Result<()> {
        let pruned_through = self.pruned_through().await?;
        if cursor < pruned_through {
            return Err(Error::CursorExpired {
                cursor: cursor.0,
                pruned_through: pruned_through.0,
            });
        }
        Ok(())
    }
}

#[derive(Debug, FromQueryResult)]
struct LooseEvent {
    id: i64,
    through: Option<i64>,
}

/// The ids of up to `batch` finished tasks that ended before `cutoff`, oldest first. A task
/// that ended before the cutoff was created before it, so the range on `ix_tasks_created_at`
/// keeps the search to old tasks. SQLite is told to use that index: left to choose, its
/// planner (which has no statistics) prefers the equality on `ix_tasks_state` and reads every
/// finished task, recent ones included, on each sweep (46 ms over 100,000 of them, holding
/// the writer).
pub(crate) fn push_aged_out_tasks(sql: &mut Sql, cutoff: DateTime<Utc>, batch: u32) {
    sql.push(if sql.is_postgres() {
        "SELECT id FROM tasks"
    } else {
        "SELECT id FROM tasks INDEXED BY ix_tasks_created_at"
    })
    .push(" WHERE created_at < ")
    .bind(cutoff)
    .push(" AND completed_at < ")
    .bind(cutoff)
    .push(" AND state IN ")
    .bind_list(FINISHED.iter().map(|state| state.as_str()))
    .push(" ORDER BY created_at LIMIT ")
    .bind(i64::from(batch));
}

async fn highest_cursor<C: ConnectionTrait>(connection: &C, sql: Sql) -> Result<Option<i64>> {
    Ok(Through::find_by_statement(sql.build())
        .one(connection)
        .await?
        .and_then(|row| row.through))
}

/// Deletes the rows of `table` whose `column` is one of `ids`; returns how many.
async fn delete(
    txn: &WriteTxn,
    backend: sea_orm::DbBackend,
    table: &str,
    column: &str,
    ids: &[Uuid],
) -> Result<u64> {
    let mut sql = Sql::new(backend);
    sql.push("DELETE FROM ")
        .push(table)
        .push(" WHERE ")
        .push(column)
        .push(" IN ")
        .bind_list(ids.iter().copied());
    Ok(txn.execute_raw(sql.build()).await?.rows_affected())
}
