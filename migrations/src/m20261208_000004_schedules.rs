//! Schedules: a cron expression in a time zone, or one time (`run_at_ms`), that starts tasks
//! from a template with a context. `next_fire_ms` is the first tick not fired yet (`NULL`
//! once a one-time schedule has fired); the partial index holds only the schedules that will
//! fire, so the sweep and the wake-up time read nothing else.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Schedules {
    Table,
    Id,
    Namespace,
    Name,
    TemplateName,
    TemplateVersion,
    Context,
    Priority,
    Cron,
    Timezone,
    RunAtMs,
    CatchUp,
    Paused,
    NextFireMs,
    LastFiredMs,
    FiredCount,
    CreatedAt,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// All or nothing, also on SQLite (where migrations otherwise run outside a transaction).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Schedules::Table)
                    .col(pk_uuid(Schedules::Id))
                    .col(string(Schedules::Namespace))
                    .col(string(Schedules::Name))
                    .col(string(Schedules::TemplateName))
                    .col(string_null(Schedules::TemplateVersion))
                    .col(json_binary(Schedules::Context))
                    .col(integer_null(Schedules::Priority))
                    .col(string_null(Schedules::Cron))
                    .col(string(Schedules::Timezone))
                    .col(big_integer_null(Schedules::RunAtMs))
                    .col(string(Schedules::CatchUp))
                    .col(boolean(Schedules::Paused))
                    .col(big_integer_null(Schedules::NextFireMs))
                    .col(big_integer_null(Schedules::LastFiredMs))
                    .col(big_integer(Schedules::FiredCount))
                    .col(timestamp_with_time_zone(Schedules::CreatedAt))
                    .col(timestamp_with_time_zone(Schedules::UpdatedAt))
                    .take(),
            )
            .await?;
        crate::execute_all(
            manager,
            [
                "CREATE UNIQUE INDEX uq_schedules_name ON schedules (namespace, name)",
                "CREATE INDEX ix_schedules_due ON schedules (next_fire_ms) WHERE next_fire_ms IS NOT NULL AND paused = FALSE",
            ],
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Schedules::Table).take())
            .await?;
        Ok(())
    }
}
