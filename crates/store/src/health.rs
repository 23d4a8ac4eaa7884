//! What the database's faults do to the store. Two duties:
//!
//! - **No connection is reused in an unknown state.** SQLite may roll a transaction back on its
//!   own (after `SQLITE_FULL`, `SQLITE_IOERR`, `SQLITE_NOMEM`, `SQLITE_BUSY`); the driver then
//!   still counts it open, its `ROLLBACK` fails, and every later "transaction" on that
//!   connection becomes a savepoint inside one that never commits — acknowledged writes that
//!   exist only in that connection's view. So when a connection goes back to the pool it must
//!   be outside any transaction, by the driver's count and by SQLite's own autocommit flag;
//!   otherwise it is closed and a fresh one replaces it. (A PostgreSQL session that broke
//!   fails the pool's own ping on release and is closed the same way.)
//! - **Faults are told apart from bugs.** A full disk, a read-only file, an I/O error, a busy
//!   database, a lost session or a statement timeout is [`Fault`]: writes answer
//!   `Unavailable` (retryable) while it lasts, the log says once when it began and once when
//!   it ended, and readiness reports it.

use sea_orm::{DbErr, RuntimeErr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why the database cannot take writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No space left for the database (SQLite `SQLITE_FULL`, PostgreSQL `53100`).
    DiskFull,
    /// The database file or server is read-only.
    ReadOnly,
    /// The storage failed to read or write.
    Io,
    /// Another writer held the database past the busy timeout.
    Busy,
    /// The connection to the database was lost or could not be made.
    Unreachable,
    /// A statement ran past the database's time limit, or was cancelled.
    Timeout,
    /// The database ran out of memory or another resource.
    Resources,
    /// Every connection was busy for longer than a request may wait: the server is
    /// overloaded, the database is not at fault (no episode starts).
    Overloaded,
}

impl Fault {
    /// For people: what is wrong.
    pub fn reason(self) -> &'static str {
        match self {
            Fault::DiskFull => "the disk is full",
            Fault::ReadOnly => "the database is read-only",
            Fault::Io => "the storage reports I/O errors",
            Fault::Busy => "the database is locked by another writer",
            Fault::Unreachable => "the database connection was lost",
            Fault::Timeout => "a statement took too long and was cancelled",
            Fault::Resources => "the database ran out of resources",
            Fault::Overloaded => "every database connection is busy",
        }
    }

    /// For machines: a stable name (`disk_full`, …).
    pub fn name(self) -> &'static str {
        match self {
            Fault::DiskFull => "disk_full",
            Fault::ReadOnly => "read_only",
            Fault::Io => "io_error",
            Fault::Busy => "busy",
            Fault::Unreachable => "unreachable",
            Fault::Timeout => "timeout",
            Fault::Resources => "resources",
            Fault::Overloaded => "overloaded",
        }
    }

    /// The fault behind a database error, if it is one (and not a bug or a rule).
    pub(crate) fn of(err: &DbErr) -> Option<Fault> {
        use sea_orm::sqlx::Error as Sqlx;
        let runtime = match err {
            DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::Timeout) => {
                return Some(Fault::Overloaded);
            }
            DbErr::ConnectionAcquire(_) => return Some(Fault::Unreachable),
            DbErr::Conn(runtime) | DbErr::Exec(runtime) | DbErr::Query(runtime) => runtime,
            _ => return None,
        };
        let RuntimeErr::SqlxError(sqlx) = runtime else {
            return None;
        };
        match &**sqlx {
            Sqlx::PoolTimedOut => Some(Fault::Overloaded),
            Sqlx::Io(_)
            | Sqlx::PoolClosed
            | Sqlx::WorkerCrashed
            | Sqlx::Protocol(_)
            | Sqlx::Tls(_) => Some(Fault::Unreachable),
            Sqlx::Database(database) => {
                let code = database.code()?;
                match database.try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>() {
                    Some(_) => sqlite_fault(code.parse().ok()?),
                    None => postgres_fault(&code),
                }
            }
            _ => None,
        }
    }
}

