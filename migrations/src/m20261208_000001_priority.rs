//! Priorities: each task and each step has one, 1 (low) to 4 (urgent). Existing rows get 2,
//! the default, so work claimed in id order before keeps that order among equals.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLES: [&str; 2] = ["tasks", "workflow_steps"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// Both columns or neither, also on SQLite (where migrations otherwise run outside a
    /// transaction, and a second start would find one column there already).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(
            manager,
            TABLES.map(|table| {
                format!("ALTER TABLE {table} ADD COLUMN priority INTEGER NOT NULL DEFAULT 2")
            }),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(
            manager,
            TABLES.map(|table| format!("ALTER TABLE {table} DROP COLUMN priority")),
        )
        .await
    }
}
