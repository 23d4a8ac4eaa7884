//! The retention policy's deletes: old finished tasks go with everything about them, the rest
//! stays, and the event log tells a reader whose cursor is older than what it retains.

use crate::{DIAMOND, claim, complete, databases, order, sqlite_with_diamond};
use chrono::Duration;
use tasker_domain::Within;
use tasker_store::{Error, EventCursor, EventFilter, Pruned, Store};
use uuid::Uuid;

/// Runs a task's steps to completion, one claim after another.
async fn finish(store: &Store) {
    loop {
        let claimed = store.claim_steps(&claim(10)).await.unwrap();
        if claimed.is_empty() {
            return;
        }
        complete(store, &claimed).await;
    }
}

/// Prunes batch after batch until nothing is left to delete; returns the total.
async fn prune_all(store: &Store, cutoff: chrono::DateTime<chrono::Utc>, batch: u32) -> Pruned {
    let mut total = Pruned::default();
    loop {
        let pruned = store.prune_finished(cutoff, batch).await.unwrap();
        if pruned == Pruned::default() {
            return total;
        }
        assert!(pruned.tasks <= u64::from(batch), "one batch at a time");
        total.tasks += pruned.tasks;
        total.events += pruned.events;
    }
}

#[tokio::test]
async fn old_finished_tasks_go_with_their_rows_and_an_older_cursor_is_refused() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        store.register_template(DIAMOND, false).await.unwrap();
        // Old: one completed, one cancelled, one still running (never deleted).
        let done = store
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;
        finish(store).await;
        let cancelled = store
            .create_task(order("shop", "fulfil", 2))
            .await
            .unwrap()
            .task;
        store.cancel_task(cancelled.id, None).await.unwrap();
        let running = store
            .create_task(order("shop", "fulfil", 3))
            .await
            .unwrap()
            .task;
        // Its first step stays leased: the task is still running when the sweep comes.
        assert_eq!(store.claim_steps(&claim(10)).await.unwrap().len(), 1);
        let old = [done.id, cancelled.id];
        let old_steps: Vec<Uuid> = store
            .steps_for_tasks(&old)
            .await
            .unwrap()
            .iter()
            .map(|step| step.id)
            .collect();
        let old_events = store.events_for_tasks(&old).await.unwrap();
        let deleted_through = old_events.iter().map(|e| e.cursor()).max().unwrap();
        let before_running = store.events_for_tasks(&[running.id]).await.unwrap();

        // Ten days later, one more finishes: recent, kept.
        clock.advance(Duration::days(10));
        let recent = store
            .create_task(order("shop", "fulfil", 4))
            .await
            .unwrap()
            .task;
        finish(store).await;
        let kept = [running.id, recent.id];
        let kept_events = store.events_for_tasks(&kept).await.unwrap();
        let kept_steps = store.steps_for_tasks(&kept).await.unwrap();

        clock.advance(Duration::days(2));
        let cutoff = clock_now(store) - Duration::days(7);
        let pruned = prune_all(store, cutoff, 1).await;
        assert_eq!(pruned.tasks, 2, "{backend}");
        assert_eq!(
            pruned.events,
            old_events.len() as u64 + 1,
            "{backend}: the tasks' events and the template's registration"
        );

        for id in old {
            assert!(
                matches!(store.task(id).await, Err(Error::NotFound { .. })),
                "{backend}"
            );
        }
        assert!(
            store.steps_for_tasks(&old).await.unwrap().is_empty(),
            "{backend}"
        );
        assert!(
            store.edges_for_tasks(&old).await.unwrap().is_empty(),
            "{backend}"
        );
        assert!(
            store.task_transitions(&old).await.unwrap().is_empty(),
            "{backend}"
        );
        assert!(
            store.step_transitions(&old_steps).await.unwrap().is_empty(),
            "{backend}"
        );
        assert!(
            store.events_for_tasks(&old).await.unwrap().is_empty(),
            "{backend}"
        );

        // Everything of the kept tasks is still there, the running one's oldest events too.
        assert_eq!(
            store.events_for_tasks(&kept).await.unwrap().len(),
            kept_events.len()
        );
        assert_eq!(
            store.steps_for_tasks(&kept).await.unwrap().len(),
            kept_steps.len()
        );
        let everything = store
            .events_page(&EventFilter::within(Within::Any), None, 10_000)
            .await
            .unwrap();
        let ids: Vec<Uuid> = everything.iter().map(|e| e.id).collect();
        let kept_ids: Vec<Uuid> = kept_events.iter().map(|e| e.id).collect();
        assert_eq!(
            ids, kept_ids,
            "{backend}: the log keeps its order, holes where tasks went"
        );
        assert!(before_running.iter().all(|e| ids.contains(&e.id)));

        // A cursor older than the highest deleted one is refused, saying from where to read.
        assert_eq!(store.pruned_through().await.unwrap(), deleted_through);
        let older = EventCursor(deleted_through.0 - 1);
        for outcome in [
            store
                .events_page(&EventFilter::within(Within::Any), Some(older), 10)
                .await
                .map(|_| ()),
            store.check_cursor(older).await,
        ] {
            match outcome {
                Err(Error::CursorExpired {
                    cursor,
                    pruned_through,
                }) => {
                    assert_eq!(
                        (cursor, pruned_through),
                        (older.0, deleted_through.0),
                        "{backend}"
                    );
                }
                other => panic!("{backend}: expected an expired cursor, got {other:?}"),
            }
        }
        // From the highest deleted cursor on, everything retained reads as before.
        let resumed = store
            .events_page(
                &EventFilter::within(Within::Any),
                Some(deleted_through),
                10_000,
            )
            .await
            .unwrap();
        let resumed_ids: Vec<Uuid> = resumed.iter().map(|e| e.id).collect();
        let after_deleted: Vec<Uuid> = kept_events
            .iter()
            .filter(|e| e.cursor() > deleted_through)
            .map(|e| e.id)
            .collect();
        assert_eq!(resumed_ids, after_deleted, "{backend}");
        store.check_cursor(deleted_through).await.unwrap();

        // Nothing more has aged out; the recorded cursor stays.
        assert_eq!(prune_all(store, cutoff, 50).await, Pruned::default());
        assert_eq!(store.pruned_through().await.unwrap(), deleted_through);
    }
}

