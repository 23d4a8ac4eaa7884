//! What the store hands out: plain records with typed states, independent of table shapes.

use crate::Result;
use crate::entities::{
    event, namespace, step_transition, task, task_template, task_transition, workflow_step,
    workflow_step_edge,
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tasker_domain::{Backoff, Priority, StateMachine, StepState, TaskState, TaskTemplate};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceRecord {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// One registered version of a template.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateRecord {
    pub id: Uuid,
    pub template: TaskTemplate,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub id: Uuid,
    pub namespace: String,
    pub template_id: Uuid,
    pub template_name: String,
    pub template_version: String,
    pub state: TaskState,
    pub context: Value,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    /// Carried by every event about the task; the task's id unless the creator gave one.
    pub correlation_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The W3C trace context the task's work joins, when traces were exported at its creation.
    pub trace_parent: Option<String>,
    pub priority: Priority,
    /// Its concurrency key and slot, when its template limits concurrency.
    pub concurrency: Option<TaskConcurrency>,
    /// When it times out, if its template has a timeout.
    pub deadline: Option<DateTime<Utc>>,
}

/// A task's place under its template's concurrency rule.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskConcurrency {
    /// `namespace/template`, then `:` and the key rendered from the context, if any.
    pub key: String,
    pub limit: u32,
    pub slot: Slot,
}

/// Where a task stands with the slots of its concurrency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Created while its key was at its limit: nothing of it runs yet.
    Waiting,
    /// Admitted: it counts against the limit until it ends.
    Held,
    /// Ended: it no longer counts.
    Freed,
}

