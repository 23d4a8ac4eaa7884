//! Execution rules: what a failed attempt leads to, and where a task stands (its execution
//! status, whether it is finished) given the states of its steps.

use crate::graph::Dag;
use crate::state::{StepState, TaskState};
use crate::template::Backoff;

/// What a step looks like to the execution rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    pub state: StepState,
    /// For a step in `error`: when it may run again; `None` means the failure is final.
    pub next_attempt_ms: Option<i64>,
    /// What holds it back even when ready: a spent rate limit, or a full step concurrency
    /// limit.
    pub held: Option<Hold>,
}

/// What holds back a step that is otherwise ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Its rate limit is spent until its next start.
    RateLimit,
    /// Its concurrency limit's attempts are all running.
    ConcurrencySlot,
}

impl StepProgress {
    fn done(&self) -> bool {
        self.state.satisfies_dependency()
    }

    fn failed_for_good(&self) -> bool {
        self.state == StepState::Error && self.next_attempt_ms.is_none()
    }
}

/// Where a task's execution stands, for people and dashboards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionStatus {
    /// At least one step can be claimed now.
    HasReadySteps,
    /// Steps are running and nothing else can start yet.
    Processing,
    /// Nothing runs; failed steps wait for their retry time.
    WaitingForRetry,
    /// A step failed for good and nothing else can run.
    BlockedByFailures,
    /// Every step is complete, skipped or resolved.
    AllComplete,
    /// Nothing can run and nothing failed: the remaining steps were cancelled.
    Halted,
    /// The task waits for a concurrency slot: its key's (nothing of it runs until one frees),
    /// or, with nothing else to start, a step's concurrency limit's.
    WaitingForConcurrencySlot,
    /// Steps are ready but their rate limit is spent, and nothing else can start: they start
    /// as the limit frees.
    WaitingForRateLimit,
}

/// The status of a task from its steps (in DAG order) at `now_ms`.
pub fn execution_status(steps: &[StepProgress], dag: &Dag, now_ms: i64) -> ExecutionStatus {
    if steps.iter().all(StepProgress::done) {
        return ExecutionStatus::AllComplete;
    }
    let ready = |(i, step): &(usize, &StepProgress)| match step.state {
        StepState::Pending => dag.parents(*i).iter().all(|&p| steps[p].done()),
        StepState::Error => step.next_attempt_ms.is_some_and(|at| at <= now_ms),
        _ => false,
    };
    let (held, free): (Vec<_>, Vec<_>) = steps
        .iter()
        .enumerate()
        .filter(ready)
        .partition(|(_, step)| step.held.is_some());
    if !free.is_empty() {
        ExecutionStatus::HasReadySteps
    } else if held
        .iter()
        .any(|(_, step)| step.held == Some(Hold::RateLimit))
    {
        ExecutionStatus::WaitingForRateLimit
    } else if !held.is_empty() {
        ExecutionStatus::WaitingForConcurrencySlot
    } else if steps.iter().any(|s| s.state == StepState::InProgress) {
        ExecutionStatus::Processing
    } else if steps
        .iter()
        .any(|s| s.state == StepState::Error && s.next_attempt_ms.is_some())
    {
        ExecutionStatus::WaitingForRetry
    } else if steps.iter().any(StepProgress::failed_for_good) {
        ExecutionStatus::BlockedByFailures
    } else {
        ExecutionStatus::Halted
    }
}

/// The state a running task should move to now, if any: complete when every step is done,
/// error when a step failed for good and nothing else can run or wait for a retry.
pub fn task_outcome(steps: &[StepProgress], dag: &Dag) -> Option<TaskState> {
    match execution_status(steps, dag, i64::MIN) {
        ExecutionStatus::AllComplete => Some(TaskState::Complete),
        // With time at its minimum, a scheduled retry never counts as ready: it only counts
        // as waiting, which keeps the task running.
        ExecutionStatus::BlockedByFailures => Some(TaskState::Error),
        _ => None,
    }
}

