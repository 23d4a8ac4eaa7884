//! The only way a resolver reaches data. [`grant`] checks that the caller holds a permission
//! and hands back a [`Granted`] view typed by it: its methods are exactly the operations that
//! permission allows, and each keeps to the caller's namespaces. Resolvers never see the store
//! or the engine — [`Services`], the schema's handle on them, has no public field — so a
//! resolver cannot forget a check: without the permission it has no view, and with it, no
//! way around the scope. Records outside the scope are answered exactly like missing ones, so
//! a caller cannot learn that they exist.

use crate::auth::Principal;
use crate::batch::TaskSet;
use crate::error::{ApiError, GqlResultExt};
use crate::objects::{Namespace, Schedule, Step, Task, Template};
use async_graphql::{Context, Result};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde_json::Value;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;
use tasker_domain::{EventName, NamespaceScope, Permission, Within};
use tasker_engine::{Decision, Engine, Follow};
use tasker_store::{
    AttemptFailure, ClaimRequest, ClaimedStep, Completion, EventCursor, EventFilter, EventRecord,
    NewTask, Registration, StepAction, StepInputs, StepRecord, TaskFilter, TaskRecord,
    TemplateRecord,
};
use uuid::Uuid;

/// The schema's handle on the engine (and through it the store). Its field is private to
/// this module: the only way through it is [`grant`].
#[derive(Clone)]
pub(crate) struct Services {
    engine: Arc<Engine>,
}

impl Services {
    pub fn new(engine: Arc<Engine>) -> Services {
        Services { engine }
    }

    /// The extension that counts operations into the engine's metrics (it reads no data).
    pub(crate) fn operation_metrics(&self) -> crate::telemetry::OperationMetrics {
        crate::telemetry::OperationMetrics(self.engine.clone())
    }

    /// Whether the server is draining (readiness then fails).
    pub(crate) fn is_draining(&self) -> bool {
        self.engine.is_draining()
    }

    /// Changes to `true` when the server starts draining.
    pub(crate) fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.engine.draining()
    }

    /// Counts an open WebSocket (for the metrics, and for a stop that waits for them).
    pub(crate) fn hold_websocket(&self) -> (crate::telemetry::Open, tasker_engine::ConnectionHeld) {
        (
            self.open("tasker_websocket_connections"),
            self.engine.hold_connection(),
        )
    }

    /// Counts one open connection or subscription in `gauge` while the guard lives.
    pub(crate) fn open(&self, gauge: &'static str) -> crate::telemetry::Open {
        crate::telemetry::Open::new(&self.engine, gauge)
    }
}

/// A permission as a type, so the operations it allows are checked when the code compiles.
pub(crate) trait Grant {
    const PERMISSION: Permission;
}

/// One type per permission, named after it.
pub(crate) mod can {
    use super::Grant;
    use tasker_domain::Permission;

    macro_rules! permissions {
        ($($name:ident),* $(,)?) => {$(
            #[doc = concat!("Holds `", stringify!($name), "`.")]
            pub(crate) enum $name {}
            impl Grant for $name {
                const PERMISSION: Permission = Permission::$name;
            }
        )*};
    }

    permissions!(
        TemplateIndex,
        TemplateShow,
        TemplateRegister,
        ScheduleIndex,
        ScheduleCreate,
        ScheduleUpdate,
        ScheduleDelete,
        TaskIndex,
        TaskShow,
        TaskCreate,
        TaskRetry,
        TaskUpdate,
        TaskCancel,
        StepShow,
        StepRetry,
        StepResolve,
        StepUpdate,
        EventSubscribe,
        WorkerClaim,
        HealthStatusIndex,
        MetricsIndex,
    );
}

/// What a caller was granted for one operation: the permission `P` within its namespaces.
pub(crate) struct Granted<'a, P> {
    engine: &'a Arc<Engine>,
    scope: &'a NamespaceScope,
    permission: PhantomData<P>,
}

/// The caller of this operation (set by the HTTP handler or the WebSocket's init).
pub(crate) fn principal<'a>(ctx: &'a Context<'_>) -> Result<&'a Principal> {
    ctx.data_opt::<Principal>()
        .ok_or_else(|| ApiError::Unauthenticated("authentication required".to_owned()))
        .gql()
}

/// Who the caller is, as a page needs it to show only the actions its token permits.
#[derive(async_graphql::SimpleObject)]
pub struct Viewer {
    /// The token's subject; empty without authentication.
    subject: Option<String>,
    /// Every permission granted (`tasker.task:cancel`, …).
    permissions: Vec<String>,
    /// The namespaces the caller may see; null when it may see all.
    namespaces: Option<Vec<String>>,
}

/// The caller itself: any authenticated caller may read who it is.
pub(crate) fn viewer(ctx: &Context<'_>) -> Result<Viewer> {
    let principal = principal(ctx)?;
    Ok(Viewer {
        subject: principal.subject.clone(),
        permissions: principal
            .permissions
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
        namespaces: match &principal.namespaces {
            NamespaceScope::All => None,
            NamespaceScope::Only(names) => Some(names.iter().cloned().collect()),
        },
    })
}

