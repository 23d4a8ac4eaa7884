//! Starting and cancelling tasks, each in one transaction with its transitions and events.

use crate::entities::{task, task_tag, task_transition, workflow_step, workflow_step_edge};
use crate::events::{
    Subject, insert_all, metadata, step_transition as step_rows, task_transition as task_rows,
};
use crate::records::{TaskRecord, TemplateRecord};
use crate::state_change::{
    CompletedAt, StepEffect, StepMove, Steps, TaskMove, move_steps, move_tasks,
};
use crate::{Error, Result, Store};
use sea_orm::ActiveValue::Set;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, TransactionTrait};
use serde_json::{Value, json};
use tasker_domain::{StateMachine, StepState, TaskRequest, TaskState};
use uuid::Uuid;

/// A request to start a task from `namespace/template@version` (the newest version when none).
#[derive(Debug, Clone)]
pub struct NewTask {
    pub namespace: String,
    pub template: String,
    pub version: Option<String>,
    pub request: TaskRequest,
    /// The W3C `traceparent` the task's work joins (set by the engine when traces are
    /// exported; `None` otherwise).
    pub trace_parent: Option<String>,
}

/// The task, and whether this call created it (`false`: an earlier call with the same
/// idempotency key did).
#[derive(Debug, Clone)]
pub struct TaskCreation {
    pub task: TaskRecord,
    pub created: bool,
}

impl Store {
    /// Validates the request and the context against the template's schema, then writes the
    /// task, its steps, edges, tags, transitions and events in one transaction. With an
    /// idempotency key already used in the namespace, returns that task instead.
    pub async fn create_task(&self, new: NewTask) -> Result<TaskCreation> {
        self.writing(async {
            new.request.validate()?;
            let template = self
                .template(&new.namespace, &new.template, new.version.as_deref())
                .await?;
            template.template.validate_context(&new.request.context)?;
            if let Some(key) = &new.request.idempotency_key
                && let Some(existing) = self.task_by_idempotency_key(&new, key).await?
            {
                return Ok(existing);
            }
            match self.insert_task(&template, &new).await {
                Ok(task) => Ok(TaskCreation {
                    task,
                    created: true,
                }),
                // Another request with the same key committed first: answer with its task.
                Err(Error::Database(err)) if Self::is_unique_violation(&err) => {
                    match &new.request.idempotency_key {
                        Some(key) => self
                            .task_by_idempotency_key(&new, key)
                            .await?
                            .ok_or(Error::Database(err)),
                        None => Err(Error::Database(err)),
                    }
                }
                Err(err) => Err(err),
            }
        })
        .await
    }

    async fn task_by_idempotency_key(
        &self,
        new: &NewTask,
        key: &str,
    ) -> Result<Option<TaskCreation>> {
        let Some(model) = task::Entity::find()
            .filter(task::Column::Namespace.eq(&new.namespace))
            .filter(task::Column::IdempotencyKey.eq(key))
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        if model.template_name != new.template {
            return Err(Error::Conflict(format!(
                "idempotency key {key:?} already started task {} from template {}/{}; use a \
                 new key for a different template",
                model.id, model.namespace, model.template_name
            )));
        }
        Ok(Some(TaskCreation {
            task: model.try_into()?,
            created: false,
        }))
    }

