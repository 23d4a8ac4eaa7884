//! Reads: task listing with filters and keyset pagination, and the batch reads that the API's
//! DataLoaders use so a page of tasks with their steps costs a constant number of statements.

use crate::entities::{
    event, step_transition, task, task_tag, task_transition, workflow_step, workflow_step_edge,
};
use crate::records::{
    EdgeRecord, EventRecord, StepRecord, StepTransitionRecord, TaskRecord, TaskTransitionRecord,
    convert_all,
};
use crate::{Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Query;
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, FromQueryResult, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use tasker_domain::{StateMachine, TaskState, Within};
use uuid::Uuid;

#[derive(Debug, FromQueryResult)]
struct NamespaceOf {
    namespace: String,
}

/// Ids per `IN (...)` list: well below SQLite's and PostgreSQL's parameter limits.
pub(crate) const ID_CHUNK: usize = 500;

/// Which tasks to list. Empty fields do not filter; `within` always does.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskFilter {
    pub namespace: Option<String>,
    /// Template name (within the namespace when one is given).
    pub template: Option<String>,
    /// Any of these states.
    pub states: Vec<TaskState>,
    /// Every one of these tags.
    pub tags: Vec<String>,
    /// Created at or after.
    pub created_after: Option<DateTime<Utc>>,
    /// Created strictly before.
    pub created_before: Option<DateTime<Utc>>,
    /// Only tasks in these namespaces (the caller's scope).
    pub within: Within,
}

impl TaskFilter {
    /// Every task within these namespaces; narrow further with the other fields.
    pub fn within(within: Within) -> TaskFilter {
        TaskFilter {
            namespace: None,
            template: None,
            states: Vec::new(),
            tags: Vec::new(),
            created_after: None,
            created_before: None,
            within,
        }
    }

    fn condition(&self) -> Condition {
        let mut condition = Condition::all();
        if let Some(namespace) = &self.namespace {
            condition = condition.add(task::Column::Namespace.eq(namespace.as_str()));
        }
        if let Within::Only(within) = &self.within {
            condition =
                condition.add(task::Column::Namespace.is_in(within.iter().map(String::as_str)));
        }
        if let Some(template) = &self.template {
            condition = condition.add(task::Column::TemplateName.eq(template.as_str()));
        }
        if !self.states.is_empty() {
            condition =
                condition.add(task::Column::State.is_in(self.states.iter().map(|s| s.as_str())));
        }
        for tag in &self.tags {
            condition = condition.add(
                task::Column::Id.in_subquery(
                    Query::select()
                        .column(task_tag::Column::TaskId)
                        .from(task_tag::Entity)
                        .and_where(task_tag::Column::Tag.eq(tag.as_str()))
                        .to_owned(),
                ),
            );
        }
        if let Some(after) = self.created_after {
            condition = condition.add(task::Column::CreatedAt.gte(after));
        }
        if let Some(before) = self.created_before {
            condition = condition.add(task::Column::CreatedAt.lt(before));
        }
        condition
    }
}

impl Store {
    pub async fn task(&self, id: Uuid) -> Result<TaskRecord> {
        Self::task_row(&self.db, id).await?.try_into()
    }

