//! Store operations on a real database: SQLite always, PostgreSQL too when
//! `TASKER_TEST_DATABASE_URL` is set. Each test gets its own database.

// A test crate: a failed assumption is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use tasker_domain::{ManualClock, StepState, TaskRequest, TaskState};
use tasker_store::testing::TestDatabase;
use tasker_store::{Error, NewTask, RegistrationOutcome, Store, TaskFilter};

mod concurrency;
mod event_log;
mod execution;
mod faults;
mod lifecycle;
mod retention;
mod schedules;
mod step_limits;
mod timeouts;

pub const DIAMOND: &str = r#"
namespace: shop
name: fulfil
version: 1.0.0
context_schema:
  type: object
  required: [order_id]
  properties: { order_id: { type: integer } }
steps:
  - { name: validate, handler: noop }
  - { name: reserve, handler: noop, depends_on: [validate] }
  - { name: charge, handler: noop, depends_on: [validate] }
  - { name: ship, handler: noop, depends_on: [reserve, charge] }
"#;

pub fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// A SQLite database alone, with the diamond template registered: for what only SQLite's
/// planner decides (PostgreSQL plans from statistics).
pub async fn sqlite_with_diamond() -> TestDatabase {
    let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
    db.store.register_template(DIAMOND, false).await.unwrap();
    db
}

pub async fn databases() -> (Arc<ManualClock>, Vec<TestDatabase>) {
    let clock = Arc::new(ManualClock::new(start()));
    let databases = TestDatabase::all(clock.clone()).await;
    (clock, databases)
}

pub fn order(namespace: &str, template: &str, order_id: i64) -> NewTask {
    NewTask {
        namespace: namespace.into(),
        template: template.into(),
        version: None,
        trace_parent: None,
        request: TaskRequest {
            context: json!({ "order_id": order_id }),
            ..TaskRequest::default()
        },
    }
}

/// A claim of up to `limit` steps of any handler, anywhere, by `worker-1`.
pub fn claim(limit: u32) -> tasker_store::ClaimRequest {
    tasker_store::ClaimRequest {
        worker_id: "worker-1".into(),
        handlers: vec![],
        within: tasker_domain::Within::Any,
        limit,
        lease: std::time::Duration::from_secs(30),
    }
}

/// Completes the claimed steps, each with `{"done": <its name>}`.
pub async fn complete(
    store: &Store,
    claimed: &[tasker_store::ClaimedStep],
) -> tasker_store::CompletionReport {
    let completions: Vec<tasker_store::Completion> = claimed
        .iter()
        .map(|c| tasker_store::Completion {
            lease_token: c.lease_token,
            results: json!({ "done": c.step.name }),
        })
        .collect();
    store.complete_steps(&completions).await.unwrap()
}

/// The names of a task's events, in order.
pub async fn event_names(store: &Store, task_id: uuid::Uuid) -> Vec<String> {
    store
        .events_for_tasks(&[task_id])
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.name)
        .collect()
}

async fn all_tasks(store: &Store) -> Vec<tasker_store::TaskRecord> {
    store
        .list_tasks(&TaskFilter::within(tasker_domain::Within::Any), None, 1_000)
        .await
        .unwrap()
}

#[tokio::test]
async fn registering_is_idempotent_conflicts_on_change_and_replaces_on_request() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let first = store.register_template(DIAMOND, false).await.unwrap();
        assert_eq!(first.outcome, RegistrationOutcome::Created);
        assert_eq!(first.template.template.steps.len(), 4);

        // The same content as JSON is the same definition.
        let as_json = serde_json::to_string(&first.template.template.to_normalized()).unwrap();
        let again = store.register_template(&as_json, false).await.unwrap();
        assert_eq!(
            again.outcome,
            RegistrationOutcome::Unchanged,
            "{}",
            db.backend()
        );
        assert_eq!(again.template.id, first.template.id);

        let changed = DIAMOND.replace("name: ship, handler: noop", "name: ship, handler: courier");
        match store.register_template(&changed, false).await {
            Err(Error::Conflict(message)) => assert!(message.contains("replace: true")),
            other => panic!("expected a conflict, got {other:?}"),
        }
        let replaced = store.register_template(&changed, true).await.unwrap();
        assert_eq!(replaced.outcome, RegistrationOutcome::Replaced);
        assert_eq!(replaced.template.id, first.template.id);
        assert_eq!(replaced.template.template.steps[3].handler, "courier");

        let namespaces = store.namespaces().await.unwrap();
        assert_eq!(namespaces.len(), 1);
        assert_eq!(namespaces[0].name, "shop");
    }
}

