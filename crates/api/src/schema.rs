//! The schema's roots: queries, mutations and subscriptions, and the extension that gives every
//! error a code.

use crate::access::{can, grant};
use crate::batch::TaskSet;
use crate::enums::{CatchUpValue, TaskStateValue};
use crate::error::{ApiError, GqlResultExt, with_code};
use crate::ids::{parse_id, parse_task_cursor, task_cursor};
use crate::limits::QueryLimits;
use crate::objects::{Namespace, PageInfo, Schedule, Step, Task, Template};
use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextRequest,
};
use async_graphql::parser::types::ExecutableDocument;
use async_graphql::{
    Context, Enum, ID, InputObject, Json, MergedObject, Object, Response, Result, Schema,
    ServerResult, SimpleObject, Subscription, Variables,
};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tasker_domain::{TaskRequest, Within};
use tasker_engine::Decision;
use tasker_store::{NewTask, TaskFilter};
use tokio_stream::wrappers::IntervalStream;

/// The whole schema type.
pub type TaskerSchema = Schema<Query, Mutation, Subscription>;

/// Every query: templates and tasks, and the event log.
#[derive(MergedObject, Default)]
pub struct Query(TaskQuery, crate::events::EventQuery);

/// Every mutation: task lifecycle and the worker protocol.
#[derive(MergedObject, Default)]
pub struct Mutation(TaskMutation, crate::workers::WorkerMutation);

/// Builds the schema around the engine (reached only through grants), with limits on
/// operations.
pub(crate) fn build_schema(
    services: crate::access::Services,
    limits: &QueryLimits,
    quotas: Arc<crate::quota::Quotas>,
) -> TaskerSchema {
    let operations = services.operation_metrics();
    let mut builder = Schema::build(Query::default(), Mutation::default(), Subscription)
        .data(quotas)
        .data(limits.clone())
        .data(services)
        // Outside ErrorCodes, so it sees every error's final code.
        .extension(operations)
        .extension(ErrorCodes)
        .extension(crate::limits::QueryShape(limits.clone()))
        .limit_depth(limits.max_depth)
        .limit_complexity(limits.max_complexity)
        .limit_recursive_depth(32);
    if !limits.introspection {
        builder = builder.disable_introspection();
    }
    builder.finish()
}

/// The SDL that `tasker schema` prints and `schema.graphql` holds.
pub fn sdl() -> String {
    Schema::build(Query::default(), Mutation::default(), Subscription)
        .finish()
        .sdl()
}

#[derive(Default)]
pub struct TaskQuery;

#[Object]
impl TaskQuery {
    /// The caller: its subject, permissions and namespaces (a page shows only the actions
    /// they allow).
    async fn viewer(&self, ctx: &Context<'_>) -> Result<crate::access::Viewer> {
        crate::access::viewer(ctx)
    }

    /// Every namespace that has templates.
    async fn namespaces(&self, ctx: &Context<'_>) -> Result<Vec<Namespace>> {
        grant::<can::TemplateIndex>(ctx)?.namespaces().await
    }

    /// Registered templates, every version (newest first per name), optionally of one
    /// namespace and one name.
    async fn templates(
        &self,
        ctx: &Context<'_>,
        namespace: Option<String>,
        name: Option<String>,
    ) -> Result<Vec<Template>> {
        grant::<can::TemplateIndex>(ctx)?
            .templates(namespace.as_deref(), name.as_deref())
            .await
    }

    /// Schedules, optionally of one namespace, by namespace and name.
    async fn schedules(
        &self,
        ctx: &Context<'_>,
        namespace: Option<String>,
    ) -> Result<Vec<Schedule>> {
        grant::<can::ScheduleIndex>(ctx)?
            .schedules(namespace.as_deref())
            .await
    }

    /// One schedule.
    async fn schedule(
        &self,
        ctx: &Context<'_>,
        namespace: String,
        name: String,
    ) -> Result<Schedule> {
        grant::<can::ScheduleIndex>(ctx)?
            .schedule(&namespace, &name)
            .await
    }