fn clock_now(store: &Store) -> chrono::DateTime<chrono::Utc> {
    store.clock().now()
}

/// The sweep runs on a schedule against a growing history: SQLite, without statistics, read
/// every finished task through the state index on each sweep, holding the writer. The search
/// is a range on the creation index, whatever the history holds.
#[tokio::test]
async fn sqlite_looks_for_aged_out_tasks_through_the_creation_index() {
    let db = sqlite_with_diamond().await;
    let store = &db.store;
    for n in 0..20 {
        store.create_task(order("shop", "fulfil", n)).await.unwrap();
    }
    finish(store).await;
    let plan = db.aged_out_tasks_plan().await;
    assert_eq!(
        plan,
        ["SEARCH tasks USING INDEX ix_tasks_created_at (created_at<?)"],
        "no scan of the finished tasks, no sort"
    );
}

/// After a bulk load, `vacuum_analyze` does on PostgreSQL what autovacuum would do later, to
/// every table of the store's schema; SQLite has nothing to do.
#[tokio::test]
async fn vacuum_analyze_processes_every_table_of_the_schema() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        store.create_task(order("shop", "fulfil", 1)).await.unwrap();
        finish(store).await;
        store.vacuum_analyze().await.unwrap();
        if db.backend() == "postgres" {
            let vacuumed = db.vacuumed_tables().await;
            for table in ["events", "tasks", "workflow_steps", "step_transitions"] {
                assert!(vacuumed.iter().any(|name| name == table), "{vacuumed:?}");
            }
        }
    }
}