#[tokio::test]
async fn the_newest_semantic_version_is_chosen_when_none_is_given() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        for version in ["1.9.0", "1.10.0", "1.10.0-rc.1", "0.3.0"] {
            let source = DIAMOND.replace("version: 1.0.0", &format!("version: {version}"));
            store.register_template(&source, false).await.unwrap();
        }
        let newest = store.template("shop", "fulfil", None).await.unwrap();
        assert_eq!(newest.template.version.to_string(), "1.10.0");
        let exact = store
            .template("shop", "fulfil", Some("1.9.0"))
            .await
            .unwrap();
        assert_eq!(exact.template.version.to_string(), "1.9.0");
        let versions: Vec<String> = store
            .templates(Some("shop"), None)
            .await
            .unwrap()
            .iter()
            .map(|t| t.template.version.to_string())
            .collect();
        assert_eq!(versions, ["1.10.0", "1.10.0-rc.1", "1.9.0", "0.3.0"]);
        assert!(matches!(
            store.template("shop", "fulfil", Some("2.0.0")).await,
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            store.template("shop", "fulfil", Some("two")).await,
            Err(Error::Domain(_))
        ));
    }
}

#[tokio::test]
async fn creating_a_task_writes_steps_edges_transitions_and_events_together() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let created = store.create_task(order("shop", "fulfil", 7)).await.unwrap();
        assert!(created.created);
        let task = created.task;
        assert_eq!(task.state, TaskState::Pending);
        assert_eq!(task.template_version, "1.0.0");

        let steps = store.steps_for_tasks(&[task.id]).await.unwrap();
        let names: Vec<_> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["validate", "reserve", "charge", "ship"]);
        assert!(
            steps
                .iter()
                .all(|s| s.state == StepState::Pending && s.attempts == 0)
        );
        assert_eq!(steps[0].max_attempts, 3);

        let edges = store.edges_for_tasks(&[task.id]).await.unwrap();
        assert_eq!(edges.len(), 4);
        let id = |name: &str| steps.iter().find(|s| s.name == name).unwrap().id;
        assert!(
            edges
                .iter()
                .any(|e| e.parent_step_id == id("reserve") && e.child_step_id == id("ship"))
        );

        let transitions = store.task_transitions(&[task.id]).await.unwrap();
        assert_eq!(transitions.len(), 1);
        assert_eq!(transitions[0].from_state, None);
        assert_eq!(transitions[0].to_state, TaskState::Pending);
        let step_ids: Vec<_> = steps.iter().map(|s| s.id).collect();
        assert_eq!(store.step_transitions(&step_ids).await.unwrap().len(), 4);

        let events = store.events_for_tasks(&[task.id]).await.unwrap();
        let names: Vec<_> = events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "task.created",
                "step.created",
                "step.created",
                "step.created",
                "step.created",
                "task.steps_ready"
            ]
        );
        assert_eq!(events[5].payload["steps"], serde_json::json!(["validate"]));
        assert_eq!(
            events[5].payload["step_ids"],
            serde_json::json!([steps[0].id])
        );
        assert!(events.windows(2).all(|w| w[0].position < w[1].position));
        assert_eq!(events[0].payload["template"], "fulfil");
    }
}

