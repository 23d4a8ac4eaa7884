//! Schedules: stored cron expressions (or one-time runs) that start tasks. The maintenance
//! loop fires the due ones ([`Store::fire_schedules`]); each tick starts its task exactly
//! once across replicas and restarts:
//!
//! - the task's idempotency key is `schedule:<id>:<tick ms>`, so a tick fired twice (two
//!   replicas at once, or a crash between the task and the schedule's update) answers the
//!   task the first firing started;
//! - the schedule moves on with a compare-and-set on the tick it started from, and only the
//!   replica whose update took writes the `schedule.fired` events.

use crate::entities::{event, schedule};
use crate::events::event_row;
use crate::records::from_millis;
use crate::sql::Sql;
use crate::tasks::{NewTask, TaskCreation};
use crate::{Error, Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
};
use serde_json::{Value, json};
use tasker_domain::schedule::{CatchUp, Cron, due};
use tasker_domain::{EventName, Priority, Problem, TaskRequest, Within};
use uuid::Uuid;

/// The most schedules one sweep fires; the others go in the next sweep.
const SWEEP_BATCH: i64 = 50;

/// A schedule to create.
#[derive(Debug, Clone, Default)]
pub struct NewSchedule {
    pub namespace: String,
    /// Unique in the namespace: how people name it (pause, resume, delete).
    pub name: String,
    pub template: String,
    /// The newest version at each tick when `None`.
    pub version: Option<String>,
    pub context: Value,
    pub priority: Option<i64>,
    /// Five-field cron expression; exactly one of `cron` and `run_at`.
    pub cron: Option<String>,
    /// IANA time zone of the cron expression; UTC when `None`.
    pub timezone: Option<String>,
    /// One run at this time.
    pub run_at: Option<DateTime<Utc>>,
    /// `skip`, `run_once` (default) or `run_all`.
    pub catch_up: Option<String>,
}

/// A stored schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRecord {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub template: String,
    pub version: Option<String>,
    pub context: Value,
    pub priority: Option<Priority>,
    pub cron: Option<String>,
    pub timezone: String,
    pub run_at: Option<DateTime<Utc>>,
    pub catch_up: CatchUp,
    pub paused: bool,
    /// The next tick to fire; `None` once a one-time schedule fired.
    pub next_fire_at: Option<DateTime<Utc>>,
    pub last_fired_at: Option<DateTime<Utc>>,
    /// Ticks that started a task so far.
    pub fired_count: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ScheduleRecord {
    /// Its next `count` fire times from `after` (while paused too: when it would fire).
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        match self.cron.as_deref() {
            Some(expression) => Cron::parse(expression, &self.timezone)
                .map(|cron| {
                    let from = self
                        .next_fire_at
                        .map_or(after, |next| next - chrono::Duration::milliseconds(1))
                        .max(after - chrono::Duration::milliseconds(1));
                    cron.upcoming(from, count)
                })
                .unwrap_or_default(),
            None => self.next_fire_at.into_iter().take(count).collect(),
        }
    }
}

impl TryFrom<schedule::Model> for ScheduleRecord {
    type Error = Error;

    fn try_from(model: schedule::Model) -> Result<Self> {
        Ok(Self {
            id: model.id,
            namespace: model.namespace,
            name: model.name,
            template: model.template_name,
            version: model.template_version,
            context: model.context,
            priority: model
                .priority
                .and_then(|level| Priority::new(i64::from(level)).ok()),
            cron: model.cron,
            timezone: model.timezone,
            run_at: model.run_at_ms.and_then(from_millis),
            catch_up: CatchUp::parse(&model.catch_up).unwrap_or_default(),
            paused: model.paused,
            next_fire_at: model.next_fire_ms.and_then(from_millis),
            last_fired_at: model.last_fired_ms.and_then(from_millis),
            fired_count: u64::try_from(model.fired_count).unwrap_or_default(),
            created_at: model.created_at,
            updated_at: model.updated_at,
        })
    }
}

