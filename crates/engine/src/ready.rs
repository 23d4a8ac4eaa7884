//! Ready-step counts for the workers that wait to be told about work (`stepsAvailable`):
//! after a work signal, one count query serves every waiter of the same filter, however many
//! workers wait.

use crate::Engine;
use futures::Stream;
use std::collections::HashMap;
use std::sync::Arc;
use tasker_domain::Within;

/// Counted up to this many: enough to say "plenty".
const COUNT_CAP: u32 = 1000;
/// Filters remembered at most; beyond, the memory starts over.
const MAX_REMEMBERED_FILTERS: usize = 1024;

/// A waiter's filter: handlers (sorted, distinct) and namespaces.
type ReadyFilter = (Vec<String>, Within);

/// The last count of one filter: the signal generation it was made at, and the count.
type LastCount = Arc<tokio::sync::Mutex<Option<(u64, u64)>>>;

/// Per filter, its last count, behind a lock of its own: waiters on one filter share a
/// count, and waiters on different filters never wait for each other's queries.
#[derive(Debug, Default)]
pub(crate) struct ReadyCounts {
    filters: std::sync::Mutex<HashMap<ReadyFilter, LastCount>>,
}

impl ReadyCounts {
    fn key(mut handlers: Vec<String>, within: Within) -> ReadyFilter {
        handlers.sort();
        handlers.dedup();
        (handlers, within)
    }

    /// The last count of `filter` (held only for the lookup).
    fn last_count(&self, filter: &ReadyFilter) -> LastCount {
        let mut filters = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = filters.get(filter) {
            return last.clone();
        }
        if filters.len() >= MAX_REMEMBERED_FILTERS {
            filters.clear();
        }
        filters.entry(filter.clone()).or_default().clone()
    }

    /// The count for `filter` at `generation`: the one already made for it, unless `fresh`;
    /// otherwise `count` runs (one at a time per filter, so waiters waking together share it).
    async fn count<F, Fut>(
        &self,
        filter: &ReadyFilter,
        generation: u64,
        fresh: bool,
        count: F,
    ) -> tasker_store::Result<u64>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = tasker_store::Result<u64>>,
    {
        let last = self.last_count(filter);
        let mut last = last.lock().await;
        if !fresh
            && let Some((at, ready)) = *last
            && at == generation
        {
            return Ok(ready);
        }
        let ready = count().await?;
        *last = Some((generation, ready));
        Ok(ready)
    }
}

impl Engine {
    /// How many steps for `handlers` (any when empty) within `within` are claimable: once at
    /// the start if some are, then whenever some are after something changed. Counts are capped
    /// at 1,000 and shared by every waiter of the same filter.
    pub fn ready_steps(
        self: &Arc<Self>,
        handlers: Vec<String>,
        within: Within,
    ) -> impl Stream<Item = u64> + Send + 'static + use<> {
        let state = (
            self.clone(),
            self.work_signal(),
            ReadyCounts::key(handlers, within),
            true,
        );
        futures::stream::unfold(
            state,
            |(engine, mut signal, filter, mut first)| async move {
                loop {
                    // Counted afresh at first and on the safety sweep; after a signal, shared
                    // with every waiter alike.
                    let mut fresh = first;
                    if !first {
                        match tokio::time::timeout(crate::SAFETY_SWEEP, signal.changed()).await {
                            Ok(Err(_)) => return None,
                            Ok(Ok(())) => {}
                            Err(_) => fresh = true,
                        }
                    }
                    first = false;
                    let generation = *signal.borrow_and_update();
                    let counted = engine
                        .ready
                        .count(&filter, generation, fresh, || {
                            engine
                                .store
                                .count_ready_steps(&filter.0, &filter.1, COUNT_CAP)
                        })
                        .await;
                    match counted {
                        Ok(0) => {}
                        Ok(ready) => return Some((ready, (engine, signal, filter, first))),
                        Err(err) => {
                            crate::retried("counting ready steps failed", &err);
                        }
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn one_count_per_signal_serves_every_waiter_of_a_filter() {
        let counts = ReadyCounts::default();
        let queries = AtomicUsize::new(0);
        let count = |ready: u64| {
            queries.fetch_add(1, Ordering::SeqCst);
            async move { Ok(ready) }
        };
        let shop = ReadyCounts::key(vec!["b".into(), "a".into()], Within::Any);
        let same = ReadyCounts::key(vec!["a".into(), "b".into(), "a".into()], Within::Any);
        assert_eq!(counts.count(&shop, 1, false, || count(3)).await.unwrap(), 3);
        assert_eq!(counts.count(&same, 1, false, || count(9)).await.unwrap(), 3);
        assert_eq!(
            queries.load(Ordering::SeqCst),
            1,
            "the same filter at the same signal"
        );
        assert_eq!(counts.count(&shop, 2, false, || count(4)).await.unwrap(), 4);
        assert_eq!(counts.count(&shop, 2, true, || count(5)).await.unwrap(), 5);
        let billing = tasker_domain::NamespaceSet::one("billing");
        let other = ReadyCounts::key(vec![], Within::Only(billing));
        assert_eq!(
            counts.count(&other, 2, false, || count(0)).await.unwrap(),
            0
        );
        assert_eq!(
            queries.load(Ordering::SeqCst),
            4,
            "a new signal, a fresh sweep, another filter"
        );
    }

    #[tokio::test]
    async fn a_slow_count_of_one_filter_does_not_hold_up_another() {
        let counts = Arc::new(ReadyCounts::default());
        let (started, counting) = tokio::sync::oneshot::channel::<()>();
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let slow = tokio::spawn({
            let counts = counts.clone();
            async move {
                let filter = ReadyCounts::key(vec!["slow".into()], Within::Any);
                counts
                    .count(&filter, 1, false, || async move {
                        started.send(()).unwrap();
                        held.await.unwrap();
                        Ok(7)
                    })
                    .await
            }
        });
        counting.await.unwrap();
        let fast = ReadyCounts::key(vec!["fast".into()], Within::Any);
        let answered = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            counts.count(&fast, 1, false, || async { Ok(3) }),
        )
        .await;
        assert_eq!(
            answered.unwrap().unwrap(),
            3,
            "not held up by the slow count"
        );
        release.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap(), 7);
    }
}