/// When the policy has deleted the whole log, the numbers go on after the last one deleted:
/// a reader at that cursor receives what comes next.
#[tokio::test]
async fn numbers_go_on_after_a_log_pruned_to_nothing() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        store.register_template(DIAMOND, false).await.unwrap();
        store.create_task(order("shop", "fulfil", 1)).await.unwrap();
        finish(store).await;
        clock.advance(Duration::days(10));
        prune_all(store, clock_now(store) - Duration::days(7), 10).await;
        let within = EventFilter::within(Within::Any);
        assert!(
            store
                .events_page(&within, None, 10)
                .await
                .unwrap()
                .is_empty(),
            "{backend}: nothing left"
        );
        let through = store.pruned_through().await.unwrap();
        let next = store
            .create_task(order("shop", "fulfil", 2))
            .await
            .unwrap()
            .task;
        let read = store
            .events_page(&within, Some(through), 100)
            .await
            .unwrap();
        let written = store.events_for_tasks(&[next.id]).await.unwrap();
        assert_eq!(read.len(), written.len(), "{backend}: {read:?}");
        assert!(read.iter().all(|e| e.cursor() > through), "{backend}");
    }
}

/// Every transition, step transition and event of these tasks, as stored.
async fn history(store: &Store, tasks: &[Uuid]) -> impl std::fmt::Debug + PartialEq + use<> {
    let steps: Vec<Uuid> = store
        .steps_for_tasks(tasks)
        .await
        .unwrap()
        .iter()
        .map(|step| step.id)
        .collect();
    (
        store.task_transitions(tasks).await.unwrap(),
        store.step_transitions(&steps).await.unwrap(),
        store.events_for_tasks(tasks).await.unwrap(),
    )
}

/// The history tables were rebuilt with other keys (on SQLite by copying them): their rows
/// come through unchanged both ways, and event numbers go on after the highest ever given,
/// also when the log was pruned to nothing before the rebuild.
#[tokio::test]
async fn rebuilt_history_tables_keep_their_rows_and_the_log_its_numbers() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let backend = db.backend();
        store.register_template(DIAMOND, false).await.unwrap();
        let old = store.create_task(order("shop", "fulfil", 1)).await.unwrap();
        finish(store).await;
        let deleted_through = history_end(store, old.task.id).await;
        clock.advance(Duration::days(10));
        prune_all(store, clock_now(store), 10).await;
        assert!(
            store
                .events_page(&EventFilter::within(Within::Any), None, 10)
                .await
                .unwrap()
                .is_empty(),
            "{backend}: the log is empty"
        );

        db.redo_last_migration().await;
        let kept = store.create_task(order("shop", "fulfil", 2)).await.unwrap();
        finish(store).await;
        let kept_events = store.events_for_tasks(&[kept.task.id]).await.unwrap();
        assert!(
            kept_events.iter().all(|e| e.cursor() > deleted_through),
            "{backend}: numbers go on after {deleted_through:?}: {:?}",
            kept_events.iter().map(|e| e.cursor()).collect::<Vec<_>>()
        );

        let before = history(store, &[kept.task.id]).await;
        db.redo_last_migration().await;
        assert_eq!(history(store, &[kept.task.id]).await, before, "{backend}");
        let newest = store.create_task(order("shop", "fulfil", 3)).await.unwrap();
        finish(store).await;
        let kept_end = history_end(store, kept.task.id).await;
        let newest_events = store.events_for_tasks(&[newest.task.id]).await.unwrap();
        assert!(
            newest_events.iter().all(|e| e.cursor() > kept_end),
            "{backend}"
        );
        assert_eq!(
            store.task(newest.task.id).await.unwrap().state,
            tasker_domain::TaskState::Complete,
            "{backend}: the rebuilt tables take new rows"
        );
    }
}

/// The highest cursor of a task's events.
async fn history_end(store: &Store, task: Uuid) -> EventCursor {
    let events = store.events_for_tasks(&[task]).await.unwrap();
    events.iter().map(|e| e.cursor()).max().unwrap()
}
