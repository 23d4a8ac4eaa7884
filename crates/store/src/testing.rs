//! Test support, behind the `testing` feature: a fresh, migrated database per test on SQLite
//! and, when `TASKER_TEST_DATABASE_URL` is set, on PostgreSQL (its own schema), dropped
//! afterwards so tests run in parallel and leave nothing behind.

// Test support only (the `testing` feature, never in the server): a failed set-up is a failed
// test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::{Store, StoreOptions};
use std::sync::Arc;
use tasker_domain::Clock;

/// The environment variable that turns on the PostgreSQL runs.
pub const POSTGRES_URL_VAR: &str = "TASKER_TEST_DATABASE_URL";

/// Set (CI's PostgreSQL run sets it) to make a missing PostgreSQL a failure, not a skip.
pub const REQUIRE_POSTGRES_VAR: &str = "TASKER_REQUIRE_POSTGRES";

/// The PostgreSQL URL for tests, or `None` (saying which test skips, and why) when none is
/// configured. Panics when none is configured but [`REQUIRE_POSTGRES_VAR`] is set, so the
/// PostgreSQL coverage cannot vanish silently. Messages name the running test (libtest names
/// its thread after it).
pub fn postgres_url() -> Option<String> {
    let current = std::thread::current();
    let test = current.name().unwrap_or("this test");
    match std::env::var(POSTGRES_URL_VAR) {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var_os(REQUIRE_POSTGRES_VAR).is_none(),
                "{REQUIRE_POSTGRES_VAR} is set but {POSTGRES_URL_VAR} is not: {test} needs PostgreSQL"
            );
            eprintln!("skipped on PostgreSQL: {test} (set {POSTGRES_URL_VAR} to run it)");
            None
        }
    }
}

/// A migrated store on a private database, removed when dropped.
pub struct TestDatabase {
    pub store: Store,
    pub options: StoreOptions,
    cleanup: Cleanup,
}

enum Cleanup {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { url: String, schema: String },
}

impl TestDatabase {
    /// One database per backend under test: SQLite always, PostgreSQL when configured.
    pub async fn all(clock: Arc<dyn Clock>) -> Vec<TestDatabase> {
        let mut databases = vec![Self::sqlite(clock.clone()).await];
        if let Some(url) = postgres_url() {
            databases.push(Self::postgres(&url, clock).await);
        }
        databases
    }

    pub async fn sqlite(clock: Arc<dyn Clock>) -> TestDatabase {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("tasker.db").display());
        let options = StoreOptions::new(url);
        let store = Store::connect(&options, clock)
            .await
            .expect("connect to SQLite");
        store.migrate().await.expect("migrate SQLite");
        TestDatabase {
            store,
            options,
            cleanup: Cleanup::Sqlite(dir),
        }
    }

    pub async fn postgres(url: &str, clock: Arc<dyn Clock>) -> TestDatabase {
        let schema = format!("test_{}", uuid::Uuid::new_v4().simple());
        let admin = Store::connect(&StoreOptions::new(url), clock.clone())
            .await
            .expect("connect to PostgreSQL");
        admin
            .create_schema(&schema)
            .await
            .expect("create test schema");
        admin.close().await.ok();
        let mut options = StoreOptions::new(url);
        options.schema = Some(schema.clone());
        options.max_connections = 4;
        options.application_name = schema.clone();
        let store = Store::connect(&options, clock)
            .await
            .expect("connect to the test schema");
        store.migrate().await.expect("migrate PostgreSQL");
        TestDatabase {
            store,
            options,
            cleanup: Cleanup::Postgres {
                url: url.to_owned(),
                schema,
            },
        }
    }

    /// "sqlite" or "postgres", for assertion messages.
    pub fn backend(&self) -> &'static str {
        self.store.backend_name()
    }

    /// Undoes the newest migration and applies it again, over whatever the database holds:
    /// a migration that rebuilds tables must carry their rows both ways.
    pub async fn redo_last_migration(&self) {
        use tasker_migrations::{Migrator, MigratorTrait};
        Migrator::down(&self.store.db, Some(1))
            .await
            .expect("undo the newest migration");
        Migrator::up(&self.store.db, None)
            .await
            .expect("apply it again");
    }
}

