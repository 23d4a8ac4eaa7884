//! What people do to running tasks: retry a failed task or step, resolve a failed task or a
//! step by hand, skip a step, re-run from a step. Each checks the state machine (a refused change is a conflict), records transitions and
//! events, and reopens the task for execution when it had stopped.

use crate::entities::{workflow_step, workflow_step_edge};
use crate::events::{
    Subject, metadata, step_transition as step_rows, task_transition as task_rows,
};
use crate::execution::DONE_STATES;
use crate::records::{StepRecord, TaskRecord};
use crate::sql::Sql;
use crate::state_change::{
    CompletedAt, StepEffect, StepMove, Steps, TaskMove, move_steps, move_tasks,
};
use crate::write::WriteTxn;
use crate::{Error, Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, EntityTrait, FromQueryResult, QueryFilter, QuerySelect};
use serde_json::{Value, json};
use std::collections::HashMap;
use tasker_domain::{Dag, StateMachine, StepState, TaskState};
use uuid::Uuid;

/// A change a person makes to one step.
#[derive(Debug, Clone)]
pub enum StepAction {
    /// Back to pending with fresh attempts.
    Retry,
    /// Done by hand, with the results its dependents should see.
    Resolve { results: Value },
    /// Not needed: its dependents proceed without it.
    Skip,
}

/// The step after the change, and whether it made other steps claimable.
#[derive(Debug, Clone)]
pub struct StepChange {
    pub step: StepRecord,
    pub task: TaskRecord,
    pub newly_ready: usize,
}