/// The server's clock, for stamping messages: any authenticated caller may read the time.
pub(crate) fn clock(ctx: &Context<'_>) -> Result<Arc<dyn tasker_domain::Clock>> {
    principal(ctx)?;
    Ok(ctx
        .data_unchecked::<Services>()
        .engine
        .store()
        .clock()
        .clone())
}

/// Checks that the caller of a GraphQL operation holds the permission `P`.
pub(crate) fn grant<'a, P: Grant>(ctx: &'a Context<'_>) -> Result<Granted<'a, P>> {
    grant_to(principal(ctx)?, ctx.data_unchecked::<Services>()).gql()
}

/// Checks that `principal` holds the permission `P` (for the HTTP endpoints).
pub(crate) fn grant_to<'a, P: Grant>(
    principal: &'a Principal,
    services: &'a Services,
) -> Result<Granted<'a, P>, ApiError> {
    if !principal.permissions.contains(P::PERMISSION) {
        return Err(ApiError::Forbidden(format!(
            "this needs the {} permission, which your token does not grant",
            P::PERMISSION
        )));
    }
    Ok(Granted {
        engine: &services.engine,
        scope: &principal.namespaces,
        permission: PhantomData,
    })
}

/// What every view may do for itself: keep to the scope.
impl<P> Granted<'_, P> {
    fn store(&self) -> &tasker_store::Store {
        self.engine.store()
    }

    /// The store's `NOT_FOUND` for a missing record unless the namespace is in scope, so the
    /// two cannot be told apart.
    fn check(&self, namespace: &str, what: &'static str, key: &str) -> Result<()> {
        if self.scope.allows(namespace) {
            Ok(())
        } else {
            Err(tasker_store::Error::NotFound {
                what,
                key: key.to_owned(),
            })
            .gql()
        }
    }

    /// `FORBIDDEN` unless the caller may write in `namespace` (`what`: "create schedules").
    fn allow_writes_in(&self, namespace: &str, what: &str) -> Result<()> {
        if self.scope.allows(namespace) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "your token may not {what} in namespace {namespace:?}"
            )))
            .gql()
        }
    }

    /// Where a query asked to look `asked` may look; `None`: nowhere, answer empty.
    fn confine(&self, asked: &Within) -> Option<Within> {
        self.scope.confine(asked)
    }

    /// Registered templates in scope, optionally of one namespace and one name.
    async fn templates_in_scope(
        &self,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<TemplateRecord>> {
        let records = self.store().templates(namespace, name).await.gql()?;
        Ok(records
            .into_iter()
            .filter(|record| self.scope.allows(&record.template.namespace))
            .collect())
    }

    async fn task_record(&self, id: Uuid) -> Result<TaskRecord> {
        let task = self.store().task(id).await.gql()?;
        self.check(&task.namespace, "task", &id.to_string())?;
        Ok(task)
    }

    /// `NOT_FOUND` unless the step exists in scope (one statement, no records read).
    async fn check_step(&self, id: Uuid) -> Result<()> {
        let namespace = self.store().step_namespace(id).await.gql()?;
        self.check(&namespace, "step", &id.to_string())
    }

    /// A step changed by a person, with its task.
    async fn change_step(
        &self,
        id: Uuid,
        action: StepAction,
        reason: Option<String>,
    ) -> Result<(Step, Task)> {
        self.check_step(id).await?;
        let change = self.engine.change_step(id, action, reason).await.gql()?;
        Ok(self.step_and_task(change.step, change.task))
    }

    /// A step and its task in one result set, so their nested fields share their loads.
    fn step_and_task(&self, step: StepRecord, task: TaskRecord) -> (Step, Task) {
        let (task, step) = Task::with_step(self.store().clone(), task, step);
        (step, task)
    }

    /// The lease tokens among `tokens` whose steps are in scope; the others are treated as
    /// lost leases. Costs nothing for a caller that sees every namespace.
    async fn leases_in_scope(&self, tokens: Vec<Uuid>) -> Result<Vec<Uuid>> {
        if *self.scope == NamespaceScope::All {
            return Ok(tokens);
        }
        let namespaces = self.store().lease_namespaces(&tokens).await.gql()?;
        Ok(tokens
            .into_iter()
            .filter(|token| {
                namespaces
                    .get(token)
                    .is_some_and(|namespace| self.scope.allows(namespace))
            })
            .collect())
    }

    /// A lease token, if its step is in scope; `LEASE_LOST` otherwise, like an expired lease.
    async fn lease_in_scope(&self, token: Uuid) -> Result<Uuid> {
        self.leases_in_scope(vec![token])
            .await?
            .pop()
            .ok_or(tasker_store::Error::LeaseLost)
            .gql()
    }

    /// The step a worker holds, with its task.
    async fn held_step(&self, step: StepRecord) -> Result<Step> {
        let task = self.store().task(step.task_id).await.gql()?;
        Ok(Step::single(self.store().clone(), step, task))
    }
}

