//! The embedded worker pool: claims steps of built-in handlers in batches, runs them (at once,
//! or as background requests for `http`), and records their outcomes in batches (one
//! transaction for many completions).

use crate::Engine;
use crate::handlers::{BUILT_IN_HANDLERS, Outcome, run_immediate};
use crate::trace::Attempts;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tasker_store::{AWAITING_DECISION, AttemptFailure, ClaimRequest, ClaimedStep, Completion};
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;
use uuid::Uuid;

/// How the embedded pool works.
#[derive(Debug, Clone)]
pub struct WorkerPoolConfig {
    /// Steps in flight at once.
    pub concurrency: usize,
    /// How the pool names itself in leases.
    pub worker_id: String,
    pub lease: Duration,
    /// Where the `http` handler may connect.
    pub outbound: crate::OutboundPolicy,
    /// When the server drains or stops, how long `http` steps in flight may take to finish
    /// before their leases are given back.
    pub drain_grace: Duration,
}

impl Default for WorkerPoolConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            worker_id: format!("tasker-embedded-{}", std::process::id()),
            lease: Duration::from_secs(60),
            outbound: crate::OutboundPolicy::default(),
            drain_grace: Duration::from_secs(10),
        }
    }
}

type Finished = (Uuid, Outcome);

/// Whether a claimed step's outcome is decided inside its claim (and recorded there when it
/// completes): a built-in handler that needs no I/O, on an attempt that is not traced (a traced
/// one runs inside its `step.attempt` span, after the claim).
fn decided_in_claim(step: &ClaimedStep) -> bool {
    step.step.handler != "http" && step.trace_parent.is_none()
}

/// How long past the drain grace the pool's last writes (outcomes, releases) may take.
const DRAIN_WRITES: Duration = Duration::from_secs(5);

/// How soon the pool tries again what the database could not take: a claim, or outcomes.
const FAULT_RETRY: Duration = Duration::from_millis(500);

