//! Rows for the event log and the transition tables, built inside the transaction of the
//! change they record.

use crate::Result;
use crate::entities::{event, step_transition, task_transition};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::{NotSet, Set};
use sea_orm::{ActiveModelTrait, DatabaseTransaction, EntityTrait, IntoActiveModel};
use serde_json::{Map, Value, json};
use tasker_domain::{EventName, StateMachine, StepState, TaskState};
use uuid::Uuid;

/// Where an event happened; the common payload fields of every lifecycle event.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subject<'a> {
    pub namespace: &'a str,
    pub template: &'a str,
    pub task_id: Uuid,
    pub correlation_id: &'a str,
}

pub(crate) fn event_row(
    name: EventName,
    namespace: Option<&str>,
    task_id: Option<Uuid>,
    step_id: Option<Uuid>,
    payload: Value,
    at: DateTime<Utc>,
) -> event::ActiveModel {
    named_event_row(name.as_str(), namespace, task_id, step_id, payload, at)
}

/// An event row under any name (the catalog's, or a template's custom event).
pub(crate) fn named_event_row(
    name: &str,
    namespace: Option<&str>,
    task_id: Option<Uuid>,
    step_id: Option<Uuid>,
    payload: Value,
    at: DateTime<Utc>,
) -> event::ActiveModel {
    event::ActiveModel {
        position: NotSet,
        id: Set(Uuid::now_v7()),
        name: Set(name.to_owned()),
        namespace: Set(namespace.map(str::to_owned)),
        task_id: Set(task_id),
        step_id: Set(step_id),
        payload: Set(payload),
        occurred_at: Set(at),
        sequence: NotSet,
    }
}

impl Subject<'_> {
    /// An event about this task (and one of its steps): the common fields, then `fields`,
    /// then the metadata's fields that are not already there.
    pub(crate) fn event(
        &self,
        name: &str,
        step: Option<(Uuid, &str)>,
        fields: Value,
        metadata: &Value,
        at: DateTime<Utc>,
    ) -> event::ActiveModel {
        let mut payload = json!({
            "task_id": self.task_id,
            "namespace": self.namespace,
            "template": self.template,
            "correlation_id": self.correlation_id,
        });
        if let Some((step_id, step_name)) = step {
            merge(
                &mut payload,
                &json!({ "step_id": step_id, "step": step_name }),
            );
        }
        merge(&mut payload, &fields);
        merge(&mut payload, metadata);
        named_event_row(
            name,
            Some(self.namespace),
            Some(self.task_id),
            step.map(|(step_id, _)| step_id),
            payload,
            at,
        )
    }
}

/// The `task.steps_ready` event of steps of one task that just became claimable.
pub(crate) fn steps_ready(
    subject: Subject<'_>,
    steps: &[(Uuid, &str)],
    at: DateTime<Utc>,
) -> event::ActiveModel {
    let names: Vec<&str> = steps.iter().map(|(_, name)| *name).collect();
    let ids: Vec<Uuid> = steps.iter().map(|(id, _)| *id).collect();
    subject.event(
        EventName::TaskStepsReady.as_str(),
        None,
        json!({ "steps": names, "step_ids": ids, "count": steps.len() }),
        &Value::Null,
        at,
    )
}

/// The transition row and event of one task state change.
pub(crate) fn task_transition(
    subject: Subject<'_>,
    from: Option<TaskState>,
    to: TaskState,
    sort_key: i32,
    metadata: Value,
    at: DateTime<Utc>,
) -> (task_transition::ActiveModel, event::ActiveModel) {
    let name = EventName::of_task_transition(from, to);
    let states = json!({ "from_state": from.map(TaskState::api_name), "to_state": to.api_name() });
    let event = subject.event(name.as_str(), None, states, &metadata, at);
    let row = task_transition::ActiveModel {
        id: Set(Uuid::now_v7()),
        task_id: Set(subject.task_id),
        from_state: Set(from.map(|s| s.as_str().to_owned())),
        to_state: Set(to.as_str().to_owned()),
        sort_key: Set(sort_key),
        metadata: Set(metadata),
        created_at: Set(at),
    };
    (row, event)
}

/// The transition row and event of one step state change.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step_transition(
    subject: Subject<'_>,
    step_id: Uuid,
    step_name: &str,
    from: Option<StepState>,
    to: StepState,
    sort_key: i32,
    metadata: Value,
    at: DateTime<Utc>,
) -> (step_transition::ActiveModel, event::ActiveModel) {
    let name = EventName::of_step_transition(from, to);
    step_transition_as(
        name, subject, step_id, step_name, from, to, sort_key, metadata, at,
    )
}

/// A step state change recorded under an event name of its own (a released attempt goes
/// back to `error` without having failed).
#[allow(clippy::too_many_arguments)]
pub(crate) fn step_transition_as(
    name: EventName,
    subject: Subject<'_>,
    step_id: Uuid,
    step_name: &str,
    from: Option<StepState>,
    to: StepState,
    sort_key: i32,
    metadata: Value,
    at: DateTime<Utc>,
) -> (step_transition::ActiveModel, event::ActiveModel) {
    let states = json!({ "from_state": from.map(StepState::api_name), "to_state": to.api_name() });
    let event = subject.event(
        name.as_str(),
        Some((step_id, step_name)),
        states,
        &metadata,
        at,
    );
    let row = step_transition::ActiveModel {
        id: Set(Uuid::now_v7()),
        step_id: Set(step_id),
        task_id: Set(subject.task_id),
        from_state: Set(from.map(|s| s.as_str().to_owned())),
        to_state: Set(to.as_str().to_owned()),
        sort_key: Set(sort_key),
        metadata: Set(metadata),
        created_at: Set(at),
    };
    (row, event)
}

/// Copies the metadata's fields (reason, attempt, error, ...) into the event payload.
fn merge(payload: &mut Value, metadata: &Value) {
    if let (Value::Object(target), Value::Object(extra)) = (payload, metadata) {
        for (key, value) in extra {
            target.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
}

/// Metadata with only the non-empty fields given.
pub(crate) fn metadata(fields: &[(&str, Option<Value>)]) -> Value {
    let map: Map<String, Value> = fields
        .iter()
        .filter_map(|(key, value)| value.clone().map(|v| ((*key).to_owned(), v)))
        .collect();
    Value::Object(map)
}

/// Rows per multi-row INSERT: keeps every statement under the databases' parameter limits.
const INSERT_CHUNK: usize = 400;

/// Inserts rows in multi-row statements of at most [`INSERT_CHUNK`] rows.
pub(crate) async fn insert_all<A>(
    txn: &DatabaseTransaction,
    rows: impl IntoIterator<Item = A>,
) -> Result<()>
where
    A: ActiveModelTrait + Send,
    A: IntoActiveModel<A>,
{
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<A> = rows.by_ref().take(INSERT_CHUNK).collect();
        <A::Entity as EntityTrait>::insert_many(chunk)
            .exec_without_returning(txn)
            .await?;
    }
    Ok(())
}
