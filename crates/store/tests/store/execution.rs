//! Claiming, leases, completion, failure, retries and task finishing, with a manual clock.

use crate::{DIAMOND, claim, complete, databases, order, sqlite_with_diamond};
use chrono::Duration as Minutes;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;
use tasker_domain::{Clock, StepState, TaskState};
use tasker_domain::{NamespaceSet, Within};
use tasker_store::{
    AttemptFailure, ClaimRequest, ClaimedStep, Completion, Error, Store, TaskFilter,
};

fn names(claimed: &[ClaimedStep]) -> Vec<String> {
    let mut names: Vec<String> = claimed.iter().map(|c| c.step.name.clone()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_diamond_runs_in_dependency_order_and_completes_its_task() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let task = store
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;

        let first = store.claim_steps(&claim(10)).await.unwrap();
        assert_eq!(names(&first), ["validate"], "{}", db.backend());
        assert_eq!(first[0].step.attempts, 1);
        assert_eq!(first[0].step.state, StepState::InProgress);
        assert_eq!(
            store.task(task.id).await.unwrap().state,
            TaskState::InProgress
        );
        assert!(store.claim_steps(&claim(10)).await.unwrap().is_empty());

        let report = complete(store, &first).await;
        assert_eq!(report.completed.len(), 1);
        assert_eq!(report.newly_ready, 2);
        let middle = store.claim_steps(&claim(10)).await.unwrap();
        assert_eq!(names(&middle), ["charge", "reserve"]);
        let inputs = store.step_inputs(&[middle[0].step.clone()]).await.unwrap();
        let input = &inputs[&middle[0].step.id];
        assert_eq!(input.context, json!({ "order_id": 1 }));
        assert_eq!(
            input.parent_results["validate"],
            json!({ "done": "validate" })
        );

        complete(store, &middle).await;
        let last = store.claim_steps(&claim(10)).await.unwrap();
        assert_eq!(names(&last), ["ship"]);
        let report = complete(store, &last).await;
        assert_eq!(report.finished_tasks.len(), 1);
        assert_eq!(report.finished_tasks[0].state, TaskState::Complete);

        let transitions = store.task_transitions(&[task.id]).await.unwrap();
        let states: Vec<_> = transitions.iter().map(|t| t.to_state).collect();
        assert_eq!(
            states,
            [
                TaskState::Pending,
                TaskState::InProgress,
                TaskState::Complete
            ]
        );
        let steps = store.steps_for_tasks(&[task.id]).await.unwrap();
        assert!(steps.iter().all(|s| s.state == StepState::Complete));
        let ids: Vec<_> = steps.iter().map(|s| s.id).collect();
        let step_transitions = store.step_transitions(&ids).await.unwrap();
        assert_eq!(
            step_transitions.len(),
            12,
            "created, started, completed per step"
        );
        let events = store.events_for_tasks(&[task.id]).await.unwrap();
        let count = |name: &str| events.iter().filter(|e| e.name == name).count();
        assert_eq!(
            (
                count("task.started"),
                count("step.started"),
                count("step.completed"),
                count("task.completed")
            ),
            (1, 4, 4, 1)
        );
        let ready: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e.name == "task.steps_ready")
            .map(|e| &e.payload["steps"])
            .collect();
        assert_eq!(
            ready,
            [
                &json!(["validate"]),
                &json!(["reserve", "charge"]),
                &json!(["ship"])
            ],
            "each step is announced once, when its last parent finishes"
        );
        let summary = events.last().unwrap();
        assert_eq!(summary.name, "task.finalized");
        assert_eq!(summary.payload["outcome"], "COMPLETE");
        assert_eq!(summary.payload["steps_done"], 4);
        assert_eq!(count("task.waiting"), 0);
    }
}

/// SQLite 3.51 plans with the value bound to a `LIMIT ?` unless told not to, and then compiles
/// the statement again each time the value is bound: the claim was prepared anew on every
/// execution. The store's connection plans without bound values.
#[tokio::test]
async fn sqlite_plans_do_not_depend_on_bound_values() {
    let db = sqlite_with_diamond().await;
    assert!(db.sqlite_plans_are_stable().await);
}

