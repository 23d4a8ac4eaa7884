//! Reading the event log in order, from a cursor, and knowing when it grew.
//!
//! Order and completeness: on SQLite (one writer) positions are commit order. On PostgreSQL a
//! position is drawn when a row is inserted, so a transaction that commits later can hold a
//! smaller one. There, a sequencer numbers committed events again (`sequence`), under an
//! advisory lock, in the order it finds them committed; a transaction still open is invisible
//! to it, so its events are numbered after it commits, never behind a reader's cursor. Writers
//! run the sequencer right after they commit; every replica runs it again when told of new
//! events, so a writer that crashed in between loses nothing.

use crate::entities::event;
use crate::records::EventRecord;
use crate::sql::Sql;
use crate::write::WriteTxn;
use crate::{Result, Store};
use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult};
use tasker_domain::Within;
use uuid::Uuid;

/// A place in the event log: everything up to and including it has been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventCursor(pub i64);

/// Which events to read: those within these namespaces (the ones asked for, inside the
/// caller's scope), of this task if given, with these names if any.
#[derive(Debug, Clone, PartialEq)]
pub struct EventFilter {
    pub task_id: Option<Uuid>,
    pub names: Vec<String>,
    pub within: Within,
}

impl EventFilter {
    /// Every event within these namespaces; narrow further with the other fields.
    pub fn within(within: Within) -> EventFilter {
        EventFilter {
            task_id: None,
            names: Vec::new(),
            within,
        }
    }

    /// Whether an event passes: the test the log query makes in SQL, for events already read.
    pub fn matches(&self, event: &EventRecord) -> bool {
        self.task_id.is_none_or(|id| event.task_id == Some(id))
            && (self.names.is_empty() || self.names.contains(&event.name))
            && match &event.namespace {
                Some(namespace) => self.within.allows(namespace),
                None => self.within == Within::Any,
            }
    }
}

#[derive(Debug, FromQueryResult)]
struct Found {
    found: i64,
}

#[derive(Debug, FromQueryResult)]
struct Head {
    head: Option<i64>,
}

/// The column event cursors are: `sequence` on PostgreSQL (numbered in commit order),
/// `position` on SQLite (one writer: positions are commit order).
pub(crate) fn cursor_column(backend: DbBackend) -> &'static str {
    if backend == DbBackend::Postgres {
        "sequence"
    } else {
        "position"
    }
}

/// The advisory lock that serializes sequencing across replicas ("tasker" in ASCII).
const SEQUENCER_LOCK: i64 = 0x7461_736b_6572;

/// Numbers every event without a number that the transaction sees, in position order, after
/// every number given before; run under [`SEQUENCER_LOCK`]. The unnumbered events are found
/// with a plain scan of their partial index, not a bitmap scan: each number given leaves a dead
/// entry there until a vacuum, and only a plain scan marks those it passes so the next one
/// skips them (measured: 29 ms to find 8 rows behind 160,000 dead entries by bitmap, then
/// under 1.2 ms by plain scans). `SET LOCAL` ends with the transaction.
const NUMBER_EVENTS: &str = "SET LOCAL enable_bitmapscan = off; UPDATE events AS e SET sequence = numbered.base + numbered.n \
     FROM (SELECT p.position, ROW_NUMBER() OVER (ORDER BY p.position) AS n, \
                  (SELECT GREATEST(COALESCE(MAX(sequence), 0), (SELECT pruned_through FROM event_retention WHERE id = 1)) FROM events) AS base \
           FROM events p WHERE p.sequence IS NULL) AS numbered \
     WHERE e.position = numbered.position";

/// The number the next event follows: the highest given, or the highest the retention
/// policy deleted when it deleted them all (numbers never start over).
pub(crate) const SEQUENCE_BASE: &str = "SELECT GREATEST(COALESCE(MAX(sequence), 0), (SELECT pruned_through FROM event_retention WHERE id = 1)) AS base FROM events";

impl EventRecord {
    /// Its place in the log (PostgreSQL: the commit-ordered number; SQLite: the position).
    pub fn cursor(&self) -> EventCursor {
        EventCursor(self.sequence.unwrap_or(self.position))
    }
}

impl Store {
    /// Up to `limit` events after `after` (from the start of what is retained when `None`), in
    /// log order; `Error::CursorExpired` when `after` is older than what the log retains.
    pub async fn events_page(
        &self,
        filter: &EventFilter,
        after: Option<EventCursor>,
        limit: u64,
    ) -> Result<Vec<EventRecord>> {
        let backend = self.db.get_database_backend();
        let order = cursor_column(backend);
        let mut sql = Sql::new(backend);
        sql.push("SELECT * FROM events WHERE ")
            .push(order)
            .push(" > ")
            .bind(after.map_or(0, |cursor| cursor.0));
        if let Some(cursor) = after {
            // A cursor older than the retained log reads nothing (and is told why below).
            sql.push(" AND EXISTS (SELECT 1 FROM event_retention WHERE pruned_through <= ")
                .bind(cursor.0)
                .push(")");
        }
        if let Within::Only(within) = &filter.within {
            sql.push(" AND namespace IN ")
                .bind_list(within.iter().cloned());
        }
        if let Some(task_id) = filter.task_id {
            sql.push(" AND task_id = ").bind(task_id);
        }
        if !filter.names.is_empty() {
            sql.push(" AND name IN ")
                .bind_list(filter.names.iter().cloned());
        }
        sql.push(" ORDER BY ")
            .push(order)
            .push(" LIMIT ")
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let models = event::Model::find_by_statement(sql.build())
            .all(&self.db)
            .await?;
        if let (true, Some(cursor)) = (models.is_empty(), after) {
            // Nothing after the cursor: it may be older than what the log retains.
            self.check_cursor(cursor).await?;
        }
        Ok(models.into_iter().map(EventRecord::from).collect())
    }