impl Granted<'_, can::TemplateIndex> {
    /// Every namespace in scope that has templates.
    pub async fn namespaces(&self) -> Result<Vec<Namespace>> {
        let records = self.store().namespaces().await.gql()?;
        let visible = records
            .into_iter()
            .filter(|record| self.scope.allows(&record.name))
            .collect();
        Ok(Namespace::all(self.store(), visible))
    }

    /// Registered templates in scope, optionally of one namespace and one name.
    pub async fn templates(
        &self,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<Template>> {
        let records = self.templates_in_scope(namespace, name).await?;
        Ok(records.into_iter().map(Template).collect())
    }
}

impl Granted<'_, can::TemplateShow> {
    /// One template version; the newest when `version` is `None`.
    pub async fn template(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Template> {
        let key = tasker_domain::template::reference(namespace, name, version);
        self.check(namespace, "template", &key)?;
        let record = self
            .store()
            .template(namespace, name, version)
            .await
            .gql()?;
        Ok(Template(record))
    }
}

impl Granted<'_, can::TemplateRegister> {
    /// Registers a template version in a namespace in scope.
    pub async fn register_template(&self, definition: &str, replace: bool) -> Result<Registration> {
        // A definition that does not parse is reported by the registration itself.
        if let Ok(template) = tasker_domain::TaskTemplate::parse(definition) {
            self.allow_writes_in(&template.namespace, "register templates")?;
        }
        self.store()
            .register_template(definition, replace)
            .await
            .gql()
    }
}

impl Granted<'_, can::ScheduleIndex> {
    /// The schedules in scope, optionally of one namespace.
    pub async fn schedules(&self, namespace: Option<&str>) -> Result<Vec<Schedule>> {
        let asked = Within::of(namespace.map(str::to_owned));
        let Some(within) = self.confine(&asked) else {
            return Ok(Vec::new());
        };
        let records = self.store().schedules(&within).await.gql()?;
        let now = self.store().clock().now();
        Ok(records
            .into_iter()
            .map(|record| Schedule::new(record, now))
            .collect())
    }

    /// One schedule by namespace and name.
    pub async fn schedule(&self, namespace: &str, name: &str) -> Result<Schedule> {
        self.check(namespace, "schedule", &format!("{namespace}/{name}"))?;
        let record = self.store().schedule(namespace, name).await.gql()?;
        Ok(Schedule::new(record, self.store().clock().now()))
    }
}

impl Granted<'_, can::ScheduleCreate> {
    /// Creates a schedule in a namespace in scope.
    pub async fn create_schedule(&self, new: tasker_store::NewSchedule) -> Result<Schedule> {
        self.allow_writes_in(&new.namespace, "create schedules")?;
        let record = self.store().create_schedule(new).await.gql()?;
        // Its first tick may be sooner than what the maintenance loop sleeps for.
        self.engine.timers_changed();
        Ok(Schedule::new(record, self.store().clock().now()))
    }
}

impl Granted<'_, can::ScheduleUpdate> {
    /// Pauses or resumes a schedule.
    pub async fn pause_schedule(
        &self,
        namespace: &str,
        name: &str,
        paused: bool,
    ) -> Result<Schedule> {
        self.check(namespace, "schedule", &format!("{namespace}/{name}"))?;
        let record = self
            .store()
            .pause_schedule(namespace, name, paused)
            .await
            .gql()?;
        self.engine.timers_changed();
        Ok(Schedule::new(record, self.store().clock().now()))
    }
}

impl Granted<'_, can::ScheduleDelete> {
    /// Deletes a schedule; the tasks it started stay.
    pub async fn delete_schedule(&self, namespace: &str, name: &str) -> Result<Schedule> {
        self.check(namespace, "schedule", &format!("{namespace}/{name}"))?;
        let record = self.store().delete_schedule(namespace, name).await.gql()?;
        Ok(Schedule::new(record, self.store().clock().now()))
    }
}

impl Granted<'_, can::TaskShow> {
    pub async fn task(&self, id: Uuid) -> Result<Task> {
        let record = self.task_record(id).await?;
        Ok(Task::single(self.store().clone(), record))
    }
}

/// A page of tasks.
pub(crate) struct TaskPage {
    pub tasks: Arc<TaskSet>,
    pub has_next_page: bool,
}