/// SQLite's planner, left to choose, walked every unfinished task to find the ready steps, so
/// a claim for built-in handlers cost as much as the tasks waiting for external workers. The
/// steps come first, through the readiness index, whatever the tasks hold. (PostgreSQL plans
/// from statistics; the query is the same there.)
#[tokio::test]
async fn sqlite_reads_ready_steps_through_the_readiness_index_before_their_tasks() {
    let db = sqlite_with_diamond().await;
    let store = &db.store;
    for n in 0..50 {
        store.create_task(order("shop", "fulfil", n)).await.unwrap();
    }
    for handlers in [vec!["noop".to_owned(), "http".to_owned()], Vec::new()] {
        let plan = db.ready_steps_plan(&handlers).await;
        assert!(
            plan.first()
                .is_some_and(|line| line.contains("s USING INDEX ix_steps_ready")),
            "handlers {handlers:?}: {plan:?}"
        );
        assert!(
            plan.iter().any(|line| line.starts_with("SEARCH t ")),
            "tasks are looked up by id: {plan:?}"
        );
    }
}

#[tokio::test]
async fn a_lease_fences_a_worker_that_lost_it() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        store.create_task(order("shop", "fulfil", 1)).await.unwrap();
        let claimed = store.claim_steps(&claim(1)).await.unwrap();
        let token = claimed[0].lease_token;
        assert_eq!(
            store.lease_namespaces(&[token]).await.unwrap()[&token],
            "shop"
        );
        assert_eq!(
            store.step_namespace(claimed[0].step.id).await.unwrap(),
            "shop"
        );
        let missing = store.step_namespace(uuid::Uuid::now_v7()).await;
        assert!(matches!(missing, Err(Error::NotFound { what: "step", .. })));

        // A heartbeat keeps it; past its expiry the worker has lost it.
        clock.advance(Minutes::seconds(20));
        let alive = store
            .heartbeat(&[token], Duration::from_secs(30))
            .await
            .unwrap();
        assert!(alive.contains_key(&token));
        clock.advance(Minutes::seconds(31));
        assert!(
            store
                .heartbeat(&[token], Duration::from_secs(30))
                .await
                .unwrap()
                .is_empty()
        );
        let report = complete(store, &claimed).await;
        assert!(report.completed.is_empty());
        assert_eq!(report.lost, vec![token]);
        assert!(matches!(
            store
                .fail_step(&AttemptFailure {
                    lease_token: token,
                    message: "late".into(),
                    retryable: true,
                    retry_after_seconds: None
                })
                .await,
            Err(Error::LeaseLost)
        ));

        // The reaper turns the expired lease into a retryable failure with backoff.
        let expired = store.expire_leases().await.unwrap();
        assert_eq!(expired.len(), 1);
        assert!(!expired[0].timed_out, "its lease ran out");
        let events = store
            .events_for_tasks(&[claimed[0].step.task_id])
            .await
            .unwrap();
        let tail: Vec<&str> = events
            .iter()
            .rev()
            .take(4)
            .rev()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            tail,
            [
                "step.lease_expired",
                "step.failed",
                "step.backoff",
                "task.waiting"
            ],
            "nothing else can run until the retry time"
        );
        let step = store.step(claimed[0].step.id).await.unwrap();
        assert_eq!(step.state, StepState::Error);
        assert!(
            step.last_error
                .as_deref()
                .unwrap()
                .contains("lease expired")
        );
        assert!(
            store.claim_steps(&claim(1)).await.unwrap().is_empty(),
            "backoff not yet elapsed"
        );
        let now = clock.now().timestamp_millis();
        assert_eq!(
            store.next_wakeup_ms(now).await.unwrap(),
            step.next_attempt_at.map(|at| at.timestamp_millis())
        );
        clock.advance(Minutes::seconds(2));
        let again = store.claim_steps(&claim(1)).await.unwrap();
        assert_eq!(again[0].step.id, claimed[0].step.id);
        assert_eq!(again[0].step.attempts, 2);
        assert_ne!(again[0].lease_token, token);
        // The old token still cannot complete the new attempt.
        assert_eq!(complete(store, &claimed).await.lost, vec![token]);
        assert_eq!(complete(store, &again).await.completed.len(), 1);
    }
}

