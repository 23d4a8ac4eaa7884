//! The retention policy: finished tasks (with their steps, transitions and events) that ended
//! longer ago than the policy keeps are deleted by a background sweep, a small batch per
//! transaction, so storage stops growing with history and claims are never held up for long.

use crate::Engine;
use std::sync::Arc;
use std::time::Duration;
use tasker_store::Pruned;
use tokio::sync::watch;

/// How long finished tasks are kept, and how the sweep deletes them.
#[derive(Debug, Clone)]
pub struct RetentionPolicy {
    /// Finished tasks that ended longer ago than this are deleted; `None` keeps everything.
    pub keep: Option<Duration>,
    /// Tasks per delete transaction: small, so claims and completions interleave.
    pub batch: u32,
    /// How often the sweep looks for what has aged out.
    pub every: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            keep: Some(Duration::from_secs(30 * 24 * 3600)),
            batch: 200,
            every: Duration::from_secs(60),
        }
    }
}

impl Engine {
    /// Deletes every finished task that ended longer than `keep` ago (by the store's clock),
    /// `batch` at a time, yielding between batches; returns what it deleted in all.
    pub async fn prune_finished(&self, keep: Duration, batch: u32) -> crate::Result<Pruned> {
        let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
        let cutoff = self
            .store
            .clock()
            .now()
            .checked_sub_signed(keep)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        let mut total = Pruned::default();
        loop {
            let pruned = self.store.prune_finished(cutoff, batch.max(1)).await?;
            total.tasks += pruned.tasks;
            total.events += pruned.events;
            if pruned == Pruned::default() {
                return Ok(total);
            }
            // Whatever waits for the database goes first.
            tokio::task::yield_now().await;
        }
    }

    /// A receiver that changes after each retention sweep (whatever it deleted).
    pub fn retention_sweeps(&self) -> watch::Receiver<u64> {
        self.swept.subscribe()
    }

    /// The retention sweep, every `policy.every` until `shutdown` changes; nothing when the
    /// policy keeps everything.
    pub async fn run_retention(
        self: Arc<Self>,
        policy: RetentionPolicy,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Some(keep) = policy.keep else {
            return;
        };
        loop {
            match self.prune_finished(keep, policy.batch).await {
                Ok(pruned) if pruned.tasks > 0 || pruned.events > 0 => tracing::info!(
                    tasks = pruned.tasks,
                    events = pruned.events,
                    "retention: deleted finished tasks and events older than the policy keeps"
                ),
                Ok(_) => {}
                Err(err) => {
                    crate::retried("the retention sweep failed", &err);
                }
            }
            self.swept
                .send_modify(|sweeps| *sweeps = sweeps.wrapping_add(1));
            tokio::select! {
                () = tokio::time::sleep(policy.every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
