//! Concurrency keys: at most `limit` tasks with the same key hold a slot; the others wait,
//! are cancelled, or make room, as their template says.

use crate::{claim, complete, databases, event_names, order};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use tasker_domain::{StepState, TaskState};
use tasker_store::{AttemptFailure, Error, EventFilter, NewTask, Slot, Store, TaskRecord};

/// Two steps in a chain, so a task holds its slot across claims; at most `limit` tasks per
/// customer, with `strategy`.
fn keyed_template(name: &str, limit: u32, strategy: &str) -> String {
    format!(
        r#"
namespace: billing
name: {name}
version: 1.0.0
context_schema:
  type: object
  properties: {{ customer: {{ type: string }} }}
concurrency: {{ key: "{{{{ context.customer }}}}", limit: {limit}, strategy: {strategy} }}
steps:
  - {{ name: charge, handler: noop, retry: {{ max_attempts: 1, retryable: false }} }}
  - {{ name: receipt, handler: noop, depends_on: [charge] }}
"#
    )
}

/// Registers [`keyed_template`].
async fn register_keyed(store: &Store, name: &str, limit: u32, strategy: &str) {
    store
        .register_template(&keyed_template(name, limit, strategy), false)
        .await
        .unwrap();
}

fn for_customer(template: &str, customer: &str, priority: Option<i64>) -> NewTask {
    let mut new = order("billing", template, 0);
    new.request.context = json!({ "customer": customer });
    new.request.priority = priority;
    new
}

async fn start(store: &Store, template: &str, customer: &str) -> TaskRecord {
    store
        .create_task(for_customer(template, customer, None))
        .await
        .unwrap()
        .task
}

/// Claims everything claimable: the tasks whose steps were leased.
async fn claim_all(store: &Store) -> Vec<tasker_store::ClaimedStep> {
    store.claim_steps(&claim(100)).await.unwrap()
}

#[tokio::test]
async fn waiting_tasks_start_as_slots_free_highest_priority_first() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        register_keyed(store, "pay", 2, "queue").await;
        let first = start(store, "pay", "acme").await;
        let second = start(store, "pay", "acme").await;
        let third = start(store, "pay", "acme").await;
        let fourth = start(store, "pay", "acme").await;
        let urgent = store
            .create_task(for_customer("pay", "acme", Some(4)))
            .await
            .unwrap()
            .task;
        let other = start(store, "pay", "globex").await;
        let key = |task: &TaskRecord| task.concurrency.clone().unwrap();
        assert_eq!(key(&first).key, "billing/pay:acme");
        assert_eq!(key(&first).limit, 2);
        assert_eq!(key(&first).slot, Slot::Held, "{backend}");
        assert_eq!(key(&second).slot, Slot::Held);
        for waiting in [&third, &fourth, &urgent] {
            assert!(waiting.waits_for_slot(), "{backend}");
        }
        assert_eq!(
            key(&other).slot,
            Slot::Held,
            "another key has its own slots"
        );
        let third_events = event_names(store, third.id).await;
        assert!(third_events.contains(&"task.queued".to_owned()));
        assert!(!third_events.contains(&"task.steps_ready".to_owned()));

        // Only the holders' first steps are claimable.
        let claimed = claim_all(store).await;
        let running: HashSet<_> = claimed.iter().map(|c| c.step.task_id).collect();
        assert_eq!(
            running,
            HashSet::from([first.id, second.id, other.id]),
            "{backend}"
        );

        // The first ends: the urgent one takes its slot in the same transaction.
        let first_charge: Vec<_> = claimed
            .iter()
            .filter(|c| c.step.task_id == first.id)
            .cloned()
            .collect();
        complete(store, &first_charge).await;
        let receipt = claim_all(store).await;
        assert_eq!(receipt.len(), 1);
        let report = complete(store, &receipt).await;
        assert_eq!(report.finished_tasks.len(), 1);
        assert_eq!(
            report.finished_tasks[0].concurrency.as_ref().unwrap().slot,
            Slot::Freed
        );
        assert_eq!(
            report.newly_ready, 1,
            "{backend}: the admitted task's first step"
        );
        let urgent_now = store.task(urgent.id).await.unwrap();
        assert_eq!(urgent_now.concurrency.unwrap().slot, Slot::Held);
        let next = claim_all(store).await;
        assert_eq!(
            next.iter().map(|c| c.step.task_id).collect::<Vec<_>>(),
            [urgent.id],
            "{backend}: priority 4 goes before the older ones"
        );

        // A cancelled holder frees its slot too: the oldest waiting one starts.
        store.cancel_task(second.id, None).await.unwrap();
        assert_eq!(
            store
                .task(third.id)
                .await
                .unwrap()
                .concurrency
                .unwrap()
                .slot,
            Slot::Held,
            "{backend}"
        );
        assert!(store.task(fourth.id).await.unwrap().waits_for_slot());
        // A waiting task's steps cannot be changed by hand; cancelling it gives up its place.
        let fourth_steps = store.steps_for_tasks(&[fourth.id]).await.unwrap();
        let refused = store
            .change_step(fourth_steps[0].id, tasker_store::StepAction::Skip, None)
            .await;
        assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
        let cancelled = store.cancel_task(fourth.id, None).await.unwrap();
        assert_eq!(cancelled.state, TaskState::Cancelled);
        assert_eq!(cancelled.concurrency.unwrap().slot, Slot::Freed);
    }
}

