//! Steps that wait without holding a worker or a connection: a durable timer (`sleep`) and a
//! person's decision (`approval`). A parked step stays `in_progress` under its lease token,
//! which never expires while parked (its step `timeout`, if any, still applies); a timer's wake
//! time is kept in `next_attempt_ms`, so it survives restarts.

use crate::entities::workflow_step;
use crate::records::StepRecord;
use crate::{Error, Result, Store};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tasker_domain::{StateMachine, StepState};
use uuid::Uuid;

/// A parked lease does not expire: far beyond any real time, yet safe to add to.
const PARKED_LEASE_MS: i64 = i64::MAX / 4;

/// Who holds a step waiting for a person.
pub const AWAITING_DECISION: &str = "awaiting-decision";

impl Store {
    /// Parks a leased step: with `wake_at_ms`, the maintenance loop completes it then;
    /// without, it waits for a decision. A token that lost its lease changes nothing.
    pub async fn park_step(
        &self,
        lease_token: Uuid,
        wake_at_ms: Option<i64>,
        holder: &str,
    ) -> Result<()> {
        self.writing(async {
            let parked = workflow_step::Entity::update_many()
                .col_expr(
                    workflow_step::Column::NextAttemptMs,
                    Expr::value(wake_at_ms),
                )
                .col_expr(
                    workflow_step::Column::LeaseExpiresMs,
                    Expr::value(PARKED_LEASE_MS),
                )
                .col_expr(workflow_step::Column::LeaseHolder, Expr::value(holder))
                .filter(workflow_step::Column::LeaseToken.eq(lease_token))
                .filter(crate::execution::step_in_progress())
                .filter(workflow_step::Column::LeaseExpiresMs.gte(self.now_ms()))
                .exec(&self.db)
                .await?;
            if parked.rows_affected == 0 {
                return Err(Error::LeaseLost);
            }
            Ok(())
        })
        .await
    }

    /// Parked steps whose wake time has come, with their lease tokens, oldest first.
    pub async fn due_parked_steps(&self, limit: u64) -> Result<Vec<(Uuid, StepRecord)>> {
        let models = workflow_step::Entity::find()
            .filter(crate::execution::step_in_progress())
            .filter(workflow_step::Column::NextAttemptMs.lte(self.now_ms()))
            .order_by_asc(workflow_step::Column::NextAttemptMs)
            .limit(limit)
            .all(&self.db)
            .await?;
        models
            .into_iter()
            .map(|model| {
                let token = model.lease_token.unwrap_or_default();
                Ok((token, model.try_into()?))
            })
            .collect()
    }

    /// The lease token of a step waiting for a person's decision.
    pub async fn awaiting_decision(&self, step_id: Uuid) -> Result<Uuid> {
        let step = Self::step_row(&self.db, step_id).await?;
        match step.lease_token {
            Some(token)
                if step.state == StepState::InProgress.as_str()
                    && step.lease_holder.as_deref() == Some(AWAITING_DECISION) =>
            {
                Ok(token)
            }
            _ => Err(Error::Conflict(format!(
                "step {step_id} is not waiting for a decision (it is {})",
                step.state
            ))),
        }
    }
}