impl Granted<'_, can::TaskIndex> {
    /// Up to `first` tasks matching `filter` (kept to the caller's scope), newest first,
    /// after the task `after`.
    pub async fn tasks(
        &self,
        filter: &TaskFilter,
        after: Option<Uuid>,
        first: u64,
    ) -> Result<TaskPage> {
        let mut tasks = match self.confine(&filter.within) {
            Some(within) => {
                let filter = TaskFilter {
                    within,
                    ..filter.clone()
                };
                self.store()
                    .list_tasks(&filter, after, first + 1)
                    .await
                    .gql()?
            }
            None => Vec::new(),
        };
        let has_next_page = tasks.len() as u64 > first;
        tasks.truncate(first as usize);
        Ok(TaskPage {
            tasks: TaskSet::new(self.store().clone(), tasks),
            has_next_page,
        })
    }

    /// How many tasks match `filter`, kept to the caller's scope.
    pub async fn count_tasks(&self, filter: &TaskFilter) -> Result<u64> {
        let Some(within) = self.confine(&filter.within) else {
            return Ok(0);
        };
        let filter = TaskFilter {
            within,
            ..filter.clone()
        };
        self.store().count_tasks(&filter).await.gql()
    }
}

impl Granted<'_, can::StepShow> {
    pub async fn step(&self, id: Uuid) -> Result<Step> {
        let step = self.store().step(id).await.gql()?;
        let task = self.store().task(step.task_id).await.gql()?;
        self.check(&task.namespace, "step", &id.to_string())?;
        Ok(Step::single(self.store().clone(), step, task))
    }
}

impl Granted<'_, can::TaskCreate> {
    /// Starts a task from a template in scope; `false` when an earlier request with the same
    /// idempotency key created it.
    pub async fn create_task(&self, new: NewTask) -> Result<(Task, bool)> {
        let key = tasker_domain::template::reference(
            &new.namespace,
            &new.template,
            new.version.as_deref(),
        );
        self.check(&new.namespace, "template", &key)?;
        let creation = self.engine.create_task(new).await.gql()?;
        Ok((
            Task::single(self.store().clone(), creation.task),
            creation.created,
        ))
    }

    /// Starts many tasks from templates in scope, all or none; each answered with whether
    /// this call created it. A request outside the token's namespaces is refused as one of a
    /// template that does not exist, under its index.
    pub async fn create_tasks(&self, news: Vec<NewTask>) -> Result<Vec<(Task, bool)>> {
        let outside: Vec<tasker_domain::Problem> = news
            .iter()
            .enumerate()
            .filter(|(_, new)| !self.scope.allows(&new.namespace))
            .map(|(index, new)| {
                // Worded as the store words a template that does not exist.
                let missing = tasker_store::Error::NotFound {
                    what: "template",
                    key: tasker_domain::template::reference(
                        &new.namespace,
                        &new.template,
                        new.version.as_deref(),
                    ),
                };
                tasker_domain::Problem::new(
                    format!("inputs[{index}].template"),
                    missing.to_string(),
                )
            })
            .collect();
        if !outside.is_empty() {
            return Err(tasker_store::Error::from(
                tasker_domain::Error::InvalidRequest(outside),
            ))
            .gql();
        }
        let creations = self.engine.create_tasks(news).await.gql()?;
        let created: Vec<bool> = creations.iter().map(|c| c.created).collect();
        let set = crate::batch::TaskSet::new(
            self.store().clone(),
            creations.into_iter().map(|c| c.task).collect(),
        );
        Ok(Task::all_of(&set).into_iter().zip(created).collect())
    }
}

impl Granted<'_, can::TaskRetry> {
    pub async fn retry_task(&self, id: Uuid, reason: Option<String>) -> Result<Task> {
        self.task_record(id).await?;
        let task = self.engine.retry_task(id, reason).await.gql()?;
        Ok(Task::single(self.store().clone(), task))
    }
}

impl Granted<'_, can::TaskUpdate> {
    /// Marks a failed task in scope as resolved by a person.
    pub async fn resolve_task(&self, id: Uuid, reason: Option<String>) -> Result<Task> {
        self.task_record(id).await?;
        let task = self.engine.resolve_task(id, reason).await.gql()?;
        Ok(Task::single(self.store().clone(), task))
    }
}

impl Granted<'_, can::TaskCancel> {
    pub async fn cancel_task(&self, id: Uuid, reason: Option<String>) -> Result<Task> {
        self.task_record(id).await?;
        let task = self.engine.cancel_task(id, reason).await.gql()?;
        Ok(Task::single(self.store().clone(), task))
    }
}

impl Granted<'_, can::StepRetry> {
    pub async fn retry_step(&self, id: Uuid, reason: Option<String>) -> Result<(Step, Task)> {
        self.change_step(id, StepAction::Retry, reason).await
    }
}

/// What re-running from a step did, as the API shows it.
pub(crate) struct Rerun {
    pub task: Task,
    /// The steps that went back to pending.
    pub steps: Vec<Step>,
}

impl Granted<'_, can::StepRetry> {
    /// Re-runs a step in scope and everything downstream of it.
    pub async fn rerun_from_step(&self, id: Uuid, reason: Option<String>) -> Result<Rerun> {
        self.check_step(id).await?;
        let rerun = self.engine.rerun_from_step(id, reason).await.gql()?;
        let (task, steps) = Task::with_steps(self.store().clone(), rerun.task, &rerun.reset);
        Ok(Rerun { task, steps })
    }
}

