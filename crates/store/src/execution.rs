//! Running steps: claiming ready steps under a lease, heartbeats, completing and failing
//! attempts, expiring lost leases (what a finished step means for its task: `progress.rs`).
//! Each operation is one transaction that also appends its transitions and events.
//!
//! Readiness (DESIGN.md invariant 5) is one indexed condition: a step whose parents are all
//! done has `pending_parents = 0` (the counter drops as parents complete), and it is `pending`,
//! or `error` with a retry time that has come. A step in `error` with no retry time failed for
//! good. A claimed step whose attempt count is 1 came from `pending`, any later one from
//! `error` (reopening a step resets its attempts).

use crate::entities::workflow_step;
use crate::events::{metadata, step_transition as step_rows, task_transition as task_rows};
use crate::progress::{
    SUBJECT_FIELDS, Subjects, TaskSubject, children_released, push_task_fields,
    release_children_statement, step_counts_statement,
};
use crate::records::{StepRecord, TaskRecord, convert_all};
use crate::sql::Sql;
use crate::state_change::{CompletedAt, TaskMove, ending_attempt, move_tasks};
use crate::write::WriteTxn;
use crate::{Error, Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tasker_domain::execution::{Failure, FailureOutcome};
use tasker_domain::{Backoff, EventName, StateMachine, StepState, TaskState, Within};
use uuid::Uuid;

/// `state = 'in_progress'`, written into the statement rather than bound: SQLite can then
/// match it with the condition of the in-flight lease index, which it cannot do with a bound
/// value (its planner never reads them: see `health::sqlite_stable_plans`).
pub(crate) fn step_in_progress() -> Expr {
    use sea_orm::sea_query::ExprTrait as _;
    Expr::col((workflow_step::Entity, workflow_step::Column::State))
        .eq(Expr::Constant(StepState::InProgress.as_str().into()))
}

/// What a worker asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub worker_id: String,
    /// Only steps with these handlers; empty means any.
    pub handlers: Vec<String>,
    /// Only steps of tasks in these namespaces.
    pub within: Within,
    pub limit: u32,
    pub lease: Duration,
}

/// A step leased to a worker.
#[derive(Debug, Clone)]
pub struct ClaimedStep {
    pub step: StepRecord,
    pub lease_token: Uuid,
    pub lease_expires_at: DateTime<Utc>,
    /// The task's correlation id, for the lines logged while the step runs.
    pub correlation_id: String,
    /// The W3C trace context the attempt's spans join: the store reads the one of the task's
    /// creation; the engine hands a worker its `step.claim` span's instead.
    pub trace_parent: Option<String>,
}

/// A finished attempt to record.
#[derive(Debug, Clone)]
pub struct Completion {
    pub lease_token: Uuid,
    pub results: Value,
}

/// What completing a batch did.
#[derive(Debug, Clone, Default)]
pub struct CompletionReport {
    pub completed: Vec<StepRecord>,
    /// Tokens that no longer hold a lease: nothing was recorded for them.
    pub lost: Vec<Uuid>,
    /// Steps that became claimable because of these completions.
    pub newly_ready: usize,
    /// Tasks that finished (complete or error) as a result.
    pub finished_tasks: Vec<TaskRecord>,
}

/// A failed attempt to record.
#[derive(Debug, Clone)]
pub struct AttemptFailure {
    pub lease_token: Uuid,
    pub message: String,
    /// Whether another attempt may help (a timeout may; a 404 may not).
    pub retryable: bool,
    /// The handler's own wait before a retry, in seconds (HTTP Retry-After).
    pub retry_after_seconds: Option<f64>,
}

/// What a failure led to.
#[derive(Debug, Clone)]
pub struct FailureReport {
    pub step: StepRecord,
    pub newly_ready: usize,
    pub finished_task: Option<TaskRecord>,
}

/// An attempt the lease sweep failed.
#[derive(Debug, Clone)]
pub struct Expiry {
    /// The step after the failure (retrying, failed or skipped).
    pub step: StepRecord,
    /// It ran past its step's timeout; otherwise its lease ran out without a heartbeat.
    pub timed_out: bool,
    /// The task, when this failure ended it.
    pub finished_task: Option<TaskRecord>,
}

/// Inputs a worker needs besides the step itself.
#[derive(Debug, Clone, Default)]
pub struct StepInputs {
    pub context: Value,
    pub namespace: String,
    pub template: String,
    /// Results of the parent steps, by step name.
    pub parent_results: serde_json::Map<String, Value>,
}

/// A claimed step's task state, returned beside it (`push_task_fields`).
#[derive(Debug, FromQueryResult)]
struct ClaimedTaskState {
    task_state: String,
}

#[derive(Debug, FromQueryResult)]
struct Wakeup {
    due: Option<i64>,
}

pub(crate) const DONE_STATES: &str = "('complete', 'skipped', 'resolved_manually')";

impl Store {
    pub(crate) fn now_ms(&self) -> i64 {
        self.clock.now().timestamp_millis()
    }

    /// Leases up to `limit` ready steps to a worker in one statement, then records their
    /// transitions and events, and starts their tasks if they were pending.
    pub async fn claim_steps(&self, request: &ClaimRequest) -> Result<Vec<ClaimedStep>> {
        let claim = self.writing(self.claim_in_transaction(request)).await?;
        Ok(self.after_claim(claim))
    }

    /// After a claim committed: the maintenance loop hears when it found a rate limit spent
    /// (`throttled`), whose next start may be a new time to wake at.
    fn after_claim<T>(&self, (claimed, throttled): (T, bool)) -> T {
        if throttled {
            self.note_throttled();
        }
        claimed
    }

