//! Schedules with an injected clock: each tick starts its task exactly once, also with two
//! replicas firing at once; missed ticks follow the catch-up policy; pause, resume, delete.

use crate::{DIAMOND, databases};
use chrono::Duration as Minutes;
use serde_json::json;
use std::collections::HashSet;
use tasker_domain::{Clock, Within};
use tasker_store::{Error, EventFilter, NewSchedule, Store};

fn minutely(name: &str, catch_up: Option<&str>) -> NewSchedule {
    NewSchedule {
        namespace: "shop".into(),
        name: name.into(),
        template: "fulfil".into(),
        context: json!({ "order_id": 1 }),
        cron: Some("* * * * *".into()),
        catch_up: catch_up.map(str::to_owned),
        ..NewSchedule::default()
    }
}

async fn fired_ticks(store: &Store) -> Vec<i64> {
    let filter = EventFilter {
        names: vec!["schedule.fired".into()],
        ..EventFilter::within(Within::Any)
    };
    store
        .events_page(&filter, None, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.payload["tick_ms"].as_i64().unwrap())
        .collect()
}

async fn task_count(store: &Store) -> u64 {
    store
        .count_tasks(&tasker_store::TaskFilter::within(Within::Any))
        .await
        .unwrap()
}

/// Two replicas fire a per-minute schedule at the same moments, 30 ticks long: one task and
/// one `schedule.fired` per tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_minute_cron_fires_exactly_once_per_tick_with_two_replicas() {
    let (clock, databases) = databases().await;
    for db in databases {
        let backend = db.backend();
        let store = db.store.clone();
        store.register_template(DIAMOND, false).await.unwrap();
        let other = Store::connect(&db.options, clock.clone()).await.unwrap();
        let schedule = store
            .create_schedule(minutely("nightly", None))
            .await
            .unwrap();
        let first = schedule.next_fire_at.unwrap();
        assert!(first > clock.now() && first <= clock.now() + Minutes::minutes(1));
        for _ in 0..30 {
            clock.advance(Minutes::minutes(1));
            let replicas = [store.clone(), other.clone()].map(|replica| {
                tokio::spawn(async move { replica.fire_schedules().await.unwrap().len() })
            });
            let mut created = 0;
            for replica in replicas {
                created += replica.await.unwrap();
            }
            assert_eq!(
                created, 1,
                "{backend}: one of the two started the tick's task"
            );
        }
        assert_eq!(task_count(&store).await, 30, "{backend}");
        let ticks = fired_ticks(&store).await;
        assert_eq!(ticks.len(), 30, "{backend}: one event per tick");
        assert_eq!(ticks.iter().collect::<HashSet<_>>().len(), 30);
        let stored = store.schedule("shop", "nightly").await.unwrap();
        assert_eq!(stored.fired_count, 30);
        assert_eq!(stored.next_fire_at, Some(first + Minutes::minutes(30)));
        other.close().await.unwrap();
    }
}

#[tokio::test]
async fn missed_ticks_follow_the_catch_up_policy() {
    let (clock, databases) = databases().await;
    for db in databases {
        let backend = db.backend();
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        // On a whole minute (the clock is shared with the other database's run).
        clock.advance(Minutes::seconds((60 - clock.now().timestamp() % 60) % 60));
        let begin = clock.now();
        for (name, policy) in [("all", "run_all"), ("once", "run_once"), ("skip", "skip")] {
            store
                .create_schedule(minutely(name, Some(policy)))
                .await
                .unwrap();
        }
        // Down for ten and a half minutes: ticks 00:01 to 00:10 were missed.
        clock.advance(Minutes::seconds(630));
        store.fire_schedules().await.unwrap();
        let fired = |name: &str| {
            let store = store.clone();
            let name = name.to_owned();
            async move { store.schedule("shop", &name).await.unwrap().fired_count }
        };
        assert_eq!(fired("all").await, 10, "{backend}");
        assert_eq!(fired("once").await, 1, "{backend}");
        assert_eq!(
            fired("skip").await,
            1,
            "{backend}: the tick of 30 s ago is on time, the older ones are dropped"
        );
        let next = store.schedule("shop", "once").await.unwrap().next_fire_at;
        assert_eq!(next, Some(begin + Minutes::minutes(11)));
        assert_eq!(task_count(store).await, 12);
    }
}

