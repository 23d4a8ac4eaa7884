//! When each step last became claimable (epoch ms): the start of the wait that the claim-wait
//! histogram measures and the ready queue's oldest age reads. Empty for steps older than the
//! column (they are left out of both).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE workflow_steps ADD COLUMN ready_since_ms BIGINT")
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