impl Store {
    /// Applies a person's change to a step, in one transaction.
    pub async fn change_step(
        &self,
        step_id: Uuid,
        action: StepAction,
        reason: Option<String>,
    ) -> Result<StepChange> {
        self.writing(async {
            let now = self.now();
            let txn = self.begin_write().await?;
            let step = Self::step_row(&txn, step_id).await?;
            let task = Self::task_row(&txn, step.task_id).await?;
            ensure_open(&task)?;
            let from = StepState::parse(&step.state)?;
            let to = match action {
                StepAction::Retry => StepState::Pending,
                StepAction::Resolve { .. } => StepState::ResolvedManually,
                StepAction::Skip => StepState::Skipped,
            };
            from.transition_to(to)?;
            let effect = match &action {
                StepAction::Retry => StepEffect::Reset,
                StepAction::Resolve { results } => StepEffect::Finish {
                    results: Some(results.clone()),
                },
                StepAction::Skip => StepEffect::Finish { results: None },
            };
            let change = StepMove {
                steps: Steps::One(step_id),
                from: &[from],
                to,
                version: Some(step.version),
                effect,
            };
            let updated = move_steps(&txn, change, now)
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    Error::Conflict(format!(
                        "step {step_id} changed while it was being updated; read it again and retry"
                    ))
                })?;
            let subjects = crate::progress::Subjects::of_tasks(std::slice::from_ref(&task));
            let (row, event) = step_rows(
                subjects.subject(step.task_id),
                step.id,
                &step.name,
                Some(from),
                to,
                updated.version,
                manual(reason.as_deref(), None),
                now,
            );
            let mut events = vec![event];
            if to == StepState::Pending && updated.pending_parents == 0 {
                events.push(crate::events::steps_ready(
                    subjects.subject(step.task_id),
                    &[(step.id, &step.name)],
                    now,
                ));
            }
            let newly_ready = if to.satisfies_dependency() {
                self.release_children(&txn, &[step.id], &subjects, now, &mut events)
                    .await?
            } else {
                0
            };
            let (mut task_transitions, reopened) = reopen_task(
                &txn,
                &task,
                subjects.subject(task.id),
                now,
                reason.as_deref(),
                &mut events,
            )
            .await?;
            let mut finished = self
                .finalize_tasks(&txn, &[step.task_id], &subjects, now, &mut events)
                .await?;
            // A failed task that runs again needs a slot again; one this change finishes
            // at once does not.
            if reopened.is_some() && finished.tasks.is_empty() {
                self.take_slot_again(&txn, &task).await?;
            }
            task_transitions.extend(finished.transitions);
            let mut new_rows = crate::events::Rows::new();
            new_rows.add([row]).add(task_transitions).add(events);
            self.insert_rows(&txn, new_rows).await?;
            self.commit_events(txn).await?;
            // The task as this change left it: finished, reopened, or as it was.
            let task = match finished.tasks.pop() {
                Some(finished) => finished,
                None => reopened.unwrap_or(task).try_into()?,
            };
            Ok(StepChange {
                step: updated.try_into()?,
                task,
                newly_ready: newly_ready + finished.admitted_ready,
            })
        })
        .await
    }

    /// Retries a failed task: it goes back to pending (`task.retry_requested`) with every
    /// failed step and fresh attempts, and starts again at once.
    pub async fn retry_task(&self, task_id: Uuid, reason: Option<String>) -> Result<TaskRecord> {
        self.writing(async {
            let now = self.now();
            let txn = self.begin_write().await?;
            let current = failed_task_row(&txn, task_id, "retried").await?;
            self.take_slot_again(&txn, &current).await?;
            let change = StepMove {
                steps: Steps::OfTask(task_id),
                from: &[StepState::Error],
                to: StepState::Pending,
                version: None,
                effect: StepEffect::Reset,
            };
            let reopened = move_steps(&txn, change, now).await?;
            let subjects = crate::progress::Subjects::of_tasks(std::slice::from_ref(&current));
            let subject = subjects.subject(task_id);
            let pending = move_tasks(
                &txn,
                TaskMove {
                    ids: &[task_id],
                    from: &[TaskState::Error],
                    to: TaskState::Pending,
                    version: Some(current.version),
                    completed_at: CompletedAt::Clear,
                },
                now,
            )
            .await?
            .pop()
            .ok_or_else(|| task_moved(task_id))?;
            let retried: Vec<&str> = reopened.iter().map(|step| step.name.as_str()).collect();
            let (requested, request_event) = task_rows(
                subject,
                Some(TaskState::Error),
                TaskState::Pending,
                pending.version,
                manual(reason.as_deref(), Some(("steps", json!(retried)))),
                now,
            );
            let mut events = vec![request_event];
            let mut step_transitions = Vec::new();
            for step in &reopened {
                let (row, event) = step_rows(
                    subject,
                    step.id,
                    &step.name,
                    Some(StepState::Error),
                    StepState::Pending,
                    step.version,
                    manual(reason.as_deref(), None),
                    now,
                );
                step_transitions.push(row);
                events.push(event);
            }
            events.extend(
                subjects.steps_ready(
                    reopened
                        .iter()
                        .filter(|step| step.pending_parents == 0)
                        .map(|step| (task_id, step.id, step.name.as_str())),
                    now,
                ),
            );
            let (mut task_transitions, running) =
                reopen_task(&txn, &pending, subject, now, reason.as_deref(), &mut events).await?;
            task_transitions.insert(0, requested);
            let mut new_rows = crate::events::Rows::new();
            new_rows
                .add(step_transitions)
                .add(task_transitions)
                .add(events);
            self.insert_rows(&txn, new_rows).await?;
            let task = running.unwrap_or(pending);
            self.commit_events(txn).await?;
            task.try_into()
        })
        .await
    }

    /// Marks a failed task as resolved by a person (`task.resolved_manually`): it is finished,
    /// and its steps stay as they are for the record.
    pub async fn resolve_task(&self, task_id: Uuid, reason: Option<String>) -> Result<TaskRecord> {
        self.writing(async {
            let now = self.now();
            let txn = self.begin_write().await?;
            let current = failed_task_row(&txn, task_id, "resolved by hand").await?;
            let resolved = move_tasks(
                &txn,
                TaskMove {
                    ids: &[task_id],
                    from: &[TaskState::Error],
                    to: TaskState::ResolvedManually,
                    version: Some(current.version),
                    completed_at: CompletedAt::Stamp,
                },
                now,
            )
            .await?
            .pop()
            .ok_or_else(|| task_moved(task_id))?;
            let subjects = crate::progress::Subjects::of_tasks(std::slice::from_ref(&current));
            let (row, event) = task_rows(
                subjects.subject(task_id),
                Some(TaskState::Error),
                TaskState::ResolvedManually,
                resolved.version,
                manual(reason.as_deref(), None),
                now,
            );
            let mut new_rows = crate::events::Rows::new();
            new_rows.add([row]).add([event]);
            self.insert_rows(&txn, new_rows).await?;
            self.commit_events(txn).await?;
            resolved.try_into()
        })
        .await
    }

    /// Runs a step again with everything downstream of it: each goes back to pending with
    /// fresh attempts, in one transaction (a `step.retry_requested` per step that moved,
    /// naming the step the re-run began at), and a failed task runs again. Refused while one
    /// of them is running, and on a finished task.
    pub async fn rerun_from_step(&self, step_id: Uuid, reason: Option<String>) -> Result<Rerun> {
        self.writing(async {
            let now = self.now();
            let txn = self.begin_write().await?;
            let start = Self::step_row(&txn, step_id).await?;
            let task = Self::task_row(&txn, start.task_id).await?;
            ensure_open(&task)?;
            let mut steps = workflow_step::Entity::find()
                .filter(workflow_step::Column::TaskId.eq(task.id));
            if self.db.get_database_backend() == sea_orm::DbBackend::Postgres {
                // Claims skip locked rows: none of these can be leased while we decide.
                steps = steps.lock_exclusive();
            }
            let steps = steps.all(&txn).await?;
            let edges = workflow_step_edge::Entity::find()
                .filter(workflow_step_edge::Column::TaskId.eq(task.id))
                .all(&txn)
                .await?;
            let ids: Vec<Uuid> = steps.iter().map(|step| step.id).collect();
            let dag = Dag::from_keys(
                &ids,
                edges.iter().map(|e| (e.parent_step_id, e.child_step_id)),
            );
            let Some(from_index) = ids.iter().position(|&id| id == step_id) else {
                return Err(Error::NotFound {
                    what: "step",
                    key: step_id.to_string(),
                });
            };
            // Each step downstream (the start included) with the state it is in now.
            let mut downstream: HashMap<Uuid, (&workflow_step::Model, StepState)> =
                HashMap::new();
            for index in dag.descendants(from_index) {
                let step = &steps[index];
                let state = StepState::parse(&step.state)?;
                if state == StepState::Pending || state.can_rerun() {
                    downstream.insert(step.id, (step, state));
                } else {
                    return Err(Error::Conflict(format!(
                        "step {:?} is {state}; wait for its attempt to end (or cancel the task) before re-running from {:?}",
                        step.name, start.name
                    )));
                }
            }
            let moving: Vec<Uuid> = downstream
                .values()
                .filter(|(_, state)| *state != StepState::Pending)
                .map(|(step, _)| step.id)
                .collect();
            let rerunnable: Vec<StepState> = StepState::ALL
                .into_iter()
                .filter(|state| state.can_rerun())
                .collect();
            let moved = move_steps(
                &txn,
                StepMove {
                    steps: Steps::Listed(&moving),
                    from: &rerunnable,
                    to: StepState::Pending,
                    version: None,
                    effect: StepEffect::Reset,
                },
                now,
            )
            .await?;
            if moved.len() != moving.len() {
                return Err(Error::Conflict(format!(
                    "steps of task {} changed while re-running from {:?}; read the task again and retry",
                    task.id, start.name
                )));
            }
            let reset: Vec<Uuid> = downstream.keys().copied().collect();
            let counted = self.count_pending_parents(&txn, &reset).await?;
            let subjects = crate::progress::Subjects::of_tasks(std::slice::from_ref(&task));
            let subject = subjects.subject(task.id);
            let details = manual(reason.as_deref(), Some(("rerun_from", json!(start.name))));
            let mut events = Vec::new();
            let mut step_transitions = Vec::new();
            for step in &moved {
                let before = downstream.get(&step.id).map(|(_, state)| *state);
                let (row, event) = step_rows(
                    subject,
                    step.id,
                    &step.name,
                    before,
                    StepState::Pending,
                    step.version,
                    details.clone(),
                    now,
                );
                step_transitions.push(row);
                events.push(event);
            }
            let ready: Vec<(Uuid, Uuid, &str)> = counted
                .iter()
                .filter(|(_, pending_parents)| *pending_parents == 0)
                .filter_map(|(id, _)| downstream.get(id))
                .map(|(step, _)| (task.id, step.id, step.name.as_str()))
                .collect();
            events.extend(subjects.steps_ready(ready.iter().copied(), now));
            self.take_slot_again(&txn, &task).await?;
            let (task_transitions, reopened) =
                reopen_task(&txn, &task, subject, now, reason.as_deref(), &mut events).await?;
            let mut new_rows = crate::events::Rows::new();
            new_rows.add(step_transitions).add(task_transitions).add(events);
            self.insert_rows(&txn, new_rows).await?;
            self.commit_events(txn).await?;
            let mut steps = Vec::with_capacity(moved.len());
            for step in moved {
                steps.push(step.try_into()?);
            }
            Ok(Rerun {
                task: reopened.unwrap_or(task).try_into()?,
                reset: steps,
                ready: ready.len(),
            })
        })
        .await
    }

    /// Sets each step's count of unfinished parents from its parents' states now; returns
    /// each step with its count.
    async fn count_pending_parents(
        &self,
        txn: &WriteTxn,
        step_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, i32)>> {
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("UPDATE workflow_steps SET pending_parents = (SELECT COUNT(*) FROM workflow_step_edges e JOIN workflow_steps p ON p.id = e.parent_step_id WHERE e.child_step_id = workflow_steps.id AND p.state NOT IN ")
            .push(DONE_STATES)
            .push(") WHERE id IN ")
            .bind_list(step_ids.iter().copied())
            .push(" RETURNING id, pending_parents");
        let rows = PendingParents::find_by_statement(sql.build())
            .all(txn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.id, row.pending_parents))
            .collect())
    }
}