/// Another session that holds what writers need until released: SQLite's write lock
/// (`BEGIN IMMEDIATE`), or on PostgreSQL an exclusive lock on `tasks` (reads still pass).
pub enum Blocker {
    Sqlite(sea_orm::sqlx::SqliteConnection),
    Postgres(sea_orm::sqlx::PgConnection),
}

impl Blocker {
    /// Ends the other session's transaction; writers go on.
    pub async fn release(self) {
        use sea_orm::sqlx::Connection as _;
        let rollback = sea_orm::sqlx::raw_sql("ROLLBACK");
        match self {
            Blocker::Sqlite(mut conn) => {
                rollback.execute(&mut conn).await.expect("rollback");
                conn.close().await.expect("close");
            }
            Blocker::Postgres(mut conn) => {
                rollback.execute(&mut conn).await.expect("rollback");
                conn.close().await.expect("close");
            }
        }
    }
}

impl TestDatabase {
    /// Starts another session that blocks writers (see [`Blocker`]).
    pub async fn block_writes(&self) -> Blocker {
        use sea_orm::sqlx::Connection as _;
        match &self.cleanup {
            Cleanup::Sqlite(_) => {
                let mut conn = sea_orm::sqlx::SqliteConnection::connect(&self.options.url)
                    .await
                    .expect("a second SQLite connection");
                sea_orm::sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .expect("the write lock");
                Blocker::Sqlite(conn)
            }
            Cleanup::Postgres { url, schema } => {
                let mut conn = sea_orm::sqlx::PgConnection::connect(url)
                    .await
                    .expect("a second PostgreSQL session");
                let lock = format!("BEGIN; LOCK TABLE {schema}.tasks IN EXCLUSIVE MODE");
                sea_orm::sqlx::raw_sql(sea_orm::sqlx::AssertSqlSafe(lock))
                    .execute(&mut conn)
                    .await
                    .expect("the table lock");
                Blocker::Postgres(conn)
            }
        }
    }

    /// SQLite: how the planner reads the ready steps of `handlers` (the claim's and the ready
    /// counts' query), one line of `EXPLAIN QUERY PLAN` per step of its plan.
    pub async fn ready_steps_plan(&self, handlers: &[String]) -> Vec<String> {
        let mut sql = crate::sql::Sql::new(self.store.db.get_database_backend());
        sql.push("EXPLAIN QUERY PLAN SELECT s.id");
        crate::execution::push_ready_steps(
            &mut sql,
            0,
            handlers,
            &tasker_domain::Within::Any,
            crate::execution::Limited::Without,
        );
        // Bound, as the claim binds it: the plan must not depend on its value.
        crate::execution::push_claim_order(&mut sql);
        sql.push(" LIMIT ").bind(10i64);
        self.plan(sql).await
    }

    /// SQLite: whether the store's connection plans statements without looking at the values
    /// bound to them (see `health::sqlite_stable_plans`).
    pub async fn sqlite_plans_are_stable(&self) -> bool {
        let mut conn = self
            .store
            .db
            .get_sqlite_connection_pool()
            .acquire()
            .await
            .expect("the connection");
        crate::health::planner_stability(&mut conn, -1)
            .await
            .expect("the planner setting")
    }

    /// SQLite: how the planner finds the finished tasks the retention sweep deletes.
    pub async fn aged_out_tasks_plan(&self) -> Vec<String> {
        let mut sql = crate::sql::Sql::new(self.store.db.get_database_backend());
        sql.push("EXPLAIN QUERY PLAN ");
        crate::retention::push_aged_out_tasks(&mut sql, chrono::Utc::now(), 10);
        self.plan(sql).await
    }

    /// SQLite: how the planner finds the engine's next wake-up (retries, leases, deadlines).
    pub async fn wakeups_plan(&self) -> Vec<String> {
        let mut sql = crate::sql::Sql::new(self.store.db.get_database_backend());
        sql.push("EXPLAIN QUERY PLAN ");
        crate::execution::push_wakeups(&mut sql, 0);
        self.plan(sql).await
    }

