//! The Rust worker SDK: run the steps of external handlers.
//!
//! A [`Worker`] claims ready steps of the handlers it registered (long-polling, never more
//! than its concurrency), runs each handler in its own task, keeps long attempts alive with
//! heartbeats (an attempt whose lease was lost is stopped: its outcome would be refused),
//! reports each outcome (`completeStep`, or `failStep` retryable or not, with Retry-After),
//! and on stop finishes what it holds within a grace period and releases the rest, so no step
//! waits for a lease to expire.

use crate::operations::Claim;
use crate::types::Lease;
use crate::{Client, Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::{AbortHandle, Id, JoinSet};
use tokio::time::Instant;

/// What a handler's future resolves to.
pub type HandlerResult = std::result::Result<Value, StepError>;

/// Runs one attempt of a step. Any `Fn(Lease) -> impl Future<Output = HandlerResult>` is one.
pub trait Handler: Send + Sync + 'static {
    fn run(&self, lease: Lease) -> Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Lease) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn run(&self, lease: Lease) -> Pin<Box<dyn Future<Output = HandlerResult> + Send>> {
        Box::pin(self(lease))
    }
}

/// Why an attempt failed, and whether another one may help.
#[derive(Debug, Clone, PartialEq)]
pub enum StepError {
    /// Retried after the step's backoff, or after `retry_after` when given, while attempts
    /// remain.
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Fails the step for good (skipped instead when its template says it is skippable).
    Permanent { message: String },
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> StepError {
        StepError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// Retryable, not before `wait` (what an HTTP `Retry-After` asks for).
    pub fn retry_after(message: impl Into<String>, wait: Duration) -> StepError {
        StepError::Retryable {
            message: message.into(),
            retry_after: Some(wait),
        }
    }

    pub fn permanent(message: impl Into<String>) -> StepError {
        StepError::Permanent {
            message: message.into(),
        }
    }
}

/// What a worker did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopReport {
    /// Attempts recorded as complete.
    pub completed: u64,
    /// Attempts recorded as failed.
    pub failed: u64,
    /// Attempts given back unfinished at the stop.
    pub released: u64,
    /// Attempts whose lease was lost (expired, or the task was cancelled): nothing recorded.
    pub lost: u64,
}

/// Sets up a [`Worker`].
pub struct WorkerBuilder {
    client: Client,
    worker_id: String,
    handlers: HashMap<String, Arc<dyn Handler>>,
    namespaces: Vec<String>,
    concurrency: usize,
    lease: Duration,
    poll_wait: Duration,
    grace: Duration,
}

impl WorkerBuilder {
    /// Runs steps whose handler is `name` with `handler`.
    pub fn handler(mut self, name: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    /// Only steps of tasks in these namespaces (all the token may see by default).
    pub fn namespaces(mut self, namespaces: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.namespaces = namespaces.into_iter().map(Into::into).collect();
        self
    }

    /// Attempts run at once (default 4).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The lease each claim asks for (default 30 s); heartbeats renew it every third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a claim waits on the server for work (default 20 s, at most 60 s).
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.poll_wait = wait;
        self
    }

    /// How long a stop lets running attempts finish before releasing them (default 10 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn build(self) -> Result<Worker> {
        let invalid = |reason: &str| Error::Protocol(format!("worker setup: {reason}"));
        if self.handlers.is_empty() {
            return Err(invalid("register at least one handler"));
        }
        if !(1..=100).contains(&self.concurrency) {
            return Err(invalid("concurrency must be 1 to 100"));
        }
        if !(1..=3600).contains(&self.lease.as_secs()) {
            return Err(invalid("the lease must be 1 to 3600 seconds"));
        }
        if self.poll_wait > Duration::from_secs(60) {
            return Err(invalid("the poll wait must be at most 60 seconds"));
        }
        let mut handler_names: Vec<String> = self.handlers.keys().cloned().collect();
        handler_names.sort();
        Ok(Worker {
            client: self.client,
            worker_id: self.worker_id,
            handler_names,
            handlers: self.handlers,
            namespaces: self.namespaces,
            concurrency: self.concurrency,
            lease: self.lease,
            poll_wait: self.poll_wait,
            grace: self.grace,
        })
    }
}

/// Runs the steps of its handlers until told to stop.
pub struct Worker {
    client: Client,
    worker_id: String,
    handler_names: Vec<String>,
    handlers: HashMap<String, Arc<dyn Handler>>,
    namespaces: Vec<String>,
    concurrency: usize,
    lease: Duration,
    poll_wait: Duration,
    grace: Duration,
}

/// An attempt being run.
struct Running {
    lease: Lease,
    abort: AbortHandle,
}

/// What reporting an attempt's outcome came to.
enum Reported {
    Completed,
    Failed,
    Lost,
}

