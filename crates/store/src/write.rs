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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

/// Set while a SQLite `WriteTxn` may have its raw `BEGIN` open (the pool has one connection):
/// the driver does not count such a transaction, so the pool's check on release looks at
/// SQLite's own flag instead of trusting the driver while this is set.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawTransaction(Arc<AtomicBool>);

impl RawTransaction {
    pub fn may_be_open(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, open: bool) {
        self.0.store(open, Ordering::Release);
    }
}

/// A write transaction: the only way the store writes.
pub(crate) struct WriteTxn {
    kind: Kind,
    counters: Counters,
    /// PostgreSQL: whether it holds the event sequencer's lock (see
    /// [`crate::Store::lock_sequencer`]).
    sequencer_locked: AtomicBool,
    /// Tasks that ended holding a concurrency slot, when their slots are freed together at
    /// the end (`None`: each change frees its own at once). See [`WriteTxn::defer_slot_frees`].
    deferred_frees: std::sync::Mutex<Option<Vec<crate::entities::task::Model>>>,
}

enum Kind {
    Driver(DatabaseTransaction),
    Script(tokio::sync::Mutex<Script>),
}

impl WriteTxn {
    /// Starts a write transaction. On SQLite this takes the pool's one connection and sends
    /// nothing yet.
    pub async fn begin(
        db: &DatabaseConnection,
        counters: &Counters,
        raw: &RawTransaction,
    ) -> Result<WriteTxn> {
        let kind = if db.get_database_backend() == DbBackend::Sqlite {
            let conn = db
                .get_sqlite_connection_pool()
                .acquire()
                .await
                .map_err(|err| DbErr::Conn(RuntimeErr::SqlxError(Arc::new(err))))?;
            Kind::Script(tokio::sync::Mutex::new(Script {
                conn: Some(conn),
                waiting: BEGIN.to_owned(),
                values: Vec::new(),
                statements: 0,
                state: ScriptState::NotBegun,
                counters: counters.clone(),
                raw: raw.clone(),
            }))
        } else {
            let txn = db.begin().await?;
            counters.sent(1, 0);
            Kind::Driver(txn)
        };
        Ok(WriteTxn {
            kind,
            counters: counters.clone(),
            sequencer_locked: AtomicBool::new(false),
            deferred_frees: std::sync::Mutex::new(None),
        })
    }

    /// Runs `statements` in order and answers the rows of each: on SQLite in one command.
    /// For statements that depend on no answer before them.
    pub async fn query_many(&self, statements: Vec<Statement>) -> Result<Vec<Vec<QueryResult>>> {
        match &self.kind {
            Kind::Driver(txn) => {
                let mut answers = Vec::with_capacity(statements.len());
                for statement in statements {
                    answers.push(txn.query_all_raw(statement).await?);
                }
                Ok(answers)
            }
            Kind::Script(script) => {
                let count = statements.len() as u64;
                let answers = script.lock().await.send_all(statements, count).await?;
                Ok(answers.into_iter().map(|answer| answer.rows).collect())
            }
        }
    }

    /// From now on, slots that ending tasks free are collected and freed together by
    /// [`crate::Store::free_deferred_slots`]: a transaction that ends many tasks one change at
    /// a time (a sweep) then takes its concurrency keys' locks once, in their one order, as
    /// every other transaction does.
    pub fn defer_slot_frees(&self) {
        let mut deferred = self
            .deferred_frees
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        deferred.get_or_insert_with(Vec::new);
    }

    /// Collects `ended` when frees are deferred (answering `true`); `false` otherwise.
    pub fn defer_frees_of(&self, ended: &[crate::entities::task::Model]) -> bool {
        let mut deferred = self
            .deferred_frees
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match deferred.as_mut() {
            Some(list) => {
                list.extend(ended.iter().cloned());
                true
            }
            None => false,
        }
    }

    /// The tasks collected so far, and frees no longer deferred.
    pub fn take_deferred_frees(&self) -> Vec<crate::entities::task::Model> {
        let mut deferred = self
            .deferred_frees
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        deferred.take().unwrap_or_default()
    }

    pub fn sequencer_locked(&self) -> bool {
        self.sequencer_locked.load(Ordering::Relaxed)
    }

    pub fn note_sequencer_locked(&self) {
        self.sequencer_locked.store(true, Ordering::Relaxed);
    }

    /// Runs `statement` (`statements` of them, `;`-separated on SQLite), whose result nobody
    /// reads (INSERTs without RETURNING; placeholders anonymous, as the store's builders
    /// write them: a numbered one would count from the script's start): on SQLite it goes
    /// with the next command, so its error, if any, comes from that command.
    pub async fn queue(&self, statement: Statement, statements: u64) -> Result<()> {
        match &self.kind {
            Kind::Driver(txn) => {
                txn.execute_raw(statement).await?;
                // One command and statement, counted by the driver; the others went with it.
                self.counters.sent(0, statements.saturating_sub(1));
                Ok(())
            }
            Kind::Script(script) => Ok(script.lock().await.queue(statement, statements)?),
        }
    }

