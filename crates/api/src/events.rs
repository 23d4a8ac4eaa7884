//! The event log over GraphQL: the catalog, a cursor-paginated query for clients that poll,
//! and a subscription that replays from a cursor and then follows live — the same cursors,
//! the same order, no gap and no duplicate.

use crate::access::{Granted, can, grant};
use crate::error::{ApiError, GqlResultExt};
use crate::ids::{event_cursor, parse_event_cursor};
use crate::objects::Event;
use async_graphql::{Context, ID, InputObject, Object, Result, SimpleObject};
use futures::{Stream, StreamExt};
use tasker_domain::{EventName, Within};
use tasker_store::{EventFilter, EventRecord};

/// The `after` argument of the log's readers, checked.
fn after_cursor(after: Option<String>) -> Result<Option<tasker_store::EventCursor>> {
    after
        .as_deref()
        .map(|text| parse_event_cursor(text, "after"))
        .transpose()
        .gql()
}

/// Which events; every given field must match.
#[derive(InputObject, Default, Clone)]
pub struct EventFilterInput {
    /// Any of these namespaces.
    namespaces: Option<Vec<String>>,
    /// One task's events.
    task_id: Option<ID>,
    /// Any of these event names (see `eventCatalog`).
    names: Option<Vec<String>>,
}

impl EventFilterInput {
    /// Checks names against the catalog and that the task exists (in the caller's scope); the
    /// view keeps the filter to the caller's namespaces.
    async fn resolve(self, granted: &Granted<'_, can::EventSubscribe>) -> Result<EventFilter> {
        crate::limits::filter_list("filter.names", self.names.as_ref()).gql()?;
        crate::limits::filter_list("filter.namespaces", self.namespaces.as_ref()).gql()?;
        let names = self.names.unwrap_or_default();
        for (i, name) in names.iter().enumerate() {
            if !EventName::is_subscribable(name) {
                return Err(ApiError::invalid(
                    &format!("filter.names[{i}]"),
                    format!("{name:?} is not in the event catalog (query eventCatalog; custom events are custom.<name>)"),
                ))
                .gql();
            }
        }
        let task_id = match self.task_id {
            Some(id) => {
                let id = crate::ids::parse_id(&id, "filter.taskId").gql()?;
                granted.check_task(id).await?;
                Some(id)
            }
            None => None,
        };
        let namespaces = self.namespaces.unwrap_or_default();
        let within = match tasker_domain::NamespaceSet::new(namespaces) {
            Some(asked) => Within::Only(asked),
            None => Within::Any,
        };
        Ok(EventFilter {
            task_id,
            names,
            within,
        })
    }
}

/// One kind of event.
#[derive(SimpleObject)]
pub struct EventDefinition {
    name: String,
    description: String,
    payload_fields: Vec<String>,
    /// For a custom event: the template that declares it (`namespace/name@version`).
    template: Option<String>,
}

pub struct EventConnection {
    events: Vec<EventRecord>,
    has_next_page: bool,
}

#[Object]
impl EventConnection {
    async fn edges(&self) -> Vec<EventEdge> {
        self.events
            .iter()
            .map(|event| EventEdge {
                cursor: event_cursor(event.cursor()),
                node: Event(event.clone()),
            })
            .collect()
    }

    async fn nodes(&self) -> Vec<Event> {
        self.events.iter().cloned().map(Event).collect()
    }

    async fn page_info(&self) -> crate::objects::PageInfo {
        crate::objects::PageInfo::new(
            self.has_next_page,
            false,
            self.events.first().map(|e| event_cursor(e.cursor())),
            self.events.last().map(|e| event_cursor(e.cursor())),
        )
    }
}

pub struct EventEdge {
    cursor: String,
    node: Event,
}

#[Object]
impl EventEdge {
    async fn cursor(&self) -> &str {
        &self.cursor
    }

    async fn node(&self) -> &Event {
        &self.node
    }
}

#[derive(Default)]
pub struct EventQuery;

#[Object]
impl EventQuery {
    /// Every event this server emits, with its payload fields, then the custom events the
    /// registered templates declare.
    async fn event_catalog(&self, ctx: &Context<'_>) -> Result<Vec<EventDefinition>> {
        let granted = grant::<can::EventSubscribe>(ctx)?;
        let fields = |list: &[&str]| list.iter().map(|f| (*f).to_owned()).collect::<Vec<_>>();
        let mut catalog: Vec<EventDefinition> = EventName::ALL
            .into_iter()
            .map(|event| EventDefinition {
                name: event.as_str().to_owned(),
                description: event.description().to_owned(),
                payload_fields: fields(&event.payload_fields()),
                template: None,
            })
            .collect();
        for record in granted.templates().await? {
            for custom in &record.template.custom_events {
                catalog.push(EventDefinition {
                    name: format!(
                        "{}{}",
                        tasker_domain::template::CUSTOM_EVENT_PREFIX,
                        custom.name
                    ),
                    description: custom
                        .description
                        .clone()
                        .unwrap_or_else(|| "Published by a worker of this template.".to_owned()),
                    payload_fields: fields(tasker_domain::event::CUSTOM_EVENT_FIELDS),
                    template: Some(record.template.key()),
                });
            }
        }
        Ok(catalog)
    }

    /// The event log's newest cursor now. Read it before loading a page, then subscribe with
    /// `after` set to it: every change after the page was read is delivered, none is missed.
    async fn event_head(&self, ctx: &Context<'_>) -> Result<String> {
        let granted = grant::<can::EventSubscribe>(ctx)?;
        Ok(event_cursor(granted.event_head().await?))
    }

