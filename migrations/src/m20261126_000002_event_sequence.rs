//! Commit-ordered event numbers. On PostgreSQL, `position` comes from a sequence when a row is
//! inserted, so a transaction that commits later can hold a smaller position. Events are
//! therefore numbered again, in `sequence`, by a sequencer that only ever sees committed rows
//! (see the store's event log): readers follow `sequence`, and nothing can ever be numbered
//! behind a cursor. SQLite has a single writer, so its positions are already commit order and
//! the column stays empty.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("ALTER TABLE events ADD COLUMN sequence BIGINT NULL")
            .await?;
        if manager.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared("CREATE UNIQUE INDEX uq_events_sequence ON events (sequence)")
                .await?;
            db.execute_unprepared(
                "CREATE INDEX ix_events_unsequenced ON events (position) WHERE sequence IS NULL",
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        if manager.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared("DROP INDEX IF EXISTS ix_events_unsequenced")
                .await?;
            db.execute_unprepared("DROP INDEX IF EXISTS uq_events_sequence")
                .await?;
        }
        db.execute_unprepared("ALTER TABLE events DROP COLUMN sequence")
            .await?;
        Ok(())
    }
}