impl Granted<'_, can::StepResolve> {
    pub async fn resolve_step(
        &self,
        id: Uuid,
        results: Value,
        reason: Option<String>,
    ) -> Result<(Step, Task)> {
        self.change_step(id, StepAction::Resolve { results }, reason)
            .await
    }
}

impl Granted<'_, can::StepUpdate> {
    pub async fn skip_step(&self, id: Uuid, reason: Option<String>) -> Result<(Step, Task)> {
        self.change_step(id, StepAction::Skip, reason).await
    }

    /// Approves or rejects a step waiting for a person.
    pub async fn decide(&self, id: Uuid, decision: Decision) -> Result<(Step, Task)> {
        self.check_step(id).await?;
        let step = self.engine.decide(id, decision).await.gql()?;
        let task = self.store().task(step.task_id).await.gql()?;
        Ok(self.step_and_task(step, task))
    }
}

/// A task after events about it committed.
pub(crate) struct TaskChange {
    /// Where in the log this change stands: resume after it.
    pub cursor: EventCursor,
    /// The task read after the events.
    pub task: Task,
    /// The steps the events are about.
    pub changed_steps: Vec<Step>,
    pub events: Vec<EventRecord>,
    /// The task has ended and the log holds nothing more about it: the last change.
    pub last: bool,
}

/// A task whose events appeared in the list-level stream.
pub(crate) struct TaskListChange {
    pub event: EventRecord,
    /// The task as read after the batch of events this one arrived in.
    pub task: Task,
}

/// Events a resumed `taskUpdated` delivers in its first message; the rest follow.
const TASK_CATCH_UP: u64 = 500;

impl Granted<'_, can::EventSubscribe> {
    /// The templates in scope, for the custom events they declare.
    pub async fn templates(&self) -> Result<Vec<TemplateRecord>> {
        self.templates_in_scope(None, None).await
    }

    /// The log's head now: following after it misses nothing that commits from here on.
    pub async fn event_head(&self) -> Result<EventCursor> {
        Ok(self
            .store()
            .event_head()
            .await
            .gql()?
            .unwrap_or(EventCursor(0)))
    }

    /// `NOT_FOUND` unless the task exists in scope.
    pub async fn check_task(&self, id: Uuid) -> Result<()> {
        self.task_record(id).await.map(drop)
    }

    /// Up to `first` events matching `filter` (kept to the caller's scope) after `after`.
    pub async fn events(
        &self,
        filter: EventFilter,
        after: Option<EventCursor>,
        first: u64,
    ) -> Result<Vec<EventRecord>> {
        let Some(within) = self.confine(&filter.within) else {
            return Ok(Vec::new());
        };
        let filter = EventFilter { within, ..filter };
        self.store().events_page(&filter, after, first).await.gql()
    }

    /// Follows the log after `after` (from now when `None`) for the events matching `filter`,
    /// kept to the caller's scope; `None` when the scope leaves nothing to read.
    pub async fn follow(
        &self,
        filter: EventFilter,
        after: Option<EventCursor>,
    ) -> Result<Option<Follow>> {
        let Some(within) = self.confine(&filter.within) else {
            return Ok(None);
        };
        let start = match after {
            Some(cursor) => {
                // Told now, rather than by a stream that ends.
                self.store().check_cursor(cursor).await.gql()?;
                Some(cursor)
            }
            None => self.store().event_head().await.gql()?,
        };
        let filter = EventFilter { within, ..filter };
        Ok(Some(self.engine.events().follow(filter, start)))
    }

    /// A task in scope now (or, resuming after `after`, its events since then with the task
    /// as it is), then a change whenever events about it commit; the stream ends with the
    /// change that leaves the task ended with nothing more in the log about it.
    ///
    /// The snapshot race: the log's head is read *before* the task, so a change committed
    /// between the two reads is both in the snapshot and delivered as an event after it.
    ///
    /// The updates show the task itself, so the caller must also be allowed to see it
    /// (`shown`).
    pub async fn follow_task(
        &self,
        shown: &Granted<'_, can::TaskShow>,
        id: Uuid,
        after: Option<EventCursor>,
    ) -> Result<impl Stream<Item = TaskChange> + Send + 'static + use<>> {
        let record = shown.task_record(id).await?;
        // The task is in scope; its namespace is where to read.
        let within = Within::Only(tasker_domain::NamespaceSet::one(record.namespace.clone()));
        let filter = EventFilter {
            task_id: Some(id),
            ..EventFilter::within(within)
        };
        let store = self.store().clone();
        let (start, caught_up) = match after {
            Some(cursor) => (
                cursor,
                store
                    .events_page(&filter, Some(cursor), TASK_CATCH_UP)
                    .await
                    .gql()?,
            ),
            None => (
                store.event_head().await.gql()?.unwrap_or(EventCursor(0)),
                Vec::new(),
            ),
        };
        let first = task_change(&store, id, start, caught_up).await.gql()?;
        if first.last {
            // Ended, and nothing more in the log: no need to follow it.
            return Ok(futures::stream::once(async move { first }).left_stream());
        }
        let follow = self.engine.events().follow(filter, Some(first.cursor));
        let changes = futures::stream::unfold(
            (follow, store, false),
            move |(mut follow, store, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let batch = follow.next_batch().await?;
                    let cursor = batch.last().map(EventRecord::cursor)?;
                    match task_change(&store, id, cursor, batch).await {
                        Ok(change) => {
                            let last = change.last;
                            return Some((change, (follow, store, last)));
                        }
                        Err(err) => tracing::warn!(error = %err, "reading a task snapshot failed"),
                    }
                }
            },
        );
        Ok(futures::stream::once(async move { first })
            .chain(changes)
            .right_stream())
    }
}