#[tokio::test]
async fn failures_retry_then_fail_the_task_or_skip_and_let_dependents_run() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let template = DIAMOND
            .replace("name: fulfil", "name: flaky")
            .replace(
                "{ name: charge, handler: noop, depends_on: [validate] }",
                "{ name: charge, handler: noop, depends_on: [validate], retry: { max_attempts: 2, backoff: { base: 1, jitter: 0 } } }",
            )
            .replace(
                "{ name: reserve, handler: noop, depends_on: [validate] }",
                "{ name: reserve, handler: noop, depends_on: [validate], skippable: true, retry: { retryable: false } }",
            );
        store.register_template(&template, false).await.unwrap();
        let task = store
            .create_task(order("shop", "flaky", 1))
            .await
            .unwrap()
            .task;
        let root = store.claim_steps(&claim(10)).await.unwrap();
        complete(store, &root).await;
        let middle = store.claim_steps(&claim(10)).await.unwrap();
        let by_name = |name: &str| {
            middle
                .iter()
                .find(|c| c.step.name == name)
                .unwrap()
                .lease_token
        };
        let fail = |token, retryable| AttemptFailure {
            lease_token: token,
            message: "boom".into(),
            retryable,
            retry_after_seconds: None,
        };

        // reserve: one attempt only, skippable: skipped at once.
        let skipped = store
            .fail_step(&fail(by_name("reserve"), true))
            .await
            .unwrap();
        assert_eq!(skipped.step.state, StepState::Skipped);
        assert_eq!(skipped.newly_ready, 0, "ship still waits for charge");

        // charge: retried once after its backoff, then fails for good.
        let failed = store
            .fail_step(&fail(by_name("charge"), true))
            .await
            .unwrap();
        assert_eq!(failed.step.state, StepState::Error);
        assert!(failed.step.next_attempt_at.is_some());
        assert!(failed.finished_task.is_none());
        let events = store.events_for_tasks(&[task.id]).await.unwrap();
        let waiting = events.last().unwrap();
        assert_eq!(
            waiting.name, "task.waiting",
            "ship waits for charge's retry"
        );
        assert_eq!(
            waiting.payload["retry_at_ms"],
            failed.step.next_attempt_at.unwrap().timestamp_millis()
        );
        clock.advance(Minutes::seconds(1));
        let retry = store.claim_steps(&claim(10)).await.unwrap();
        assert_eq!(names(&retry), ["charge"]);
        let last = store
            .fail_step(&fail(retry[0].lease_token, true))
            .await
            .unwrap();
        assert_eq!(last.step.state, StepState::Error);
        assert!(last.step.next_attempt_at.is_none());
        let finished = last.finished_task.expect("the task fails");
        let events = store.events_for_tasks(&[task.id]).await.unwrap();
        let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "step.max_retries_reached")
                .count(),
            1
        );
        assert_eq!(names[names.len() - 2..], ["task.failed", "task.finalized"]);
        let summary = &events.last().unwrap().payload;
        assert_eq!(summary["outcome"], "ERROR");
        assert_eq!(
            (
                &summary["steps_total"],
                &summary["steps_done"],
                &summary["steps_failed"]
            ),
            (&json!(4), &json!(2), &json!(1)),
            "validate complete and reserve skipped; charge failed; ship never ran"
        );
        assert_eq!(finished.state, TaskState::Error);
        assert_eq!(store.task(task.id).await.unwrap().state, TaskState::Error);
        assert!(store.claim_steps(&claim(10)).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_skipped_step_lets_its_dependents_run() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let template = DIAMOND.replace(
            "{ name: validate, handler: noop }",
            "{ name: validate, handler: noop, skippable: true, retry: { retryable: false } }",
        );
        store.register_template(&template, false).await.unwrap();
        store.create_task(order("shop", "fulfil", 1)).await.unwrap();
        let root = store.claim_steps(&claim(10)).await.unwrap();
        let report = store
            .fail_step(&AttemptFailure {
                lease_token: root[0].lease_token,
                message: "HTTP 404".into(),
                retryable: false,
                retry_after_seconds: None,
            })
            .await
            .unwrap();
        assert_eq!(report.step.state, StepState::Skipped);
        assert_eq!(report.newly_ready, 2);
        assert_eq!(
            names(&store.claim_steps(&claim(10)).await.unwrap()),
            ["charge", "reserve"]
        );
    }
}