/// A task that stopped (failed) or never started is put back in progress so its steps can
/// run and it can finish; a running task is left as it is. `task` is the row as this
/// transaction read or wrote it.
async fn reopen_task(
    txn: &WriteTxn,
    task: &crate::entities::task::Model,
    subject: Subject<'_>,
    now: DateTime<Utc>,
    reason: Option<&str>,
    events: &mut Vec<crate::entities::event::ActiveModel>,
) -> Result<(
    Vec<crate::entities::task_transition::ActiveModel>,
    Option<crate::entities::task::Model>,
)> {
    let from = TaskState::parse(&task.state)?;
    if !matches!(from, TaskState::Pending | TaskState::Error) {
        return Ok((Vec::new(), None));
    }
    let change = TaskMove {
        ids: &[task.id],
        from: &[from],
        to: TaskState::InProgress,
        version: None,
        completed_at: CompletedAt::Clear,
    };
    // Guarded by the state alone: a task started meanwhile (its first claim) needs nothing.
    let Some(reopened) = move_tasks(txn, change, now).await?.pop() else {
        return Ok((Vec::new(), None));
    };
    let (row, event) = task_rows(
        subject,
        Some(from),
        TaskState::InProgress,
        reopened.version,
        manual(reason, None),
        now,
    );
    events.push(event);
    Ok((vec![row], Some(reopened)))
}