/// SQLite's primary result codes that are faults of the environment. Not `SQLITE_LOCKED`
/// (a conflict within one connection: a bug), nor corruption (`SQLITE_CORRUPT`,
/// `SQLITE_NOTADB`), which retrying cannot cure.
fn sqlite_fault(code: i32) -> Option<Fault> {
    use libsqlite3_sys as sqlite;
    match code & 0xff {
        sqlite::SQLITE_FULL => Some(Fault::DiskFull),
        sqlite::SQLITE_READONLY => Some(Fault::ReadOnly),
        sqlite::SQLITE_IOERR | sqlite::SQLITE_CANTOPEN => Some(Fault::Io),
        sqlite::SQLITE_BUSY => Some(Fault::Busy),
        sqlite::SQLITE_NOMEM => Some(Fault::Resources),
        _ => None,
    }
}

/// PostgreSQL SQLSTATEs that are faults of the environment.
fn postgres_fault(state: &str) -> Option<Fault> {
    match state {
        "53100" => Some(Fault::DiskFull),
        "25006" => Some(Fault::ReadOnly),
        "57014" => Some(Fault::Timeout),
        "58030" => Some(Fault::Io),
        "55P03" => Some(Fault::Busy),
        _ if state.starts_with("08") || state.starts_with("57P") => Some(Fault::Unreachable),
        _ if state.starts_with("53") => Some(Fault::Resources),
        _ => None,
    }
}

/// Whether writes work, as the last ones found; shared by clones of a store.
#[derive(Debug, Default)]
pub(crate) struct WriteHealth {
    /// Fast path: nothing to do while writes work.
    degraded: AtomicBool,
    episode: Mutex<Option<Episode>>,
}

#[derive(Debug, Clone)]
struct Episode {
    fault: Fault,
    since: chrono::DateTime<chrono::Utc>,
}

impl WriteHealth {
    /// A write failed for `fault`: the first failure of an episode is logged with its cause.
    /// A starved pool is not the database's fault and starts none.
    pub(crate) fn failed(&self, fault: Fault, cause: &DbErr, now: chrono::DateTime<chrono::Utc>) {
        if fault == Fault::Overloaded {
            return;
        }
        let mut episode = self.episode.lock().unwrap_or_else(|p| p.into_inner());
        match episode.as_mut() {
            Some(current) => current.fault = fault,
            None => {
                tracing::error!(fault = fault.name(), cause = %cause, "writes are failing: {}; answering UNAVAILABLE until they work again", fault.reason());
                *episode = Some(Episode { fault, since: now });
                self.degraded.store(true, Ordering::Release);
            }
        }
    }

    /// A write committed: an episode, if one was running, is over.
    pub(crate) fn succeeded(&self, now: chrono::DateTime<chrono::Utc>) {
        if !self.degraded.load(Ordering::Acquire) {
            return;
        }
        let mut episode = self.episode.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ended) = episode.take() {
            let seconds = (now - ended.since).num_milliseconds() as f64 / 1000.0;
            tracing::warn!(
                fault = ended.fault.name(),
                seconds,
                "writes work again after {}",
                ended.fault.reason()
            );
        }
        self.degraded.store(false, Ordering::Release);
    }

    /// The running episode: its fault and since when.
    pub(crate) fn current(&self) -> Option<(Fault, chrono::DateTime<chrono::Utc>)> {
        if !self.degraded.load(Ordering::Acquire) {
            return None;
        }
        let episode = self.episode.lock().unwrap_or_else(|p| p.into_inner());
        episode.as_ref().map(|e| (e.fault, e.since))
    }
}

/// Whether a SQLite connection that comes back to the pool counted inside a transaction by
/// the driver may be used again: outside one by the driver's count and by SQLite's own flag
/// once the queued rollback ran. (One the driver counts outside any transaction is reused at
/// once, unless a `WriteTxn` may have left its raw `BEGIN` open: SQLite can only be inside a
/// transaction the driver does not count after a raw `BEGIN`, which only `WriteTxn` sends —
/// other raw statements exist only in test builds.)
pub(crate) async fn sqlite_reusable(
    conn: &mut sea_orm::sqlx::SqliteConnection,
    health: &WriteHealth,
) -> Result<bool, sea_orm::sqlx::Error> {
    use sea_orm::sqlx::Connection as _;
    // A transaction was dropped: its rollback is queued to the connection's worker. Reaching
    // the handle goes through the same queue, so after it both answers are current.
    let autocommit = sqlite_autocommit(conn).await?;
    let counted_open = conn.is_in_transaction();
    if autocommit && !counted_open {
        return Ok(true);
    }
    replaced(health, !autocommit, counted_open);
    Ok(false)
}

