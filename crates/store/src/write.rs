//! Write transactions that reach the database in as few commands as the driver allows.
//!
//! On SQLite each command goes to the driver's own thread and back: two thread wake-ups that
//! cost far more than the statement itself (~150–200 µs on a small VM, against a few µs of
//! SQLite work). So a write transaction there sends its statements as scripts, one command
//! each: `BEGIN IMMEDIATE` goes with the first statement, rows nobody reads back (the
//! transition and event inserts, [`WriteTxn::queue`]) wait and go with the next statement or
//! with the `COMMIT`. A task's creation is one command; a claim that completes what it
//! claimed saves three.
//!
//! On PostgreSQL the driver's own transaction runs every statement as it comes: its extended
//! protocol takes one statement per command.

use crate::Result;
use futures::TryStreamExt as _;
use sea_orm::sea_query::Values;
use sea_orm::sqlx::{self, Either, Executor as _, Sqlite, pool::PoolConnection};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, ExecResult,
    QueryResult, RuntimeErr, Statement, TransactionTrait, Value,
};
use sea_query_sqlx::SqlxValues;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the store sent to the database since it connected (see
/// [`crate::Store::statement_count`] and [`crate::Store::round_trip_count`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    /// Commands, each one round trip: transaction control included.
    pub commands: Arc<AtomicU64>,
    /// SQL statements: transaction control left out.
    pub statements: Arc<AtomicU64>,
}

impl Counters {
    fn sent(&self, commands: u64, statements: u64) {
        self.commands.fetch_add(commands, Ordering::Relaxed);
        self.statements.fetch_add(statements, Ordering::Relaxed);
    }
}

/// A write transaction: the only way the store writes.
pub(crate) struct WriteTxn {
    kind: Kind,
    counters: Counters,
}

enum Kind {
    Driver(DatabaseTransaction),
    Script(tokio::sync::Mutex<Script>),
}

impl WriteTxn {
    /// Starts a write transaction. On SQLite this takes the pool's one connection and sends
    /// nothing yet.
    pub async fn begin(db: &DatabaseConnection, counters: &Counters) -> Result<WriteTxn> {
        let kind = if db.get_database_backend() == DbBackend::Sqlite {
            let conn = db
                .get_sqlite_connection_pool()
                .acquire()
                .await
                .map_err(|err| DbErr::Conn(RuntimeErr::SqlxError(Arc::new(err))))?;
            Kind::Script(tokio::sync::Mutex::new(Script {
                conn: Some(conn),
                waiting: "BEGIN IMMEDIATE".to_owned(),
                values: Vec::new(),
                statements: 0,
                begun: false,
                counters: counters.clone(),
            }))
        } else {
            let txn = db.begin().await?;
            counters.sent(1, 0);
            Kind::Driver(txn)
        };
        Ok(WriteTxn {
            kind,
            counters: counters.clone(),
        })
    }

    /// Runs `statement` (`statements` of them, `;`-separated on SQLite), whose result nobody
    /// reads (INSERTs without RETURNING): on SQLite it goes with the next command, so its
    /// error, if any, comes from that command.
    pub async fn queue(&self, statement: Statement, statements: u64) -> Result<()> {
        match &self.kind {
            Kind::Driver(txn) => {
                txn.execute_raw(statement).await?;
                // One command and statement, counted by the driver; the others went with it.
                self.counters.sent(0, statements.saturating_sub(1));
                Ok(())
            }
            Kind::Script(script) => {
                script.lock().await.queue(statement, statements);
                Ok(())
            }
        }
    }

    /// Commits, with whatever still waits to be sent.
    pub async fn commit(self) -> Result<()> {
        match self.kind {
            Kind::Driver(txn) => {
                self.counters.sent(1, 0);
                Ok(txn.commit().await?)
            }
            Kind::Script(script) => script.into_inner().commit().await,
        }
    }
}

/// A SQLite transaction sent as scripts over one connection.
struct Script {
    /// `None` once committed.
    conn: Option<PoolConnection<Sqlite>>,
    /// Statements not sent yet, `;`-separated: `BEGIN IMMEDIATE` until the first command,
    /// then queued writes.
    waiting: String,
    /// The values of the waiting statements' placeholders, in order (SQLite's anonymous `?`
    /// take the values of a script in order across its statements).
    values: Vec<Value>,
    /// How many statements wait, `BEGIN` aside.
    statements: u64,
    /// Whether `BEGIN` went to the database (and no `COMMIT` or `ROLLBACK` since): the
    /// connection may be inside the transaction.
    begun: bool,
    counters: Counters,
}

/// What the last statement of a script answered.
struct Answer {
    rows: Vec<QueryResult>,
    changes: Option<sqlx::sqlite::SqliteQueryResult>,
}