/// The share of steps that are done, 0 to 100.
pub fn completion_percentage(steps: &[StepProgress]) -> f64 {
    if steps.is_empty() {
        return 100.0;
    }
    let done = steps.iter().filter(|s| s.done()).count();
    (done as f64 * 100.0 / steps.len() as f64 * 10.0).round() / 10.0
}

/// A failed attempt, as the rules need to see it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// Attempts made, this one included.
    pub attempts: u32,
    pub max_attempts: u32,
    /// The step's policy allows retries.
    pub step_retryable: bool,
    /// The failure itself may be retried (a 404 may not; a timeout may).
    pub failure_retryable: bool,
    pub skippable: bool,
    pub backoff: &'a Backoff,
    /// The handler's own wait (Retry-After), in seconds, which wins over the backoff.
    pub retry_after_seconds: Option<f64>,
}

/// What a failed attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FailureOutcome {
    /// Back to `error`, claimable again at this time (epoch ms).
    RetryAt(i64),
    /// Attempts are used up (or the failure is final) and the step is skippable.
    Skip,
    /// The failure is final: `error` with no retry.
    Fail,
}

impl Failure<'_> {
    /// `unit_sample` in `[0, 1)` draws the jitter.
    pub fn outcome(&self, now_ms: i64, unit_sample: f64) -> FailureOutcome {
        let may_retry =
            self.step_retryable && self.failure_retryable && self.attempts < self.max_attempts;
        if may_retry {
            let seconds = match self.retry_after_seconds {
                Some(wait) if wait.is_finite() && wait >= 0.0 => {
                    wait.min(crate::template::MAX_SECONDS)
                }
                _ => self.backoff.delay_seconds(self.attempts, unit_sample),
            };
            FailureOutcome::RetryAt(now_ms.saturating_add((seconds * 1000.0).round() as i64))
        } else if self.skippable {
            FailureOutcome::Skip
        } else {
            FailureOutcome::Fail
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepState::*;

    fn step(state: StepState) -> StepProgress {
        StepProgress {
            state,
            next_attempt_ms: None,
            held: None,
        }
    }

    fn throttled(state: StepState) -> StepProgress {
        StepProgress {
            held: Some(Hold::RateLimit),
            ..step(state)
        }
    }

    fn retrying(at: i64) -> StepProgress {
        StepProgress {
            state: Error,
            next_attempt_ms: Some(at),
            held: None,
        }
    }

    fn chain(n: usize) -> Dag {
        Dag::new(n, (1..n).map(|i| (i - 1, i)))
    }

    #[test]
    fn statuses_of_a_chain() {
        let dag = chain(3);
        let status = |steps: [StepProgress; 3], now| execution_status(&steps, &dag, now);
        assert_eq!(
            status([step(Pending), step(Pending), step(Pending)], 0),
            ExecutionStatus::HasReadySteps
        );
        assert_eq!(
            status([step(InProgress), step(Pending), step(Pending)], 0),
            ExecutionStatus::Processing
        );
        assert_eq!(
            status([step(Complete), step(Pending), step(Pending)], 0),
            ExecutionStatus::HasReadySteps
        );
        assert_eq!(
            status([retrying(10), step(Pending), step(Pending)], 5),
            ExecutionStatus::WaitingForRetry
        );
        assert_eq!(
            status([retrying(10), step(Pending), step(Pending)], 10),
            ExecutionStatus::HasReadySteps
        );
        assert_eq!(
            status([step(Error), step(Pending), step(Pending)], 0),
            ExecutionStatus::BlockedByFailures
        );
        assert_eq!(
            status([step(Complete), step(Skipped), step(ResolvedManually)], 0),
            ExecutionStatus::AllComplete
        );
        assert_eq!(
            status([step(Cancelled), step(Cancelled), step(Cancelled)], 0),
            ExecutionStatus::Halted
        );
    }

    #[test]
    fn ready_steps_of_a_spent_rate_limit_wait_for_it_unless_others_can_start() {
        let parallel = Dag::new(3, []);
        let status = |steps: [StepProgress; 3]| execution_status(&steps, &parallel, 0);
        assert_eq!(
            status([throttled(Pending), step(InProgress), step(Complete)]),
            ExecutionStatus::WaitingForRateLimit
        );
        assert_eq!(
            status([throttled(Pending), step(Pending), step(Complete)]),
            ExecutionStatus::HasReadySteps
        );
        let full = StepProgress {
            held: Some(Hold::ConcurrencySlot),
            ..step(Pending)
        };
        assert_eq!(
            status([full, step(InProgress), step(Complete)]),
            ExecutionStatus::WaitingForConcurrencySlot
        );
        assert_eq!(
            status([full, throttled(Error), step(Complete)]),
            ExecutionStatus::WaitingForConcurrencySlot,
            "a failed step without a retry is not ready: only the full limit holds"
        );
        assert_eq!(
            status([full, throttled(Pending), step(Complete)]),
            ExecutionStatus::WaitingForRateLimit
        );
        let dag = chain(3);
        assert_eq!(
            execution_status(
                &[step(InProgress), throttled(Pending), step(Pending)],
                &dag,
                0
            ),
            ExecutionStatus::Processing,
            "a throttled step whose parents run is not waiting for its limit yet"
        );
        assert_eq!(
            task_outcome(
                &[throttled(Pending), step(Error), step(Complete)],
                &parallel
            ),
            None,
            "a task with a step waiting for its limit is not blocked"
        );
    }

    #[test]
    fn a_task_fails_only_when_nothing_else_can_run() {
        // A diamond: 0 -> {1, 2} -> 3. Step 1 failed for good while 2 still runs.
        let dag = Dag::new(4, [(0, 1), (0, 2), (1, 3), (2, 3)]);
        let running = [step(Complete), step(Error), step(InProgress), step(Pending)];
        assert_eq!(task_outcome(&running, &dag), None);
        let finished = [step(Complete), step(Error), step(Complete), step(Pending)];
        assert_eq!(task_outcome(&finished, &dag), Some(TaskState::Error));
        let waiting = [step(Complete), retrying(99), step(Complete), step(Pending)];
        assert_eq!(task_outcome(&waiting, &dag), None);
        let done = [
            step(Complete),
            step(Skipped),
            step(Complete),
            step(Complete),
        ];
        assert_eq!(task_outcome(&done, &dag), Some(TaskState::Complete));
        assert_eq!(completion_percentage(&finished), 50.0);
        assert_eq!(completion_percentage(&done), 100.0);
    }

    #[test]
    fn failures_retry_with_backoff_then_skip_or_fail() {
        let backoff = Backoff {
            base: 2.0,
            factor: 2.0,
            max: 60.0,
            jitter: 0.0,
        };
        let failure = Failure {
            attempts: 2,
            max_attempts: 3,
            step_retryable: true,
            failure_retryable: true,
            skippable: false,
            backoff: &backoff,
            retry_after_seconds: None,
        };
        assert_eq!(failure.outcome(1_000, 0.5), FailureOutcome::RetryAt(5_000));
        let after = Failure {
            retry_after_seconds: Some(30.0),
            ..failure
        };
        assert_eq!(after.outcome(1_000, 0.5), FailureOutcome::RetryAt(31_000));
        let last = Failure {
            attempts: 3,
            ..failure
        };
        assert_eq!(last.outcome(0, 0.5), FailureOutcome::Fail);
        assert_eq!(
            Failure {
                skippable: true,
                ..last
            }
            .outcome(0, 0.5),
            FailureOutcome::Skip
        );
        let permanent = Failure {
            failure_retryable: false,
            ..failure
        };
        assert_eq!(permanent.outcome(0, 0.5), FailureOutcome::Fail);
        let once = Failure {
            attempts: 1,
            max_attempts: 1,
            step_retryable: false,
            ..failure
        };
        assert_eq!(once.outcome(0, 0.5), FailureOutcome::Fail);
    }
}
