//! Timeouts that end work nobody finished in time: a task past its template's `timeout` is
//! cancelled (`task.timed_out`, then `task.cancelled`), and a step that waited claimable
//! longer than its `start_timeout` for an attempt fails for good, or is skipped when
//! skippable (`step.start_timed_out`, then `step.failed` or `step.skipped`; a retry that
//! fails for good stays in `error`, its retry dropped). One sweep is one transaction; the
//! maintenance loop runs it when the earliest of these times comes.

use crate::concurrency::{Counted, mark_freed};
use crate::entities::{task, workflow_step};
use crate::events::{metadata, step_transition as step_rows};
use crate::progress::Subjects;
use crate::records::{StepRecord, TaskRecord};
use crate::sql::Sql;
use crate::state_change::{StepEffect, StepMove, Steps, move_steps};
use crate::{Result, Store};
use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult};
use serde_json::{Value, json};
use tasker_domain::{EventName, StateMachine, StepState};

/// The most tasks, and the most steps, one sweep ends: the rest go in the next one.
const SWEEP_BATCH: i64 = 200;

/// What a timeout sweep did.
#[derive(Debug, Default)]
pub struct TimeoutReport {
    /// Tasks cancelled past their deadline.
    pub timed_out_tasks: Vec<TaskRecord>,
    /// Steps failed (or skipped) because no worker started them in time.
    pub unstarted_steps: Vec<StepRecord>,
    /// Tasks those steps brought to their end.
    pub finished_tasks: Vec<TaskRecord>,
    /// Steps that became claimable: children of skipped steps, and tasks admitted to the
    /// concurrency slots the ended ones freed.
    pub newly_ready: usize,
}

impl TimeoutReport {
    pub fn is_empty(&self) -> bool {
        self.timed_out_tasks.is_empty() && self.unstarted_steps.is_empty()
    }
}

impl Store {
    /// Whether a task deadline or a step start timeout (first attempt or retry) has passed at
    /// `now_ms` (one read, through the three partial indexes).
    async fn timeouts_due(&self, now_ms: i64) -> Result<bool> {
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM tasks")
            .indexed_by("ix_tasks_deadline")
            .push(" WHERE deadline_ms IS NOT NULL AND state IN ('pending', 'in_progress') AND deadline_ms <= ")
            .bind(now_ms)
            .push(" LIMIT 1) AS tasks_due) + (SELECT COUNT(*) FROM (SELECT 1 FROM workflow_steps")
            .indexed_by("ix_steps_start_timeout")
            .push(" WHERE start_timeout_ms IS NOT NULL AND state = 'pending' AND pending_parents = 0 AND ready_since_ms + start_timeout_ms <= ")
            .bind(now_ms)
            .push(" LIMIT 1) AS steps_due) + (SELECT COUNT(*) FROM (SELECT 1 FROM workflow_steps")
            .indexed_by("ix_steps_retry_start_timeout")
            .push(" WHERE start_timeout_ms IS NOT NULL AND state = 'error' AND next_attempt_ms IS NOT NULL AND next_attempt_ms + start_timeout_ms <= ")
            .bind(now_ms)
            .push(" LIMIT 1) AS retries_due) AS n");
        let due = Counted::find_by_statement(sql.build())
            .one(&self.db)
            .await?;
        Ok(due.is_some_and(|due| due.n > 0))
    }

