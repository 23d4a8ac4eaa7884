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
        let db = manager.get_connection();
        for column in [
            "concurrency_key TEXT",
            "concurrency_limit INTEGER",
            "slot TEXT",
        ] {
            db.execute_unprepared(&format!("ALTER TABLE tasks ADD COLUMN {column}"))
                .await?;
        }
        db.execute_unprepared(
            "CREATE INDEX ix_tasks_concurrency ON tasks (concurrency_key, slot, priority DESC, id) WHERE concurrency_key IS NOT NULL",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX ix_tasks_concurrency")
            .await?;
        for column in ["slot", "concurrency_limit", "concurrency_key"] {
            db.execute_unprepared(&format!("ALTER TABLE tasks DROP COLUMN {column}"))
                .await?;
        }
        Ok(())
    }
}
