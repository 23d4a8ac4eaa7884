//! The embedded worker pool: claims steps of built-in handlers in batches, runs them, and
//! records their outcomes in batches (one transaction for many completions).

use crate::Engine;
use crate::handlers::{BUILT_IN_HANDLERS, Outcome, run_immediate};
use std::sync::Arc;
use std::time::Duration;
use tasker_store::{AWAITING_DECISION, AttemptFailure, ClaimRequest, Completion};
use tokio::sync::watch;

/// How the embedded pool works.
#[derive(Debug, Clone)]
pub struct WorkerPoolConfig {
    /// Steps in flight at once.
    pub concurrency: usize,
    /// How the pool names itself in leases.
    pub worker_id: String,
    pub lease: Duration,
}

impl Default for WorkerPoolConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            worker_id: format!("tasker-embedded-{}", std::process::id()),
            lease: Duration::from_secs(60),
        }
    }
}

impl Engine {
    /// Runs the embedded worker pool until `shutdown` changes.
    pub async fn run_workers(
        self: Arc<Self>,
        config: WorkerPoolConfig,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut signal = self.work.subscribe();
        let request = ClaimRequest {
            worker_id: config.worker_id.clone(),
            handlers: BUILT_IN_HANDLERS.iter().map(|h| (*h).to_owned()).collect(),
            namespaces: Vec::new(),
            limit: u32::try_from(config.concurrency.max(1)).unwrap_or(u32::MAX),
            lease: config.lease,
        };
        loop {
            if *shutdown.borrow() {
                return;
            }
            signal.borrow_and_update();
            let claimed = match self.store.claim_steps(&request).await {
                Ok(claimed) => claimed,
                Err(err) => {
                    tracing::warn!(error = %err, "the worker pool could not claim steps");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            let full = claimed.len() == request.limit as usize;
            let mut completions = Vec::new();
            let mut failures = Vec::new();
            let mut parked = 0;
            for step in &claimed {
                match run_immediate(step) {
                    Outcome::Complete(results) => completions.push(Completion {
                        lease_token: step.lease_token,
                        results,
                    }),
                    Outcome::Fail {
                        message,
                        retryable,
                        retry_after_seconds,
                    } => failures.push(AttemptFailure {
                        lease_token: step.lease_token,
                        message,
                        retryable,
                        retry_after_seconds,
                    }),
                    Outcome::Park { wake_at_ms } => {
                        let holder = match wake_at_ms {
                            Some(_) => "timer",
                            None => AWAITING_DECISION,
                        };
                        match self
                            .store
                            .park_step(step.lease_token, wake_at_ms, holder)
                            .await
                        {
                            Ok(()) => parked += 1,
                            Err(err) => tracing::warn!(error = %err, "parking a step failed"),
                        }
                    }
                }
            }
            if let Err(err) = self.complete(&completions).await {
                tracing::warn!(error = %err, "recording completed steps failed; their leases will expire and they will run again");
            }
            if parked > 0 {
                // A wake time may be earlier than the one the timer sleeps toward.
                self.timers.notify_one();
            }
            for failure in &failures {
                if let Err(err) = self.fail(failure).await {
                    tracing::warn!(error = %err, "recording a failed attempt failed");
                }
            }
            if full || !claimed.is_empty() {
                // More may be ready (a full batch, or children of what just completed).
                continue;
            }
            tokio::select! {
                _ = signal.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