#[tokio::test]
async fn an_attempt_past_its_timeout_fails_even_with_heartbeats() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let template = DIAMOND.replace(
            "{ name: validate, handler: noop }",
            "{ name: validate, handler: noop, timeout: 5s }",
        );
        store.register_template(&template, false).await.unwrap();
        store.create_task(order("shop", "fulfil", 1)).await.unwrap();
        let claimed = store.claim_steps(&claim(1)).await.unwrap();
        clock.advance(Minutes::seconds(4));
        store
            .heartbeat(&[claimed[0].lease_token], Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(store.expire_leases().await.unwrap().len(), 0);
        clock.advance(Minutes::seconds(2));
        let expired = store.expire_leases().await.unwrap();
        assert_eq!(expired.len(), 1);
        assert!(expired[0].timed_out, "past its timeout, not its lease");
        let step = store.step(claimed[0].step.id).await.unwrap();
        assert_eq!(step.state, StepState::Error);
        assert!(step.last_error.unwrap().contains("timed out after 5 s"));
    }
}

#[tokio::test]
async fn cancelled_tasks_and_foreign_handlers_are_not_claimed() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let cancelled = store
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;
        store.cancel_task(cancelled.id, None).await.unwrap();
        let other = ClaimRequest {
            handlers: vec!["payments.charge".into()],
            ..claim(10)
        };
        store.create_task(order("shop", "fulfil", 2)).await.unwrap();
        assert!(store.claim_steps(&other).await.unwrap().is_empty());
        let elsewhere = ClaimRequest {
            within: only("billing"),
            ..claim(10)
        };
        assert!(store.claim_steps(&elsewhere).await.unwrap().is_empty());
        let claimed = store.claim_steps(&claim(10)).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_ne!(claimed[0].step.task_id, cancelled.id);
    }
}

/// A lease carries what the work logs and traces with: the task's correlation id and the
/// trace context its creator stored (in the first claim, which starts the task, and later).
#[tokio::test]
async fn a_lease_carries_its_tasks_correlation_id_and_trace_context() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut traced = order("shop", "fulfil", 1);
        traced.trace_parent = Some(traceparent.into());
        traced.request.correlation_id = Some("ci-run-7".into());
        let traced = store.create_task(traced).await.unwrap().task;
        assert_eq!(traced.trace_parent.as_deref(), Some(traceparent));
        let plain = store
            .create_task(order("shop", "fulfil", 2))
            .await
            .unwrap()
            .task;
        // validate, then reserve and charge, of each task
        for expected in [2, 4] {
            let claimed = store.claim_steps(&claim(10)).await.unwrap();
            assert_eq!(claimed.len(), expected);
            for lease in &claimed {
                if lease.step.task_id == traced.id {
                    assert_eq!(lease.trace_parent.as_deref(), Some(traceparent));
                    assert_eq!(lease.correlation_id, "ci-run-7");
                } else {
                    assert_eq!(lease.trace_parent, None);
                    assert_eq!(lease.correlation_id, plain.id.to_string());
                }
            }
            complete(store, &claimed).await;
        }
    }
}

/// Claiming a batch costs the same few statements whatever its size.
#[tokio::test]
async fn claiming_and_completing_cost_a_constant_number_of_statements() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let mut costs = Vec::new();
        for batch in [5, 50] {
            // Each round in its own namespace, so both rounds have the same shape.
            let namespace = format!("round{batch}");
            let template = DIAMOND.replace("namespace: shop", &format!("namespace: {namespace}"));
            store.register_template(&template, false).await.unwrap();
            for i in 0..batch {
                store
                    .create_task(order(&namespace, "fulfil", i))
                    .await
                    .unwrap();
            }
            let request = ClaimRequest {
                within: only(&namespace),
                ..claim(batch as u32)
            };
            let before = store.statement_count();
            let claimed = store.claim_steps(&request).await.unwrap();
            let claim_cost = store.statement_count() - before;
            assert_eq!(claimed.len(), batch as usize);
            let before = store.statement_count();
            complete(store, &claimed).await;
            let complete_cost = store.statement_count() - before;
            println!(
                "{}: claiming {batch} steps: {claim_cost} statements (one claim statement); completing them: {complete_cost}",
                db.backend()
            );
            costs.push((claim_cost, complete_cost));
        }
        assert_eq!(costs[0], costs[1], "{}", db.backend());
    }
}