/// The event of a change to a schedule (not a firing).
fn schedule_event(
    name: EventName,
    model: &schedule::Model,
    at: DateTime<Utc>,
) -> event::ActiveModel {
    event_row(
        name,
        Some(&model.namespace),
        None,
        None,
        json!({
            "schedule_id": model.id,
            "schedule": model.name,
            "template": model.template_name,
            "cron": model.cron,
            "timezone": model.timezone,
            "next_fire_ms": model.next_fire_ms,
        }),
        at,
    )
}

impl Store {
    /// Validates and stores a schedule (every problem at once, each with its path); its
    /// template must exist and its context pass the template's checks now, as a task's would.
    pub async fn create_schedule(&self, new: NewSchedule) -> Result<ScheduleRecord> {
        let now = self.now();
        let mut problems = Vec::new();
        if let Err(message) = tasker_domain::template::check_name(&new.name) {
            problems.push(Problem::new("name", message));
        }
        let timezone = new.timezone.clone().unwrap_or_else(|| "UTC".to_owned());
        let catch_up = match new.catch_up.as_deref() {
            None => CatchUp::default(),
            Some(name) => CatchUp::parse(name).unwrap_or_else(|| {
                problems.push(Problem::new(
                    "catchUp",
                    format!("unknown policy {name:?} (expected one of: skip, run_once, run_all)"),
                ));
                CatchUp::default()
            }),
        };
        let first = match (&new.cron, new.run_at) {
            (Some(expression), None) => match Cron::parse(expression, &timezone) {
                Ok(cron) => cron.next_after(now),
                Err(found) => {
                    problems.extend(found);
                    None
                }
            },
            (None, Some(run_at)) => Some(run_at),
            _ => {
                problems.push(Problem::new(
                    "cron",
                    "give either cron (a repeating schedule) or runAt (one run), not both or neither",
                ));
                None
            }
        };
        // Checked as a task of it would be, so a bad context fails now, not at each tick.
        let request = TaskRequest {
            context: new.context.clone(),
            priority: new.priority,
            ..TaskRequest::default()
        };
        if let Err(tasker_domain::Error::InvalidRequest(found)) = request.validate() {
            problems.extend(found);
        }
        if !problems.is_empty() {
            return Err(tasker_domain::Error::InvalidRequest(problems).into());
        }
        let template = self
            .starting_template(&new.namespace, &new.template, new.version.as_deref())
            .await?;
        if let Some(check) = &template.context_check {
            check.validate(&new.context)?;
        }
        self.writing(async {
            let txn = self.begin_write().await?;
            let id = Uuid::now_v7();
            let model = schedule::ActiveModel {
                id: Set(id),
                namespace: Set(new.namespace.clone()),
                name: Set(new.name.clone()),
                template_name: Set(new.template.clone()),
                template_version: Set(new.version.clone()),
                context: Set(new.context.clone()),
                priority: Set(new.priority.and_then(|p| i32::try_from(p).ok())),
                cron: Set(new.cron.clone()),
                timezone: Set(timezone.clone()),
                run_at_ms: Set(new.run_at.map(|at| at.timestamp_millis())),
                catch_up: Set(catch_up.as_str().to_owned()),
                paused: Set(false),
                next_fire_ms: Set(first.map(|at| at.timestamp_millis())),
                last_fired_ms: Set(None),
                fired_count: Set(0),
                created_at: Set(now),
                updated_at: Set(now),
            };
            let inserted = schedule::Entity::insert(model)
                .exec_without_returning(&txn)
                .await;
            if let Err(err) = inserted {
                if Self::is_unique_violation(&err) {
                    return Err(Error::Conflict(format!(
                        "a schedule named {:?} exists in namespace {:?}; delete it first, or pick another name",
                        new.name, new.namespace
                    )));
                }
                return Err(err.into());
            }
            let stored = schedule::Entity::find_by_id(id)
                .one(&txn)
                .await?
                .ok_or_else(|| Error::Conflict("the schedule was not written".into()))?;
            event::Entity::insert(schedule_event(EventName::ScheduleCreated, &stored, now))
                .exec_without_returning(&txn)
                .await?;
            self.commit_events(txn).await?;
            stored.try_into()
        })
        .await
    }

