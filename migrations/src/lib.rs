//! Tasker's database migrations, one file per migration; they run at server start-up and with
//! `tasker migrate`, on SQLite and PostgreSQL alike.

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_create_tables;
mod m20261126_000002_event_sequence;
mod m20261126_000003_task_correlation;
mod m20261201_000001_health_probe;
mod m20261201_000002_step_ready_since;
mod m20261201_000003_task_trace_parent;
mod m20261204_000001_event_retention;
mod m20261207_000001_partial_step_indexes;
mod m20261207_000002_lean_history;
mod m20261208_000001_priority;
mod m20261208_000002_concurrency;
mod m20261208_000003_timeouts;
mod m20261208_000004_schedules;
mod m20261209_000001_rate_limits;
mod m20261209_000002_step_concurrency;
mod m20261209_000003_retry_start_timeout;

/// Runs `statements` in order, on the migration's connection (inside its transaction when the
/// migration asks for one).
async fn execute_all(
    manager: &SchemaManager<'_>,
    statements: impl IntoIterator<Item = impl AsRef<str>>,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for statement in statements {
        db.execute_unprepared(statement.as_ref()).await?;
    }
    Ok(())
}

/// Every migration, in the order they apply.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_create_tables::Migration),
            Box::new(m20261126_000002_event_sequence::Migration),
            Box::new(m20261126_000003_task_correlation::Migration),
            Box::new(m20261201_000001_health_probe::Migration),
            Box::new(m20261201_000002_step_ready_since::Migration),
            Box::new(m20261201_000003_task_trace_parent::Migration),
            Box::new(m20261204_000001_event_retention::Migration),
            Box::new(m20261207_000001_partial_step_indexes::Migration),
            Box::new(m20261207_000002_lean_history::Migration),
            Box::new(m20261208_000001_priority::Migration),
            Box::new(m20261208_000002_concurrency::Migration),
            Box::new(m20261208_000003_timeouts::Migration),
            Box::new(m20261208_000004_schedules::Migration),
            Box::new(m20261209_000001_rate_limits::Migration),
            Box::new(m20261209_000002_step_concurrency::Migration),
            Box::new(m20261209_000003_retry_start_timeout::Migration),
        ]
    }
}
