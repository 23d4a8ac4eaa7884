//! What people do to running tasks: retry a failed task or step, resolve a step by hand, skip
//! it. Each checks the state machine (a refused change is a conflict), records transitions and
//! events, and reopens the task for execution when it had stopped.

use crate::events::{metadata, step_transition as step_rows, task_transition as task_rows};
use crate::records::{StepRecord, TaskRecord};
use crate::state_change::{
    CompletedAt, StepEffect, StepMove, Steps, TaskMove, move_steps, move_tasks,
};
use crate::{Error, Result, Store};
use sea_orm::{DatabaseTransaction, TransactionTrait};
use serde_json::{Value, json};
use tasker_domain::{StateMachine, StepState, TaskState};
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
            let txn = self.db.begin().await?;
            let step = Self::step_row(&txn, step_id).await?;
            let task = Self::task_row(&txn, step.task_id).await?;
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
                metadata(&[
                    ("reason", reason.clone().map(Value::from)),
                    ("triggered_by", Some(json!("manual"))),
                ]),
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
            let (mut task_transitions, reopened) = self
                .reopen_task(&txn, step.task_id, reason.as_deref(), &mut events)
                .await?;
            let (mut finished, finishing) = self
                .finalize_tasks(&txn, &[step.task_id], &subjects, now, &mut events)
                .await?;
            task_transitions.extend(finishing);
            crate::events::insert_all(&txn, [row]).await?;
            crate::events::insert_all(&txn, task_transitions).await?;
            crate::events::insert_all(&txn, events).await?;
            self.commit_events(txn).await?;
            // The task as this change left it: finished, reopened, or as it was.
            let task = match finished.pop() {
                Some(finished) => finished,
                None => reopened.unwrap_or(task).try_into()?,
            };
            Ok(StepChange {
                step: updated.try_into()?,
                task,
                newly_ready,
            })
        })
        .await
    }

    /// Retries a failed task: every failed step goes back to pending with fresh attempts, and
    /// the task runs again.
    pub async fn retry_task(&self, task_id: Uuid, reason: Option<String>) -> Result<TaskRecord> {
        self.writing(async {
            let now = self.now();
            let txn = self.db.begin().await?;
            let current = Self::task_row(&txn, task_id).await?;
            let state = TaskState::parse(&current.state)?;
            if state != TaskState::Error {
                return Err(Error::Conflict(format!(
                    "only a failed task can be retried; task {task_id} is {state}"
                )));
            }
            let change = StepMove {
                steps: Steps::OfTask(task_id),
                from: &[StepState::Error],
                to: StepState::Pending,
                version: None,
                effect: StepEffect::Reset,
            };
            let reopened = move_steps(&txn, change, now).await?;
            let subjects = crate::progress::Subjects::of_tasks(std::slice::from_ref(&current));
            let mut events = Vec::new();
            let mut step_transitions = Vec::new();
            for step in &reopened {
                let (row, event) = step_rows(
                    subjects.subject(task_id),
                    step.id,
                    &step.name,
                    Some(StepState::Error),
                    StepState::Pending,
                    step.version,
                    metadata(&[
                        ("reason", reason.clone().map(Value::from)),
                        ("triggered_by", Some(json!("manual"))),
                    ]),
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
            let (task_transitions, reopened) = self
                .reopen_task(&txn, task_id, reason.as_deref(), &mut events)
                .await?;
            crate::events::insert_all(&txn, step_transitions).await?;
            crate::events::insert_all(&txn, task_transitions).await?;
            crate::events::insert_all(&txn, events).await?;
            // A failed task always reopens: it was read in `error` in this transaction.
            let task = reopened.unwrap_or(current);
            self.commit_events(txn).await?;
            task.try_into()
        })
        .await
    }

    /// A task that stopped (failed) or never started is put back in progress so its steps can
    /// run and it can finish; a running task is left as it is.
    async fn reopen_task(
        &self,
        txn: &DatabaseTransaction,
        task_id: Uuid,
        reason: Option<&str>,
        events: &mut Vec<crate::entities::event::ActiveModel>,
    ) -> Result<(
        Vec<crate::entities::task_transition::ActiveModel>,
        Option<crate::entities::task::Model>,
    )> {
        let now = self.now();
        let change = TaskMove {
            ids: &[task_id],
            from: &[TaskState::Pending, TaskState::Error],
            to: TaskState::InProgress,
            version: None,
            completed_at: CompletedAt::Clear,
        };
        let reopened = move_tasks(txn, change, now).await?.pop();
        let mut transitions = Vec::new();
        if let Some(task) = &reopened {
            let subjects = crate::progress::Subjects::of_tasks(std::slice::from_ref(task));
            // Versions count transitions: a task at version 2 was created (1) and is now
            // starting; any later one is coming back from `error`.
            let from = if task.version == 2 {
                TaskState::Pending
            } else {
                TaskState::Error
            };
            let (row, event) = task_rows(
                subjects.subject(task.id),
                Some(from),
                TaskState::InProgress,
                task.version,
                metadata(&[
                    ("reason", reason.map(Value::from)),
                    ("triggered_by", Some(json!("manual"))),
                ]),
                now,
            );
            transitions.push(row);
            events.push(event);
        }
        Ok((transitions, reopened))
    }
}
