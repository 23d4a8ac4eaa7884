//! Rate limits. A rate-limited step names its bucket and its own rule (`rate_limit`,
//! `rate_limit_tokens` per `rate_limit_per_ms`); the partial index holds only such steps while
//! they may still start an attempt, so claims find them without reading the ready queue.
//! `rate_limits` has one row per bucket: the row its admissions lock, the longest window they
//! used (how far back its starts are kept) and, when a claim found it spent, when its next
//! start frees (the maintenance loop wakes claimers then). `rate_limit_starts` records how
//! many attempts started at each millisecond, for the window's count.

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
                "ALTER TABLE workflow_steps ADD COLUMN rate_limit TEXT",
                "ALTER TABLE workflow_steps ADD COLUMN rate_limit_tokens INTEGER",
                "ALTER TABLE workflow_steps ADD COLUMN rate_limit_per_ms BIGINT",
                "CREATE INDEX ix_steps_rate_limited ON workflow_steps (rate_limit) WHERE rate_limit IS NOT NULL AND state IN ('pending', 'error')",
                "CREATE TABLE rate_limits (bucket TEXT NOT NULL PRIMARY KEY, window_ms BIGINT NOT NULL, next_start_ms BIGINT)",
                "CREATE INDEX ix_rate_limits_next_start ON rate_limits (next_start_ms) WHERE next_start_ms IS NOT NULL",
                "CREATE TABLE rate_limit_starts (bucket TEXT NOT NULL, started_ms BIGINT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (bucket, started_ms))",
            ],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(
            manager,
            [
                "DROP TABLE rate_limit_starts",
                "DROP INDEX ix_rate_limits_next_start",
                "DROP TABLE rate_limits",
                "DROP INDEX ix_steps_rate_limited",
                "ALTER TABLE workflow_steps DROP COLUMN rate_limit_per_ms",
                "ALTER TABLE workflow_steps DROP COLUMN rate_limit_tokens",
                "ALTER TABLE workflow_steps DROP COLUMN rate_limit",
            ],
        )
        .await
    }
}
