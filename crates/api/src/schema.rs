//! The schema's roots: queries, mutations and subscriptions, and the extension that gives every
//! error a code.

use crate::access::grant;
use crate::batch::TaskSet;
use crate::error::{ApiError, GqlResultExt};
use crate::ids::{parse_id, parse_task_cursor, task_cursor};
use crate::limits::QueryLimits;
use crate::objects::{Namespace, Step, Task, TaskStateValue, Template};
use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextRequest,
};
use async_graphql::parser::types::ExecutableDocument;
use async_graphql::{
    Context, Enum, ID, InputObject, Json, MergedObject, Object, Response, Result, Schema,
    ServerError, ServerResult, SimpleObject, Subscription, Variables,
};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tasker_domain::{Permission, TaskRequest};
use tasker_engine::{Decision, Engine};
use tasker_store::{NewTask, RegistrationOutcome, StepAction, Store, TaskFilter};
use tokio_stream::wrappers::IntervalStream;

/// The whole schema type.
pub type TaskerSchema = Schema<Query, Mutation, Subscription>;

/// Every query: templates and tasks, and the event log.
#[derive(MergedObject, Default)]
pub struct Query(TaskQuery, crate::events::EventQuery);

/// Every mutation: task lifecycle and the worker protocol.
#[derive(MergedObject, Default)]
pub struct Mutation(TaskMutation, crate::workers::WorkerMutation);