#[tokio::test]
async fn schedules_pause_resume_run_once_and_refuse_bad_input() {
    let (clock, databases) = databases().await;
    for db in databases {
        let backend = db.backend();
        let store = &db.store;
        store.register_template(DIAMOND, false).await.unwrap();
        let berlin = NewSchedule {
            timezone: Some("Europe/Berlin".into()),
            cron: Some("0 2 * * *".into()),
            ..minutely("berlin", None)
        };
        let berlin = store.create_schedule(berlin).await.unwrap();
        // 02:00 in Berlin in winter is 01:00 UTC.
        let next = berlin.next_fire_at.unwrap();
        assert_eq!(next.format("%H:%M").to_string(), "01:00", "{backend}");
        assert!(next > clock.now() && next <= clock.now() + Minutes::days(1));
        let upcoming = berlin.upcoming(clock.now(), 3);
        assert_eq!(
            upcoming,
            [0, 24, 48].map(|hours| next + Minutes::hours(hours)),
            "{backend}"
        );

        let paused = store.pause_schedule("shop", "berlin", true).await.unwrap();
        assert!(paused.paused);
        clock.advance(Minutes::days(1));
        assert!(
            store.fire_schedules().await.unwrap().is_empty(),
            "{backend}: paused"
        );
        let resumed = store.pause_schedule("shop", "berlin", false).await.unwrap();
        assert_eq!(
            resumed.next_fire_at,
            Some(next + Minutes::hours(24)),
            "{backend}: the pause's ticks are not made up"
        );

        let once = NewSchedule {
            cron: None,
            run_at: Some(clock.now() + Minutes::minutes(5)),
            ..minutely("once", None)
        };
        store.create_schedule(once).await.unwrap();
        clock.advance(Minutes::minutes(5));
        assert_eq!(store.fire_schedules().await.unwrap().len(), 1);
        let done = store.schedule("shop", "once").await.unwrap();
        assert_eq!((done.fired_count, done.next_fire_at), (1, None));
        clock.advance(Minutes::minutes(5));
        assert!(
            store.fire_schedules().await.unwrap().is_empty(),
            "{backend}: once only"
        );

        store.delete_schedule("shop", "once").await.unwrap();
        assert!(matches!(
            store.schedule("shop", "once").await,
            Err(Error::NotFound { .. })
        ));
        let again = store.create_schedule(minutely("berlin", None)).await;
        assert!(
            matches!(again, Err(Error::Conflict(_))),
            "{backend}: {again:?}"
        );

        let bad = NewSchedule {
            name: "Bad Name".into(),
            cron: Some("every day".into()),
            timezone: Some("Mars/Olympus".into()),
            catch_up: Some("sometimes".into()),
            priority: Some(7),
            ..minutely("x", None)
        };
        match store.create_schedule(bad).await {
            Err(Error::Domain(tasker_domain::Error::InvalidRequest(problems))) => {
                let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
                assert_eq!(paths, ["name", "catchUp", "cron", "timezone", "priority"]);
            }
            other => panic!("{backend}: {other:?}"),
        }
        let wrong_context = NewSchedule {
            context: json!({ "order_id": "seven" }),
            ..minutely("typo", None)
        };
        assert!(matches!(
            store.create_schedule(wrong_context).await,
            Err(Error::Domain(tasker_domain::Error::InvalidContext(_)))
        ));
        let no_template = NewSchedule {
            template: "ghost".into(),
            ..minutely("ghost", None)
        };
        assert!(matches!(
            store.create_schedule(no_template).await,
            Err(Error::NotFound { .. })
        ));
    }
}