#[tokio::test]
async fn cancel_newest_refuses_and_cancel_in_progress_makes_room() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        register_keyed(store, "newest", 1, "cancel_newest").await;
        register_keyed(store, "latest", 1, "cancel_in_progress").await;

        let kept = start(store, "newest", "acme").await;
        let refused = start(store, "newest", "acme").await;
        assert_eq!(kept.state, TaskState::Pending);
        assert_eq!(refused.state, TaskState::Cancelled, "{backend}");
        let steps = store.steps_for_tasks(&[refused.id]).await.unwrap();
        assert!(steps.iter().all(|s| s.state == StepState::Cancelled));

        let old = start(store, "latest", "acme").await;
        let leased: Vec<_> = claim_all(store)
            .await
            .into_iter()
            .filter(|c| c.step.task_id == old.id)
            .collect();
        assert_eq!(leased.len(), 1);
        let new = start(store, "latest", "acme").await;
        assert_eq!(
            new.concurrency.clone().unwrap().slot,
            Slot::Held,
            "{backend}"
        );
        let old_now = store.task(old.id).await.unwrap();
        assert_eq!(old_now.state, TaskState::Cancelled, "{backend}");
        let lost = store
            .complete_steps(&[tasker_store::Completion {
                lease_token: leased[0].lease_token,
                results: json!({}),
            }])
            .await
            .unwrap();
        assert!(
            lost.completed.is_empty(),
            "the cancelled task's lease is gone"
        );
        let next = claim_all(store).await;
        assert!(next.iter().any(|c| c.step.task_id == new.id), "{backend}");
        let cancelled = event_names(store, old.id).await;
        assert!(cancelled.contains(&"task.cancelled".to_owned()));
    }
}

#[tokio::test]
async fn a_key_needs_its_context_field_and_a_failed_task_needs_a_free_slot_to_run_again() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        register_keyed(store, "pay", 1, "queue").await;
        let mut missing = order("billing", "pay", 0);
        missing.request.context = json!({});
        match store.create_task(missing).await {
            Err(Error::Domain(tasker_domain::Error::InvalidContext(problems))) => {
                assert_eq!(problems[0].path, "context/customer", "{backend}");
            }
            other => panic!("{backend}: {other:?}"),
        }

        let failing = start(store, "pay", "acme").await;
        let claimed = claim_all(store).await;
        let report = store
            .fail_step(&AttemptFailure {
                lease_token: claimed[0].lease_token,
                message: "card declined".into(),
                retryable: false,
                retry_after_seconds: None,
            })
            .await
            .unwrap();
        let failed = report.finished_task.unwrap();
        assert_eq!(failed.state, TaskState::Error);
        assert_eq!(failed.concurrency.unwrap().slot, Slot::Freed, "{backend}");
        // Its slot went to the next task; retrying the failed one must wait for it.
        let next = start(store, "pay", "acme").await;
        assert_eq!(next.concurrency.unwrap().slot, Slot::Held);
        let refused = store.retry_task(failing.id, None).await;
        assert!(
            matches!(&refused, Err(Error::Conflict(message)) if message.contains("the limit is 1")),
            "{backend}: {refused:?}"
        );
        assert_eq!(
            store.task(failing.id).await.unwrap().state,
            TaskState::Error
        );
        store.cancel_task(next.id, None).await.unwrap();
        let retried = store.retry_task(failing.id, None).await.unwrap();
        assert_eq!(retried.concurrency.unwrap().slot, Slot::Held, "{backend}");
        assert_eq!(claim_all(store).await.len(), 1);
    }
}