    /// One template version; the newest (by semantic version) when `version` is omitted.
    async fn template(
        &self,
        ctx: &Context<'_>,
        namespace: String,
        name: String,
        version: Option<String>,
    ) -> Result<Template> {
        grant::<can::TemplateShow>(ctx)?
            .template(&namespace, &name, version.as_deref())
            .await
    }

    async fn task(&self, ctx: &Context<'_>, id: ID) -> Result<Task> {
        let granted = grant::<can::TaskShow>(ctx)?;
        granted.task(parse_id(&id, "id").gql()?).await
    }

    /// Tasks, newest first, filtered, in pages of `first` (at most 100 by default) after a
    /// cursor.
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        filter: Option<TaskFilterInput>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> Result<TaskConnection> {
        let first = crate::limits::page_size(ctx, first, |limits| limits.max_tasks_page)?;
        let granted = grant::<can::TaskIndex>(ctx)?;
        let after = after.as_deref().map(parse_task_cursor).transpose().gql()?;
        let filter = match filter {
            Some(filter) => filter.into_filter().gql()?,
            None => TaskFilter::within(Within::Any),
        };
        let page = granted.tasks(&filter, after, first).await?;
        Ok(TaskConnection {
            filter,
            tasks: page.tasks,
            has_next_page: page.has_next_page,
            has_previous_page: after.is_some(),
        })
    }

    async fn step(&self, ctx: &Context<'_>, id: ID) -> Result<Step> {
        let granted = grant::<can::StepShow>(ctx)?;
        granted.step(parse_id(&id, "id").gql()?).await
    }
}

/// Which tasks to list; every given field must match.
#[derive(InputObject, Default)]
pub struct TaskFilterInput {
    namespace: Option<String>,
    /// Template name.
    template: Option<String>,
    /// Any of these states.
    states: Option<Vec<TaskStateValue>>,
    /// Every one of these tags.
    tags: Option<Vec<String>>,
    /// Created at or after this time.
    created_after: Option<DateTime<Utc>>,
    /// Created before this time.
    created_before: Option<DateTime<Utc>>,
}

impl TaskFilterInput {
    /// The store's filter (in any namespace: the view keeps it to the caller's), once its
    /// lists are within bounds.
    fn into_filter(self) -> Result<TaskFilter, ApiError> {
        crate::limits::filter_list("filter.states", self.states.as_ref())?;
        crate::limits::filter_list("filter.tags", self.tags.as_ref())?;
        Ok(TaskFilter {
            namespace: self.namespace,
            template: self.template,
            states: self
                .states
                .unwrap_or_default()
                .into_iter()
                .map(Into::into)
                .collect(),
            tags: self.tags.unwrap_or_default(),
            created_after: self.created_after,
            created_before: self.created_before,
            within: Within::Any,
        })
    }
}

/// A page of tasks (Relay connection).
pub struct TaskConnection {
    /// As asked: the view keeps it to the caller's scope.
    filter: TaskFilter,
    tasks: Arc<TaskSet>,
    has_next_page: bool,
    has_previous_page: bool,
}

#[Object]
impl TaskConnection {
    async fn edges(&self) -> Vec<TaskEdge> {
        self.tasks
            .tasks()
            .iter()
            .zip(Task::all_of(&self.tasks))
            .map(|(record, node)| TaskEdge {
                cursor: task_cursor(record.id),
                node,
            })
            .collect()
    }

    /// The tasks of this page, without cursors.
    async fn nodes(&self) -> Vec<Task> {
        Task::all_of(&self.tasks)
    }

    async fn page_info(&self) -> PageInfo {
        PageInfo::new(
            self.has_next_page,
            self.has_previous_page,
            self.tasks.tasks().first().map(|t| task_cursor(t.id)),
            self.tasks.tasks().last().map(|t| task_cursor(t.id)),
        )
    }

    /// Every task matching the filter, across all pages.
    async fn total_count(&self, ctx: &Context<'_>) -> Result<u64> {
        grant::<can::TaskIndex>(ctx)?
            .count_tasks(&self.filter)
            .await
    }
}

pub struct TaskEdge {
    cursor: String,
    node: Task,
}

