//! People's changes to whole tasks and to parts of their graphs: retry, resolve, re-run from a
//! step; and a walk through every path that shows each event of the catalog is emitted.

use crate::{DIAMOND, claim, complete, databases, event_names, order};
use chrono::Duration as Minutes;
use std::collections::BTreeSet;
use std::time::Duration;
use tasker_domain::{EventName, StepState, TaskState, Within};
use tasker_store::{AttemptFailure, ClaimedStep, Error, EventFilter, StepAction, Store};

fn fail_for_good(claimed: &ClaimedStep) -> AttemptFailure {
    AttemptFailure {
        lease_token: claimed.lease_token,
        message: "boom".into(),
        retryable: false,
        retry_after_seconds: None,
    }
}

/// Runs the diamond until `ship` fails for good: the task is in `error`.
async fn failed_diamond(store: &Store, order_id: i64) -> uuid::Uuid {
    let task = store
        .create_task(order("shop", "fulfil", order_id))
        .await
        .unwrap()
        .task;
    loop {
        let claimed = store.claim_steps(&claim(10)).await.unwrap();
        assert!(!claimed.is_empty(), "ship never became claimable");
        if let Some(ship) = claimed.iter().find(|c| c.step.name == "ship") {
            store.fail_step(&fail_for_good(ship)).await.unwrap();
            break;
        }
        complete(store, &claimed).await;
    }
    assert_eq!(store.task(task.id).await.unwrap().state, TaskState::Error);
    task.id
}

#[tokio::test]
async fn rerun_from_a_step_resets_it_and_everything_downstream_in_one_change() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let task_id = failed_diamond(store, 1).await;
        let steps = store.steps_for_tasks(&[task_id]).await.unwrap();
        let step = |name: &str| steps.iter().find(|s| s.name == name).unwrap().id;
        let before = event_names(store, task_id).await.len();

        let rerun = store
            .rerun_from_step(step("reserve"), Some("bad stock data".into()))
            .await
            .unwrap();
        assert_eq!(rerun.task.state, TaskState::InProgress, "{}", db.backend());
        let mut reset: Vec<&str> = rerun.reset.iter().map(|s| s.name.as_str()).collect();
        reset.sort();
        assert_eq!(reset, ["reserve", "ship"]);
        assert!(rerun.reset.iter().all(|s| s.state == StepState::Pending
            && s.attempts == 0
            && s.results.is_none()
            && s.completed_at.is_none()));
        assert_eq!(rerun.ready, 1, "reserve's parent is done; ship waits");
        let now = store.steps_for_tasks(&[task_id]).await.unwrap();
        let state = |name: &str| now.iter().find(|s| s.name == name).unwrap().state;
        assert_eq!(state("validate"), StepState::Complete);
        assert_eq!(state("charge"), StepState::Complete);
        let events = store.events_for_tasks(&[task_id]).await.unwrap();
        let new: Vec<(&str, Option<&str>)> = events[before..]
            .iter()
            .map(|e| (e.name.as_str(), e.payload["step"].as_str()))
            .collect();
        assert_eq!(
            new,
            [
                ("step.retry_requested", Some("reserve")),
                ("step.retry_requested", Some("ship")),
                ("task.steps_ready", None),
                ("task.started", None),
            ]
        );
        assert_eq!(events[before].payload["rerun_from"], "reserve");
        assert_eq!(events[before].payload["from_state"], "COMPLETE");
        assert_eq!(events[before + 1].payload["from_state"], "ERROR");

        // It runs again in order: reserve, then ship, and the task completes.
        let again = store.claim_steps(&claim(10)).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].step.name, "reserve");
        // While reserve runs, re-running from validate is refused.
        let refused = store.rerun_from_step(step("validate"), None).await;
        assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
        complete(store, &again).await;
        let last = store.claim_steps(&claim(10)).await.unwrap();
        assert_eq!(last[0].step.name, "ship");
        complete(store, &last).await;
        assert_eq!(
            store.task(task_id).await.unwrap().state,
            TaskState::Complete
        );

        // A finished task stays finished.
        let refused = store.rerun_from_step(step("ship"), None).await;
        assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
    }
}