/// An order of `shop/fulfil` with an idempotency key.
fn keyed(order_id: i64, key: &str) -> NewTask {
    let mut new = order("shop", "fulfil", order_id);
    new.request.idempotency_key = Some(key.into());
    new
}

/// A batch starts every task in one transaction, for a number of statements that does not
/// grow with its size; its tasks are as single creations make them.
#[tokio::test]
async fn a_batch_starts_every_task_for_a_constant_number_of_statements() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let mut costs = Vec::new();
        let mut roots = 0;
        // The first batch also reads the template's definition; the others find it parsed.
        for size in [1, 5, 50] {
            let batch: Vec<NewTask> = (0..size).map(|i| order("shop", "fulfil", i)).collect();
            let before = store.statement_count();
            let created = store.create_tasks(batch).await.unwrap();
            costs.push(store.statement_count() - before);
            assert_eq!(created.len(), size as usize);
            for (i, creation) in created.iter().enumerate() {
                assert!(creation.created);
                assert_eq!(creation.task.context, json!({ "order_id": i }), "in order");
                assert_eq!(creation.task.state, TaskState::Pending);
            }
            let ids: Vec<_> = created.iter().map(|c| c.task.id).collect();
            let steps = store.steps_for_tasks(&ids).await.unwrap();
            assert_eq!(steps.len(), 4 * size as usize);
            let events = store.events_for_tasks(&ids[..1]).await.unwrap();
            let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(
                names.iter().filter(|n| **n == "step.created").count(),
                4,
                "{names:?}"
            );
            assert!(names.contains(&"task.created") && names.contains(&"task.steps_ready"));
            roots += size;
        }
        assert_eq!(costs[0], costs[1] + 1, "{}: {costs:?}", db.backend());
        assert_eq!(costs[1], costs[2], "{}: {costs:?}", db.backend());
        let claimed = store.claim_steps(&claim(1_000)).await.unwrap();
        assert_eq!(claimed.len(), roots as usize, "every root is claimable");
    }
}

/// One refused request refuses the whole batch: nothing is written, and every refused
/// request's problems are named under its index.
#[tokio::test]
async fn a_batch_with_a_refused_request_writes_nothing_and_names_each_problem() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let mut bad_context = order("shop", "fulfil", 2);
        bad_context.request.context = json!({ "order_id": "two" });
        let batch = vec![
            order("shop", "fulfil", 1),
            bad_context,
            order("shop", "nope", 3),
            keyed(4, "same"),
            keyed(5, "same"),
        ];
        match store.create_tasks(batch).await {
            Err(Error::Domain(tasker_domain::Error::InvalidRequest(problems))) => {
                let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
                assert_eq!(
                    paths,
                    [
                        "inputs[1].context/order_id",
                        "inputs[2].template",
                        "inputs[4].idempotencyKey"
                    ],
                    "{problems:?}"
                );
                assert!(problems[2].message.contains("inputs[3]"));
            }
            other => panic!("expected the batch refused, got {other:?}"),
        }
        assert!(all_tasks(store).await.is_empty(), "{}", db.backend());
    }
}

/// Idempotency keys hold per request of a batch: a key already used answers its task, and
/// the same batch sent again starts nothing new.
#[tokio::test]
async fn a_batch_sent_again_answers_the_tasks_its_keys_started() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let earlier = store.create_task(keyed(1, "first")).await.unwrap().task;
        let batch = || vec![keyed(1, "first"), keyed(2, "second")];
        let created = store.create_tasks(batch()).await.unwrap();
        assert!(!created[0].created);
        assert_eq!(created[0].task.id, earlier.id);
        assert!(created[1].created);
        let again = store.create_tasks(batch()).await.unwrap();
        assert!(again.iter().all(|c| !c.created));
        assert_eq!(again[1].task.id, created[1].task.id);
        assert_eq!(all_tasks(store).await.len(), 2, "{}", db.backend());
    }
}

