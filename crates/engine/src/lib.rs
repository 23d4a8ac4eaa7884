//! Tasker's running orchestrator: the operations that change what can run (so they wake whoever
//! waits for work), the embedded worker pool that runs built-in handlers, and the maintenance
//! loop that fails lost leases and wakes steps whose retry time has come. Nothing polls on a
//! fixed interval on the hot path: a completion that makes children ready wakes the workers at
//! once; timers sleep until the earliest due time; a slow safety sweep backs them up.

mod feed;
mod handlers;
mod http;
pub mod metrics;
mod outbound;
mod ready;
mod retention;
mod seed;
mod trace;
mod workers;

pub use feed::{EventFeed, Follow};
pub use handlers::BUILT_IN_HANDLERS;
pub use outbound::OutboundPolicy;
pub use retention::RetentionPolicy;
pub use seed::{BundledTemplate, register_bundled, seed_templates};
pub use workers::WorkerPoolConfig;

use std::sync::Arc;
use std::time::Duration;
use tasker_store::{
    AttemptFailure, ClaimRequest, ClaimedStep, Completion, CompletionReport, FailureReport, Heard,
    NewTask, StepAction, StepChange, Store, TaskCreation, TaskRecord,
};
use tokio::sync::{Notify, watch};

/// Every way an engine operation can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("template {name}: {source}")]
    Template {
        name: String,
        #[source]
        source: tasker_store::Error,
    },
    #[error(transparent)]
    Store(#[from] tasker_store::Error),
    #[error("the http allowlist entry {entry:?} is invalid: {reason}")]
    OutboundRule { entry: String, reason: String },
    #[error("the http handler's client could not be built: {0}")]
    HttpClient(#[source] reqwest::Error),
}

impl Error {
    /// Whether this is a database fault, whose episode the store logs once.
    pub fn is_fault(&self) -> bool {
        matches!(self, Error::Store(err) if err.is_fault())
    }
}

/// An error of background work, which is retried.
pub(crate) trait Retried: std::fmt::Display {
    /// Whether it is a database fault, whose episode the store logs once.
    fn is_fault(&self) -> bool;
}

impl Retried for tasker_store::Error {
    fn is_fault(&self) -> bool {
        tasker_store::Error::is_fault(self)
    }
}

impl Retried for Error {
    fn is_fault(&self) -> bool {
        Error::is_fault(self)
    }
}

/// Logs a failure of background work that will be retried: at warn, unless it is a database
/// fault, which the store logs once per episode (a full disk must not flood the log).
/// Returns whether it was a fault.
pub(crate) fn retried(what: &str, err: &impl Retried) -> bool {
    let fault = err.is_fault();
    if fault {
        tracing::debug!(error = %err, "{what}");
    } else {
        tracing::warn!(error = %err, "{what}");
    }
    fault
}

/// Result alias for engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A person's decision on a step waiting for one.
#[derive(Debug, Clone)]
pub enum Decision {
    Approve { results: serde_json::Value },
    Reject { reason: String },
}

/// The longest a claim may wait for work.
pub const MAX_CLAIM_WAIT: Duration =
    Duration::from_secs(tasker_domain::worker::WAIT_SECONDS.max as u64);
/// The slow safety sweep behind the timers.
pub(crate) const SAFETY_SWEEP: Duration = Duration::from_secs(5);
/// How often the buckets of rate limits no step used for a day are forgotten.
const RATE_LIMIT_UPKEEP: Duration = Duration::from_secs(3600);

/// Whether attempts that just ended (`steps`, as they are now) made room under a step
/// concurrency limit, for the steps waiting for it.
fn frees_step_slots<'s>(steps: impl IntoIterator<Item = &'s tasker_store::StepRecord>) -> bool {
    steps.into_iter().any(|step| step.concurrency.is_some())
}

/// Whether some of these creations made steps of a built-in handler claimable.
fn built_in_ready(creations: &[TaskCreation]) -> bool {
    creations.iter().any(|creation| {
        creation
            .ready_handlers
            .iter()
            .any(|handler| BUILT_IN_HANDLERS.contains(&handler.as_str()))
    })
}