    /// Tasks by id, in no particular order; ids not found are left out.
    pub async fn tasks_by_ids(&self, ids: &[Uuid]) -> Result<Vec<TaskRecord>> {
        let mut records = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ID_CHUNK) {
            let models = task::Entity::find()
                .filter(task::Column::Id.is_in(chunk.iter().copied()))
                .all(&self.db)
                .await?;
            records.extend(convert_all::<_, TaskRecord>(models)?);
        }
        Ok(records)
    }

    /// Up to `limit` tasks matching the filter, newest first, strictly older than the task
    /// `after` when given (ids are UUIDv7, so id order is creation order).
    pub async fn list_tasks(
        &self,
        filter: &TaskFilter,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<TaskRecord>> {
        let mut condition = filter.condition();
        if let Some(after) = after {
            condition = condition.add(task::Column::Id.lt(after));
        }
        let models = task::Entity::find()
            .filter(condition)
            .order_by_desc(task::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        convert_all(models)
    }

    pub async fn count_tasks(&self, filter: &TaskFilter) -> Result<u64> {
        Ok(task::Entity::find()
            .filter(filter.condition())
            .count(&self.db)
            .await?)
    }

    /// The steps of these tasks, ordered by task and position.
    pub async fn steps_for_tasks(&self, task_ids: &[Uuid]) -> Result<Vec<StepRecord>> {
        let mut records = Vec::new();
        for chunk in task_ids.chunks(ID_CHUNK) {
            let models = workflow_step::Entity::find()
                .filter(workflow_step::Column::TaskId.is_in(chunk.iter().copied()))
                .order_by_asc(workflow_step::Column::TaskId)
                .order_by_asc(workflow_step::Column::Position)
                .all(&self.db)
                .await?;
            records.extend(convert_all::<_, StepRecord>(models)?);
        }
        Ok(records)
    }

    pub async fn step(&self, id: Uuid) -> Result<StepRecord> {
        Self::step_row(&self.db, id).await?.try_into()
    }

    /// The namespace of a step's task, to check a caller's scope without reading either
    /// record; `NOT_FOUND` for a missing step.
    pub async fn step_namespace(&self, id: Uuid) -> Result<String> {
        let mut sql = crate::sql::Sql::new(self.db.get_database_backend());
        sql.push("SELECT t.namespace FROM workflow_steps s JOIN tasks t ON t.id = s.task_id WHERE s.id = ")
            .bind(id);
        let row = NamespaceOf::find_by_statement(sql.build())
            .one(&self.db)
            .await?;
        row.map(|row| row.namespace)
            .ok_or_else(|| crate::Error::NotFound {
                what: "step",
                key: id.to_string(),
            })
    }

    /// Steps by id, in no particular order; ids not found are left out.
    pub async fn steps_by_ids(&self, ids: &[Uuid]) -> Result<Vec<StepRecord>> {
        let mut records = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ID_CHUNK) {
            let models = workflow_step::Entity::find()
                .filter(workflow_step::Column::Id.is_in(chunk.iter().copied()))
                .all(&self.db)
                .await?;
            records.extend(convert_all::<_, StepRecord>(models)?);
        }
        Ok(records)
    }

    /// The dependency edges of these tasks.
    pub async fn edges_for_tasks(&self, task_ids: &[Uuid]) -> Result<Vec<EdgeRecord>> {
        let mut records = Vec::new();
        for chunk in task_ids.chunks(ID_CHUNK) {
            let models = workflow_step_edge::Entity::find()
                .filter(workflow_step_edge::Column::TaskId.is_in(chunk.iter().copied()))
                .all(&self.db)
                .await?;
            records.extend(models.into_iter().map(EdgeRecord::from));
        }
        Ok(records)
    }

    /// The transitions of these tasks, each task's in order.
    pub async fn task_transitions(&self, task_ids: &[Uuid]) -> Result<Vec<TaskTransitionRecord>> {
        let mut records = Vec::new();
        for chunk in task_ids.chunks(ID_CHUNK) {
            let models = task_transition::Entity::find()
                .filter(task_transition::Column::TaskId.is_in(chunk.iter().copied()))
                .order_by_asc(task_transition::Column::TaskId)
                .order_by_asc(task_transition::Column::SortKey)
                .all(&self.db)
                .await?;
            records.extend(convert_all::<_, TaskTransitionRecord>(models)?);
        }
        Ok(records)
    }

    /// The transitions of these steps, each step's in order.
    pub async fn step_transitions(&self, step_ids: &[Uuid]) -> Result<Vec<StepTransitionRecord>> {
        let mut records = Vec::new();
        for chunk in step_ids.chunks(ID_CHUNK) {
            let models = step_transition::Entity::find()
                .filter(step_transition::Column::StepId.is_in(chunk.iter().copied()))
                .order_by_asc(step_transition::Column::StepId)
                .order_by_asc(step_transition::Column::SortKey)
                .all(&self.db)
                .await?;
            records.extend(convert_all::<_, StepTransitionRecord>(models)?);
        }
        Ok(records)
    }

    /// The events of these tasks, in log order.
    pub async fn events_for_tasks(&self, task_ids: &[Uuid]) -> Result<Vec<EventRecord>> {
        let mut records = Vec::new();
        for chunk in task_ids.chunks(ID_CHUNK) {
            let models = event::Entity::find()
                .filter(event::Column::TaskId.is_in(chunk.iter().copied()))
                .order_by_asc(event::Column::Position)
                .all(&self.db)
                .await?;
            records.extend(models.into_iter().map(EventRecord::from));
        }
        records.sort_by_key(|record| record.position);
        Ok(records)
    }
}