impl Script {
    fn queue(&mut self, statement: Statement, statements: u64) {
        self.append(&statement.sql, statement.values);
        self.statements += statements;
    }

    fn append(&mut self, sql: &str, values: Option<Values>) {
        if !self.waiting.is_empty() {
            self.waiting.push_str("; ");
        }
        self.waiting.push_str(sql);
        if let Some(Values(values)) = values {
            self.values.extend(values);
        }
    }

    /// Sends what waits and then `sql` as one command; answers the rows and changes of `sql`.
    async fn send(
        &mut self,
        sql: &str,
        values: Option<Values>,
        statements: u64,
    ) -> Result<Answer, DbErr> {
        self.append(sql, values);
        let text = std::mem::take(&mut self.waiting);
        let values = std::mem::take(&mut self.values);
        let statements = std::mem::take(&mut self.statements) + statements;
        self.counters.sent(1, statements);
        let span = tracing::info_span!(
            "db.script",
            otel.kind = "client",
            db.system = "sqlite",
            db.statement = text.as_str(),
        );
        let Some(conn) = self.conn.as_mut() else {
            return Err(DbErr::Custom("the transaction has ended".into()));
        };
        self.begun = true;
        let answer = tracing::Instrument::instrument(run(conn, text, values), span).await;
        match answer {
            Ok(answer) => Ok(answer),
            Err(err) => {
                self.roll_back().await;
                Err(DbErr::Query(RuntimeErr::SqlxError(Arc::new(err))))
            }
        }
    }

    /// After a failed command: ends the transaction (SQLite may have rolled it back already;
    /// a connection whose `ROLLBACK` fails is closed rather than reused).
    async fn roll_back(&mut self) {
        self.waiting.clear();
        self.values.clear();
        self.statements = 0;
        if let Some(conn) = self.conn.as_mut() {
            self.counters.sent(1, 0);
            if conn.execute(sqlx::raw_sql("ROLLBACK")).await.is_err() {
                conn.close_on_drop();
            }
        }
        self.begun = false;
    }

    async fn commit(mut self) -> Result<()> {
        if !self.begun && self.statements == 0 {
            // Nothing was sent or waits: there is nothing to commit.
            return Ok(());
        }
        self.send("COMMIT", None, 0).await?;
        self.begun = false;
        self.conn = None;
        Ok(())
    }
}

/// One command: every statement of `text`; the rows and changes of the last.
async fn run(
    conn: &mut PoolConnection<Sqlite>,
    text: String,
    values: Vec<Value>,
) -> Result<Answer, sqlx::Error> {
    let query = sqlx::query_with(sqlx::AssertSqlSafe(text), SqlxValues(Values(values)));
    let mut answers = conn.fetch_many(query);
    let mut answer = Answer {
        rows: Vec::new(),
        changes: None,
    };
    let mut rows = Vec::new();
    // Each statement's rows come before its summary: the rows kept are the last statement's.
    while let Some(item) = answers.try_next().await? {
        match item {
            Either::Right(row) => rows.push(QueryResult::from(row)),
            Either::Left(changes) => {
                answer.rows = std::mem::take(&mut rows);
                answer.changes = Some(changes);
            }
        }
    }
    Ok(answer)
}

