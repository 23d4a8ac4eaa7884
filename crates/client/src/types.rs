//! The API's objects as this client reads them. Fields a query did not select are empty
//! (`#[serde(default)]`), and states this version does not know read as `Unknown`, so a newer
//! server does not break an older client.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Pending,
    InProgress,
    Complete,
    Error,
    Cancelled,
    ResolvedManually,
    #[serde(other)]
    Unknown,
}

impl TaskState {
    /// Nothing more happens unless a person acts: finished, or failed.
    pub fn has_ended(self) -> bool {
        matches!(
            self,
            TaskState::Complete
                | TaskState::Error
                | TaskState::Cancelled
                | TaskState::ResolvedManually
        )
    }

    /// The schema's spelling (`IN_PROGRESS`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::InProgress => "IN_PROGRESS",
            TaskState::Complete => "COMPLETE",
            TaskState::Error => "ERROR",
            TaskState::Cancelled => "CANCELLED",
            TaskState::ResolvedManually => "RESOLVED_MANUALLY",
            TaskState::Unknown => "UNKNOWN",
        }
    }
}

/// Where a step is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepState {
    Pending,
    InProgress,
    Complete,
    Error,
    Cancelled,
    ResolvedManually,
    Skipped,
    #[serde(other)]
    Unknown,
}

impl StepState {
    /// Its dependents may run (complete, skipped or resolved by hand).
    pub fn is_done(self) -> bool {
        matches!(
            self,
            StepState::Complete | StepState::Skipped | StepState::ResolvedManually
        )
    }

    /// The schema's spelling (`IN_PROGRESS`).
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "PENDING",
            StepState::InProgress => "IN_PROGRESS",
            StepState::Complete => "COMPLETE",
            StepState::Error => "ERROR",
            StepState::Cancelled => "CANCELLED",
            StepState::ResolvedManually => "RESOLVED_MANUALLY",
            StepState::Skipped => "SKIPPED",
            StepState::Unknown => "UNKNOWN",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for StepState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task; `steps` and `edges` are filled by the queries that ask for them
/// ([`crate::Client::task`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: String,
    pub namespace: String,
    pub template_name: String,
    pub template_version: String,
    pub state: TaskState,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// 1 (low) to 4 (urgent).
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub context: Option<Value>,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub completed_at: Option<DateTime<Utc>>,
    /// The share of steps complete, skipped or resolved, 0 to 100.
    #[serde(default)]
    pub completion_percentage: f64,
    #[serde(default)]
    pub step_counts: Option<StepCounts>,
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub edges: Vec<Edge>,
}

impl Task {
    /// `namespace/name@version`
    pub fn template_key(&self) -> String {
        format!(
            "{}/{}@{}",
            self.namespace, self.template_name, self.template_version
        )
    }
}

/// Steps per state.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepCounts {
    pub total: u32,
    pub pending: u32,
    pub in_progress: u32,
    pub complete: u32,
    pub error: u32,
    pub cancelled: u32,
    pub resolved_manually: u32,
    pub skipped: u32,
}

impl StepCounts {
    /// Complete, skipped or resolved by hand.
    pub fn done(&self) -> u32 {
        self.complete + self.skipped + self.resolved_manually
    }
}

/// One step of a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub id: String,
    pub name: String,
    pub handler: String,
    pub state: StepState,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub max_attempts: u32,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub completed_at: Option<DateTime<Utc>>,
    /// How long its current attempt has run, or its last one took.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub results: Option<Value>,
}

/// The child step depends on the parent step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub parent_id: String,
    pub child_id: String,
}

/// An entry of the event log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: String,
    /// Pass it as `after` to read or follow what comes next.
    pub cursor: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub task_id: Option<String>,
    #[serde(default)]
    pub step_id: Option<String>,
    pub payload: Value,
    pub occurred_at: DateTime<Utc>,
}

/// A page of the event log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Where the page ends: the `after` of the next page (`None` on an empty page).
    pub end_cursor: Option<String>,
    pub has_next_page: bool,
}

/// A task after something about it changed (the `taskUpdated` subscription).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskUpdate {
    /// Resume after it with no gap and no duplicate.
    pub cursor: String,
    pub task: Task,
    #[serde(default)]
    pub changed_steps: Vec<Step>,
    #[serde(default)]
    pub events: Vec<Event>,
    /// The task has ended and the stream completes after this update.
    pub last: bool,
}

/// A registered template version.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// `namespace/name@version`
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub version: String,
}

/// What registering a template did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RegistrationResult {
    Created,
    Unchanged,
    Replaced,
    #[serde(other)]
    Unknown,
}

impl RegistrationResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationResult::Created => "CREATED",
            RegistrationResult::Unchanged => "UNCHANGED",
            RegistrationResult::Replaced => "REPLACED",
            RegistrationResult::Unknown => "UNKNOWN",
        }
    }
}

/// The answer to `registerTemplate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub template: Template,
    pub result: RegistrationResult,
}

/// A task to start.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewTask {
    pub namespace: String,
    /// The template's name.
    pub template: String,
    /// The newest version when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// 1 (low) to 4 (urgent); the template's priority when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

impl NewTask {
    /// A task of the newest version of `namespace/template` with no context.
    pub fn new(namespace: impl Into<String>, template: impl Into<String>) -> NewTask {
        NewTask {
            namespace: namespace.into(),
            template: template.into(),
            ..NewTask::default()
        }
    }
}

/// The answer to `createTask`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    pub task: Task,
    /// False when an earlier request with the same idempotency key created it.
    pub created: bool,
}

/// Which tasks to list; every given field must match.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The template's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<TaskState>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A page of tasks, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    pub total_count: u64,
    /// The `after` of the next page, when there is one.
    pub next_cursor: Option<String>,
}

/// Which events to read or follow; every given field must match.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventFilter {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// A step leased to a worker, with everything its handler needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// Pass it back to heartbeat, complete, fail or release the attempt.
    pub lease_token: String,
    pub lease_expires_at: DateTime<Utc>,
    pub step_id: String,
    pub task_id: String,
    /// The step's name.
    pub name: String,
    pub handler: String,
    /// The step's `config` from its template.
    pub config: Value,
    /// This attempt's number, from 1.
    pub attempt: u32,
    pub max_attempts: u32,
    pub namespace: String,
    /// The template's name.
    pub template: String,
    /// The task's context.
    pub context: Value,
    /// The results of the steps this one depends on, by step name.
    pub parent_results: Value,
    /// The task's correlation id, for the worker's logs.
    pub correlation_id: String,
    /// W3C trace context in the task's trace, when the server exports traces: a worker's
    /// spans started from it join that trace.
    pub traceparent: Option<String>,
}

/// Whether a heartbeat kept a lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseStatus {
    pub lease_token: String,
    /// False when the lease was lost: stop working on the step.
    pub alive: bool,
}
