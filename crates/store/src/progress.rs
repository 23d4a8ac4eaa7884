//! What finished steps mean for the rest of their task, inside the transaction that
//! recorded them: children whose last parent finished become claimable, tasks with nothing
//! left to run finish, and every event names its task's namespace, template and correlation
//! id.

use crate::entities::{event, task, task_transition, workflow_step, workflow_step_edge};
use crate::events::{Subject, task_transition as task_rows};
use crate::execution::DONE_STATES;
use crate::records::TaskRecord;
use crate::sql::Sql;
use crate::state_change::{CompletedAt, TaskMove, move_tasks};
use crate::write::WriteTxn;
use crate::{Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    Statement,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use tasker_domain::execution::{StepProgress, task_outcome};
use tasker_domain::{Dag, EventName, StateMachine, StepState, TaskState};
use uuid::Uuid;

impl Store {
    /// Drops the dependency counters of the children of steps that just became done, and
    /// appends a `task.steps_ready` event for each task where some became claimable;
    /// returns how many did.
    pub(crate) async fn release_children(
        &self,
        txn: &WriteTxn,
        parent_ids: &[Uuid],
        subjects: &Subjects,
        now: DateTime<Utc>,
        events: &mut Vec<event::ActiveModel>,
    ) -> Result<usize> {
        if parent_ids.is_empty() {
            return Ok(0);
        }
        let statement = release_children_statement(txn.get_database_backend(), parent_ids, now);
        children_released(&txn.query_all_raw(statement).await?, subjects, now, events)
    }

    /// Moves running tasks whose steps are all done to `complete`, and those where a step
    /// failed for good and nothing else can run to `error` (each with a `task.finalized`
    /// summary), and notes with `task.waiting` those left with nothing to run until a retry
    /// time. Their events are appended to `events`; their transition rows are returned for
    /// the caller to insert. Slots of concurrency keys that the finished tasks held go to the
    /// next waiting tasks.
    pub(crate) async fn finalize_tasks(
        &self,
        txn: &WriteTxn,
        task_ids: &[Uuid],
        subjects: &Subjects,
        now: DateTime<Utc>,
        events: &mut Vec<event::ActiveModel>,
    ) -> Result<Finalized> {
        let statement = step_counts_statement(txn.get_database_backend(), task_ids, now);
        let counts = txn.query_all_raw(statement).await?;
        self.finalize_counted(txn, &counts, subjects, now, events)
            .await
    }

    /// [`Store::finalize_tasks`] once the tasks' steps are counted ([`step_counts_statement`]).
    pub(crate) async fn finalize_counted(
        &self,
        txn: &WriteTxn,
        counts: &[sea_orm::QueryResult],
        subjects: &Subjects,
        now: DateTime<Utc>,
        events: &mut Vec<event::ActiveModel>,
    ) -> Result<Finalized> {
        let counts = counts
            .iter()
            .map(|row| TaskStepCounts::from_query_result(row, ""))
            .collect::<Result<Vec<_>, _>>()?;
        let complete: Vec<Uuid> = counts
            .iter()
            .filter(|c| c.done == c.total)
            .map(|c| c.task_id)
            .collect();
        let suspects: Vec<Uuid> = counts
            .iter()
            .filter(|c| c.done < c.total && c.failed > 0)
            .map(|c| c.task_id)
            .collect();
        let failed = self.blocked_tasks(txn, &suspects).await?;
        for waiting in counts.iter().filter(|c| {
            c.done < c.total && c.active == 0 && c.backing_off > 0 && !failed.contains(&c.task_id)
        }) {
            events.push(subjects.subject(waiting.task_id).event(
                EventName::TaskWaiting.as_str(),
                None,
                json!({ "waiting_steps": waiting.backing_off, "retry_at_ms": waiting.next_retry_ms }),
                &Value::Null,
                now,
            ));
        }
        let mut ended = Vec::new();
        let mut transitions = Vec::new();
        for (ids, to) in [(complete, TaskState::Complete), (failed, TaskState::Error)] {
            if ids.is_empty() {
                continue;
            }
            let mut updated = Vec::with_capacity(ids.len());
            let mut rest = ids;
            // Running tasks, and (rarely: no statement otherwise) tasks that never started
            // but ended all the same, a step of theirs not started in time.
            for from in [TaskState::InProgress, TaskState::Pending] {
                if rest.is_empty() {
                    break;
                }
                let change = TaskMove {
                    ids: &rest,
                    from: &[from],
                    to,
                    version: None,
                    completed_at: CompletedAt::Stamp,
                };
                let moved = move_tasks(txn, change, now).await?;
                rest.retain(|id| !moved.iter().any(|task| task.id == *id));
                updated.extend(moved.into_iter().map(|task| (from, task)));
            }
            for (from, task) in updated {
                let (row, event) = task_rows(
                    subjects.subject(task.id),
                    Some(from),
                    to,
                    task.version,
                    json!({}),
                    now,
                );
                transitions.push(row);
                events.push(event);
                if let Some(count) = counts.iter().find(|c| c.task_id == task.id) {
                    events.push(subjects.subject(task.id).event(
                        EventName::TaskFinalized.as_str(),
                        None,
                        json!({
                            "outcome": to.api_name(),
                            "duration_ms": (now - task.created_at).num_milliseconds(),
                            "steps_total": count.total,
                            "steps_done": count.done,
                            "steps_failed": count.failed,
                        }),
                        &Value::Null,
                        now,
                    ));
                }
                ended.push(task);
            }
        }
        let admitted = self.free_slots(txn, &ended, now, events).await?;
        let mut tasks = Vec::with_capacity(ended.len());
        for mut task in ended {
            crate::concurrency::mark_freed(&mut task);
            tasks.push(task.try_into()?);
        }
        Ok(Finalized {
            tasks,
            transitions,
            admitted_ready: admitted.ready_steps,
        })
    }

    /// Of tasks with a step that failed for good, those where nothing else can run.
    async fn blocked_tasks(&self, txn: &WriteTxn, task_ids: &[Uuid]) -> Result<Vec<Uuid>> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let steps = workflow_step::Entity::find()
            .filter(workflow_step::Column::TaskId.is_in(task_ids.iter().copied()))
            .order_by_asc(workflow_step::Column::Position)
            .all(txn)
            .await?;
        let edges = workflow_step_edge::Entity::find()
            .filter(workflow_step_edge::Column::TaskId.is_in(task_ids.iter().copied()))
            .all(txn)
            .await?;
        let mut blocked = Vec::new();
        for &task_id in task_ids {
            let own: Vec<&workflow_step::Model> =
                steps.iter().filter(|s| s.task_id == task_id).collect();
            let ids: Vec<Uuid> = own.iter().map(|s| s.id).collect();
            let dag = Dag::from_keys(
                &ids,
                edges
                    .iter()
                    .filter(|e| e.task_id == task_id)
                    .map(|e| (e.parent_step_id, e.child_step_id)),
            );
            let progress: Vec<StepProgress> = own
                .iter()
                .map(|s| {
                    Ok(StepProgress {
                        state: StepState::parse(&s.state)?,
                        next_attempt_ms: s.next_attempt_ms,
                        // Whether a limit holds it does not change an outcome.
                        held: None,
                    })
                })
                .collect::<Result<_>>()?;
            if task_outcome(&progress, &dag) == Some(TaskState::Error) {
                blocked.push(task_id);
            }
        }
        Ok(blocked)
    }

    /// Namespace, template and correlation id of each task, for event payloads.
    pub(crate) async fn subjects(&self, txn: &WriteTxn, task_ids: &[Uuid]) -> Result<Subjects> {
        let mut subjects = Subjects::default();
        if !task_ids.is_empty() {
            let mut sql = Sql::new(self.db.get_database_backend());
            sql.push("SELECT id AS task_id, namespace AS task_namespace, template_name AS task_template, correlation_id AS task_correlation_id, traceparent AS task_traceparent FROM tasks WHERE id IN ")
                .bind_list(task_ids.iter().copied());
            for row in TaskSubject::find_by_statement(sql.build()).all(txn).await? {
                subjects.add(row);
            }
        }
        Ok(subjects)
    }
}

