//! Events a worker publishes while it holds a lease, as its template declares them.

use crate::entities::{event, workflow_step};
use crate::records::EventRecord;
use crate::{Error, Result, Store};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use tasker_domain::Problem;
use tasker_domain::template::{CUSTOM_EVENT_PREFIX, MAX_CUSTOM_PAYLOAD_BYTES};
use uuid::Uuid;

fn invalid(path: &str, message: String) -> Error {
    Error::Domain(tasker_domain::Error::InvalidRequest(vec![Problem::new(
        path, message,
    )]))
}

impl Store {
    /// Appends a custom event for the step a live lease holds; the name must be declared by
    /// the task's template, and the payload is limited in size.
    pub async fn publish_event(
        &self,
        lease_token: Uuid,
        name: &str,
        payload: Value,
    ) -> Result<EventRecord> {
        self.writing(async {
            let size = serde_json::to_vec(&payload).map_or(usize::MAX, |bytes| bytes.len());
            if size > MAX_CUSTOM_PAYLOAD_BYTES {
                return Err(invalid(
                    "payload",
                    format!("is {size} bytes; the limit is {MAX_CUSTOM_PAYLOAD_BYTES}"),
                ));
            }
            let now = self.now();
            let txn = self.begin_write().await?;
            let step = workflow_step::Entity::find()
                .filter(workflow_step::Column::LeaseToken.eq(lease_token))
                .filter(crate::execution::step_in_progress())
                .filter(workflow_step::Column::LeaseExpiresMs.gte(self.now_ms()))
                .one(&txn)
                .await?
                .ok_or(Error::LeaseLost)?;
            let task = Self::task_row(&txn, step.task_id).await?;
            let template = crate::records::TemplateRecord::try_from(
                crate::entities::task_template::Entity::find_by_id(task.template_id)
                    .one(&txn)
                    .await?
                    .ok_or_else(|| Error::NotFound {
                        what: "template",
                        key: task.template_id.to_string(),
                    })?,
            )?
            .template;
            if !template
                .custom_events
                .iter()
                .any(|event| event.name == name)
            {
                let declared: Vec<&str> = template
                    .custom_events
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect();
                return Err(invalid(
                    "name",
                    format!(
                        "{name:?} is not declared by template {} (its custom_events: {})",
                        template.key(),
                        if declared.is_empty() {
                            "none".to_owned()
                        } else {
                            declared.join(", ")
                        }
                    ),
                ));
            }
            let subjects = crate::progress::Subjects::of_tasks(std::slice::from_ref(&task));
            let row = subjects.subject(task.id).event(
                &format!("{CUSTOM_EVENT_PREFIX}{name}"),
                Some((step.id, &step.name)),
                json!({ "attempt": step.attempts, "data": payload }),
                &Value::Null,
                now,
            );
            let inserted = event::Entity::insert(row).exec_with_returning(&txn).await?;
            self.commit_events(txn).await?;
            Ok(inserted.into())
        })
        .await
    }
}
