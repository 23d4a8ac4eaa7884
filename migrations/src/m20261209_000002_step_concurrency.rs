//! Step concurrency limits. A limited step names its bucket and its limit
//! (`concurrency_bucket`, `concurrency_limit`). The steps a claim must admit — rate-limited or
//! concurrency-limited, while they may still start an attempt — share one partial index (it
//! replaces the rate limits' own), and the running attempts of each bucket are counted through
//! another that holds only running limited steps.

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
                "ALTER TABLE workflow_steps ADD COLUMN concurrency_bucket TEXT",
                "ALTER TABLE workflow_steps ADD COLUMN concurrency_limit INTEGER",
                "DROP INDEX ix_steps_rate_limited",
                "CREATE INDEX ix_steps_limited ON workflow_steps (pending_parents, handler) WHERE (rate_limit IS NOT NULL OR concurrency_bucket IS NOT NULL) AND state IN ('pending', 'error')",
                "CREATE INDEX ix_steps_running_limited ON workflow_steps (concurrency_bucket) WHERE concurrency_bucket IS NOT NULL AND state = 'in_progress'",
            ],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(
            manager,
            [
                "DROP INDEX ix_steps_running_limited",
                "DROP INDEX ix_steps_limited",
                "CREATE INDEX ix_steps_rate_limited ON workflow_steps (rate_limit) WHERE rate_limit IS NOT NULL AND state IN ('pending', 'error')",
                "ALTER TABLE workflow_steps DROP COLUMN concurrency_limit",
                "ALTER TABLE workflow_steps DROP COLUMN concurrency_bucket",
            ],
        )
        .await
    }
}