/// On SQLite a write transaction goes to the driver's thread as scripts: a task's creation is
/// one command (`BEGIN`, its rows, `COMMIT`) after the read of its template's version stamp,
/// a claim that starts a task three (`BEGIN` with the claim; the task's start; its transition
/// and event rows with `COMMIT`).
#[tokio::test]
async fn sqlite_sends_a_creation_as_two_commands_and_a_claim_as_three() {
    let db = sqlite_with_diamond().await;
    let store = &db.store;
    // The first creation reads the template; the next ones find it parsed.
    store.create_task(order("shop", "fulfil", 0)).await.unwrap();
    let before = store.round_trip_count();
    let task = store.create_task(order("shop", "fulfil", 1)).await.unwrap();
    assert_eq!(store.round_trip_count() - before, 2, "creation");
    let before = store.round_trip_count();
    let claimed = store.claim_steps(&claim(1)).await.unwrap();
    assert_eq!(store.round_trip_count() - before, 3, "claim");
    assert_eq!(claimed.len(), 1);
    // What the scripts wrote is there: the task started, and its events are in the log.
    let claimed_task = store.task(claimed[0].step.task_id).await.unwrap();
    assert_eq!(claimed_task.state, TaskState::InProgress);
    let events = store.events_for_tasks(&[task.task.id]).await.unwrap();
    assert!(
        events.iter().any(|event| event.name == "task.created"),
        "{events:?}"
    );
}

/// On SQLite a claim that completes what it claimed, in a task already running, is three
/// commands: `BEGIN` with the claim; the completion with the release of the children and the
/// count of the task's steps; the transition and event rows with `COMMIT`.
#[tokio::test]
async fn sqlite_claims_and_completes_in_three_commands() {
    let db = sqlite_with_diamond().await;
    let store = &db.store;
    store.create_task(order("shop", "fulfil", 1)).await.unwrap();
    let (_, first) = store
        .claim_and_complete(&claim(10), |_| Some(json!({})))
        .await
        .unwrap();
    assert_eq!(first.newly_ready, 2, "reserve and charge");
    let before = store.round_trip_count();
    let (left, second) = store
        .claim_and_complete(&claim(10), |_| Some(json!({})))
        .await
        .unwrap();
    assert_eq!(store.round_trip_count() - before, 3);
    assert!(left.is_empty());
    assert_eq!(second.completed.len(), 2, "reserve and charge");
    assert_eq!(second.newly_ready, 1, "ship");
}

/// Many workers claiming at once never share a step.
#[tokio::test]
async fn concurrent_claims_never_lease_a_step_twice() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = db.store.clone();
        store.register_template(DIAMOND, false).await.unwrap();
        for i in 0..100 {
            store.create_task(order("shop", "fulfil", i)).await.unwrap();
        }
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let request = ClaimRequest {
                            worker_id: format!("w{w}"),
                            ..claim(7)
                        };
                        let claimed = store.claim_steps(&request).await.unwrap();
                        if claimed.is_empty() {
                            break mine;
                        }
                        mine.extend(claimed.iter().map(|c| c.step.id));
                        complete(&store, &claimed).await;
                    }
                })
            })
            .collect();
        let mut seen = HashSet::new();
        let mut total = 0;
        for worker in workers {
            for id in worker.await.unwrap() {
                total += 1;
                assert!(seen.insert(id), "step {id} was leased twice");
            }
        }
        assert_eq!(total, 400, "{}", db.backend());
        let complete = tasker_store::TaskFilter {
            states: vec![TaskState::Complete],
            ..TaskFilter::within(tasker_domain::Within::Any)
        };
        assert_eq!(store.count_tasks(&complete).await.unwrap(), 100);
    }
}