#[tokio::test]
async fn a_failed_creation_leaves_no_row_behind() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let mut bad = order("shop", "fulfil", 1);
        bad.request.context = json!({ "order_id": "not a number" });
        match store.create_task(bad).await {
            Err(Error::Domain(tasker_domain::Error::InvalidContext(problems))) => {
                assert_eq!(problems[0].path, "context/order_id")
            }
            other => panic!("expected InvalidContext, got {other:?}"),
        }
        let mut bad = order("shop", "fulfil", 1);
        bad.request.tags = vec![String::new()];
        assert!(matches!(
            store.create_task(bad).await,
            Err(Error::Domain(tasker_domain::Error::InvalidRequest(_)))
        ));
        assert!(matches!(
            store.create_task(order("shop", "nope", 1)).await,
            Err(Error::NotFound {
                what: "template",
                ..
            })
        ));
        assert!(all_tasks(store).await.is_empty(), "{}", db.backend());
        assert_eq!(
            store
                .count_tasks(&TaskFilter::within(tasker_domain::Within::Any))
                .await
                .unwrap(),
            0
        );
    }
}

#[tokio::test]
async fn an_idempotency_key_returns_the_existing_task_even_under_concurrency() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = db.store.clone();
        store.register_template(DIAMOND, false).await.unwrap();
        let mut request = order("shop", "fulfil", 3);
        request.request.idempotency_key = Some("order-3".into());
        let attempts: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                let request = request.clone();
                tokio::spawn(async move { store.create_task(request).await })
            })
            .collect();
        let mut ids = Vec::new();
        let mut created = 0;
        for attempt in attempts {
            let result = attempt.await.unwrap().unwrap();
            created += usize::from(result.created);
            ids.push(result.task.id);
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "{}: one task for one key", db.backend());
        assert_eq!(created, 1);
        assert_eq!(all_tasks(&store).await.len(), 1);

        // The same key for another template is refused rather than silently reused.
        let other = DIAMOND.replace("name: fulfil", "name: refund");
        store.register_template(&other, false).await.unwrap();
        let mut refund = order("shop", "refund", 3);
        refund.request.idempotency_key = Some("order-3".into());
        assert!(matches!(
            store.create_task(refund).await,
            Err(Error::Conflict(_))
        ));
    }
}

/// Concurrent single creations are written together (group commit); each still answers its
/// own task, a repeated idempotency key among them still answers the one task, and every task
/// has all its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creations_each_answer_their_own_task() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = db.store.clone();
        store.register_template(DIAMOND, false).await.unwrap();
        let attempts: Vec<_> = (0..40)
            .map(|n| {
                let store = store.clone();
                let mut request = order("shop", "fulfil", n);
                if n >= 30 {
                    request.request.idempotency_key = Some(format!("key-{}", n % 5));
                }
                tokio::spawn(async move { (n, store.create_task(request).await) })
            })
            .collect();
        let mut by_key: HashMap<String, Vec<(uuid::Uuid, bool)>> = HashMap::new();
        let mut ids = Vec::new();
        for attempt in attempts {
            let (n, result) = attempt.await.unwrap();
            let creation = result.unwrap();
            if n >= 30 {
                by_key
                    .entry(format!("key-{}", n % 5))
                    .or_default()
                    .push((creation.task.id, creation.created));
            } else {
                assert!(creation.created);
                assert_eq!(creation.task.context, json!({ "order_id": n }));
                ids.push(creation.task.id);
            }
        }
        assert_eq!(by_key.len(), 5);
        for answers in by_key.values() {
            assert_eq!(answers.len(), 2);
            assert_eq!(
                answers[0].0,
                answers[1].0,
                "{}: one task per key",
                db.backend()
            );
            assert_eq!(answers.iter().filter(|(_, created)| *created).count(), 1);
            ids.push(answers[0].0);
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 35);
        assert_eq!(all_tasks(&store).await.len(), 35);
        let steps = store.steps_for_tasks(&ids).await.unwrap();
        assert_eq!(steps.len(), 35 * 4);
        let events = store.events_for_tasks(&ids).await.unwrap();
        let created = events.iter().filter(|e| e.name == "task.created").count();
        assert_eq!(created, 35);
    }
}