impl TaskRecord {
    /// Whether it waits for a slot of its concurrency key.
    pub fn waits_for_slot(&self) -> bool {
        self.concurrency
            .as_ref()
            .is_some_and(|concurrency| concurrency.slot == Slot::Waiting)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub id: Uuid,
    pub task_id: Uuid,
    /// The step's index in its template's declaration order.
    pub position: usize,
    pub name: String,
    pub handler: String,
    pub description: Option<String>,
    pub config: Value,
    pub state: StepState,
    pub attempts: u32,
    pub max_attempts: u32,
    pub retryable: bool,
    pub skippable: bool,
    pub backoff: Backoff,
    pub timeout_seconds: Option<f64>,
    pub results: Option<Value>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the current (or last) attempt started.
    pub attempt_started_at: Option<DateTime<Utc>>,
    pub lease_holder: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When it last became claimable (or will, at its retry time).
    pub ready_since: Option<DateTime<Utc>>,
    /// Claims take steps of higher priority first, with aging (see [`Priority`]).
    pub priority: Priority,
    /// How long it may wait, claimable, for its first attempt.
    pub start_timeout_seconds: Option<f64>,
    /// The rate limit its attempts start under.
    pub rate_limit: Option<StepRateLimit>,
    /// The concurrency limit its attempts run under.
    pub concurrency: Option<StepConcurrencyLimit>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// The bucket a rate-limited step draws from, and its rule.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRateLimit {
    /// `namespace/name`, or `namespace/name:key` for a keyed limit.
    pub bucket: String,
    /// Starts allowed per window.
    pub limit: u32,
    pub per_seconds: f64,
}

/// The bucket a concurrency-limited step's attempts count in, and how many may run at once.
#[derive(Debug, Clone, PartialEq)]
pub struct StepConcurrencyLimit {
    /// `namespace/template/step`, or `namespace/name` for a shared limit, then `:key`.
    pub bucket: String,
    pub limit: u32,
}

/// "child depends on parent".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeRecord {
    pub task_id: Uuid,
    pub parent_step_id: Uuid,
    pub child_step_id: Uuid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskTransitionRecord {
    pub id: Uuid,
    pub task_id: Uuid,
    pub from_state: Option<TaskState>,
    pub to_state: TaskState,
    pub sort_key: i32,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepTransitionRecord {
    pub id: Uuid,
    pub step_id: Uuid,
    pub task_id: Uuid,
    pub from_state: Option<StepState>,
    pub to_state: StepState,
    pub sort_key: i32,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

/// One entry of the event log; `position` orders the whole log.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub position: i64,
    pub id: Uuid,
    pub name: String,
    pub namespace: Option<String>,
    pub task_id: Option<Uuid>,
    pub step_id: Option<Uuid>,
    pub payload: Value,
    pub occurred_at: DateTime<Utc>,
    /// PostgreSQL: the commit-ordered number readers follow.
    pub sequence: Option<i64>,
}

impl From<event::Model> for EventRecord {
    fn from(model: event::Model) -> Self {
        let payload = crate::events::with_subject_fields(
            model.payload,
            model.namespace.as_deref(),
            model.task_id,
            model.step_id,
        );
        Self {
            position: model.position,
            id: model.id,
            name: model.name,
            namespace: model.namespace,
            task_id: model.task_id,
            step_id: model.step_id,
            payload,
            occurred_at: model.occurred_at,
            sequence: model.sequence,
        }
    }
}

impl From<namespace::Model> for NamespaceRecord {
    fn from(model: namespace::Model) -> Self {
        Self {
            id: model.id,
            name: model.name,
            created_at: model.created_at,
        }
    }
}

impl TryFrom<task_template::Model> for TemplateRecord {
    type Error = crate::Error;

    fn try_from(model: task_template::Model) -> Result<Self> {
        Ok(Self {
            id: model.id,
            template: TaskTemplate::from_normalized(model.definition)?,
            created_at: model.created_at,
            updated_at: model.updated_at,
        })
    }
}

impl TryFrom<task::Model> for TaskRecord {
    type Error = crate::Error;

    fn try_from(model: task::Model) -> Result<Self> {
        Ok(Self {
            id: model.id,
            namespace: model.namespace,
            template_id: model.template_id,
            template_name: model.template_name,
            template_version: model.template_version,
            state: TaskState::parse(&model.state)?,
            context: model.context,
            initiator: model.initiator,
            source_system: model.source_system,
            reason: model.reason,
            tags: serde_json::from_value(model.tags).unwrap_or_default(),
            idempotency_key: model.idempotency_key,
            correlation_id: model.correlation_id.unwrap_or_else(|| model.id.to_string()),
            created_at: model.created_at,
            updated_at: model.updated_at,
            completed_at: model.completed_at,
            trace_parent: model.traceparent,
            priority: stored_priority(model.priority),
            deadline: model.deadline_ms.and_then(from_millis),
            concurrency: model.concurrency_key.map(|key| TaskConcurrency {
                key,
                limit: model
                    .concurrency_limit
                    .and_then(|limit| u32::try_from(limit).ok())
                    .unwrap_or_default(),
                slot: match model.slot.as_deref() {
                    Some(crate::concurrency::WAITING) => Slot::Waiting,
                    Some(crate::concurrency::HELD) => Slot::Held,
                    _ => Slot::Freed,
                },
            }),
        })
    }
}

impl TryFrom<workflow_step::Model> for StepRecord {
    type Error = crate::Error;

    fn try_from(model: workflow_step::Model) -> Result<Self> {
        Ok(Self {
            id: model.id,
            task_id: model.task_id,
            position: usize::try_from(model.position).unwrap_or_default(),
            name: model.name,
            handler: model.handler,
            description: model.description,
            config: model.config,
            state: StepState::parse(&model.state)?,
            attempts: u32::try_from(model.attempts).unwrap_or_default(),
            max_attempts: u32::try_from(model.max_attempts).unwrap_or_default(),
            retryable: model.retryable,
            skippable: model.skippable,
            backoff: serde_json::from_value(model.backoff).unwrap_or_default(),
            timeout_seconds: model.timeout_ms.map(|ms| ms as f64 / 1000.0),
            results: model.results,
            last_error: model.last_error,
            next_attempt_at: model.next_attempt_ms.and_then(from_millis),
            attempt_started_at: model.attempt_started_ms.and_then(from_millis),
            lease_holder: model.lease_holder,
            lease_expires_at: model.lease_expires_ms.and_then(from_millis),
            ready_since: model.ready_since_ms.and_then(from_millis),
            priority: stored_priority(model.priority),
            start_timeout_seconds: model.start_timeout_ms.map(|ms| ms as f64 / 1000.0),
            rate_limit: match (
                model.rate_limit,
                model.rate_limit_tokens,
                model.rate_limit_per_ms,
            ) {
                (Some(bucket), Some(limit), Some(per_ms)) => Some(StepRateLimit {
                    bucket,
                    limit: u32::try_from(limit).unwrap_or(0),
                    per_seconds: per_ms as f64 / 1000.0,
                }),
                _ => None,
            },
            concurrency: match (model.concurrency_bucket, model.concurrency_limit) {
                (Some(bucket), Some(limit)) => Some(StepConcurrencyLimit {
                    bucket,
                    limit: u32::try_from(limit).unwrap_or(0),
                }),
                _ => None,
            },
            created_at: model.created_at,
            updated_at: model.updated_at,
            completed_at: model.completed_at,
        })
    }
}

/// A stored priority; the default if the row holds something no version wrote.
fn stored_priority(level: i32) -> Priority {
    Priority::new(i64::from(level)).unwrap_or_default()
}

impl From<workflow_step_edge::Model> for EdgeRecord {
    fn from(model: workflow_step_edge::Model) -> Self {
        Self {
            task_id: model.task_id,
            parent_step_id: model.parent_step_id,
            child_step_id: model.child_step_id,
        }
    }
}

impl TryFrom<task_transition::Model> for TaskTransitionRecord {
    type Error = crate::Error;

    fn try_from(model: task_transition::Model) -> Result<Self> {
        Ok(Self {
            id: model.id,
            task_id: model.task_id,
            from_state: model
                .from_state
                .as_deref()
                .map(TaskState::parse)
                .transpose()?,
            to_state: TaskState::parse(&model.to_state)?,
            sort_key: model.sort_key,
            metadata: model.metadata,
            created_at: model.created_at,
        })
    }
}

impl TryFrom<step_transition::Model> for StepTransitionRecord {
    type Error = crate::Error;

    fn try_from(model: step_transition::Model) -> Result<Self> {
        Ok(Self {
            id: model.id,
            step_id: model.step_id,
            task_id: model.task_id,
            from_state: model
                .from_state
                .as_deref()
                .map(StepState::parse)
                .transpose()?,
            to_state: StepState::parse(&model.to_state)?,
            sort_key: model.sort_key,
            metadata: model.metadata,
            created_at: model.created_at,
        })
    }
}

/// Engine timing columns are epoch milliseconds.
pub(crate) fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// Converts a list of models, failing on the first unreadable one.
pub(crate) fn convert_all<M, R>(models: Vec<M>) -> Result<Vec<R>>
where
    R: TryFrom<M, Error = crate::Error>,
{
    models.into_iter().map(R::try_from).collect()
}