    /// The event log in order, `first` at a time (at most 500 by default) after a cursor; the same
    /// cursors as the `events` subscription, for clients that cannot keep a WebSocket.
    async fn events(
        &self,
        ctx: &Context<'_>,
        filter: Option<EventFilterInput>,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
    ) -> Result<EventConnection> {
        let first = crate::limits::page_size(ctx, first, |limits| limits.max_events_page)?;
        let after = after_cursor(after)?;
        let granted = grant::<can::EventSubscribe>(ctx)?;
        let filter = filter.unwrap_or_default().resolve(&granted).await?;
        let mut events = granted.events(filter, after, first + 1).await?;
        let has_next_page = events.len() > first as usize;
        events.truncate(first as usize);
        Ok(EventConnection {
            events,
            has_next_page,
        })
    }
}

/// The `events` subscription: replay from `after` (or from now), then follow live.
pub async fn subscribe(
    ctx: &Context<'_>,
    filter: Option<EventFilterInput>,
    after: Option<String>,
) -> Result<impl Stream<Item = Event> + use<>> {
    let granted = grant::<can::EventSubscribe>(ctx)?;
    let after = after_cursor(after)?;
    let filter = filter.unwrap_or_default().resolve(&granted).await?;
    let Some(follow) = granted.follow(filter, after).await? else {
        // Nothing the caller may read: a stream that stays quiet.
        return Ok(futures::stream::pending().left_stream());
    };
    Ok(futures::stream::unfold(follow, |mut follow| async move {
        let event = follow.next().await?;
        Some((Event(event), follow))
    })
    .right_stream())
}

/// A task after something about it changed.
#[derive(SimpleObject)]
pub struct TaskUpdate {
    /// Where this update stands in the event log: pass it as `after` to resume with no gap and
    /// no duplicate.
    cursor: String,
    /// The task, read after the events below (fresh: ask for `changedSteps` rather than the
    /// whole graph on every update).
    task: crate::objects::Task,
    /// The steps the new events are about (empty in a first snapshot with no events).
    changed_steps: Vec<crate::objects::Step>,
    /// The task's events since the previous update (or since `after`), in log order.
    events: Vec<Event>,
    /// The task has ended (complete, failed, cancelled or resolved) and the log holds nothing
    /// more about it: the stream completes after this update.
    last: bool,
}

impl From<crate::access::TaskChange> for TaskUpdate {
    fn from(change: crate::access::TaskChange) -> Self {
        TaskUpdate {
            cursor: event_cursor(change.cursor),
            task: change.task,
            changed_steps: change.changed_steps,
            events: change.events.into_iter().map(Event).collect(),
            last: change.last,
        }
    }
}

/// The `taskUpdated` subscription: the task now (or its events after `after`, with the task),
/// then an update whenever events about it commit, until it has ended.
pub async fn task_updates(
    ctx: &Context<'_>,
    id: ID,
    after: Option<String>,
) -> Result<impl Stream<Item = TaskUpdate> + use<>> {
    let after = after_cursor(after)?;
    let granted = grant::<can::EventSubscribe>(ctx)?;
    let shown = grant::<can::TaskShow>(ctx)?;
    let task_id = crate::ids::parse_id(&id, "id").gql()?;
    let changes = granted.follow_task(&shown, task_id, after).await?;
    Ok(changes.map(TaskUpdate::from))
}

/// Which tasks `tasksUpdated` follows; every given field must match. There is no state
/// filter: a list filtered by state must see its tasks leave that state.
#[derive(InputObject, Default)]
pub struct TaskStreamFilterInput {
    namespace: Option<String>,
    /// Template name.
    template: Option<String>,
    /// Every one of these tags.
    tags: Option<Vec<String>>,
}

/// A task's own state changed (or it was created).
#[derive(SimpleObject)]
pub struct TaskListUpdate {
    /// Where this update stands in the event log: pass it as `after` to resume.
    cursor: String,
    /// The lifecycle event (`task.created`, `task.started`, `task.completed`, …).
    event: Event,
    /// The task as read just after the event (at least as new as it).
    task: crate::objects::Task,
}

/// The `tasksUpdated` subscription: every lifecycle event of the matching tasks in log order,
/// replayed after `after` (or from now), each with its task.
pub async fn task_list_updates(
    ctx: &Context<'_>,
    filter: Option<TaskStreamFilterInput>,
    after: Option<String>,
) -> Result<impl Stream<Item = TaskListUpdate> + use<>> {
    let after = after_cursor(after)?;
    let filter = filter.unwrap_or_default();
    crate::limits::filter_list("filter.tags", filter.tags.as_ref()).gql()?;
    let stream = crate::access::TaskStream {
        namespace: filter.namespace,
        template: filter.template,
        tags: filter.tags.unwrap_or_default(),
    };
    let granted = grant::<can::EventSubscribe>(ctx)?;
    let listed = grant::<can::TaskIndex>(ctx)?;
    let Some(changes) = granted.follow_tasks(&listed, stream, after).await? else {
        // Nothing the caller may read: a stream that stays quiet.
        return Ok(futures::stream::pending().left_stream());
    };
    Ok(changes
        .flat_map(|batch| {
            futures::stream::iter(batch.into_iter().map(|change| TaskListUpdate {
                cursor: event_cursor(change.event.cursor()),
                event: Event(change.event),
                task: change.task,
            }))
        })
        .right_stream())
}
