//! Registering templates and reading namespaces and templates back.

use crate::entities::{event, namespace, task_template};
use crate::events::event_row;
use crate::records::{NamespaceRecord, TemplateRecord, convert_all};
use crate::sql::Sql;
use crate::{Error, Result, Store};
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::FromQueryResult;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tasker_domain::{ContextCheck, EventName, TaskTemplate};
use uuid::Uuid;

/// What registering did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationOutcome {
    /// A new version was stored.
    Created,
    /// The same definition was already registered; nothing changed.
    Unchanged,
    /// A different definition under the same version was overwritten (`replace: true`).
    Replaced,
}

/// The stored template and what registering it did.
#[derive(Debug, Clone)]
pub struct Registration {
    pub template: TemplateRecord,
    pub outcome: RegistrationOutcome,
}

impl Store {
    /// Validates and stores a definition (YAML or JSON). Identical content is a no-op; a
    /// different definition under an existing version is a conflict unless `replace` is set.
    pub async fn register_template(&self, source: &str, replace: bool) -> Result<Registration> {
        self.writing(async {
            let template = TaskTemplate::parse(source)?;
            match self.register_parsed(&template, replace).await {
                // Two identical registrations raced; the second attempt sees the first one's row.
                Err(Error::Database(err)) if Self::is_unique_violation(&err) => {
                    self.register_parsed(&template, replace).await
                }
                other => other,
            }
        })
        .await
    }

    async fn register_parsed(
        &self,
        template: &TaskTemplate,
        replace: bool,
    ) -> Result<Registration> {
        let now = self.now();
        let definition = template.to_normalized();
        let version = template.version.to_string();
        let txn = self.begin_write().await?;
        namespace::Entity::insert(namespace::ActiveModel {
            id: Set(Uuid::now_v7()),
            name: Set(template.namespace.clone()),
            created_at: Set(now),
        })
        .on_conflict_do_nothing_on([namespace::Column::Name])
        .exec_without_returning(&txn)
        .await?;

        let existing = task_template::Entity::find()
            .filter(task_template::Column::Namespace.eq(&template.namespace))
            .filter(task_template::Column::Name.eq(&template.name))
            .filter(task_template::Column::Version.eq(&version))
            .one(&txn)
            .await?;
        let (model, outcome) = match existing {
            Some(model) if model.definition == definition => {
                return Ok(Registration {
                    template: model.try_into()?,
                    outcome: RegistrationOutcome::Unchanged,
                });
            }
            Some(_) if !replace => {
                return Err(Error::Conflict(format!(
                    "{} is already registered with a different definition; register it under a \
                     new version, or pass replace: true to overwrite it",
                    template.key()
                )));
            }
            Some(model) => {
                let mut active = model.into_active_model();
                active.definition = Set(definition);
                active.description = Set(template.description.clone());
                active.updated_at = Set(now);
                (active.update(&txn).await?, RegistrationOutcome::Replaced)
            }
            None => {
                let active = task_template::ActiveModel {
                    id: Set(Uuid::now_v7()),
                    namespace: Set(template.namespace.clone()),
                    name: Set(template.name.clone()),
                    version: Set(version.clone()),
                    description: Set(template.description.clone()),
                    definition: Set(definition),
                    created_at: Set(now),
                    updated_at: Set(now),
                };
                (active.insert(&txn).await?, RegistrationOutcome::Created)
            }
        };
        event::Entity::insert(event_row(
            EventName::TemplateRegistered,
            Some(&template.namespace),
            None,
            None,
            json!({
                "template_id": model.id,
                "namespace": template.namespace,
                "template": template.name,
                "version": version,
                "replaced": outcome == RegistrationOutcome::Replaced,
                "steps": template.steps.len(),
            }),
            now,
        ))
        .exec_without_returning(&txn)
        .await?;
        self.commit_events(txn).await?;
        // Tasks start from the new definition from now on.
        self.parsed_templates.forget(model.id);
        Ok(Registration {
            template: model.try_into()?,
            outcome,
        })
    }

    /// Every namespace, by name.
    pub async fn namespaces(&self) -> Result<Vec<NamespaceRecord>> {
        let models = namespace::Entity::find()
            .order_by_asc(namespace::Column::Name)
            .all(&self.db)
            .await?;
        Ok(models.into_iter().map(NamespaceRecord::from).collect())
    }

    /// Whether any template is registered (start-up seeds the examples into an empty database).
    pub async fn has_templates(&self) -> Result<bool> {
        Ok(task_template::Entity::find().one(&self.db).await?.is_some())
    }