/// A parked timer holds no lease that can expire, survives a new store connection (a
/// restart), and comes due by the clock.
#[tokio::test]
async fn a_parked_timer_comes_due_by_the_clock_and_survives_a_restart() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let template = DIAMOND.replace(
            "{ name: validate, handler: noop }",
            "{ name: validate, handler: sleep, config: { seconds: 3600 } }",
        );
        store.register_template(&template, false).await.unwrap();
        store.create_task(order("shop", "fulfil", 1)).await.unwrap();
        let claimed = store.claim_steps(&claim(1)).await.unwrap();
        let wake = clock.now().timestamp_millis() + 3_600_000;
        store
            .park_step(claimed[0].lease_token, Some(wake), "timer")
            .await
            .unwrap();

        let restarted = Store::connect(&db.options, clock.clone()).await.unwrap();
        clock.advance(Minutes::minutes(59));
        assert_eq!(
            restarted.expire_leases().await.unwrap().len(),
            0,
            "a parked lease does not expire"
        );
        assert!(restarted.due_parked_steps(10).await.unwrap().is_empty());
        assert_eq!(
            restarted
                .next_wakeup_ms(clock.now().timestamp_millis())
                .await
                .unwrap(),
            Some(wake)
        );
        clock.advance(Minutes::minutes(1));
        let due = restarted.due_parked_steps(10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, claimed[0].lease_token);
        let report = restarted
            .complete_steps(&[Completion {
                lease_token: due[0].0,
                results: json!({ "slept_seconds": 3600 }),
            }])
            .await
            .unwrap();
        assert_eq!(report.completed.len(), 1);
        assert_eq!(report.newly_ready, 2);
        assert!(restarted.due_parked_steps(10).await.unwrap().is_empty());
        restarted.close().await.unwrap();
    }
}

/// Claims within one namespace.
fn only(namespace: &str) -> Within {
    Within::Only(NamespaceSet::one(namespace))
}

#[tokio::test]
async fn a_released_attempt_does_not_count_and_the_step_is_claimable_again_at_once() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let template = DIAMOND.replace(
            "{ name: validate, handler: noop }",
            "{ name: validate, handler: noop, retry: { max_attempts: 2, backoff: { base: 60, jitter: 0 } } }",
        );
        store.register_template(&template, false).await.unwrap();
        let task = store
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;

        // A first attempt released: pending again, no attempt counted, claimable now.
        let first = store.claim_steps(&claim(1)).await.unwrap();
        // A person cannot send a running step back to pending: only its worker can.
        assert!(matches!(
            store
                .change_step(first[0].step.id, tasker_store::StepAction::Retry, None)
                .await,
            Err(Error::Domain(
                tasker_domain::Error::InvalidTransition { .. }
            ))
        ));
        let released = store.release_leases(&[first[0].lease_token]).await.unwrap();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].state, StepState::Pending);
        assert_eq!(released[0].attempts, 0);
        assert_eq!(released[0].lease_holder, None);
        // The token is spent: releasing or completing it again changes nothing.
        assert!(
            store
                .release_leases(&[first[0].lease_token])
                .await
                .unwrap()
                .is_empty()
        );
        assert!(complete(store, &first).await.completed.is_empty());

        // After a failed attempt, a released retry goes back to `error`, due at once, and
        // the last allowed attempt is still there.
        let second = store.claim_steps(&claim(1)).await.unwrap();
        assert_eq!(second[0].step.attempts, 1);
        store
            .fail_step(&AttemptFailure {
                lease_token: second[0].lease_token,
                message: "flaky".into(),
                retryable: true,
                retry_after_seconds: None,
            })
            .await
            .unwrap();
        clock.advance(Minutes::seconds(61));
        let retry = store.claim_steps(&claim(1)).await.unwrap();
        assert_eq!(retry[0].step.attempts, 2);
        let released = store.release_leases(&[retry[0].lease_token]).await.unwrap();
        assert_eq!(released[0].state, StepState::Error);
        assert_eq!(released[0].attempts, 1);
        let last = store.claim_steps(&claim(1)).await.unwrap();
        assert_eq!(
            last[0].step.attempts, 2,
            "the released attempt did not count"
        );
        complete(store, &last).await;

        let events = store.events_for_tasks(&[task.id]).await.unwrap();
        let released: Vec<_> = events
            .iter()
            .filter(|e| e.name == "step.released")
            .collect();
        assert_eq!(released.len(), 2);
        assert_eq!(released[0].payload["to_state"], "PENDING");
        assert_eq!(released[0].payload["worker_id"], "worker-1");
        assert_eq!(released[1].payload["to_state"], "ERROR");
        assert_eq!(released[1].payload["attempt"], 2);
        // An expired lease cannot be released: the reaper owns it.
        let expired = store.claim_steps(&claim(1)).await.unwrap();
        clock.advance(Minutes::seconds(31));
        assert!(
            store
                .release_leases(&[expired[0].lease_token])
                .await
                .unwrap()
                .is_empty()
        );
    }
}

