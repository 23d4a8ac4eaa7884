//! GraphQL over WebSocket with a real client, in both subprotocols.

use crate::support::TestServer;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use tasker_store::testing::TestDatabase;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer, protocol: &str) -> Socket {
    connect_to(server.address, protocol).await
}

pub(crate) async fn connect_to(address: std::net::SocketAddr, protocol: &str) -> Socket {
    let mut request = format!("ws://{address}/graphql")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], protocol);
    socket
}

pub(crate) async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::text(message.to_string()))
        .await
        .unwrap();
}

/// The next JSON message, skipping keep-alives.
pub(crate) async fn receive(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] != "ka" && value["type"] != "ping" {
                return value;
            }
        }
    }
}

async fn server() -> TestServer {
    TestServer::start(TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await).await
}

#[tokio::test]
async fn graphql_transport_ws_runs_operations_and_reports_errors_with_codes() {
    let server = server().await;
    let mut socket = connect(&server, "graphql-transport-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");

    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "1", "payload": { "query": "{ namespaces { name } }" } }),
    )
    .await;
    let next = receive(&mut socket).await;
    assert_eq!(next["type"], "next");
    assert_eq!(next["payload"]["data"]["namespaces"], json!([]));
    assert_eq!(
        receive(&mut socket).await,
        json!({ "type": "complete", "id": "1" })
    );

    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "2",
                "payload": { "query": "subscription { heartbeat(everySeconds: 0) { sequence } }" } }),
    )
    .await;
    let error = receive(&mut socket).await;
    assert_eq!(error["id"], "2");
    let code = if error["type"] == "error" {
        error["payload"][0]["extensions"]["code"].clone()
    } else {
        error["payload"]["errors"][0]["extensions"]["code"].clone()
    };
    assert_eq!(code, "VALIDATION_FAILED", "{error}");

    // The connection still works after the error.
    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "3", "payload": { "query": "{ tasks { totalCount } }" } }),
    )
    .await;
    let next = loop {
        let message = receive(&mut socket).await;
        if message["id"] == "3" {
            break message;
        }
    };
    assert_eq!(next["payload"]["data"]["tasks"]["totalCount"], 0, "{next}");
}

#[tokio::test]
async fn the_legacy_graphql_ws_subprotocol_works_too() {
    let server = server().await;
    let mut socket = connect(&server, "graphql-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");
    send(
        &mut socket,
        json!({ "type": "start", "id": "1", "payload": { "query": "{ tasks { totalCount } }" } }),
    )
    .await;
    let data = receive(&mut socket).await;
    assert_eq!(data["type"], "data");
    assert_eq!(data["payload"]["data"]["tasks"]["totalCount"], 0);
}

async fn subscribe_events(server: &TestServer, after: Option<&str>) -> Socket {
    let mut socket = connect(server, "graphql-transport-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");
    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "events", "payload": {
            "query": "subscription($after: String) { events(filter: { namespaces: [\"shop\"] }, after: $after) { cursor name taskId } }",
            "variables": { "after": after } } }),
    )
    .await;
    socket
}

async fn next_event(socket: &mut Socket) -> Value {
    let message = receive(socket).await;
    assert_eq!(message["type"], "next", "{message}");
    message["payload"]["data"]["events"].clone()
}

const SHOP: &str = "namespace: shop\nname: fulfil\nversion: 1.0.0\nsteps:\n  - {name: a, handler: noop}\n  - {name: b, handler: noop, depends_on: [a]}\n";

/// Subscribe, receive, disconnect mid-stream, reconnect with the last cursor: exactly the
/// missing events arrive, in the order the `events` query gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_subscription_resumes_from_a_cursor_without_gaps_or_repeats() {
    for server in TestServer::all().await {
        server.register(SHOP).await;
        let head = server
            .data(
                "{ events(first: 500) { pageInfo { endCursor } } }",
                json!({}),
            )
            .await["events"]["pageInfo"]["endCursor"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut socket = subscribe_events(&server, Some(&head)).await;
        server
            .create_task(json!({ "namespace": "shop", "template": "fulfil" }))
            .await;
        let mut received = Vec::new();
        for _ in 0..2 {
            received.push(next_event(&mut socket).await);
        }
        socket.close(None).await.ok();

        // While disconnected, more happens.
        server
            .create_task(json!({ "namespace": "shop", "template": "fulfil" }))
            .await;
        let resume = received.last().unwrap()["cursor"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut socket = subscribe_events(&server, Some(&resume)).await;
        for _ in 0..6 {
            received.push(next_event(&mut socket).await);
        }
        let names: Vec<&str> = received
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "task.created",
                "step.created",
                "step.created",
                "task.steps_ready",
                "task.created",
                "step.created",
                "step.created",
                "task.steps_ready"
            ],
            "{}",
            server.backend()
        );
        // Nothing else is pending: the query agrees event for event.
        let page = server
            .data(
                "{ events(filter: { namespaces: [\"shop\"] }, first: 100) { edges { cursor node { name } } pageInfo { hasNextPage } } }",
                json!({}),
            )
            .await;
        let cursors: Vec<&Value> = page["events"]["edges"].as_array().unwrap()[1..]
            .iter()
            .map(|e| &e["cursor"])
            .collect();
        let streamed: Vec<&Value> = received.iter().map(|e| &e["cursor"]).collect();
        assert_eq!(cursors, streamed);
    }
}

