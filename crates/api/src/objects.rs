//! The GraphQL object types. They wrap store records (never table rows) and reach nested
//! data only through the result set they were returned in (see `batch.rs`).

use crate::batch::TaskSet;
use crate::enums::{
    CatchUpValue, ConcurrencyStrategyValue, ExecutionStatusValue, StepStateValue, TaskStateValue,
};
use crate::error::{ApiError, GqlResultExt};
use crate::graph::{StepCounts, TaskGraph, step_dag};
use crate::ids::id;
use async_graphql::{ID, Json, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::sync::Arc;
use tasker_domain::TaskTemplate;
use tasker_domain::execution::{StepProgress, completion_percentage, execution_status};
use tasker_store::{
    EdgeRecord, EventRecord, NamespaceRecord, StepRecord, StepTransitionRecord, TaskRecord,
    TaskTransitionRecord, TemplateRecord,
};
use tokio::sync::OnceCell;
use uuid::Uuid;

/// A group of templates and their tasks; the unit of ownership.
pub struct Namespace {
    record: NamespaceRecord,
    /// Every template, read once for all the namespaces of one response.
    templates: Arc<OnceCell<Vec<TemplateRecord>>>,
    store: tasker_store::Store,
}

impl Namespace {
    pub fn all(store: &tasker_store::Store, records: Vec<NamespaceRecord>) -> Vec<Namespace> {
        let templates = Arc::new(OnceCell::new());
        records
            .into_iter()
            .map(|record| Namespace {
                record,
                templates: templates.clone(),
                store: store.clone(),
            })
            .collect()
    }
}

#[Object]
impl Namespace {
    async fn id(&self) -> ID {
        id(self.record.id)
    }

    async fn name(&self) -> &str {
        &self.record.name
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.record.created_at
    }

    /// Every registered template version in this namespace, newest version first per name.
    async fn templates(&self) -> Result<Vec<Template>> {
        let all = self
            .templates
            .get_or_try_init(|| self.store.templates(None, None))
            .await
            .gql()?;
        Ok(all
            .iter()
            .filter(|record| record.template.namespace == self.record.name)
            .cloned()
            .map(Template)
            .collect())
    }
}

/// One registered version of a task template: `namespace/name@version`.
pub struct Template(pub TemplateRecord);

#[Object]
impl Template {
    async fn id(&self) -> ID {
        id(self.0.id)
    }

    /// `namespace/name@version`.
    async fn key(&self) -> String {
        self.0.template.key()
    }

    async fn namespace(&self) -> &str {
        &self.0.template.namespace
    }

    async fn name(&self) -> &str {
        &self.0.template.name
    }

    async fn version(&self) -> String {
        self.0.template.version.to_string()
    }

    async fn description(&self) -> Option<&str> {
        self.0.template.description.as_deref()
    }

    /// The JSON Schema a task's context must match, if any.
    async fn context_schema(&self) -> Option<Json<Value>> {
        self.0.template.context_schema.clone().map(Json)
    }

    /// The normalized definition: defaults filled in, durations in seconds.
    async fn definition(&self) -> Json<Value> {
        Json(self.0.template.to_normalized())
    }

    /// The priority of its tasks when their creator gives none: 1 (low) to 4 (urgent); 2
    /// when the template does not say.
    async fn priority(&self) -> i32 {
        i32::from(self.0.template.priority.unwrap_or_default().level())
    }

    /// Seconds a task may take from its creation to its end before it is cancelled
    /// (`task.timed_out`), if the template sets a timeout.
    async fn timeout_seconds(&self) -> Option<f64> {
        self.0.template.timeout
    }

    /// How many of its tasks with the same key may run at once, if it limits them.
    async fn concurrency(&self) -> Option<ConcurrencyRule> {
        self.0
            .template
            .concurrency
            .as_ref()
            .map(|policy| ConcurrencyRule {
                key: policy.key.as_ref().map(|key| key.as_str().to_owned()),
                limit: policy.limit,
                strategy: policy.strategy.into(),
            })
    }

    /// The steps in declaration order, each with its dependency level.
    async fn steps(&self) -> Vec<StepTemplate> {
        step_templates(&self.0.template)
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
}

/// A schedule: a cron expression in a time zone (or one time) that starts tasks of a template
/// with a context.
pub struct Schedule {
    record: tasker_store::ScheduleRecord,
    /// When it was read: where its upcoming fire times count from.
    now: DateTime<Utc>,
}

impl Schedule {
    pub fn new(record: tasker_store::ScheduleRecord, now: DateTime<Utc>) -> Schedule {
        Schedule { record, now }
    }
}

/// The most fire times one `nextFireTimes` answers.
const MAX_FIRE_TIMES: usize = 100;

#[Object]
impl Schedule {
    async fn id(&self) -> ID {
        id(self.record.id)
    }

    async fn namespace(&self) -> &str {
        &self.record.namespace
    }

    /// Unique in its namespace.
    async fn name(&self) -> &str {
        &self.record.name
    }

    /// The template its tasks start from (its newest version at each tick unless `version`).
    async fn template(&self) -> &str {
        &self.record.template
    }

    async fn version(&self) -> Option<&str> {
        self.record.version.as_deref()
    }

    async fn context(&self) -> Json<Value> {
        Json(self.record.context.clone())
    }

    async fn priority(&self) -> Option<i32> {
        self.record
            .priority
            .map(|priority| i32::from(priority.level()))
    }

    /// Five fields, minute to weekday; none for a one-time schedule.
    async fn cron(&self) -> Option<&str> {
        self.record.cron.as_deref()
    }

    /// The IANA time zone the cron expression reads in.
    async fn timezone(&self) -> &str {
        &self.record.timezone
    }

    /// A one-time schedule's time.
    async fn run_at(&self) -> Option<DateTime<Utc>> {
        self.record.run_at
    }

    async fn catch_up(&self) -> CatchUpValue {
        self.record.catch_up.into()
    }

    async fn paused(&self) -> bool {
        self.record.paused
    }

    /// The next tick to fire; null once a one-time schedule fired.
    async fn next_fire_at(&self) -> Option<DateTime<Utc>> {
        self.record.next_fire_at
    }

    /// Its next `count` fire times (at most 100), from now.
    async fn next_fire_times(&self, #[graphql(default = 5)] count: usize) -> Vec<DateTime<Utc>> {
        self.record.upcoming(self.now, count.min(MAX_FIRE_TIMES))
    }

    async fn last_fired_at(&self) -> Option<DateTime<Utc>> {
        self.record.last_fired_at
    }

    /// Ticks that started a task so far.
    async fn fired_count(&self) -> u64 {
        self.record.fired_count
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.record.created_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.record.updated_at
    }
}

/// A template's concurrency rule: at most `limit` of its tasks with the same key hold a slot.
#[derive(SimpleObject)]
pub struct ConcurrencyRule {
    /// The key expression (`{{ context.customer_id }}`); none: all the template's tasks share
    /// the limit.
    key: Option<String>,
    limit: u32,
    strategy: ConcurrencyStrategyValue,
}

/// A step as the template defines it.
#[derive(SimpleObject)]
pub struct StepTemplate {
    name: String,
    handler: String,
    description: Option<String>,
    config: Json<Value>,
    depends_on: Vec<String>,
    /// Total executions allowed, the first one included.
    max_attempts: u32,
    retryable: bool,
    backoff: BackoffPolicy,
    timeout_seconds: Option<f64>,
    skippable: bool,
    /// Its own priority (1 to 4), when it declares one; else its task's.
    priority: Option<i32>,
    /// Seconds it may wait, claimable, for its first attempt before it fails (or is skipped).
    start_timeout_seconds: Option<f64>,
    /// The rate limit each of its attempts starts under.
    rate_limit: Option<RateLimitRule>,
    /// At most so many attempts of its bucket run at once.
    concurrency: Option<StepConcurrencyRule>,
    /// 0 for steps with no dependencies, else one more than the deepest dependency.
    level: usize,
}

/// At most `limit` attempts of the steps that name this limit start in any window of
/// `perSeconds`; with a `key`, one such limit per rendered key.
#[derive(SimpleObject)]
pub struct RateLimitRule {
    /// Shared by every step of the namespace that names it.
    name: String,
    limit: u32,
    per_seconds: f64,
    /// Tells buckets apart, such as `{{ context.account_id }}`.
    key: Option<String>,
}

/// The concurrency limit a step's attempts run under.
#[derive(SimpleObject)]
pub struct StepConcurrencyLimit {
    /// `namespace/template/step`, or `namespace/name` for a limit shared by name, then `:key`
    /// for a keyed one: steps with the same bucket share its room.
    bucket: String,
    limit: u32,
    /// Attempts of the bucket running now, while this step waits to run.
    running: Option<u64>,
}

/// A step's own concurrency limit: at most `limit` attempts of its bucket run at once.
#[derive(SimpleObject)]
pub struct StepConcurrencyRule {
    /// Shared by every step of the namespace that names it; without one, the step's own.
    name: Option<String>,
    limit: u32,
    /// Tells buckets apart, such as `{{ context.account_id }}`.
    key: Option<String>,
}

/// The rate limit a step's attempts start under, and whether it is spent now.
#[derive(SimpleObject)]
pub struct StepRateLimit {
    /// `namespace/name`, or `namespace/name:key` for a keyed limit: steps with the same
    /// bucket share its starts.
    bucket: String,
    limit: u32,
    per_seconds: f64,
    /// While a claim has found the bucket spent: when its next start frees. Empty when an
    /// attempt may start now.
    spent_until: Option<DateTime<Utc>>,
}

/// `base × factor^(attempt-1)` seconds, capped at `max`, ± `jitter` as a fraction.
#[derive(SimpleObject)]
pub struct BackoffPolicy {
    base_seconds: f64,
    factor: f64,
    max_seconds: f64,
    jitter: f64,
}

impl From<&tasker_domain::Backoff> for BackoffPolicy {
    fn from(backoff: &tasker_domain::Backoff) -> Self {
        Self {
            base_seconds: backoff.base,
            factor: backoff.factor,
            max_seconds: backoff.max,
            jitter: backoff.jitter,
        }
    }
}

fn step_templates(template: &TaskTemplate) -> Vec<StepTemplate> {
    let levels = template.dag().levels().unwrap_or_default();
    template
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| StepTemplate {
            name: step.name.clone(),
            handler: step.handler.clone(),
            description: step.description.clone(),
            config: Json(step.config.clone()),
            depends_on: step.depends_on.clone(),
            max_attempts: step.retry.max_attempts,
            retryable: step.retry.retryable,
            backoff: BackoffPolicy::from(&step.retry.backoff),
            timeout_seconds: step.timeout,
            skippable: step.skippable,
            priority: step.priority.map(|priority| i32::from(priority.level())),
            start_timeout_seconds: step.start_timeout,
            rate_limit: step.rate_limit.as_ref().map(|limit| RateLimitRule {
                name: limit.name.clone(),
                limit: limit.limit,
                per_seconds: limit.per,
                key: limit.key.as_ref().map(|key| key.as_str().to_owned()),
            }),
            concurrency: step.concurrency.as_ref().map(|limit| StepConcurrencyRule {
                name: limit.name.clone(),
                limit: limit.limit,
                key: limit.key.as_ref().map(|key| key.as_str().to_owned()),
            }),
            level: levels.get(i).copied().unwrap_or_default(),
        })
        .collect()
}

/// One run of a template.
#[derive(Clone)]
pub struct Task {
    record: TaskRecord,
    set: Arc<TaskSet>,
}

impl Task {
    /// The tasks of a result set, each able to batch-load its nested data with the others.
    pub fn all_of(set: &Arc<TaskSet>) -> Vec<Task> {
        set.tasks()
            .iter()
            .map(|record| Task {
                record: record.clone(),
                set: set.clone(),
            })
            .collect()
    }

    /// Its id, for matching it with what it was read for.
    pub(crate) fn task_id(&self) -> Uuid {
        self.record.id
    }

    /// A task returned on its own.
    pub fn single(store: tasker_store::Store, record: TaskRecord) -> Task {
        let set = TaskSet::new(store, vec![record.clone()]);
        Task { record, set }
    }

    /// A task and one of its steps returned together, as one result set: their nested
    /// fields share their loads.
    pub fn with_step(
        store: tasker_store::Store,
        record: TaskRecord,
        step: StepRecord,
    ) -> (Task, Step) {
        let task = Task::single(store, record);
        let step = Step::in_set(&step, &task.set);
        (task, step)
    }

    /// A task and some of its steps returned together (see [`Task::with_step`]).
    pub fn with_steps(
        store: tasker_store::Store,
        record: TaskRecord,
        steps: &[StepRecord],
    ) -> (Task, Vec<Step>) {
        let task = Task::single(store, record);
        let steps = steps
            .iter()
            .map(|step| Step::in_set(step, &task.set))
            .collect();
        (task, steps)
    }
}

#[Object]
impl Task {
    async fn id(&self) -> ID {
        id(self.record.id)
    }

    async fn namespace(&self) -> &str {
        &self.record.namespace
    }

    /// The template version this task runs.
    async fn template(&self) -> Result<Template> {
        let record = self.set.template(self.record.id).await.gql()?;
        Ok(Template(TemplateRecord::clone(&record)))
    }

    async fn template_name(&self) -> &str {
        &self.record.template_name
    }

    async fn template_version(&self) -> &str {
        &self.record.template_version
    }

    async fn state(&self) -> TaskStateValue {
        self.record.state.into()
    }

    async fn context(&self) -> Json<Value> {
        Json(self.record.context.clone())
    }

    async fn initiator(&self) -> Option<&str> {
        self.record.initiator.as_deref()
    }

    async fn source_system(&self) -> Option<&str> {
        self.record.source_system.as_deref()
    }

    async fn reason(&self) -> Option<&str> {
        self.record.reason.as_deref()
    }

    async fn tags(&self) -> &[String] {
        &self.record.tags
    }

    async fn idempotency_key(&self) -> Option<&str> {
        self.record.idempotency_key.as_deref()
    }

    /// Carried by every event about the task, as `correlation_id` in its payload.
    async fn correlation_id(&self) -> &str {
        &self.record.correlation_id
    }

    /// When it is cancelled if it has not ended (its template's timeout after its creation).
    async fn deadline(&self) -> Option<DateTime<Utc>> {
        self.record.deadline
    }

    /// The concurrency key it holds a slot of (or waits for), when its template limits how
    /// many of its tasks run at once: `namespace/template`, then `:` and the key rendered
    /// from the context when the template has one.
    async fn concurrency_key(&self) -> Option<&str> {
        self.record
            .concurrency
            .as_ref()
            .map(|concurrency| concurrency.key.as_str())
    }

    /// 1 (low) to 4 (urgent): its steps' priority unless they declare their own. Claims take
    /// higher priority first; a wait of a minute weighs as much as one level, so low priority
    /// work is delayed, never starved.
    async fn priority(&self) -> i32 {
        i32::from(self.record.priority.level())
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.record.created_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.record.updated_at
    }

    async fn completed_at(&self) -> Option<DateTime<Utc>> {
        self.record.completed_at
    }

    /// The steps in template order.
    async fn steps(&self) -> Result<Vec<Step>> {
        let steps = self.set.steps(self.record.id).await.gql()?;
        Ok(steps
            .iter()
            .map(|step| Step::in_set(step, &self.set))
            .collect())
    }

    /// Dependency edges: each child step depends on its parent step.
    async fn edges(&self) -> Result<Vec<Edge>> {
        let edges = self.set.edges(self.record.id).await.gql()?;
        Ok(edges
            .iter()
            .map(|edge| Edge {
                record: *edge,
                set: self.set.clone(),
            })
            .collect())
    }

    /// State changes, oldest first.
    async fn transitions(&self) -> Result<Vec<TaskTransition>> {
        let records = self.set.task_transitions(self.record.id).await.gql()?;
        Ok(records.iter().cloned().map(TaskTransition).collect())
    }

    /// Where execution stands: waiting for a concurrency slot, ready steps, waiting for a
    /// rate limit, processing, waiting for a retry, blocked by a failure, or all complete.
    async fn execution_status(&self) -> Result<ExecutionStatusValue> {
        if self.record.waits_for_slot() {
            return Ok(ExecutionStatusValue::WaitingForConcurrencySlot);
        }
        let steps = self.set.steps(self.record.id).await.gql()?;
        let edges = self.set.edges(self.record.id).await.gql()?;
        let limits = self.set.step_limits().await.gql()?;
        let now = self.set.now().timestamp_millis();
        let progress = progress(&steps, |step| limits.hold(step));
        Ok(execution_status(&progress, &step_dag(&steps, &edges), now).into())
    }

    /// The share of steps complete, skipped or resolved, 0 to 100.
    async fn completion_percentage(&self) -> Result<f64> {
        let steps = self.set.steps(self.record.id).await.gql()?;
        Ok(completion_percentage(&progress(&steps, |_| None)))
    }

    /// How many steps are in each state.
    async fn step_counts(&self) -> Result<StepCounts> {
        Ok(StepCounts::of(&self.set.steps(self.record.id).await.gql()?))
    }

    /// The dependency graph: nodes, edges, levels, roots, leaves.
    async fn graph(&self) -> Result<TaskGraph> {
        let steps = self.set.steps(self.record.id).await.gql()?;
        let edges = self.set.edges(self.record.id).await.gql()?;
        Ok(TaskGraph::build(&steps, &edges, self.set.now()))
    }

    /// This task's entries in the event log, in order.
    async fn events(&self) -> Result<Vec<Event>> {
        let records = self.set.events(self.record.id).await.gql()?;
        Ok(records.iter().cloned().map(Event).collect())
    }
}

/// Where each step stands, as the execution rules read it; `held` says what limit, if any,
/// holds each back.
fn progress(
    steps: &[StepRecord],
    held: impl Fn(&StepRecord) -> Option<tasker_domain::execution::Hold>,
) -> Vec<StepProgress> {
    steps
        .iter()
        .map(|step| StepProgress {
            state: step.state,
            next_attempt_ms: step.next_attempt_at.map(|at| at.timestamp_millis()),
            held: held(step),
        })
        .collect()
}

/// One node of a task's DAG.
pub struct Step {
    record: StepRecord,
    set: Arc<TaskSet>,
}

impl Step {
    fn in_set(record: &StepRecord, set: &Arc<TaskSet>) -> Step {
        Step {
            record: record.clone(),
            set: set.clone(),
        }
    }

    /// A step returned on its own, with its task as the result set.
    pub fn single(store: tasker_store::Store, record: StepRecord, task: TaskRecord) -> Step {
        Step {
            record,
            set: TaskSet::new(store, vec![task]),
        }
    }
}

#[Object]
impl Step {
    async fn id(&self) -> ID {
        id(self.record.id)
    }

    async fn task(&self) -> Result<Task> {
        let record = self
            .set
            .task(self.record.task_id)
            .ok_or_else(|| {
                ApiError::NotFound(format!("task {} was not found", self.record.task_id))
            })
            .gql()?;
        Ok(Task {
            record: record.clone(),
            set: self.set.clone(),
        })
    }

    async fn name(&self) -> &str {
        &self.record.name
    }

    async fn handler(&self) -> &str {
        &self.record.handler
    }

    async fn description(&self) -> Option<&str> {
        self.record.description.as_deref()
    }

    async fn config(&self) -> Json<Value> {
        Json(self.record.config.clone())
    }

    async fn state(&self) -> StepStateValue {
        self.record.state.into()
    }

    /// Attempts made so far.
    async fn attempts(&self) -> u32 {
        self.record.attempts
    }

    async fn max_attempts(&self) -> u32 {
        self.record.max_attempts
    }

    async fn retryable(&self) -> bool {
        self.record.retryable
    }

    async fn skippable(&self) -> bool {
        self.record.skippable
    }

    async fn backoff(&self) -> BackoffPolicy {
        BackoffPolicy::from(&self.record.backoff)
    }

    async fn timeout_seconds(&self) -> Option<f64> {
        self.record.timeout_seconds
    }

    /// 1 (low) to 4 (urgent): the order claims take ready steps in, with aging.
    async fn priority(&self) -> i32 {
        i32::from(self.record.priority.level())
    }

    /// Seconds it may wait, claimable, for its first attempt before it fails (or is skipped).
    async fn start_timeout_seconds(&self) -> Option<f64> {
        self.record.start_timeout_seconds
    }

    /// The rate limit its attempts start under, and until when it is spent.
    async fn rate_limit(&self) -> Result<Option<StepRateLimit>> {
        let Some(limit) = &self.record.rate_limit else {
            return Ok(None);
        };
        let limits = self.set.step_limits().await.gql()?;
        Ok(Some(StepRateLimit {
            bucket: limit.bucket.clone(),
            limit: limit.limit,
            per_seconds: limit.per_seconds,
            spent_until: limits.spent.get(&limit.bucket).copied(),
        }))
    }

    /// The concurrency limit its attempts run under, and how many of its bucket run now
    /// (counted while the step waits to run; empty once it runs or ended).
    async fn concurrency_limit(&self) -> Result<Option<StepConcurrencyLimit>> {
        let Some(limit) = &self.record.concurrency else {
            return Ok(None);
        };
        let limits = self.set.step_limits().await.gql()?;
        Ok(Some(StepConcurrencyLimit {
            bucket: limit.bucket.clone(),
            limit: limit.limit,
            running: matches!(
                self.record.state,
                tasker_domain::StepState::Pending | tasker_domain::StepState::Error
            )
            .then(|| limits.running.get(&limit.bucket).copied().unwrap_or(0)),
        }))
    }

    /// What the handler returned when the step completed.
    async fn results(&self) -> Option<Json<Value>> {
        self.record.results.clone().map(Json)
    }

    async fn last_error(&self) -> Option<&str> {
        self.record.last_error.as_deref()
    }

    /// When a failed step may be attempted again.
    async fn next_attempt_at(&self) -> Option<DateTime<Utc>> {
        self.record.next_attempt_at
    }

    /// The worker holding the step's lease, while one does.
    async fn lease_holder(&self) -> Option<&str> {
        self.record.lease_holder.as_deref()
    }

    async fn lease_expires_at(&self) -> Option<DateTime<Utc>> {
        self.record.lease_expires_at
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.record.created_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.record.updated_at
    }

    /// When it finished (completed, skipped, resolved or cancelled); empty while it can
    /// still run.
    async fn completed_at(&self) -> Option<DateTime<Utc>> {
        self.record.completed_at
    }

    /// When its current (or last) attempt started.
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        self.record.attempt_started_at
    }

    /// How long its current attempt has run, or its last one took, in milliseconds; empty
    /// if it never ran.
    async fn duration_ms(&self) -> Option<i64> {
        crate::graph::attempt_ms(&self.record, self.set.now())
    }

    /// The steps this one depends on.
    async fn parents(&self) -> Result<Vec<Step>> {
        self.related(|edge| (edge.child_step_id, edge.parent_step_id))
            .await
    }

    /// The steps that depend on this one.
    async fn children(&self) -> Result<Vec<Step>> {
        self.related(|edge| (edge.parent_step_id, edge.child_step_id))
            .await
    }

    /// State changes, oldest first.
    async fn transitions(&self) -> Result<Vec<StepTransition>> {
        let records = self.set.step_transitions(self.record.id).await.gql()?;
        Ok(records.iter().cloned().map(StepTransition).collect())
    }
}