#[tokio::test]
async fn a_step_is_claimable_since_its_last_parent_finished_or_its_retry_time() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let created_at = clock.now();
        let task = store
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;
        let step = |name: &'static str| async move {
            store
                .steps_for_tasks(&[task.id])
                .await
                .unwrap()
                .into_iter()
                .find(|step| step.name == name)
                .unwrap()
        };
        assert_eq!(step("validate").await.ready_since, Some(created_at));
        assert_eq!(step("ship").await.ready_since, None, "not claimable yet");
        clock.advance(Minutes::seconds(3));
        let validate = store.claim_steps(&claim(1)).await.unwrap();
        complete(store, &validate).await;
        let middle = store.claim_steps(&claim(2)).await.unwrap();
        clock.advance(Minutes::seconds(5));
        complete(store, &middle[..1]).await;
        clock.advance(Minutes::seconds(7));
        let last_parent_done = clock.now();
        complete(store, &middle[1..]).await;
        assert_eq!(step("ship").await.ready_since, Some(last_parent_done));
        // A failed attempt is claimable again at its retry time.
        let ship = store.claim_steps(&claim(1)).await.unwrap();
        let failed = store
            .fail_step(&AttemptFailure {
                lease_token: ship[0].lease_token,
                message: "later".into(),
                retryable: true,
                retry_after_seconds: Some(30.0),
            })
            .await
            .unwrap();
        assert_eq!(failed.step.ready_since, failed.step.next_attempt_at);
        assert_eq!(
            failed.step.ready_since,
            Some(clock.now() + Minutes::seconds(30))
        );
    }
}

#[tokio::test]
async fn steps_completed_in_their_claims_transaction_record_every_transition_in_order() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        store.register_template(DIAMOND, false).await.unwrap();
        let task = store
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;
        let (left, report) = store
            .claim_and_complete(&claim(10), |step| Some(json!({ "ran": step.step.name })))
            .await
            .unwrap();
        assert!(left.is_empty());
        assert_eq!(report.completed.len(), 1, "{backend}");
        assert_eq!(report.newly_ready, 2, "{backend}: reserve and charge");
        // Reserve is left to the caller, charge completes at once; ship waits for reserve.
        let (left, report) = store
            .claim_and_complete(&claim(10), |step| {
                (step.step.name == "charge").then(|| json!({}))
            })
            .await
            .unwrap();
        assert_eq!(names(&left), ["reserve"], "{backend}");
        assert_eq!(report.completed.len(), 1);
        assert_eq!(report.newly_ready, 0);
        complete(store, &left).await;
        let (left, report) = store
            .claim_and_complete(&claim(10), |_| Some(json!({})))
            .await
            .unwrap();
        assert!(left.is_empty());
        assert_eq!(
            report.finished_tasks.len(),
            1,
            "{backend}: ship ends the task"
        );
        assert_eq!(
            store.task(task.id).await.unwrap().state,
            TaskState::Complete
        );

        // Every step went pending → in progress → complete, numbered 1, 2, 3, and the log
        // says each started before it completed.
        let steps = store.steps_for_tasks(&[task.id]).await.unwrap();
        let ids: Vec<_> = steps.iter().map(|s| s.id).collect();
        let transitions = store.step_transitions(&ids).await.unwrap();
        for step in &steps {
            let mine: Vec<(i32, Option<StepState>, StepState)> = transitions
                .iter()
                .filter(|t| t.step_id == step.id)
                .map(|t| (t.sort_key, t.from_state, t.to_state))
                .collect();
            assert_eq!(
                mine,
                [
                    (1, None, StepState::Pending),
                    (2, Some(StepState::Pending), StepState::InProgress),
                    (3, Some(StepState::InProgress), StepState::Complete),
                ],
                "{backend}: {}",
                step.name
            );
        }
        let events = store.events_for_tasks(&[task.id]).await.unwrap();
        for step in &steps {
            let at = |name: &str| {
                events
                    .iter()
                    .position(|e| e.step_id == Some(step.id) && e.name == name)
                    .unwrap()
            };
            assert!(at("step.started") < at("step.completed"), "{backend}");
        }
        let task_events: Vec<&str> = events
            .iter()
            .filter(|e| e.name == "task.started" || e.name == "task.completed")
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(task_events, ["task.started", "task.completed"], "{backend}");
    }
}

