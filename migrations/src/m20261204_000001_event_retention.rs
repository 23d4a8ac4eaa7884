//! A one-row table holding how far the retention policy has pruned the event log: the highest
//! cursor among the events it deleted. A reader resuming from an older cursor may have missed
//! deleted events, so it is told instead of being answered with a silent gap.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let connection = manager.get_connection();
        connection
            .execute_unprepared(
                "CREATE TABLE event_retention (id INTEGER PRIMARY KEY, pruned_through BIGINT NOT NULL)",
            )
            .await?;
        connection
            .execute_unprepared("INSERT INTO event_retention (id, pruned_through) VALUES (1, 0)")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE event_retention")
            .await?;
        Ok(())
    }
}
