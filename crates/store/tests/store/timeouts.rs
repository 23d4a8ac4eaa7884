//! Timeouts with an injected clock: a task past its template's timeout is cancelled, a step
//! that waits claimable past its start timeout fails (or is skipped), each with its event.

use crate::{claim, complete, databases, event_names, order};
use chrono::Duration as Minutes;
use tasker_domain::{Clock, StepState, TaskState};

const TIMED: &str = r#"
namespace: ops
name: timed
version: 1.0.0
timeout: 1h
steps:
  - { name: fetch, handler: noop, start_timeout: 10m }
  - { name: enrich, handler: noop, depends_on: [fetch], start_timeout: 5m, skippable: true }
  - { name: store, handler: noop, depends_on: [enrich] }
"#;

#[tokio::test]
async fn a_task_past_its_timeout_is_cancelled() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        store.register_template(TIMED, false).await.unwrap();
        let task = store
            .create_task(order("ops", "timed", 1))
            .await
            .unwrap()
            .task;
        let deadline = task.deadline.unwrap();
        assert_eq!(deadline, clock.now() + Minutes::hours(1));
        let fetch = store.claim_steps(&claim(1)).await.unwrap();
        complete(store, &fetch).await;
        let enrich = store.claim_steps(&claim(1)).await.unwrap();
        assert_eq!(enrich[0].step.name, "enrich");
        // The maintenance loop wakes at the deadline (the lease runs out later).
        let wakeup = store
            .next_wakeup_ms(clock.now().timestamp_millis())
            .await
            .unwrap();
        assert!(
            wakeup.is_some_and(|at| at <= deadline.timestamp_millis()),
            "{backend}"
        );

        clock.advance(Minutes::minutes(59));
        assert!(
            store.time_out().await.unwrap().is_empty(),
            "{backend}: not yet"
        );
        clock.advance(Minutes::minutes(2));
        let report = store.time_out().await.unwrap();
        assert_eq!(report.timed_out_tasks.len(), 1, "{backend}");
        let ended = store.task(task.id).await.unwrap();
        assert_eq!(ended.state, TaskState::Cancelled);
        let steps = store.steps_for_tasks(&[task.id]).await.unwrap();
        assert!(
            steps[1..].iter().all(|s| s.state == StepState::Cancelled),
            "{backend}: the running step and the pending one end with it"
        );
        let names = event_names(store, task.id).await;
        let timed_out = names.iter().position(|n| n == "task.timed_out").unwrap();
        assert_eq!(
            names[timed_out + 1],
            "task.cancelled",
            "{backend}: {names:?}"
        );
        assert!(
            store.time_out().await.unwrap().is_empty(),
            "{backend}: once"
        );
    }
}

#[tokio::test]
async fn a_step_not_started_in_time_fails_or_is_skipped() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        store.register_template(TIMED, false).await.unwrap();

        // Nobody claims `fetch` for 10 minutes: it fails for good, and so does its task.
        let stuck = store
            .create_task(order("ops", "timed", 1))
            .await
            .unwrap()
            .task;
        clock.advance(Minutes::minutes(9));
        assert!(store.time_out().await.unwrap().is_empty(), "{backend}");
        clock.advance(Minutes::minutes(2));
        let report = store.time_out().await.unwrap();
        assert_eq!(report.unstarted_steps.len(), 1, "{backend}");
        let fetch = &report.unstarted_steps[0];
        assert_eq!(fetch.state, StepState::Error);
        assert!(
            fetch
                .last_error
                .as_deref()
                .unwrap()
                .contains("start_timeout is 600 s")
        );
        assert_eq!(report.finished_tasks.len(), 1);
        assert_eq!(report.finished_tasks[0].state, TaskState::Error);
        let names = event_names(store, stuck.id).await;
        let timed_out = names
            .iter()
            .position(|n| n == "step.start_timed_out")
            .unwrap();
        assert_eq!(names[timed_out + 1], "step.failed", "{backend}: {names:?}");

        // `enrich` waits 5 minutes after `fetch` is done: it is skipped, `store` runs.
        let task = store
            .create_task(order("ops", "timed", 2))
            .await
            .unwrap()
            .task;
        let fetch = store.claim_steps(&claim(1)).await.unwrap();
        complete(store, &fetch).await;
        clock.advance(Minutes::minutes(6));
        let report = store.time_out().await.unwrap();
        assert_eq!(
            report
                .unstarted_steps
                .iter()
                .map(|s| (s.name.as_str(), s.state))
                .collect::<Vec<_>>(),
            [("enrich", StepState::Skipped)],
            "{backend}"
        );
        assert_eq!(report.newly_ready, 1, "{backend}: its child");
        let next = store.claim_steps(&claim(5)).await.unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].step.name, "store");
        assert_eq!(next[0].step.task_id, task.id);
        complete(store, &next).await;
        assert_eq!(
            store.task(task.id).await.unwrap().state,
            TaskState::Complete
        );
    }
}

/// A retry is bound by the start timeout too, from its retry time: one nobody starts in time
/// fails for good (the step stays in error, its retry dropped), and so does its task.
#[tokio::test]
async fn a_retry_not_started_in_time_fails_for_good() {
    const RETRIED: &str = r#"
namespace: ops
name: retried
version: 1.0.0
steps:
  - { name: fetch, handler: noop, start_timeout: 10m,
      retry: { max_attempts: 3, backoff: { base: 60, jitter: 0 } } }
"#;
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        store.register_template(RETRIED, false).await.unwrap();
        let task = store
            .create_task(order("ops", "retried", 1))
            .await
            .unwrap()
            .task;
        let first = store.claim_steps(&claim(1)).await.unwrap();
        let failed = store
            .fail_step(&tasker_store::AttemptFailure {
                lease_token: first[0].lease_token,
                message: "upstream 503".into(),
                retryable: true,
                retry_after_seconds: None,
            })
            .await
            .unwrap();
        let retry_at = failed.step.next_attempt_at.unwrap();
        assert_eq!(retry_at, clock.now() + Minutes::minutes(1));
        let wakeups = store
            .next_wakeup_ms((retry_at + Minutes::seconds(1)).timestamp_millis())
            .await
            .unwrap();
        assert_eq!(
            wakeups,
            Some((retry_at + Minutes::minutes(10)).timestamp_millis()),
            "{backend}: the maintenance loop wakes when the retry's wait runs out"
        );
        clock.advance(Minutes::minutes(10));
        assert!(store.time_out().await.unwrap().is_empty(), "{backend}");
        clock.advance(Minutes::minutes(2));
        let report = store.time_out().await.unwrap();
        assert_eq!(report.unstarted_steps.len(), 1, "{backend}");
        let fetch = &report.unstarted_steps[0];
        assert_eq!(fetch.state, StepState::Error);
        assert_eq!(
            fetch.next_attempt_at, None,
            "{backend}: the retry is dropped"
        );
        assert!(
            fetch
                .last_error
                .as_deref()
                .unwrap()
                .contains("its retry (attempt 2) waited 660 s"),
            "{:?}",
            fetch.last_error
        );
        assert_eq!(report.finished_tasks.len(), 1, "{backend}");
        assert_eq!(report.finished_tasks[0].state, TaskState::Error);
        let names = event_names(store, task.id).await;
        assert!(names.contains(&"step.start_timed_out".to_owned()));
        assert!(store.claim_steps(&claim(1)).await.unwrap().is_empty());
    }
}