impl Engine {
    /// The embedded worker pool, to run until `shutdown` changes or the server drains; an
    /// error (the `http` handler's client cannot be built) stops the start instead of leaving
    /// a server without workers. Then it claims nothing more, lets the `http` steps in flight
    /// finish within the drain grace and records them, and releases the leases of the rest
    /// (they run again elsewhere, their attempt not counted).
    pub fn run_workers(
        self: Arc<Self>,
        config: WorkerPoolConfig,
        shutdown: watch::Receiver<bool>,
    ) -> crate::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let caller =
            crate::http::Caller::new(&config.outbound).map_err(crate::Error::HttpClient)?;
        Ok(self.pool_loop(config, Arc::new(caller), shutdown))
    }

    async fn pool_loop(
        self: Arc<Self>,
        config: WorkerPoolConfig,
        caller: Arc<crate::http::Caller>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut signal = self.built_in_work.subscribe();
        let concurrency = config.concurrency.max(1);
        let (done, mut finished) = mpsc::unbounded_channel::<Finished>();
        // A request must end well before the lease it runs under.
        let max_request = config
            .lease
            .saturating_sub(Duration::from_secs(5))
            .max(Duration::from_secs(1));
        let mut in_flight: HashMap<Uuid, tokio::task::AbortHandle> = HashMap::new();
        let mut outcomes: Vec<Finished> = Vec::new();
        let mut attempts = Attempts::default();
        let mut draining = self.draining();
        loop {
            if *shutdown.borrow() || *draining.borrow_and_update() {
                self.drain_pool(&config, in_flight, outcomes, &mut finished, attempts)
                    .await;
                return;
            }
            signal.borrow_and_update();
            let capacity = concurrency.saturating_sub(in_flight.len());
            let mut claimed = Vec::new();
            let mut fused = 0;
            if capacity > 0 {
                let request = ClaimRequest {
                    worker_id: config.worker_id.clone(),
                    handlers: BUILT_IN_HANDLERS.iter().map(|h| (*h).to_owned()).collect(),
                    within: tasker_domain::Within::Any,
                    limit: u32::try_from(capacity).unwrap_or(u32::MAX),
                    lease: config.lease,
                };
                // Steps that finish at once without I/O (untraced: a traced attempt keeps its
                // spans on the ordinary path) complete in the claim's own transaction; the
                // other outcomes computed on the way are kept for the steps left.
                let mut decided: HashMap<Uuid, Outcome> = HashMap::new();
                let claiming = self.store.claim_and_complete(&request, |step| {
                    if !decided_in_claim(step) {
                        return None;
                    }
                    match run_immediate(step) {
                        Outcome::Complete(results) => Some(results),
                        other => {
                            decided.insert(step.lease_token, other);
                            None
                        }
                    }
                });
                match claiming.await {
                    Ok((steps, report)) => {
                        self.note_claims(
                            steps
                                .iter()
                                .map(|claim| &claim.step)
                                .chain(&report.completed),
                        );
                        attempts.open(&steps, self.store.clock().now());
                        fused = report.completed.len();
                        // Room these steps took under a step limit was freed in the same
                        // transaction: nobody else could have seen it, nobody need hear.
                        self.completed(&report, false).await;
                        outcomes.extend(decided);
                        claimed = steps;
                    }
                    Err(err) => {
                        crate::retried("the worker pool could not claim steps", &err);
                        tokio::select! {
                            () = tokio::time::sleep(FAULT_RETRY) => continue,
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
            let full = capacity > 0 && claimed.len() + fused == capacity;
            in_flight.extend(
                self.start_requests(&claimed, &attempts, &caller, max_request, &done)
                    .await,
            );
            // The traced ones: their outcome is decided here, inside their attempt's span.
            outcomes.extend(
                claimed
                    .iter()
                    .filter(|step| step.step.handler != "http" && !decided_in_claim(step))
                    .map(|step| {
                        let outcome = attempts
                            .run(step.lease_token)
                            .in_scope(|| run_immediate(step));
                        (step.lease_token, outcome)
                    }),
            );
            while let Ok(outcome) = finished.try_recv() {
                in_flight.remove(&outcome.0);
                outcomes.push(outcome);
            }
            let worked = !claimed.is_empty() || fused > 0 || !outcomes.is_empty();
            outcomes = self
                .record(std::mem::take(&mut outcomes), &mut attempts)
                .await;
            if !outcomes.is_empty() {
                // The database cannot take them now: keep them (their leases still hold) and
                // try again shortly, rather than let the leases expire and spend attempts.
                tokio::select! {
                    () = tokio::time::sleep(FAULT_RETRY) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            if full || worked {
                // More may be ready (a full batch, or children of what just completed).
                continue;
            }
            tokio::select! {
                _ = signal.changed() => {}
                Some(outcome) = finished.recv() => {
                    in_flight.remove(&outcome.0);
                    outcomes.push(outcome);
                }
                // Stopped (or its sender gone): no waiting for a change that cannot come.
                _ = shutdown.changed() => {
                    self.drain_pool(&config, in_flight, outcomes, &mut finished, attempts).await;
                    return;
                }
                _ = draining.changed() => {}
            }
        }
    }

    /// The pool's end: the `http` steps in flight get the drain grace to finish, every
    /// outcome in hand is recorded, and the leases of the steps still running are released.
    async fn drain_pool(
        &self,
        config: &WorkerPoolConfig,
        mut in_flight: HashMap<Uuid, tokio::task::AbortHandle>,
        mut outcomes: Vec<Finished>,
        finished: &mut mpsc::UnboundedReceiver<Finished>,
        mut attempts: Attempts,
    ) {
        tracing::info!(
            in_flight = in_flight.len(),
            "worker pool draining: no more claims"
        );
        let deadline = tokio::time::Instant::now() + config.drain_grace;
        while !in_flight.is_empty() {
            tokio::select! {
                Some(outcome) = finished.recv() => {
                    in_flight.remove(&outcome.0);
                    outcomes.push(outcome);
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Requests still running are stopped: their steps go back and run again elsewhere.
        for request in in_flight.values() {
            request.abort();
        }
        let unfinished: Vec<Uuid> = in_flight.into_keys().collect();
        // A database that does not answer cannot hold the stop past the grace (and a little
        // more for the writes): what it has not taken waits for its leases to end.
        let writes = async {
            let unrecorded = self.record(outcomes, &mut attempts).await;
            if !unrecorded.is_empty() {
                tracing::warn!(
                    steps = unrecorded.len(),
                    "outcomes the database could not take at the stop: their leases expire and the steps run again"
                );
            }
            if !unfinished.is_empty() {
                match self.release(&unfinished).await {
                    Ok(released) => tracing::info!(
                        released = released.len(),
                        "gave back the leases of unfinished http steps"
                    ),
                    Err(err) => {
                        crate::retried(
                            "releasing unfinished steps failed; their leases expire",
                            &err,
                        );
                    }
                }
            }
        };
        if tokio::time::timeout_at(deadline + DRAIN_WRITES, writes)
            .await
            .is_err()
        {
            tracing::warn!(
                "the database did not take the pool's last writes in time; their leases expire"
            );
        }
    }

    /// Starts the `http` steps in the background; returns their lease tokens, each with what
    /// stops its request.
    async fn start_requests(
        &self,
        claimed: &[ClaimedStep],
        attempts: &Attempts,
        caller: &Arc<crate::http::Caller>,
        max_request: Duration,
        done: &mpsc::UnboundedSender<Finished>,
    ) -> Vec<(Uuid, tokio::task::AbortHandle)> {
        let requests: Vec<&ClaimedStep> = claimed
            .iter()
            .filter(|step| step.step.handler == "http")
            .collect();
        if requests.is_empty() {
            return Vec::new();
        }
        let steps: Vec<_> = requests.iter().map(|c| c.step.clone()).collect();
        let mut inputs = match self.store.step_inputs(&steps).await {
            Ok(inputs) => inputs,
            Err(err) => {
                crate::retried(
                    "reading the inputs of http steps failed; their leases will expire and they will run again",
                    &err,
                );
                return Vec::new();
            }
        };
        let mut started = Vec::with_capacity(requests.len());
        for claimed in requests {
            let token = claimed.lease_token;
            let claimed = claimed.clone();
            let input = inputs.remove(&claimed.step.id).unwrap_or_default();
            let caller = caller.clone();
            let done = done.clone();
            // Every line the request logs says which task, step and request chain it serves.
            // At error level, so that the strictest filter still keeps the ids. A traced
            // attempt's request runs inside its `step.attempt` span.
            let span = tracing::error_span!(
                parent: attempts.of(token).and_then(tracing::Span::id),
                "step.run",
                task_id = %claimed.step.task_id,
                step_id = %claimed.step.id,
                step = %claimed.step.name,
                handler = %claimed.step.handler,
                attempt = claimed.step.attempts,
                correlation_id = %claimed.correlation_id,
            );
            let work = async move {
                let outcome = caller.run(&claimed, &input, max_request).await;
                // The pool stopped: the lease will expire and the step run again.
                let _ = done.send((claimed.lease_token, outcome));
            };
            let request = tokio::spawn(tracing::Instrument::instrument(work, span));
            started.push((token, request.abort_handle()));
        }
        started
    }

    /// Records outcomes: completions in one batch, then failures and parked steps. Returns
    /// those the database could not take for a fault, to be recorded again; other errors
    /// leave the step to its lease, which expires and runs it again. The spans of traced
    /// attempts end with their written outcome.
    async fn record(&self, outcomes: Vec<Finished>, attempts: &mut Attempts) -> Vec<Finished> {
        let mut unrecorded = Vec::new();
        let mut completions = Vec::new();
        let mut parked = 0;
        let tokens: Vec<Uuid> = outcomes.iter().map(|(token, _)| *token).collect();
        for (lease_token, outcome) in outcomes {
            match outcome {
                Outcome::Complete(results) => completions.push(Completion {
                    lease_token,
                    results,
                }),
                Outcome::Fail {
                    message,
                    retryable,
                    retry_after_seconds,
                } => {
                    let failure = AttemptFailure {
                        lease_token,
                        message,
                        retryable,
                        retry_after_seconds,
                    };
                    let recording = attempts.recording(lease_token, "fail");
                    if let Err(err) = self.fail(&failure).instrument(recording).await
                        && crate::retried("recording a failed attempt failed", &err)
                    {
                        let outcome = Outcome::Fail {
                            message: failure.message,
                            retryable,
                            retry_after_seconds,
                        };
                        unrecorded.push((lease_token, outcome));
                    }
                }
                Outcome::Park { wake_at_ms } => {
                    let holder = if wake_at_ms.is_some() {
                        "timer"
                    } else {
                        AWAITING_DECISION
                    };
                    let parking = self.store.park_step(lease_token, wake_at_ms, holder);
                    match parking
                        .instrument(attempts.recording(lease_token, "park"))
                        .await
                    {
                        Ok(()) => parked += 1,
                        Err(err) => {
                            if crate::retried("parking a step failed", &err) {
                                unrecorded.push((lease_token, Outcome::Park { wake_at_ms }));
                            }
                        }
                    }
                }
            }
        }
        if parked > 0 {
            // A wake time may be earlier than the one the timer sleeps toward.
            self.timers.notify_one();
        }
        // One batch write for all completions: each traced attempt's span covers it.
        let recording: Vec<tracing::Span> = completions
            .iter()
            .map(|c| attempts.recording(c.lease_token, "complete"))
            .collect();
        if let Err(err) = self.complete(&completions).await
            && crate::retried("recording completed steps failed", &err)
        {
            unrecorded.extend(
                completions
                    .into_iter()
                    .map(|c| (c.lease_token, Outcome::Complete(c.results))),
            );
        }
        drop(recording);
        let kept: Vec<Uuid> = unrecorded.iter().map(|(token, _)| *token).collect();
        attempts.close(&tokens, &kept);
        unrecorded
    }
}