impl Drop for Script {
    /// A transaction dropped before its commit (an error, a cancelled request) is rolled back
    /// before its connection serves anyone else.
    fn drop(&mut self) {
        if !self.begun {
            return;
        }
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if conn.execute(sqlx::raw_sql("ROLLBACK")).await.is_err() {
                        conn.close_on_drop();
                    }
                });
            }
            // No runtime to send it with: closing the connection rolls the transaction back.
            Err(_) => conn.close_on_drop(),
        }
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for WriteTxn {
    fn get_database_backend(&self) -> DbBackend {
        match &self.kind {
            Kind::Driver(txn) => txn.get_database_backend(),
            Kind::Script(_) => DbBackend::Sqlite,
        }
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        match &self.kind {
            Kind::Driver(txn) => txn.execute_raw(stmt).await,
            Kind::Script(script) => {
                let answer = script.lock().await.send(&stmt.sql, stmt.values, 1).await?;
                Ok(answer.changes.unwrap_or_default().into())
            }
        }
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        match &self.kind {
            Kind::Driver(txn) => txn.execute_unprepared(sql).await,
            Kind::Script(script) => {
                let answer = script.lock().await.send(sql, None, 1).await?;
                Ok(answer.changes.unwrap_or_default().into())
            }
        }
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        Ok(self.query_all_raw(stmt).await?.into_iter().next())
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        match &self.kind {
            Kind::Driver(txn) => txn.query_all_raw(stmt).await,
            Kind::Script(script) => Ok(script
                .lock()
                .await
                .send(&stmt.sql, stmt.values, 1)
                .await?
                .rows),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use crate::sql::Sql;
    use crate::testing::TestDatabase;
    use sea_orm::FromQueryResult;
    use tasker_domain::clock::SystemClock;

    #[derive(FromQueryResult)]
    struct Name {
        name: String,
    }

    async fn databases() -> Vec<TestDatabase> {
        let databases = TestDatabase::all(Arc::new(SystemClock)).await;
        for database in &databases {
            database
                .store
                .db
                .execute_unprepared(
                    "CREATE TABLE scratch (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
                )
                .await
                .expect("scratch table");
        }
        databases
    }

    fn insert(store: &Store, id: i64, name: &str) -> Statement {
        let mut sql = Sql::new(store.db.get_database_backend());
        sql.push("INSERT INTO scratch (id, name) VALUES (")
            .bind(id)
            .push(", ")
            .bind(name.to_owned())
            .push(")");
        sql.build()
    }

    fn select(store: &Store) -> Statement {
        Statement::from_string(
            store.db.get_database_backend(),
            "SELECT name FROM scratch ORDER BY id",
        )
    }

    /// The committed names, read outside any transaction.
    async fn committed(store: &Store) -> Vec<String> {
        let rows = store.db.query_all_raw(select(store)).await.expect("read");
        rows.iter()
            .map(|row| Name::from_query_result(row, "").expect("name").name)
            .collect()
    }

    /// The next transaction begins, writes `b` and commits, and `b` is all there is: what came
    /// before was rolled back (a connection left inside that transaction could not begin
    /// another).
    async fn writes_only_b_next(database: &TestDatabase) {
        let store = &database.store;
        let txn = store.begin_write().await.expect("begin again");
        txn.execute_raw(insert(store, 9, "b"))
            .await
            .expect("insert");
        txn.commit().await.expect("commit");
        assert_eq!(committed(store).await, ["b"], "{}", database.backend());
    }

    #[tokio::test]
    async fn queued_rows_go_with_the_next_command_and_the_last_with_the_commit() {
        for database in databases().await {
            let store = &database.store;
            let (round_trips, statements) = (store.round_trip_count(), store.statement_count());
            let txn = store.begin_write().await.expect("begin");
            txn.queue(insert(store, 1, "a"), 1).await.expect("queue");
            txn.queue(insert(store, 2, "b"), 1).await.expect("queue");
            let seen: Vec<String> = txn
                .query_all_raw(select(store))
                .await
                .expect("read inside")
                .iter()
                .map(|row| Name::from_query_result(row, "").expect("name").name)
                .collect();
            assert_eq!(
                seen,
                ["a", "b"],
                "{}: the queued rows were written first",
                database.backend()
            );
            txn.queue(insert(store, 3, "c"), 1).await.expect("queue");
            txn.commit().await.expect("commit");
            let sent = store.round_trip_count() - round_trips;
            assert_eq!(
                store.statement_count() - statements,
                4,
                "{}",
                database.backend()
            );
            // SQLite: `BEGIN`, two INSERTs and the SELECT in one command; the last INSERT
            // and `COMMIT` in another. PostgreSQL: one command per statement, `BEGIN` and
            // `COMMIT` included.
            let expected = if database.backend() == "sqlite" { 2 } else { 6 };
            assert_eq!(sent, expected, "{}", database.backend());
            assert_eq!(
                committed(store).await,
                ["a", "b", "c"],
                "{}",
                database.backend()
            );
        }
    }

    #[tokio::test]
    async fn a_failed_command_rolls_back_what_came_before_it_and_the_connection_serves_on() {
        for database in databases().await {
            let store = &database.store;
            let txn = store.begin_write().await.expect("begin");
            txn.queue(insert(store, 1, "a"), 1).await.expect("queue");
            let repeated = txn.execute_raw(insert(store, 2, "a")).await;
            assert!(
                matches!(repeated, Err(ref err) if Store::is_unique_violation(err)),
                "{}: {repeated:?}",
                database.backend()
            );
            drop(txn);
            assert!(committed(store).await.is_empty(), "{}", database.backend());
            writes_only_b_next(&database).await;
        }
    }

    #[tokio::test]
    async fn a_transaction_dropped_before_its_commit_leaves_nothing_behind() {
        for database in databases().await {
            let store = &database.store;
            let txn = store.begin_write().await.expect("begin");
            txn.queue(insert(store, 1, "a"), 1).await.expect("queue");
            txn.query_all_raw(select(store)).await.expect("sent");
            drop(txn);
            writes_only_b_next(&database).await;
        }
    }
}