/// The statement that drops the dependency counters of the children of `parent_ids` and
/// answers them ([`children_released`] reads its rows).
pub(crate) fn release_children_statement(
    backend: DbBackend,
    parent_ids: &[Uuid],
    now: DateTime<Utc>,
) -> Statement {
    let mut sql = Sql::new(backend);
    // Every child is stamped: the stamp that stays is the one of the parent that brought
    // its counter to zero, the moment it became claimable (until then it is not read).
    sql.push("UPDATE workflow_steps SET pending_parents = pending_parents - (SELECT COUNT(*) FROM workflow_step_edges e WHERE e.child_step_id = workflow_steps.id AND e.parent_step_id IN ")
        .bind_list(parent_ids.iter().copied())
        .push("), ready_since_ms = ")
        .bind(now.timestamp_millis())
        .push(" WHERE id IN (SELECT child_step_id FROM workflow_step_edges WHERE parent_step_id IN ")
        .bind_list(parent_ids.iter().copied())
        .push(") RETURNING id, task_id, name, position, pending_parents");
    sql.build()
}

/// Appends a `task.steps_ready` event for each task where children became claimable (the
/// rows of [`release_children_statement`]); returns how many did.
pub(crate) fn children_released(
    rows: &[sea_orm::QueryResult],
    subjects: &Subjects,
    now: DateTime<Utc>,
    events: &mut Vec<event::ActiveModel>,
) -> Result<usize> {
    let children = rows
        .iter()
        .map(|row| ReadyChild::from_query_result(row, ""))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ready: Vec<&ReadyChild> = children.iter().filter(|c| c.pending_parents == 0).collect();
    ready.sort_by_key(|c| c.position);
    events.extend(subjects.steps_ready(
        ready.iter().map(|c| (c.task_id, c.id, c.name.as_str())),
        now,
    ));
    Ok(ready.len())
}

