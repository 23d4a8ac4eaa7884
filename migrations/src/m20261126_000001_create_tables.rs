//! The base schema: namespaces, templates (every version), tasks with their tags, steps and
//! edges, the append-only transition tables, and the event log.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Namespaces {
    Table,
    Id,
    Name,
    CreatedAt,
}

#[derive(DeriveIden)]
enum TaskTemplates {
    Table,
    Id,
    Namespace,
    Name,
    Version,
    Description,
    Definition,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Id,
    Namespace,
    TemplateId,
    TemplateName,
    TemplateVersion,
    State,
    Context,
    Initiator,
    SourceSystem,
    Reason,
    Tags,
    IdempotencyKey,
    Version,
    CreatedAt,
    UpdatedAt,
    CompletedAt,
}

#[derive(DeriveIden)]
enum TaskTags {
    Table,
    TaskId,
    Tag,
}

#[derive(DeriveIden)]
enum WorkflowSteps {
    Table,
    Id,
    TaskId,
    Position,
    Name,
    Handler,
    Description,
    Config,
    State,
    Attempts,
    MaxAttempts,
    Retryable,
    Skippable,
    Backoff,
    TimeoutMs,
    PendingParents,
    Results,
    LastError,
    NextAttemptMs,
    AttemptStartedMs,
    DeadlineMs,
    LeaseToken,
    LeaseHolder,
    LeaseExpiresMs,
    Version,
    CreatedAt,
    UpdatedAt,
    CompletedAt,
}

#[derive(DeriveIden)]
enum WorkflowStepEdges {
    Table,
    TaskId,
    ParentStepId,
    ChildStepId,
}

#[derive(DeriveIden)]
enum TaskTransitions {
    Table,
    Id,
    TaskId,
    FromState,
    ToState,
    SortKey,
    Metadata,
    CreatedAt,
}

