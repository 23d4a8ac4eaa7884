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

    /// The lease each claim asks for (3 s to an hour, default 30 s); heartbeats renew it every
    /// third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a claim waits on the server for work (1 to 60 s, default 20 s).
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
        // Heartbeats go every third of the lease, and the server counts in whole seconds.
        if !(3..=3600).contains(&self.lease.as_secs()) {
            return Err(invalid("the lease must be 3 to 3600 seconds"));
        }
        // A claim that answers at once when nothing is ready would be asked again at once.
        if !(1..=60).contains(&self.poll_wait.as_secs()) {
            return Err(invalid("the poll wait must be 1 to 60 seconds"));
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
    /// Until when the lease is held, by this process's clock: the claim's lease, moved on by
    /// each heartbeat that kept it.
    held_until: Instant,
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
    /// When the server refuses the worker (its token, its permission) it stops the same way
    /// and answers the refusal; a server that is away is waited for.
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
        let beat_every = self.lease / 3;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + beat_every, beat_every);
        let mut drain_until: Option<Instant> = None;
        let mut refused: Option<Error> = None;
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
                    // The claim waiting on the server is abandoned at once: its connection
                    // closes, so the server stops waiting before this worker's own outcomes
                    // and releases could make work it would hand to nobody. (Only an answer
                    // already on its way at this very moment is lost; its leases run out.)
                    claim = None;
                    drain_until = Some(Instant::now() + self.grace);
                }
                () = sleep_until_or_forever(drain_until) => {
                    // What finished meanwhile is reported, not run again elsewhere.
                    while let Some(joined) = attempts.try_join_next_with_id() {
                        self.finished(joined, &mut running, &mut reports);
                    }
                    let tokens: Vec<String> = running
                        .values()
                        .map(|attempt| attempt.lease.lease_token.clone())
                        .collect();
                    for attempt in running.values() {
                        attempt.abort.abort();
                    }
                    running.clear();
                    let released = self.release(&tokens).await;
                    report.released += released;
                    // Not given back (the server was away): they wait for their leases to end.
                    report.lost += tokens.len() as u64 - released;
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
                                if let Some(lease) = self.start(lease, &mut attempts, &mut running) {
                                    report.released += self.release(&[lease.lease_token]).await;
                                }
                            }
                        }
                        Err(err) if err.is_transient() => {
                            tracing::warn!(error = %err, retry_in_ms = claim_backoff.as_millis() as u64, "claim failed; trying again");
                            claim_after = Some(Instant::now() + claim_backoff);
                            claim_backoff = (claim_backoff * 2).min(Duration::from_secs(30));
                        }
                        Err(err) => {
                            tracing::error!(error = %err, "the server refuses this worker; stopping");
                            refused = Some(err);
                            drain_until.get_or_insert(Instant::now() + self.grace);
                        }
                    }
                }
                Some(joined) = attempts.join_next_with_id(), if !attempts.is_empty() => {
                    self.finished(joined, &mut running, &mut reports);
                }
                Some(reported) = reports.join_next(), if !reports.is_empty() => {
                    report.count(reported);
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
                        Ok(Ok(statuses)) => self.beaten(statuses, &mut running, &mut report),
                        Ok(Err(err)) => tracing::warn!(error = %err, "heartbeat failed; trying again at the next beat"),
                        Err(_) => {}
                    }
                }
            }
        }
        // Outcomes already decided are still recorded (each for as long as its lease lasts).
        while let Some(reported) = reports.join_next().await {
            report.count(reported);
        }
        tracing::info!(
            completed = report.completed,
            failed = report.failed,
            released = report.released,
            lost = report.lost,
            "worker stopped"
        );
        match refused {
            Some(err) => Err(err),
            None => Ok(report),
        }
    }

    /// An attempt's handler ended: its outcome is reported in the background.
    fn finished(
        &self,
        joined: std::result::Result<(Id, HandlerResult), tokio::task::JoinError>,
        running: &mut HashMap<Id, Running>,
        reports: &mut JoinSet<Reported>,
    ) {
        let (id, outcome) = match joined {
            Ok((id, outcome)) => (id, outcome),
            Err(err) if err.is_panic() => {
                (err.id(), Err(StepError::retryable("the handler panicked")))
            }
            // Aborted: its lease was lost, or the stop is releasing it.
            Err(_) => return,
        };
        if let Some(attempt) = running.remove(&id) {
            reports.spawn(report_outcome(
                self.client.clone(),
                attempt.lease,
                outcome,
                attempt.held_until,
            ));
        }
    }

    /// A heartbeat's answer: kept leases last longer; a lost one stops its attempt.
    fn beaten(
        &self,
        statuses: Vec<crate::LeaseStatus>,
        running: &mut HashMap<Id, Running>,
        report: &mut StopReport,
    ) {
        let alive: HashMap<String, bool> = statuses
            .into_iter()
            .map(|status| (status.lease_token, status.alive))
            .collect();
        let until = Instant::now() + self.lease;
        running.retain(|_, attempt| match alive.get(&attempt.lease.lease_token) {
            Some(true) => {
                attempt.held_until = until;
                true
            }
            Some(false) => {
                tracing::warn!(step = %attempt.lease.name, task = %attempt.lease.task_id, "lease lost; stopping the attempt");
                attempt.abort.abort();
                report.lost += 1;
                false
            }
            // Claimed after the beat was sent.
            None => true,
        });
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

    /// Starts a claimed attempt in a task of its own; a lease of a handler this worker does
    /// not have (a server that ignored the filter) comes back to be released.
    fn start(
        &self,
        lease: Lease,
        attempts: &mut JoinSet<HandlerResult>,
        running: &mut HashMap<Id, Running>,
    ) -> Option<Lease> {
        let Some(handler) = self.handlers.get(&lease.handler).cloned() else {
            return Some(lease);
        };
        tracing::debug!(step = %lease.name, task = %lease.task_id, attempt = lease.attempt, "attempt started");
        let abort = attempts.spawn(handler.run(lease.clone()));
        running.insert(
            abort.id(),
            Running {
                lease,
                abort,
                held_until: Instant::now() + self.lease,
            },
        );
        None
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

impl StopReport {
    fn count(&mut self, reported: std::result::Result<Reported, tokio::task::JoinError>) {
        match reported {
            Ok(Reported::Completed) => self.completed += 1,
            Ok(Reported::Failed) => self.failed += 1,
            Ok(Reported::Lost) | Err(_) => self.lost += 1,
        }
    }
}

/// Records an outcome, trying again while the server is away and the lease lasts (a second
/// answer of `LEASE_LOST` after a lost reply means the first one was recorded, or the lease
/// ran out). Results the server refuses (too large, say) fail the attempt for good instead:
/// another attempt would produce them again.
async fn report_outcome(
    client: Client,
    lease: Lease,
    outcome: HandlerResult,
    held_until: Instant,
) -> Reported {
    let mut outcome = outcome;
    let mut wait = Duration::from_millis(200);
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
            Err(err) if err.is_transient() && Instant::now() < held_until => {
                tracing::warn!(error = %err, step = %lease.name, "could not report the outcome; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(err) if outcome.is_ok() && err.code().is_some_and(|code| code != "LEASE_LOST") => {
                tracing::warn!(error = %err, step = %lease.name, task = %lease.task_id, "the results were refused; failing the attempt");
                outcome = Err(StepError::permanent(format!(
                    "the results were refused: {err}"
                )));
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