#[Object]
impl TaskEdge {
    async fn cursor(&self) -> &str {
        &self.cursor
    }

    async fn node(&self) -> &Task {
        &self.node
    }
}

#[derive(Default)]
pub struct TaskMutation;

/// A schedule to create: `cron` (five fields, minute to weekday, in `timezone`) for a
/// repeating one, or `runAt` for one run.
#[derive(InputObject)]
pub struct CreateScheduleInput {
    namespace: String,
    /// Unique in the namespace (lowercase letters, digits, `_` and `-`).
    name: String,
    /// The template's name; its newest version at each tick unless `version` is given.
    template: String,
    version: Option<String>,
    /// The context of every task it starts, checked against the template now.
    context: Option<Json<Value>>,
    /// 1 (low) to 4 (urgent) for its tasks; the template's when omitted.
    priority: Option<i32>,
    cron: Option<String>,
    /// IANA time zone (`Europe/Berlin`); UTC when omitted.
    timezone: Option<String>,
    run_at: Option<DateTime<Utc>>,
    /// What to do with ticks missed while no server ran (RUN_ONCE when omitted).
    catch_up: Option<CatchUpValue>,
}

/// A schedule, by namespace and name.
#[derive(InputObject)]
pub struct ScheduleKeyInput {
    namespace: String,
    name: String,
}

#[derive(SimpleObject)]
pub struct SchedulePayload {
    schedule: Schedule,
}

#[derive(InputObject)]
pub struct RegisterTemplateInput {
    /// The template in YAML or JSON (at most 1 MiB).
    definition: String,
    /// Overwrite a different definition already registered under the same version
    /// (default false).
    replace: Option<bool>,
}

/// What registering did.
#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "tasker_store::RegistrationOutcome")]
pub enum RegistrationResult {
    /// A new version was stored.
    Created,
    /// The identical definition was already registered; nothing changed.
    Unchanged,
    /// A different definition under the same version was overwritten.
    Replaced,
}

#[derive(SimpleObject)]
pub struct RegisterTemplatePayload {
    template: Template,
    result: RegistrationResult,
}

#[derive(InputObject)]
pub struct CreateTaskInput {
    namespace: String,
    /// Template name.
    template: String,
    /// Template version; the newest when omitted.
    version: Option<String>,
    /// The task's input, checked against the template's context_schema.
    context: Option<Json<Value>>,
    initiator: Option<String>,
    source_system: Option<String>,
    reason: Option<String>,
    tags: Option<Vec<String>>,
    /// A second request with the same key (in the namespace) returns the first task.
    idempotency_key: Option<String>,
    /// Carried by every event about the task, to follow one request through the log; the
    /// task's id when omitted.
    correlation_id: Option<String>,
    /// 1 (low) to 4 (urgent); the template's priority (or 2) when omitted.
    priority: Option<i32>,
}

impl CreateTaskInput {
    fn into_new_task(self) -> NewTask {
        NewTask {
            namespace: self.namespace,
            template: self.template,
            version: self.version,
            trace_parent: None,
            request: TaskRequest {
                context: crate::objects::object_or_empty(self.context),
                initiator: self.initiator,
                source_system: self.source_system,
                reason: self.reason,
                tags: self.tags.unwrap_or_default(),
                idempotency_key: self.idempotency_key,
                correlation_id: self.correlation_id,
                priority: self.priority.map(i64::from),
            },
        }
    }
}

#[derive(SimpleObject)]
pub struct CreateTaskPayload {
    task: Task,
    /// False when an earlier request with the same idempotency key created the task.
    created: bool,
}

#[derive(SimpleObject)]
pub struct CreateTasksPayload {
    /// One per input, in the same order.
    results: Vec<CreateTaskPayload>,
}

#[derive(InputObject)]
pub struct CancelTaskInput {
    id: ID,
    reason: Option<String>,
}

#[derive(SimpleObject)]
pub struct CancelTaskPayload {
    task: Task,
}

#[derive(InputObject)]
pub struct RetryTaskInput {
    id: ID,
    reason: Option<String>,
}