/// Which tasks a list-level stream follows; every given field must match.
#[derive(Debug, Clone, Default)]
pub(crate) struct TaskStream {
    pub namespace: Option<String>,
    pub template: Option<String>,
    /// Every one of these tags.
    pub tags: Vec<String>,
}

impl TaskStream {
    fn matches(&self, task: &TaskRecord) -> bool {
        self.template
            .as_ref()
            .is_none_or(|name| *name == task.template_name)
            && self.tags.iter().all(|tag| task.tags.contains(tag))
    }
}

impl Granted<'_, can::EventSubscribe> {
    /// Follows the tasks matching `stream` in the caller's scope after `after` (from now when
    /// `None`): every task lifecycle event (created, started, completed, failed, retried,
    /// cancelled, resolved) in log order, each with its task read after its batch. `None`
    /// when the scope leaves nothing to read.
    ///
    /// The updates show the tasks themselves, so the caller must also be allowed to list
    /// them (`_listed`).
    pub async fn follow_tasks(
        &self,
        _listed: &Granted<'_, can::TaskIndex>,
        stream: TaskStream,
        after: Option<EventCursor>,
    ) -> Result<Option<impl Stream<Item = Vec<TaskListChange>> + Send + 'static + use<>>> {
        let within = match &stream.namespace {
            Some(namespace) => Within::Only(tasker_domain::NamespaceSet::one(namespace.clone())),
            None => Within::Any,
        };
        let filter = EventFilter {
            names: EventName::TASK_LIFECYCLE
                .iter()
                .map(|name| name.as_str().to_owned())
                .collect(),
            ..EventFilter::within(within)
        };
        let Some(follow) = self.follow(filter, after).await? else {
            return Ok(None);
        };
        let store = self.store().clone();
        let changes = futures::stream::unfold(
            (follow, store, stream),
            |(mut follow, store, stream)| async move {
                loop {
                    let batch = follow.next_batch().await?;
                    match task_list_changes(&store, &stream, batch).await {
                        Ok(changes) if changes.is_empty() => continue,
                        Ok(changes) => return Some((changes, (follow, store, stream))),
                        Err(err) => {
                            tracing::warn!(error = %err, "reading tasks for a list stream failed")
                        }
                    }
                }
            },
        );
        Ok(Some(changes))
    }
}

