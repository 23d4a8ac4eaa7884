//! Fault injection on real databases: a full disk, a busy database, lost sessions and
//! statement timeouts. Whatever the store acknowledges must be there for an independent
//! reader and after a restart; whatever it refuses must be refused as `Unavailable` (a fault,
//! retryable) and leave nothing; the event log stays gap-free; writes work again once the
//! fault is gone, and the store says which fault it is in meanwhile.

use crate::{DIAMOND, order, start};
use std::sync::Arc;
use std::time::Duration;
use tasker_domain::{ManualClock, StepState};
use tasker_store::testing::TestDatabase;
use tasker_store::{
    ClaimRequest, Completion, Error, EventFilter, Fault, Store, StoreOptions, TaskFilter,
};
use uuid::Uuid;

/// What the store acknowledged, to check against the database afterwards.
#[derive(Default)]
struct Acknowledged {
    tasks: Vec<Uuid>,
    completed_steps: Vec<Uuid>,
    templates: Vec<String>,
    cancelled: Vec<Uuid>,
}

/// Ok, or the fault it must be; any other error fails the test.
fn refused_for<T: std::fmt::Debug>(result: tasker_store::Result<T>, expected: Fault) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(Error::Unavailable { fault, .. }) => {
            assert_eq!(fault, expected);
            None
        }
        Err(other) => panic!("expected success or {expected:?}, got {other:?}"),
    }
}

fn claim(worker: &str) -> ClaimRequest {
    ClaimRequest {
        worker_id: worker.into(),
        handlers: Vec::new(),
        within: tasker_domain::Within::Any,
        limit: 50,
        lease: Duration::from_secs(60),
    }
}

/// One round of every kind of write; records what was acknowledged.
async fn write_round(store: &Store, round: i64, fault: Fault, acked: &mut Acknowledged) {
    if let Some(created) = refused_for(
        store.create_task(order("shop", "fulfil", round)).await,
        fault,
    ) {
        acked.tasks.push(created.task.id);
    }
    if let Some(claimed) = refused_for(store.claim_steps(&claim("w")).await, fault) {
        let completions: Vec<Completion> = claimed
            .iter()
            .map(|c| Completion {
                lease_token: c.lease_token,
                results: serde_json::json!({ "round": round }),
            })
            .collect();
        if let Some(report) = refused_for(store.complete_steps(&completions).await, fault) {
            acked
                .completed_steps
                .extend(report.completed.iter().map(|s| s.id));
        }
    }
    let name = format!("t{round}");
    let template = DIAMOND.replace("name: fulfil", &format!("name: {name}"));
    if refused_for(store.register_template(&template, false).await, fault).is_some() {
        acked.templates.push(name);
    }
    if round % 3 == 0
        && let Some(&victim) = acked.tasks.first()
        && !acked.cancelled.contains(&victim)
        && let Some(task) = refused_for(store.cancel_task(victim, None).await, fault)
    {
        acked.cancelled.push(task.id);
    }
}

/// Everything acknowledged is there, nothing else was created, and the log has no gap.
async fn check(store: &Store, acked: &Acknowledged) {
    let tasks = store
        .count_tasks(&TaskFilter::within(tasker_domain::Within::Any))
        .await
        .unwrap();
    assert_eq!(
        tasks,
        acked.tasks.len() as u64,
        "exactly the acknowledged tasks exist"
    );
    for id in &acked.tasks {
        store
            .task(*id)
            .await
            .unwrap_or_else(|err| panic!("task {id}: {err}"));
    }
    for id in &acked.completed_steps {
        let step = store.step(*id).await.unwrap();
        assert!(
            matches!(step.state, StepState::Complete | StepState::Cancelled),
            "step {id} was acknowledged complete: {:?}",
            step.state
        );
    }
    for id in &acked.cancelled {
        let task = store.task(*id).await.unwrap();
        assert_eq!(task.state, tasker_domain::TaskState::Cancelled);
    }
    let templates = store.templates(Some("shop"), None).await.unwrap();
    for name in &acked.templates {
        assert!(
            templates.iter().any(|t| &t.template.name == name),
            "template {name}"
        );
    }
    assert_eq!(
        templates.len(),
        acked.templates.len() + 1,
        "the diamond and the acknowledged"
    );
    let events = store
        .events_page(
            &EventFilter::within(tasker_domain::Within::Any),
            None,
            100_000,
        )
        .await
        .unwrap();
    let cursors: Vec<i64> = events.iter().map(|e| e.cursor().0).collect();
    let expected: Vec<i64> = (1..=cursors.len() as i64).collect();
    assert_eq!(cursors, expected, "the event log is numbered without gaps");
}

