//! Wake-ups across server replicas on PostgreSQL: a change that makes work claimable is
//! announced with NOTIFY, and every replica LISTENs so its waiting claimers look again. The
//! event log stays the truth; a lost notification only delays work until the safety sweep.
//!
//! Each payload names the store that sent it (its origin), so a replica ignores its own —
//! it woke its claimers and readers already — and a work announcement says whether the
//! embedded pool's handlers have any of it, so work for external workers alone does not make
//! pools claim in vain.

use crate::{Result, Store};
use sea_orm::{ConnectionTrait, DbBackend};
use std::sync::Arc;

/// A dedicated connection listening for work announcements and appended events.
pub struct WorkListener {
    listener: sea_orm::sqlx::postgres::PgListener,
    origin: Arc<str>,
    events_channel: String,
}

/// What a [`WorkListener`] heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Another replica announced work; `built_in`: some of it for the embedded pool's
    /// handlers.
    Work { built_in: bool },
    /// Another replica appended events.
    Events,
    /// This store's own announcement: it acted on it when it sent it.
    Own,
    /// The connection was lost and restored: anything may have been missed meanwhile.
    Missed,
}

impl WorkListener {
    /// Waits for the next notification.
    pub async fn next(&mut self) -> Result<Heard> {
        let Some(notification) = self.listener.try_recv().await.map_err(connection_error)? else {
            return Ok(Heard::Missed);
        };
        let events = notification.channel() == self.events_channel;
        Ok(heard(notification.payload(), &self.origin, events))
    }
}

/// What a payload means: `origin` for appended events, `origin:1` (some for the pool's
/// handlers) or `origin:0` for work. Anything else (an older replica's empty payload) is
/// another replica's news of any kind.
fn heard(payload: &str, origin: &str, events: bool) -> Heard {
    let (from, built_in) = match payload.split_once(':') {
        Some((from, kind)) => (from, kind != "0"),
        None => (payload, true),
    };
    if from == origin {
        Heard::Own
    } else if events {
        Heard::Events
    } else {
        Heard::Work { built_in }
    }
}

impl Store {
    /// Tells every other replica that work may be claimable, and whether some of it is for
    /// the embedded pool's handlers (a no-op on SQLite, which has one server).
    pub async fn announce_work(&self, built_in: bool) -> Result<()> {
        if self.db.get_database_backend() == DbBackend::Postgres {
            let mut sql = crate::sql::Sql::new(DbBackend::Postgres);
            sql.push("SELECT pg_notify(")
                .bind(self.work_channel.clone())
                .push(", ")
                .bind(format!("{}:{}", self.origin, u8::from(built_in)))
                .push(")");
            self.db.execute_raw(sql.build()).await?;
        }
        Ok(())
    }

    /// Listens for work announcements and appended events from every replica; `None` on
    /// SQLite.
    pub async fn listen_for_work(&self) -> Result<Option<WorkListener>> {
        if self.db.get_database_backend() != DbBackend::Postgres {
            return Ok(None);
        }
        let pool = self.db.get_postgres_connection_pool();
        let mut listener = sea_orm::sqlx::postgres::PgListener::connect_with(pool)
            .await
            .map_err(connection_error)?;
        let events_channel = self.events_channel();
        listener
            .listen_all([self.work_channel.as_str(), events_channel.as_str()])
            .await
            .map_err(connection_error)?;
        Ok(Some(WorkListener {
            listener,
            origin: self.origin.clone(),
            events_channel,
        }))
    }
}

fn connection_error(err: sea_orm::sqlx::Error) -> crate::Error {
    crate::Error::from(sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(
        std::sync::Arc::new(err),
    )))
}

#[cfg(test)]
mod tests {
    use super::{Heard, heard};

    #[test]
    fn a_replica_ignores_its_own_news_and_tells_work_from_events() {
        assert_eq!(heard("a1:1", "a1", false), Heard::Own);
        assert_eq!(heard("a1", "a1", true), Heard::Own);
        assert_eq!(heard("b2:0", "a1", false), Heard::Work { built_in: false });
        assert_eq!(heard("b2:1", "a1", false), Heard::Work { built_in: true });
        assert_eq!(heard("b2", "a1", true), Heard::Events);
        assert_eq!(
            heard("", "a1", false),
            Heard::Work { built_in: true },
            "an empty payload (an older replica) may be any work"
        );
        assert_eq!(heard("", "a1", true), Heard::Events);
    }
}