/// The orchestrator shared by the API, the worker pool and the maintenance loop.
pub struct Engine {
    store: Store,
    /// Bumped whenever work may have become claimable; waiters compare generations, so a
    /// wake-up between "found nothing" and "wait" is never lost.
    work: watch::Sender<u64>,
    /// Bumped like `work`, except for work that only external workers can claim: the embedded
    /// pool waits on this one, so tasks for external handlers do not make it claim in vain.
    built_in_work: watch::Sender<u64>,
    /// Poked when a new retry time may be earlier than the one the timer sleeps toward.
    timers: Notify,
    /// Bumped whenever tasks finish (complete, error or cancelled), for those who wait on
    /// outcomes.
    finished: watch::Sender<u64>,
    /// Bumped after each retention sweep, for those who wait on its effects.
    swept: watch::Sender<u64>,
    /// The one reader of the event log that every subscription shares.
    events: EventFeed,
    /// Ready-step counts shared by the `stepsAvailable` subscriptions.
    ready: ready::ReadyCounts,
    /// This server's metrics.
    metrics: metrics::Metrics,
    /// Set when the server starts to drain: it claims nothing more, parked claims answer
    /// empty, subscriptions complete, and readiness fails, so work goes to other replicas.
    draining: watch::Sender<bool>,
    /// Open long-lived connections (WebSockets), so a stop can wait for them to close.
    connections: Arc<watch::Sender<usize>>,
}

/// One open connection, counted while it lives.
pub struct ConnectionHeld(Arc<watch::Sender<usize>>);

impl Drop for ConnectionHeld {
    fn drop(&mut self) {
        self.0.send_modify(|open| *open = open.saturating_sub(1));
    }
}

impl Engine {
    pub fn new(store: Store) -> Arc<Engine> {
        Arc::new(Engine {
            events: EventFeed::new(store.clone()),
            store,
            work: watch::Sender::new(0),
            built_in_work: watch::Sender::new(0),
            timers: Notify::new(),
            finished: watch::Sender::new(0),
            swept: watch::Sender::new(0),
            ready: ready::ReadyCounts::default(),
            metrics: metrics::Metrics::new(),
            draining: watch::Sender::new(false),
            connections: Arc::new(watch::Sender::new(0)),
        })
    }

    /// Counts a long-lived connection until the guard is dropped.
    pub fn hold_connection(&self) -> ConnectionHeld {
        self.connections.send_modify(|open| *open += 1);
        ConnectionHeld(self.connections.clone())
    }

    /// Waits until every counted connection has closed, for `within` at most; whether they
    /// all did.
    pub async fn connections_closed(&self, within: Duration) -> bool {
        let mut open = self.connections.subscribe();
        tokio::time::timeout(within, open.wait_for(|open| *open == 0))
            .await
            .is_ok_and(|closed| closed.is_ok())
    }

    /// Starts draining (once; later calls change nothing).
    pub fn drain(&self) {
        self.draining
            .send_if_modified(|draining| !std::mem::replace(draining, true));
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Changes to `true` when the server starts draining.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// This server's metrics: what its API and engine did.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Counts steps just leased, with how long each had been claimable (the claim stamped
    /// `updated_at`).
    fn note_claims<'s>(&self, claimed: impl IntoIterator<Item = &'s tasker_store::StepRecord>) {
        for step in claimed {
            let waited = step
                .ready_since
                .map(|since| (step.updated_at - since).num_milliseconds() as f64 / 1000.0);
            self.metrics.claimed(&step.handler, waited);
        }
    }

    /// Counts an attempt that ended, with how long it ran (from its claim to `ended`).
    fn note_attempt(
        &self,
        step: &tasker_store::StepRecord,
        outcome: metrics::AttemptOutcome,
        ended: chrono::DateTime<chrono::Utc>,
    ) {
        let seconds = step
            .attempt_started_at
            .map(|started| (ended - started).num_milliseconds() as f64 / 1000.0);
        self.metrics.attempt(&step.handler, outcome, seconds);
        if matches!(
            outcome,
            metrics::AttemptOutcome::Failed
                | metrics::AttemptOutcome::TimedOut
                | metrics::AttemptOutcome::LeaseExpired
        ) && step.next_attempt_at.is_some()
        {
            self.metrics.retry(&step.handler);
        }
    }

