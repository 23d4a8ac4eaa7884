//! Reading the event log from cursors: complete, ordered, and safe under concurrent writers.

use crate::{DIAMOND, databases, order};
use sea_orm::{ConnectionTrait, Database, TransactionTrait};
use tasker_store::{EventFilter, Store};

async fn all_after(
    store: &Store,
    filter: &EventFilter,
    mut after: Option<tasker_store::EventCursor>,
) -> Vec<tasker_store::EventRecord> {
    let mut events = Vec::new();
    loop {
        let page = store.events_page(filter, after, 3).await.unwrap();
        if page.is_empty() {
            return events;
        }
        after = page.last().map(|e| e.cursor());
        events.extend(page);
    }
}

#[tokio::test]
async fn pages_follow_cursors_and_filters_without_gaps_or_repeats() {
    let (_clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        let appended = store.events_appended();
        store.register_template(DIAMOND, false).await.unwrap();
        assert!(
            appended.has_changed().unwrap(),
            "a commit with events is signalled"
        );
        let first = store
            .create_task(order("shop", "fulfil", 1))
            .await
            .unwrap()
            .task;
        let second = store
            .create_task(order("shop", "fulfil", 2))
            .await
            .unwrap()
            .task;

        let everything = all_after(
            store,
            &EventFilter::within(tasker_domain::Within::Any),
            None,
        )
        .await;
        assert_eq!(
            everything.len(),
            13,
            "1 registration + 2 × (task + 4 steps + the root's readiness)"
        );
        let cursors: Vec<_> = everything.iter().map(|e| e.cursor()).collect();
        assert!(
            cursors.windows(2).all(|w| w[0] < w[1]),
            "strictly increasing"
        );
        assert_eq!(store.event_head().await.unwrap(), cursors.last().copied());

        let of_second = EventFilter {
            task_id: Some(second.id),
            ..EventFilter::within(tasker_domain::Within::Any)
        };
        let events = all_after(store, &of_second, None).await;
        assert_eq!(events.len(), 6);
        assert!(events.iter().all(|e| e.task_id == Some(second.id)));
        let tasks_only = EventFilter {
            names: vec!["task.created".into()],
            ..EventFilter::within(tasker_domain::Within::Only(
                tasker_domain::NamespaceSet::one("shop"),
            ))
        };
        let events = all_after(store, &tasks_only, None).await;
        let ids: Vec<_> = events.iter().map(|e| e.task_id.unwrap()).collect();
        assert_eq!(ids, [first.id, second.id]);

        // Resuming from the middle gives exactly the rest.
        let middle = everything[4].cursor();
        let rest = all_after(
            store,
            &EventFilter::within(tasker_domain::Within::Any),
            Some(middle),
        )
        .await;
        assert_eq!(rest, everything[5..].to_vec());
    }
}

/// On PostgreSQL, an event whose transaction commits late is never passed over, although its
/// position is smaller than those of events committed before it.
#[tokio::test]
async fn a_late_commit_is_never_skipped() {
    let (_clock, databases) = databases().await;
    for db in databases
        .into_iter()
        .filter(|db| db.backend() == "postgres")
    {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let url = std::env::var(tasker_store::testing::POSTGRES_URL_VAR).unwrap();
        let schema = db.options.schema.clone().unwrap();
        let mut options = sea_orm::ConnectOptions::new(url);
        options.set_schema_search_path(schema.clone());
        // Name the connection after the schema so the test database's cleanup ends it.
        options.map_sqlx_postgres_opts(move |opts| opts.application_name(&schema));
        let other = Database::connect(options).await.unwrap();
        let late = other.begin().await.unwrap();
        late.execute_unprepared(
            "INSERT INTO events (id, name, payload, occurred_at) VALUES (gen_random_uuid(), 'test.late', '{}', now())",
        )
        .await
        .unwrap();
        let before = all_after(
            store,
            &EventFilter::within(tasker_domain::Within::Any),
            None,
        )
        .await;
        // A task created while the late transaction is open commits and is readable at once...
        store.create_task(order("shop", "fulfil", 1)).await.unwrap();
        let seen = all_after(
            store,
            &EventFilter::within(tasker_domain::Within::Any),
            None,
        )
        .await;
        assert_eq!(seen.len(), before.len() + 6);
        let cursor = seen.last().map(|e| e.cursor());
        // ...and the late event, committed afterwards, is numbered after it: a reader that has
        // passed the task's events still receives it.
        late.commit().await.unwrap();
        assert_eq!(store.sequence_events().await.unwrap(), 1);
        let rest = all_after(
            store,
            &EventFilter::within(tasker_domain::Within::Any),
            cursor,
        )
        .await;
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].name, "test.late");
        assert!(
            rest[0].position < seen.last().unwrap().position,
            "inserted earlier, delivered later"
        );
        other.close().await.unwrap();
    }
}

/// Two replicas writing at once: every event gets a number of its own, a task's events are
/// numbered in the order they were written, and a reader that follows the log while they
/// write receives every event exactly once (none committed behind its cursor).
#[tokio::test]
async fn concurrent_replicas_number_every_event_once_and_a_follower_misses_none() {
    let (clock, databases) = databases().await;
    for db in databases {
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let filter = EventFilter::within(tasker_domain::Within::Any);
        let registered = all_after(store, &filter, None).await.len();
        let other = Store::connect(&db.options, clock.clone()).await.unwrap();
        let writers: Vec<_> = [store.clone(), other.clone()]
            .into_iter()
            .enumerate()
            .map(|(replica, store)| {
                tokio::spawn(async move {
                    for i in 0..25 {
                        let order_id = (replica * 100 + i) as i64;
                        store
                            .create_task(order("shop", "fulfil", order_id))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        let mut followed = Vec::new();
        let mut cursor = None;
        let mut writing = true;
        while writing {
            writing = writers.iter().any(|writer| !writer.is_finished());
            let page = all_after(store, &filter, cursor).await;
            cursor = page.last().map(|e| e.cursor()).or(cursor);
            followed.extend(page);
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let all = all_after(store, &filter, None).await;
        assert_eq!(all.len(), registered + 50 * 6, "{}", db.backend());
        let ids: Vec<_> = followed.iter().map(|e| e.id).collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{}: a repeat", db.backend());
        assert_eq!(
            ids.len(),
            all.len(),
            "{}: the follower missed some",
            db.backend()
        );
        let cursors: Vec<_> = all.iter().map(|e| e.cursor()).collect();
        assert!(
            cursors.windows(2).all(|pair| pair[0] < pair[1]),
            "{}: numbers are distinct and read in order",
            db.backend()
        );
        let mut by_task: std::collections::HashMap<_, Vec<_>> = Default::default();
        for event in &all {
            by_task
                .entry(event.task_id)
                .or_default()
                .push(event.position);
        }
        for positions in by_task.values() {
            assert!(
                positions.windows(2).all(|pair| pair[0] < pair[1]),
                "{}: a task's events keep their written order",
                db.backend()
            );
        }
        other.close().await.unwrap();
    }
}