/// The metadata of a person's change: the reason given, `triggered_by: manual`, and `extra`.
fn manual(reason: Option<&str>, extra: Option<(&str, Value)>) -> Value {
    let mut fields = vec![
        ("reason", reason.map(Value::from)),
        ("triggered_by", Some(json!("manual"))),
    ];
    fields.extend(extra.map(|(key, value)| (key, Some(value))));
    metadata(&fields)
}

/// People may change the steps of a task that has not finished; a finished one is a conflict.
fn ensure_open(task: &crate::entities::task::Model) -> Result<()> {
    let state = TaskState::parse(&task.state)?;
    if state.is_terminal() {
        return Err(Error::Conflict(format!(
            "task {} is {state}: a finished task's steps cannot change; start a new task",
            task.id
        )));
    }
    if task.slot.as_deref() == Some(crate::concurrency::WAITING) {
        return Err(Error::Conflict(format!(
            "task {} waits for a slot of its concurrency key {:?}: its steps cannot change \
             before it starts; cancel it, or act on it once it runs",
            task.id,
            task.concurrency_key.as_deref().unwrap_or_default()
        )));
    }
    Ok(())
}

/// A task that must have failed to be `what` ("retried"): a conflict otherwise.
async fn failed_task_row(
    txn: &WriteTxn,
    task_id: Uuid,
    what: &str,
) -> Result<crate::entities::task::Model> {
    let task = Store::task_row(txn, task_id).await?;
    let state = TaskState::parse(&task.state)?;
    if state != TaskState::Error {
        return Err(Error::Conflict(format!(
            "only a failed task can be {what}; task {task_id} is {state}"
        )));
    }
    Ok(task)
}

fn task_moved(task_id: Uuid) -> Error {
    Error::Conflict(format!(
        "task {task_id} changed while it was being updated; read it again and retry"
    ))
}

/// What re-running from a step did.
#[derive(Debug, Clone)]
pub struct Rerun {
    /// The task after it (running again if it had failed).
    pub task: TaskRecord,
    /// The steps that went back to pending.
    pub reset: Vec<StepRecord>,
    /// How many of them are claimable now.
    pub ready: usize,
}

#[derive(Debug, FromQueryResult)]
struct PendingParents {
    id: Uuid,
    pending_parents: i32,
}