#[derive(SimpleObject)]
pub struct RetryTaskPayload {
    task: Task,
}

#[derive(InputObject)]
pub struct RetryStepInput {
    id: ID,
    reason: Option<String>,
}

#[derive(InputObject)]
pub struct ResolveTaskInput {
    id: ID,
    reason: Option<String>,
}

#[derive(SimpleObject)]
pub struct ResolveTaskPayload {
    task: Task,
}

#[derive(InputObject)]
pub struct RerunFromStepInput {
    /// The step to run again; everything that depends on it runs again after it.
    id: ID,
    reason: Option<String>,
}

#[derive(SimpleObject)]
pub struct RerunFromStepPayload {
    task: Task,
    /// The steps that went back to pending (those already pending are not listed).
    reset_steps: Vec<Step>,
}

#[derive(InputObject)]
pub struct ResolveStepManuallyInput {
    id: ID,
    /// The results its dependents should see.
    results: Option<Json<Value>>,
    reason: Option<String>,
}

#[derive(InputObject)]
pub struct SkipStepInput {
    id: ID,
    reason: Option<String>,
}

#[derive(InputObject)]
pub struct ApproveStepInput {
    id: ID,
    /// The results its dependents should see.
    results: Option<Json<Value>>,
}

#[derive(InputObject)]
pub struct RejectStepInput {
    id: ID,
    reason: String,
}

/// A step after a person changed it, with its task.
#[derive(SimpleObject)]
pub struct StepChangePayload {
    step: Step,
    task: Task,
}

impl StepChangePayload {
    fn of((step, task): (Step, Task)) -> StepChangePayload {
        StepChangePayload { step, task }
    }
}

#[Object]
impl TaskMutation {
    /// Registers a template version. Identical content is accepted again without change; a
    /// different definition under an existing version is a CONFLICT unless `replace` is true.
    async fn register_template(
        &self,
        ctx: &Context<'_>,
        input: RegisterTemplateInput,
    ) -> Result<RegisterTemplatePayload> {
        let registration = grant::<can::TemplateRegister>(ctx)?
            .register_template(&input.definition, input.replace.unwrap_or(false))
            .await?;
        Ok(RegisterTemplatePayload {
            template: Template(registration.template),
            result: registration.outcome.into(),
        })
    }

    /// Creates a schedule; its first tick is the first after now (or `runAt`).
    async fn create_schedule(
        &self,
        ctx: &Context<'_>,
        input: CreateScheduleInput,
    ) -> Result<SchedulePayload> {
        let new = tasker_store::NewSchedule {
            namespace: input.namespace,
            name: input.name,
            template: input.template,
            version: input.version,
            context: crate::objects::object_or_empty(input.context),
            priority: input.priority.map(i64::from),
            cron: input.cron,
            timezone: input.timezone,
            run_at: input.run_at,
            catch_up: input.catch_up.map(|policy| {
                tasker_domain::schedule::CatchUp::from(policy)
                    .as_str()
                    .to_owned()
            }),
        };
        let schedule = grant::<can::ScheduleCreate>(ctx)?
            .create_schedule(new)
            .await?;
        Ok(SchedulePayload { schedule })
    }

    /// Pauses a schedule: no tick fires until it is resumed.
    async fn pause_schedule(
        &self,
        ctx: &Context<'_>,
        input: ScheduleKeyInput,
    ) -> Result<SchedulePayload> {
        let schedule = grant::<can::ScheduleUpdate>(ctx)?
            .pause_schedule(&input.namespace, &input.name, true)
            .await?;
        Ok(SchedulePayload { schedule })
    }

    /// Resumes a paused schedule from its next tick (the pause's ticks are not made up).
    async fn resume_schedule(
        &self,
        ctx: &Context<'_>,
        input: ScheduleKeyInput,
    ) -> Result<SchedulePayload> {
        let schedule = grant::<can::ScheduleUpdate>(ctx)?
            .pause_schedule(&input.namespace, &input.name, false)
            .await?;
        Ok(SchedulePayload { schedule })
    }

