//! Batch loading by result set. Every task object knows the set it was returned in (a page of
//! `tasks`, or a single task); the first nested field that needs, say, steps loads the steps
//! of every task in the set in one statement, and the others share the result. Listing 100
//! tasks with their steps, edges, transitions and templates therefore costs one statement per
//! kind, whatever the page size and however the executor schedules the fields; and a set lives
//! only as long as the objects of one response, so nothing is served stale.

use crate::error::ApiError;
use std::collections::HashMap;
use tasker_store::{
    EdgeRecord, EventRecord, StepRecord, StepTransitionRecord, Store, TaskRecord,
    TaskTransitionRecord, TemplateRecord,
};
use tokio::sync::OnceCell;
use uuid::Uuid;

type Loaded<T> = OnceCell<HashMap<Uuid, Vec<T>>>;

/// The tasks of one response and, once asked for, their nested data.
pub struct TaskSet {
    store: Store,
    tasks: Vec<TaskRecord>,
    steps: Loaded<StepRecord>,
    edges: Loaded<EdgeRecord>,
    task_transitions: Loaded<TaskTransitionRecord>,
    step_transitions: Loaded<StepTransitionRecord>,
    events: Loaded<EventRecord>,
    templates: OnceCell<HashMap<Uuid, TemplateRecord>>,
}

fn grouped<T>(records: Vec<T>, key: impl Fn(&T) -> Uuid) -> HashMap<Uuid, Vec<T>> {
    let mut map: HashMap<Uuid, Vec<T>> = HashMap::new();
    for record in records {
        map.entry(key(&record)).or_default().push(record);
    }
    map
}

fn slice<'a, T>(map: &'a HashMap<Uuid, Vec<T>>, id: &Uuid) -> &'a [T] {
    map.get(id).map_or(&[], Vec::as_slice)
}

impl TaskSet {
    pub fn new(store: Store, tasks: Vec<TaskRecord>) -> std::sync::Arc<TaskSet> {
        std::sync::Arc::new(TaskSet {
            store,
            tasks,
            steps: OnceCell::new(),
            edges: OnceCell::new(),
            task_transitions: OnceCell::new(),
            step_transitions: OnceCell::new(),
            events: OnceCell::new(),
            templates: OnceCell::new(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn tasks(&self) -> &[TaskRecord] {
        &self.tasks
    }

    pub fn task(&self, id: Uuid) -> Option<&TaskRecord> {
        self.tasks.iter().find(|task| task.id == id)
    }

    fn task_ids(&self) -> Vec<Uuid> {
        self.tasks.iter().map(|task| task.id).collect()
    }

    /// The steps of one task of the set, by position.
    pub async fn steps(&self, task_id: Uuid) -> Result<&[StepRecord], ApiError> {
        let map = self
            .steps
            .get_or_try_init(|| async {
                let steps = self.store.steps_for_tasks(&self.task_ids()).await?;
                Ok::<_, ApiError>(grouped(steps, |step| step.task_id))
            })
            .await?;
        Ok(slice(map, &task_id))
    }

    pub async fn edges(&self, task_id: Uuid) -> Result<&[EdgeRecord], ApiError> {
        let map = self
            .edges
            .get_or_try_init(|| async {
                let edges = self.store.edges_for_tasks(&self.task_ids()).await?;
                Ok::<_, ApiError>(grouped(edges, |edge| edge.task_id))
            })
            .await?;
        Ok(slice(map, &task_id))
    }

    pub async fn task_transitions(
        &self,
        task_id: Uuid,
    ) -> Result<&[TaskTransitionRecord], ApiError> {
        let map = self
            .task_transitions
            .get_or_try_init(|| async {
                let records = self.store.task_transitions(&self.task_ids()).await?;
                Ok::<_, ApiError>(grouped(records, |record| record.task_id))
            })
            .await?;
        Ok(slice(map, &task_id))
    }

    /// The transitions of one step; loads those of every step in the set at once.
    pub async fn step_transitions(
        &self,
        step_id: Uuid,
    ) -> Result<&[StepTransitionRecord], ApiError> {
        let map = self
            .step_transitions
            .get_or_try_init(|| async {
                let mut step_ids = Vec::new();
                for task in &self.tasks {
                    step_ids.extend(self.steps(task.id).await?.iter().map(|step| step.id));
                }
                let records = self.store.step_transitions(&step_ids).await?;
                Ok::<_, ApiError>(grouped(records, |record| record.step_id))
            })
            .await?;
        Ok(slice(map, &step_id))
    }

    pub async fn events(&self, task_id: Uuid) -> Result<&[EventRecord], ApiError> {
        let map = self
            .events
            .get_or_try_init(|| async {
                let records = self.store.events_for_tasks(&self.task_ids()).await?;
                Ok::<_, ApiError>(grouped(records, |record| {
                    record.task_id.unwrap_or_default()
                }))
            })
            .await?;
        Ok(slice(map, &task_id))
    }

    pub async fn template(&self, template_id: Uuid) -> Result<&TemplateRecord, ApiError> {
        let map = self
            .templates
            .get_or_try_init(|| async {
                let mut ids: Vec<Uuid> = self.tasks.iter().map(|task| task.template_id).collect();
                ids.sort_unstable();
                ids.dedup();
                let records = self.store.templates_by_ids(&ids).await?;
                Ok::<_, ApiError>(records.into_iter().map(|r| (r.id, r)).collect())
            })
            .await?;
        map.get(&template_id)
            .ok_or_else(|| ApiError::NotFound(format!("template {template_id} was not found")))
    }
}
