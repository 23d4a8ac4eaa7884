//! Batch loading with async-graphql's [`DataLoader`], scoped to one result set. Every task
//! object knows the set it was returned in (a page of `tasks`, or a single task); the first
//! nested field that needs, say, steps asks the set's loader for the steps of every task of
//! the set, and the other fields wait for that same batch. (The DataLoader alone would not
//! do: it gathers keys for a moment and does not share a batch already in flight, so a field
//! asking a little later — `graph` reads steps, then edges — would cost another statement.)
//! Listing 100 tasks with their steps, edges, transitions and templates therefore costs one
//! statement per kind, whatever the page size and however the executor schedules the fields;
//! and a set lives only as long as the objects of one response, so nothing is served stale.

use crate::error::ApiError;
use async_graphql::dataloader::{DataLoader, Loader};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use tasker_store::{
    EdgeRecord, EventRecord, StepRecord, StepTransitionRecord, Store, TaskRecord,
    TaskTransitionRecord, TemplateRecord,
};
use tokio::sync::OnceCell;
use uuid::Uuid;

type Loaded<K, V> = OnceCell<HashMap<K, V>>;

/// The tasks of one response and, once asked for, their nested data.
pub struct TaskSet {
    tasks: Vec<TaskRecord>,
    store: Store,
    loader: DataLoader<SetLoader>,
    steps: Loaded<StepsOf, Arc<[StepRecord]>>,
    edges: Loaded<EdgesOf, Arc<[EdgeRecord]>>,
    task_transitions: Loaded<TransitionsOf, Arc<[TaskTransitionRecord]>>,
    step_transitions: Loaded<TransitionsOfStep, Arc<[StepTransitionRecord]>>,
    events: Loaded<EventsOf, Arc<[EventRecord]>>,
    templates: Loaded<TemplateOf, Arc<TemplateRecord>>,
    /// What the limits of the set's unfinished steps hold now.
    step_limits: OnceCell<StepLimitsNow>,
}

/// What the limits of a set's waiting steps hold now.
#[derive(Debug, Default)]
pub struct StepLimitsNow {
    /// Spent rate limits' buckets, with when each frees.
    pub spent: HashMap<String, DateTime<Utc>>,
    /// Step concurrency limits' buckets, with their running attempts.
    pub running: HashMap<String, u64>,
}

impl StepLimitsNow {
    /// What holds `step` back even when it is ready, if anything.
    pub fn hold(&self, step: &StepRecord) -> Option<tasker_domain::execution::Hold> {
        use tasker_domain::execution::Hold;
        if let Some(limit) = &step.rate_limit
            && self.spent.contains_key(&limit.bucket)
        {
            return Some(Hold::RateLimit);
        }
        let limit = step.concurrency.as_ref()?;
        let running = self.running.get(&limit.bucket).copied().unwrap_or(0);
        (running >= u64::from(limit.limit)).then_some(Hold::ConcurrencySlot)
    }
}

/// The distinct values, sorted.
fn distinct(values: impl Iterator<Item = String>) -> Vec<String> {
    let mut values: Vec<String> = values.collect();
    values.sort_unstable();
    values.dedup();
    values
}

/// Keys of the by-task loads: the task whose records are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct StepsOf(Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct EdgesOf(Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TransitionsOf(Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct EventsOf(Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TemplateOf(Uuid);
/// Key of the by-step load: the step whose transitions are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TransitionsOfStep(Uuid);

/// Loads the records of a set's tasks and steps, one statement per kind and batch.
pub struct SetLoader {
    store: Store,
    /// Each task's template, to load templates by task.
    templates: HashMap<Uuid, Uuid>,
}

/// Records grouped under the key of their owner.
fn grouped<K: Hash + Eq, T>(records: Vec<T>, key: impl Fn(&T) -> K) -> HashMap<K, Arc<[T]>> {
    let mut map: HashMap<K, Vec<T>> = HashMap::new();
    for record in records {
        map.entry(key(&record)).or_default().push(record);
    }
    map.into_iter().map(|(k, v)| (k, v.into())).collect()
}

