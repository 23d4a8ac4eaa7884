//! History rows with fewer index entries. A transition is found by its task or step and its
//! order, never by its id, and an event by its position: so a transition's key becomes
//! `(task_id | step_id, sort_key)`, its id an ordinary column, and the event id's unique index
//! goes. A one-step task's claim and completion then write 15 B-tree entries fewer on SQLite
//! (a transition is one B-tree instead of three or four, an event three instead of four) and
//! 11 index entries fewer on PostgreSQL, and every kept row carries them no longer. The step
//! transitions' `task_id` index goes too: the retention sweep reaches them through their
//! steps.
//!
//! SQLite cannot change a table's key in place, so there the tables are rebuilt; the event
//! log keeps its AUTOINCREMENT high-water mark, so no position is ever handed out twice.
//! PostgreSQL turns the unique order indexes into the primary keys. On both, the migration
//! and its record are one transaction: all of it or, after a failure, none.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// Also on SQLite, where migrations otherwise run outside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Sqlite => run_all(manager, &[&sqlite_rebuild(Keys::Lean)]).await,
            _ => run_all(manager, POSTGRES_UP).await,
        }
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Sqlite => run_all(manager, &[&sqlite_rebuild(Keys::ById)]).await,
            _ => run_all(manager, POSTGRES_DOWN).await,
        }
    }
}

const POSTGRES_UP: &[&str] = &[
    "ALTER TABLE task_transitions DROP CONSTRAINT IF EXISTS task_transitions_pkey",
    "ALTER TABLE task_transitions ADD CONSTRAINT task_transitions_pkey PRIMARY KEY USING INDEX uq_task_transitions_order",
    "ALTER TABLE step_transitions DROP CONSTRAINT IF EXISTS step_transitions_pkey",
    "ALTER TABLE step_transitions ADD CONSTRAINT step_transitions_pkey PRIMARY KEY USING INDEX uq_step_transitions_order",
    "DROP INDEX IF EXISTS ix_step_transitions_task",
    "ALTER TABLE events DROP CONSTRAINT IF EXISTS events_id_key",
];

const POSTGRES_DOWN: &[&str] = &[
    "ALTER TABLE events ADD CONSTRAINT events_id_key UNIQUE (id)",
    "CREATE INDEX ix_step_transitions_task ON step_transitions (task_id)",
    "ALTER TABLE step_transitions DROP CONSTRAINT step_transitions_pkey",
    "CREATE UNIQUE INDEX uq_step_transitions_order ON step_transitions (step_id, sort_key)",
    "ALTER TABLE step_transitions ADD CONSTRAINT step_transitions_pkey PRIMARY KEY (id)",
    "ALTER TABLE task_transitions DROP CONSTRAINT task_transitions_pkey",
    "CREATE UNIQUE INDEX uq_task_transitions_order ON task_transitions (task_id, sort_key)",
    "ALTER TABLE task_transitions ADD CONSTRAINT task_transitions_pkey PRIMARY KEY (id)",
];

async fn run_all(manager: &SchemaManager<'_>, statements: &[&str]) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for statement in statements {
        db.execute_unprepared(statement).await?;
    }
    Ok(())
}

/// Which keys the SQLite tables are rebuilt with.
#[derive(Clone, Copy)]
enum Keys {
    /// Transitions keyed by their order, events without a unique id.
    Lean,
    /// As before this migration: uuid keys, the order unique beside them.
    ById,
}

/// The statements that rebuild the three tables with `keys`; their rows, and the event log's
/// high-water mark, carried over.
fn sqlite_rebuild(keys: Keys) -> String {
    let lean = matches!(keys, Keys::Lean);
    let (id, event_id, rowid) = if lean {
        (
            "\"id\" uuid_text NOT NULL",
            "\"id\" uuid_text NOT NULL",
            " WITHOUT ROWID",
        )
    } else {
        (
            "\"id\" uuid_text NOT NULL PRIMARY KEY",
            "\"id\" uuid_text NOT NULL UNIQUE",
            "",
        )
    };
    let order_key = |column: &str| {
        if lean {
            format!(", PRIMARY KEY (\"{column}\", \"sort_key\")")
        } else {
            String::new()
        }
    };
    let mut script = vec![
        format!(
            "CREATE TABLE task_transitions_rebuilt ({id}, \"task_id\" uuid_text NOT NULL, \"from_state\" varchar NULL, \"to_state\" varchar NOT NULL, \"sort_key\" integer NOT NULL, \"metadata\" jsonb_text NOT NULL, \"created_at\" timestamp_with_timezone_text NOT NULL, FOREIGN KEY (\"task_id\") REFERENCES \"tasks\" (\"id\") ON DELETE CASCADE{}){rowid}",
            order_key("task_id")
        ),
        copy("task_transitions", TRANSITION_COLUMNS),
        format!(
            "CREATE TABLE step_transitions_rebuilt ({id}, \"step_id\" uuid_text NOT NULL, \"task_id\" uuid_text NOT NULL, \"from_state\" varchar NULL, \"to_state\" varchar NOT NULL, \"sort_key\" integer NOT NULL, \"metadata\" jsonb_text NOT NULL, \"created_at\" timestamp_with_timezone_text NOT NULL, FOREIGN KEY (\"step_id\") REFERENCES \"workflow_steps\" (\"id\") ON DELETE CASCADE{}){rowid}",
            order_key("step_id")
        ),
        copy("step_transitions", &format!("step_id, {TRANSITION_COLUMNS}")),
        format!(
            "CREATE TABLE events_rebuilt (\"position\" integer NOT NULL PRIMARY KEY AUTOINCREMENT, {event_id}, \"name\" varchar NOT NULL, \"namespace\" varchar NULL, \"task_id\" uuid_text NULL, \"step_id\" uuid_text NULL, \"payload\" jsonb_text NOT NULL, \"occurred_at\" timestamp_with_timezone_text NOT NULL, sequence BIGINT NULL)"
        ),
        // Before any row: the copy then leaves the mark alone, and it holds also when the
        // log was pruned to nothing.
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'events_rebuilt', seq FROM sqlite_sequence WHERE name = 'events'".to_owned(),
        copy(
            "events",
            "position, id, name, namespace, task_id, step_id, payload, occurred_at, sequence",
        ),
    ];
    for table in ["task_transitions", "step_transitions", "events"] {
        script.push(format!("DROP TABLE {table}"));
        script.push(format!("ALTER TABLE {table}_rebuilt RENAME TO {table}"));
    }
    script.push(
        "CREATE INDEX \"ix_events_task\" ON \"events\" (\"task_id\", \"position\")".to_owned(),
    );
    script.push(
        "CREATE INDEX \"ix_events_namespace\" ON \"events\" (\"namespace\", \"position\")"
            .to_owned(),
    );
    if !lean {
        script.push("CREATE UNIQUE INDEX \"uq_task_transitions_order\" ON \"task_transitions\" (\"task_id\", \"sort_key\")".to_owned());
        script.push("CREATE UNIQUE INDEX \"uq_step_transitions_order\" ON \"step_transitions\" (\"step_id\", \"sort_key\")".to_owned());
        script.push(
            "CREATE INDEX \"ix_step_transitions_task\" ON \"step_transitions\" (\"task_id\")"
                .to_owned(),
        );
    }
    script.join(";\n")
}

const TRANSITION_COLUMNS: &str =
    "id, task_id, from_state, to_state, sort_key, metadata, created_at";

/// Copies every row of `table` into its rebuilt twin.
fn copy(table: &str, columns: &str) -> String {
    format!("INSERT INTO {table}_rebuilt ({columns}) SELECT {columns} FROM {table}")
}