    /// Deletes a schedule; the tasks it started stay.
    async fn delete_schedule(
        &self,
        ctx: &Context<'_>,
        input: ScheduleKeyInput,
    ) -> Result<SchedulePayload> {
        let schedule = grant::<can::ScheduleDelete>(ctx)?
            .delete_schedule(&input.namespace, &input.name)
            .await?;
        Ok(SchedulePayload { schedule })
    }

    /// Starts a task: its steps, edges, transitions and events are written in one transaction.
    async fn create_task(
        &self,
        ctx: &Context<'_>,
        input: CreateTaskInput,
    ) -> Result<CreateTaskPayload> {
        let granted = grant::<can::TaskCreate>(ctx)?;
        let (task, created) = granted.create_task(input.into_new_task()).await?;
        Ok(CreateTaskPayload { task, created })
    }

    /// Starts many tasks in one transaction: all of them, or none when any input is refused
    /// (`VALIDATION_FAILED`, each problem under `inputs[i]`). At most the server's
    /// `--max-tasks-per-batch` (1,000 by default) per call; idempotency keys hold per input.
    async fn create_tasks(
        &self,
        ctx: &Context<'_>,
        inputs: Vec<CreateTaskInput>,
    ) -> Result<CreateTasksPayload> {
        let granted = grant::<can::TaskCreate>(ctx)?;
        let max = crate::limits::configured(ctx, |limits| limits.max_tasks_per_batch);
        if inputs.len() > max {
            return Err(crate::ApiError::invalid(
                "inputs",
                format!(
                    "at most {max} tasks per call, got {}; send them in several calls",
                    inputs.len()
                ),
            ))
            .gql();
        }
        let news = inputs
            .into_iter()
            .map(CreateTaskInput::into_new_task)
            .collect();
        let results = granted
            .create_tasks(news)
            .await?
            .into_iter()
            .map(|(task, created)| CreateTaskPayload { task, created })
            .collect();
        Ok(CreateTasksPayload { results })
    }

    /// Runs a failed task again: its failed steps go back to pending with fresh attempts.
    /// A task that has not failed is a CONFLICT.
    async fn retry_task(
        &self,
        ctx: &Context<'_>,
        input: RetryTaskInput,
    ) -> Result<RetryTaskPayload> {
        let granted = grant::<can::TaskRetry>(ctx)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        let task = granted.retry_task(id, input.reason).await?;
        Ok(RetryTaskPayload { task })
    }

    /// Marks a failed task as resolved by a person (`task.resolved_manually`); it is finished
    /// and its steps stay as they are. A task that has not failed is a CONFLICT.
    async fn resolve_task(
        &self,
        ctx: &Context<'_>,
        input: ResolveTaskInput,
    ) -> Result<ResolveTaskPayload> {
        let granted = grant::<can::TaskUpdate>(ctx)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        let task = granted.resolve_task(id, input.reason).await?;
        Ok(ResolveTaskPayload { task })
    }

    /// Runs a step again with everything downstream of it: each goes back to pending with
    /// fresh attempts (one `step.retry_requested` each), in one transaction, and a failed
    /// task runs again. A CONFLICT while one of them is running or when the task is finished.
    async fn rerun_from_step(
        &self,
        ctx: &Context<'_>,
        input: RerunFromStepInput,
    ) -> Result<RerunFromStepPayload> {
        let granted = grant::<can::StepRetry>(ctx)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        let rerun = granted.rerun_from_step(id, input.reason).await?;
        Ok(RerunFromStepPayload {
            task: rerun.task,
            reset_steps: rerun.steps,
        })
    }

    /// Reopens a failed step with fresh attempts. A step that has not failed is a CONFLICT.
    async fn retry_step(
        &self,
        ctx: &Context<'_>,
        input: RetryStepInput,
    ) -> Result<StepChangePayload> {
        let granted = grant::<can::StepRetry>(ctx)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        Ok(StepChangePayload::of(
            granted.retry_step(id, input.reason).await?,
        ))
    }

