//! Rows for the event log and the transition tables, built inside the transaction of the
//! change they record.

use crate::entities::{event, step_transition, task_transition};
use crate::sql::Sql;
use crate::write::WriteTxn;
use crate::{Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::{self, NotSet, Set};
use sea_orm::{ActiveModelTrait, ConnectionTrait, EntityName, EntityTrait, IdenStatic, Iterable};
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
    /// An event about this task (and one of its steps): the template (and step name), then
    /// `fields`, then the metadata's fields that are not already there. What the event's
    /// columns hold (task, step, namespace) and a correlation id that is the task's own id are
    /// left out of the stored payload and put back when it is read
    /// ([`with_subject_fields`]), so the log does not store them twice.
    pub(crate) fn event(
        &self,
        name: &str,
        step: Option<(Uuid, &str)>,
        fields: Value,
        metadata: &Value,
        at: DateTime<Utc>,
    ) -> event::ActiveModel {
        let mut payload = Map::new();
        payload.insert("template".to_owned(), Value::from(self.template));
        let mut own_id = Uuid::encode_buffer();
        if self.correlation_id != self.task_id.hyphenated().encode_lower(&mut own_id) {
            payload.insert(
                "correlation_id".to_owned(),
                Value::from(self.correlation_id),
            );
        }
        if let Some((_, step_name)) = step {
            payload.insert("step".to_owned(), Value::from(step_name));
        }
        let mut payload = Value::Object(payload);
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

/// A stored payload as readers get it: the task, step and namespace of the event's columns,
/// and the correlation id (the task's own id unless the payload names another), added where
/// the payload leaves them out.
pub(crate) fn with_subject_fields(
    mut payload: Value,
    namespace: Option<&str>,
    task_id: Option<Uuid>,
    step_id: Option<Uuid>,
) -> Value {
    if let Value::Object(fields) = &mut payload {
        if let Some(task_id) = task_id {
            let id = Value::from(task_id.to_string());
            if !fields.contains_key("correlation_id") {
                fields.insert("correlation_id".to_owned(), id.clone());
            }
            fields.entry("task_id").or_insert(id);
        }
        if let Some(namespace) = namespace {
            fields
                .entry("namespace")
                .or_insert_with(|| Value::from(namespace));
        }
        if let Some(step_id) = step_id {
            fields
                .entry("step_id")
                .or_insert_with(|| Value::from(step_id.to_string()));
        }
    }
    payload
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

/// Bound values per command: under PostgreSQL's 65,535 per statement and SQLite's 32,766,
/// with room to spare. A multi-row INSERT takes as many rows as fit.
const VALUES_PER_COMMAND: usize = 30_000;

/// New rows for several tables, written with as few round trips as the driver allows (see
/// [`Store::insert_rows`]).
#[derive(Default)]
pub(crate) struct Rows {
    tables: Vec<TableRows>,
}

/// Rows of one table that set the same columns.
struct TableRows {
    table: &'static str,
    columns: Vec<&'static str>,
    rows: Vec<Vec<sea_orm::Value>>,
}

impl Rows {
    pub fn new() -> Rows {
        Rows::default()
    }

    /// Adds rows of one table; columns a row leaves unset take their defaults.
    pub fn add<A>(&mut self, models: impl IntoIterator<Item = A>) -> &mut Rows
    where
        A: ActiveModelTrait,
    {
        let table = <A::Entity as Default>::default().table_name();
        for model in models {
            let mut columns = Vec::new();
            let mut values = Vec::new();
            for column in <A::Entity as EntityTrait>::Column::iter() {
                if let ActiveValue::Set(value) | ActiveValue::Unchanged(value) = model.get(column) {
                    columns.push(column.as_str());
                    values.push(value);
                }
            }
            // Rows of a table stay in the order they were added (events are numbered so);
            // tables are written in the order they first appear (parents before children).
            match self
                .tables
                .iter_mut()
                .find(|rows| rows.table == table && rows.columns == columns)
            {
                Some(rows) => rows.rows.push(values),
                None => self.tables.push(TableRows {
                    table,
                    columns,
                    rows: vec![values],
                }),
            }
        }
        self
    }

    /// The multi-row INSERTs, each of at most [`VALUES_PER_COMMAND`] values.
    fn inserts(self) -> Vec<Insert> {
        let mut inserts = Vec::new();
        for table in self.tables {
            let chunk = (VALUES_PER_COMMAND / table.columns.len().max(1)).max(1);
            let head = format!(
                "INSERT INTO \"{}\" ({}) VALUES ",
                table.table,
                table
                    .columns
                    .iter()
                    .map(|column| format!("\"{column}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut rows = table.rows.into_iter().peekable();
            while rows.peek().is_some() {
                inserts.push(Insert {
                    table: table.table,
                    head: head.clone(),
                    rows: rows.by_ref().take(chunk).collect(),
                });
            }
        }
        inserts
    }
}

/// One multi-row INSERT.
struct Insert {
    table: &'static str,
    head: String,
    rows: Vec<Vec<sea_orm::Value>>,
}

impl Insert {
    fn values(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }

    fn render(self, sql: &mut Sql) {
        if sql.is_postgres() && self.table == EVENTS_TABLE {
            return self.render_numbered(sql);
        }
        sql.push(&self.head);
        for (i, row) in self.rows.into_iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            for (j, value) in row.into_iter().enumerate() {
                if j > 0 {
                    sql.push(", ");
                }
                sql.bind(value);
            }
            sql.push(")");
        }
    }
}

impl Insert {
    /// PostgreSQL events, numbered as they are written: `sequence` follows the highest number
    /// given so far (the statement runs under the sequencer lock, taken by an earlier
    /// statement so that this one's snapshot sees every number committed before), in the
    /// order the rows were added, which their positions follow too.
    fn render_numbered(self, sql: &mut Sql) {
        let columns = self
            .head
            .trim_start_matches("INSERT INTO \"events\" (")
            .trim_end_matches(") VALUES ")
            .to_owned();
        let names: Vec<&str> = columns.split(", ").collect();
        let picked: Vec<String> = names.iter().map(|name| format!("v.{name}")).collect();
        sql.push("INSERT INTO \"events\" (")
            .push(&columns)
            .push(", \"sequence\") SELECT ")
            .push(&picked.join(", "))
            .push(", b.base + v.ord FROM (VALUES ");
        for (i, row) in self.rows.into_iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            for value in row {
                sql.bind(value);
                sql.push(", ");
            }
            // Row numbers: the store's own integers, not input.
            sql.push(&(i + 1).to_string()).push(")");
        }
        sql.push(") AS v(")
            .push(&columns)
            .push(", ord) CROSS JOIN (")
            .push(crate::event_log::SEQUENCE_BASE)
            .push(") AS b ORDER BY v.ord");
    }
}

/// The event log's table, whose rows PostgreSQL numbers as they are written.
const EVENTS_TABLE: &str = "events";

impl Store {
    /// Writes the rows in as few round trips as the driver allows: on SQLite, many INSERTs in
    /// one script (the driver runs them one after another on its thread), sent with the
    /// transaction's next command; on PostgreSQL, one statement whose INSERTs but the last are
    /// data-modifying CTEs, events numbered as they are written (after the sequencer lock,
    /// see [`Store::commit_events`]). Each statement stays under
    /// [`VALUES_PER_COMMAND`] bound values (SQLite's limit is per statement, so a script that
    /// carries several may hold more).
    pub(crate) async fn insert_rows(&self, txn: &WriteTxn, rows: Rows) -> Result<()> {
        let backend = txn.get_database_backend();
        let mut commands: Vec<Vec<Insert>> = Vec::new();
        let mut bound = 0;
        for insert in rows.inserts() {
            let values = insert.values();
            // PostgreSQL runs the CTEs of one statement in no set order: two INSERTs into one
            // table there could number their rows (event positions) out of order.
            let fits = |command: &Vec<Insert>| {
                bound + values <= VALUES_PER_COMMAND
                    && (backend != sea_orm::DbBackend::Postgres
                        || command.iter().all(|other| other.table != insert.table))
            };
            match commands.last_mut() {
                Some(command) if fits(command) => command.push(insert),
                _ => {
                    bound = 0;
                    commands.push(vec![insert]);
                }
            }
            bound += values;
        }
        if backend == sea_orm::DbBackend::Postgres
            && commands
                .iter()
                .flatten()
                .any(|insert| insert.table == EVENTS_TABLE)
        {
            self.lock_sequencer(txn).await?;
        }
        for mut command in commands {
            let statements = command.len() as u64;
            let mut sql = Sql::new(backend);
            if sql.is_postgres() {
                // WITH w0 AS (INSERT …), w1 AS (INSERT …) INSERT …
                let last = command.pop();
                for (i, insert) in command.into_iter().enumerate() {
                    sql.push(if i == 0 { "WITH " } else { ", " })
                        .push(&format!("w{i} AS ("));
                    insert.render(&mut sql);
                    sql.push(") ");
                }
                if let Some(last) = last {
                    last.render(&mut sql);
                }
            } else {
                for (i, insert) in command.into_iter().enumerate() {
                    if i > 0 {
                        sql.push("; ");
                    }
                    insert.render(&mut sql);
                }
            }
            // Nothing is read back: on SQLite the rows go with the transaction's next command.
            txn.queue(sql.build(), statements).await?;
        }
        Ok(())
    }
}