    /// The claim itself, one transaction; and whether it found a rate limit spent.
    async fn claim_in_transaction(
        &self,
        request: &ClaimRequest,
    ) -> Result<(Vec<ClaimedStep>, bool)> {
        let txn = self.begin_write().await?;
        let mut rows = crate::events::Rows::new();
        let (claimed, throttled) = self.claim_rows(&txn, request, &mut rows).await?;
        let Some((leases, _)) = claimed else {
            // Nothing written (but a spent bucket's next start): no news about whether
            // writes work.
            txn.commit().await?;
            return Ok((Vec::new(), throttled));
        };
        self.insert_rows(&txn, rows).await?;
        self.commit_events(txn).await?;
        Ok((leases, throttled))
    }

    /// Claims like [`Store::claim_steps`], then completes at once, in the same transaction,
    /// the claimed steps to which `run` gives results (built-in handlers that need no I/O):
    /// one transaction instead of two, and no round trip through the worker. Returns the
    /// claimed steps left to the caller, and what the completions did.
    pub async fn claim_and_complete(
        &self,
        request: &ClaimRequest,
        mut run: impl FnMut(&ClaimedStep) -> Option<Value> + Send,
    ) -> Result<(Vec<ClaimedStep>, CompletionReport)> {
        let claim = self
            .writing(async {
                let txn = self.begin_write().await?;
                let mut rows = crate::events::Rows::new();
                let (claimed, throttled) = self.claim_rows(&txn, request, &mut rows).await?;
                let Some((leases, subjects)) = claimed else {
                    txn.commit().await?;
                    return Ok(((Vec::new(), CompletionReport::default()), throttled));
                };
                let mut completions = Vec::new();
                let mut steps = Vec::new();
                let mut left = Vec::new();
                for lease in leases {
                    match run(&lease) {
                        Some(results) => {
                            completions.push(Completion {
                                lease_token: lease.lease_token,
                                results,
                            });
                            steps.push((lease.step.id, lease.step.task_id));
                        }
                        None => left.push(lease),
                    }
                }
                let claimed = ClaimedHere {
                    subjects,
                    tasks: distinct(steps.iter().map(|(_, task)| *task)),
                    steps: steps.into_iter().map(|(step, _)| step).collect(),
                };
                let report = self
                    .complete_rows(&txn, &completions, Some(claimed), &mut rows)
                    .await?;
                self.insert_rows(&txn, rows).await?;
                self.commit_events(txn).await?;
                Ok(((left, report), throttled))
            })
            .await?;
        Ok(self.after_claim(claim))
    }

    /// The claim's writes inside `txn`, its transition and event rows added to `rows`: first
    /// the limited steps their buckets let through, then the rest of the ready steps up
    /// to the limit. Answers the claimed steps and their tasks' subjects (`None` when nothing
    /// was claimable), and whether a bucket was found spent.
    async fn claim_rows(
        &self,
        txn: &WriteTxn,
        request: &ClaimRequest,
        rows: &mut crate::events::Rows,
    ) -> Result<(Option<(Vec<ClaimedStep>, Subjects)>, bool)> {
        let now = self.now();
        let now_ms = now.timestamp_millis();
        let admission = self
            .admit_limited(
                txn,
                &request.handlers,
                &request.within,
                request.limit,
                now_ms,
            )
            .await?;
        let mut returned = Vec::new();
        let mut started = Vec::new();
        if !admission.steps.is_empty() {
            let sql = claim_statement(self, request, now, Picked::Admitted(&admission.steps));
            returned = txn.query_all_raw(sql).await?;
            for row in &returned {
                started.extend(row.try_get::<Option<String>>("", "rate_limit")?);
            }
        }
        let throttled = self
            .settle_admission(txn, &admission, started.iter().map(String::as_str), now_ms)
            .await?;
        let left = request
            .limit
            .saturating_sub(u32::try_from(returned.len()).unwrap_or(u32::MAX));
        if left > 0 {
            let sql = claim_statement(self, request, now, Picked::Ready(left));
            returned.extend(txn.query_all_raw(sql).await?);
        }
        if returned.is_empty() {
            return Ok((None, throttled));
        }
        let claimed = self
            .claimed_rows(request, &returned, txn, rows, now)
            .await?;
        Ok((Some(claimed), throttled))
    }

    /// The transitions, events and task starts of the steps a claim statement returned.
    async fn claimed_rows(
        &self,
        request: &ClaimRequest,
        returned: &[sea_orm::QueryResult],
        txn: &WriteTxn,
        rows: &mut crate::events::Rows,
        now: DateTime<Utc>,
    ) -> Result<(Vec<ClaimedStep>, Subjects)> {
        let now_ms = now.timestamp_millis();
        let lease_ms = lease_ms(request);
        let mut claimed = Vec::with_capacity(returned.len());
        let mut subjects = Subjects::default();
        let mut pending = Vec::new();
        for row in returned {
            let step = workflow_step::Model::from_query_result(row, "")?;
            let state = ClaimedTaskState::from_query_result(row, "")?;
            if state.task_state == TaskState::Pending.as_str() && !subjects.knows(step.task_id) {
                pending.push(step.task_id);
            }
            subjects.add(TaskSubject::from_query_result(row, "")?);
            claimed.push(step);
        }
        // Only the tasks still pending start (the guard settles a race with another claim).
        let started = move_tasks(
            txn,
            TaskMove {
                ids: &pending,
                from: &[TaskState::Pending],
                to: TaskState::InProgress,
                version: None,
                completed_at: CompletedAt::Keep,
            },
            now,
        )
        .await?;
        let mut events = Vec::new();
        let mut task_transitions = Vec::new();
        for task in &started {
            let (row, event) = task_rows(
                subjects.subject(task.id),
                Some(TaskState::Pending),
                TaskState::InProgress,
                task.version,
                json!({}),
                now,
            );
            task_transitions.push(row);
            events.push(event);
        }
        let mut step_transitions = Vec::with_capacity(claimed.len());
        let mut leases = Vec::with_capacity(claimed.len());
        for model in claimed {
            let from = if model.attempts == 1 {
                StepState::Pending
            } else {
                StepState::Error
            };
            let (row, event) = step_rows(
                subjects.subject(model.task_id),
                model.id,
                &model.name,
                Some(from),
                StepState::InProgress,
                model.version,
                json!({ "attempt": model.attempts, "worker_id": request.worker_id }),
                now,
            );
            step_transitions.push(row);
            events.push(event);
            let lease_token = model.lease_token.unwrap_or_default();
            let lease_expires_at =
                DateTime::from_timestamp_millis(now_ms + lease_ms).unwrap_or(now);
            leases.push(ClaimedStep {
                correlation_id: subjects.subject(model.task_id).correlation_id.to_owned(),
                trace_parent: subjects.trace_parent(model.task_id).map(str::to_owned),
                step: model.try_into()?,
                lease_token,
                lease_expires_at,
            });
        }
        rows.add(task_transitions).add(step_transitions).add(events);
        Ok((leases, subjects))
    }

