//! What an operator reads: `/metrics` after a run (families, values, bounded labels,
//! `promtool check metrics`, its permission) and `/health/status` (grouped counts, the ready
//! queue's age and the threshold that makes the server unhealthy).

use crate::auth::token;
use crate::support::TestServer;
use futures::StreamExt as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tasker_client::{Client, NewTask, TaskState};
use tasker_store::testing::TestDatabase;

const FLAKY: &str = "namespace: ops\nname: flaky\nversion: 1.0.0\nsteps:\n  - {name: first, handler: noop, config: {fail_attempts: 1}, retry: {max_attempts: 2, backoff: {base: 0.01, jitter: 0}}}\n  - {name: second, handler: noop, depends_on: [first]}\n";

/// The samples of a Prometheus text exposition, by `name{labels}`.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// `promtool check metrics` on `text`, where promtool is installed (required in CI).
fn promtool_check(text: &str) {
    use std::io::Write as _;
    let promtool = std::env::var("TASKER_TEST_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            assert!(
                std::env::var("TASKER_TEST_REQUIRE_PROMTOOL").is_err(),
                "TASKER_TEST_REQUIRE_PROMTOOL is set but {promtool} cannot run: {err}"
            );
            eprintln!("skipped promtool: {err} (apt-get install prometheus)");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool: {said}\n{text}");
    assert!(said.trim().is_empty(), "promtool lints: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_what_the_server_did_with_bounded_labels_and_pass_promtool() {
    let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
    let server = crate::cli::secured_running(db).await;
    let client = Client::new(&server.url(""))
        .unwrap()
        .with_token(token(&["*"], &["*"]));
    client.register_template(FLAKY, false).await.unwrap();
    let created = client
        .create_task(&NewTask::new("ops", "flaky"))
        .await
        .unwrap();
    let mut updates = client.follow_task(&created.task.id, None);
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = updates.next().await {
            let update = update.unwrap();
            if update.last {
                return update.task;
            }
        }
        panic!("the stream ended first");
    })
    .await
    .unwrap();
    assert_eq!(ended.state, TaskState::Complete);
    let refused = client
        .create_task(&NewTask::new("ops", "nope"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("NOT_FOUND"));
    // A query sent over a WebSocket counts like one sent over HTTP.
    {
        use crate::websocket::{connect_to, receive, send};
        let mut socket = connect_to(server.address, "graphql-transport-ws").await;
        let authorization = format!("Bearer {}", token(&["*"], &["*"]));
        send(
            &mut socket,
            json!({ "type": "connection_init", "payload": { "authorization": authorization } }),
        )
        .await;
        assert_eq!(receive(&mut socket).await["type"], "connection_ack");
        send(
            &mut socket,
            json!({ "type": "subscribe", "id": "q", "payload": { "query": "{ templates { key } }" } }),
        )
        .await;
        assert_eq!(receive(&mut socket).await["type"], "next");
        assert_eq!(receive(&mut socket).await["type"], "complete");
    }

    let scrape = |token: Option<String>| {
        let mut request = server.http().get(server.url("/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let kind = response
                .headers()
                .get("content-type")
                .map(|value| value.to_str().unwrap().to_owned());
            (status, kind, response.text().await.unwrap())
        }
    };
    let (status, kind, text) = scrape(Some(token(&["tasker.metrics:index"], &["*"]))).await;
    assert_eq!(status, 200, "{text}");
    assert!(kind.unwrap().starts_with("text/plain; version=0.0.4"));
    let values = samples(&text);
    let value = |key: &str| {
        *values
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{text}"))
    };
    for (key, expected) in [
        (
            r#"tasker_step_attempts_total{handler="noop",outcome="failed"}"#,
            1.0,
        ),
        (
            r#"tasker_step_attempts_total{handler="noop",outcome="completed"}"#,
            2.0,
        ),
        (r#"tasker_step_retries_total{handler="noop"}"#, 1.0),
        (r#"tasker_steps_claimed_total{handler="noop"}"#, 3.0),
        (
            r#"tasker_step_claim_wait_seconds_count{handler="noop"}"#,
            3.0,
        ),
        (
            r#"tasker_step_attempt_duration_seconds_count{handler="noop",outcome="completed"}"#,
            2.0,
        ),
        (r#"tasker_tasks{namespace="ops",state="complete"}"#, 1.0),
        (r#"tasker_steps{namespace="ops",state="complete"}"#, 2.0),
        (
            r#"tasker_graphql_operations_total{type="mutation",operation="createTask",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"tasker_graphql_operations_total{type="mutation",operation="createTask",outcome="NOT_FOUND"}"#,
            1.0,
        ),
        (
            r#"tasker_graphql_operations_total{type="mutation",operation="registerTemplate",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"tasker_graphql_operation_duration_seconds_count{type="mutation",operation="createTask"}"#,
            2.0,
        ),
        (
            r#"tasker_graphql_operations_total{type="query",operation="templates",outcome="ok"}"#,
            1.0,
        ),
        ("tasker_ready_steps", 0.0),
        ("tasker_database_up", 1.0),
        ("tasker_oldest_ready_step_age_seconds", 0.0),
        (r#"tasker_build_info{version="0.1.0"}"#, 1.0),
    ] {
        assert_eq!(value(key), expected, "{key}");
    }
    // The head the API gives (a cursor over the log's position) is the one scraped.
    let head = client.event_head().await.unwrap();
    let head = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &head)
        .map(|bytes| String::from_utf8(bytes).unwrap())
        .unwrap_or_default();
    assert_eq!(
        format!("ev2:{}", value("tasker_event_log_head")),
        head,
        "the scraped head"
    );
    // SQLite's pool is its one connection, in use or idle depending on the moment.
    assert_eq!(
        value(r#"tasker_db_connections{state="in_use"}"#)
            + value(r#"tasker_db_connections{state="idle"}"#),
        1.0
    );
    assert!(value("tasker_start_time_seconds") > 1.7e9);
    // The subscription above has ended; the WebSocket it used has closed.
    assert_eq!(value("tasker_subscriptions"), 0.0);
    // Labels never carry ids.
    assert!(!text.contains(&created.task.id), "{text}");
    promtool_check(&text);

    // Without a token, without the permission, or kept to some namespaces: refused.
    assert_eq!(scrape(None).await.0, 401);
    let (status, _, body) = scrape(Some(token(&["tasker.task:*"], &["*"]))).await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = scrape(Some(token(&["tasker.metrics:index"], &["ops"]))).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("all namespaces"), "{body}");
}

#[tokio::test]
async fn health_status_groups_the_counts_and_turns_unhealthy_when_work_waits_too_long() {
    let clock = Arc::new(tasker_domain::ManualClock::new(chrono::Utc::now()));
    for db in TestDatabase::all(clock.clone()).await {
        let backend = db.backend();
        let server = TestServer::start(db).await;
        server
            .register("namespace: ops\nname: waits\nversion: 1.0.0\nsteps:\n  - {name: outside, handler: ext.nobody}\n")
            .await;
        server
            .create_task(json!({ "namespace": "ops", "template": "waits" }))
            .await;
        let status = || async {
            let response = server
                .http()
                .get(server.url("/health/status"))
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        };
        let (code, body) = status().await;
        assert_eq!(code, 200, "{backend}: {body}");
        assert_eq!(body["status"], "ok");
        assert_eq!(body["tasks"]["pending"], 1);
        assert_eq!(body["tasks"]["complete"], 0, "every state is listed");
        assert_eq!(body["tasks_by_namespace"]["ops"]["pending"], 1);
        assert_eq!(body["ready_steps"], 1);
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
        assert!(body["replica_id"].as_str().unwrap().contains('-'));
        assert!(body["pool"]["in_use"].as_u64().is_some(), "{body}");

        // Nobody claims `ext.nobody`: past the threshold (300 s by default) it is unhealthy.
        clock.advance(chrono::Duration::seconds(301));
        let (code, body) = status().await;
        assert_eq!(code, 503, "{backend}: {body}");
        assert_eq!(body["status"], "unhealthy");
        assert_eq!(body["oldest_ready_seconds"], 301.0);
        assert!(
            body["problems"][0]
                .as_str()
                .unwrap()
                .contains("has waited 301 s to be claimed"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn log_lines_carry_the_request_id_and_the_task_step_and_correlation_of_their_work() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, address, logs) = crate::binary::start_with(
        dir.path(),
        &[
            "--jwt-secret",
            crate::auth::SECRET,
            "--jwt-issuer",
            crate::auth::ISSUER,
            "--jwt-audience",
            crate::auth::AUDIENCE,
        ],
    );
    let client = crate::support::http_client();
    let url = format!("http://{address}/graphql");
    // A caller's own id comes back, and names the request's log lines.
    let refused = client
        .post(&url)
        .header("x-request-id", "e2e-request-7")
        .bearer_auth("not-a-token")
        .json(&json!({ "query": "{ eventHead }" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["x-request-id"], "e2e-request-7");
    // Without one (or with one that is not printable ASCII), the server makes one up.
    for given in [None, Some("bad id with spaces")] {
        let mut request = client.post(&url).json(&json!({ "query": "{ eventHead }" }));
        if let Some(given) = given {
            request = request.header("x-request-id", given);
        }
        let answer = request.send().await.unwrap();
        let id = answer.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    }
    // Work in the engine: an http step the outbound policy refuses logs a warning.
    let admin = token(&["*"], &["*"]);
    let graphql = |query: &str, variables: Value| {
        client
            .post(&url)
            .bearer_auth(&admin)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
    };
    graphql(
        "mutation($d: String!) { registerTemplate(input: { definition: $d }) { result } }",
        json!({ "d": "namespace: ops\nname: call\nversion: 1.0.0\nsteps:\n  - {name: ping, handler: http, config: {url: \"http://127.0.0.1:9/ping\"}, retry: {max_attempts: 1}}\n" }),
    )
    .await
    .unwrap();
    let created: Value = graphql(
        "mutation { createTask(input: { namespace: \"ops\", template: \"call\", correlationId: \"corr-42\" }) { task { id steps { id } } } }",
        json!({}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let task = &created["data"]["createTask"]["task"];
    let (mut request_line, mut step_line) = (None, None);
    while request_line.is_none() || step_line.is_none() {
        let line = logs
            .recv_timeout(Duration::from_secs(30))
            .expect("the server logs both lines");
        let entry: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        match entry["fields"]["message"].as_str() {
            Some("refused a request without valid credentials") => {
                // Each refused request has its line, with its own id.
                let id = entry["span"]["request_id"].as_str().unwrap().to_owned();
                if id == "e2e-request-7" {
                    request_line = Some(entry);
                } else {
                    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{entry}");
                }
            }
            Some("http step refused by the outbound policy") => step_line = Some(entry),
            _ => {}
        }
    }
    let request_line = request_line.unwrap();
    assert_eq!(
        request_line["span"]["request_id"], "e2e-request-7",
        "{request_line}"
    );
    assert_eq!(request_line["span"]["path"], "/graphql");
    let step_line = step_line.unwrap();
    assert_eq!(step_line["span"]["task_id"], task["id"], "{step_line}");
    assert_eq!(step_line["span"]["step_id"], task["steps"][0]["id"]);
    assert_eq!(step_line["span"]["correlation_id"], "corr-42");
    assert_eq!(step_line["span"]["step"], "ping");
    assert!(crate::binary::terminate(&mut child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_ends_long_polls_and_subscriptions_cleanly_and_its_subscriber_resumes_on_another()
 {
    use crate::websocket::{connect_to, receive, send};
    let clock = Arc::new(tasker_domain::SystemClock);
    for db in TestDatabase::all(clock.clone()).await {
        let backend = db.backend();
        let options = db.options.clone();
        let survivor = TestServer::start(db).await;
        // A second replica on the same database, with its own connection.
        let store = tasker_store::Store::connect(&options, clock.clone())
            .await
            .unwrap();
        let replica = tasker::App::build_on(&TestServer::settings(), store)
            .await
            .unwrap();
        let (address, engine) = (replica.address(), replica.engine().clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(replica.serve(async move {
            let _ = stopped.await;
        }));
        survivor.register(crate::dashboard::WORK).await;
        let head = survivor.data("{ eventHead }", json!({})).await["eventHead"].clone();

        // On the replica: a subscriber to the log, and a worker parked in a long poll.
        let mut socket = connect_to(address, "graphql-transport-ws").await;
        send(&mut socket, json!({ "type": "connection_init" })).await;
        assert_eq!(receive(&mut socket).await["type"], "connection_ack");
        let subscription = "subscription($after: String) { events(after: $after) { cursor name } }";
        send(
            &mut socket,
            json!({ "type": "subscribe", "id": "log", "payload": {
                "query": subscription, "variables": { "after": head } } }),
        )
        .await;
        let poll = tokio::spawn(
            crate::support::http_client()
                .post(format!("http://{address}/graphql"))
                .json(&json!({ "query": "mutation { claimSteps(input: { workerId: \"parked\", handlers: [\"ext.none\"], waitSeconds: 30 }) { leases { stepId } } }" }))
                .send(),
        );
        while engine.work_listeners() == 0 {
            tokio::task::yield_now().await;
        }
        survivor
            .create_task(json!({ "namespace": "ui", "template": "diamond" }))
            .await;
        let mut received: Vec<String> = Vec::new();
        for _ in 0..3 {
            let message = receive(&mut socket).await;
            assert_eq!(message["type"], "next", "{backend}: {message}");
            received.push(
                message["payload"]["data"]["events"]["cursor"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }

        // The replica is told to stop: it drains.
        stop.send(()).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), poll)
            .await
            .expect("the long poll answers at once, not after its 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(answer.status(), 200);
        let answer: Value = answer.json().await.unwrap();
        assert_eq!(
            answer["data"]["claimSteps"]["leases"],
            json!([]),
            "{backend}: {answer}"
        );
        // The subscriber sees the rest of what was committed, then a clean `complete`.
        loop {
            let message = receive(&mut socket).await;
            match message["type"].as_str() {
                Some("next") => received.push(
                    message["payload"]["data"]["events"]["cursor"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                ),
                Some("complete") => {
                    assert_eq!(message["id"], "log");
                    break;
                }
                other => panic!("{backend}: unexpected {other:?}: {message}"),
            }
        }
        tokio::time::timeout(Duration::from_secs(30), serving)
            .await
            .expect("the replica stops within its grace")
            .unwrap()
            .unwrap();

        // Work goes on elsewhere; the subscriber resumes on the survivor from its cursor.
        survivor
            .create_task(json!({ "namespace": "ui", "template": "diamond" }))
            .await;
        let log: Vec<String> = survivor
            .data(
                "query($after: String) { events(first: 500, after: $after) { edges { cursor } } }",
                json!({ "after": head }),
            )
            .await["events"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|edge| edge["cursor"].as_str().unwrap().to_owned())
            .collect();
        let mut socket = connect_to(survivor.address, "graphql-transport-ws").await;
        send(&mut socket, json!({ "type": "connection_init" })).await;
        assert_eq!(receive(&mut socket).await["type"], "connection_ack");
        send(
            &mut socket,
            json!({ "type": "subscribe", "id": "log", "payload": {
                "query": subscription, "variables": { "after": received.last() } } }),
        )
        .await;
        while received.len() < log.len() {
            let message = receive(&mut socket).await;
            assert_eq!(message["type"], "next", "{backend}: {message}");
            received.push(
                message["payload"]["data"]["events"]["cursor"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        assert_eq!(received, log, "{backend}: every event once, in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_pool_gives_back_the_http_steps_that_do_not_finish_within_its_grace() {
    // A service that takes the request and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    let (arrived, mut arrival) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            let _ = arrived.send(());
            held.push(socket);
        }
    });
    let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
    let settings = tasker::config::Settings {
        workers: 4,
        outbound: tasker_engine::OutboundPolicy::allowing(&["127.0.0.1"]).unwrap(),
        drain_grace: Duration::from_millis(300),
        ..TestServer::settings()
    };
    let app = tasker::App::build_on(&settings, db.store.clone())
        .await
        .unwrap();
    let address = app.address();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(app.serve(async move {
        let _ = stopped.await;
    }));
    let client = crate::support::http_client();
    let graphql = |query: String| {
        client
            .post(format!("http://{address}/graphql"))
            .json(&json!({ "query": query }))
            .send()
    };
    graphql(format!(
        "mutation {{ registerTemplate(input: {{ definition: {:?} }}) {{ result }} }}",
        format!("namespace: ops\nname: slow\nversion: 1.0.0\nsteps:\n  - {{name: call, handler: http, config: {{url: \"http://{service}/\"}}}}\n")
    ))
    .await
    .unwrap();
    let created: Value = graphql(
        "mutation { createTask(input: { namespace: \"ops\", template: \"slow\" }) { task { id } } }"
            .to_owned(),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let task_id: uuid::Uuid = created["data"]["createTask"]["task"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), arrival.recv())
        .await
        .expect("the step's request reaches the service");

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("the server stops after its grace")
        .unwrap()
        .unwrap();
    // The step was given back: pending, its attempt not counted, `step.released` in the log.
    let store = tasker_store::Store::connect(&db.options, Arc::new(tasker_domain::SystemClock))
        .await
        .unwrap();
    let steps = store.steps_for_tasks(&[task_id]).await.unwrap();
    assert_eq!(steps[0].state, tasker_domain::StepState::Pending);
    assert_eq!(steps[0].attempts, 0);
    let events = store.events_for_tasks(&[task_id]).await.unwrap();
    assert!(events.iter().any(|event| event.name == "step.released"));
}

#[tokio::test]
async fn on_sigterm_the_real_binary_completes_subscriptions_and_exits_cleanly() {
    use crate::websocket::{connect_to, receive, send};
    let dir = tempfile::tempdir().unwrap();
    let (mut child, address, _logs) = crate::binary::start_with(dir.path(), &[]);
    let mut socket = connect_to(address.parse().unwrap(), "graphql-transport-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");
    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "log", "payload": {
            "query": "subscription { events { cursor } }" } }),
    )
    .await;
    let pid = child.id().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let message = receive(&mut socket).await;
    assert_eq!(
        (message["type"].as_str(), message["id"].as_str()),
        (Some("complete"), Some("log")),
        "{message}"
    );
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// The spans an in-test OTLP collector received, searched by trace and name.
struct Collector {
    received: tokio::sync::mpsc::UnboundedReceiver<opentelemetry_proto::tonic::trace::v1::Span>,
    seen: Vec<opentelemetry_proto::tonic::trace::v1::Span>,
}

impl Collector {
    /// Starts a collector (OTLP over HTTP/protobuf); returns it with its endpoint.
    async fn start() -> (Collector, String) {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sender = sender.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body).unwrap();
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                let _ = sender.send(span);
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let collector = Collector {
            received,
            seen: Vec::new(),
        };
        (collector, endpoint)
    }

    /// The first span of that name in that trace, waiting for it to be exported.
    async fn span(
        &mut self,
        trace_id: &str,
        name: &str,
    ) -> opentelemetry_proto::tonic::trace::v1::Span {
        loop {
            if let Some(span) = self
                .seen
                .iter()
                .find(|span| hex(&span.trace_id) == trace_id && span.name == name)
            {
                return span.clone();
            }
            let span = tokio::time::timeout(Duration::from_secs(30), self.received.recv())
                .await
                .unwrap_or_else(|_| panic!("no {name} span was exported in trace {trace_id}"))
                .unwrap();
            self.seen.push(span);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Attribute = opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A span attribute's value.
fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<Attribute> {
    span.attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| attribute.value.as_ref())
        .and_then(|value| value.value.clone())
}

/// A text attribute's value, to compare with.
fn text(value: &str) -> Option<Attribute> {
    Some(Attribute::StringValue(value.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_spans_go_to_an_otlp_collector_in_the_callers_trace() {
    let (mut collector, endpoint) = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A service an http step calls: it hands over the traceparent it was sent.
    let (called, mut calls) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    let service = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let called = called.clone();
            async move {
                let traceparent = headers
                    .get("traceparent")
                    .map(|value| value.to_str().unwrap().to_owned());
                let _ = called.send(traceparent);
                axum::Json(json!({ "ok": true }))
            }
        }),
    );
    let service_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_address = service_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(service_listener, service).await });

    let (mut child, address, _logs) = crate::binary::start_with_env(
        dir.path(),
        &["--http-allow", "127.0.0.1"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            // The database statements' spans too.
            ("TASKER_TRACE", "info,sqlx=warn"),
        ],
    );
    let client = crate::support::http_client();
    // A request in the caller's own trace (sampled), from the caller's span.
    let traced = |trace_id: &str, query: String| {
        client
            .post(format!("http://{address}/graphql"))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .json(&json!({ "query": query }))
            .send()
    };
    let template = format!(
        "namespace: ops\nname: hook\nversion: 1.0.0\nsteps:\n  - {{name: notify, handler: http, config: {{url: \"http://{service_address}/hook\", method: POST}}}}\n  - {{name: review, handler: external_review, depends_on: [notify]}}\n"
    );
    let registered = traced(
        "0af7651916cd43dd8448eb211c80319c",
        format!(
            "mutation {{ registerTemplate(input: {{ definition: {template:?} }}) {{ result }} }}"
        ),
    )
    .await
    .unwrap()
    .json::<Value>()
    .await
    .unwrap();
    assert!(registered.get("errors").is_none(), "{registered}");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let created: Value = traced(
        trace_id,
        "mutation { createTask(input: { namespace: \"ops\", template: \"hook\" }) { task { id } } }".to_owned(),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let task_id = created["data"]["createTask"]["task"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The request joins the caller's trace; the operation, the task's creation and its
    // database statements nest inside it.
    let request = collector.span(trace_id, "request").await;
    assert_eq!(
        hex(&request.parent_span_id),
        "00f067aa0ba902b7",
        "the caller's span is the parent"
    );
    let operation = collector.span(trace_id, "graphql.operation").await;
    assert_eq!(
        operation.parent_span_id, request.span_id,
        "the operation runs inside the request"
    );
    assert_eq!(
        attribute(&operation, "graphql.operation.field"),
        text("createTask"),
        "{operation:?}"
    );
    assert_eq!(
        attribute(&operation, "graphql.operation.type"),
        text("mutation")
    );
    assert_eq!(attribute(&operation, "outcome"), text("ok"));
    let creation = collector.span(trace_id, "task.create").await;
    assert_eq!(creation.parent_span_id, operation.span_id);
    assert_eq!(
        attribute(&creation, "task_id"),
        text(&task_id),
        "{creation:?}"
    );
    // SQLite: the creation's one script (BEGIN, the INSERTs, COMMIT).
    let statement = collector.span(trace_id, "db.script").await;
    assert_eq!(
        attribute(&statement, "db.system"),
        text("sqlite"),
        "{statement:?}"
    );

    // The step's attempt joins the task's trace: it runs, calls the service with its trace
    // context, and its outcome is written.
    let traceparent = tokio::time::timeout(Duration::from_secs(30), calls.recv())
        .await
        .expect("the step calls the service")
        .unwrap()
        .expect("with a traceparent header");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], trace_id, "the call is part of the caller's trace");
    let attempt = collector.span(trace_id, "step.attempt").await;
    assert_eq!(
        attempt.parent_span_id, creation.span_id,
        "the attempt belongs to the task"
    );
    assert_eq!(attribute(&attempt, "step"), text("notify"), "{attempt:?}");
    assert_eq!(attribute(&attempt, "handler"), text("http"));
    assert_eq!(attribute(&attempt, "attempt"), text("1"));
    let run = collector.span(trace_id, "step.run").await;
    assert_eq!(run.parent_span_id, attempt.span_id);
    assert_eq!(
        hex(&run.span_id),
        parts[2],
        "the call is made inside the step's run"
    );
    let complete = collector.span(trace_id, "step.complete").await;
    assert_eq!(complete.parent_span_id, attempt.span_id);
    assert_eq!(attribute(&complete, "outcome"), text("complete"));

    // An external worker's lease carries the trace context of its claim, in the task's trace.
    let claimed = crate::binary::post(
        &client,
        &address,
        "mutation { claimSteps(input: { workerId: \"w\", handlers: [\"external_review\"], waitSeconds: 30 }) { leases { leaseToken traceparent } } }",
        json!({}),
    )
    .await;
    let lease = &claimed["data"]["claimSteps"]["leases"][0];
    let traceparent = lease["traceparent"]
        .as_str()
        .expect("a traceparent in the lease");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts[1], trace_id, "{traceparent}");
    let claim = collector.span(trace_id, "step.claim").await;
    assert_eq!(claim.parent_span_id, creation.span_id);
    assert_eq!(hex(&claim.span_id), parts[2]);
    assert_eq!(attribute(&claim, "worker_id"), text("w"));

    // The task's end is in its trace too.
    let completed = crate::binary::post(
        &client,
        &address,
        "mutation($token: ID!) { completeStep(input: { leaseToken: $token, results: {} }) { step { state } } }",
        json!({ "token": lease["leaseToken"] }),
    )
    .await;
    assert_eq!(
        completed["data"]["completeStep"]["step"]["state"], "COMPLETE",
        "{completed}"
    );
    let finish = collector.span(trace_id, "task.finish").await;
    assert_eq!(finish.parent_span_id, creation.span_id);
    assert_eq!(attribute(&finish, "state"), text("complete"), "{finish:?}");
    assert!(crate::binary::terminate(&mut child).success());
}
