//! A step's `start_timeout` also bounds how long each retry may wait, claimable, for a worker:
//! from its retry time. The partial index holds only retrying steps that have one.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(
            manager,
            ["CREATE INDEX ix_steps_retry_start_timeout ON workflow_steps (next_attempt_ms) WHERE start_timeout_ms IS NOT NULL AND state = 'error' AND next_attempt_ms IS NOT NULL"],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, ["DROP INDEX ix_steps_retry_start_timeout"]).await
    }
}