fn ids<K>(keys: &[K], id: impl Fn(&K) -> Uuid) -> Vec<Uuid> {
    keys.iter().map(id).collect()
}

/// A by-key load of records grouped by their owner's id: `$query` reads them for a list of
/// ids, `$owner` says whose each one is.
macro_rules! grouped_loader {
    ($loader:ty, $key:ident, $record:ty, $query:ident, $owner:expr) => {
        impl Loader<$key> for $loader {
            type Value = Arc<[$record]>;
            type Error = ApiError;

            async fn load(&self, keys: &[$key]) -> Result<HashMap<$key, Self::Value>, ApiError> {
                let records = self.store.$query(&ids(keys, |key| key.0)).await?;
                Ok(grouped(records, |record: &$record| $key($owner(record))))
            }
        }
    };
}

grouped_loader!(
    SetLoader,
    StepsOf,
    StepRecord,
    steps_for_tasks,
    |r: &StepRecord| r.task_id
);
grouped_loader!(
    SetLoader,
    EdgesOf,
    EdgeRecord,
    edges_for_tasks,
    |r: &EdgeRecord| r.task_id
);
grouped_loader!(
    SetLoader,
    TransitionsOf,
    TaskTransitionRecord,
    task_transitions,
    |r: &TaskTransitionRecord| r.task_id
);
grouped_loader!(
    SetLoader,
    EventsOf,
    EventRecord,
    events_for_tasks,
    |r: &EventRecord| r.task_id.unwrap_or_default()
);
grouped_loader!(
    SetLoader,
    TransitionsOfStep,
    StepTransitionRecord,
    step_transitions,
    |r: &StepTransitionRecord| r.step_id
);

impl Loader<TemplateOf> for SetLoader {
    type Value = Arc<TemplateRecord>;
    type Error = ApiError;

    async fn load(
        &self,
        keys: &[TemplateOf],
    ) -> Result<HashMap<TemplateOf, Self::Value>, ApiError> {
        let mut template_ids: Vec<Uuid> = keys
            .iter()
            .filter_map(|key| self.templates.get(&key.0).copied())
            .collect();
        template_ids.sort_unstable();
        template_ids.dedup();
        let templates: HashMap<Uuid, Arc<TemplateRecord>> = self
            .store
            .templates_by_ids(&template_ids)
            .await?
            .into_iter()
            .map(|record| (record.id, Arc::new(record)))
            .collect();
        Ok(keys
            .iter()
            .filter_map(|key| {
                let template = templates.get(self.templates.get(&key.0)?)?;
                Some((*key, template.clone()))
            })
            .collect())
    }
}

impl TaskSet {
    pub fn new(store: Store, tasks: Vec<TaskRecord>) -> Arc<TaskSet> {
        let templates = tasks
            .iter()
            .map(|task| (task.id, task.template_id))
            .collect();
        // Each load asks for every key of the set at once: one whole batch, sent at once.
        let loader = DataLoader::new(
            SetLoader {
                store: store.clone(),
                templates,
            },
            tokio::spawn,
        )
        .max_batch_size(1);
        Arc::new(TaskSet {
            tasks,
            store,
            loader,
            steps: OnceCell::new(),
            edges: OnceCell::new(),
            task_transitions: OnceCell::new(),
            step_transitions: OnceCell::new(),
            events: OnceCell::new(),
            templates: OnceCell::new(),
            step_limits: OnceCell::new(),
        })
    }

    /// The time by the store's clock, for fields derived from it.
    pub fn now(&self) -> DateTime<Utc> {
        self.store.clock().now()
    }

    pub fn tasks(&self) -> &[TaskRecord] {
        &self.tasks
    }

    pub fn task(&self, id: Uuid) -> Option<&TaskRecord> {
        self.tasks.iter().find(|task| task.id == id)
    }