/// The events of a batch whose tasks match `stream`, each with its task read now (one read
/// for the batch, one result set for their nested fields).
async fn task_list_changes(
    store: &tasker_store::Store,
    stream: &TaskStream,
    mut events: Vec<EventRecord>,
) -> tasker_store::Result<Vec<TaskListChange>> {
    // Events name their template: the others need no read.
    if let Some(template) = &stream.template {
        events.retain(|event| event.payload["template"] == template.as_str());
    }
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<Uuid> = events.iter().filter_map(|event| event.task_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let tasks: Vec<TaskRecord> = store
        .tasks_by_ids(&ids)
        .await?
        .into_iter()
        .filter(|task| stream.matches(task))
        .collect();
    let set = crate::batch::TaskSet::new(store.clone(), tasks);
    let tasks: HashMap<Uuid, Task> = Task::all_of(&set)
        .into_iter()
        .map(|task| (task.task_id(), task))
        .collect();
    Ok(events
        .into_iter()
        .filter_map(|event| {
            let task = tasks.get(&event.task_id?)?.clone();
            Some(TaskListChange { event, task })
        })
        .collect())
}

/// The change a batch of a task's events (read after `start`) makes: the task read after
/// them, their steps, and whether it is the last.
async fn task_change(
    store: &tasker_store::Store,
    task_id: Uuid,
    start: EventCursor,
    events: Vec<EventRecord>,
) -> tasker_store::Result<TaskChange> {
    let task = store.task(task_id).await?;
    let cursor = events.last().map_or(start, EventRecord::cursor);
    let mut step_ids: Vec<Uuid> = events.iter().filter_map(|e| e.step_id).collect();
    step_ids.sort_unstable();
    step_ids.dedup();
    let steps = store.steps_by_ids(&step_ids).await?;
    // Ended, and the event that ended it is at or before the cursor: it committed before the
    // task was read, so anything after the cursor (numbered or still to be numbered) is news
    // (a person reopened the task) and the stream goes on.
    let last = task.state.has_ended() && !store.task_has_events_after(task_id, cursor).await?;
    let (task, changed_steps) = Task::with_steps(store.clone(), task, &steps);
    Ok(TaskChange {
        cursor,
        task,
        changed_steps,
        events,
        last,
    })
}

impl Granted<'_, can::WorkerClaim> {
    /// The time by the server's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.store().clock().now()
    }

    /// Leases ready steps within `namespaces` (any when empty) kept to the caller's scope,
    /// waiting up to `wait` for some; each with what its handler needs.
    pub async fn claim(
        &self,
        worker_id: String,
        handlers: Vec<String>,
        namespaces: &[String],
        limit: u32,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<(ClaimedStep, StepInputs)>> {
        let Some(within) = self.confine(&Within::of(namespaces.iter().cloned())) else {
            return Ok(Vec::new());
        };
        let request = ClaimRequest {
            worker_id,
            handlers,
            within,
            limit,
            lease,
        };
        let claimed = self.engine.claim(&request, wait).await.gql()?;
        let steps: Vec<_> = claimed.iter().map(|c| c.step.clone()).collect();
        let mut inputs = self.store().step_inputs(&steps).await.gql()?;
        Ok(claimed
            .into_iter()
            .map(|claim| {
                let input = inputs.remove(&claim.step.id).unwrap_or_default();
                (claim, input)
            })
            .collect())
    }

    /// Extends the leases in scope; the expiry of each that is still held.
    pub async fn heartbeat(
        &self,
        tokens: Vec<Uuid>,
        lease: Duration,
    ) -> Result<HashMap<Uuid, DateTime<Utc>>> {
        let in_scope = self.leases_in_scope(tokens).await?;
        self.store().heartbeat(&in_scope, lease).await.gql()
    }

    /// Records a successful attempt of a held step.
    pub async fn complete(&self, lease_token: Uuid, results: Value) -> Result<Step> {
        let lease_token = self.lease_in_scope(lease_token).await?;
        let report = self
            .engine
            .complete(&[Completion {
                lease_token,
                results,
            }])
            .await
            .gql()?;
        let step = report
            .completed
            .into_iter()
            .next()
            .ok_or(tasker_store::Error::LeaseLost)
            .gql()?;
        self.held_step(step).await
    }

    /// Gives back the leases in scope unfinished; the steps that were released.
    pub async fn release(&self, tokens: Vec<Uuid>) -> Result<Vec<Step>> {
        let in_scope = self.leases_in_scope(tokens).await?;
        let released = self.engine.release(&in_scope).await.gql()?;
        let mut steps = Vec::with_capacity(released.len());
        for step in released {
            steps.push(self.held_step(step).await?);
        }
        Ok(steps)
    }

    /// Records a failed attempt of a held step.
    pub async fn fail(&self, failure: AttemptFailure) -> Result<Step> {
        let failure = AttemptFailure {
            lease_token: self.lease_in_scope(failure.lease_token).await?,
            ..failure
        };
        let report = self.engine.fail(&failure).await.gql()?;
        self.held_step(report.step).await
    }

    /// Publishes a custom event of a held step's template.
    pub async fn publish_event(
        &self,
        lease_token: Uuid,
        name: &str,
        payload: Value,
    ) -> Result<EventRecord> {
        let lease_token = self.lease_in_scope(lease_token).await?;
        self.store()
            .publish_event(lease_token, name, payload)
            .await
            .gql()
    }

    /// Counts of claimable steps for `handlers` within `namespaces` (kept to the caller's
    /// scope), with the time counted, whenever some are; `None` when the scope leaves nothing.
    pub fn ready_steps(
        &self,
        handlers: Vec<String>,
        namespaces: &[String],
    ) -> Option<impl Stream<Item = (u64, DateTime<Utc>)> + Send + 'static + use<>> {
        let within = self.confine(&Within::of(namespaces.iter().cloned()))?;
        let clock = self.store().clock().clone();
        Some(
            self.engine
                .ready_steps(handlers, within)
                .map(move |ready| (ready, clock.now())),
        )
    }
}

