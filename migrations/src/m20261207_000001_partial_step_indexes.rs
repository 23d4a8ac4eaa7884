//! Lease indexes without the steps they never serve: lease expiry covers steps `in_progress`
//! only (what the expiry sweep and the wake-up time read), and the lease token index leaves
//! out steps without a token (never claimed, or given back). A step created, claimed and
//! completed then costs five index writes fewer, and a finished step carries one index entry
//! fewer for as long as it is kept (a completed step keeps its token, so that a worker's
//! repeated completion is still recognised). Unique tokens stay unique: SQLite and PostgreSQL
//! both enforce a unique partial index over the rows it covers, and a NULL token was never a
//! duplicate. The lease index keeps `state` as its first column although its rows all share it: SQLite's planner
//! (no statistics) takes an equality and a range on one index over the equality alone on
//! `ix_steps_ready`, so the earliest lease expiry stays one index probe.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        replace(
            manager,
            &[
                "CREATE INDEX IF NOT EXISTS ix_steps_in_flight_lease ON workflow_steps (state, lease_expires_ms) WHERE state = 'in_progress'",
                "CREATE UNIQUE INDEX IF NOT EXISTS uq_steps_held_lease_token ON workflow_steps (lease_token) WHERE lease_token IS NOT NULL",
            ],
            &["ix_steps_lease_expiry", "uq_steps_lease_token"],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        replace(
            manager,
            &[
                "CREATE INDEX IF NOT EXISTS ix_steps_lease_expiry ON workflow_steps (state, lease_expires_ms)",
                "CREATE UNIQUE INDEX IF NOT EXISTS uq_steps_lease_token ON workflow_steps (lease_token)",
            ],
            &["ix_steps_in_flight_lease", "uq_steps_held_lease_token"],
        )
        .await
    }
}

/// Creates the new indexes before dropping the old ones, so no moment goes without. Each
/// statement may run again: SQLite runs a migration outside a transaction, so a start-up
/// interrupted halfway resumes here.
async fn replace(manager: &SchemaManager<'_>, create: &[&str], drop: &[&str]) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for statement in create {
        db.execute_unprepared(statement).await?;
    }
    for index in drop {
        db.execute_unprepared(&format!("DROP INDEX IF EXISTS {index}"))
            .await?;
    }
    Ok(())
}