#[tokio::test]
async fn listing_filters_and_pages_newest_first() {
    let (clock, databases) = databases().await;
    for db in databases {
        clock.set(start());
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let other = DIAMOND.replace("namespace: shop", "namespace: billing");
        store.register_template(&other, false).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..7 {
            let namespace = if i % 2 == 0 { "shop" } else { "billing" };
            let mut new = order(namespace, "fulfil", i);
            new.request.tags = if i < 3 {
                vec!["early".into(), "vip".into()]
            } else {
                vec!["late".into()]
            };
            ids.push(store.create_task(new).await.unwrap().task.id);
            clock.advance(Duration::minutes(10));
        }
        store.cancel_task(ids[0], None).await.unwrap();

        let page = store
            .list_tasks(&TaskFilter::within(tasker_domain::Within::Any), None, 3)
            .await
            .unwrap();
        let got: Vec<_> = page.iter().map(|t| t.id).collect();
        assert_eq!(got, [ids[6], ids[5], ids[4]]);
        let next = store
            .list_tasks(
                &TaskFilter::within(tasker_domain::Within::Any),
                Some(ids[4]),
                3,
            )
            .await
            .unwrap();
        let got: Vec<_> = next.iter().map(|t| t.id).collect();
        assert_eq!(got, [ids[3], ids[2], ids[1]]);

        let shop = TaskFilter {
            namespace: Some("shop".into()),
            ..TaskFilter::within(tasker_domain::Within::Any)
        };
        assert_eq!(store.count_tasks(&shop).await.unwrap(), 4);
        let cancelled = TaskFilter {
            states: vec![TaskState::Cancelled],
            ..TaskFilter::within(tasker_domain::Within::Any)
        };
        let got = store.list_tasks(&cancelled, None, 10).await.unwrap();
        assert_eq!(got.iter().map(|t| t.id).collect::<Vec<_>>(), [ids[0]]);
        let tagged = TaskFilter {
            tags: vec!["early".into(), "vip".into()],
            ..TaskFilter::within(tasker_domain::Within::Any)
        };
        assert_eq!(store.count_tasks(&tagged).await.unwrap(), 3);
        let window = TaskFilter {
            created_after: Some(start() + Duration::minutes(20)),
            created_before: Some(start() + Duration::minutes(40)),
            ..TaskFilter::within(tasker_domain::Within::Any)
        };
        let got = store.list_tasks(&window, None, 10).await.unwrap();
        assert_eq!(
            got.iter().map(|t| t.id).collect::<Vec<_>>(),
            [ids[3], ids[2]],
            "{}",
            db.backend()
        );
        let by_template = TaskFilter {
            namespace: Some("billing".into()),
            template: Some("fulfil".into()),
            states: vec![TaskState::Pending],
            ..TaskFilter::within(tasker_domain::Within::Any)
        };
        assert_eq!(store.count_tasks(&by_template).await.unwrap(), 3);
    }
}

