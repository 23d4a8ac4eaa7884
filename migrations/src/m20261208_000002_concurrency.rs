//! Concurrency keys: a task of a template with a `concurrency` rule carries its key, its
//! key's limit, and where it stands with its slot (`waiting`, `held`, `freed`). The index
//! serves both questions admission asks of a key: how many hold a slot, and which waiting
//! task comes next (higher priority first, then oldest).

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
                "ALTER TABLE tasks ADD COLUMN concurrency_key TEXT",
                "ALTER TABLE tasks ADD COLUMN concurrency_limit INTEGER",
                "ALTER TABLE tasks ADD COLUMN slot TEXT",
                "CREATE INDEX ix_tasks_concurrency ON tasks (concurrency_key, slot, priority DESC, id) WHERE concurrency_key IS NOT NULL",
            ],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(
            manager,
            [
                "DROP INDEX ix_tasks_concurrency",
                "ALTER TABLE tasks DROP COLUMN slot",
                "ALTER TABLE tasks DROP COLUMN concurrency_limit",
                "ALTER TABLE tasks DROP COLUMN concurrency_key",
            ],
        )
        .await
    }
}