impl Granted<'_, can::HealthStatusIndex> {
    /// Tasks by state, and claimable steps (up to 10,000), within the caller's namespaces.
    /// The database within the caller's scope: tasks and steps by namespace and state, the
    /// ready queue, the log's head; `None` when the scope leaves nothing.
    pub async fn status(&self) -> tasker_store::Result<Option<tasker_store::StoreStatus>> {
        match self.confine(&Within::Any) {
            Some(Within::Any) => self.store().status(&Within::Any).await.map(Some),
            Some(within) => {
                let mut status = self.store().status(&within).await?;
                // The log's head counts every namespace's events.
                status.event_head = None;
                Ok(Some(status))
            }
            None => Ok(None),
        }
    }

    /// Whether the server is draining (it then reports itself unhealthy).
    pub fn draining(&self) -> bool {
        self.engine.is_draining()
    }

    /// The connection pool now.
    pub fn pool(&self) -> tasker_store::PoolStatus {
        self.store().pool_status()
    }

    /// The database's write fault, while one lasts: its name.
    pub fn write_fault(&self) -> Option<&'static str> {
        self.store().write_fault().map(|(fault, _)| fault.name())
    }

    pub fn backend_name(&self) -> &'static str {
        self.store().backend_name()
    }
}

impl Granted<'_, can::MetricsIndex> {
    /// Every metric of this server in the Prometheus text format, with the database's
    /// figures read now. They cover every namespace, so a token kept to some is refused.
    pub async fn metrics(&self) -> std::result::Result<String, ApiError> {
        if self.confine(&Within::Any) != Some(Within::Any) {
            return Err(ApiError::Forbidden(
                "metrics cover every namespace: this needs a token for all namespaces (*)"
                    .to_owned(),
            ));
        }
        let metrics = self.engine.metrics();
        // What this server counted is answered even when the database is not.
        let status =
            tokio::time::timeout(METRICS_DATABASE_PATIENCE, self.store().status(&Within::Any))
                .await;
        match status {
            Ok(Ok(status)) => {
                metrics.set_status(&status, self.store().pool_status());
                metrics.gauge("tasker_database_up", &[]).set(1.0);
                let events = self.engine.events();
                let lag = events.lag(status.event_head).unwrap_or(0);
                metrics
                    .gauge("tasker_event_feed_lag_events", &[])
                    .set(lag as f64);
                let slowest = events.slowest_subscriber_lag(status.event_head);
                metrics
                    .gauge("tasker_subscriber_lag_events", &[])
                    .set(slowest as f64);
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "metrics could not read the database");
                metrics.gauge("tasker_database_up", &[]).set(0.0);
            }
            Err(_) => {
                tracing::warn!("metrics gave up waiting for the database");
                metrics.gauge("tasker_database_up", &[]).set(0.0);
            }
        }
        metrics
            .gauge("tasker_claim_waiters", &[])
            .set(self.engine.work_listeners() as f64);
        Ok(metrics.render())
    }
}

/// How long a scrape waits for the database's figures before answering without them.
const METRICS_DATABASE_PATIENCE: Duration = Duration::from_secs(5);

/// A subscription's stream, counted against the token's subscription quota, and ended by an
/// `UNAUTHENTICATED` error once the token has expired: checked before each item, and at the
/// expiry time for a quiet stream.
pub(crate) fn until_expiry<T, S>(
    ctx: &Context<'_>,
    stream: S,
) -> Result<impl Stream<Item = Result<T>> + Send + 'static + use<T, S>>
where
    T: Send + 'static,
    S: Stream<Item = T> + Send + 'static,
{
    let caller = principal(ctx)?;
    let deadline = caller
        .expires_at
        .and_then(|exp| chrono::DateTime::from_timestamp(exp, 0));
    // Counted against the token's quota until the stream is dropped.
    let held = ctx
        .data_unchecked::<Arc<crate::quota::Quotas>>()
        .subscribe(caller.key)
        .gql()?;
    let clock = clock(ctx)?;
    // Counted as open in the metrics until the stream is dropped, with the quota.
    let held = (
        held,
        ctx.data_unchecked::<Services>()
            .open("tasker_subscriptions"),
    );
    // A draining server completes its subscriptions: clients resume from their cursor on
    // another replica.
    let draining = ctx.data_unchecked::<Services>().engine.draining();
    let state = (Box::pin(stream), false, held, draining);
    Ok(futures::stream::unfold(
        state,
        move |(mut stream, ended, held, mut draining)| {
            let clock = clock.clone();
            async move {
                if ended || *draining.borrow_and_update() {
                    return None;
                }
                let expired = || deadline.is_some_and(|deadline| clock.now() >= deadline);
                let closing = || {
                    Err(ApiError::Unauthenticated(
                        "the token has expired: reconnect with a fresh token and resume from your last cursor"
                            .to_owned(),
                    ))
                    .gql()
                };
                loop {
                    let wait = deadline.map_or(std::time::Duration::from_secs(3600), |deadline| {
                        (deadline - clock.now()).to_std().unwrap_or_default()
                    });
                    tokio::select! {
                        item = stream.next() => {
                            return match item {
                                Some(_) if expired() => Some((closing(), (stream, true, held, draining))),
                                Some(item) => Some((Ok(item), (stream, false, held, draining))),
                                None => None,
                            };
                        }
                        _ = tokio::time::sleep(wait) => {
                            if expired() {
                                return Some((closing(), (stream, true, held, draining)));
                            }
                        }
                        _ = draining.changed() => return None,
                    }
                }
            }
        },
    ))
}