#[tokio::test]
async fn cancelling_cancels_unfinished_steps_atomically_and_only_once() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let task = store
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;
        let cancelled = store
            .cancel_task(task.id, Some("customer asked".into()))
            .await
            .unwrap();
        assert_eq!(cancelled.state, TaskState::Cancelled);
        assert!(cancelled.completed_at.is_some());
        let steps = store.steps_for_tasks(&[task.id]).await.unwrap();
        assert!(steps.iter().all(|s| s.state == StepState::Cancelled));

        let transitions = store.task_transitions(&[task.id]).await.unwrap();
        assert_eq!(transitions.len(), 2);
        assert_eq!(transitions[1].from_state, Some(TaskState::Pending));
        assert_eq!(transitions[1].to_state, TaskState::Cancelled);
        assert_eq!(transitions[1].metadata["reason"], "customer asked");
        let ids: Vec<_> = steps.iter().map(|s| s.id).collect();
        let step_transitions = store.step_transitions(&ids).await.unwrap();
        assert_eq!(step_transitions.len(), 8);
        assert!(
            step_transitions
                .iter()
                .filter(|t| t.sort_key == 2)
                .all(|t| t.to_state == StepState::Cancelled)
        );

        let events = store.events_for_tasks(&[task.id]).await.unwrap();
        assert_eq!(
            events.iter().filter(|e| e.name == "task.cancelled").count(),
            1
        );
        assert_eq!(
            events.iter().filter(|e| e.name == "step.cancelled").count(),
            4
        );

        match store.cancel_task(task.id, None).await {
            Err(Error::Domain(tasker_domain::Error::InvalidTransition { from, to, .. })) => {
                assert_eq!((from, to), ("cancelled", "cancelled"))
            }
            other => panic!("expected an invalid transition, got {other:?}"),
        }
        assert_eq!(
            store.events_for_tasks(&[task.id]).await.unwrap().len(),
            events.len()
        );
        assert!(matches!(
            store.cancel_task(uuid::Uuid::now_v7(), None).await,
            Err(Error::NotFound { what: "task", .. })
        ));
    }
}

#[tokio::test]
async fn batch_reads_cost_one_statement_each() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..50 {
            ids.push(
                store
                    .create_task(order("shop", "fulfil", i))
                    .await
                    .unwrap()
                    .task
                    .id,
            );
        }
        let before = store.statement_count();
        let steps = store.steps_for_tasks(&ids).await.unwrap();
        let edges = store.edges_for_tasks(&ids).await.unwrap();
        assert_eq!((steps.len(), edges.len()), (200, 200));
        assert_eq!(store.statement_count() - before, 2, "{}", db.backend());
    }
}

#[tokio::test]
async fn tasks_start_from_the_current_definition_whichever_replica_registered_it() {
    let (clock, databases) = databases().await;
    for db in databases {
        let backend = db.backend();
        // Two replicas over one database, each with its own parsed templates.
        let (starter, registrar) = (
            &db.store,
            Store::connect(&db.options, clock.clone()).await.unwrap(),
        );
        registrar.register_template(DIAMOND, false).await.unwrap();
        let version = |task: &tasker_store::TaskRecord| task.template_version.clone();
        let first = starter
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;
        assert_eq!(version(&first), "1.0.0");
        // The schema is compiled once and still checked on every task.
        let refused = starter
            .create_task(NewTask {
                request: TaskRequest {
                    context: json!({ "order_id": "x" }),
                    ..TaskRequest::default()
                },
                ..order("shop", "fulfil", 0)
            })
            .await;
        assert!(
            matches!(
                refused,
                Err(Error::Domain(tasker_domain::Error::InvalidContext(_)))
            ),
            "{backend}"
        );

        // The other replica replaces 1.0.0: the starter's next task has the new step list.
        clock.advance(Duration::seconds(1));
        let replaced = DIAMOND.replace("name: ship, handler: noop", "name: ship, handler: courier");
        registrar.register_template(&replaced, true).await.unwrap();
        let second = starter
            .create_task(order("shop", "fulfil", 2))
            .await
            .unwrap()
            .task;
        let handlers: Vec<String> = starter
            .steps_for_tasks(&[second.id])
            .await
            .unwrap()
            .into_iter()
            .map(|step| step.handler)
            .collect();
        assert!(
            handlers.contains(&"courier".to_owned()),
            "{backend}: {handlers:?}"
        );

        // And a newer version becomes the default at once.
        let newer = DIAMOND.replace("version: 1.0.0", "version: 1.1.0");
        registrar.register_template(&newer, false).await.unwrap();
        let third = starter
            .create_task(order("shop", "fulfil", 3))
            .await
            .unwrap()
            .task;
        assert_eq!(version(&third), "1.1.0", "{backend}");
        registrar.close().await.unwrap();
    }
}