    /// The event log as it grows, shared by every subscription of this process.
    pub fn events(&self) -> &EventFeed {
        &self.events
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How many long-poll claims are parked waiting for work. A gauge for operators, and how
    /// tests know a claim is parked.
    pub fn work_listeners(&self) -> usize {
        self.work.receiver_count()
    }

    /// A receiver that changes whenever work may have become claimable.
    pub fn work_signal(&self) -> watch::Receiver<u64> {
        self.work.subscribe()
    }

    /// Wakes the maintenance loop to look at its due times again (a new schedule, a paused
    /// one resumed): it may have gone to sleep until a later one.
    pub fn timers_changed(&self) {
        self.timers.notify_one();
    }

    /// Tells every waiting claimer in this process to look again.
    pub fn work_available(&self) {
        self.wake_claimers(true);
    }

    /// Tells the waiting claimers in this process to look again: parked long polls always,
    /// the embedded pool when `built_in`.
    fn wake_claimers(&self, built_in: bool) {
        let bump = |generation: &mut u64| *generation = generation.wrapping_add(1);
        self.work.send_modify(bump);
        if built_in {
            self.built_in_work.send_modify(bump);
        }
    }

    /// Tells every waiting claimer, in this process and on every other replica, to look again.
    async fn announce(&self) {
        self.announce_ready(true).await;
    }

    /// Like [`Engine::announce`], waking this process's pool only when `built_in`: work for
    /// external handlers alone leaves it asleep. Other replicas hear of any work.
    async fn announce_ready(&self, built_in: bool) {
        self.wake_claimers(built_in);
        if let Err(err) = self.store.announce_work(built_in).await {
            tracing::warn!(error = %err, "could not tell other replicas about new work");
        }
    }

    /// Wakes this process's claimers and event subscribers when another replica announces
    /// work or appends events (PostgreSQL).
    /// Returns at once on SQLite. Runs until `shutdown` changes.
    pub async fn run_listener(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut listener = loop {
            match self.store.listen_for_work().await {
                Ok(Some(listener)) => break listener,
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot listen for other replicas' work; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        loop {
            tokio::select! {
                heard = listener.next() => match heard {
                    Ok(Heard::Own) => {}
                    Ok(Heard::Work { built_in }) => self.wake_claimers(built_in),
                    Ok(Heard::Events) => self.store.note_events_appended(),
                    missed => {
                        if let Err(err) = missed {
                            tracing::warn!(error = %err, "lost the connection listening for work");
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = shutdown.changed() => return,
                            }
                        }
                        // Anything may have been missed: work may be claimable, and new
                        // events may be readable.
                        self.work_available();
                        self.store.note_events_appended();
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// A receiver that changes whenever tasks finish.
    pub fn finished_tasks(&self) -> watch::Receiver<u64> {
        self.finished.subscribe()
    }

    fn tasks_finished<'t>(&self, tasks: impl IntoIterator<Item = &'t TaskRecord>) {
        let mut count: u64 = 0;
        for task in tasks {
            count += 1;
            trace::finished(task);
        }
        if count > 0 {
            self.finished
                .send_modify(|generation| *generation = generation.wrapping_add(count));
        }
    }

    /// Starts a task; its root steps are claimable at once.
    pub async fn create_task(&self, mut new: NewTask) -> Result<TaskCreation> {
        let span = tracing::info_span!(
            "task.create",
            namespace = %new.namespace,
            template = %new.template,
            task_id = tracing::field::Empty,
        );
        // The task's work joins this span's trace, when traces are exported.
        new.trace_parent = trace::traceparent_of(&span);
        let creation =
            tracing::Instrument::instrument(self.store.create_task(new), span.clone()).await?;
        span.record("task_id", tracing::field::display(creation.task.id));
        if creation.created {
            self.announce_ready(built_in_ready(std::slice::from_ref(&creation)))
                .await;
            self.note_deadlines(std::slice::from_ref(&creation));
        }
        Ok(creation)
    }

    /// Starts many tasks in one transaction, all or none (see [`Store::create_tasks`]); their
    /// work joins the trace of one `tasks.create` span.
    pub async fn create_tasks(&self, mut news: Vec<NewTask>) -> Result<Vec<TaskCreation>> {
        let span = tracing::info_span!("tasks.create", count = news.len());
        let trace_parent = trace::traceparent_of(&span);
        for new in &mut news {
            new.trace_parent.clone_from(&trace_parent);
        }
        let creations =
            tracing::Instrument::instrument(self.store.create_tasks(news), span).await?;
        if creations.iter().any(|creation| creation.created) {
            self.announce_ready(built_in_ready(&creations)).await;
            self.note_deadlines(&creations);
        }
        Ok(creations)
    }

    /// Wakes the maintenance loop when new tasks have a timeout (their deadline may come
    /// before what it sleeps toward), and counts those that ended at their creation.
    fn note_deadlines(&self, creations: &[TaskCreation]) {
        // A new task its concurrency key refused (cancel_newest) ended as it was created.
        self.tasks_finished(
            creations
                .iter()
                .filter(|creation| creation.created && creation.task.state.has_ended())
                .map(|creation| &creation.task),
        );
        if creations
            .iter()
            .any(|creation| creation.created && creation.task.deadline.is_some())
        {
            self.timers_changed();
        }
    }

    /// Leases ready steps; with `wait`, returns as soon as some are ready or, at the deadline,
    /// empty (a long poll with no busy loop).
    pub async fn claim(&self, request: &ClaimRequest, wait: Duration) -> Result<Vec<ClaimedStep>> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_CLAIM_WAIT);
        let mut signal = self.work.subscribe();
        let mut draining = self.draining();
        loop {
            // A draining server leases nothing: the worker asks another replica.
            if *draining.borrow_and_update() {
                return Ok(Vec::new());
            }
            signal.borrow_and_update();
            let mut claimed = self.store.claim_steps(request).await?;
            if !claimed.is_empty() || tokio::time::Instant::now() >= deadline {
                if !claimed.is_empty() {
                    self.timers.notify_one();
                    self.note_claims(claimed.iter().map(|claim| &claim.step));
                    trace::leased(&mut claimed, &request.worker_id);
                }
                return Ok(claimed);
            }
            tokio::select! {
                changed = tokio::time::timeout_at(deadline, signal.changed()) => {
                    if changed.is_err() {
                        return Ok(Vec::new());
                    }
                }
                _ = draining.changed() => return Ok(Vec::new()),
            }
        }
    }

    /// Records finished attempts and wakes claimers when children became ready.
    pub async fn complete(&self, completions: &[Completion]) -> Result<CompletionReport> {
        let report = self.store.complete_steps(completions).await?;
        self.completed(&report, true).await;
        Ok(report)
    }

    /// What follows recorded completions: claimers hear of the steps they made ready (or,
    /// with `made_room`, the room the attempts' ends made under step concurrency limits),
    /// and the attempts and finished tasks are counted.
    async fn completed(&self, report: &CompletionReport, made_room: bool) {
        if report.newly_ready > 0 || (made_room && frees_step_slots(&report.completed)) {
            self.announce().await;
        }
        for step in &report.completed {
            let ended = step.completed_at.unwrap_or(step.updated_at);
            self.note_attempt(step, metrics::AttemptOutcome::Completed, ended);
        }
        self.tasks_finished(&report.finished_tasks);
    }

    /// Gives leases back unfinished; their steps are claimable again at once.
    pub async fn release(&self, tokens: &[uuid::Uuid]) -> Result<Vec<tasker_store::StepRecord>> {
        let released = self.store.release_leases(tokens).await?;
        if !released.is_empty() {
            self.announce().await;
        }
        for step in &released {
            self.note_attempt(step, metrics::AttemptOutcome::Released, step.updated_at);
        }
        Ok(released)
    }

    /// Records a failed attempt; a scheduled retry re-arms the timer.
    pub async fn fail(&self, failure: &AttemptFailure) -> Result<FailureReport> {
        let report = self.store.fail_step(failure).await?;
        // A retry due at once is work now, here and on the other replicas (later ones are
        // found by every replica's timer).
        let retry_now = report
            .step
            .next_attempt_at
            .is_some_and(|at| at <= self.store.clock().now());
        if report.newly_ready > 0 || retry_now || frees_step_slots([&report.step]) {
            self.announce().await;
        }
        self.note_attempt(
            &report.step,
            metrics::AttemptOutcome::Failed,
            report.step.updated_at,
        );
        if report.step.next_attempt_at.is_some() {
            self.timers.notify_one();
        }
        self.tasks_finished(&report.finished_task);
        Ok(report)
    }

    /// Cancels a task; its running leases are lost, and its concurrency slot (if any) goes to
    /// the next waiting task, whose steps are claimable at once (as are those its running
    /// steps made room for under a step concurrency limit).
    pub async fn cancel_task(&self, id: uuid::Uuid, reason: Option<String>) -> Result<TaskRecord> {
        let task = self.store.cancel_task(id, reason).await?;
        if task.concurrency.is_some() || self.store.step_limits_known() {
            self.announce().await;
        }
        self.tasks_finished([&task]);
        Ok(task)
    }

    /// Applies a person's change to a step (retry, resolve, skip); dependents that became
    /// ready are claimable at once.
    pub async fn change_step(
        &self,
        step_id: uuid::Uuid,
        action: StepAction,
        reason: Option<String>,
    ) -> Result<StepChange> {
        let change = self.store.change_step(step_id, action, reason).await?;
        self.announce().await;
        if change.task.state.has_ended() {
            self.tasks_finished([&change.task]);
        }
        Ok(change)
    }

    /// Retries a failed task: its failed steps run again with fresh attempts.
    pub async fn retry_task(
        &self,
        task_id: uuid::Uuid,
        reason: Option<String>,
    ) -> Result<TaskRecord> {
        let task = self.store.retry_task(task_id, reason).await?;
        self.announce().await;
        Ok(task)
    }

    /// Marks a failed task as resolved by a person.
    pub async fn resolve_task(
        &self,
        task_id: uuid::Uuid,
        reason: Option<String>,
    ) -> Result<TaskRecord> {
        let task = self.store.resolve_task(task_id, reason).await?;
        self.tasks_finished([&task]);
        Ok(task)
    }

    /// Re-runs a step and everything downstream of it; the first of them is claimable at
    /// once when its parents are done.
    pub async fn rerun_from_step(
        &self,
        step_id: uuid::Uuid,
        reason: Option<String>,
    ) -> Result<tasker_store::Rerun> {
        let rerun = self.store.rerun_from_step(step_id, reason).await?;
        self.announce().await;
        Ok(rerun)
    }

    /// Records a person's decision on a step waiting for one (an `approval` step): approving
    /// completes it with `results`; rejecting fails it for good (or skips it when skippable).
    pub async fn decide(
        &self,
        step_id: uuid::Uuid,
        decision: Decision,
    ) -> Result<tasker_store::StepRecord> {
        let lease_token = self.store.awaiting_decision(step_id).await?;
        match decision {
            Decision::Approve { results } => {
                let report = self
                    .complete(&[Completion {
                        lease_token,
                        results,
                    }])
                    .await?;
                report
                    .completed
                    .into_iter()
                    .next()
                    .ok_or(Error::Store(tasker_store::Error::LeaseLost))
            }
            Decision::Reject { reason } => {
                let failure = AttemptFailure {
                    lease_token,
                    message: format!("rejected: {reason}"),
                    retryable: false,
                    retry_after_seconds: None,
                };
                Ok(self.fail(&failure).await?.step)
            }
        }
    }

    /// Completes parked steps whose wake time has come (durable timers).
    async fn wake_parked_steps(&self) -> Result<usize> {
        let due = self.store.due_parked_steps(500).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let completions: Vec<Completion> = due
            .iter()
            .map(|(lease_token, step)| Completion {
                lease_token: *lease_token,
                results: handlers::woken_results(&step.config),
            })
            .collect();
        Ok(self.complete(&completions).await?.completed.len())
    }

    /// Wakes parked timers, fails expired leases and wakes claimers when retries are due or
    /// a spent rate limit frees, sleeping until the next due time in between. Runs until
    /// `shutdown` changes.
    pub async fn run_maintenance(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut limits_looked_for: Option<tokio::time::Instant> = None;
        let mut buckets_forgotten: Option<tokio::time::Instant> = None;
        loop {
            let mut sleep_for = SAFETY_SWEEP;
            self.metrics.upkeep();
            // Limited steps another replica (or an earlier run) created: claims here take
            // them too once this store knows. Looked for at most once a sweep.
            if limits_looked_for.is_none_or(|at| at.elapsed() >= SAFETY_SWEEP) {
                limits_looked_for = Some(tokio::time::Instant::now());
                if let Err(err) = self.store.notice_step_limits().await {
                    retried("looking for limited steps failed", &err);
                }
            }
            if buckets_forgotten.is_none_or(|at| at.elapsed() >= RATE_LIMIT_UPKEEP) {
                buckets_forgotten = Some(tokio::time::Instant::now());
                if let Err(err) = self.store.forget_idle_rate_limits().await {
                    retried("forgetting idle rate limits failed", &err);
                }
            }
            if let Err(err) = self.wake_parked_steps().await {
                retried("waking timers failed", &err);
            }
            // Events a crashed writer committed but could not number yet.
            match self.store.sequence_events().await {
                Ok(0) => {}
                Ok(_) => self.store.note_events_appended(),
                Err(err) => {
                    retried("numbering events failed", &err);
                }
            }
            match self.store.expire_leases().await {
                Ok(expired) if !expired.is_empty() => {
                    tracing::info!(
                        expired = expired.len(),
                        "failed attempts whose lease expired or that timed out"
                    );
                    for expiry in &expired {
                        let outcome = if expiry.timed_out {
                            metrics::AttemptOutcome::TimedOut
                        } else {
                            metrics::AttemptOutcome::LeaseExpired
                        };
                        self.note_attempt(&expiry.step, outcome, expiry.step.updated_at);
                    }
                    self.tasks_finished(expired.iter().filter_map(|e| e.finished_task.as_ref()));
                    // Retries of them may be claimable here and on the other replicas.
                    self.announce().await;
                }
                Ok(_) => {}
                Err(err) => {
                    retried("lease sweep failed", &err);
                }
            }
            match self.store.fire_schedules().await {
                Ok(created) if !created.is_empty() => {
                    self.announce_ready(built_in_ready(&created)).await;
                }
                Ok(_) => {}
                Err(err) => {
                    retried("firing schedules failed", &err);
                }
            }
            match self.store.time_out().await {
                Ok(report) if !report.is_empty() => {
                    tracing::info!(
                        tasks = report.timed_out_tasks.len(),
                        steps = report.unstarted_steps.len(),
                        "ended tasks past their timeout and steps not started in time"
                    );
                    self.tasks_finished(report.timed_out_tasks.iter());
                    self.tasks_finished(report.finished_tasks.iter());
                    // Cancelled tasks' running steps may have made room under a step limit.
                    let freed =
                        !report.timed_out_tasks.is_empty() && self.store.step_limits_known();
                    if report.newly_ready > 0 || freed {
                        self.announce().await;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    retried("timeout sweep failed", &err);
                }
            }
            // Retries whose time has come are claimable now.
            self.work_available();
            let now = self.store.clock().now().timestamp_millis();
            match self.store.next_wakeup_ms(now).await {
                Ok(Some(due)) => {
                    let wait = u64::try_from(due - now).unwrap_or(0).max(1);
                    sleep_for = sleep_for.min(Duration::from_millis(wait));
                }
                Ok(None) => {}
                Err(err) => {
                    retried("timer query failed", &err);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(sleep_for) => {}
                () = self.timers.notified() => {}
                // A claim found a rate limit spent: its next start may come first.
                () = self.store.throttled() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tasker_domain::{SystemClock, TaskRequest, TaskState};
    use tasker_store::TaskFilter;
    use tasker_store::testing::TestDatabase;

    const FLAKY_CHAIN: &str = r#"
namespace: demo
name: chain
version: 1.0.0
steps:
  - { name: a, handler: noop, config: { result: { n: 1 } } }
  - { name: b, handler: noop, depends_on: [a], config: { fail_attempts: 2 },
      retry: { max_attempts: 3, backoff: { base: 0, jitter: 0 } } }
  - { name: c, handler: noop, depends_on: [b] }
"#;

    fn new_task() -> NewTask {
        NewTask {
            namespace: "demo".into(),
            template: "chain".into(),
            version: None,
            trace_parent: None,
            request: TaskRequest {
                context: json!({}),
                ..TaskRequest::default()
            },
        }
    }

    /// Tasks whose first steps only external workers claim wake the long polls but not the
    /// embedded pool, which could claim nothing of them; a task with a built-in first step
    /// wakes both.
    #[tokio::test]
    async fn only_work_for_built_in_handlers_wakes_the_embedded_pool() {
        let db = TestDatabase::sqlite(Arc::new(SystemClock)).await;
        let remote = "namespace: demo\nname: remote\nversion: 1.0.0\nsteps:\n  - { name: a, handler: remote }\n  - { name: b, handler: noop, depends_on: [a] }\n";
        db.store.register_template(remote, false).await.unwrap();
        db.store
            .register_template(FLAKY_CHAIN, false)
            .await
            .unwrap();
        let engine = Engine::new(db.store.clone());
        let mut long_polls = engine.work_signal();
        let pool = engine.built_in_work.subscribe();
        let external = NewTask {
            template: "remote".into(),
            ..new_task()
        };
        let created = engine.create_task(external.clone()).await.unwrap();
        assert_eq!(created.ready_handlers, ["remote"]);
        assert!(long_polls.has_changed().unwrap());
        assert!(!pool.has_changed().unwrap());
        long_polls.borrow_and_update();
        engine.create_tasks(vec![external]).await.unwrap();
        assert!(long_polls.has_changed().unwrap());
        assert!(!pool.has_changed().unwrap());

        let created = engine.create_task(new_task()).await.unwrap();
        assert_eq!(created.ready_handlers, ["noop"]);
        assert!(pool.has_changed().unwrap());
    }

    /// The embedded pool runs built-in steps to completion, retries included, woken by
    /// completions and timers rather than by polling.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_worker_pool_runs_tasks_to_completion() {
        for db in TestDatabase::all(Arc::new(SystemClock)).await {
            db.store
                .register_template(FLAKY_CHAIN, false)
                .await
                .unwrap();
            let engine = Engine::new(db.store.clone());
            let (stop, stopped) = watch::channel(false);
            let workers = tokio::spawn(
                engine
                    .clone()
                    .run_workers(WorkerPoolConfig::default(), stopped.clone())
                    .unwrap(),
            );
            let timers = tokio::spawn(engine.clone().run_maintenance(stopped));
            let mut ids = Vec::new();
            for _ in 0..20 {
                ids.push(engine.create_task(new_task()).await.unwrap().task.id);
            }
            let complete = TaskFilter {
                states: vec![TaskState::Complete],
                ..TaskFilter::within(tasker_domain::Within::Any)
            };
            // Wait on the engine's own signal, not on a clock.
            let mut signal = engine.finished_tasks();
            while engine.store().count_tasks(&complete).await.unwrap() < 20 {
                tokio::time::timeout(Duration::from_secs(30), signal.changed())
                    .await
                    .expect("progress within 30 s")
                    .unwrap();
            }
            let steps = engine.store().steps_for_tasks(&ids).await.unwrap();
            let b: Vec<_> = steps.iter().filter(|s| s.name == "b").collect();
            assert!(
                b.iter().all(|s| s.attempts == 3),
                "two failures then success"
            );
            let a = steps.iter().find(|s| s.name == "a").unwrap();
            assert_eq!(a.results, Some(json!({ "n": 1 })));
            stop.send(true).unwrap();
            workers.await.unwrap();
            timers.await.unwrap();
        }
    }

    /// A worker long-polling for a step whose concurrency limit is full is woken by the end
    /// of the attempt that holds it (no timer runs here to wake it otherwise).
    #[tokio::test]
    async fn the_end_of_an_attempt_wakes_a_worker_waiting_under_a_step_limit() {
        const ONE_AT_A_TIME: &str = r#"
namespace: demo
name: serial
version: 1.0.0
steps:
  - { name: only, handler: external, concurrency: { limit: 1 } }
"#;
        for db in TestDatabase::all(Arc::new(SystemClock)).await {
            db.store
                .register_template(ONE_AT_A_TIME, false)
                .await
                .unwrap();
            let engine = Engine::new(db.store.clone());
            for _ in 0..2 {
                let mut new = new_task();
                new.template = "serial".into();
                engine.create_task(new).await.unwrap();
            }
            let request = ClaimRequest {
                worker_id: "w".into(),
                handlers: vec!["external".into()],
                within: tasker_domain::Within::Any,
                limit: 5,
                lease: Duration::from_secs(60),
            };
            let first = engine.claim(&request, Duration::ZERO).await.unwrap();
            assert_eq!(first.len(), 1, "the limit is one");
            let waiter = {
                let engine = engine.clone();
                let request = request.clone();
                tokio::spawn(async move { engine.claim(&request, Duration::from_secs(20)).await })
            };
            while engine.work_listeners() == 0 {
                tokio::task::yield_now().await;
            }
            engine
                .complete(&[Completion {
                    lease_token: first[0].lease_token,
                    results: json!({}),
                }])
                .await
                .unwrap();
            let second = waiter.await.unwrap().unwrap();
            assert_eq!(
                second.len(),
                1,
                "woken by the completion, not by its deadline"
            );
        }
    }

    /// Runs the maintenance loop until it has finished exactly one task, then stops it.
    async fn sweep_until_a_task_finishes(engine: &Arc<Engine>) {
        let mut finished = engine.finished_tasks();
        let before = *finished.borrow_and_update();
        let (stop, stopped) = watch::channel(false);
        let maintenance = tokio::spawn(engine.clone().run_maintenance(stopped));
        tokio::time::timeout(Duration::from_secs(10), finished.changed())
            .await
            .expect("the sweep ends the task")
            .unwrap();
        assert_eq!(*finished.borrow(), before + 1);
        stop.send(true).unwrap();
        maintenance.await.unwrap();
    }

    /// A task that ends because its last attempt's lease ran out counts as finished, as one
    /// that ends by a recorded outcome does.
    #[tokio::test]
    async fn a_task_ended_by_an_expired_lease_counts_as_finished() {
        let clock = Arc::new(tasker_domain::ManualClock::new(chrono::Utc::now()));
        let db = TestDatabase::sqlite(clock.clone()).await;
        let once = "namespace: demo\nname: once\nversion: 1.0.0\nsteps:\n  - { name: a, handler: remote, retry: { max_attempts: 1 } }\n";
        db.store.register_template(once, false).await.unwrap();
        let engine = Engine::new(db.store.clone());
        let task = NewTask {
            template: "once".into(),
            ..new_task()
        };
        let task = engine.create_task(task).await.unwrap().task;
        let request = ClaimRequest {
            worker_id: "gone".into(),
            handlers: vec!["remote".into()],
            within: tasker_domain::Within::Any,
            limit: 1,
            lease: Duration::from_secs(30),
        };
        assert_eq!(
            engine.claim(&request, Duration::ZERO).await.unwrap().len(),
            1
        );
        clock.advance(chrono::Duration::seconds(31));
        sweep_until_a_task_finishes(&engine).await;
        let ended = engine.store().task(task.id).await.unwrap();
        assert_eq!(ended.state, TaskState::Error);
    }

    /// The maintenance loop ends a task past its timeout, and counts it as finished.
    #[tokio::test]
    async fn the_maintenance_loop_cancels_a_task_past_its_timeout() {
        let clock = Arc::new(tasker_domain::ManualClock::new(chrono::Utc::now()));
        let db = TestDatabase::sqlite(clock.clone()).await;
        let timed = "namespace: demo\nname: timed\nversion: 1.0.0\ntimeout: 1h\nsteps:\n  - { name: a, handler: remote }\n";
        db.store.register_template(timed, false).await.unwrap();
        let engine = Engine::new(db.store.clone());
        let task = NewTask {
            template: "timed".into(),
            ..new_task()
        };
        let task = engine.create_task(task).await.unwrap().task;
        clock.advance(chrono::Duration::minutes(61));
        sweep_until_a_task_finishes(&engine).await;
        let ended = engine.store().task(task.id).await.unwrap();
        assert_eq!(ended.state, TaskState::Cancelled);
    }

    #[tokio::test]
    async fn a_long_poll_returns_as_soon_as_work_appears() {
        let db = TestDatabase::sqlite(Arc::new(SystemClock)).await;
        db.store
            .register_template(FLAKY_CHAIN, false)
            .await
            .unwrap();
        let engine = Engine::new(db.store.clone());
        let request = ClaimRequest {
            worker_id: "external".into(),
            handlers: vec!["noop".into()],
            within: tasker_domain::Within::Any,
            limit: 5,
            lease: Duration::from_secs(30),
        };
        let waiting = {
            let engine = engine.clone();
            let request = request.clone();
            tokio::spawn(async move { engine.claim(&request, Duration::from_secs(50)).await })
        };
        while engine.work_listeners() == 0 {
            tokio::task::yield_now().await;
        }
        engine.create_task(new_task()).await.unwrap();
        let claimed = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the long poll answers when work appears, not at its deadline")
            .unwrap()
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].step.name, "a");
        // With nothing ready and no wait, the answer is immediate and empty.
        assert!(
            engine
                .claim(&request, Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