    /// Extends the leases still held; returns the new expiry for each live token (tokens
    /// missing from the answer have lost their lease).
    pub async fn heartbeat(
        &self,
        tokens: &[Uuid],
        lease: Duration,
    ) -> Result<HashMap<Uuid, DateTime<Utc>>> {
        self.writing(async {
            if tokens.is_empty() {
                return Ok(HashMap::new());
            }
            let now_ms = self.now_ms();
            let expires_ms = now_ms + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
            let updated = workflow_step::Entity::update_many()
                .col_expr(
                    workflow_step::Column::LeaseExpiresMs,
                    Expr::value(expires_ms),
                )
                .filter(workflow_step::Column::LeaseToken.is_in(tokens.iter().copied()))
                .filter(step_in_progress())
                .filter(workflow_step::Column::LeaseExpiresMs.gte(now_ms))
                .exec_with_returning(&self.db)
                .await?;
            let expires_at = DateTime::from_timestamp_millis(expires_ms).unwrap_or_default();
            Ok(updated
                .into_iter()
                .filter_map(|step| step.lease_token)
                .map(|token| (token, expires_at))
                .collect())
        })
        .await
    }

    /// The namespace of the task each live lease token's step belongs to (tokens that hold no
    /// step are left out), so a caller's scope can be checked before it acts on a lease.
    pub async fn lease_namespaces(&self, tokens: &[Uuid]) -> Result<HashMap<Uuid, String>> {
        if tokens.is_empty() {
            return Ok(HashMap::new());
        }
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT s.lease_token AS token, t.namespace FROM workflow_steps s JOIN tasks t ON t.id = s.task_id WHERE s.lease_token IN ")
            .bind_list(tokens.iter().copied());
        let rows = LeaseNamespace::find_by_statement(sql.build())
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.token, row.namespace))
            .collect())
    }

    /// Records finished attempts in one transaction: steps complete, their children's
    /// dependency counters drop, and tasks whose steps are all done complete.
    pub async fn complete_steps(&self, completions: &[Completion]) -> Result<CompletionReport> {
        self.writing(self.complete_in_transaction(completions))
            .await
    }

    /// The completion itself, one transaction.
    async fn complete_in_transaction(
        &self,
        completions: &[Completion],
    ) -> Result<CompletionReport> {
        if completions.is_empty() {
            return Ok(CompletionReport::default());
        }
        let txn = self.begin_write().await?;
        let mut rows = crate::events::Rows::new();
        let report = self
            .complete_rows(&txn, completions, None, &mut rows)
            .await?;
        if report.completed.is_empty() {
            txn.commit().await?;
        } else {
            self.insert_rows(&txn, rows).await?;
            self.commit_events(txn).await?;
        }
        Ok(report)
    }

    /// The completions' writes inside `txn`, their transition and event rows added to `rows`.
    /// `claimed`: when the steps were claimed earlier in `txn`, which steps and tasks they
    /// are, and their subjects.
    async fn complete_rows(
        &self,
        txn: &WriteTxn,
        completions: &[Completion],
        claimed: Option<ClaimedHere>,
        rows: &mut crate::events::Rows,
    ) -> Result<CompletionReport> {
        if completions.is_empty() {
            return Ok(CompletionReport::default());
        }
        let now = self.now();
        let now_ms = now.timestamp_millis();
        let mut sql = Sql::new(self.db.get_database_backend());
        let postgres = sql.is_postgres();
        sql.push("WITH v(token, results) AS (VALUES ");
        for (i, completion) in completions.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.push("(").bind(completion.lease_token);
            sql.push(if postgres { "::uuid, " } else { ", " });
            sql.bind(completion.results.clone());
            sql.push(if postgres { "::jsonb)" } else { ")" });
        }
        sql.push(") UPDATE workflow_steps AS s SET state = 'complete', results = v.results, lease_expires_ms = NULL, deadline_ms = NULL, next_attempt_ms = NULL, last_error = NULL, version = s.version + 1, updated_at = ")
            .bind(now)
            .push(", completed_at = ")
            .bind(now)
            .push(" FROM v WHERE s.lease_token = v.token AND s.state = 'in_progress'");
        // Steps claimed in this transaction hold their leases whatever the time now: the
        // transaction has held their rows since.
        if claimed.is_none() {
            sql.push(" AND s.lease_expires_ms >= ").bind(now_ms);
        }
        sql.push(if postgres {
            " RETURNING s.*"
        } else {
            " RETURNING *"
        });
        if claimed.is_none() {
            push_task_fields(&mut sql, &SUBJECT_FIELDS);
        }
        let backend = txn.get_database_backend();
        // Steps claimed in this transaction all complete (they hold the leases it just gave):
        // the release of their children and the count of their tasks' steps go with the
        // completion, in one command on SQLite, and what completed is checked against them.
        let (returned, mut released, mut counted) = match &claimed {
            Some(claimed) => {
                let mut answers = txn
                    .query_many(vec![
                        sql.build(),
                        release_children_statement(backend, &claimed.steps, now),
                        step_counts_statement(backend, &claimed.tasks, now),
                    ])
                    .await?
                    .into_iter();
                let mut next = || answers.next().unwrap_or_default();
                (next(), Some(next()), Some(next()))
            }
            None => (txn.query_all_raw(sql.build()).await?, None, None),
        };
        let mut completed = Vec::with_capacity(returned.len());
        let mut found = Subjects::default();
        for row in &returned {
            let step = workflow_step::Model::from_query_result(row, "")?;
            if claimed.is_none() {
                found.add(TaskSubject::from_query_result(row, "")?);
            }
            completed.push(step);
        }
        let done_ids: Vec<Uuid> = completed.iter().map(|step| step.id).collect();
        let mut report = CompletionReport::default();
        if let Some(claimed) = &claimed
            && !same_ids(&claimed.steps, &done_ids)
        {
            // Not reachable: the transaction holds the rows it claimed; never committed if it
            // were.
            return Err(Error::Conflict(
                "steps claimed in this transaction did not all complete; nothing was written"
                    .into(),
            ));
        }
        if completed.is_empty() {
            report.lost = completions.iter().map(|c| c.lease_token).collect();
            return Ok(report);
        }
        let task_ids = distinct(completed.iter().map(|step| step.task_id));
        let subjects = claimed.map_or(found, |claimed| claimed.subjects);
        let mut transitions = Vec::with_capacity(completed.len());
        let mut events = Vec::with_capacity(completed.len());
        for step in &completed {
            let (row, event) = step_rows(
                subjects.subject(step.task_id),
                step.id,
                &step.name,
                Some(StepState::InProgress),
                StepState::Complete,
                step.version,
                json!({ "attempt": step.attempts, "duration_ms": step.attempt_started_ms.map(|started| now_ms - started) }),
                now,
            );
            transitions.push(row);
            events.push(event);
        }
        report.newly_ready = match released.take() {
            Some(released) => children_released(&released, &subjects, now, &mut events)?,
            None => {
                self.release_children(txn, &done_ids, &subjects, now, &mut events)
                    .await?
            }
        };
        let finished = match counted.take() {
            Some(counts) => {
                self.finalize_counted(txn, &counts, &subjects, now, &mut events)
                    .await?
            }
            None => {
                self.finalize_tasks(txn, &task_ids, &subjects, now, &mut events)
                    .await?
            }
        };
        report.newly_ready += finished.admitted_ready;
        rows.add(transitions).add(finished.transitions).add(events);
        // A completed step keeps the token that completed it; the others were lost.
        let completed_tokens: HashSet<Uuid> = completed
            .iter()
            .filter_map(|step| step.lease_token)
            .collect();
        report.lost = completions
            .iter()
            .map(|c| c.lease_token)
            .filter(|token| !completed_tokens.contains(token))
            .collect();
        report.completed = convert_all(completed)?;
        report.finished_tasks = finished.tasks;
        Ok(report)
    }

    /// Records a failed attempt: a retry after the backoff (or the handler's Retry-After), or,
    /// with no attempts left or a final failure, `skipped` for a skippable step and `error`
    /// otherwise. A token that no longer holds a lease changes nothing.
    pub async fn fail_step(&self, failure: &AttemptFailure) -> Result<FailureReport> {
        self.writing(async {
            let now_ms = self.now_ms();
            let txn = self.begin_write().await?;
            let step = workflow_step::Entity::find()
                .filter(workflow_step::Column::LeaseToken.eq(failure.lease_token))
                .filter(step_in_progress())
                .filter(workflow_step::Column::LeaseExpiresMs.gte(now_ms))
                .one(&txn)
                .await?
                .ok_or(Error::LeaseLost)?;
            let mut rows = crate::events::Rows::new();
            let report = self
                .record_failure(
                    &txn,
                    step,
                    &failure.message,
                    (failure.retryable, failure.retry_after_seconds),
                    None,
                    &mut rows,
                )
                .await?;
            self.insert_rows(&txn, rows).await?;
            self.commit_events(txn).await?;
            Ok(report)
        })
        .await
    }

    /// Gives back live leases unfinished (a worker that stops): each attempt is undone — the
    /// step goes back to where it was claimed from, claimable at once, with one
    /// `step.released` event — in one transaction. Tokens that hold no live lease are left
    /// out of the answer.
    pub async fn release_leases(&self, tokens: &[Uuid]) -> Result<Vec<StepRecord>> {
        self.writing(async {
            if tokens.is_empty() {
                return Ok(Vec::new());
            }
            let now = self.now();
            let now_ms = now.timestamp_millis();
            let txn = self.begin_write().await?;
            let held = workflow_step::Entity::find()
                .filter(workflow_step::Column::LeaseToken.is_in(tokens.iter().copied()))
                .filter(step_in_progress())
                .filter(workflow_step::Column::LeaseExpiresMs.gte(now_ms))
                .order_by_asc(workflow_step::Column::Id)
                .all(&txn)
                .await?;
            if held.is_empty() {
                txn.commit().await?;
                return Ok(Vec::new());
            }
            let task_ids = distinct(held.iter().map(|step| step.task_id));
            let subjects = self.subjects(&txn, &task_ids).await?;
            let mut released = Vec::with_capacity(held.len());
            let mut transitions = Vec::with_capacity(held.len());
            let mut events = Vec::with_capacity(held.len());
            for step in held {
                let attempts_before = step.attempts.saturating_sub(1).max(0);
                let to = StepState::released_to(u32::try_from(attempts_before).unwrap_or(0));
                let retry_at = (to == StepState::Error).then_some(now_ms);
                let version = step.version + 1;
                let updated = ending_attempt(workflow_step::Entity::update_many())
                    .col_expr(workflow_step::Column::State, Expr::value(to.as_str()))
                    .col_expr(
                        workflow_step::Column::Attempts,
                        Expr::value(attempts_before),
                    )
                    .col_expr(workflow_step::Column::NextAttemptMs, Expr::value(retry_at))
                    .col_expr(workflow_step::Column::ReadySinceMs, Expr::value(now_ms))
                    .col_expr(
                        workflow_step::Column::LeaseToken,
                        Expr::value(Option::<Uuid>::None),
                    )
                    .col_expr(
                        workflow_step::Column::LeaseHolder,
                        Expr::value(Option::<String>::None),
                    )
                    .col_expr(workflow_step::Column::Version, Expr::value(version))
                    .col_expr(workflow_step::Column::UpdatedAt, Expr::value(now))
                    .filter(workflow_step::Column::Id.eq(step.id))
                    .filter(workflow_step::Column::Version.eq(step.version))
                    .exec_with_returning(&txn)
                    .await?
                    .into_iter()
                    .next();
                // Changed since it was read (cancelled, expired): no longer this lease's to
                // give back; the others still are.
                let Some(updated) = updated else {
                    continue;
                };
                let (row, event) = crate::events::step_transition_as(
                    EventName::StepReleased,
                    subjects.subject(step.task_id),
                    step.id,
                    &step.name,
                    Some(StepState::InProgress),
                    to,
                    version,
                    metadata(&[
                        ("attempt", Some(json!(step.attempts))),
                        ("worker_id", step.lease_holder.as_deref().map(|w| json!(w))),
                    ]),
                    now,
                );
                transitions.push(row);
                events.push(event);
                released.push(updated.try_into()?);
            }
            if released.is_empty() {
                txn.commit().await?;
                return Ok(released);
            }
            let mut new_rows = crate::events::Rows::new();
            new_rows.add(transitions).add(events);
            self.insert_rows(&txn, new_rows).await?;
            self.commit_events(txn).await?;
            Ok(released)
        })
        .await
    }

    /// Fails the attempts whose lease expired without a heartbeat, or that ran past their
    /// step's timeout, as retryable failures. Returns what each came to.
    pub async fn expire_leases(&self) -> Result<Vec<Expiry>> {
        self.writing(async {
            let now_ms = self.now_ms();
            let txn = self.begin_write().await?;
            // Slots of the tasks these failures end are freed together, last.
            txn.defer_slot_frees();
            let expired = workflow_step::Entity::find()
                .filter(step_in_progress())
                .filter(
                    sea_orm::Condition::any()
                        .add(workflow_step::Column::LeaseExpiresMs.lt(now_ms))
                        .add(workflow_step::Column::DeadlineMs.lt(now_ms)),
                )
                .order_by_asc(workflow_step::Column::Id)
                .all(&txn)
                .await?;
            let mut expiries = Vec::with_capacity(expired.len());
            // Every step's rows are written together, last: on PostgreSQL writing events
            // takes the sequencer lock, which must not be held while other rows are locked.
            let mut rows = crate::events::Rows::new();
            for step in expired {
                let (message, cause) = match (step.deadline_ms, step.timeout_ms) {
                    (Some(deadline), Some(timeout)) if deadline < now_ms => (
                        format!("the attempt timed out after {} s", timeout as f64 / 1000.0),
                        EventName::StepTimedOut,
                    ),
                    _ => (
                        "the lease expired without a heartbeat (the worker is gone or stuck)"
                            .to_owned(),
                        EventName::StepLeaseExpired,
                    ),
                };
                let report = self
                    .record_failure(&txn, step, &message, (true, None), Some(cause), &mut rows)
                    .await?;
                expiries.push(Expiry {
                    step: report.step,
                    timed_out: cause == EventName::StepTimedOut,
                    finished_task: report.finished_task,
                });
            }
            let mut freed = Vec::new();
            self.free_deferred_slots(&txn, self.now(), &mut freed)
                .await?;
            rows.add(freed);
            if expiries.is_empty() {
                txn.commit().await?;
            } else {
                self.insert_rows(&txn, rows).await?;
                self.commit_events(txn).await?;
            }
            Ok(expiries)
        })
        .await
    }

    /// The earliest time (epoch ms) after `after_ms` at which a retry becomes due, a parked
    /// step wakes, or a lease or attempt runs out, so the engine can sleep until then instead of polling.
    pub async fn next_wakeup_ms(&self, after_ms: i64) -> Result<Option<i64>> {
        let mut sql = Sql::new(self.db.get_database_backend());
        push_wakeups(&mut sql, after_ms);
        let row = Wakeup::find_by_statement(sql.build()).one(&self.db).await?;
        Ok(row.and_then(|row| row.due))
    }

    /// The task context and parent results each claimed step runs with.
    pub async fn step_inputs(&self, steps: &[StepRecord]) -> Result<HashMap<Uuid, StepInputs>> {
        if steps.is_empty() {
            return Ok(HashMap::new());
        }
        let task_ids = distinct(steps.iter().map(|step| step.task_id));
        let tasks: HashMap<Uuid, TaskRecord> = self
            .tasks_by_ids(&task_ids)
            .await?
            .into_iter()
            .map(|task| (task.id, task))
            .collect();
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT e.child_step_id AS child_id, p.name AS name, p.results AS results FROM workflow_step_edges e JOIN workflow_steps p ON p.id = e.parent_step_id WHERE e.child_step_id IN ")
            .bind_list(steps.iter().map(|step| step.id));
        let parents = ParentResult::find_by_statement(sql.build())
            .all(&self.db)
            .await?;
        let mut inputs: HashMap<Uuid, StepInputs> = steps
            .iter()
            .map(|step| {
                let task = tasks.get(&step.task_id);
                (
                    step.id,
                    StepInputs {
                        context: task.map(|t| t.context.clone()).unwrap_or(Value::Null),
                        namespace: task.map(|t| t.namespace.clone()).unwrap_or_default(),
                        template: task.map(|t| t.template_name.clone()).unwrap_or_default(),
                        parent_results: serde_json::Map::new(),
                    },
                )
            })
            .collect();
        for parent in parents {
            if let Some(input) = inputs.get_mut(&parent.child_id) {
                input
                    .parent_results
                    .insert(parent.name, parent.results.unwrap_or(Value::Null));
            }
        }
        Ok(inputs)
    }

    /// The failure path shared by workers' reports and expired leases; its transition and
    /// event rows are added to `new_rows`, for the caller to write last.
    async fn record_failure(
        &self,
        txn: &WriteTxn,
        step: workflow_step::Model,
        message: &str,
        (retryable, retry_after_seconds): (bool, Option<f64>),
        cause: Option<EventName>,
        new_rows: &mut crate::events::Rows,
    ) -> Result<FailureReport> {
        let now = self.now();
        let now_ms = now.timestamp_millis();
        let backoff: Backoff = serde_json::from_value(step.backoff.clone()).unwrap_or_default();
        let outcome = Failure {
            attempts: u32::try_from(step.attempts).unwrap_or(0),
            max_attempts: u32::try_from(step.max_attempts).unwrap_or(1),
            step_retryable: step.retryable,
            failure_retryable: retryable,
            skippable: step.skippable,
            backoff: &backoff,
            retry_after_seconds,
        }
        .outcome(now_ms, unit_sample());
        let (to, next_attempt_ms) = match outcome {
            FailureOutcome::RetryAt(at) => (StepState::Error, Some(at)),
            FailureOutcome::Skip => (StepState::Skipped, None),
            FailureOutcome::Fail => (StepState::Error, None),
        };
        let message = truncate(message);
        let version = step.version + 1;
        let mut update = ending_attempt(workflow_step::Entity::update_many())
            .col_expr(workflow_step::Column::State, Expr::value(to.as_str()))
            .col_expr(
                workflow_step::Column::NextAttemptMs,
                Expr::value(next_attempt_ms),
            )
            .col_expr(
                workflow_step::Column::ReadySinceMs,
                Expr::value(next_attempt_ms),
            )
            .col_expr(
                workflow_step::Column::LastError,
                Expr::value(message.clone()),
            )
            .col_expr(workflow_step::Column::Version, Expr::value(version))
            .col_expr(workflow_step::Column::UpdatedAt, Expr::value(now));
        if to == StepState::Skipped {
            update = update.col_expr(workflow_step::Column::CompletedAt, Expr::value(now));
        }
        let updated = update
            .filter(workflow_step::Column::Id.eq(step.id))
            .filter(workflow_step::Column::Version.eq(step.version))
            .exec_with_returning(txn)
            .await?
            .into_iter()
            .next()
            .ok_or(Error::LeaseLost)?;
        let subjects = self.subjects(txn, &[step.task_id]).await?;
        let mut events = Vec::new();
        let (row, event) = step_rows(
            subjects.subject(step.task_id),
            step.id,
            &step.name,
            Some(StepState::InProgress),
            to,
            version,
            metadata(&[
                ("attempt", Some(json!(step.attempts))),
                ("error", Some(json!(message))),
                ("retry_at_ms", next_attempt_ms.map(|at| json!(at))),
                ("retryable", Some(json!(retryable))),
            ]),
            now,
        );
        // What led to the failure, and what follows from it, as events of their own.
        let subject = subjects.subject(step.task_id);
        let attempt = json!({ "attempt": step.attempts });
        let detail = |name: EventName, fields: Value| {
            subject.event(
                name.as_str(),
                Some((step.id, &step.name)),
                fields,
                &attempt,
                now,
            )
        };
        if let Some(cause) = cause {
            events.push(detail(cause, json!({ "error": message })));
        }
        events.push(event);
        match outcome {
            FailureOutcome::RetryAt(at) => events.push(detail(
                EventName::StepBackoff,
                json!({ "retry_at_ms": at, "delay_ms": at - now_ms }),
            )),
            _ if step.attempts >= step.max_attempts && step.retryable && retryable => {
                events.push(detail(
                    EventName::StepMaxRetriesReached,
                    json!({ "max_attempts": step.max_attempts }),
                ))
            }
            _ => {}
        }
        let newly_ready = if to == StepState::Skipped {
            self.release_children(txn, &[step.id], &subjects, now, &mut events)
                .await?
        } else {
            0
        };
        let mut finished = self
            .finalize_tasks(txn, &[step.task_id], &subjects, now, &mut events)
            .await?;
        new_rows.add([row]).add(finished.transitions).add(events);
        Ok(FailureReport {
            step: updated.try_into()?,
            newly_ready: newly_ready + finished.admitted_ready,
            finished_task: finished.tasks.pop(),
        })
    }
}

