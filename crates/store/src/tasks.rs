//! Starting and cancelling tasks, each in one transaction with its transitions and events.

use crate::entities::{
    event, step_transition, task, task_tag, task_transition, workflow_step, workflow_step_edge,
};
use crate::events::{
    Subject, metadata, step_transition as step_rows, task_transition as task_rows,
};
use crate::records::{TaskRecord, TemplateRecord};
use crate::sql::Sql;
use crate::state_change::{
    CompletedAt, StepEffect, StepMove, Steps, TaskMove, move_steps, move_tasks,
};
use crate::templates::StartingTemplate;
use crate::write::WriteTxn;
use crate::{Error, Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use tasker_domain::concurrency::Strategy;
use tasker_domain::rate_limit::RateLimit;
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

/// The problems of request `index` of a batch, under `inputs[index]`; a database failure
/// stays an error of the whole batch.
fn item_problems(index: usize, err: Error) -> Result<Vec<tasker_domain::Problem>> {
    let under = |path: &str| {
        if path.is_empty() {
            format!("inputs[{index}]")
        } else {
            format!("inputs[{index}].{path}")
        }
    };
    let problems = match err {
        Error::Domain(
            tasker_domain::Error::InvalidRequest(problems)
            | tasker_domain::Error::InvalidContext(problems),
        ) => problems
            .into_iter()
            .map(|problem| tasker_domain::Problem::new(under(&problem.path), problem.message))
            .collect(),
        Error::Domain(other) => vec![tasker_domain::Problem::new(under(""), other.to_string())],
        err @ Error::NotFound { .. } => {
            vec![tasker_domain::Problem::new(
                under("template"),
                err.to_string(),
            )]
        }
        Error::Conflict(message) => {
            vec![tasker_domain::Problem::new(
                under("idempotencyKey"),
                message,
            )]
        }
        other => return Err(other),
    };
    Ok(problems)
}

/// A request of a batch that repeats an earlier one's idempotency key: refused, as the key
/// can start only one task.
fn repeated_key(index: usize, first: usize) -> tasker_domain::Problem {
    tasker_domain::Problem::new(
        format!("inputs[{index}].idempotencyKey"),
        format!("inputs[{first}] of this call has the same idempotency key; a key starts one task"),
    )
}

/// Namespace, template name and version (the newest when `None`) a request starts from.
type TemplateKey = (String, String, Option<String>);

/// What a checked request comes to.
enum Planned {
    /// Its idempotency key already started this task.
    Existing(Box<TaskCreation>),
    /// A new task from this template, with the keys its context gives it.
    New(Arc<TemplateRecord>, Keys),
}

/// What a new task's context makes of its template's keys.
#[derive(Debug, Clone, Default)]
struct Keys {
    /// Its concurrency key, when the template has a concurrency rule.
    concurrency: Option<String>,
    /// Per step (in template order), the rate limit bucket it draws from, if it has one.
    rate_buckets: Vec<Option<String>>,
    /// Per step, the concurrency bucket its attempts count in, if it has one.
    step_buckets: Vec<Option<String>>,
}

/// Every row one new task writes.
#[derive(Clone)]
pub(crate) struct TaskRows {
    task: task::Model,
    tags: Vec<task_tag::ActiveModel>,
    steps: Vec<workflow_step::ActiveModel>,
    edges: Vec<workflow_step_edge::ActiveModel>,
    task_transition: task_transition::ActiveModel,
    step_transitions: Vec<step_transition::ActiveModel>,
    events: Vec<event::ActiveModel>,
    /// What the task does when its concurrency key is at its limit (keyed tasks only).
    strategy: Option<Strategy>,
}

/// The task, and whether this call created it (`false`: an earlier call with the same
/// idempotency key did).
#[derive(Debug, Clone)]
pub struct TaskCreation {
    pub task: TaskRecord,
    pub created: bool,
    /// The handlers of the steps this call made claimable (the template's roots; none when
    /// the task existed already), so only claimers of those handlers need waking.
    pub ready_handlers: Vec<String>,
}

/// A template's duration (seconds, at most 30 days) in milliseconds.
fn seconds_to_ms(seconds: f64) -> i64 {
    (seconds * 1000.0).round() as i64
}

/// What a new task can run at once: its template's root handlers, none while it waits for a
/// concurrency slot (or was cancelled at creation by its key's strategy).
fn startable_handlers(template: &TemplateRecord, task: &TaskRecord) -> Vec<String> {
    if task.waits_for_slot() || task.state != TaskState::Pending {
        return Vec::new();
    }
    root_handlers(template)
}

/// The distinct handlers of a template's root steps: what a new task of it can run at once.
fn root_handlers(template: &TemplateRecord) -> Vec<String> {
    let mut handlers: Vec<String> = template
        .template
        .steps
        .iter()
        .filter(|step| step.depends_on.is_empty())
        .map(|step| step.handler.clone())
        .collect();
    handlers.sort_unstable();
    handlers.dedup();
    handlers
}

impl Store {
    /// Validates the request and the context against the template's schema, then writes the
    /// task, its steps, edges, tags, transitions and events in one transaction. With an
    /// idempotency key already used in the namespace, returns that task instead.
    pub async fn create_task(&self, new: NewTask) -> Result<TaskCreation> {
        self.writing(async {
            let (template, keys) = match self.check_new_task(&new, &mut HashMap::new()).await? {
                Planned::Existing(existing) => return Ok(*existing),
                Planned::New(template, keys) => (template, keys),
            };
            match self.insert_task(&template, &new, keys).await {
                Ok(task) => Ok(TaskCreation {
                    ready_handlers: startable_handlers(&template, &task),
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

    /// Starts many tasks in one transaction: all of them or none. Every request is checked
    /// first; when any is refused (a repeated idempotency key among them), nothing is written
    /// and the error lists the problems of each refused one, under `inputs[i]`. A request whose
    /// idempotency key already started a task answers that task (`created: false`).
    pub async fn create_tasks(&self, news: Vec<NewTask>) -> Result<Vec<TaskCreation>> {
        self.writing(async {
            let mut templates = HashMap::new();
            let mut problems = Vec::new();
            let mut plan = Vec::with_capacity(news.len());
            let mut keys_seen: HashMap<(&str, &str), usize> = HashMap::new();
            for (index, new) in news.iter().enumerate() {
                match self.check_new_task(new, &mut templates).await {
                    Err(err) => problems.extend(item_problems(index, err)?),
                    Ok(planned) => {
                        if let (Planned::New(..), Some(key)) =
                            (&planned, &new.request.idempotency_key)
                        {
                            match keys_seen.entry((new.namespace.as_str(), key.as_str())) {
                                Entry::Occupied(first) => {
                                    problems.push(repeated_key(index, *first.get()));
                                }
                                Entry::Vacant(slot) => {
                                    slot.insert(index);
                                }
                            }
                        }
                        plan.push(planned);
                    }
                }
            }
            if !problems.is_empty() {
                return Err(tasker_domain::Error::InvalidRequest(problems).into());
            }
            let now = self.now();
            let mut rows = Vec::new();
            for (new, planned) in news.iter().zip(&plan) {
                if let Planned::New(template, keys) = planned {
                    rows.push(Self::task_rows(template, new, keys.clone(), now));
                }
            }
            let mut written = match self.insert_task_rows(rows).await {
                // A concurrent request with one of these keys committed first.
                Err(Error::Database(err)) if Self::is_unique_violation(&err) => {
                    return Err(Error::Conflict(
                        "another request with one of these idempotency keys committed first; \
                         send the batch again: those keys answer the tasks already started"
                            .into(),
                    ));
                }
                written => written?.into_iter(),
            };
            plan.into_iter()
                .map(|planned| match planned {
                    Planned::Existing(existing) => Ok(*existing),
                    Planned::New(template, _) => written
                        .next()
                        .map(|task| TaskCreation {
                            ready_handlers: startable_handlers(&template, &task),
                            task,
                            created: true,
                        })
                        .ok_or_else(|| {
                            Error::Conflict("a task of the batch was not written".into())
                        }),
                })
                .collect()
        })
        .await
    }

    /// Checks one request: its fields, its template (read once per call, kept in
    /// `templates`) and its context. Answers the task its idempotency key already started,
    /// or the template a new task starts from.
    async fn check_new_task(
        &self,
        new: &NewTask,
        templates: &mut HashMap<TemplateKey, StartingTemplate>,
    ) -> Result<Planned> {
        new.request.validate()?;
        let key = (
            new.namespace.clone(),
            new.template.clone(),
            new.version.clone(),
        );
        let template = match templates.get(&key) {
            Some(template) => template.clone(),
            None => {
                let template = self
                    .starting_template(&new.namespace, &new.template, new.version.as_deref())
                    .await?;
                templates.insert(key, template.clone());
                template
            }
        };
        if let Some(check) = &template.context_check {
            check.validate(&new.request.context)?;
        }
        let definition = &template.record.template;
        let context = &new.request.context;
        let invalid = |problem| tasker_domain::Error::InvalidContext(vec![problem]);
        let concurrency = definition
            .concurrency
            .as_ref()
            .map(|policy| policy.key_for(&definition.namespace, &definition.name, context))
            .transpose()
            .map_err(invalid)?;
        // Each step's buckets: its rate limit's and its concurrency limit's.
        let namespace = &definition.namespace;
        let mut rate_buckets = Vec::with_capacity(definition.steps.len());
        let mut step_buckets = Vec::with_capacity(definition.steps.len());
        for step in &definition.steps {
            let rate = (step.rate_limit.as_ref()).map(|limit| limit.bucket_for(namespace, context));
            let slots = (step.concurrency.as_ref())
                .map(|limit| limit.bucket_for(namespace, &definition.name, &step.name, context));
            rate_buckets.push(rate.transpose().map_err(invalid)?);
            step_buckets.push(slots.transpose().map_err(invalid)?);
        }
        if rate_buckets
            .iter()
            .chain(&step_buckets)
            .any(Option::is_some)
        {
            self.step_limits_in_use();
        }
        if let Some(key) = &new.request.idempotency_key
            && let Some(existing) = self.task_by_idempotency_key(new, key).await?
        {
            return Ok(Planned::Existing(Box::new(existing)));
        }
        Ok(Planned::New(
            template.record,
            Keys {
                concurrency,
                rate_buckets,
                step_buckets,
            },
        ))
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
            ready_handlers: Vec::new(),
        }))
    }

    async fn insert_task(
        &self,
        template_record: &TemplateRecord,
        new: &NewTask,
        keys: Keys,
    ) -> Result<TaskRecord> {
        let rows = Self::task_rows(template_record, new, keys, self.now());
        self.insert_task_grouped(rows).await
    }

    /// Every row of one new task, built before anything is written. A task with a concurrency
    /// key starts waiting for a slot: each step counts one parent more until its admission.
    fn task_rows(
        template_record: &TemplateRecord,
        new: &NewTask,
        keys: Keys,
        now: DateTime<Utc>,
    ) -> TaskRows {
        let Keys {
            concurrency: concurrency_key,
            rate_buckets,
            step_buckets,
        } = keys;
        let request = &new.request;
        let template = &template_record.template;
        let task_id = Uuid::now_v7();
        let tags = request.distinct_tags();
        let correlation_id = request
            .correlation_id
            .clone()
            .unwrap_or_else(|| task_id.to_string());
        let priority = request.priority_under(template.priority);
        let policy = template
            .concurrency
            .as_ref()
            .filter(|_| concurrency_key.is_some());
        let gate = i32::from(policy.is_some());
        let subject = Subject {
            namespace: &template.namespace,
            template: &template.name,
            task_id,
            correlation_id: &correlation_id,
        };
        let task_model = task::Model {
            id: task_id,
            namespace: template.namespace.clone(),
            template_id: template_record.id,
            template_name: template.name.clone(),
            template_version: template.version.to_string(),
            state: TaskState::Pending.as_str().to_owned(),
            context: request.context.clone(),
            initiator: request.initiator.clone(),
            source_system: request.source_system.clone(),
            reason: request.reason.clone(),
            tags: json!(tags),
            idempotency_key: request.idempotency_key.clone(),
            correlation_id: Some(correlation_id.clone()),
            version: 1,
            created_at: now,
            updated_at: now,
            completed_at: None,
            traceparent: new.trace_parent.clone(),
            priority: i32::from(priority.level()),
            concurrency_limit: policy.map(|policy| policy.limit as i32),
            slot: policy.map(|_| crate::concurrency::WAITING.to_owned()),
            concurrency_key,
            deadline_ms: template
                .timeout
                .map(|seconds| now.timestamp_millis() + seconds_to_ms(seconds)),
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
                timeout_ms: Set(step.timeout.map(seconds_to_ms)),
                start_timeout_ms: Set(step.start_timeout.map(seconds_to_ms)),
                rate_limit: Set(rate_buckets.get(position).cloned().flatten()),
                rate_limit_tokens: Set(step.rate_limit.as_ref().map(|limit| limit.limit as i32)),
                rate_limit_per_ms: Set(step.rate_limit.as_ref().map(RateLimit::per_ms)),
                concurrency_bucket: Set(step_buckets.get(position).cloned().flatten()),
                concurrency_limit: Set(step.concurrency.as_ref().map(|limit| limit.limit as i32)),
                pending_parents: Set(step.depends_on.len() as i32 + gate),
                results: Set(None),
                last_error: Set(None),
                next_attempt_ms: Set(None),
                attempt_started_ms: Set(None),
                deadline_ms: Set(None),
                lease_token: Set(None),
                lease_holder: Set(None),
                lease_expires_ms: Set(None),
                version: Set(1),
                // Roots are claimable now (a waiting task's at its admission); a child's time is
                // set when its last parent is done.
                ready_since_ms: Set(
                    (step.depends_on.is_empty() && gate == 0).then(|| now.timestamp_millis())
                ),
                priority: Set(i32::from(step.priority.unwrap_or(priority).level())),
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
        if policy.is_none() {
            events.push(crate::events::steps_ready(subject, &roots, now));
        }
        TaskRows {
            task: task_model,
            tags: task_tags,
            steps,
            edges,
            task_transition,
            step_transitions,
            events,
            strategy: policy.map(|policy| policy.strategy),
        }
    }

    /// Writes the rows of many new tasks in one transaction, one multi-row statement per
    /// table (per chunk), whatever their number.
    pub(crate) async fn insert_task_rows(&self, tasks: Vec<TaskRows>) -> Result<Vec<TaskRecord>> {
        let mut models = Vec::with_capacity(tasks.len());
        let (mut tags, mut steps, mut edges) = (Vec::new(), Vec::new(), Vec::new());
        let (mut task_transitions, mut step_transitions, mut events) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut keyed = Vec::new();
        for rows in tasks {
            if let Some(strategy) = rows.strategy {
                keyed.push((rows.task.clone(), strategy));
            }
            models.push(rows.task);
            tags.extend(rows.tags);
            steps.extend(rows.steps);
            edges.extend(rows.edges);
            task_transitions.push(rows.task_transition);
            step_transitions.extend(rows.step_transitions);
            events.extend(rows.events);
        }
        let txn = self.begin_write().await?;
        // Before the sequencer's lock (taken with the events): see `concurrency`.
        self.lock_concurrency_keys(
            &txn,
            keyed
                .iter()
                .filter_map(|(task, _)| task.concurrency_key.as_deref()),
        )
        .await?;
        let mut new_rows = crate::events::Rows::new();
        new_rows
            .add(models.iter().cloned().map(task::ActiveModel::from))
            .add(tags)
            .add(steps)
            .add(edges)
            .add(task_transitions)
            .add(step_transitions);
        if keyed.is_empty() {
            new_rows.add(events);
        } else {
            // The tasks first, then their admission, and the events last: nothing waits for
            // another writer's rows while this one holds the sequencer's lock.
            self.insert_rows(&txn, new_rows).await?;
            new_rows = crate::events::Rows::new();
            let settled = self
                .settle_new_tasks(&txn, keyed, self.now(), &mut new_rows, &mut events)
                .await?;
            new_rows.add(events);
            for model in &mut models {
                if let Some(now) = settled.get(&model.id) {
                    model.clone_from(now);
                }
            }
        }
        self.insert_rows(&txn, new_rows).await?;
        self.commit_events(txn).await?;
        models.into_iter().map(TaskRecord::try_from).collect()
    }

    /// Cancels a task and every unfinished step of it (their leases are dropped), atomically.
    /// A task already complete, cancelled or resolved is a conflict. A slot of its concurrency
    /// key goes to the next waiting task in the same transaction.
    pub async fn cancel_task(&self, id: Uuid, reason: Option<String>) -> Result<TaskRecord> {
        self.writing(async {
            let now = self.now();
            let txn = self.begin_write().await?;
            lock_steps_parents_first(&txn, id).await?;
            let current = Self::task_row(&txn, id).await?;
            let mut rows = crate::events::Rows::new();
            let mut events = Vec::new();
            let mut cancelled = self
                .cancel_rows(
                    &txn,
                    &current,
                    reason.as_deref(),
                    now,
                    &mut rows,
                    &mut events,
                )
                .await?;
            self.free_slots(&txn, std::slice::from_ref(&cancelled), now, &mut events)
                .await?;
            crate::concurrency::mark_freed(&mut cancelled);
            rows.add(events);
            self.insert_rows(&txn, rows).await?;
            self.commit_events(txn).await?;
            cancelled.try_into()
        })
        .await
    }

    /// Cancels `current` and its unfinished steps inside `txn`: their transitions go to
    /// `rows`, their events to `events`. Returns the task as it is now.
    pub(crate) async fn cancel_rows(
        &self,
        txn: &WriteTxn,
        current: &task::Model,
        reason: Option<&str>,
        now: DateTime<Utc>,
        rows: &mut crate::events::Rows,
        events: &mut Vec<event::ActiveModel>,
    ) -> Result<task::Model> {
        let id = current.id;
        let from = TaskState::parse(&current.state)?;
        from.transition_to(TaskState::Cancelled)?;
        let change = TaskMove {
            ids: &[id],
            from: &[from],
            to: TaskState::Cancelled,
            version: Some(current.version),
            completed_at: CompletedAt::Stamp,
        };
        let Some(updated) = move_tasks(txn, change, now).await?.pop() else {
            return Err(Error::Conflict(format!(
                "task {id} changed while it was being cancelled; read it again and retry"
            )));
        };
        let subjects = crate::progress::Subjects::of_tasks(std::slice::from_ref(current));
        let subject = subjects.subject(id);
        let reason_value = reason.map(Value::from);
        let (transition, event) = task_rows(
            subject,
            Some(from),
            TaskState::Cancelled,
            updated.version,
            metadata(&[("reason", reason_value.clone())]),
            now,
        );
        events.push(event);
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
            let cancelled = move_steps(txn, change, now).await?;
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
        rows.add([transition]).add(transitions);
        Ok(updated)
    }
}

/// PostgreSQL: locks task `id`'s unfinished steps, parents before children — the order a
/// completion takes rows in (its step, then its children, then the task) — so a cancellation,
/// which takes the task row after them, never waits in a cycle with a completion (the
/// database would abort one of the two as a deadlock). Steps with no edge go first. SQLite's
/// single writer needs none.
async fn lock_steps_parents_first(txn: &WriteTxn, id: Uuid) -> Result<()> {
    let backend = txn.get_database_backend();
    if backend != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    let edges = workflow_step_edge::Entity::find()
        .filter(workflow_step_edge::Column::TaskId.eq(id))
        .all(txn)
        .await?;
    let mut ids: Vec<Uuid> = edges
        .iter()
        .flat_map(|edge| [edge.parent_step_id, edge.child_step_id])
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let dag = tasker_domain::graph::Dag::from_keys(
        &ids,
        edges
            .iter()
            .map(|edge| (edge.parent_step_id, edge.child_step_id)),
    );
    let order = dag
        .topological_order()
        .unwrap_or_else(|| (0..ids.len()).collect());
    let mut lock = Sql::new(backend);
    lock.push("SELECT id FROM workflow_steps WHERE task_id = ")
        .bind(id)
        .push(" AND state IN ('pending', 'in_progress', 'error')");
    if !order.is_empty() {
        lock.push(" ORDER BY CASE id");
        for (rank, index) in order.iter().enumerate() {
            lock.push(" WHEN ")
                .bind(ids[*index])
                .push(" THEN ")
                .bind(i64::try_from(rank).unwrap_or(i64::MAX));
        }
        lock.push(" ELSE -1 END");
    }
    lock.push(" FOR UPDATE");
    txn.execute_raw(lock.build()).await?;
    Ok(())
}