#[tokio::test]
async fn a_failed_task_is_retried_or_resolved_by_hand_with_its_events() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let task_id = failed_diamond(store, 1).await;
        let before = event_names(store, task_id).await.len();

        let retried = store
            .retry_task(task_id, Some("fixed".into()))
            .await
            .unwrap();
        assert_eq!(retried.state, TaskState::InProgress);
        let events = store.events_for_tasks(&[task_id]).await.unwrap();
        let request = &events[before];
        assert_eq!(request.name, "task.retry_requested", "{}", db.backend());
        assert_eq!(request.payload["from_state"], "ERROR");
        assert_eq!(request.payload["to_state"], "PENDING");
        assert_eq!(request.payload["steps"], serde_json::json!(["ship"]));
        assert_eq!(request.payload["reason"], "fixed");
        assert_eq!(events.last().unwrap().name, "task.started");
        let transitions = store.task_transitions(&[task_id]).await.unwrap();
        let keys: Vec<i32> = transitions.iter().map(|t| t.sort_key).collect();
        assert_eq!(keys, (1..=keys.len() as i32).collect::<Vec<_>>());

        // Fails again; a person resolves it.
        let ship = store.claim_steps(&claim(10)).await.unwrap();
        store.fail_step(&fail_for_good(&ship[0])).await.unwrap();
        let resolved = store.resolve_task(task_id, None).await.unwrap();
        assert_eq!(resolved.state, TaskState::ResolvedManually);
        assert!(resolved.completed_at.is_some());
        let events = store.events_for_tasks(&[task_id]).await.unwrap();
        assert_eq!(events.last().unwrap().name, "task.resolved_manually");
        assert_eq!(
            events.last().unwrap().payload["to_state"],
            "RESOLVED_MANUALLY"
        );

        // Finished: nothing more changes, by task or by step.
        assert!(matches!(
            store.resolve_task(task_id, None).await,
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            store.retry_task(task_id, None).await,
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            store
                .change_step(ship[0].step.id, StepAction::Retry, None)
                .await,
            Err(Error::Conflict(_))
        ));
    }
}