    /// Commits, with whatever still waits to be sent.
    pub async fn commit(self) -> Result<()> {
        match self.kind {
            Kind::Driver(txn) => {
                self.counters.sent(1, 0);
                Ok(txn.commit().await?)
            }
            Kind::Script(script) => Ok(script.into_inner().commit().await?),
        }
    }
}

/// The longest script kept in the driver's statement cache.
const CACHED_SCRIPT_BYTES: usize = 8 * 1024;

/// How a SQLite transaction starts: it takes the write lock at once, so a writer in another
/// process makes it wait (busy timeout) at its start rather than fail halfway.
const BEGIN: &str = "BEGIN IMMEDIATE";

/// Where a script transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScriptState {
    /// Nothing sent yet: `BEGIN` waits with the first statement.
    NotBegun,
    /// `BEGIN` went to the database: the connection may be inside the transaction.
    Begun,
    /// Committed, or rolled back after a failed command: nothing more may be sent.
    Ended,
}

/// A SQLite transaction sent as scripts over one connection.
struct Script {
    /// `None` once handed back.
    conn: Option<PoolConnection<Sqlite>>,
    /// Statements not sent yet, `;`-separated: `BEGIN IMMEDIATE` until the first command,
    /// then queued writes.
    waiting: String,
    /// The values of the waiting statements' placeholders, in order (SQLite's anonymous `?`
    /// take the values of a script in order across its statements).
    values: Vec<Value>,
    /// How many statements wait, `BEGIN` aside.
    statements: u64,
    state: ScriptState,
    counters: Counters,
    raw: RawTransaction,
}

/// What one statement of a script answered.
struct Answer {
    rows: Vec<QueryResult>,
    changes: sqlx::sqlite::SqliteQueryResult,
}

/// Refuses statements for a transaction that ended (a caller that went on after an error).
fn ended() -> DbErr {
    DbErr::Custom("the transaction has ended (a statement in it failed); start another".into())
}