impl Step {
    /// Steps of the same task linked to this one; `ends` maps an edge to (this side, other side).
    async fn related(&self, ends: impl Fn(&EdgeRecord) -> (Uuid, Uuid)) -> Result<Vec<Step>> {
        let edges = self.set.edges(self.record.task_id).await.gql()?;
        let wanted: Vec<Uuid> = edges
            .iter()
            .map(&ends)
            .filter(|(this, _)| *this == self.record.id)
            .map(|(_, other)| other)
            .collect();
        let steps = self.set.steps(self.record.task_id).await.gql()?;
        Ok(steps
            .iter()
            .filter(|step| wanted.contains(&step.id))
            .map(|step| Step::in_set(step, &self.set))
            .collect())
    }
}

/// "child depends on parent".
pub struct Edge {
    record: EdgeRecord,
    set: Arc<TaskSet>,
}

#[Object]
impl Edge {
    async fn parent_id(&self) -> ID {
        id(self.record.parent_step_id)
    }

    async fn child_id(&self) -> ID {
        id(self.record.child_step_id)
    }

    async fn parent(&self) -> Result<Step> {
        self.step(self.record.parent_step_id).await
    }

    async fn child(&self) -> Result<Step> {
        self.step(self.record.child_step_id).await
    }
}

impl Edge {
    async fn step(&self, step_id: Uuid) -> Result<Step> {
        let steps = self.set.steps(self.record.task_id).await.gql()?;
        steps
            .iter()
            .find(|step| step.id == step_id)
            .map(|step| Step::in_set(step, &self.set))
            .ok_or_else(|| ApiError::NotFound(format!("step {step_id} was not found")))
            .gql()
    }
}