#[tokio::test]
async fn a_full_sqlite_database_refuses_writes_as_unavailable_and_keeps_every_acknowledged_one() {
    let clock = Arc::new(ManualClock::new(start()));
    let db = TestDatabase::sqlite(clock.clone()).await;
    let store = &db.store;
    store.register_template(DIAMOND, false).await.unwrap();
    let mut acked = Acknowledged::default();
    for round in 0..10 {
        write_round(store, round, Fault::DiskFull, &mut acked).await;
    }
    // The database may not grow past its current size: every new page is "disk full".
    store
        .execute_unprepared("PRAGMA max_page_count = 1")
        .await
        .unwrap();
    for round in 10..60 {
        write_round(store, round, Fault::DiskFull, &mut acked).await;
    }
    let (fault, _) = store.write_fault().expect("the store knows writes fail");
    assert_eq!(fault, Fault::DiskFull);
    // Reads go on meanwhile.
    assert_eq!(
        store
            .count_tasks(&TaskFilter::within(tasker_domain::Within::Any))
            .await
            .unwrap(),
        acked.tasks.len() as u64
    );
    let full_at = acked.tasks.len();

    store
        .execute_unprepared("PRAGMA max_page_count = 1073741823")
        .await
        .unwrap();
    store.probe_write().await.unwrap();
    assert_eq!(
        store.write_fault(),
        None,
        "a write that works ends the episode"
    );
    for round in 60..70 {
        write_round(store, round, Fault::DiskFull, &mut acked).await;
    }
    assert!(acked.tasks.len() > full_at, "writes work again");

    // An independent reader, then the file reopened, see exactly what was acknowledged.
    let reader = Store::connect(&db.options, clock.clone()).await.unwrap();
    check(&reader, &acked).await;
    reader.close().await.unwrap();
    db.store.clone().close().await.unwrap();
    let reopened = Store::connect(&db.options, clock).await.unwrap();
    check(&reopened, &acked).await;
}

#[tokio::test]
async fn a_writer_holding_the_lock_past_the_busy_timeout_is_a_busy_fault() {
    let clock = Arc::new(ManualClock::new(start()));
    let db = TestDatabase::sqlite(clock.clone()).await;
    let mut options = db.options.clone();
    options.busy_timeout = Duration::from_millis(100);
    let store = Store::connect(&options, clock.clone()).await.unwrap();
    store.register_template(DIAMOND, false).await.unwrap();
    let mut acked = Acknowledged::default();
    for round in 0..5 {
        write_round(&store, round, Fault::Busy, &mut acked).await;
    }
    // Each write waits out the whole busy timeout: one round shows it.
    let blocker = db.block_writes().await;
    write_round(&store, 5, Fault::Busy, &mut acked).await;
    assert_eq!(
        acked.tasks.len(),
        5,
        "nothing was acknowledged while the lock was held"
    );
    assert_eq!(
        store.write_fault().map(|(fault, _)| fault),
        Some(Fault::Busy)
    );
    assert_eq!(
        store
            .count_tasks(&TaskFilter::within(tasker_domain::Within::Any))
            .await
            .unwrap(),
        5,
        "reads are served"
    );
    blocker.release().await;
    for round in 10..15 {
        write_round(&store, round, Fault::Busy, &mut acked).await;
    }
    assert_eq!(acked.tasks.len(), 10);
    assert_eq!(store.write_fault(), None);
    store.close().await.unwrap();
    let reopened = Store::connect(&db.options, clock).await.unwrap();
    check(&reopened, &acked).await;
}