type ClaimFuture = Pin<Box<dyn Future<Output = Result<Vec<Lease>>> + Send>>;

impl Worker {
    /// A worker named `worker_id` (shown as the lease holder) talking through `client`.
    pub fn builder(client: Client, worker_id: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            client,
            worker_id: worker_id.into(),
            handlers: HashMap::new(),
            namespaces: Vec::new(),
            concurrency: 4,
            lease: Duration::from_secs(30),
            poll_wait: Duration::from_secs(20),
            grace: Duration::from_secs(10),
        }
    }

    /// Claims and runs steps until `stop` resolves, then finishes or releases what it holds.
    /// Ends early with the error when the server refuses the worker (its token, its
    /// permission); a server that is away is waited for.
    pub async fn run(self, stop: impl Future<Output = ()>) -> Result<StopReport> {
        let mut stop = std::pin::pin!(stop);
        let mut report = StopReport::default();
        let mut running: HashMap<Id, Running> = HashMap::new();
        let mut attempts: JoinSet<HandlerResult> = JoinSet::new();
        let mut reports: JoinSet<Reported> = JoinSet::new();
        let mut beats: JoinSet<Result<Vec<crate::LeaseStatus>>> = JoinSet::new();
        let mut claim: Option<ClaimFuture> = None;
        let mut claim_after: Option<Instant> = None;
        let mut claim_backoff = Duration::from_millis(500);
        let beat_every = (self.lease / 3).max(Duration::from_secs(1));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + beat_every, beat_every);
        let mut drain_until: Option<Instant> = None;
        loop {
            let free = self.concurrency.saturating_sub(running.len());
            let may_claim = claim_after.is_none_or(|at| Instant::now() >= at);
            if drain_until.is_none() && claim.is_none() && free > 0 && may_claim {
                claim = Some(self.claim(free));
            }
            if drain_until.is_some() && running.is_empty() {
                break;
            }
            let claim_waits = claim_after.filter(|_| claim.is_none());
            tokio::select! {
                () = &mut stop, if drain_until.is_none() => {
                    tracing::info!(running = running.len(), "stopping: no more claims");
                    claim = None;
                    drain_until = Some(Instant::now() + self.grace);
                }
                () = sleep_until_or_forever(drain_until) => {
                    let tokens: Vec<String> = running
                        .values()
                        .map(|attempt| attempt.lease.lease_token.clone())
                        .collect();
                    for attempt in running.values() {
                        attempt.abort.abort();
                    }
                    running.clear();
                    report.released += self.release(&tokens).await;
                    break;
                }
                () = sleep_until_or_forever(claim_waits) => {
                    claim_after = None;
                }
                claimed = poll_claim(&mut claim), if claim.is_some() => {
                    claim = None;
                    match claimed {
                        Ok(leases) => {
                            claim_backoff = Duration::from_millis(500);
                            for lease in leases {
                                self.start(lease, &mut attempts, &mut running);
                            }
                        }
                        Err(err) if err.is_transient() => {
                            tracing::warn!(error = %err, retry_in_ms = claim_backoff.as_millis() as u64, "claim failed; trying again");
                            claim_after = Some(Instant::now() + claim_backoff);
                            claim_backoff = (claim_backoff * 2).min(Duration::from_secs(30));
                        }
                        Err(err) => return Err(err),
                    }
                }
                Some(joined) = attempts.join_next_with_id(), if !attempts.is_empty() => {
                    let (id, outcome) = match joined {
                        Ok((id, outcome)) => (id, outcome),
                        Err(err) if err.is_panic() => {
                            (err.id(), Err(StepError::retryable("the handler panicked")))
                        }
                        // Aborted: its lease was lost, or the stop released it.
                        Err(_) => continue,
                    };
                    if let Some(attempt) = running.remove(&id) {
                        reports.spawn(report_outcome(self.client.clone(), attempt.lease, outcome));
                    }
                }
                Some(reported) = reports.join_next(), if !reports.is_empty() => {
                    match reported {
                        Ok(Reported::Completed) => report.completed += 1,
                        Ok(Reported::Failed) => report.failed += 1,
                        Ok(Reported::Lost) | Err(_) => report.lost += 1,
                    }
                }
                _ = heartbeat.tick() => {
                    if beats.is_empty() && !running.is_empty() {
                        let tokens: Vec<String> = running.values().map(|a| a.lease.lease_token.clone()).collect();
                        let client = self.client.with_timeout(beat_every);
                        let lease = self.lease;
                        beats.spawn(async move {
                            let mut statuses = Vec::with_capacity(tokens.len());
                            for chunk in tokens.chunks(100) {
                                statuses.extend(client.heartbeat_steps(chunk, lease).await?);
                            }
                            Ok(statuses)
                        });
                    }
                }
                Some(beat) = beats.join_next(), if !beats.is_empty() => {
                    match beat {
                        Ok(Ok(statuses)) => {
                            for status in statuses.into_iter().filter(|status| !status.alive) {
                                let lost = running
                                    .iter()
                                    .find(|(_, attempt)| attempt.lease.lease_token == status.lease_token)
                                    .map(|(id, _)| *id);
                                if let Some(attempt) = lost.and_then(|id| running.remove(&id)) {
                                    tracing::warn!(step = %attempt.lease.name, task = %attempt.lease.task_id, "lease lost; stopping the attempt");
                                    attempt.abort.abort();
                                    report.lost += 1;
                                }
                            }
                        }
                        Ok(Err(err)) => tracing::warn!(error = %err, "heartbeat failed; trying again at the next beat"),
                        Err(_) => {}
                    }
                }
            }
        }
        // Outcomes already decided are still recorded.
        while let Some(reported) = reports.join_next().await {
            match reported {
                Ok(Reported::Completed) => report.completed += 1,
                Ok(Reported::Failed) => report.failed += 1,
                Ok(Reported::Lost) | Err(_) => report.lost += 1,
            }
        }
        tracing::info!(
            completed = report.completed,
            failed = report.failed,
            released = report.released,
            lost = report.lost,
            "worker stopped"
        );
        Ok(report)
    }

    /// A long-polling claim of up to `free` steps.
    fn claim(&self, free: usize) -> ClaimFuture {
        let client = self.client.clone();
        let worker_id = self.worker_id.clone();
        let handlers = self.handler_names.clone();
        let namespaces = self.namespaces.clone();
        let limit = u32::try_from(free.min(100)).unwrap_or(100);
        let lease = self.lease;
        let wait = self.poll_wait;
        Box::pin(async move {
            client
                .claim_steps(&Claim {
                    worker_id: &worker_id,
                    handlers: &handlers,
                    namespaces: &namespaces,
                    limit,
                    lease,
                    wait,
                })
                .await
        })
    }

    /// Starts a claimed attempt in a task of its own.
    fn start(
        &self,
        lease: Lease,
        attempts: &mut JoinSet<HandlerResult>,
        running: &mut HashMap<Id, Running>,
    ) {
        let Some(handler) = self.handlers.get(&lease.handler).cloned() else {
            // Only registered handlers are claimed; a server that ignores the filter gets
            // the step back.
            let client = self.client.clone();
            let token = lease.lease_token.clone();
            tokio::spawn(async move { client.release_steps(&[token]).await });
            return;
        };
        tracing::debug!(step = %lease.name, task = %lease.task_id, attempt = lease.attempt, "attempt started");
        let abort = attempts.spawn(handler.run(lease.clone()));
        running.insert(abort.id(), Running { lease, abort });
    }

    /// Gives unfinished leases back; how many were released.
    async fn release(&self, tokens: &[String]) -> u64 {
        let mut released = 0;
        for chunk in tokens.chunks(100) {
            match self.client.release_steps(chunk).await {
                Ok(steps) => released += steps.len() as u64,
                Err(err) => {
                    tracing::warn!(error = %err, "could not release leases; they expire on their own")
                }
            }
        }
        released
    }
}