/// Builds the schema around the engine (and its store), with limits on operations.
pub fn build_schema(
    engine: Arc<Engine>,
    limits: &QueryLimits,
    quotas: Arc<crate::quota::Quotas>,
) -> TaskerSchema {
    let mut builder = Schema::build(Query::default(), Mutation::default(), Subscription)
        .data(quotas)
        .data(Arc::new(crate::workers::ReadyCounts::default()))
        .data(limits.clone())
        .data(engine.store().clone())
        .data(crate::feed::EventFeed::new(engine.store().clone()))
        .data(engine)
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
    /// Every namespace that has templates.
    async fn namespaces(&self, ctx: &Context<'_>) -> Result<Vec<Namespace>> {
        let granted = grant(ctx, Permission::TemplateIndex)?;
        let records = granted.store.namespaces().await.gql()?;
        let visible = records
            .into_iter()
            .filter(|record| granted.scope.allows(&record.name))
            .collect();
        Ok(Namespace::all(granted.store, visible))
    }

    /// Registered templates, every version (newest first per name), optionally of one
    /// namespace and one name.
    async fn templates(
        &self,
        ctx: &Context<'_>,
        namespace: Option<String>,
        name: Option<String>,
    ) -> Result<Vec<Template>> {
        let granted = grant(ctx, Permission::TemplateIndex)?;
        let records = granted
            .store
            .templates(namespace.as_deref(), name.as_deref())
            .await
            .gql()?;
        Ok(records
            .into_iter()
            .filter(|record| granted.scope.allows(&record.template.namespace))
            .map(Template)
            .collect())
    }

    /// One template version; the newest (by semantic version) when `version` is omitted.
    async fn template(
        &self,
        ctx: &Context<'_>,
        namespace: String,
        name: String,
        version: Option<String>,
    ) -> Result<Template> {
        let granted = grant(ctx, Permission::TemplateShow)?;
        let key = match &version {
            Some(version) => format!("{namespace}/{name}@{version}"),
            None => format!("{namespace}/{name}"),
        };
        granted.check(&namespace, "template", &key).gql()?;
        let record = granted
            .store
            .template(&namespace, &name, version.as_deref())
            .await
            .gql()?;
        Ok(Template(record))
    }

    async fn task(&self, ctx: &Context<'_>, id: ID) -> Result<Task> {
        let granted = grant(ctx, Permission::TaskShow)?;
        let id = parse_id(&id, "id").gql()?;
        let record = granted.task(id).await?;
        Ok(Task::single(granted.store.clone(), record))
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
        let granted = grant(ctx, Permission::TaskIndex)?;
        let after = after.as_deref().map(parse_task_cursor).transpose().gql()?;
        // Outside the caller's scope entirely: an empty page, without a query.
        let Some(within) = granted.narrow(&[]) else {
            return Ok(TaskConnection {
                filter: None,
                tasks: TaskSet::new(granted.store.clone(), Vec::new()),
                has_next_page: false,
                has_previous_page: after.is_some(),
            });
        };
        let filter = match filter {
            Some(filter) => filter.into_filter(within).gql()?,
            None => TaskFilter::within(within),
        };
        let mut tasks = granted
            .store
            .list_tasks(&filter, after, first + 1)
            .await
            .gql()?;
        let has_next_page = tasks.len() as u64 > first;
        tasks.truncate(first as usize);
        Ok(TaskConnection {
            filter: Some(filter),
            tasks: TaskSet::new(granted.store.clone(), tasks),
            has_next_page,
            has_previous_page: after.is_some(),
        })
    }

    async fn step(&self, ctx: &Context<'_>, id: ID) -> Result<Step> {
        let granted = grant(ctx, Permission::StepShow)?;
        let id = parse_id(&id, "id").gql()?;
        let (step, task) = granted.step(id).await?;
        Ok(Step::single(granted.store.clone(), step, task))
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
    /// The store's filter within the caller's namespaces, once its lists are within bounds.
    fn into_filter(self, within: tasker_domain::Within) -> Result<TaskFilter, ApiError> {
        let input = self;
        crate::limits::filter_list("filter.states", input.states.as_ref())?;
        crate::limits::filter_list("filter.tags", input.tags.as_ref())?;
        Ok(TaskFilter {
            namespace: input.namespace,
            template: input.template,
            states: input
                .states
                .unwrap_or_default()
                .into_iter()
                .map(Into::into)
                .collect(),
            tags: input.tags.unwrap_or_default(),
            created_after: input.created_after,
            created_before: input.created_before,
            within,
        })
    }
}

/// A page of tasks (Relay connection).
pub struct TaskConnection {
    /// `None`: the caller's scope leaves nothing to list.
    filter: Option<TaskFilter>,
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
        PageInfo {
            has_next_page: self.has_next_page,
            has_previous_page: self.has_previous_page,
            start_cursor: self.tasks.tasks().first().map(|t| task_cursor(t.id)),
            end_cursor: self.tasks.tasks().last().map(|t| task_cursor(t.id)),
        }
    }

    /// Every task matching the filter, across all pages.
    async fn total_count(&self, ctx: &Context<'_>) -> Result<u64> {
        // The filter already holds the caller's scope.
        let granted = grant(ctx, Permission::TaskIndex)?;
        match &self.filter {
            Some(filter) => granted.store.count_tasks(filter).await.gql(),
            None => Ok(0),
        }
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

#[derive(Default)]
pub struct TaskMutation;

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
}

#[derive(SimpleObject)]
pub struct CreateTaskPayload {
    task: Task,
    /// False when an earlier request with the same idempotency key created the task.
    created: bool,
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
    step: crate::objects::Step,
    task: Task,
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
        let granted = grant(ctx, Permission::TemplateRegister)?;
        // A definition that does not parse is reported by the registration itself.
        if let Ok(template) = tasker_domain::TaskTemplate::parse(&input.definition)
            && !granted.scope.allows(&template.namespace)
        {
            return Err(ApiError::Forbidden(format!(
                "your token may not register templates in namespace {:?}",
                template.namespace
            )))
            .gql();
        }
        let registration = granted
            .store
            .register_template(&input.definition, input.replace.unwrap_or(false))
            .await
            .gql()?;
        Ok(RegisterTemplatePayload {
            template: Template(registration.template),
            result: match registration.outcome {
                RegistrationOutcome::Created => RegistrationResult::Created,
                RegistrationOutcome::Unchanged => RegistrationResult::Unchanged,
                RegistrationOutcome::Replaced => RegistrationResult::Replaced,
            },
        })
    }

    /// Starts a task: its steps, edges, transitions and events are written in one transaction.
    async fn create_task(
        &self,
        ctx: &Context<'_>,
        input: CreateTaskInput,
    ) -> Result<CreateTaskPayload> {
        let granted = grant(ctx, Permission::TaskCreate)?;
        let key = match &input.version {
            Some(version) => format!("{}/{}@{version}", input.namespace, input.template),
            None => format!("{}/{}", input.namespace, input.template),
        };
        granted.check(&input.namespace, "template", &key).gql()?;
        let creation = granted
            .engine
            .create_task(NewTask {
                namespace: input.namespace,
                template: input.template,
                version: input.version,
                request: TaskRequest {
                    context: input
                        .context
                        .map(|json| json.0)
                        .unwrap_or_else(|| Value::Object(Default::default())),
                    initiator: input.initiator,
                    source_system: input.source_system,
                    reason: input.reason,
                    tags: input.tags.unwrap_or_default(),
                    idempotency_key: input.idempotency_key,
                    correlation_id: input.correlation_id,
                },
            })
            .await
            .gql()?;
        Ok(CreateTaskPayload {
            task: Task::single(granted.store.clone(), creation.task),
            created: creation.created,
        })
    }

    /// Runs a failed task again: its failed steps go back to pending with fresh attempts.
    /// A task that has not failed is a CONFLICT.
    async fn retry_task(
        &self,
        ctx: &Context<'_>,
        input: RetryTaskInput,
    ) -> Result<RetryTaskPayload> {
        let granted = grant(ctx, Permission::TaskRetry)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        granted.task(id).await?;
        let task = granted.engine.retry_task(id, input.reason).await.gql()?;
        Ok(RetryTaskPayload {
            task: Task::single(granted.store.clone(), task),
        })
    }

    /// Reopens a failed step with fresh attempts. A step that has not failed is a CONFLICT.
    async fn retry_step(
        &self,
        ctx: &Context<'_>,
        input: RetryStepInput,
    ) -> Result<StepChangePayload> {
        change_step(ctx, &input.id, StepAction::Retry, input.reason).await
    }

    /// Marks a step done by hand, with the results its dependents should see.
    async fn resolve_step_manually(
        &self,
        ctx: &Context<'_>,
        input: ResolveStepManuallyInput,
    ) -> Result<StepChangePayload> {
        let results = input
            .results
            .map(|json| json.0)
            .unwrap_or_else(|| Value::Object(Default::default()));
        change_step(
            ctx,
            &input.id,
            StepAction::Resolve { results },
            input.reason,
        )
        .await
    }

    /// Skips a step that has not finished: its dependents proceed without it.
    async fn skip_step(
        &self,
        ctx: &Context<'_>,
        input: SkipStepInput,
    ) -> Result<StepChangePayload> {
        change_step(ctx, &input.id, StepAction::Skip, input.reason).await
    }

    /// Approves a step waiting for a person (handler `approval`): it completes with `results`.
    /// A step not waiting for a decision is a CONFLICT.
    async fn approve_step(
        &self,
        ctx: &Context<'_>,
        input: ApproveStepInput,
    ) -> Result<StepChangePayload> {
        let results = input
            .results
            .map(|json| json.0)
            .unwrap_or_else(|| Value::Object(Default::default()));
        decide(ctx, &input.id, Decision::Approve { results }).await
    }

    /// Rejects a step waiting for a person: it fails for good (or is skipped when skippable).
    async fn reject_step(
        &self,
        ctx: &Context<'_>,
        input: RejectStepInput,
    ) -> Result<StepChangePayload> {
        decide(
            ctx,
            &input.id,
            Decision::Reject {
                reason: input.reason,
            },
        )
        .await
    }

    /// Cancels a task and its unfinished steps. A finished task is a CONFLICT.
    async fn cancel_task(
        &self,
        ctx: &Context<'_>,
        input: CancelTaskInput,
    ) -> Result<CancelTaskPayload> {
        let granted = grant(ctx, Permission::TaskCancel)?;
        let id = parse_id(&input.id, "input.id").gql()?;
        granted.task(id).await?;
        let task = granted.engine.cancel_task(id, input.reason).await.gql()?;
        Ok(CancelTaskPayload {
            task: Task::single(granted.store.clone(), task),
        })
    }
}

