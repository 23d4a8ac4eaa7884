//! Tasker's persistence: the only crate that knows SQL. Every state change is one transaction
//! that checks the current state, writes the new one, and appends its transition and event
//! rows (an event exists if and only if its change committed). Runs on SQLite (a file in WAL
//! mode, the default) and PostgreSQL.

mod concurrency;
mod custom_events;
mod entities;
mod event_log;
mod events;
mod execution;
mod grouped;
mod health;
mod lifecycle;
mod notify;
mod parking;
mod progress;
mod queries;
mod records;
mod retention;
mod schedules;
mod sql;
mod state_change;
mod status;
mod step_limits;
mod tasks;
mod templates;
#[cfg(feature = "testing")]
pub mod testing;
mod timeouts;
mod write;

pub use event_log::{EventCursor, EventFilter};
pub use execution::{
    AttemptFailure, ClaimRequest, ClaimedStep, Completion, CompletionReport, Expiry, FailureReport,
    StepInputs,
};
pub use health::Fault;
pub use lifecycle::{Rerun, StepAction, StepChange};
pub use notify::{Heard, WorkListener};
pub use parking::AWAITING_DECISION;
pub use queries::TaskFilter;
pub use records::{
    EdgeRecord, EventRecord, NamespaceRecord, Slot, StepConcurrencyLimit, StepRateLimit,
    StepRecord, StepTransitionRecord, TaskConcurrency, TaskRecord, TaskTransitionRecord,
    TemplateRecord,
};
pub use retention::Pruned;
pub use schedules::{NewSchedule, ScheduleRecord};
pub use status::{PoolStatus, READY_COUNT_CAP, StoreStatus};
pub use tasks::{NewTask, TaskCreation};
pub use templates::{Registration, RegistrationOutcome};
pub use timeouts::TimeoutReport;

use crate::write::WriteTxn;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tasker_domain::Clock;
use tasker_migrations::{Migrator, MigratorTrait};

/// A schema name safe to put in a statement: lowercase letters, digits and `_`.
fn schema_name(schema: &str) -> Result<&str> {
    let valid = !schema.is_empty()
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(schema)
    } else {
        Err(Error::Domain(tasker_domain::Error::InvalidRequest(vec![
            tasker_domain::Problem::new(
                "schema",
                format!("{schema:?} must be lowercase letters, digits and '_'"),
            ),
        ])))
    }
}

/// Every way a store operation can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input broke a domain rule (an invalid template, context or request).
    #[error(transparent)]
    Domain(#[from] tasker_domain::Error),
    /// The thing asked for does not exist.
    #[error("{what} {key} was not found")]
    NotFound { what: &'static str, key: String },
    /// The change contradicts what is stored (a different definition under an existing
    /// version, a task already finished, a concurrent change).
    #[error("{0}")]
    Conflict(String),
    /// The lease token is unknown, expired, or its step already finished: nothing changed.
    #[error(
        "the lease is no longer held (it expired, or the step was finished, cancelled or reassigned)"
    )]
    LeaseLost,
    /// The database cannot do its part now (a full disk, a lost connection…): nothing was
    /// written unless `uncertain` says so, and the same request may succeed later.
    #[error("the database cannot take this now: {}; retry later", .fault.reason())]
    Unavailable {
        fault: Fault,
        /// The connection was lost while committing: the change may have been saved.
        uncertain: bool,
        #[source]
        cause: DbErr,
    },
    /// A reader resumed from a cursor older than what the event log retains: the retention
    /// policy deleted events up to `pruned_through`, so some after the cursor may be gone.
    #[error(
        "cursor {cursor} is older than the retained event log: the retention policy deleted events up to cursor {pruned_through}, so some after {cursor} may be gone; start again from eventHead, or from cursor {pruned_through} to read everything retained"
    )]
    CursorExpired { cursor: i64, pruned_through: i64 },
    /// The database failed; the details are for the log, never for clients.
    #[error("the database failed")]
    Database(DbErr),
}