/// One recorded change of a task's state.
pub struct TaskTransition(pub TaskTransitionRecord);

#[Object]
impl TaskTransition {
    async fn id(&self) -> ID {
        id(self.0.id)
    }

    /// Empty for the task's creation.
    async fn from_state(&self) -> Option<TaskStateValue> {
        self.0.from_state.map(Into::into)
    }

    async fn to_state(&self) -> TaskStateValue {
        self.0.to_state.into()
    }

    /// 1 for the first transition, increasing by one.
    async fn sort_key(&self) -> i32 {
        self.0.sort_key
    }

    async fn metadata(&self) -> Json<Value> {
        Json(self.0.metadata.clone())
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

/// One recorded change of a step's state.
pub struct StepTransition(pub StepTransitionRecord);

#[Object]
impl StepTransition {
    async fn id(&self) -> ID {
        id(self.0.id)
    }

    async fn from_state(&self) -> Option<StepStateValue> {
        self.0.from_state.map(Into::into)
    }

    async fn to_state(&self) -> StepStateValue {
        self.0.to_state.into()
    }

    async fn sort_key(&self) -> i32 {
        self.0.sort_key
    }

    async fn metadata(&self) -> Json<Value> {
        Json(self.0.metadata.clone())
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

/// An entry of the event log.
pub struct Event(pub EventRecord);

#[Object]
impl Event {
    async fn id(&self) -> ID {
        id(self.0.id)
    }

    /// Where the event is in the log: pass it as `after` to read or follow what comes next.
    async fn cursor(&self) -> String {
        crate::ids::event_cursor(self.0.cursor())
    }

    /// The row's insertion number (log order follows `cursor`, which is commit order).
    async fn position(&self) -> String {
        self.0.position.to_string()
    }

    async fn name(&self) -> &str {
        &self.0.name
    }

    async fn namespace(&self) -> Option<&str> {
        self.0.namespace.as_deref()
    }

    async fn task_id(&self) -> Option<ID> {
        self.0.task_id.map(id)
    }

    async fn step_id(&self) -> Option<ID> {
        self.0.step_id.map(id)
    }

    async fn payload(&self) -> Json<Value> {
        Json(self.0.payload.clone())
    }

    async fn occurred_at(&self) -> DateTime<Utc> {
        self.0.occurred_at
    }
}

#[derive(SimpleObject)]
pub struct PageInfo {
    has_next_page: bool,
    has_previous_page: bool,
    start_cursor: Option<String>,
    end_cursor: Option<String>,
}

impl PageInfo {
    pub fn new(
        has_next_page: bool,
        has_previous_page: bool,
        start_cursor: Option<String>,
        end_cursor: Option<String>,
    ) -> Self {
        Self {
            has_next_page,
            has_previous_page,
            start_cursor,
            end_cursor,
        }
    }
}

/// A JSON object from input (a context, results), or `{}` when omitted.
pub fn object_or_empty(json: Option<Json<Value>>) -> Value {
    json.map_or_else(|| Value::Object(Default::default()), |json| json.0)
}