/// The statement that counts the steps of `task_ids` by what they are doing
/// ([`Store::finalize_counted`] reads its rows).
pub(crate) fn step_counts_statement(
    backend: DbBackend,
    task_ids: &[Uuid],
    now: DateTime<Utc>,
) -> Statement {
    let mut sql = Sql::new(backend);
    sql.push("SELECT task_id, COUNT(*) AS total, SUM(CASE WHEN state IN ")
        .push(DONE_STATES)
        .push(" THEN 1 ELSE 0 END) AS done, SUM(CASE WHEN state = 'error' AND next_attempt_ms IS NULL THEN 1 ELSE 0 END) AS failed, SUM(CASE WHEN state = 'in_progress' OR (state = 'pending' AND pending_parents = 0) OR (state = 'error' AND next_attempt_ms <= ")
        .bind(now.timestamp_millis())
        .push(") THEN 1 ELSE 0 END) AS active, SUM(CASE WHEN state = 'error' AND next_attempt_ms > ")
        .bind(now.timestamp_millis())
        .push(" THEN 1 ELSE 0 END) AS backing_off, MIN(CASE WHEN state = 'error' THEN next_attempt_ms END) AS next_retry_ms FROM workflow_steps WHERE task_id IN ")
        .bind_list(task_ids.iter().copied())
        .push(" GROUP BY task_id");
    sql.build()
}

/// What events name of a task, as a statement returns it: the `task_*` columns of
/// [`push_task_fields`] beside a step's row (its own `task_id`), or of a read of tasks.
#[derive(Debug, FromQueryResult)]
pub(crate) struct TaskSubject {
    pub task_id: Uuid,
    task_namespace: String,
    task_template: String,
    task_correlation_id: Option<String>,
    task_traceparent: Option<String>,
}

/// Adds to the `RETURNING` list of an `UPDATE workflow_steps` the [`TaskSubject`] columns of
/// each step's task (`column` of the task as `alias`), each looked up by id, so that no
/// statement has to read the tasks again. `task_id` is left unqualified: SQLite's `RETURNING`
/// cannot name the updated table's alias, and only the step has a column of that name.
pub(crate) fn push_task_fields(sql: &mut Sql, fields: &[(&str, &str)]) {
    for (column, alias) in fields {
        sql.push(", (SELECT t.")
            .push(column)
            .push(" FROM tasks t WHERE t.id = task_id) AS ")
            .push(alias);
    }
}