impl Error {
    /// Whether this is a fault of the database's environment (see [`Fault`]): the store has
    /// logged its episode, so background work retrying it need not log it again.
    pub fn is_fault(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

impl From<DbErr> for Error {
    /// Faults of the environment are told apart from everything else here, once.
    fn from(err: DbErr) -> Self {
        match Fault::of(&err) {
            Some(fault) => Error::Unavailable {
                fault,
                uncertain: false,
                cause: err,
            },
            None => Error::Database(err),
        }
    }
}

/// A PostgreSQL NOTIFY channel name for a schema: identifiers stop at 63 bytes, so a schema
/// is represented by a stable 64-bit hash of its name.
fn channel_name(base: &str, schema: Option<&str>) -> String {
    match schema {
        None => base.to_owned(),
        Some(schema) => {
            let hash = schema.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            });
            format!("{base}_{hash:016x}")
        }
    }
}

/// Result alias for store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite://path/to/file.db` or `postgres://user@host/db`.
    pub url: String,
    /// PostgreSQL only: the schema to use (tests give each test its own).
    pub schema: Option<String>,
    /// Pool size; SQLite always uses one connection, its single writer.
    pub max_connections: u32,
    /// PostgreSQL only: how the connections name themselves in `pg_stat_activity`.
    pub application_name: String,
    /// SQLite only: how long a write waits for another writer's lock before it fails (as
    /// `Unavailable`, busy).
    pub busy_timeout: Duration,
    /// PostgreSQL only: the longest one statement may run (`statement_timeout`); `None`
    /// keeps the server's setting.
    pub statement_timeout: Option<Duration>,
}

impl StoreOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: None,
            max_connections: 16,
            application_name: "tasker".to_owned(),
            busy_timeout: Duration::from_secs(10),
            statement_timeout: None,
        }
    }
}

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
    /// Commands and statements sent.
    counters: write::Counters,
    /// Whether a SQLite write transaction may hold its raw `BEGIN` open.
    raw_transaction: write::RawTransaction,
    /// The PostgreSQL NOTIFY channel replicas share; one per schema.
    work_channel: String,
    /// This store's name in its notifications (hex digits), so it can ignore its own.
    origin: Arc<str>,
    /// Bumped after every commit that appended events.
    appended: Arc<tokio::sync::watch::Sender<u64>>,
    /// Whether writes work, as the last ones found.
    health: Arc<health::WriteHealth>,
    /// Templates parsed for new tasks.
    parsed_templates: Arc<templates::TemplateCache>,
    /// Single creations waiting to be written together.
    creations: Arc<grouped::CreationQueue>,
    /// Whether claims look for limited steps; spent rate limits' news.
    step_limits: Arc<step_limits::StepLimits>,
}