    /// Ends the tasks past their deadline and the steps past their start timeout, now. On
    /// PostgreSQL rows another transaction is changing are left for the next sweep.
    pub async fn time_out(&self) -> Result<TimeoutReport> {
        // Most sweeps find nothing: one read answers that, without a write transaction.
        if !self.timeouts_due(self.now_ms()).await? {
            return Ok(TimeoutReport::default());
        }
        self.writing(async {
            let now = self.now();
            let now_ms = now.timestamp_millis();
            let txn = self.begin_write().await?;
            // Slots of the tasks this sweep ends are freed together, last.
            txn.defer_slot_frees();
            let backend = txn.get_database_backend();
            let skip_locked = if backend == DbBackend::Postgres {
                " FOR UPDATE SKIP LOCKED"
            } else {
                ""
            };
            let mut rows = crate::events::Rows::new();
            let mut events = Vec::new();
            let mut report = TimeoutReport::default();

            let mut sql = Sql::new(backend);
            sql.push("SELECT * FROM tasks")
                .indexed_by("ix_tasks_deadline")
                .push(" WHERE deadline_ms IS NOT NULL AND state IN ('pending', 'in_progress') AND deadline_ms <= ")
                .bind(now_ms)
                .push(" ORDER BY deadline_ms LIMIT ")
                .bind(SWEEP_BATCH)
                .push(skip_locked);
            let mut due = task::Model::find_by_statement(sql.build()).all(&txn).await?;
            if backend == DbBackend::Postgres {
                // Cancelling must not wait for rows while holding these.
                due = self.idle_tasks(&txn, due, SWEEP_BATCH).await?;
            }
            let mut cancelled = Vec::with_capacity(due.len());
            for task in &due {
                let timeout_ms = task.deadline_ms.unwrap_or(now_ms) - task.created_at.timestamp_millis();
                let subjects = Subjects::of_tasks(std::slice::from_ref(task));
                events.push(subjects.subject(task.id).event(
                    EventName::TaskTimedOut.as_str(),
                    None,
                    json!({ "timeout_ms": timeout_ms }),
                    &Value::Null,
                    now,
                ));
                let reason = format!(
                    "timed out: not finished {} s after it was created (its template's timeout)",
                    timeout_ms as f64 / 1000.0
                );
                cancelled.push(
                    self.cancel_rows(&txn, task, Some(&reason), now, &mut rows, &mut events)
                        .await?,
                );
            }
            report.newly_ready += self
                .free_slots(&txn, &cancelled, now, &mut events)
                .await?
                .ready_steps;
            for mut task in cancelled {
                mark_freed(&mut task);
                report.timed_out_tasks.push(task.try_into()?);
            }

            let mut sql = Sql::new(backend);
            sql.push("SELECT s.* FROM workflow_steps s")
                .indexed_by("ix_steps_start_timeout")
                .push(" CROSS JOIN tasks t WHERE t.id = s.task_id AND s.start_timeout_ms IS NOT NULL AND s.state = 'pending' AND s.pending_parents = 0 AND t.state IN ('pending', 'in_progress') AND s.ready_since_ms + s.start_timeout_ms <= ")
                .bind(now_ms)
                .push(" ORDER BY s.id LIMIT ")
                .bind(SWEEP_BATCH);
            if backend == DbBackend::Postgres {
                sql.push(" FOR UPDATE OF s SKIP LOCKED");
            }
            let mut unstarted = workflow_step::Model::find_by_statement(sql.build())
                .all(&txn)
                .await?;
            let mut sql = Sql::new(backend);
            sql.push("SELECT s.* FROM workflow_steps s")
                .indexed_by("ix_steps_retry_start_timeout")
                .push(" CROSS JOIN tasks t WHERE t.id = s.task_id AND s.start_timeout_ms IS NOT NULL AND s.state = 'error' AND s.next_attempt_ms IS NOT NULL AND t.state IN ('pending', 'in_progress') AND s.next_attempt_ms + s.start_timeout_ms <= ")
                .bind(now_ms)
                .push(" ORDER BY s.id LIMIT ")
                .bind(SWEEP_BATCH);
            if backend == DbBackend::Postgres {
                sql.push(" FOR UPDATE OF s SKIP LOCKED");
            }
            unstarted.extend(
                workflow_step::Model::find_by_statement(sql.build())
                    .all(&txn)
                    .await?,
            );
            let mut task_ids: Vec<_> = unstarted.iter().map(|step| step.task_id).collect();
            task_ids.sort_unstable();
            task_ids.dedup();
            let subjects = self.subjects(&txn, &task_ids).await?;
            let mut skipped = Vec::new();
            let mut touched = Vec::new();
            for step in unstarted {
                let from = StepState::parse(&step.state)?;
                let start_timeout_ms = step.start_timeout_ms.unwrap_or_default();
                // A retry has waited since its retry time, a first attempt since it became
                // claimable.
                let since = match from {
                    StepState::Error => step.next_attempt_ms,
                    _ => step.ready_since_ms,
                };
                let waited_ms = now_ms - since.unwrap_or(now_ms);
                let attempt = if from == StepState::Error {
                    format!("its retry (attempt {})", step.attempts + 1)
                } else {
                    "it".to_owned()
                };
                let error = format!(
                    "not started: {attempt} waited {} s for a worker, its start_timeout is {} s",
                    waited_ms as f64 / 1000.0,
                    start_timeout_ms as f64 / 1000.0
                );
                let (to, effect) = if step.skippable {
                    (StepState::Skipped, StepEffect::Finish { results: None })
                } else {
                    (
                        StepState::Error,
                        StepEffect::Fail {
                            error: error.clone(),
                        },
                    )
                };
                let change = StepMove {
                    steps: Steps::One(step.id),
                    from: &[from],
                    to,
                    version: Some(step.version),
                    effect,
                };
                // Claimed meanwhile (SQLite reads no locks): it started after all.
                let Some(moved) = move_steps(&txn, change, now).await?.pop() else {
                    continue;
                };
                let subject = subjects.subject(step.task_id);
                events.push(subject.event(
                    EventName::StepStartTimedOut.as_str(),
                    Some((step.id, &step.name)),
                    json!({ "start_timeout_ms": start_timeout_ms, "waited_ms": waited_ms }),
                    &Value::Null,
                    now,
                ));
                // A retry that fails for good stays in error: no change of state to record.
                if from != to {
                    let (row, event) = step_rows(
                        subject,
                        step.id,
                        &step.name,
                        Some(from),
                        to,
                        moved.version,
                        metadata(&[("error", Some(Value::from(error)))]),
                        now,
                    );
                    rows.add([row]);
                    events.push(event);
                }
                if to == StepState::Skipped {
                    skipped.push(step.id);
                }
                touched.push(step.task_id);
                report.unstarted_steps.push(moved.try_into()?);
            }
            if !skipped.is_empty() {
                report.newly_ready += self
                    .release_children(&txn, &skipped, &subjects, now, &mut events)
                    .await?;
            }
            touched.sort_unstable();
            touched.dedup();
            if !touched.is_empty() {
                let finished = self
                    .finalize_tasks(&txn, &touched, &subjects, now, &mut events)
                    .await?;
                rows.add(finished.transitions);
                report.newly_ready += finished.admitted_ready;
                report.finished_tasks = finished.tasks;
            }
            report.newly_ready += self
                .free_deferred_slots(&txn, now, &mut events)
                .await?
                .ready_steps;
            if report.is_empty() {
                txn.commit().await?;
            } else {
                rows.add(events);
                self.insert_rows(&txn, rows).await?;
                self.commit_events(txn).await?;
            }
            Ok(report)
        })
        .await
    }
}