/// The task columns a [`TaskSubject`] reads, and their aliases.
pub(crate) const SUBJECT_FIELDS: [(&str, &str); 4] = [
    ("namespace", "task_namespace"),
    ("template_name", "task_template"),
    ("correlation_id", "task_correlation_id"),
    ("traceparent", "task_traceparent"),
];

struct SubjectNames {
    namespace: String,
    template: String,
    correlation_id: String,
    trace_parent: Option<String>,
}

/// What finalizing did: the tasks that finished, their transition rows (for the caller to
/// insert), and how many steps of other tasks became claimable as the finished ones freed
/// their concurrency slots.
pub(crate) struct Finalized {
    pub tasks: Vec<TaskRecord>,
    pub transitions: Vec<task_transition::ActiveModel>,
    pub admitted_ready: usize,
}

/// Namespace, template and correlation id by task id.
#[derive(Default)]
pub(crate) struct Subjects {
    names: HashMap<Uuid, SubjectNames>,
}

/// A task's correlation id (its own id for tasks from before correlation ids).
fn correlation_or_id(correlation_id: Option<String>, task_id: Uuid) -> String {
    correlation_id.unwrap_or_else(|| task_id.to_string())
}

impl Subjects {
    /// The subjects of tasks already read, without a query.
    pub fn of_tasks(tasks: &[task::Model]) -> Subjects {
        let mut subjects = Subjects::default();
        for t in tasks {
            subjects.add(TaskSubject {
                task_id: t.id,
                task_namespace: t.namespace.clone(),
                task_template: t.template_name.clone(),
                task_correlation_id: t.correlation_id.clone(),
                task_traceparent: t.traceparent.clone(),
            });
        }
        subjects
    }

    /// Whether the task's subject is known already.
    pub fn knows(&self, task_id: Uuid) -> bool {
        self.names.contains_key(&task_id)
    }

    /// Records a task's subject (the first one given for a task is kept).
    pub fn add(&mut self, subject: TaskSubject) {
        let task_id = subject.task_id;
        self.names.entry(task_id).or_insert_with(|| SubjectNames {
            correlation_id: correlation_or_id(subject.task_correlation_id, task_id),
            namespace: subject.task_namespace,
            template: subject.task_template,
            trace_parent: subject.task_traceparent,
        });
    }

    /// One `task.steps_ready` event per task among `(task, step, name)` steps.
    pub fn steps_ready<'s>(
        &self,
        steps: impl Iterator<Item = (Uuid, Uuid, &'s str)>,
        now: DateTime<Utc>,
    ) -> Vec<event::ActiveModel> {
        let mut by_task: Vec<(Uuid, Vec<(Uuid, &str)>)> = Vec::new();
        let mut index: HashMap<Uuid, usize> = HashMap::new();
        for (task_id, step_id, name) in steps {
            let slot = *index.entry(task_id).or_insert_with(|| {
                by_task.push((task_id, Vec::new()));
                by_task.len() - 1
            });
            by_task[slot].1.push((step_id, name));
        }
        by_task
            .into_iter()
            .map(|(task_id, list)| crate::events::steps_ready(self.subject(task_id), &list, now))
            .collect()
    }

    /// The trace context the task's work joins, if it has one.
    pub fn trace_parent(&self, task_id: Uuid) -> Option<&str> {
        self.names.get(&task_id)?.trace_parent.as_deref()
    }

    pub fn subject(&self, task_id: Uuid) -> Subject<'_> {
        let names = self.names.get(&task_id);
        let text = |field: fn(&SubjectNames) -> &String| names.map_or("", |n| field(n).as_str());
        Subject {
            namespace: text(|n| &n.namespace),
            template: text(|n| &n.template),
            correlation_id: text(|n| &n.correlation_id),
            task_id,
        }
    }
}

#[derive(Debug, FromQueryResult)]
struct TaskStepCounts {
    task_id: Uuid,
    total: i64,
    done: i64,
    /// Failed for good (no retry time).
    failed: i64,
    /// Running, or claimable now.
    active: i64,
    /// Failed, waiting for a retry time still to come.
    backing_off: i64,
    /// The earliest of those retry times.
    next_retry_ms: Option<i64>,
}

#[derive(Debug, FromQueryResult)]
struct ReadyChild {
    id: Uuid,
    task_id: Uuid,
    name: String,
    position: i32,
    pending_parents: i32,
}