    /// The schedules within these namespaces, by namespace and name.
    pub async fn schedules(&self, within: &Within) -> Result<Vec<ScheduleRecord>> {
        let mut query = schedule::Entity::find()
            .order_by_asc(schedule::Column::Namespace)
            .order_by_asc(schedule::Column::Name);
        if let Within::Only(namespaces) = within {
            query = query.filter(schedule::Column::Namespace.is_in(namespaces.iter().cloned()));
        }
        query
            .all(&self.db)
            .await?
            .into_iter()
            .map(ScheduleRecord::try_from)
            .collect()
    }

    /// One schedule by namespace and name.
    pub async fn schedule(&self, namespace: &str, name: &str) -> Result<ScheduleRecord> {
        schedule::Entity::find()
            .filter(schedule::Column::Namespace.eq(namespace))
            .filter(schedule::Column::Name.eq(name))
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "schedule",
                key: format!("{namespace}/{name}"),
            })?
            .try_into()
    }

    /// Pauses (`true`) or resumes (`false`) a schedule. Resuming starts again from the next
    /// tick after now: the ticks of the pause are not made up (a one-time run keeps its time,
    /// and its catch-up policy decides if it is late).
    pub async fn pause_schedule(
        &self,
        namespace: &str,
        name: &str,
        paused: bool,
    ) -> Result<ScheduleRecord> {
        let current = self.schedule(namespace, name).await?;
        let now = self.now();
        let next_fire_ms = match (&current.cron, paused) {
            (Some(expression), false) => Cron::parse(expression, &current.timezone)
                .ok()
                .and_then(|cron| cron.next_after(now))
                .map(|at| at.timestamp_millis()),
            _ => current.next_fire_at.map(|at| at.timestamp_millis()),
        };
        self.writing(async {
            let txn = self.begin_write().await?;
            let mut sql = Sql::new(txn.get_database_backend());
            sql.push("UPDATE schedules SET paused = ")
                .bind(paused)
                .push(", next_fire_ms = ")
                .bind(next_fire_ms)
                .push(", updated_at = ")
                .bind(now)
                .push(" WHERE id = ")
                .bind(current.id)
                .push(" RETURNING *");
            let updated = schedule::Model::find_by_statement(sql.build())
                .one(&txn)
                .await?
                .ok_or_else(|| Error::NotFound {
                    what: "schedule",
                    key: format!("{namespace}/{name}"),
                })?;
            let name = if paused {
                EventName::SchedulePaused
            } else {
                EventName::ScheduleResumed
            };
            event::Entity::insert(schedule_event(name, &updated, now))
                .exec_without_returning(&txn)
                .await?;
            self.commit_events(txn).await?;
            updated.try_into()
        })
        .await
    }

    /// Deletes a schedule; the tasks it started stay.
    pub async fn delete_schedule(&self, namespace: &str, name: &str) -> Result<ScheduleRecord> {
        let current = self.schedule(namespace, name).await?;
        let now = self.now();
        self.writing(async {
            let txn = self.begin_write().await?;
            let mut sql = Sql::new(txn.get_database_backend());
            sql.push("DELETE FROM schedules WHERE id = ")
                .bind(current.id)
                .push(" RETURNING *");
            let deleted = schedule::Model::find_by_statement(sql.build())
                .one(&txn)
                .await?
                .ok_or_else(|| Error::NotFound {
                    what: "schedule",
                    key: format!("{namespace}/{name}"),
                })?;
            event::Entity::insert(schedule_event(EventName::ScheduleDeleted, &deleted, now))
                .exec_without_returning(&txn)
                .await?;
            self.commit_events(txn).await?;
            deleted.try_into()
        })
        .await
    }

    /// Fires the due schedules: a task per tick their catch-up policy keeps, then each
    /// schedule moves on to its next tick. Answers the tasks this call created.
    pub async fn fire_schedules(&self) -> Result<Vec<TaskCreation>> {
        let now = self.now();
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT * FROM schedules")
            .indexed_by("ix_schedules_due")
            .push(" WHERE next_fire_ms IS NOT NULL AND paused = FALSE AND next_fire_ms <= ")
            .bind(now.timestamp_millis())
            .push(" ORDER BY next_fire_ms LIMIT ")
            .bind(SWEEP_BATCH);
        let due_now = schedule::Model::find_by_statement(sql.build())
            .all(&self.db)
            .await?;
        let mut created = Vec::new();
        for model in due_now {
            created.extend(self.fire(model, now).await?);
        }
        Ok(created)
    }

    /// Fires one due schedule.
    async fn fire(&self, model: schedule::Model, now: DateTime<Utc>) -> Result<Vec<TaskCreation>> {
        let Some(first) = model.next_fire_ms.and_then(from_millis) else {
            return Ok(Vec::new());
        };
        let cron = match model.cron.as_deref() {
            Some(expression) => match Cron::parse(expression, &model.timezone) {
                Ok(cron) => Some(cron),
                Err(problems) => {
                    tracing::warn!(schedule = %model.name, ?problems, "a stored schedule no longer parses; it stays due");
                    return Ok(Vec::new());
                }
            },
            None => None,
        };
        let catch_up = CatchUp::parse(&model.catch_up).unwrap_or_default();
        let firing = due(first, cron.as_ref(), catch_up, now);
        let mut fired = Vec::with_capacity(firing.fire.len());
        for tick in &firing.fire {
            let new = NewTask {
                namespace: model.namespace.clone(),
                template: model.template_name.clone(),
                version: model.template_version.clone(),
                trace_parent: None,
                request: TaskRequest {
                    context: model.context.clone(),
                    initiator: Some(format!("schedule:{}", model.name)),
                    source_system: Some("tasker-schedule".to_owned()),
                    reason: Some(format!("schedule {} at {}", model.name, tick.to_rfc3339())),
                    idempotency_key: Some(format!(
                        "schedule:{}:{}",
                        model.id,
                        tick.timestamp_millis()
                    )),
                    priority: model.priority.map(i64::from),
                    ..TaskRequest::default()
                },
            };
            match self.create_task(new).await {
                Ok(creation) => fired.push((*tick, creation)),
                // The template or its schema changed so that the schedule's task is refused:
                // the tick is passed over (and said in the log), the schedule goes on.
                Err(err @ (Error::Domain(_) | Error::NotFound { .. } | Error::Conflict(_))) => {
                    tracing::warn!(schedule = %model.name, error = %err, "a scheduled task was refused; the tick is passed over");
                }
                Err(err) => return Err(err),
            }
        }
        let last_fired = firing.fire.last().map(|tick| tick.timestamp_millis());
        self.writing(async {
            let txn = self.begin_write().await?;
            let mut sql = Sql::new(txn.get_database_backend());
            sql.push("UPDATE schedules SET next_fire_ms = ")
                .bind(firing.next.map(|at| at.timestamp_millis()))
                .push(", last_fired_ms = COALESCE(")
                .bind(last_fired)
                .push(", last_fired_ms), fired_count = fired_count + ")
                .bind(fired.len() as i64)
                .push(", updated_at = ")
                .bind(now)
                .push(" WHERE id = ")
                .bind(model.id)
                .push(" AND next_fire_ms = ")
                .bind(first.timestamp_millis());
            let moved = txn.execute_raw(sql.build()).await?.rows_affected();
            if moved == 0 {
                // Another replica fired this tick first; its events tell of it.
                txn.commit().await?;
                return Ok(());
            }
            for (i, (tick, creation)) in fired.iter().enumerate() {
                let row = event_row(
                    EventName::ScheduleFired,
                    Some(&model.namespace),
                    Some(creation.task.id),
                    None,
                    json!({
                        "schedule_id": model.id,
                        "schedule": model.name,
                        "template": model.template_name,
                        "tick_ms": tick.timestamp_millis(),
                        "correlation_id": creation.task.correlation_id,
                        "skipped": if i == 0 { firing.skipped } else { 0 },
                    }),
                    now,
                );
                event::Entity::insert(row)
                    .exec_without_returning(&txn)
                    .await?;
            }
            if fired.is_empty() {
                txn.commit().await?;
            } else {
                self.commit_events(txn).await?;
            }
            Ok(())
        })
        .await?;
        Ok(fired
            .into_iter()
            .map(|(_, creation)| creation)
            .filter(|creation| creation.created)
            .collect())
    }
}
