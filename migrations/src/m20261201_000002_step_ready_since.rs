//! When each step last became claimable (epoch ms): the start of the wait that the claim-wait
//! histogram measures and the ready queue's oldest age reads. Steps claimable at the upgrade
//! count from the upgrade (or their retry time); others get theirs when they become so.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("ALTER TABLE workflow_steps ADD COLUMN ready_since_ms BIGINT")
            .await?;
        let now_ms = match manager.get_database_backend() {
            sea_orm_migration::sea_orm::DbBackend::Postgres => {
                "CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)"
            }
            _ => "CAST(strftime('%s', 'now') AS INTEGER) * 1000",
        };
        db.execute_unprepared(&format!(
            "UPDATE workflow_steps SET ready_since_ms = COALESCE(next_attempt_ms, {now_ms}) WHERE state IN ('pending', 'error') AND pending_parents = 0"
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE workflow_steps DROP COLUMN ready_since_ms")
            .await?;
        Ok(())
    }
}