    /// PostgreSQL: the tables of this test's schema that a manual VACUUM has processed.
    pub async fn vacuumed_tables(&self) -> Vec<String> {
        use sea_orm::FromQueryResult;
        #[derive(FromQueryResult)]
        struct Table {
            relname: String,
        }
        let mut sql = crate::sql::Sql::new(self.store.db.get_database_backend());
        sql.push(
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema() \
             AND last_vacuum IS NOT NULL AND last_analyze IS NOT NULL ORDER BY relname",
        );
        Table::find_by_statement(sql.build())
            .all(&self.store.db)
            .await
            .expect("vacuum statistics")
            .into_iter()
            .map(|table| table.relname)
            .collect()
    }

    async fn plan(&self, sql: crate::sql::Sql) -> Vec<String> {
        use sea_orm::FromQueryResult;
        #[derive(FromQueryResult)]
        struct PlanLine {
            detail: String,
        }
        PlanLine::find_by_statement(sql.build())
            .all(&self.store.db)
            .await
            .expect("explain query plan")
            .into_iter()
            .map(|line| line.detail)
            .collect()
    }

    /// What SQLite does on its own after `SQLITE_FULL` or `SQLITE_IOERR`: rolls back the
    /// transaction of an operation that then fails, while the driver still counts it open.
    pub async fn roll_back_behind_the_drivers_back(&self) {
        use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
        let txn = self.store.db.begin().await.expect("begin");
        txn.execute_unprepared("ROLLBACK").await.expect("rollback");
        drop(txn);
    }

    /// PostgreSQL: waits until a session of this test's store waits on a lock (another
    /// process's state, so looked at every few milliseconds over one admin session), for at
    /// most `within`; whether one did.
    pub async fn until_a_session_waits(&self, within: std::time::Duration) -> bool {
        let (mut admin, schema) = self.admin_session().await;
        let waits = tokio::time::timeout(within, async {
            loop {
                let (waiting,): (i64,) = sea_orm::sqlx::query_as(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                )
                .bind(schema)
                .fetch_one(&mut admin)
                .await
                .expect("pg_stat_activity");
                if waiting > 0 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .is_ok();
        close(admin).await;
        waits
    }

    /// PostgreSQL: ends every session of this test's store (`pg_terminate_backend`), as a
    /// database restart or a network cut would; returns how many there were.
    pub async fn terminate_sessions(&self) -> u64 {
        let (mut admin, schema) = self.admin_session().await;
        let ended = terminate(&mut admin, schema).await;
        close(admin).await;
        ended
    }

    /// PostgreSQL: a session of its own beside the test's store, and the schema (which is
    /// also the store's application name).
    async fn admin_session(&self) -> (sea_orm::sqlx::PgConnection, &str) {
        use sea_orm::sqlx::Connection as _;
        let Cleanup::Postgres { url, schema } = &self.cleanup else {
            panic!("this is for PostgreSQL test databases");
        };
        let admin = sea_orm::sqlx::PgConnection::connect(url)
            .await
            .expect("an admin session");
        (admin, schema)
    }
}

/// Ends every session named `application_name`; returns how many there were.
async fn terminate(admin: &mut sea_orm::sqlx::PgConnection, application_name: &str) -> u64 {
    let ended: Vec<(bool,)> = sea_orm::sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(application_name)
    .fetch_all(admin)
    .await
    .expect("terminate");
    ended.len() as u64
}

async fn close(admin: sea_orm::sqlx::PgConnection) {
    use sea_orm::sqlx::Connection as _;
    admin.close().await.ok();
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Cleanup::Postgres { url, schema } = &self.cleanup {
            let (url, schema) = (url.clone(), schema.clone());
            // Drop runs outside any async context we could await in: use a private runtime.
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cleanup runtime");
                runtime.block_on(async {
                    use sea_orm::sqlx::Connection as _;
                    // The test's own pool may still hold a transaction open (its runtime is
                    // blocked in this drop): end those sessions, then drop the schema.
                    if let Ok(mut admin) = sea_orm::sqlx::PgConnection::connect(&url).await {
                        terminate(&mut admin, &schema).await;
                        close(admin).await;
                    }
                    let admin = Store::connect(
                        &StoreOptions::new(url),
                        Arc::new(tasker_domain::SystemClock),
                    )
                    .await?;
                    admin.drop_schema(&schema).await?;
                    admin.close().await
                })
            })
            .join();
            if !matches!(dropped, Ok(Ok(()))) {
                eprintln!("warning: could not drop a PostgreSQL test schema");
            }
        }
    }
}