    /// Registered templates, every version, by namespace and name with the newest version
    /// first; optionally narrowed to one namespace and one name.
    pub async fn templates(
        &self,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<TemplateRecord>> {
        let mut query = task_template::Entity::find();
        if let Some(namespace) = namespace {
            query = query.filter(task_template::Column::Namespace.eq(namespace));
        }
        if let Some(name) = name {
            query = query.filter(task_template::Column::Name.eq(name));
        }
        let mut records: Vec<TemplateRecord> = convert_all(query.all(&self.db).await?)?;
        records.sort_by(|a, b| {
            let (a, b) = (&a.template, &b.template);
            (&a.namespace, &a.name)
                .cmp(&(&b.namespace, &b.name))
                .then_with(|| b.version.cmp(&a.version))
        });
        Ok(records)
    }

    /// One template: the given version, or the newest (by semantic version) when none is given.
    pub async fn template(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<TemplateRecord> {
        let found = match version {
            None => self
                .templates(Some(namespace), Some(name))
                .await?
                .into_iter()
                .next(),
            Some(wanted) => {
                let wanted = parse_version(wanted)?;
                task_template::Entity::find()
                    .filter(task_template::Column::Namespace.eq(namespace))
                    .filter(task_template::Column::Name.eq(name))
                    .filter(task_template::Column::Version.eq(wanted.to_string()))
                    .one(&self.db)
                    .await?
                    .map(TemplateRecord::try_from)
                    .transpose()?
            }
        };
        found.ok_or_else(|| template_not_found(namespace, name, version))
    }

    /// Templates by id, in no particular order; ids not found are left out.
    pub async fn templates_by_ids(&self, ids: &[Uuid]) -> Result<Vec<TemplateRecord>> {
        let mut records = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(crate::queries::ID_CHUNK) {
            let models = task_template::Entity::find()
                .filter(task_template::Column::Id.is_in(chunk.iter().copied()))
                .all(&self.db)
                .await?;
            records.extend(convert_all::<_, TemplateRecord>(models)?);
        }
        Ok(records)
    }
}

/// A template as tasks start from it: parsed, with its context schema compiled.
#[derive(Debug, Clone)]
pub(crate) struct StartingTemplate {
    pub record: Arc<TemplateRecord>,
    pub context_check: Option<ContextCheck>,
}

/// Parsed templates by id, each valid while its row's `updated_at` is the one it was parsed
/// at, so creating a task neither parses a definition nor compiles a schema again. A replica
/// learns of another's registration from that column; its own also clear the entry.
#[derive(Default)]
pub(crate) struct TemplateCache(Mutex<HashMap<Uuid, (DateTime<Utc>, StartingTemplate)>>);

/// How many parsed templates a store keeps; past it the cache starts again empty.
const CACHED_TEMPLATES: usize = 1024;

impl std::fmt::Debug for TemplateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TemplateCache")
    }
}

impl TemplateCache {
    fn get(&self, id: Uuid, updated_at: DateTime<Utc>) -> Option<StartingTemplate> {
        let cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(&id)
            .filter(|(stamp, _)| *stamp == updated_at)
            .map(|(_, template)| template.clone())
    }

    fn put(&self, template: &StartingTemplate) {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHED_TEMPLATES {
            cache.clear();
        }
        cache.insert(
            template.record.id,
            (template.record.updated_at, template.clone()),
        );
    }

    fn forget(&self, id: Uuid) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}

#[derive(Debug, FromQueryResult)]
struct TemplateStamp {
    id: Uuid,
    version: String,
    updated_at: DateTime<Utc>,
}

impl Store {
    /// The template a new task starts from: the given version, or the newest. One light read
    /// finds it (id, version and stamp of each version); the definition is read and parsed
    /// only when this store has not parsed it at that stamp before.
    pub(crate) async fn starting_template(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<StartingTemplate> {
        let wanted = version.map(parse_version).transpose()?;
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT id, version, updated_at FROM task_templates WHERE namespace = ")
            .bind(namespace)
            .push(" AND name = ")
            .bind(name);
        if let Some(wanted) = &wanted {
            sql.push(" AND version = ").bind(wanted.to_string());
        }
        let stamps = TemplateStamp::find_by_statement(sql.build())
            .all(&self.db)
            .await?;
        let newest = stamps
            .into_iter()
            .filter_map(|stamp| Some((semver::Version::parse(&stamp.version).ok()?, stamp)))
            .max_by(|(a, _), (b, _)| a.cmp(b))
            .map(|(_, stamp)| stamp)
            .ok_or_else(|| template_not_found(namespace, name, version))?;
        if let Some(template) = self.parsed_templates.get(newest.id, newest.updated_at) {
            return Ok(template);
        }
        let record: TemplateRecord = task_template::Entity::find_by_id(newest.id)
            .one(&self.db)
            .await?
            .ok_or_else(|| template_not_found(namespace, name, version))?
            .try_into()?;
        let template = StartingTemplate {
            context_check: record.template.context_check()?,
            record: Arc::new(record),
        };
        self.parsed_templates.put(&template);
        Ok(template)
    }
}

/// The answer for a template reference that names nothing.
fn template_not_found(namespace: &str, name: &str, version: Option<&str>) -> Error {
    Error::NotFound {
        what: "template",
        key: tasker_domain::template::reference(namespace, name, version),
    }
}

/// A requested version, which must be a semantic version.
fn parse_version(wanted: &str) -> Result<semver::Version> {
    semver::Version::parse(wanted).map_err(|err| {
        tasker_domain::Error::InvalidRequest(vec![tasker_domain::Problem::new(
            "version",
            format!("{wanted:?} is not a semantic version such as 1.0.0 ({err})"),
        )])
        .into()
    })
}