impl Script {
    fn queue(&mut self, statement: Statement, statements: u64) -> Result<(), DbErr> {
        if self.state == ScriptState::Ended {
            return Err(ended());
        }
        self.append(&statement.sql, statement.values);
        self.statements += statements;
        Ok(())
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

    /// Sends what waits and then `statement` as one command; answers the rows and changes of
    /// `statement`.
    async fn send(&mut self, statement: Statement, statements: u64) -> Result<Answer, DbErr> {
        let mut answers = self.send_all(vec![statement], statements).await?;
        answers.pop().ok_or_else(ended)
    }

    /// Sends what waits and then `tail` as one command (`statements` of them, transaction
    /// control left out); answers the rows and changes of each of `tail`, in order.
    async fn send_all(
        &mut self,
        tail: Vec<Statement>,
        statements: u64,
    ) -> Result<Vec<Answer>, DbErr> {
        if self.state == ScriptState::Ended || self.conn.is_none() {
            return Err(ended());
        }
        let answered = tail.len();
        for statement in tail {
            self.append(&statement.sql, statement.values);
        }
        let text = std::mem::take(&mut self.waiting);
        // Small scripts come back (a creation, a chain step: the same rows each time) and are
        // kept prepared; a big batch's seldom does, and would crowd the driver's cache.
        let repeats = text.len() <= CACHED_SCRIPT_BYTES;
        let values = std::mem::take(&mut self.values);
        let statements = std::mem::take(&mut self.statements) + statements;
        self.counters.sent(1, statements);
        let span = tracing::info_span!(
            target: "sea_orm",
            "db.script",
            otel.kind = "client",
            db.system = "sqlite",
            db.statement = text.as_str(),
        );
        self.state = ScriptState::Begun;
        self.raw.set(true);
        let Some(conn) = self.conn.as_mut() else {
            return Err(ended());
        };
        match tracing::Instrument::instrument(run(conn, text, values, repeats), span).await {
            Ok(mut answers) if answers.len() >= answered => {
                Ok(answers.split_off(answers.len() - answered))
            }
            Ok(_) => {
                // Fewer statements ran than were sent: not a state to commit.
                self.roll_back().await;
                Err(DbErr::Custom(
                    "a script ran fewer statements than it holds".into(),
                ))
            }
            Err(err) => {
                self.roll_back().await;
                Err(DbErr::Query(RuntimeErr::SqlxError(Arc::new(err))))
            }
        }
    }

    /// After a failed command: ends the transaction. SQLite may have rolled it back already
    /// (a full disk, an I/O error), so a `ROLLBACK` that fails is checked against SQLite's own
    /// flag; a connection still inside a transaction after that is closed, not reused.
    async fn roll_back(&mut self) {
        self.waiting.clear();
        self.values.clear();
        self.statements = 0;
        self.state = ScriptState::Ended;
        if let Some(conn) = self.conn.as_mut() {
            self.counters.sent(1, 0);
            if !ends_transaction(conn).await {
                conn.close_on_drop();
            }
        }
        self.raw.set(false);
    }

    async fn commit(mut self) -> Result<(), DbErr> {
        match self.state {
            ScriptState::Ended => return Err(ended()),
            // Nothing was sent and nothing waits: there is nothing to commit.
            ScriptState::NotBegun if self.statements == 0 => {}
            _ => {
                self.send(unbound("COMMIT"), 0).await?;
            }
        }
        self.state = ScriptState::Ended;
        self.raw.set(false);
        Ok(())
    }
}

/// A statement without values.
fn unbound(sql: &str) -> Statement {
    Statement::from_string(DbBackend::Sqlite, sql)
}

/// Rolls back; whether the connection is outside any transaction afterwards.
async fn ends_transaction(conn: &mut PoolConnection<Sqlite>) -> bool {
    if conn.execute(sqlx::raw_sql("ROLLBACK")).await.is_ok() {
        return true;
    }
    // "No transaction is active" when SQLite rolled back on its own.
    matches!(crate::health::sqlite_autocommit(conn).await, Ok(true))
}

/// One command: every statement of `text`; the rows and changes of each, in order.
async fn run(
    conn: &mut PoolConnection<Sqlite>,
    text: String,
    values: Vec<Value>,
    repeats: bool,
) -> Result<Vec<Answer>, sqlx::Error> {
    let query =
        sqlx::query_with(sqlx::AssertSqlSafe(text), SqlxValues(Values(values))).persistent(repeats);
    let mut items = conn.fetch_many(query);
    let mut answers = Vec::new();
    let mut rows = Vec::new();
    // Each statement's rows come before its summary.
    while let Some(item) = items.try_next().await? {
        match item {
            Either::Right(row) => rows.push(QueryResult::from(row)),
            Either::Left(changes) => answers.push(Answer {
                rows: std::mem::take(&mut rows),
                changes,
            }),
        }
    }
    Ok(answers)
}

impl Drop for Script {
    /// A transaction dropped before its end (an error in the caller, a cancelled request) is
    /// rolled back before its connection serves anyone else: a task holds the connection
    /// until then. (Outside a runtime the driver cannot hand a connection back either; the
    /// pool's check on release then finds the transaction open and closes it.)
    fn drop(&mut self) {
        if self.state != ScriptState::Begun {
            return;
        }
        let (Some(mut conn), Ok(runtime)) =
            (self.conn.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        self.counters.sent(1, 0);
        let raw = self.raw.clone();
        runtime.spawn(async move {
            if !ends_transaction(&mut conn).await {
                conn.close_on_drop();
            }
            raw.set(false);
        });
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
                let answer = script.lock().await.send(stmt, 1).await?;
                Ok(answer.changes.into())
            }
        }
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        match &self.kind {
            Kind::Driver(txn) => txn.execute_unprepared(sql).await,
            Kind::Script(script) => {
                let answer = script.lock().await.send(unbound(sql), 1).await?;
                Ok(answer.changes.into())
            }
        }
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        Ok(self.query_all_raw(stmt).await?.into_iter().next())
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        match &self.kind {
            Kind::Driver(txn) => txn.query_all_raw(stmt).await,
            Kind::Script(script) => Ok(script.lock().await.send(stmt, 1).await?.rows),
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
    async fn statements_sent_together_answer_their_own_rows() {
        for database in databases().await {
            let store = &database.store;
            let txn = store.begin_write().await.expect("begin");
            txn.queue(insert(store, 1, "a"), 1).await.expect("queue");
            let backend = store.db.get_database_backend();
            let answers = txn
                .query_many(vec![
                    insert(store, 2, "b"),
                    select(store),
                    Statement::from_string(backend, "SELECT name FROM scratch WHERE id = 2"),
                ])
                .await
                .expect("three statements");
            let names = |rows: &[QueryResult]| -> Vec<String> {
                rows.iter()
                    .map(|row| Name::from_query_result(row, "").expect("name").name)
                    .collect()
            };
            let got: Vec<Vec<String>> = answers.iter().map(|rows| names(rows)).collect();
            assert_eq!(
                got,
                [
                    vec![],
                    vec!["a".to_owned(), "b".to_owned()],
                    vec!["b".to_owned()]
                ],
                "{}",
                database.backend()
            );
            txn.commit().await.expect("commit");
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
            // Going on after it writes nothing either (on SQLite the transaction refuses; on
            // PostgreSQL the aborted transaction's COMMIT rolls back).
            let went_on = match txn.queue(insert(store, 3, "c"), 1).await {
                Ok(()) => txn.commit().await,
                Err(err) => {
                    drop(txn);
                    Err(err)
                }
            };
            if database.backend() == "sqlite" {
                assert!(went_on.is_err(), "{went_on:?}");
            }
            assert!(committed(store).await.is_empty(), "{}", database.backend());
            writes_only_b_next(&database).await;
        }
    }

    #[tokio::test]
    async fn a_command_cancelled_in_flight_leaves_nothing_behind() {
        for database in databases().await {
            let store = &database.store;
            let txn = store.begin_write().await.expect("begin");
            txn.queue(insert(store, 1, "a"), 1).await.expect("queue");
            // Polled once (the command is on its way), then dropped: a request cancelled.
            let read = txn.query_all_raw(select(store));
            let _ = tokio::time::timeout(std::time::Duration::ZERO, read).await;
            drop(txn);
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