async fn change_step(
    ctx: &Context<'_>,
    id: &ID,
    action: StepAction,
    reason: Option<String>,
) -> Result<StepChangePayload> {
    let granted = grant(
        ctx,
        match action {
            StepAction::Retry => Permission::StepRetry,
            StepAction::Resolve { .. } => Permission::StepResolve,
            StepAction::Skip => Permission::StepUpdate,
        },
    )?;
    let id = parse_id(id, "input.id").gql()?;
    granted.step(id).await?;
    let change = granted.engine.change_step(id, action, reason).await.gql()?;
    let store = granted.store.clone();
    Ok(StepChangePayload {
        step: crate::objects::Step::single(store.clone(), change.step, change.task.clone()),
        task: Task::single(store, change.task),
    })
}

async fn decide(ctx: &Context<'_>, id: &ID, decision: Decision) -> Result<StepChangePayload> {
    let granted = grant(ctx, Permission::StepUpdate)?;
    let id = parse_id(id, "input.id").gql()?;
    granted.step(id).await?;
    let step = granted.engine.decide(id, decision).await.gql()?;
    let store = granted.store.clone();
    let task = store.task(step.task_id).await.gql()?;
    Ok(StepChangePayload {
        step: crate::objects::Step::single(store.clone(), step, task.clone()),
        task: Task::single(store, task),
    })
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

    /// A task now, then a fresh snapshot (state, execution status, counts, completion, the
    /// steps that changed and the events) each time something about it changes.
    async fn task_updated(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> Result<impl Stream<Item = Result<crate::events::TaskUpdate>> + use<>> {
        let stream = crate::events::task_updates(ctx, id).await?;
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
        crate::access::principal(ctx)?;
        let clock = ctx.data_unchecked::<Store>().clock().clone();
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

/// Sets the error's code unless it has one.
pub(crate) fn with_code(mut error: ServerError, code: &str) -> ServerError {
    let has_code = error
        .extensions
        .as_ref()
        .is_some_and(|extensions| extensions.get("code").is_some());
    if !has_code {
        error
            .extensions
            .get_or_insert_with(Default::default)
            .set("code", code);
    }
    error
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
    use tasker_store::testing::TestDatabase;

    #[tokio::test]
    async fn heartbeats_are_numbered_and_stamped_by_the_clock() {
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let clock = Arc::new(ManualClock::new(start));
        let db = TestDatabase::sqlite(clock.clone()).await;
        let schema = build_schema(
            Engine::new(db.store.clone()),
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
