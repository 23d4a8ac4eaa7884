//! Timeouts: a task's deadline (its creation plus its template's `timeout`) and a step's
//! `start_timeout` (how long it may wait, claimable, for its first attempt). Each partial index holds
//! only the rows a sweep can act on — running tasks with a deadline, pending steps with a
//! start timeout — so the sweeps and the wake-up time cost nothing for work without them.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// All or nothing, also on SQLite (where migrations otherwise run outside a transaction).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(
            manager,
            [
                "ALTER TABLE tasks ADD COLUMN deadline_ms BIGINT",
                "ALTER TABLE workflow_steps ADD COLUMN start_timeout_ms BIGINT",
                "CREATE INDEX ix_tasks_deadline ON tasks (deadline_ms) WHERE deadline_ms IS NOT NULL AND state IN ('pending', 'in_progress')",
                "CREATE INDEX ix_steps_start_timeout ON workflow_steps (start_timeout_ms) WHERE start_timeout_ms IS NOT NULL AND state = 'pending'",
            ],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(
            manager,
            [
                "DROP INDEX ix_steps_start_timeout",
                "DROP INDEX ix_tasks_deadline",
                "ALTER TABLE workflow_steps DROP COLUMN start_timeout_ms",
                "ALTER TABLE tasks DROP COLUMN deadline_ms",
            ],
        )
        .await
    }
}
