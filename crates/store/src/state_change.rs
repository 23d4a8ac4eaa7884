//! State changes of tasks, and people's changes of steps, written one way: a guarded
//! `UPDATE` that checks the state (and the version, when the caller read the row first),
//! bumps the version in the same statement and returns the rows that moved, so the caller
//! appends exactly one transition and event per moved row, inside the same transaction
//! (invariant 1). The hot paths of the worker protocol (claim, batched completion, failure)
//! keep their own set-based statements, guarded the same way.

use crate::Result;
use crate::entities::{task, workflow_step};
use crate::write::WriteTxn;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tasker_domain::{StateMachine, StepState, TaskState};
use uuid::Uuid;

/// What a task state change does to `completed_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CompletedAt {
    /// The task finished now.
    Stamp,
    /// The task runs again.
    Clear,
    /// Unchanged.
    Keep,
}

/// A change of state for some tasks.
pub(crate) struct TaskMove<'a> {
    pub ids: &'a [Uuid],
    /// Only tasks in one of these states move.
    pub from: &'a [TaskState],
    pub to: TaskState,
    /// The version the caller read, when it read the task before deciding.
    pub version: Option<i32>,
    pub completed_at: CompletedAt,
}

/// Moves the tasks of `change` that are still in an expected state (and version); returns
/// them as they are now. A task that moved meanwhile is left alone and not returned.
pub(crate) async fn move_tasks(
    txn: &WriteTxn,
    change: TaskMove<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<task::Model>> {
    if change.ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut update = task::Entity::update_many()
        .col_expr(task::Column::State, Expr::value(change.to.as_str()))
        .col_expr(
            task::Column::Version,
            Expr::col(task::Column::Version).add(1),
        )
        .col_expr(task::Column::UpdatedAt, Expr::value(now));
    update = match change.completed_at {
        CompletedAt::Stamp => update.col_expr(task::Column::CompletedAt, Expr::value(now)),
        CompletedAt::Clear => update.col_expr(
            task::Column::CompletedAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        ),
        CompletedAt::Keep => update,
    };
    update = update
        .filter(task::Column::Id.is_in(change.ids.iter().copied()))
        .filter(task::Column::State.is_in(change.from.iter().map(|state| state.as_str())));
    if let Some(version) = change.version {
        update = update.filter(task::Column::Version.eq(version));
    }
    Ok(update.exec_with_returning(txn).await?)
}

/// Which steps a step change is about.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Steps<'a> {
    One(Uuid),
    OfTask(Uuid),
    /// These steps (of one task).
    Listed(&'a [Uuid]),
}

/// What a person's change does to a step besides its state.
#[derive(Debug, Clone)]
pub(crate) enum StepEffect {
    /// Back to pending with fresh attempts: no error, no results, not finished.
    Reset,
    /// Done by hand: finished now, with these results for its dependents if given.
    Finish { results: Option<serde_json::Value> },
    /// Its task was cancelled: finished now, and no worker holds it any more.
    Cancel,
    /// It failed for good without an attempt running (it was never started in time).
    Fail { error: String },
}

/// A person's change of state for some steps (or a cancellation): the attempt in flight (if
/// any) ends, no retry stays scheduled.
pub(crate) struct StepMove<'a> {
    pub steps: Steps<'a>,
    pub from: &'a [StepState],
    pub to: StepState,
    /// The version the caller read, when it read the step before deciding.
    pub version: Option<i32>,
    pub effect: StepEffect,
}

/// Moves the steps of `change` that are still in an expected state (and version); returns
/// them as they are now.
pub(crate) async fn move_steps(
    txn: &WriteTxn,
    change: StepMove<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<workflow_step::Model>> {
    let mut update = ending_attempt(workflow_step::Entity::update_many())
        .col_expr(
            workflow_step::Column::State,
            Expr::value(change.to.as_str()),
        )
        .col_expr(
            workflow_step::Column::Version,
            Expr::col(workflow_step::Column::Version).add(1),
        )
        .col_expr(
            workflow_step::Column::NextAttemptMs,
            Expr::value(Option::<i64>::None),
        )
        .col_expr(workflow_step::Column::UpdatedAt, Expr::value(now));
    update = match change.effect {
        StepEffect::Reset => update
            .col_expr(workflow_step::Column::Attempts, Expr::value(0))
            // Claimable from now when nothing holds it back (else when its parents are done).
            .col_expr(
                workflow_step::Column::ReadySinceMs,
                Expr::value(now.timestamp_millis()),
            )
            .col_expr(
                workflow_step::Column::LastError,
                Expr::value(Option::<String>::None),
            )
            .col_expr(
                workflow_step::Column::Results,
                Expr::value(Option::<serde_json::Value>::None),
            )
            .col_expr(
                workflow_step::Column::CompletedAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            ),
        StepEffect::Cancel => update
            .col_expr(workflow_step::Column::CompletedAt, Expr::value(now))
            .col_expr(
                workflow_step::Column::LeaseToken,
                Expr::value(Option::<Uuid>::None),
            )
            .col_expr(
                workflow_step::Column::LeaseHolder,
                Expr::value(Option::<String>::None),
            ),
        StepEffect::Fail { error } => {
            update.col_expr(workflow_step::Column::LastError, Expr::value(error))
        }
        StepEffect::Finish { results } => {
            let update = update.col_expr(workflow_step::Column::CompletedAt, Expr::value(now));
            match results {
                Some(results) => {
                    update.col_expr(workflow_step::Column::Results, Expr::value(results))
                }
                None => update,
            }
        }
    };
    update = match change.steps {
        Steps::One(id) => update.filter(workflow_step::Column::Id.eq(id)),
        Steps::OfTask(task_id) => update.filter(workflow_step::Column::TaskId.eq(task_id)),
        Steps::Listed(ids) => update.filter(workflow_step::Column::Id.is_in(ids.iter().copied())),
    };
    update =
        update.filter(workflow_step::Column::State.is_in(change.from.iter().map(|s| s.as_str())));
    if let Some(version) = change.version {
        update = update.filter(workflow_step::Column::Version.eq(version));
    }
    Ok(update.exec_with_returning(txn).await?)
}

/// An update that ends the step's running attempt: no live lease, no attempt deadline.
pub(crate) fn ending_attempt(
    update: sea_orm::UpdateMany<workflow_step::Entity>,
) -> sea_orm::UpdateMany<workflow_step::Entity> {
    update
        .col_expr(
            workflow_step::Column::LeaseExpiresMs,
            Expr::value(Option::<i64>::None),
        )
        .col_expr(
            workflow_step::Column::DeadlineMs,
            Expr::value(Option::<i64>::None),
        )
}
