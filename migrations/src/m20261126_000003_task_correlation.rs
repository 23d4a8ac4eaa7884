//! A correlation id per task, which every event about the task carries, so a caller can follow
//! one request (a CI run, an order, a trace) through the log. Tasks created before this
//! migration have none and use their own id.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE tasks ADD COLUMN correlation_id VARCHAR(255) NULL")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE tasks DROP COLUMN correlation_id")
            .await?;
        Ok(())
    }
}