    /// The records of kind `K` for every key of the set, loaded by the first field that asks
    /// while the others wait for the same batch.
    async fn every<'a, K, V>(
        &'a self,
        loaded: &'a Loaded<K, V>,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<&'a HashMap<K, V>, ApiError>
    where
        K: Send + Sync + Hash + Eq + Clone + 'static,
        SetLoader: Loader<K, Value = V, Error = ApiError>,
    {
        loaded.get_or_try_init(|| self.loader.load_many(keys)).await
    }

    fn task_keys<K>(&self, key: impl Fn(Uuid) -> K) -> impl Iterator<Item = K> {
        self.tasks.iter().map(move |task| key(task.id))
    }

    /// The steps of one task of the set, by position.
    pub async fn steps(&self, task_id: Uuid) -> Result<Arc<[StepRecord]>, ApiError> {
        let all = self.every(&self.steps, self.task_keys(StepsOf)).await?;
        Ok(owned(all, &StepsOf(task_id)))
    }

    /// What the limits of the set's unfinished steps hold now: the spent rate limits with
    /// when each frees, and each concurrency limit's running attempts. At most one statement
    /// per kind for the set, none when no step has such a limit.
    pub async fn step_limits(&self) -> Result<&StepLimitsNow, ApiError> {
        self.step_limits
            .get_or_try_init(|| async {
                let steps = self.every(&self.steps, self.task_keys(StepsOf)).await?;
                let waiting = || {
                    steps
                        .values()
                        .flat_map(|steps| steps.iter())
                        .filter(|step| {
                            matches!(
                                step.state,
                                tasker_domain::StepState::Pending | tasker_domain::StepState::Error
                            )
                        })
                };
                let rate: Vec<String> = distinct(
                    waiting().filter_map(|step| Some(step.rate_limit.as_ref()?.bucket.clone())),
                );
                let slots: Vec<String> = distinct(
                    waiting().filter_map(|step| Some(step.concurrency.as_ref()?.bucket.clone())),
                );
                Ok(StepLimitsNow {
                    spent: self.store.spent_rate_limits(&rate).await?,
                    running: self.store.running_attempts(&slots).await?,
                })
            })
            .await
    }

    pub async fn edges(&self, task_id: Uuid) -> Result<Arc<[EdgeRecord]>, ApiError> {
        let all = self.every(&self.edges, self.task_keys(EdgesOf)).await?;
        Ok(owned(all, &EdgesOf(task_id)))
    }

    pub async fn task_transitions(
        &self,
        task_id: Uuid,
    ) -> Result<Arc<[TaskTransitionRecord]>, ApiError> {
        let keys = self.task_keys(TransitionsOf);
        let all = self.every(&self.task_transitions, keys).await?;
        Ok(owned(all, &TransitionsOf(task_id)))
    }

    /// The transitions of one step; loads those of every step in the set at once.
    pub async fn step_transitions(
        &self,
        step_id: Uuid,
    ) -> Result<Arc<[StepTransitionRecord]>, ApiError> {
        let steps = self.every(&self.steps, self.task_keys(StepsOf)).await?;
        let mut keys = Vec::new();
        for steps in steps.values() {
            keys.extend(steps.iter().map(|step| TransitionsOfStep(step.id)));
        }
        let all = self.every(&self.step_transitions, keys).await?;
        Ok(owned(all, &TransitionsOfStep(step_id)))
    }

    pub async fn events(&self, task_id: Uuid) -> Result<Arc<[EventRecord]>, ApiError> {
        let all = self.every(&self.events, self.task_keys(EventsOf)).await?;
        Ok(owned(all, &EventsOf(task_id)))
    }

    pub async fn template(&self, task_id: Uuid) -> Result<Arc<TemplateRecord>, ApiError> {
        let all = self
            .every(&self.templates, self.task_keys(TemplateOf))
            .await?;
        all.get(&TemplateOf(task_id)).cloned().ok_or_else(|| {
            ApiError::NotFound(format!("the template of task {task_id} was not found"))
        })
    }
}

/// One key's records; none when the loader found none.
fn owned<K: Hash + Eq, T>(all: &HashMap<K, Arc<[T]>>, key: &K) -> Arc<[T]> {
    all.get(key).cloned().unwrap_or_else(|| Arc::new([]))
}