/// 500 tasks over 10 keys, limit 2, created and run by two replicas at once: replaying the
/// event log in commit order, no key ever has more than 2 tasks started and not ended, and
/// every task ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_never_run_more_than_the_limit_of_a_key() {
    const TASKS: usize = 500;
    let (clock, databases) = databases().await;
    for db in databases {
        let backend = db.backend();
        let store = db.store.clone();
        register_keyed(&store, "pay", 2, "queue").await;
        let other = Store::connect(&db.options, clock.clone()).await.unwrap();
        let replicas = [store.clone(), other.clone()];
        let mut running = Vec::new();
        for (replica, store) in replicas.iter().cloned().enumerate() {
            let creator = store.clone();
            running.push(tokio::spawn(async move {
                for batch in 0..(TASKS / 2 / 25) {
                    let news = (0..25)
                        .map(|i| {
                            let n = replica * 7 + batch * 3 + i;
                            for_customer("pay", &format!("customer-{}", n % 10), None)
                        })
                        .collect();
                    creator.create_tasks(news).await.unwrap();
                }
            }));
            running.push(tokio::spawn(async move {
                let mut idle = 0;
                while idle < 200 {
                    let claimed = store.claim_steps(&claim(8)).await.unwrap();
                    if claimed.is_empty() {
                        idle += 1;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    idle = 0;
                    complete(&store, &claimed).await;
                }
            }));
        }
        for handle in running {
            handle.await.unwrap();
        }
        // Whatever the workers left when they stopped looking, run to the end.
        loop {
            let claimed = claim_all(&store).await;
            if claimed.is_empty() {
                break;
            }
            complete(&store, &claimed).await;
        }
        let tasks = store
            .list_tasks(
                &tasker_store::TaskFilter::within(tasker_domain::Within::Any),
                None,
                1_000,
            )
            .await
            .unwrap();
        assert_eq!(tasks.len(), TASKS, "{backend}");
        assert!(
            tasks.iter().all(|task| task.state == TaskState::Complete),
            "{backend}: every task ran"
        );
        let key_of: HashMap<_, _> = tasks
            .iter()
            .map(|task| (task.id, task.concurrency.clone().unwrap().key))
            .collect();
        let filter = EventFilter {
            names: vec!["task.started".into(), "task.completed".into()],
            ..EventFilter::within(tasker_domain::Within::Any)
        };
        let mut cursor = None;
        let mut started: HashMap<&str, HashSet<uuid::Uuid>> = HashMap::new();
        let mut most = 0;
        loop {
            let page = store.events_page(&filter, cursor, 500).await.unwrap();
            let Some(last) = page.last() else { break };
            cursor = Some(last.cursor());
            for event in &page {
                let task = event.task_id.unwrap();
                let running = started.entry(key_of[&task].as_str()).or_default();
                if event.name == "task.started" {
                    running.insert(task);
                    most = most.max(running.len());
                } else {
                    running.remove(&task);
                }
            }
        }
        assert_eq!(
            most, 2,
            "{backend}: at most 2 per key, and the limit was used"
        );
        other.close().await.unwrap();
    }
}

/// A holder that ends by a sweep (its last lease ran out, or its timeout) hands its slot on in
/// the sweep's transaction, as one that ends by a worker's report does.
#[tokio::test]
async fn sweeps_free_slots_too() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        register_keyed(store, "pay", 1, "queue").await;
        let holder = start(store, "pay", "acme").await;
        let waiting = start(store, "pay", "acme").await;
        assert!(waiting.waits_for_slot());
        assert_eq!(claim_all(store).await.len(), 1);
        clock.advance(chrono::Duration::seconds(31));
        let expired = store.expire_leases().await.unwrap();
        assert_eq!(expired.len(), 1, "{backend}");
        assert_eq!(
            store.task(holder.id).await.unwrap().state,
            TaskState::Error,
            "{backend}: its only attempt is spent"
        );
        assert_eq!(
            store
                .task(waiting.id)
                .await
                .unwrap()
                .concurrency
                .unwrap()
                .slot,
            Slot::Held,
            "{backend}"
        );
        let next = claim_all(store).await;
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].step.task_id, waiting.id, "{backend}");
    }
}

/// The room `cancel_in_progress` makes goes to the new task, even when older ones wait under
/// the key (queued by an earlier version that had the `queue` strategy).
#[tokio::test]
async fn the_room_made_by_cancel_in_progress_goes_to_the_new_task() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        register_keyed(store, "swap", 1, "queue").await;
        let holder = start(store, "swap", "acme").await;
        let queued = start(store, "swap", "acme").await;
        assert!(queued.waits_for_slot());
        let newer = keyed_template("swap", 1, "cancel_in_progress").replace("1.0.0", "2.0.0");
        store.register_template(&newer, false).await.unwrap();
        let newest = start(store, "swap", "acme").await;
        assert_eq!(newest.concurrency.unwrap().slot, Slot::Held, "{backend}");
        assert_eq!(
            store.task(holder.id).await.unwrap().state,
            TaskState::Cancelled
        );
        assert!(
            store.task(queued.id).await.unwrap().waits_for_slot(),
            "{backend}"
        );
    }
}
