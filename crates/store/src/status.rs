//! What an operator reads about the whole database at once: tasks and steps by namespace and
//! state (one grouped query each), the ready queue's depth and oldest age, the event log's
//! head, and the connection pool. `/health/status` and `/metrics` both read it.

use crate::execution::push_ready_steps;
use crate::sql::Sql;
use crate::{Result, Store};
use sea_orm::{DbBackend, FromQueryResult};
use tasker_domain::Within;

/// The database as an operator sees it, within a scope.
#[derive(Debug, Clone, Default)]
pub struct StoreStatus {
    /// (namespace, state, count) for every pair that has tasks.
    pub tasks: Vec<(String, String, u64)>,
    /// (namespace, state, count) for every pair that has steps.
    pub steps: Vec<(String, String, u64)>,
    /// Steps claimable now, reported up to [`READY_COUNT_CAP`].
    pub ready_steps: u64,
    /// How long the longest-waiting claimable step has been claimable, in milliseconds.
    pub oldest_ready_ms: Option<i64>,
    /// The event log's newest position (its sequence on PostgreSQL).
    pub event_head: Option<i64>,
}

/// The most the ready queue's depth reports: past this, "very deep" is all an operator needs.
pub const READY_COUNT_CAP: u32 = 100_000;

/// The connection pool now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStatus {
    pub in_use: u32,
    pub idle: u32,
}

#[derive(Debug, FromQueryResult)]
struct Grouped {
    namespace: String,
    state: String,
    count: i64,
}

#[derive(Debug, FromQueryResult)]
struct ReadyQueue {
    ready: i64,
    since: Option<i64>,
}

impl Store {
    /// Tasks and steps by namespace and state, the ready queue and the log's head, within
    /// `within`.
    pub async fn status(&self, within: &Within) -> Result<StoreStatus> {
        let backend = self.db.get_database_backend();
        let scope = |sql: &mut Sql| {
            if let Within::Only(namespaces) = within {
                sql.push(" WHERE t.namespace IN ")
                    .bind_list(namespaces.iter().cloned());
            }
        };
        let mut tasks = Sql::new(backend);
        tasks.push(
            "SELECT t.namespace AS namespace, t.state AS state, COUNT(*) AS count FROM tasks t",
        );
        scope(&mut tasks);
        tasks.push(" GROUP BY t.namespace, t.state");
        let mut steps = Sql::new(backend);
        steps.push("SELECT t.namespace AS namespace, s.state AS state, COUNT(*) AS count FROM workflow_steps s JOIN tasks t ON t.id = s.task_id");
        scope(&mut steps);
        steps.push(" GROUP BY t.namespace, s.state");
        let now_ms = self.now_ms();
        // The ready queue in one pass: its depth and its oldest claimable step.
        let mut ready = Sql::new(backend);
        ready.push("SELECT COUNT(*) AS ready, MIN(s.ready_since_ms) AS since");
        push_ready_steps(&mut ready, now_ms, &[], within, self.limited_claimable());
        let grouped = |rows: Vec<Grouped>| {
            rows.into_iter()
                .map(|row| {
                    (
                        row.namespace,
                        row.state,
                        u64::try_from(row.count).unwrap_or(0),
                    )
                })
                .collect()
        };
        let tasks = grouped(
            Grouped::find_by_statement(tasks.build())
                .all(&self.db)
                .await?,
        );
        let steps = grouped(
            Grouped::find_by_statement(steps.build())
                .all(&self.db)
                .await?,
        );
        let queue = ReadyQueue::find_by_statement(ready.build())
            .one(&self.db)
            .await?;
        let since = queue.as_ref().and_then(|row| row.since);
        let ready_steps = queue
            .map_or(0, |row| u64::try_from(row.ready).unwrap_or(0))
            .min(u64::from(READY_COUNT_CAP));
        let event_head = self.event_head().await?.map(|cursor| cursor.0);
        Ok(StoreStatus {
            tasks,
            steps,
            ready_steps,
            oldest_ready_ms: since.map(|since| (now_ms - since).max(0)),
            event_head,
        })
    }

    /// The connection pool: connections handed out and connections waiting to be.
    pub fn pool_status(&self) -> PoolStatus {
        let (size, idle) = match self.db.get_database_backend() {
            DbBackend::Postgres => {
                let pool = self.db.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            _ => {
                let pool = self.db.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
        };
        // The driver counts idle connections apart from the pool's size, and for a moment the
        // two can disagree (seen: an idle count far above the size): never more idle than open.
        let idle = u32::try_from(idle).unwrap_or(u32::MAX).min(size);
        PoolStatus {
            in_use: size.saturating_sub(idle),
            idle,
        }
    }
}

#[derive(Debug, FromQueryResult)]
struct Size {
    bytes: Option<i64>,
}

impl Store {
    /// The bytes the database's tables and indexes hold now (SQLite: its pages in use;
    /// PostgreSQL: every table of the schema with its indexes and TOAST), so the cost of
    /// what is stored can be measured per task.
    pub async fn database_bytes(&self) -> Result<u64> {
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push(if sql.is_postgres() {
            "SELECT CAST(SUM(pg_total_relation_size(c.oid)) AS BIGINT) AS bytes FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind = 'r'"
        } else {
            "SELECT (p.page_count - f.freelist_count) * s.page_size AS bytes \
             FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() s"
        });
        let size = Size::find_by_statement(sql.build()).one(&self.db).await?;
        Ok(size
            .and_then(|size| size.bytes)
            .map_or(0, |bytes| u64::try_from(bytes).unwrap_or(0)))
    }
}

#[derive(Debug, FromQueryResult)]
struct TableName {
    name: String,
}

impl Store {
    /// PostgreSQL: vacuums and analyzes every table of the schema, as autovacuum does in the
    /// background after many writes: the dead row versions left by a bulk load are cleared
    /// and the planner's statistics describe what the tables now hold. The benchmark calls it
    /// after filling a history, so that what it measures next is the steady state, not
    /// autovacuum catching up. Nothing to do on SQLite (no dead versions; plans do not rest on
    /// statistics).
    pub async fn vacuum_analyze(&self) -> Result<()> {
        if self.db.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let mut sql = Sql::new(DbBackend::Postgres);
        // Schema-qualified and quoted by the server (`%I`), so no other schema's table of the
        // same name is meant.
        sql.push("SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables WHERE schemaname = current_schema()");
        let tables = TableName::find_by_statement(sql.build())
            .all(&self.db)
            .await?;
        if tables.is_empty() {
            return Ok(());
        }
        let list = tables
            .iter()
            .map(|table| table.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        // VACUUM runs outside a transaction: one unprepared command on a pooled connection.
        sea_orm::ConnectionTrait::execute_unprepared(&self.db, &format!("VACUUM ANALYZE {list}"))
            .await?;
        Ok(())
    }
}