/// A uniform sample in [0, 1) for backoff jitter.
fn unit_sample() -> f64 {
    (Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

fn truncate(message: &str) -> String {
    const LIMIT: usize = 4096;
    if message.len() <= LIMIT {
        return message.to_owned();
    }
    let mut end = LIMIT;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}

/// The earliest due time after `after_ms` among retries, leases, attempt deadlines, task
/// deadlines, start timeouts, schedules' next ticks and spent rate limits' next starts (the
/// last four through their partial indexes). Leases
/// and deadlines are read through `ix_steps_in_flight_lease`, which holds in-flight steps
/// only (`state = 'in_progress'` is its predicate, so each query here repeats it).
pub(crate) fn push_wakeups(sql: &mut Sql, after_ms: i64) {
    sql.push("SELECT MIN(due) AS due FROM (SELECT MIN(next_attempt_ms) AS due FROM workflow_steps WHERE state IN ('error', 'in_progress') AND next_attempt_ms > ")
        .bind(after_ms)
        .push(" UNION ALL SELECT MIN(lease_expires_ms) AS due FROM workflow_steps WHERE state = 'in_progress' AND lease_expires_ms > ")
        .bind(after_ms)
        .push(" UNION ALL SELECT MIN(deadline_ms) AS due FROM workflow_steps WHERE state = 'in_progress' AND deadline_ms > ")
        .bind(after_ms)
        .push(" UNION ALL SELECT MIN(deadline_ms) AS due FROM tasks")
        .indexed_by("ix_tasks_deadline")
        .push(" WHERE deadline_ms IS NOT NULL AND state IN ('pending', 'in_progress') AND deadline_ms > ")
        .bind(after_ms)
        .push(" UNION ALL SELECT MIN(ready_since_ms + start_timeout_ms) AS due FROM workflow_steps")
        .indexed_by("ix_steps_start_timeout")
        .push(" WHERE start_timeout_ms IS NOT NULL AND state = 'pending' AND pending_parents = 0 AND ready_since_ms + start_timeout_ms > ")
        .bind(after_ms)
        .push(" UNION ALL SELECT MIN(next_attempt_ms + start_timeout_ms) AS due FROM workflow_steps")
        .indexed_by("ix_steps_retry_start_timeout")
        .push(" WHERE start_timeout_ms IS NOT NULL AND state = 'error' AND next_attempt_ms IS NOT NULL AND next_attempt_ms + start_timeout_ms > ")
        .bind(after_ms)
        .push(" UNION ALL SELECT MIN(next_fire_ms) AS due FROM schedules")
        .indexed_by("ix_schedules_due")
        .push(" WHERE next_fire_ms IS NOT NULL AND paused = FALSE AND next_fire_ms > ")
        .bind(after_ms)
        .push(" UNION ALL SELECT MIN(next_start_ms) AS due FROM rate_limits")
        .indexed_by("ix_rate_limits_next_start")
        .push(" WHERE next_start_ms IS NOT NULL AND next_start_ms > ")
        .bind(after_ms)
        .push(") AS wakeups");
}

/// Which limited steps (rate limits, step concurrency limits) a read of the ready steps
/// includes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limited {
    /// None: the claim's ready set (they start only through their buckets' admission).
    Without,
    /// Only them, through their partial index, and only those no limit is known to hold
    /// back: the candidates of an admission (a spent bucket's backlog does not hide the
    /// steps of other buckets behind it).
    Only,
    /// Those no limit is known to hold back: what a worker may hope to claim.
    Unheld,
}

/// `FROM workflow_steps s … WHERE` the readiness rule, narrowed to handlers (when given) and
/// namespaces. The steps are read first, through ix_steps_ready (state, pending_parents,
/// handler), and their tasks looked up by id: `CROSS JOIN` makes SQLite keep that order (on
/// PostgreSQL it is a plain join). Left to choose, SQLite walked every unfinished task
/// instead, so a claim cost as much as the tasks waiting for other handlers.
pub(crate) fn push_ready_steps(
    sql: &mut Sql,
    now_ms: i64,
    handlers: &[String],
    within: &Within,
    limited: Limited,
) {
    sql.push(" FROM workflow_steps s");
    if limited == Limited::Only {
        sql.indexed_by(crate::step_limits::LIMITED_INDEX);
    }
    sql.push(" CROSS JOIN tasks t");
    if limited != Limited::Without {
        // Each concurrency bucket's running attempts, counted once for the statement.
        sql.push(" LEFT JOIN (SELECT concurrency_bucket AS bucket, COUNT(*) AS running FROM workflow_steps")
            .indexed_by("ix_steps_running_limited")
            .push(" WHERE concurrency_bucket IS NOT NULL AND state = 'in_progress' GROUP BY concurrency_bucket) rc ON rc.bucket = s.concurrency_bucket");
    }
    sql.push(" WHERE t.id = s.task_id");
    push_step_ready(sql, now_ms);
    sql.push(" AND t.state IN ('pending', 'in_progress')");
    match limited {
        Limited::Without => {
            sql.push(" AND s.rate_limit IS NULL AND s.concurrency_bucket IS NULL");
        }
        Limited::Only => {
            sql.push(" AND (s.rate_limit IS NOT NULL OR s.concurrency_bucket IS NOT NULL)");
            push_unheld(sql, now_ms);
        }
        Limited::Unheld => push_unheld(sql, now_ms),
    }
    if !handlers.is_empty() {
        sql.push(" AND s.handler IN ")
            .bind_list(handlers.iter().cloned());
    }
    if let Within::Only(namespaces) = within {
        sql.push(" AND t.namespace IN ")
            .bind_list(namespaces.iter().cloned());
    }
}

/// ` AND` the step `s` may start an attempt now, by its own state: pending with every parent
/// done, or failed with its retry due.
fn push_step_ready(sql: &mut Sql, now_ms: i64) {
    sql.push(" AND s.state IN ('pending', 'error') AND s.pending_parents = 0 AND (s.state = 'pending' OR s.next_attempt_ms <= ")
        .bind(now_ms)
        .push(")");
}

/// ` AND` no limit is known to hold the step back: its rate limit (if any) is not spent
/// until a later time, and its concurrency limit (if any) has room (`rc`, the running counts
/// joined in by [`push_ready_steps`]). Only a hint outside an admission, which counts again
/// under the buckets' locks.
fn push_unheld(sql: &mut Sql, now_ms: i64) {
    sql.push(" AND (s.rate_limit IS NULL OR NOT EXISTS (SELECT 1 FROM rate_limits r WHERE r.bucket = s.rate_limit AND r.next_start_ms > ")
        .bind(now_ms)
        .push(")) AND (s.concurrency_bucket IS NULL OR COALESCE(rc.running, 0) < s.concurrency_limit)");
}

/// ` ORDER BY` the claim rank of the ready steps (see [`tasker_domain::priority`]): when each
/// became claimable (a step in error: its retry time), less its priority's head start; then
/// by id, the order they were created in.
pub(crate) fn push_claim_order(sql: &mut Sql) {
    sql.push(&format!(
        " ORDER BY COALESCE(CASE WHEN s.state = 'error' THEN s.next_attempt_ms ELSE s.ready_since_ms END, 0) - s.priority * {}, s.id",
        tasker_domain::priority::AGING_MS
    ));
}

impl Store {
    /// Which limited steps this store's claims may take, for the counts of what is
    /// claimable: those no limit holds back, once it knows limited steps exist; until then,
    /// none (and the counts skip the limits' joins).
    pub(crate) fn limited_claimable(&self) -> Limited {
        if self.step_limits_known() {
            Limited::Unheld
        } else {
            Limited::Without
        }
    }
}

/// Which steps a claim statement leases.
enum Picked<'a> {
    /// The first ready steps in claim order, up to this many.
    Ready(u32),
    /// These limited steps, which their buckets let through, if still claimable.
    Admitted(&'a [Uuid]),
}

/// How long the claim's leases last, in milliseconds.
fn lease_ms(request: &ClaimRequest) -> i64 {
    i64::try_from(request.lease.as_millis()).unwrap_or(i64::MAX / 4)
}

/// The statement that leases the `picked` steps to `request`'s worker and returns them with
/// their tasks' subjects and states. On PostgreSQL the steps are locked `SKIP LOCKED`, so
/// concurrent claims take different ones.
fn claim_statement(
    store: &Store,
    request: &ClaimRequest,
    now: DateTime<Utc>,
    picked: Picked<'_>,
) -> sea_orm::Statement {
    let now_ms = now.timestamp_millis();
    let lease_ms = lease_ms(request);
    let mut sql = Sql::new(store.db.get_database_backend());
    let postgres = sql.is_postgres();
    if postgres {
        sql.push("WITH ready AS (SELECT s.id");
    } else {
        sql.push("UPDATE workflow_steps SET state = 'in_progress', attempts = attempts + 1, lease_token = randomblob(16), lease_holder = ")
            .bind(request.worker_id.clone())
            .push(", lease_expires_ms = ")
            .bind(now_ms + lease_ms)
            .push(", attempt_started_ms = ")
            .bind(now_ms)
            .push(", deadline_ms = CASE WHEN timeout_ms IS NULL THEN NULL ELSE ")
            .bind(now_ms)
            .push(" + timeout_ms END, next_attempt_ms = NULL, version = version + 1, updated_at = ")
            .bind(now)
            .push(" WHERE id IN (SELECT s.id");
    }
    match picked {
        Picked::Ready(limit) => {
            push_ready_steps(
                &mut sql,
                now_ms,
                &request.handlers,
                &request.within,
                Limited::Without,
            );
            push_claim_order(&mut sql);
            sql.push(" LIMIT ").bind(i64::from(limit));
        }
        Picked::Admitted(ids) => {
            // Read in this transaction; on PostgreSQL another claim may have taken one since.
            sql.push(" FROM workflow_steps s WHERE s.id IN ")
                .bind_list(ids.iter().copied());
            push_step_ready(&mut sql, now_ms);
        }
    }
    if postgres {
        sql.push(" FOR UPDATE OF s SKIP LOCKED) UPDATE workflow_steps AS s SET state = 'in_progress', attempts = s.attempts + 1, lease_token = gen_random_uuid(), lease_holder = ")
            .bind(request.worker_id.clone())
            .push(", lease_expires_ms = ")
            .bind(now_ms + lease_ms)
            .push(", attempt_started_ms = ")
            .bind(now_ms)
            .push(", deadline_ms = CASE WHEN s.timeout_ms IS NULL THEN NULL ELSE ")
            .bind(now_ms)
            .push(" + s.timeout_ms END, next_attempt_ms = NULL, version = s.version + 1, updated_at = ")
            .bind(now)
            .push(" FROM ready WHERE s.id = ready.id RETURNING s.*");
    } else {
        sql.push(") RETURNING *");
    }
    push_task_fields(&mut sql, &SUBJECT_FIELDS);
    push_task_fields(&mut sql, &[("state", "task_state")]);
    sql.build()
}

#[derive(Debug, FromQueryResult)]
struct ReadyCount {
    ready: i64,
}

impl Store {
    /// How many steps are claimable now for these handlers (empty: any) within these
    /// namespaces, counting at most `cap`.
    pub async fn count_ready_steps(
        &self,
        handlers: &[String],
        within: &Within,
        cap: u32,
    ) -> Result<u64> {
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT COUNT(*) AS ready FROM (SELECT s.id");
        push_ready_steps(
            &mut sql,
            self.now_ms(),
            handlers,
            within,
            self.limited_claimable(),
        );
        sql.push(" LIMIT ")
            .bind(i64::from(cap))
            .push(") AS ready_steps");
        let row = ReadyCount::find_by_statement(sql.build())
            .one(&self.db)
            .await?;
        Ok(row.map_or(0, |row| u64::try_from(row.ready).unwrap_or(0)))
    }
}

/// Steps claimed earlier in a transaction that completes them: which steps and tasks the
/// completion touches is known before it runs.
struct ClaimedHere {
    subjects: Subjects,
    steps: Vec<Uuid>,
    /// Their tasks, each once.
    tasks: Vec<Uuid>,
}

/// Whether two lists hold the same ids (each list's ids distinct).
fn same_ids(expected: &[Uuid], found: &[Uuid]) -> bool {
    expected.len() == found.len() && {
        let expected: HashSet<&Uuid> = expected.iter().collect();
        found.iter().all(|id| expected.contains(id))
    }
}

fn distinct(ids: impl Iterator<Item = Uuid>) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = ids.collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[derive(Debug, FromQueryResult)]
struct LeaseNamespace {
    token: Uuid,
    namespace: String,
}

#[derive(Debug, FromQueryResult)]
struct ParentResult {
    child_id: Uuid,
    name: String,
    results: Option<Value>,
}