/// PostgreSQL when configured (see `testing::postgres_url`).
async fn postgres(clock: Arc<ManualClock>) -> Option<TestDatabase> {
    let url = tasker_store::testing::postgres_url()?;
    Some(TestDatabase::postgres(&url, clock).await)
}

#[tokio::test]
async fn postgres_sessions_ended_mid_transaction_and_statement_timeouts_lose_nothing() {
    let clock = Arc::new(ManualClock::new(start()));
    let Some(db) = postgres(clock.clone()).await else {
        return;
    };
    let mut options: StoreOptions = db.options.clone();
    options.statement_timeout = Some(Duration::from_millis(300));
    let store = Store::connect(&options, clock.clone()).await.unwrap();
    store.register_template(DIAMOND, false).await.unwrap();
    let mut acked = Acknowledged::default();
    for round in 0..5 {
        write_round(&store, round, Fault::Timeout, &mut acked).await;
    }

    // A statement that waits on a lock past statement_timeout.
    let blocker = db.block_writes().await;
    let timed_out = store.create_task(order("shop", "fulfil", 100)).await;
    assert!(
        matches!(
            timed_out,
            Err(Error::Unavailable {
                fault: Fault::Timeout,
                ..
            })
        ),
        "{timed_out:?}"
    );
    assert_eq!(store.write_fault().map(|(f, _)| f), Some(Fault::Timeout));
    blocker.release().await;
    write_round(&store, 5, Fault::Timeout, &mut acked).await;
    assert_eq!(store.write_fault(), None);

    // The session ended while the transaction waits inside (a restart, a network cut); a
    // store without a statement timeout, so that the wait lasts until the session ends.
    let patient = Store::connect(&db.options, clock.clone()).await.unwrap();
    let blocker = db.block_writes().await;
    let waiting = tokio::spawn({
        let store = patient.clone();
        async move { store.create_task(order("shop", "fulfil", 200)).await }
    });
    // The create is inside its transaction once its INSERT waits on the lock.
    assert!(
        db.until_a_session_waits(Duration::from_secs(30)).await,
        "the create waits on the lock"
    );
    assert!(db.terminate_sessions().await > 0);
    let ended = waiting.await.unwrap();
    assert!(
        matches!(
            ended,
            Err(Error::Unavailable {
                fault: Fault::Unreachable,
                ..
            })
        ),
        "{ended:?}"
    );
    blocker.release().await;
    assert_eq!(
        patient.write_fault().map(|(f, _)| f),
        Some(Fault::Unreachable)
    );
    patient.probe_write().await.unwrap();
    assert_eq!(
        patient.write_fault(),
        None,
        "the pool replaced the lost sessions"
    );
    // Writes go on.
    for round in 6..10 {
        write_round(&store, round, Fault::Unreachable, &mut acked).await;
    }
    assert_eq!(store.write_fault(), None);
    store.sequence_events().await.unwrap();
    check(&store, &acked).await;
    let fresh = Store::connect(&db.options, clock).await.unwrap();
    check(&fresh, &acked).await;
}

/// After SQLite rolled a transaction back on its own (the driver still counting it open), the
/// connection is closed and replaced, not reused: otherwise the next transactions become
/// savepoints, one failing operation leaves a transaction open for good, and every later
/// acknowledged write lives only in that connection.
#[tokio::test]
async fn a_connection_sqlite_rolled_back_on_its_own_is_replaced_not_reused() {
    let clock = Arc::new(ManualClock::new(start()));
    let db = TestDatabase::sqlite(clock.clone()).await;
    let store = &db.store;
    store.register_template(DIAMOND, false).await.unwrap();
    let first = store.create_task(order("shop", "fulfil", 1)).await.unwrap();
    db.roll_back_behind_the_drivers_back().await;
    // An operation refused inside its transaction (only a failed task can be retried).
    assert!(matches!(
        store.retry_task(first.task.id, None).await,
        Err(Error::Conflict(_))
    ));
    let second = store.create_task(order("shop", "fulfil", 2)).await.unwrap();
    let reader = Store::connect(&db.options, clock).await.unwrap();
    for id in [first.task.id, second.task.id] {
        reader
            .task(id)
            .await
            .expect("an acknowledged task is committed, visible to another connection");
    }
}