#[tokio::test]
async fn every_event_in_the_catalog_is_emitted_by_some_path() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        // validate times out after 5 s; charge retries once after a second.
        let template = DIAMOND
            .replace(
                "{ name: validate, handler: noop }",
                "{ name: validate, handler: noop, timeout: 5s }",
            )
            .replace(
                "{ name: charge, handler: noop, depends_on: [validate] }",
                "{ name: charge, handler: noop, depends_on: [validate], retry: { max_attempts: 2, backoff: { base: 1, jitter: 0 } } }",
            );
        store.register_template(&template, false).await.unwrap();

        // A task that times out, loses a lease, backs off, fails, is retried, is resolved.
        let flaky = store
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;
        let first = store.claim_steps(&claim(1)).await.unwrap();
        clock.advance(Minutes::seconds(6));
        store.expire_leases().await.unwrap(); // step.timed_out
        clock.advance(Minutes::seconds(60));
        let again = store.claim_steps(&claim(1)).await.unwrap();
        assert_eq!(again[0].step.id, first[0].step.id);
        clock.advance(Minutes::seconds(1));
        store
            .heartbeat(&[again[0].lease_token], Duration::from_secs(1))
            .await
            .unwrap();
        clock.advance(Minutes::seconds(2));
        store.expire_leases().await.unwrap(); // step.lease_expired
        clock.advance(Minutes::seconds(60));
        let validate = store.claim_steps(&claim(1)).await.unwrap();
        complete(store, &validate).await;
        let middle = store.claim_steps(&claim(10)).await.unwrap();
        let charge = middle.iter().find(|c| c.step.name == "charge").unwrap();
        store
            .fail_step(&AttemptFailure {
                retryable: true,
                ..fail_for_good(charge)
            })
            .await
            .unwrap(); // step.backoff, and task.waiting once reserve is done
        let reserve: Vec<ClaimedStep> = middle
            .iter()
            .filter(|c| c.step.name == "reserve")
            .cloned()
            .collect();
        complete(store, &reserve).await;
        clock.advance(Minutes::seconds(2));
        let charge = store.claim_steps(&claim(10)).await.unwrap();
        store
            .fail_step(&AttemptFailure {
                retryable: true,
                ..fail_for_good(&charge[0])
            })
            .await
            .unwrap(); // step.max_retries_reached, task.failed, task.finalized
        store.retry_task(flaky.id, None).await.unwrap();
        let charge = store.claim_steps(&claim(10)).await.unwrap();
        store.fail_step(&fail_for_good(&charge[0])).await.unwrap();
        store.resolve_task(flaky.id, None).await.unwrap();

        // A task completed by hand and by skipping, and one cancelled.
        let manual = store
            .create_task(order("shop", "fulfil", 2))
            .await
            .unwrap()
            .task;
        let steps = store.steps_for_tasks(&[manual.id]).await.unwrap();
        let step = |name: &str| steps.iter().find(|s| s.name == name).unwrap().id;
        let validate = store.claim_steps(&claim(1)).await.unwrap();
        complete(store, &validate).await;
        store
            .change_step(step("reserve"), StepAction::Skip, None)
            .await
            .unwrap();
        store
            .change_step(
                step("charge"),
                StepAction::Resolve {
                    results: serde_json::json!({}),
                },
                None,
            )
            .await
            .unwrap();
        let ship = store.claim_steps(&claim(1)).await.unwrap();
        store.release_leases(&[ship[0].lease_token]).await.unwrap(); // step.released
        let ship = store.claim_steps(&claim(1)).await.unwrap();
        complete(store, &ship).await;
        assert_eq!(
            store.task(manual.id).await.unwrap().state,
            TaskState::Complete
        );
        let cancelled = store
            .create_task(order("shop", "fulfil", 3))
            .await
            .unwrap()
            .task;
        store.cancel_task(cancelled.id, None).await.unwrap();

        // Two tasks under a concurrency limit of 1: the second waits (task.queued).
        store
            .register_template(
                "namespace: shop\nname: one_at_a_time\nversion: 1.0.0\nconcurrency: { limit: 1 }\nsteps:\n  - { name: only, handler: noop }\n",
                false,
            )
            .await
            .unwrap();
        for n in [4, 5] {
            store
                .create_task(order("shop", "one_at_a_time", n))
                .await
                .unwrap();
        }

        // One task whose step nobody starts in time, one that outlives its timeout.
        store
            .register_template(
                "namespace: shop\nname: timed\nversion: 1.0.0\ntimeout: 1h\nsteps:\n  - { name: only, handler: nobody, start_timeout: 10m }\n",
                false,
            )
            .await
            .unwrap();
        store.create_task(order("shop", "timed", 6)).await.unwrap();
        clock.advance(Minutes::minutes(11));
        store.time_out().await.unwrap(); // step.start_timed_out
        store.create_task(order("shop", "timed", 7)).await.unwrap();
        clock.advance(Minutes::minutes(61));
        store.time_out().await.unwrap(); // task.timed_out

        // A schedule's life: created, fired, paused, resumed, deleted.
        let schedule = tasker_store::NewSchedule {
            namespace: "shop".into(),
            name: "hourly".into(),
            template: "fulfil".into(),
            context: serde_json::json!({ "order_id": 8 }),
            cron: Some("0 * * * *".into()),
            ..tasker_store::NewSchedule::default()
        };
        store.create_schedule(schedule).await.unwrap();
        clock.advance(Minutes::hours(1));
        store.fire_schedules().await.unwrap();
        store.pause_schedule("shop", "hourly", true).await.unwrap();
        store.pause_schedule("shop", "hourly", false).await.unwrap();
        store.delete_schedule("shop", "hourly").await.unwrap();

        let log = store
            .events_page(&EventFilter::within(Within::Any), None, 10_000)
            .await
            .unwrap();
        // Every payload carries only fields its catalog entry lists.
        let undeclared: BTreeSet<(String, String)> = log
            .iter()
            .flat_map(|event| {
                let declared = EventName::parse(&event.name).unwrap().payload_fields();
                event
                    .payload
                    .as_object()
                    .unwrap()
                    .keys()
                    .filter(move |key| !declared.contains(&key.as_str()))
                    .map(|key| (event.name.clone(), key.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(
            undeclared.is_empty(),
            "{}: payload fields missing from the catalog: {undeclared:?}",
            db.backend()
        );
        let emitted: BTreeSet<String> = log.into_iter().map(|event| event.name).collect();
        let catalog: BTreeSet<String> = EventName::ALL
            .iter()
            .map(|name| name.as_str().to_owned())
            .collect();
        let missing: Vec<&String> = catalog.difference(&emitted).collect();
        assert!(
            missing.is_empty(),
            "{}: never emitted: {missing:?}",
            db.backend()
        );
    }
}

/// A person cancels tasks while their running steps complete, many times over: on
/// PostgreSQL the two transactions take the same rows (the step, its children, the task) and
/// must take them in one order, or the database aborts one of them as a deadlock. Each race
/// ends with the task cancelled, or completed first and then refused as a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_task_while_its_steps_complete_never_deadlocks() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let backend = db.backend();
        let store = db.store.clone();
        store
            .register_template(crate::DIAMOND, false)
            .await
            .unwrap();
        for order in 0..40 {
            let task = store
                .create_task(crate::order("shop", "fulfil", order))
                .await
                .unwrap()
                .task;
            let first = store.claim_steps(&claim(1)).await.unwrap();
            crate::complete(&store, &first).await;
            let running = store.claim_steps(&claim(2)).await.unwrap();
            let (completer, canceller) = (store.clone(), store.clone());
            let completion =
                tokio::spawn(async move { crate::complete(&completer, &running).await });
            let cancel = tokio::spawn(async move { canceller.cancel_task(task.id, None).await });
            completion.await.unwrap();
            match cancel.await.unwrap() {
                Ok(cancelled) => assert_eq!(cancelled.state, TaskState::Cancelled),
                Err(Error::Conflict(_)) => {}
                Err(other) => panic!("{backend}: order {order}: {other:?}"),
            }
        }
    }
}
