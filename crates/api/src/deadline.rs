//! The request timeout of GraphQL over HTTP, which a long poll may push back. `claimSteps`
//! may wait up to a minute for work, longer than the 30 s a request may otherwise take; the
//! wait is not work, so the claim extends the deadline by its wait and the request keeps its
//! whole budget for what it does after.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// When a request is stopped.
#[derive(Debug)]
pub(crate) struct Deadline {
    /// What a request may take besides waiting.
    budget: Duration,
    until: Mutex<Instant>,
}

impl Deadline {
    /// A deadline `budget` from now.
    pub(crate) fn after(budget: Duration) -> Deadline {
        Deadline {
            budget,
            until: Mutex::new(Instant::now() + budget),
        }
    }

    /// Makes room for a wait of `wait` starting now, with the whole budget after it.
    pub(crate) fn allow_wait(&self, wait: Duration) {
        let later = Instant::now() + wait + self.budget;
        let mut until = self
            .until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if later > *until {
            *until = later;
        }
    }

    fn until(&self) -> Instant {
        *self
            .until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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

    #[tokio::test(start_paused = true)]
    async fn work_past_the_budget_is_stopped() {
        let deadline = Deadline::after(Duration::from_secs(30));
        let slow = tokio::time::sleep(Duration::from_secs(31));
        assert_eq!(deadline.run(slow).await, None);
        let deadline = Deadline::after(Duration::from_secs(30));
        let quick = tokio::time::sleep(Duration::from_secs(29));
        assert_eq!(deadline.run(quick).await, Some(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_pushes_the_deadline_back_by_itself() {
        let deadline = Deadline::after(Duration::from_secs(30));
        let claim = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            deadline.allow_wait(Duration::from_secs(60));
            // The wait, then work within the budget.
            tokio::time::sleep(Duration::from_secs(60 + 29)).await;
        };
        assert_eq!(deadline.run(claim).await, Some(()));
        let deadline = Deadline::after(Duration::from_secs(30));
        let claim = async {
            deadline.allow_wait(Duration::from_secs(60));
            tokio::time::sleep(Duration::from_secs(60 + 31)).await;
        };
        assert_eq!(
            deadline.run(claim).await,
            None,
            "the budget still holds after the wait"
        );
    }
}