    /// Marks a step done by hand, with the results its dependents should see.
    async fn resolve_step_manually(
        &self,
        ctx: &Context<'_>,
        input: ResolveStepManuallyInput,
    ) -> Result<StepChangePayload> {
        let results = crate::objects::object_or_empty(input.results);
        let granted = grant::<can::StepResolve>(ctx)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        Ok(StepChangePayload::of(
            granted.resolve_step(id, results, input.reason).await?,
        ))
    }

    /// Skips a step that has not finished: its dependents proceed without it.
    async fn skip_step(
        &self,
        ctx: &Context<'_>,
        input: SkipStepInput,
    ) -> Result<StepChangePayload> {
        let granted = grant::<can::StepUpdate>(ctx)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        Ok(StepChangePayload::of(
            granted.skip_step(id, input.reason).await?,
        ))
    }

    /// Approves a step waiting for a person (handler `approval`): it completes with `results`.
    /// A step not waiting for a decision is a CONFLICT.
    async fn approve_step(
        &self,
        ctx: &Context<'_>,
        input: ApproveStepInput,
    ) -> Result<StepChangePayload> {
        let results = crate::objects::object_or_empty(input.results);
        let granted = grant::<can::StepUpdate>(ctx)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        Ok(StepChangePayload::of(
            granted.decide(id, Decision::Approve { results }).await?,
        ))
    }

    /// Rejects a step waiting for a person: it fails for good (or is skipped when skippable).
    async fn reject_step(
        &self,
        ctx: &Context<'_>,
        input: RejectStepInput,
    ) -> Result<StepChangePayload> {
        let granted = grant::<can::StepUpdate>(ctx)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        let rejection = Decision::Reject {
            reason: input.reason,
        };
        Ok(StepChangePayload::of(granted.decide(id, rejection).await?))
    }

    /// Cancels a task and its unfinished steps. A finished task is a CONFLICT.
    async fn cancel_task(
        &self,
        ctx: &Context<'_>,
        input: CancelTaskInput,
    ) -> Result<CancelTaskPayload> {
        let granted = grant::<can::TaskCancel>(ctx)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        let task = granted.cancel_task(id, input.reason).await?;
        Ok(CancelTaskPayload { task })
    }
}

pub struct Subscription;

/// A sign of life on a subscription connection.
#[derive(SimpleObject)]
pub struct Heartbeat {
    /// 1 for the first beat, increasing by one.
    sequence: u64,
    at: DateTime<Utc>,
}

#[Subscription]
impl Subscription {
    /// Wakes workers: a message whenever claimable steps for these handlers and namespaces
    /// exist after something changed (and at once if some already do).
    async fn steps_available(
        &self,
        ctx: &Context<'_>,
        input: Option<crate::workers::StepsAvailableInput>,
    ) -> Result<impl Stream<Item = Result<crate::workers::StepsAvailable>> + use<>> {
        let stream = crate::workers::steps_available(ctx, input).await?;
        crate::access::until_expiry(ctx, stream)
    }