/// Lease expiry is indexed for in-flight steps only and lease tokens for steps that hold one,
/// so pending steps cost those indexes nothing; the next lease to run out is still one probe
/// of the in-flight index, and a token still finds its step.
#[tokio::test]
async fn sqlite_reads_leases_through_the_in_flight_indexes() {
    let db = sqlite_with_diamond().await;
    let store = &db.store;
    store.create_task(order("shop", "fulfil", 1)).await.unwrap();
    let claimed = store.claim_steps(&claim(1)).await.unwrap();
    let plan = db.wakeups_plan().await;
    assert!(
        plan.iter()
            .any(|line| line.contains("ix_steps_in_flight_lease (state=? AND lease_expires_ms>?)")),
        "{plan:?}"
    );
    // Task deadlines and start timeouts: only the rows that have one, through partial indexes.
    for index in ["ix_tasks_deadline", "ix_steps_start_timeout"] {
        assert!(
            plan.iter().any(|line| line.contains(index)),
            "{index}: {plan:?}"
        );
    }
    let token = claimed[0].lease_token;
    assert_eq!(
        store.lease_namespaces(&[token]).await.unwrap()[&token],
        "shop"
    );
}

/// One step that inherits its task's priority after one that declares its own, low.
const PRIORITIZED: &str = r#"
namespace: ops
name: job
version: 1.0.0
priority: 1
steps:
  - { name: tidy, handler: noop, priority: 1 }
  - { name: work, handler: noop }
"#;

/// A task of `ops/job` at `priority` (the template's when `None`).
fn job(priority: Option<i64>) -> tasker_store::NewTask {
    let mut new = order("ops", "job", 0);
    new.request.priority = priority;
    new
}

/// Claims one step at a time: which task and step each is.
async fn claim_one_by_one(store: &Store, count: usize) -> Vec<(uuid::Uuid, String)> {
    let mut order = Vec::new();
    for _ in 0..count {
        let claimed = store.claim_steps(&claim(1)).await.unwrap();
        assert_eq!(claimed.len(), 1);
        order.push((claimed[0].step.task_id, claimed[0].step.name.clone()));
    }
    order
}

/// Claims take urgent work first, whatever came before it; but a minute of waiting weighs as
/// much as a level of priority, so low priority work is delayed, never starved.
#[tokio::test]
async fn claims_take_higher_priority_first_and_waiting_work_ages() {
    let aging = Minutes::milliseconds(tasker_domain::priority::AGING_MS);
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(PRIORITIZED, false).await.unwrap();
        let low = store.create_task(job(None)).await.unwrap().task;
        clock.advance(Minutes::seconds(1));
        let high = store.create_task(job(Some(3))).await.unwrap().task;
        clock.advance(Minutes::seconds(1));
        let urgent = store.create_task(job(Some(4))).await.unwrap().task;
        assert_eq!(
            [
                low.priority.level(),
                high.priority.level(),
                urgent.priority.level()
            ],
            [1, 3, 4],
            "the caller's priority, else the template's"
        );
        let steps = store.steps_for_tasks(&[urgent.id]).await.unwrap();
        assert_eq!(
            steps.iter().map(|s| s.priority.level()).collect::<Vec<_>>(),
            [1, 4],
            "a step declaring a priority keeps it; the others take the task's"
        );
        let taken = claim_one_by_one(store, 6).await;
        assert_eq!(
            taken,
            [
                (urgent.id, "work".to_owned()),
                (high.id, "work".to_owned()),
                (low.id, "tidy".to_owned()),
                (low.id, "work".to_owned()),
                (high.id, "tidy".to_owned()),
                (urgent.id, "tidy".to_owned()),
            ],
            "{}: by priority, then by the time they became claimable",
            db.backend()
        );

        // Aging: work of priority 4 arriving up to three minutes after work of priority 1 goes
        // first; arriving later, it waits its turn.
        let waiting = store.create_task(job(None)).await.unwrap().task;
        clock.advance(aging * 3 - Minutes::seconds(1));
        let sooner = store.create_task(job(Some(4))).await.unwrap().task;
        clock.advance(Minutes::seconds(2));
        let later = store.create_task(job(Some(4))).await.unwrap().task;
        let taken: Vec<_> = claim_one_by_one(store, 6)
            .await
            .into_iter()
            .filter(|(_, name)| name == "work")
            .map(|(task, _)| task)
            .collect();
        assert_eq!(
            taken,
            [sooner.id, waiting.id, later.id],
            "{}: a wait of three minutes weighs as much as three levels",
            db.backend()
        );
    }
}