    async fn insert_task(
        &self,
        template_record: &TemplateRecord,
        new: &NewTask,
    ) -> Result<TaskRecord> {
        let request = &new.request;
        let template = &template_record.template;
        let now = self.now();
        let task_id = Uuid::now_v7();
        let tags = request.distinct_tags();
        let correlation_id = request
            .correlation_id
            .clone()
            .unwrap_or_else(|| task_id.to_string());
        let subject = Subject {
            namespace: &template.namespace,
            template: &template.name,
            task_id,
            correlation_id: &correlation_id,
        };
        let task_model = task::ActiveModel {
            id: Set(task_id),
            namespace: Set(template.namespace.clone()),
            template_id: Set(template_record.id),
            template_name: Set(template.name.clone()),
            template_version: Set(template.version.to_string()),
            state: Set(TaskState::Pending.as_str().to_owned()),
            context: Set(request.context.clone()),
            initiator: Set(request.initiator.clone()),
            source_system: Set(request.source_system.clone()),
            reason: Set(request.reason.clone()),
            tags: Set(json!(tags)),
            idempotency_key: Set(request.idempotency_key.clone()),
            correlation_id: Set(Some(correlation_id.clone())),
            version: Set(1),
            created_at: Set(now),
            updated_at: Set(now),
            completed_at: Set(None),
            traceparent: Set(new.trace_parent.clone()),
        };
        let step_ids: Vec<Uuid> = template.steps.iter().map(|_| Uuid::now_v7()).collect();
        let steps = template
            .steps
            .iter()
            .zip(&step_ids)
            .enumerate()
            .map(|(position, (step, id))| workflow_step::ActiveModel {
                id: Set(*id),
                task_id: Set(task_id),
                position: Set(position as i32),
                name: Set(step.name.clone()),
                handler: Set(step.handler.clone()),
                description: Set(step.description.clone()),
                config: Set(step.config.clone()),
                state: Set(StepState::Pending.as_str().to_owned()),
                attempts: Set(0),
                max_attempts: Set(step.retry.max_attempts as i32),
                retryable: Set(step.retry.retryable),
                skippable: Set(step.skippable),
                backoff: Set(serde_json::to_value(&step.retry.backoff).unwrap_or(Value::Null)),
                timeout_ms: Set(step
                    .timeout
                    .map(|seconds| (seconds * 1000.0).round() as i64)),
                pending_parents: Set(step.depends_on.len() as i32),
                results: Set(None),
                last_error: Set(None),
                next_attempt_ms: Set(None),
                attempt_started_ms: Set(None),
                deadline_ms: Set(None),
                lease_token: Set(None),
                lease_holder: Set(None),
                lease_expires_ms: Set(None),
                version: Set(1),
                // Roots are claimable now; a child's time is set when its last parent is done.
                ready_since_ms: Set(step.depends_on.is_empty().then(|| now.timestamp_millis())),
                created_at: Set(now),
                updated_at: Set(now),
                completed_at: Set(None),
            })
            .collect::<Vec<_>>();
        let dag = template.dag();
        let edges = (0..step_ids.len()).flat_map(|child| {
            dag.parents(child)
                .iter()
                .map(move |&parent| (parent, child))
                .collect::<Vec<_>>()
        });
        let edges = edges
            .map(|(parent, child)| workflow_step_edge::ActiveModel {
                task_id: Set(task_id),
                parent_step_id: Set(step_ids[parent]),
                child_step_id: Set(step_ids[child]),
            })
            .collect::<Vec<_>>();
        let task_tags = tags
            .iter()
            .map(|tag| task_tag::ActiveModel {
                task_id: Set(task_id),
                tag: Set(tag.clone()),
            })
            .collect::<Vec<_>>();
        let task_metadata = metadata(&[
            ("initiator", request.initiator.clone().map(Value::from)),
            (
                "source_system",
                request.source_system.clone().map(Value::from),
            ),
            ("reason", request.reason.clone().map(Value::from)),
            ("version", Some(Value::from(template.version.to_string()))),
        ]);
        let (task_transition, mut events) = {
            let (row, event) = task_rows(subject, None, TaskState::Pending, 1, task_metadata, now);
            (row, vec![event])
        };
        let mut step_transitions = Vec::with_capacity(step_ids.len());
        for (index, (step, id)) in template.steps.iter().zip(&step_ids).enumerate() {
            // What a live graph needs to draw the step without reading the task again.
            let parents: Vec<Uuid> = dag.parents(index).iter().map(|&p| step_ids[p]).collect();
            let (row, event) = step_rows(
                subject,
                *id,
                &step.name,
                None,
                StepState::Pending,
                1,
                json!({
                    "handler": step.handler,
                    "position": index,
                    "depends_on": step.depends_on,
                    "depends_on_ids": parents,
                }),
                now,
            );
            step_transitions.push(row);
            events.push(event);
        }
        let roots: Vec<(Uuid, &str)> = dag
            .roots()
            .into_iter()
            .map(|i| (step_ids[i], template.steps[i].name.as_str()))
            .collect();
        events.push(crate::events::steps_ready(subject, &roots, now));

        let txn = self.db.begin().await?;
        let task_model = task_model.insert(&txn).await?;
        insert_all(&txn, task_tags).await?;
        insert_all(&txn, steps).await?;
        insert_all(&txn, edges).await?;
        task_transition::Entity::insert(task_transition)
            .exec_without_returning(&txn)
            .await?;
        insert_all(&txn, step_transitions).await?;
        insert_all(&txn, events).await?;
        self.commit_events(txn).await?;
        task_model.try_into()
    }

    /// Cancels a task and every unfinished step of it (their leases are dropped), atomically.
    /// A task already complete, cancelled or resolved is a conflict.
    pub async fn cancel_task(&self, id: Uuid, reason: Option<String>) -> Result<TaskRecord> {
        self.writing(async {
            let now = self.now();
            let txn = self.db.begin().await?;
            let current = Self::task_row(&txn, id).await?;
            let from = TaskState::parse(&current.state)?;
            from.transition_to(TaskState::Cancelled)?;
            let change = TaskMove {
                ids: &[id],
                from: &[from],
                to: TaskState::Cancelled,
                version: Some(current.version),
                completed_at: CompletedAt::Stamp,
            };
            let updated = move_tasks(&txn, change, now).await?;
            let Some(updated) = updated.into_iter().next() else {
                return Err(Error::Conflict(format!(
                    "task {id} changed while it was being cancelled; read it again and retry"
                )));
            };
            let subjects = crate::progress::Subjects::of_tasks(std::slice::from_ref(&current));
            let subject = subjects.subject(id);
            let reason_value = reason.clone().map(Value::from);
            let (transition, event) = task_rows(
                subject,
                Some(from),
                TaskState::Cancelled,
                updated.version,
                metadata(&[("reason", reason_value.clone())]),
                now,
            );
            task_transition::Entity::insert(transition)
                .exec_without_returning(&txn)
                .await?;
            let mut events = vec![event];
            let mut transitions = Vec::new();
            // One guarded UPDATE per unfinished state: each re-checks its rows' state under lock.
            for step_from in [StepState::Pending, StepState::InProgress, StepState::Error] {
                let change = StepMove {
                    steps: Steps::OfTask(id),
                    from: &[step_from],
                    to: StepState::Cancelled,
                    version: None,
                    effect: StepEffect::Cancel,
                };
                let cancelled = move_steps(&txn, change, now).await?;
                for step in cancelled {
                    let (row, event) = step_rows(
                        subject,
                        step.id,
                        &step.name,
                        Some(step_from),
                        StepState::Cancelled,
                        step.version,
                        metadata(&[("reason", reason_value.clone())]),
                        now,
                    );
                    transitions.push(row);
                    events.push(event);
                }
            }
            insert_all(&txn, transitions).await?;
            insert_all(&txn, events).await?;
            self.commit_events(txn).await?;
            updated.try_into()
        })
        .await
    }
}