impl Store {
    /// Connects (creating a missing SQLite file) and counts every statement executed.
    pub async fn connect(options: &StoreOptions, clock: Arc<dyn Clock>) -> Result<Store> {
        let health = Arc::new(health::WriteHealth::default());
        let counters = write::Counters::default();
        let raw_transaction = write::RawTransaction::default();
        let mut connect = ConnectOptions::new(options.url.clone());
        connect
            .sqlx_logging(false)
            // Longer than SQLite's busy timeout: a write waiting on another writer's lock is
            // a busy fault, not a starved pool.
            .acquire_timeout(options.busy_timeout + Duration::from_secs(5));
        if options.url.starts_with("sqlite:") {
            // One connection: SQLite has a single writer, and one connection never meets
            // SQLITE_BUSY inside a transaction.
            connect.max_connections(1).min_connections(1);
            let busy_timeout = options.busy_timeout;
            connect.map_sqlx_sqlite_opts(move |opts| {
                use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
                opts.create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(busy_timeout)
            });
            let released = health.clone();
            let raw_open = raw_transaction.clone();
            connect.map_sqlx_sqlite_pool_opts(move |pool| {
                let health = released.clone();
                let raw_open = raw_open.clone();
                // A SQLite connection does not go bad while idle in the pool; the check on
                // release is what keeps it sound.
                pool.test_before_acquire(false)
                    .after_connect(|conn, _| Box::pin(health::sqlite_stable_plans(conn)))
                    .after_release(move |conn, _| {
                        use sea_orm::sqlx::Connection as _;
                        // The common case answers at once, with nothing to clone or await.
                        if !conn.is_in_transaction() && !raw_open.may_be_open() {
                            return Box::pin(std::future::ready(Ok(true)));
                        }
                        let health = health.clone();
                        Box::pin(async move { health::sqlite_reusable(conn, &health).await })
                    })
            });
        } else {
            connect.max_connections(options.max_connections.max(1));
            if let Some(schema) = &options.schema {
                connect.set_schema_search_path(schema.clone());
            }
            let application_name = options.application_name.clone();
            let statement_timeout = options.statement_timeout;
            connect.map_sqlx_postgres_opts(move |opts| {
                let opts = opts.application_name(&application_name);
                match statement_timeout {
                    Some(limit) => opts.options([(
                        "statement_timeout",
                        format!("{}ms", limit.as_millis().max(1)),
                    )]),
                    None => opts,
                }
            });
            let released = health.clone();
            connect.map_sqlx_postgres_pool_opts(move |pool| {
                let health = released.clone();
                pool.after_release(move |conn, _| {
                    Box::pin(std::future::ready(Ok(health::postgres_reusable(
                        conn, &health,
                    ))))
                })
            });
        }
        let mut db = Database::connect(connect).await?;
        let counted = counters.clone();
        // Statements the driver runs one per command (reads, PostgreSQL transactions).
        db.set_metric_callback(move |_info| {
            counted.commands.fetch_add(1, Ordering::Relaxed);
            counted.statements.fetch_add(1, Ordering::Relaxed);
        });
        let work_channel = channel_name("tasker_work", options.schema.as_deref());
        Ok(Store {
            db,
            clock,
            counters,
            raw_transaction,
            parsed_templates: Arc::default(),
            creations: Arc::default(),
            step_limits: Arc::default(),
            work_channel,
            origin: uuid::Uuid::new_v4().simple().to_string().into(),
            appended: Arc::new(tokio::sync::watch::Sender::new(0)),
            health,
        })
    }