#[tokio::test]
async fn bad_event_filters_and_cursors_are_refused_with_codes() {
    let server = server().await;
    let catalog = server
        .data(
            "{ eventCatalog { name description payloadFields } }",
            json!({}),
        )
        .await;
    assert!(catalog["eventCatalog"].as_array().unwrap().len() >= 16);
    for (query, code) in [
        (
            "{ events(filter: { names: [\"task.exploded\"] }) { nodes { name } } }",
            "VALIDATION_FAILED",
        ),
        (
            "{ events(after: \"bm90LWEtY3Vyc29y\") { nodes { name } } }",
            "VALIDATION_FAILED",
        ),
        (
            "{ events(first: 501) { nodes { name } } }",
            "VALIDATION_FAILED",
        ),
        (
            "{ events(filter: { taskId: \"0193a000-0000-7000-8000-000000000000\" }) { nodes { name } } }",
            "NOT_FOUND",
        ),
    ] {
        assert_eq!(server.error(query, json!({})).await.0, code, "{query}");
    }
    let mut socket = connect(&server, "graphql-transport-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    receive(&mut socket).await;
    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "1", "payload": { "query": "subscription { events(filter: { taskId: \"0193a000-0000-7000-8000-000000000000\" }) { name } }" } }),
    )
    .await;
    let error = receive(&mut socket).await;
    assert_eq!(
        error["payload"]["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{error}"
    );
}

const PAIR: &str = "namespace: ops\nname: pair\nversion: 1.0.0\nsteps:\n  - {name: a, handler: ext.a}\n  - {name: b, handler: ext.b, depends_on: [a]}\n";