/// Whether SQLite is outside any transaction on this connection (its autocommit flag), once
/// every command sent before has run.
pub(crate) async fn sqlite_autocommit(
    conn: &mut sea_orm::sqlx::SqliteConnection,
) -> Result<bool, sea_orm::sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    // SAFETY: the handle is a live connection, locked for this call; the function only
    // reads the connection's autocommit flag.
    let autocommit =
        unsafe { libsqlite3_sys::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) } != 0;
    Ok(autocommit)
}

/// Turns on SQLite's query planner stability guarantee for this connection: plans never
/// depend on the values bound to a statement. Without it SQLite 3.51 reads a bound `LIMIT ?`
/// (and a bound value compared with a partial index's condition) while planning and marks the
/// statement to be prepared again whenever that value is bound, which the driver does on
/// every execution: the claim, with its `LIMIT`, was compiled anew each time (~15 % of the
/// database thread's time on a chain of steps).
pub(crate) async fn sqlite_stable_plans(
    conn: &mut sea_orm::sqlx::SqliteConnection,
) -> Result<(), sea_orm::sqlx::Error> {
    if planner_stability(conn, 1).await? {
        return Ok(());
    }
    Err(sea_orm::sqlx::Error::Configuration(
        "SQLite refused the query planner stability guarantee".into(),
    ))
}

/// Sets SQLite's query planner stability guarantee (1 on, 0 off, -1 leaves it) and answers
/// whether it is on afterwards.
pub(crate) async fn planner_stability(
    conn: &mut sea_orm::sqlx::SqliteConnection,
    setting: std::ffi::c_int,
) -> Result<bool, sea_orm::sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let mut enabled: std::ffi::c_int = 0;
    // SAFETY: the handle is a live connection, locked for this call; this option takes an int
    // and a pointer to an int that receives the setting after the call.
    let status = unsafe {
        libsqlite3_sys::sqlite3_db_config(
            handle.as_raw_handle().as_ptr(),
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            setting,
            &mut enabled as *mut std::ffi::c_int,
        )
    };
    Ok(status == libsqlite3_sys::SQLITE_OK && enabled == 1)
}

/// Whether a PostgreSQL connection coming back to the pool may be used again: outside any
/// transaction by the driver's count (a broken session fails the pool's ping after this).
pub(crate) fn postgres_reusable(conn: &sea_orm::sqlx::PgConnection, health: &WriteHealth) -> bool {
    use sea_orm::sqlx::Connection as _;
    if conn.is_in_transaction() {
        replaced(health, true, true);
        return false;
    }
    true
}

/// Says that a connection is closed and replaced: at error level the first time, at debug
/// while a fault episode (whose start was logged) goes on.
fn replaced(health: &WriteHealth, database_in_transaction: bool, driver_in_transaction: bool) {
    if health.current().is_some() {
        tracing::debug!(
            database_in_transaction,
            driver_in_transaction,
            "a database connection came back inside a transaction; closed and replaced"
        );
    } else {
        tracing::error!(
            database_in_transaction,
            driver_in_transaction,
            "a database connection came back inside a transaction (after a failure the database handled on its own); it is closed and replaced"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_and_postgres_codes_map_to_faults() {
        assert_eq!(sqlite_fault(13), Some(Fault::DiskFull));
        assert_eq!(sqlite_fault(778), Some(Fault::Io), "SQLITE_IOERR_WRITE");
        assert_eq!(sqlite_fault(517), Some(Fault::Busy), "SQLITE_BUSY_SNAPSHOT");
        assert_eq!(
            sqlite_fault(2067),
            None,
            "a unique constraint is a rule, not a fault"
        );
        assert_eq!(postgres_fault("57P01"), Some(Fault::Unreachable));
        assert_eq!(postgres_fault("08006"), Some(Fault::Unreachable));
        assert_eq!(postgres_fault("57014"), Some(Fault::Timeout));
        assert_eq!(postgres_fault("53100"), Some(Fault::DiskFull));
        assert_eq!(postgres_fault("23505"), None);
    }
}
