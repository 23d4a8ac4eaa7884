//! Wake-ups across server replicas on PostgreSQL: a change that makes work claimable is
//! announced with NOTIFY, and every replica LISTENs so its waiting claimers look again. The
//! event log stays the truth; a lost notification only delays work until the safety sweep.

use crate::{Result, Store};
use sea_orm::{ConnectionTrait, DbBackend};

/// A dedicated connection listening for work announcements.
pub struct WorkListener {
    listener: sea_orm::sqlx::postgres::PgListener,
}

impl WorkListener {
    /// Resolves when claimers should look again: on an announcement, and after the connection
    /// was lost and restored (announcements may have been missed meanwhile).
    pub async fn next(&mut self) -> Result<()> {
        self.listener.try_recv().await.map_err(connection_error)?;
        Ok(())
    }
}

impl Store {
    /// Tells every replica that work may be claimable (a no-op on SQLite, which has one
    /// server).
    pub async fn announce_work(&self) -> Result<()> {
        if self.db.get_database_backend() == DbBackend::Postgres {
            let mut sql = crate::sql::Sql::new(DbBackend::Postgres);
            sql.push("SELECT pg_notify(")
                .bind(self.work_channel.clone())
                .push(", '')");
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
        listener
            .listen_all([self.work_channel.as_str(), self.events_channel().as_str()])
            .await
            .map_err(connection_error)?;
        Ok(Some(WorkListener { listener }))
    }
}

fn connection_error(err: sea_orm::sqlx::Error) -> crate::Error {
    crate::Error::from(sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(
        std::sync::Arc::new(err),
    )))
}