    /// A task now, then an update (the task read after its new events, the steps they are
    /// about, and the events) each time something about it changes; the stream completes
    /// after the task has ended. Each update carries a `cursor`: subscribe again with
    /// `after` set to it to resume — the events since then come first, with no gap and no
    /// duplicate.
    async fn task_updated(
        &self,
        ctx: &Context<'_>,
        id: ID,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Result<crate::events::TaskUpdate>> + use<>> {
        let stream = crate::events::task_updates(ctx, id, after).await?;
        crate::access::until_expiry(ctx, stream)
    }

    /// Tasks as their own state changes: every task created, started, completed, failed,
    /// retried, cancelled or resolved among those matching `filter`, in log order, each with
    /// the task as it is now — what a live list of tasks needs. Replays the events after
    /// `after` (or starts now); keep the last `cursor` to resume.
    async fn tasks_updated(
        &self,
        ctx: &Context<'_>,
        filter: Option<crate::events::TaskStreamFilterInput>,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Result<crate::events::TaskListUpdate>> + use<>> {
        let stream = crate::events::task_list_updates(ctx, filter, after).await?;
        crate::access::until_expiry(ctx, stream)
    }

    /// The event log, live: replays the events after `after` (or starts now), then follows new
    /// ones as they commit — in log order, with no gap and no duplicate, on any replica. Keep
    /// the last `cursor` you received to resume after a disconnect.
    async fn events(
        &self,
        ctx: &Context<'_>,
        filter: Option<crate::events::EventFilterInput>,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Result<crate::objects::Event>> + use<>> {
        let stream = crate::events::subscribe(ctx, filter, after).await?;
        crate::access::until_expiry(ctx, stream)
    }

    /// Beats every `everySeconds` (1 to 3600) so a client can tell a quiet stream from a
    /// dead connection.
    async fn heartbeat(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 15)] every_seconds: i32,
    ) -> Result<impl Stream<Item = Result<Heartbeat>> + use<>> {
        if !(1..=3600).contains(&every_seconds) {
            return Err(ApiError::invalid(
                "everySeconds",
                format!("must be between 1 and 3600, got {every_seconds}"),
            ))
            .gql();
        }
        let clock = crate::access::clock(ctx)?;
        let period = Duration::from_secs(every_seconds as u64);
        let ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let beats = IntervalStream::new(ticks)
            .enumerate()
            .map(move |(beat, _)| Heartbeat {
                sequence: beat as u64 + 1,
                at: clock.now(),
            });
        crate::access::until_expiry(ctx, beats)
    }
}

/// Gives every error a stable `extensions.code`: resolver errors already carry theirs; a
/// document that does not parse is `GRAPHQL_PARSE_FAILED`; one that breaks the schema's rules
/// (unknown field, wrong argument type, too deep) is `GRAPHQL_VALIDATION_FAILED`.
struct ErrorCodes;

impl ExtensionFactory for ErrorCodes {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(ErrorCodesExtension)
    }
}

struct ErrorCodesExtension;

/// Set when a request reached execution: one that did not (it failed to parse, validate or
/// coerce its variables) is answered without `data`, and with 400 under
/// `application/graphql-response+json`.
#[derive(Debug, Default)]
pub(crate) struct Executed(std::sync::atomic::AtomicBool);

impl Executed {
    pub(crate) fn happened(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for ErrorCodesExtension {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let mut response = next.run(ctx).await;
        response.errors = std::mem::take(&mut response.errors)
            .into_iter()
            .map(|error| {
                // async-graphql's own depth and complexity limits, by their messages.
                let limit = error.message.starts_with("Query is nested too deep")
                    || error.message.starts_with("Query is too complex");
                let code = if limit {
                    crate::limits::LIMIT_CODE
                } else {
                    "GRAPHQL_VALIDATION_FAILED"
                };
                with_code(error, code)
            })
            .collect();
        response
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        next.run(ctx, query, variables)
            .await
            .map_err(|error| with_code(error, "GRAPHQL_PARSE_FAILED"))
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        if let Some(executed) = ctx.data_opt::<Arc<Executed>>() {
            executed.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        next.run(ctx, operation_name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasker_domain::ManualClock;
    use tasker_engine::Engine;
    use tasker_store::testing::TestDatabase;

    #[tokio::test]
    async fn heartbeats_are_numbered_and_stamped_by_the_clock() {
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let clock = Arc::new(ManualClock::new(start));
        let db = TestDatabase::sqlite(clock.clone()).await;
        let schema = build_schema(
            crate::access::Services::new(Engine::new(db.store.clone())),
            &QueryLimits::default(),
            crate::quota::Quotas::new(Default::default()),
        );
        // Time stands still unless the runtime is idle, then jumps to the next timer.
        tokio::time::pause();
        let request = async_graphql::Request::new(
            "subscription { heartbeat(everySeconds: 5) { sequence at } }",
        )
        .data(crate::auth::Principal::unrestricted());
        let mut stream = schema.execute_stream(request);
        for sequence in 1..=3 {
            let response = stream.next().await.unwrap();
            assert!(response.errors.is_empty(), "{:?}", response.errors);
            let data = response.data.into_json().unwrap();
            assert_eq!(data["heartbeat"]["sequence"], sequence);
            assert_eq!(data["heartbeat"]["at"], "2026-01-01T00:00:00+00:00");
        }
    }
}