    /// Whether the log holds events of a task after `cursor`, counting on PostgreSQL the
    /// committed ones not numbered yet (they will be numbered after every cursor given out).
    /// A read: it numbers nothing.
    pub async fn task_has_events_after(&self, task_id: Uuid, cursor: EventCursor) -> Result<bool> {
        let mut sql = Sql::new(self.db.get_database_backend());
        let later = if sql.is_postgres() {
            " AND (sequence IS NULL OR sequence > "
        } else {
            " AND (position > "
        };
        sql.push("SELECT COUNT(*) AS found FROM (SELECT 1 FROM events WHERE task_id = ")
            .bind(task_id)
            .push(later)
            .bind(cursor.0)
            .push(") LIMIT 1) AS later");
        let found = Found::find_by_statement(sql.build()).one(&self.db).await?;
        Ok(found.is_some_and(|found| found.found > 0))
    }

    /// The cursor of the newest readable event: "start from now".
    pub async fn event_head(&self) -> Result<Option<EventCursor>> {
        let backend = self.db.get_database_backend();
        let mut sql = Sql::new(backend);
        sql.push("SELECT MAX(")
            .push(cursor_column(backend))
            .push(") AS head FROM events");
        let head = Head::find_by_statement(sql.build()).one(&self.db).await?;
        Ok(head.and_then(|head| head.head).map(EventCursor))
    }

    /// PostgreSQL: numbers the committed events that have no number yet, in position order,
    /// after every number given before, and NOTIFYs the replicas. Returns how many it numbered
    /// (always 0 on SQLite).
    pub async fn sequence_events(&self) -> Result<u64> {
        self.writing(self.number_events()).await
    }

    /// [`Store::sequence_events`] without recording a failure as a fault episode, for a caller
    /// that just committed (its own commit is the news; a failure here is retried by the
    /// sweep).
    pub(crate) async fn number_events(&self) -> Result<u64> {
        if self.db.get_database_backend() != DbBackend::Postgres {
            return Ok(0);
        }
        let txn = self.begin_write().await?;
        let mut lock = Sql::new(DbBackend::Postgres);
        lock.push("SELECT pg_advisory_xact_lock(")
            .bind(SEQUENCER_LOCK)
            .push(")");
        txn.execute_raw(lock.build()).await?;
        let numbered = txn.execute_unprepared(NUMBER_EVENTS).await?.rows_affected();
        if numbered > 0 {
            // Delivered when the numbers commit: other replicas' readers look again.
            let mut notify = Sql::new(DbBackend::Postgres);
            notify
                .push("SELECT pg_notify(")
                .bind(self.events_channel())
                .push(", ")
                .bind(self.origin.to_string())
                .push(")");
            txn.execute_raw(notify.build()).await?;
            self.commit(txn).await?;
        } else {
            // Nothing written: no news about whether writes work.
            txn.commit().await?;
        }
        Ok(numbered)
    }

    /// Changes whenever events were appended (in this process, or, once the engine relays
    /// NOTIFY, on another replica).
    pub fn events_appended(&self) -> tokio::sync::watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Marks that events were appended (called by the engine for other replicas' commits).
    pub fn note_events_appended(&self) {
        self.appended
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// The NOTIFY channel for appended events; one per schema (`tasker_work_…` becomes
    /// `tasker_events_…`, within PostgreSQL's 63-byte limit).
    pub fn events_channel(&self) -> String {
        self.work_channel
            .replacen("tasker_work", "tasker_events", 1)
    }

    /// Takes the sequencer lock for the rest of `txn` (PostgreSQL), so that its events can be
    /// numbered as they are written, and NOTIFYs the other replicas (delivered at commit).
    /// One command.
    pub(crate) async fn lock_sequencer(&self, txn: &WriteTxn) -> Result<()> {
        if txn.sequencer_locked() {
            return Ok(());
        }
        let mut sql = Sql::new(DbBackend::Postgres);
        sql.push("SELECT pg_advisory_xact_lock(")
            .bind(SEQUENCER_LOCK)
            .push("), pg_notify(")
            .bind(self.events_channel())
            .push(", ")
            .bind(self.origin.to_string())
            .push(")");
        txn.execute_raw(sql.build()).await?;
        txn.note_sequencer_locked();
        Ok(())
    }

    /// Commits a transaction that appended events and tells readers. On PostgreSQL the
    /// events are numbered inside it under the sequencer lock (which also NOTIFYs the other
    /// replicas at commit) — as they are written by [`Store::insert_rows`], last for the
    /// others —, and the lock is held to the commit, so numbers follow commit order and no
    /// reader can pass over a late commit. Then the in-process signal.
    pub(crate) async fn commit_events(&self, txn: WriteTxn) -> Result<()> {
        // Events inserted otherwise (a published custom event, a registration) are numbered
        // here; no transaction inserts events both ways.
        if self.db.get_database_backend() == DbBackend::Postgres && !txn.sequencer_locked() {
            // One command: the lock, the numbers, the NOTIFY (delivered at commit). The lock
            // key is a constant, the channel and the origin are made of hex digits: no input
            // in them.
            let sql = format!(
                "SELECT pg_advisory_xact_lock({SEQUENCER_LOCK}); {NUMBER_EVENTS}; SELECT pg_notify('{}', '{}')",
                self.events_channel(),
                self.origin
            );
            txn.execute_unprepared(&sql).await?;
        }
        self.commit(txn).await?;
        self.note_events_appended();
        Ok(())
    }
}