async fn subscribe(server: &TestServer, id: &str, query: &str, variables: Value) -> Socket {
    let mut socket = connect(server, "graphql-transport-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");
    send(
        &mut socket,
        json!({ "type": "subscribe", "id": id, "payload": { "query": query, "variables": variables } }),
    )
    .await;
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_hear_of_new_work_and_dashboards_follow_a_task() {
    let server = server().await;
    server.register(PAIR).await;
    let mut available = subscribe(
        &server,
        "work",
        "subscription { stepsAvailable(input: { handlers: [\"ext.a\"] }) { readySteps } }",
        json!({}),
    )
    .await;
    while server.engine.work_listeners() == 0 {
        tokio::task::yield_now().await;
    }
    let id = server
        .create_task(json!({ "namespace": "ops", "template": "pair" }))
        .await["task"]["id"]
        .clone();
    let message = receive(&mut available).await;
    assert_eq!(
        message["payload"]["data"]["stepsAvailable"]["readySteps"], 1,
        "{message}"
    );

    let mut updates = subscribe(
        &server,
        "task",
        "subscription($id: ID!) { taskUpdated(id: $id) { task { state executionStatus stepCounts { complete } } changedSteps { name state } events { name } } }",
        json!({ "id": id }),
    )
    .await;
    let first = receive(&mut updates).await["payload"]["data"]["taskUpdated"].clone();
    assert_eq!(first["task"]["state"], "PENDING");
    assert_eq!(first["changedSteps"], json!([]));

    let leases = server
        .data(
            "mutation { claimSteps(input: { workerId: \"w\", handlers: [\"ext.a\"] }) { leases { leaseToken } } }",
            json!({}),
        )
        .await;
    let update = receive(&mut updates).await["payload"]["data"]["taskUpdated"].clone();
    assert_eq!(update["task"]["state"], "IN_PROGRESS");
    assert_eq!(
        update["changedSteps"],
        json!([{ "name": "a", "state": "IN_PROGRESS" }])
    );
    let names: Vec<&str> = update["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["task.started", "step.started"]);

    server
        .data(
            "mutation($t: ID!) { completeStep(input: { leaseToken: $t }) { step { state } } }",
            json!({ "t": leases["claimSteps"]["leases"][0]["leaseToken"] }),
        )
        .await;
    let update = receive(&mut updates).await["payload"]["data"]["taskUpdated"].clone();
    assert_eq!(
        update["changedSteps"],
        json!([{ "name": "a", "state": "COMPLETE" }])
    );
    assert_eq!(update["task"]["stepCounts"]["complete"], 1);
    assert_eq!(update["task"]["executionStatus"], "HAS_READY_STEPS");

    let mut bad = subscribe(
        &server,
        "bad",
        "subscription { taskUpdated(id: \"nope\") { task { state } } }",
        json!({}),
    )
    .await;
    let error = receive(&mut bad).await;
    assert_eq!(
        error["payload"]["errors"][0]["extensions"]["code"], "VALIDATION_FAILED",
        "{error}"
    );
}

/// A subscriber on replica B hears of events written through replica A (PostgreSQL): the log
/// is shared, and NOTIFY wakes B's subscribers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_replica_receives_events_written_on_another() {
    let Some(url) = tasker_store::testing::postgres_url() else {
        return;
    };
    let clock = std::sync::Arc::new(tasker_domain::SystemClock);
    let a = TestServer::start(TestDatabase::postgres(&url, clock.clone()).await).await;
    // Replica B: its own store, engine and listener on the same schema, wired as production.
    let store_b = tasker_store::Store::connect(&a.db.options, clock)
        .await
        .unwrap();
    let replica = tasker::App::build_on(&TestServer::settings(), store_b)
        .await
        .unwrap();
    let b = replica.address();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(replica.serve(async move {
        let _ = stopped.await;
    }));

    a.register(PAIR).await;
    let head = a
        .data(
            "{ events(first: 500) { pageInfo { endCursor } } }",
            json!({}),
        )
        .await["events"]["pageInfo"]["endCursor"]
        .clone();
    let mut socket = connect_to(b, "graphql-transport-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");
    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "1", "payload": {
            "query": "subscription($after: String) { events(after: $after) { name } }",
            "variables": { "after": head } } }),
    )
    .await;
    a.create_task(json!({ "namespace": "ops", "template": "pair" }))
        .await;
    let mut names = Vec::new();
    for _ in 0..3 {
        let message = receive(&mut socket).await;
        names.push(
            message["payload"]["data"]["events"]["name"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(names, ["task.created", "step.created", "step.created"]);
    let _ = stop.send(());
    // The replica stops and closes its database.
    serving.await.unwrap().unwrap();
}

const TASK_UPDATES: &str = "subscription($id: ID!, $after: String) { taskUpdated(id: $id, after: $after) { cursor last task { state } events { cursor name } } }";

/// The next `next` payload's data for `field`, or `None` when the server completed the stream.
async fn next_data(socket: &mut Socket, field: &str) -> Option<Value> {
    let message = receive(socket).await;
    match message["type"].as_str() {
        Some("complete") => None,
        Some("next") => {
            assert!(message["payload"]["errors"].is_null(), "{message}");
            Some(message["payload"]["data"][field].clone())
        }
        _ => panic!("unexpected message {message}"),
    }
}

fn cursors(events: &Value) -> Vec<String> {
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cursor"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_updated_resumes_from_a_cursor_as_the_log_says_and_completes_when_the_task_ends() {
    for server in TestServer::all().await {
        server.register(PAIR).await;
        let id = server
            .create_task(json!({ "namespace": "ops", "template": "pair" }))
            .await["task"]["id"]
            .clone();
        let mut first = subscribe(&server, "t", TASK_UPDATES, json!({ "id": id })).await;
        let snapshot = next_data(&mut first, "taskUpdated").await.unwrap();
        assert_eq!(snapshot["task"]["state"], "PENDING", "{}", server.backend());
        assert_eq!(snapshot["events"], json!([]));
        assert_eq!(snapshot["last"], false);

        let a = server.claim("ext.a", 1).await[0].clone();
        let started = next_data(&mut first, "taskUpdated").await.unwrap();
        assert_eq!(started["task"]["state"], "IN_PROGRESS");
        let seen = cursors(&started["events"]);
        assert_eq!(started["cursor"].as_str(), seen.last().map(String::as_str));
        drop(first);

        // Away: a completes, b is claimed.
        server.complete(&a).await;
        let b = server.claim("ext.b", 1).await[0].clone();
        let mut resumed = subscribe(
            &server,
            "t",
            TASK_UPDATES,
            json!({ "id": id, "after": started["cursor"] }),
        )
        .await;
        let caught_up = next_data(&mut resumed, "taskUpdated").await.unwrap();
        let log = server.event_cursors(&id).await;
        let seen_up_to = log.iter().position(|c| *c == started["cursor"]).unwrap();
        let polled = log[seen_up_to + 1..].to_vec();
        assert_eq!(cursors(&caught_up["events"]), polled, "no gap, no repeat");
        assert!(!polled.is_empty());
        assert_eq!(caught_up["last"], false);

        // b completes: the task ends, the last update says so, and the stream completes.
        server.complete(&b).await;
        let mut names = Vec::new();
        let mut last = Value::Null;
        while let Some(update) = next_data(&mut resumed, "taskUpdated").await {
            names.extend(
                update["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["name"].as_str().unwrap().to_owned()),
            );
            last = update;
        }
        assert_eq!(last["last"], true, "{last}");
        assert_eq!(last["task"]["state"], "COMPLETE");
        assert!(names.contains(&"task.completed".to_owned()), "{names:?}");

        // Resuming after the end: the task as it is, marked last, then complete.
        let mut after_end = subscribe(
            &server,
            "t",
            TASK_UPDATES,
            json!({ "id": id, "after": last["cursor"] }),
        )
        .await;
        let end = next_data(&mut after_end, "taskUpdated").await.unwrap();
        assert_eq!(end["last"], true);
        assert_eq!(end["events"], json!([]));
        assert!(next_data(&mut after_end, "taskUpdated").await.is_none());
    }
}

/// The snapshot race: subscriptions opened while the change that ends the task commits. Each
/// reads the log's head before the task, so whichever side of the commit it lands on, it sees
/// the task end and completes (reading the task first would leave some waiting forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_while_a_subscription_starts_is_delivered() {
    let server = server().await;
    server
        .register(
            "namespace: ops\nname: one\nversion: 1.0.0\nsteps:\n  - {name: x, handler: ext.x}\n",
        )
        .await;
    for _ in 0..10 {
        let id = server
            .create_task(json!({ "namespace": "ops", "template": "one" }))
            .await["task"]["id"]
            .clone();
        let lease = server.claim("ext.x", 1).await[0].clone();
        let watchers = (0..6).map(|_| {
            let server = &server;
            let id = id.clone();
            async move {
                let mut socket = subscribe(server, "r", TASK_UPDATES, json!({ "id": id })).await;
                let mut last = Value::Null;
                while let Some(update) = next_data(&mut socket, "taskUpdated").await {
                    last = update;
                }
                last
            }
        });
        let (ends, ()) = tokio::join!(futures::future::join_all(watchers), server.complete(&lease));
        for end in ends {
            assert_eq!(end["task"]["state"], "COMPLETE", "{end}");
            assert_eq!(end["last"], true);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_updated_follows_a_filtered_list_live_and_resumes() {
    for server in TestServer::all().await {
        let registered = server.register(PAIR).await;
        assert_eq!(registered["result"], "CREATED");
        let since = server.data("{ eventHead }", json!({})).await["eventHead"].clone();
        const LIST: &str = "subscription($after: String) { tasksUpdated(filter: {namespace: \"ops\", template: \"pair\", tags: [\"watched\"]}, after: $after) { cursor event { name cursor } task { id state tags } } }";
        let mut list = subscribe(&server, "l", LIST, json!({ "after": since })).await;
        let watched = server
            .create_task(json!({ "namespace": "ops", "template": "pair", "tags": ["watched"] }))
            .await["task"]["id"]
            .clone();
        server
            .create_task(json!({ "namespace": "ops", "template": "pair" }))
            .await;
        let created = next_data(&mut list, "tasksUpdated").await.unwrap();
        assert_eq!(
            created["event"]["name"],
            "task.created",
            "{}",
            server.backend()
        );
        assert_eq!(created["task"]["id"], watched);
        assert_eq!(created["cursor"], created["event"]["cursor"]);

        // Both tasks start; only the watched one is announced.
        assert_eq!(server.claim("ext.a", 1).await.len(), 1);
        assert_eq!(server.claim("ext.a", 1).await.len(), 1);
        let started = next_data(&mut list, "tasksUpdated").await.unwrap();
        assert_eq!(started["event"]["name"], "task.started");
        assert_eq!(started["task"]["id"], watched);
        assert_eq!(started["task"]["state"], "IN_PROGRESS");
        drop(list);

        // Resumed after the creation: the start comes again, with the same cursor.
        let mut resumed =
            subscribe(&server, "l", LIST, json!({ "after": created["cursor"] })).await;
        let again = next_data(&mut resumed, "tasksUpdated").await.unwrap();
        assert_eq!(again["cursor"], started["cursor"]);
        assert_eq!(again["event"]["name"], "task.started");
    }
}

/// A server whose retention sweep keeps finished tasks one day and looks every few
/// milliseconds, on a clock the test moves.
async fn retaining_server(db: TestDatabase) -> TestServer {
    let settings = tasker::config::Settings {
        workers: tasker_engine::WorkerPoolConfig::default().concurrency,
        retention: tasker_engine::RetentionPolicy {
            keep: Some(std::time::Duration::from_secs(24 * 3600)),
            batch: 1,
            every: std::time::Duration::from_millis(5),
        },
        ..TestServer::settings()
    };
    TestServer::start_with(db, settings).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_sweep_deletes_old_tasks_and_an_older_cursor_gets_cursor_expired() {
    let clock = Arc::new(tasker_domain::ManualClock::new(chrono::Utc::now()));
    for db in TestDatabase::all(clock.clone()).await {
        let server = retaining_server(db).await;
        server.register(crate::support::DIAMOND).await;
        let task_query = "query($id: ID!) { task(id: $id) { id state } }";
        let mut ids = Vec::new();
        for order in [1, 2] {
            let id = server
                .create_task(json!({ "namespace": "shop", "template": "fulfil", "context": { "order_id": order } }))
                .await["task"]["id"]
                .clone();
            assert_eq!(
                server.finished_task(task_query, &id).await["state"],
                "COMPLETE"
            );
            ids.push(id);
        }
        let first_cursors = server.event_cursors(&ids[0]).await;
        let last_of_second = server.event_cursors(&ids[1]).await.pop().unwrap();

        // Two days on, the sweep deletes both; a third task, just finished, stays.
        clock.advance(chrono::Duration::days(2));
        let kept = server
            .create_task(
                json!({ "namespace": "shop", "template": "fulfil", "context": { "order_id": 3 } }),
            )
            .await["task"]["id"]
            .clone();
        assert_eq!(
            server.finished_task(task_query, &kept).await["state"],
            "COMPLETE"
        );
        // A sweep that began before the clock moved may miss them; the one after it does not.
        let mut sweeps = server.engine.retention_sweeps();
        let seen = *sweeps.borrow_and_update();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            sweeps.wait_for(|sweeps| sweeps.wrapping_sub(seen) >= 2),
        )
        .await
        .expect("two sweeps within 30 s")
        .unwrap();
        for id in &ids {
            let (code, _) = server.error(task_query, json!({ "id": id })).await;
            assert_eq!(code, "NOT_FOUND", "the sweep deleted {id}");
        }
        let (code, _) = server
            .error(
                "query($f: EventFilterInput) { events(filter: $f) { edges { cursor } } }",
                json!({ "f": { "taskId": ids[0] } }),
            )
            .await;
        assert_eq!(code, "NOT_FOUND", "the task and its events are gone");
        assert_eq!(
            server.data(task_query, json!({ "id": kept })).await["task"]["state"],
            "COMPLETE"
        );

        // A cursor from before what the log retains is refused by the query and the
        // subscription alike, and the error says where everything retained starts.
        let page = "query($after: String) { events(after: $after, first: 500) { edges { cursor node { taskId } } } }";
        let (code, error) = server
            .error(page, json!({ "after": first_cursors[0] }))
            .await;
        assert_eq!(code, "CURSOR_EXPIRED", "{error}");
        let pruned_through = error["extensions"]["prunedThrough"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(pruned_through, last_of_second, "the highest cursor deleted");
        assert!(
            error["message"].as_str().unwrap().contains("eventHead"),
            "{error}"
        );
        let mut socket = subscribe_events(&server, Some(&first_cursors[0])).await;
        let refused = receive(&mut socket).await;
        let code = if refused["type"] == "error" {
            &refused["payload"][0]["extensions"]["code"]
        } else {
            &refused["payload"]["errors"][0]["extensions"]["code"]
        };
        assert_eq!(code, "CURSOR_EXPIRED", "{refused}");

        // From that cursor on, everything retained: the kept task's events.
        let resumed = server.data(page, json!({ "after": pruned_through })).await;
        let tasks: Vec<&Value> = resumed["events"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|edge| &edge["node"]["taskId"])
            .collect();
        assert!(
            !tasks.is_empty() && tasks.iter().all(|task| **task == kept),
            "{resumed:#}"
        );
    }
}