/// Records an outcome, trying again while the server is away (a second answer of
/// `LEASE_LOST` after a lost reply means the first one was recorded, or the lease ran out).
async fn report_outcome(client: Client, lease: Lease, outcome: HandlerResult) -> Reported {
    let mut wait = Duration::from_millis(200);
    let deadline = lease.lease_expires_at;
    loop {
        let result = match &outcome {
            Ok(results) => client
                .complete_step(&lease.lease_token, results)
                .await
                .map(|_| Reported::Completed),
            Err(StepError::Retryable {
                message,
                retry_after,
            }) => client
                .fail_step(&lease.lease_token, message, true, *retry_after)
                .await
                .map(|_| Reported::Failed),
            Err(StepError::Permanent { message }) => client
                .fail_step(&lease.lease_token, message, false, None)
                .await
                .map(|_| Reported::Failed),
        };
        match result {
            Ok(reported) => {
                let what = match reported {
                    Reported::Completed => "completed",
                    _ => "failed",
                };
                tracing::info!(step = %lease.name, task = %lease.task_id, attempt = lease.attempt, "{what}");
                return reported;
            }
            Err(err) if err.is_transient() && chrono::Utc::now() < deadline => {
                tracing::warn!(error = %err, step = %lease.name, "could not report the outcome; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(err) => {
                tracing::warn!(error = %err, step = %lease.name, task = %lease.task_id, "outcome not recorded");
                return Reported::Lost;
            }
        }
    }
}

async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The claim in flight, or never.
async fn poll_claim(claim: &mut Option<ClaimFuture>) -> Result<Vec<Lease>> {
    match claim {
        Some(claim) => claim.await,
        None => std::future::pending().await,
    }
}
