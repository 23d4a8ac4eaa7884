//! The request timeout of GraphQL over HTTP, which a long poll may push back. `claimSteps`
//! may wait up to a minute for work, longer than the 30 s a request may otherwise take; the
//! wait is not work, so it comes on top of the timeout. The extra time is granted once per
//! request, up to the longest claim wait: ten aliased claims in one request do not wait ten
//! minutes.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// When a request is stopped.
#[derive(Debug)]
pub(crate) struct Deadline {
    /// The most waiting granted on top of the budget.
    max_wait: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    until: Instant,
    /// Waiting granted so far.
    granted: Duration,
}

impl Deadline {
    /// A deadline `budget` from now, which waits may push back by `max_wait` in all.
    pub(crate) fn after(budget: Duration, max_wait: Duration) -> Deadline {
        Deadline {
            max_wait,
            state: Mutex::new(State {
                until: Instant::now() + budget,
                granted: Duration::ZERO,
            }),
        }
    }

    /// Pushes the deadline back by as much of `wait` as is left to grant; returns that much,
    /// which is how long the caller may wait.
    pub(crate) fn allow_wait(&self, wait: Duration) -> Duration {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let grant = wait.min(self.max_wait.saturating_sub(state.granted));
        state.granted += grant;
        state.until += grant;
        grant
    }

    fn until(&self) -> Instant {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .until
    }

    /// Runs `work` until it ends (`Some`) or the deadline, as it stands then, passes (`None`).
    pub(crate) async fn run<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        let mut work = std::pin::pin!(work);
        loop {
            let until = self.until();
            tokio::select! {
                done = &mut work => return Some(done),
                () = tokio::time::sleep_until(until) => {
                    if self.until() <= Instant::now() {
                        return None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_secs(30);
    const MAX_WAIT: Duration = Duration::from_secs(60);

    fn seconds(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[tokio::test(start_paused = true)]
    async fn work_past_the_budget_is_stopped() {
        let deadline = Deadline::after(BUDGET, MAX_WAIT);
        assert_eq!(deadline.run(tokio::time::sleep(seconds(31))).await, None);
        let deadline = Deadline::after(BUDGET, MAX_WAIT);
        assert_eq!(
            deadline.run(tokio::time::sleep(seconds(29))).await,
            Some(())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_comes_on_top_of_the_budget() {
        let deadline = Deadline::after(BUDGET, MAX_WAIT);
        let claim = async {
            tokio::time::sleep(seconds(10)).await;
            let wait = deadline.allow_wait(seconds(60));
            tokio::time::sleep(wait + seconds(19)).await;
        };
        assert_eq!(
            deadline.run(claim).await,
            Some(()),
            "10 + 60 + 19 < 30 + 60"
        );
        let deadline = Deadline::after(BUDGET, MAX_WAIT);
        let claim = async {
            tokio::time::sleep(seconds(10)).await;
            let wait = deadline.allow_wait(seconds(60));
            tokio::time::sleep(wait + seconds(21)).await;
        };
        assert_eq!(
            deadline.run(claim).await,
            None,
            "the budget still holds around the wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waits_are_granted_once_per_request() {
        let deadline = Deadline::after(BUDGET, MAX_WAIT);
        assert_eq!(deadline.allow_wait(seconds(40)), seconds(40));
        assert_eq!(deadline.allow_wait(seconds(40)), seconds(20));
        assert_eq!(deadline.allow_wait(seconds(40)), Duration::ZERO);
        let requests = async { tokio::time::sleep(seconds(30 + 60 - 1)).await };
        assert_eq!(deadline.run(requests).await, Some(()));
        let deadline = Deadline::after(BUDGET, MAX_WAIT);
        deadline.allow_wait(seconds(60));
        deadline.allow_wait(seconds(60));
        let requests = async { tokio::time::sleep(seconds(30 + 60 + 1)).await };
        assert_eq!(deadline.run(requests).await, None);
    }
}