    /// Runs a write operation and notes a fault, which starts (or continues) an episode;
    /// [`Store::commit`] ends it. Refusals by the rules say nothing either way.
    pub(crate) async fn writing<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let result = operation.await;
        if let Err(Error::Unavailable { fault, cause, .. }) = &result {
            self.health.failed(*fault, cause, self.clock.now());
        }
        result
    }

    /// Starts a write transaction (see [`WriteTxn`]).
    pub(crate) async fn begin_write(&self) -> Result<WriteTxn> {
        WriteTxn::begin(&self.db, &self.counters, &self.raw_transaction).await
    }

    /// Commits a write transaction; a commit that returns is what ends a fault episode (an
    /// operation that wrote nothing says nothing about whether writes work).
    pub(crate) async fn commit(&self, txn: WriteTxn) -> Result<()> {
        match txn.commit().await {
            Ok(()) => {
                self.health.succeeded(self.clock.now());
                Ok(())
            }
            // The COMMIT was sent and its answer lost: the database may have committed.
            Err(Error::Unavailable {
                fault: fault @ (Fault::Unreachable | Fault::Timeout),
                cause,
                ..
            }) => Err(Error::Unavailable {
                fault,
                uncertain: true,
                cause,
            }),
            Err(other) => Err(other),
        }
    }

    /// The fault that makes writes fail now and since when, if they do.
    pub fn write_fault(&self) -> Option<(Fault, chrono::DateTime<chrono::Utc>)> {
        self.health.current()
    }

    /// Writes and commits a row of its own (`health_probe`), to learn whether writes work
    /// again while nothing else writes; ends the fault episode when it does.
    pub async fn probe_write(&self) -> Result<()> {
        self.writing(async {
            let mut sql = sql::Sql::new(self.db.get_database_backend());
            sql.push("INSERT INTO health_probe (id, checked_at_ms) VALUES (1, ")
                .bind(self.clock.now().timestamp_millis())
                .push(") ON CONFLICT (id) DO UPDATE SET checked_at_ms = excluded.checked_at_ms");
            self.db.execute_raw(sql.build()).await?;
            self.health.succeeded(self.clock.now());
            Ok(())
        })
        .await
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<()> {
        Migrator::up(&self.db, None).await?;
        Ok(())
    }

    /// Whether the database answers (for readiness checks).
    pub async fn ping(&self) -> Result<()> {
        self.db.ping().await?;
        Ok(())
    }

    /// "sqlite" or "postgres", for logs and health output.
    pub fn backend_name(&self) -> &'static str {
        match self.db.get_database_backend() {
            DbBackend::Sqlite => "sqlite",
            DbBackend::Postgres => "postgres",
            _ => "other",
        }
    }

    /// How many SQL statements this store has executed since it connected (statements sent
    /// together in one command count one by one; `BEGIN`, `COMMIT` and `ROLLBACK` are not
    /// counted).
    pub fn statement_count(&self) -> u64 {
        self.counters.statements.load(Ordering::Relaxed)
    }

    /// How many commands this store has sent to the database since it connected, each one
    /// round trip to the driver's thread or the server: a write transaction's `BEGIN` and
    /// `COMMIT` count when they travel alone (on PostgreSQL), not when they go with other
    /// statements (on SQLite).
    pub fn round_trip_count(&self) -> u64 {
        self.counters.commands.load(Ordering::Relaxed)
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(self) -> Result<()> {
        self.db.close().await?;
        Ok(())
    }

    /// Now, truncated to microseconds: PostgreSQL keeps no finer time, and a value read back
    /// must compare equal to the one written.
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        let now = self.clock.now();
        let micros = now.timestamp_micros();
        chrono::DateTime::from_timestamp_micros(micros).unwrap_or(now)
    }

    /// A task row by id, or `NotFound`.
    pub(crate) async fn task_row<C: ConnectionTrait>(
        conn: &C,
        id: uuid::Uuid,
    ) -> Result<entities::task::Model> {
        use sea_orm::EntityTrait;
        entities::task::Entity::find_by_id(id)
            .one(conn)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "task",
                key: id.to_string(),
            })
    }

    /// A step row by id, or `NotFound`.
    pub(crate) async fn step_row<C: ConnectionTrait>(
        conn: &C,
        id: uuid::Uuid,
    ) -> Result<entities::workflow_step::Model> {
        use sea_orm::EntityTrait;
        entities::workflow_step::Entity::find_by_id(id)
            .one(conn)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "step",
                key: id.to_string(),
            })
    }

    fn is_unique_violation(err: &DbErr) -> bool {
        matches!(
            err.sql_err(),
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
        )
    }

    /// PostgreSQL: creates an empty schema (`[a-z0-9_]` name) for a private database, as
    /// the benchmark and the tests use.
    pub async fn create_schema(&self, schema: &str) -> Result<()> {
        let schema = schema_name(schema)?;
        self.db
            .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
            .await?;
        Ok(())
    }

    /// PostgreSQL: drops a schema made by [`Store::create_schema`] and everything in it.
    pub async fn drop_schema(&self, schema: &str) -> Result<()> {
        let schema = schema_name(schema)?;
        self.db
            .execute_unprepared(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await?;
        Ok(())
    }

    /// Runs a raw statement (a `PRAGMA`, a checkpoint): test builds only, so the server has
    /// no way to send statements — transaction control among them — that its operations do
    /// not.
    #[cfg(feature = "testing")]
    pub async fn execute_unprepared(&self, sql: &str) -> Result<()> {
        self.db.execute_unprepared(sql).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::channel_name;

    #[test]
    fn channel_names_fit_postgres_identifiers_and_differ_per_schema() {
        let long = format!("tasker_bench_{}", "f".repeat(32));
        let name = channel_name("tasker_work", Some(&long));
        assert!(name.len() <= 63, "{name}");
        assert_ne!(name, channel_name("tasker_work", Some("other")));
        assert_eq!(name, channel_name("tasker_work", Some(&long)), "stable");
        assert_eq!(channel_name("tasker_work", None), "tasker_work");
    }
}