#[derive(DeriveIden)]
enum StepTransitions {
    Table,
    Id,
    StepId,
    TaskId,
    FromState,
    ToState,
    SortKey,
    Metadata,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Events {
    Table,
    Position,
    Id,
    Name,
    Namespace,
    TaskId,
    StepId,
    Payload,
    OccurredAt,
}

fn cascade(
    name: &str,
    from: (impl IntoIden, impl IntoIden),
    to: (impl IntoIden, impl IntoIden),
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(name)
        .from(from.0, from.1)
        .to(to.0, to.1)
        .on_delete(ForeignKeyAction::Cascade)
        .take()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Namespaces::Table)
                    .col(pk_uuid(Namespaces::Id))
                    .col(string_uniq(Namespaces::Name))
                    .col(timestamp_with_time_zone(Namespaces::CreatedAt))
                    .take(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(TaskTemplates::Table)
                    .col(pk_uuid(TaskTemplates::Id))
                    .col(string(TaskTemplates::Namespace))
                    .col(string(TaskTemplates::Name))
                    .col(string(TaskTemplates::Version))
                    .col(text_null(TaskTemplates::Description))
                    .col(json_binary(TaskTemplates::Definition))
                    .col(timestamp_with_time_zone(TaskTemplates::CreatedAt))
                    .col(timestamp_with_time_zone(TaskTemplates::UpdatedAt))
                    .foreign_key(&mut cascade(
                        "fk_templates_namespace",
                        (TaskTemplates::Table, TaskTemplates::Namespace),
                        (Namespaces::Table, Namespaces::Name),
                    ))
                    .take(),
            )
            .await?;
        create_index(
            manager,
            "uq_templates_key",
            TaskTemplates::Table,
            [
                TaskTemplates::Namespace,
                TaskTemplates::Name,
                TaskTemplates::Version,
            ],
            true,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(Tasks::Table)
                    .col(pk_uuid(Tasks::Id))
                    .col(string(Tasks::Namespace))
                    .col(uuid(Tasks::TemplateId))
                    .col(string(Tasks::TemplateName))
                    .col(string(Tasks::TemplateVersion))
                    .col(string(Tasks::State))
                    .col(json_binary(Tasks::Context))
                    .col(string_null(Tasks::Initiator))
                    .col(string_null(Tasks::SourceSystem))
                    .col(text_null(Tasks::Reason))
                    .col(json_binary(Tasks::Tags))
                    .col(string_null(Tasks::IdempotencyKey))
                    .col(integer(Tasks::Version))
                    .col(timestamp_with_time_zone(Tasks::CreatedAt))
                    .col(timestamp_with_time_zone(Tasks::UpdatedAt))
                    .col(timestamp_with_time_zone_null(Tasks::CompletedAt))
                    .foreign_key(&mut cascade(
                        "fk_tasks_template",
                        (Tasks::Table, Tasks::TemplateId),
                        (TaskTemplates::Table, TaskTemplates::Id),
                    ))
                    .take(),
            )
            .await?;
        // Listing is newest first (ids are UUIDv7, so id order is creation order) under each filter.
        create_index(
            manager,
            "ix_tasks_namespace",
            Tasks::Table,
            [Tasks::Namespace, Tasks::Id],
            false,
        )
        .await?;
        create_index(
            manager,
            "ix_tasks_state",
            Tasks::Table,
            [Tasks::State, Tasks::Id],
            false,
        )
        .await?;
        create_index(
            manager,
            "ix_tasks_template",
            Tasks::Table,
            [Tasks::Namespace, Tasks::TemplateName, Tasks::Id],
            false,
        )
        .await?;
        create_index(
            manager,
            "ix_tasks_created_at",
            Tasks::Table,
            [Tasks::CreatedAt],
            false,
        )
        .await?;
        create_index(
            manager,
            "uq_tasks_idempotency",
            Tasks::Table,
            [Tasks::Namespace, Tasks::IdempotencyKey],
            true,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(TaskTags::Table)
                    .col(uuid(TaskTags::TaskId))
                    .col(string(TaskTags::Tag))
                    .primary_key(Index::create().col(TaskTags::TaskId).col(TaskTags::Tag))
                    .foreign_key(&mut cascade(
                        "fk_task_tags_task",
                        (TaskTags::Table, TaskTags::TaskId),
                        (Tasks::Table, Tasks::Id),
                    ))
                    .take(),
            )
            .await?;
        create_index(
            manager,
            "ix_task_tags_tag",
            TaskTags::Table,
            [TaskTags::Tag, TaskTags::TaskId],
            false,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(WorkflowSteps::Table)
                    .col(pk_uuid(WorkflowSteps::Id))
                    .col(uuid(WorkflowSteps::TaskId))
                    .col(integer(WorkflowSteps::Position))
                    .col(string(WorkflowSteps::Name))
                    .col(string(WorkflowSteps::Handler))
                    .col(text_null(WorkflowSteps::Description))
                    .col(json_binary(WorkflowSteps::Config))
                    .col(string(WorkflowSteps::State))
                    .col(integer(WorkflowSteps::Attempts))
                    .col(integer(WorkflowSteps::MaxAttempts))
                    .col(boolean(WorkflowSteps::Retryable))
                    .col(boolean(WorkflowSteps::Skippable))
                    .col(json_binary(WorkflowSteps::Backoff))
                    .col(big_integer_null(WorkflowSteps::TimeoutMs))
                    .col(integer(WorkflowSteps::PendingParents))
                    .col(json_binary_null(WorkflowSteps::Results))
                    .col(text_null(WorkflowSteps::LastError))
                    // Engine timing in epoch milliseconds: the same arithmetic on both databases.
                    .col(big_integer_null(WorkflowSteps::NextAttemptMs))
                    .col(big_integer_null(WorkflowSteps::AttemptStartedMs))
                    .col(big_integer_null(WorkflowSteps::DeadlineMs))
                    .col(uuid_null(WorkflowSteps::LeaseToken))
                    .col(string_null(WorkflowSteps::LeaseHolder))
                    .col(big_integer_null(WorkflowSteps::LeaseExpiresMs))
                    .col(integer(WorkflowSteps::Version))
                    .col(timestamp_with_time_zone(WorkflowSteps::CreatedAt))
                    .col(timestamp_with_time_zone(WorkflowSteps::UpdatedAt))
                    .col(timestamp_with_time_zone_null(WorkflowSteps::CompletedAt))
                    .foreign_key(&mut cascade(
                        "fk_steps_task",
                        (WorkflowSteps::Table, WorkflowSteps::TaskId),
                        (Tasks::Table, Tasks::Id),
                    ))
                    .take(),
            )
            .await?;
        create_index(
            manager,
            "uq_steps_task_position",
            WorkflowSteps::Table,
            [WorkflowSteps::TaskId, WorkflowSteps::Position],
            true,
        )
        .await?;
        // Readiness: runnable states whose parents are all done, by handler, earliest first.
        create_index(
            manager,
            "ix_steps_ready",
            WorkflowSteps::Table,
            [
                WorkflowSteps::State,
                WorkflowSteps::PendingParents,
                WorkflowSteps::Handler,
                WorkflowSteps::NextAttemptMs,
            ],
            false,
        )
        .await?;
        create_index(
            manager,
            "ix_steps_lease_expiry",
            WorkflowSteps::Table,
            [WorkflowSteps::State, WorkflowSteps::LeaseExpiresMs],
            false,
        )
        .await?;
        create_index(
            manager,
            "uq_steps_lease_token",
            WorkflowSteps::Table,
            [WorkflowSteps::LeaseToken],
            true,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(WorkflowStepEdges::Table)
                    .col(uuid(WorkflowStepEdges::TaskId))
                    .col(uuid(WorkflowStepEdges::ParentStepId))
                    .col(uuid(WorkflowStepEdges::ChildStepId))
                    .primary_key(
                        Index::create()
                            .col(WorkflowStepEdges::ParentStepId)
                            .col(WorkflowStepEdges::ChildStepId),
                    )
                    .foreign_key(&mut cascade(
                        "fk_edges_task",
                        (WorkflowStepEdges::Table, WorkflowStepEdges::TaskId),
                        (Tasks::Table, Tasks::Id),
                    ))
                    .take(),
            )
            .await?;
        create_index(
            manager,
            "ix_edges_task",
            WorkflowStepEdges::Table,
            [WorkflowStepEdges::TaskId],
            false,
        )
        .await?;
        create_index(
            manager,
            "ix_edges_child",
            WorkflowStepEdges::Table,
            [WorkflowStepEdges::ChildStepId],
            false,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(TaskTransitions::Table)
                    .col(pk_uuid(TaskTransitions::Id))
                    .col(uuid(TaskTransitions::TaskId))
                    .col(string_null(TaskTransitions::FromState))
                    .col(string(TaskTransitions::ToState))
                    .col(integer(TaskTransitions::SortKey))
                    .col(json_binary(TaskTransitions::Metadata))
                    .col(timestamp_with_time_zone(TaskTransitions::CreatedAt))
                    .foreign_key(&mut cascade(
                        "fk_task_transitions_task",
                        (TaskTransitions::Table, TaskTransitions::TaskId),
                        (Tasks::Table, Tasks::Id),
                    ))
                    .take(),
            )
            .await?;
        create_index(
            manager,
            "uq_task_transitions_order",
            TaskTransitions::Table,
            [TaskTransitions::TaskId, TaskTransitions::SortKey],
            true,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(StepTransitions::Table)
                    .col(pk_uuid(StepTransitions::Id))
                    .col(uuid(StepTransitions::StepId))
                    .col(uuid(StepTransitions::TaskId))
                    .col(string_null(StepTransitions::FromState))
                    .col(string(StepTransitions::ToState))
                    .col(integer(StepTransitions::SortKey))
                    .col(json_binary(StepTransitions::Metadata))
                    .col(timestamp_with_time_zone(StepTransitions::CreatedAt))
                    .foreign_key(&mut cascade(
                        "fk_step_transitions_step",
                        (StepTransitions::Table, StepTransitions::StepId),
                        (WorkflowSteps::Table, WorkflowSteps::Id),
                    ))
                    .take(),
            )
            .await?;
        create_index(
            manager,
            "uq_step_transitions_order",
            StepTransitions::Table,
            [StepTransitions::StepId, StepTransitions::SortKey],
            true,
        )
        .await?;
        create_index(
            manager,
            "ix_step_transitions_task",
            StepTransitions::Table,
            [StepTransitions::TaskId],
            false,
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table(Events::Table)
                    .col(big_pk_auto(Events::Position))
                    .col(uuid_uniq(Events::Id))
                    .col(string(Events::Name))
                    .col(string_null(Events::Namespace))
                    .col(uuid_null(Events::TaskId))
                    .col(uuid_null(Events::StepId))
                    .col(json_binary(Events::Payload))
                    .col(timestamp_with_time_zone(Events::OccurredAt))
                    .take(),
            )
            .await?;
        create_index(
            manager,
            "ix_events_task",
            Events::Table,
            [Events::TaskId, Events::Position],
            false,
        )
        .await?;
        create_index(
            manager,
            "ix_events_namespace",
            Events::Table,
            [Events::Namespace, Events::Position],
            false,
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Events::Table.into_iden(),
            StepTransitions::Table.into_iden(),
            TaskTransitions::Table.into_iden(),
            WorkflowStepEdges::Table.into_iden(),
            WorkflowSteps::Table.into_iden(),
            TaskTags::Table.into_iden(),
            Tasks::Table.into_iden(),
            TaskTemplates::Table.into_iden(),
            Namespaces::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).take())
                .await?;
        }
        Ok(())
    }
}

async fn create_index<T: IntoIden + 'static, C: IntoIden + 'static>(
    manager: &SchemaManager<'_>,
    name: &str,
    table: T,
    columns: impl IntoIterator<Item = C>,
    unique: bool,
) -> Result<(), DbErr> {
    let mut index = Index::create();
    index.name(name).table(table);
    for column in columns {
        index.col(column);
    }
    if unique {
        index.unique();
    }
    manager.create_index(index.take()).await
}
