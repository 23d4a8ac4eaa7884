//! Steps running: the embedded pool on built-in handlers, and external workers over GraphQL.

use crate::support::TestServer;
use serde_json::{Value, json};
use std::time::Duration;
use tasker_store::testing::TestDatabase;

const BUILT_IN: &str = r#"
namespace: demo
name: builtin
version: 1.0.0
steps:
  - { name: a, handler: noop, config: { result: { greeting: hello } } }
  - { name: b, handler: noop, depends_on: [a], config: { fail_attempts: 1 }, retry: { backoff: { base: 0, jitter: 0 } } }
  - { name: c, handler: noop, depends_on: [a] }
  - { name: d, handler: noop, depends_on: [b, c] }
"#;

const EXTERNAL: &str = r#"
namespace: payments
name: charge
version: 1.0.0
steps:
  - { name: quote, handler: payments.quote }
  - { name: charge, handler: payments.charge, depends_on: [quote], retry: { max_attempts: 2 } }
"#;

const TASK: &str = "query($id: ID!) { task(id: $id) { state executionStatus completionPercentage steps { name state attempts results } } }";
const CLAIM: &str = "mutation($i: ClaimStepsInput!) { claimSteps(input: $i) { leases { leaseToken stepId name handler attempt namespace template context parentResults } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_pool_runs_built_in_steps_to_completion() {
    for db in TestDatabase::all(std::sync::Arc::new(tasker_domain::SystemClock)).await {
        let server = TestServer::start_running(db).await;
        server.register(BUILT_IN).await;
        let created = server
            .create_task(json!({ "namespace": "demo", "template": "builtin" }))
            .await;
        let id = created["task"]["id"].clone();
        let task = server.finished_task(TASK, &id).await;
        assert_eq!(task["state"], "COMPLETE", "{task:#}");
        assert_eq!(task["executionStatus"], "ALL_COMPLETE");
        assert_eq!(task["completionPercentage"], 100.0);
        assert_eq!(task["steps"][0]["results"], json!({ "greeting": "hello" }));
        assert_eq!(task["steps"][1]["attempts"], 2, "{}", server.backend());
    }
}

#[tokio::test]
async fn external_workers_claim_heartbeat_complete_and_fail_over_graphql() {
    for server in TestServer::all().await {
        server.register(EXTERNAL).await;
        let created = server
            .create_task(json!({ "namespace": "payments", "template": "charge", "context": { "amount": 42 } }))
            .await;
        let id = created["task"]["id"].clone();
        let status =
            server.data(TASK, json!({ "id": id })).await["task"]["executionStatus"].clone();
        assert_eq!(status, "HAS_READY_STEPS");

        let claim = |handlers: Value| json!({ "i": { "workerId": "py-worker-1", "handlers": handlers, "limit": 5, "leaseSeconds": 30 } });
        let leases =
            server.data(CLAIM, claim(json!(["payments.quote"]))).await["claimSteps"]["leases"]
                .clone();
        assert_eq!(leases.as_array().unwrap().len(), 1);
        let lease = &leases[0];
        assert_eq!(lease["name"], "quote");
        assert_eq!(lease["attempt"], 1);
        assert_eq!(lease["context"], json!({ "amount": 42 }));
        assert_eq!(lease["namespace"], "payments");
        let token = lease["leaseToken"].clone();

        let task = server.data(TASK, json!({ "id": id })).await["task"].clone();
        assert_eq!(task["state"], "IN_PROGRESS");
        assert_eq!(task["executionStatus"], "PROCESSING");

        let beat = server
            .data(
                "mutation($t: [ID!]!) { heartbeatSteps(input: { leaseTokens: $t, leaseSeconds: 60 }) { leases { alive leaseExpiresAt } } }",
                json!({ "t": [token, uuid::Uuid::now_v7().to_string()] }),
            )
            .await;
        assert_eq!(beat["heartbeatSteps"]["leases"][0]["alive"], true);
        assert_eq!(beat["heartbeatSteps"]["leases"][1]["alive"], false);

        let complete = "mutation($t: ID!, $r: JSON) { completeStep(input: { leaseToken: $t, results: $r }) { step { name state results } } }";
        let done = server
            .data(complete, json!({ "t": token, "r": { "quote": 40 } }))
            .await;
        assert_eq!(done["completeStep"]["step"]["state"], "COMPLETE");
        let (code, _) = server.error(complete, json!({ "t": token, "r": {} })).await;
        assert_eq!(code, "LEASE_LOST", "a second completion records nothing");

        let leases =
            server.data(CLAIM, claim(json!(["payments.charge"]))).await["claimSteps"]["leases"]
                .clone();
        assert_eq!(
            leases[0]["parentResults"],
            json!({ "quote": { "quote": 40 } })
        );
        let fail = "mutation($t: ID!) { failStep(input: { leaseToken: $t, message: \"card declined\", retryable: false }) { step { state attempts } } }";
        let failed = server
            .data(fail, json!({ "t": leases[0]["leaseToken"] }))
            .await;
        assert_eq!(failed["failStep"]["step"]["state"], "ERROR");
        let (code, _) = server
            .error(fail, json!({ "t": leases[0]["leaseToken"] }))
            .await;
        assert_eq!(code, "LEASE_LOST");

        let task = server.data(TASK, json!({ "id": id })).await["task"].clone();
        assert_eq!(task["state"], "ERROR");
        assert_eq!(task["executionStatus"], "BLOCKED_BY_FAILURES");
        assert_eq!(task["completionPercentage"], 50.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_claim_answers_when_work_appears() {
    let server = std::sync::Arc::new(
        TestServer::start(
            TestDatabase::sqlite(std::sync::Arc::new(tasker_domain::SystemClock)).await,
        )
        .await,
    );
    server.register(EXTERNAL).await;
    let waiting = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .data(
                    CLAIM,
                    json!({ "i": { "workerId": "w", "waitSeconds": 30 } }),
                )
                .await
        })
    };
    // The claim is parked before the task exists; creating it wakes the claim.
    while server.engine.work_listeners() == 0 {
        tokio::task::yield_now().await;
    }
    server
        .create_task(json!({ "namespace": "payments", "template": "charge" }))
        .await;
    let answer = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("answered before its 30 s deadline")
        .unwrap();
    assert_eq!(answer["claimSteps"]["leases"][0]["name"], "quote");
    for bad in [
        json!({ "workerId": "w", "limit": 0 }),
        json!({ "workerId": "w", "waitSeconds": 61 }),
        json!({ "workerId": "" }),
    ] {
        let (code, _) = server.error(CLAIM, json!({ "i": bad })).await;
        assert_eq!(code, "VALIDATION_FAILED");
    }
}

#[tokio::test]
async fn a_long_poll_its_client_abandons_stops_waiting_and_claims_nothing() {
    let server = TestServer::start(
        TestDatabase::sqlite(std::sync::Arc::new(tasker_domain::SystemClock)).await,
    )
    .await;
    server.register(EXTERNAL).await;
    // A client of its own: dropping the request closes its connection (as a worker that
    // stops does).
    let client = crate::support::http_client();
    let url = server.url("/graphql");
    let waiting = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({ "query": CLAIM, "variables": { "i": { "workerId": "gone", "waitSeconds": 30 } } }))
            .send()
            .await
    });
    while server.engine.work_listeners() == 0 {
        tokio::task::yield_now().await;
    }
    waiting.abort();
    tokio::time::timeout(Duration::from_secs(10), async {
        while server.engine.work_listeners() > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the server stops waiting for a client that has gone");
    let task = server
        .create_task(json!({ "namespace": "payments", "template": "charge" }))
        .await;
    let steps = server
        .data(
            "query($id: ID!) { task(id: $id) { steps { state leaseHolder } } }",
            json!({ "id": task["task"]["id"] }),
        )
        .await;
    assert_eq!(steps["task"]["steps"][0]["state"], "PENDING");
    assert_eq!(steps["task"]["steps"][0]["leaseHolder"], Value::Null);
}

const TWO_STEPS: &str = r#"
namespace: ops
name: pair
version: 1.0.0
steps:
  - { name: a, handler: ext.a }
  - { name: b, handler: ext.b, depends_on: [a], retry: { retryable: false } }
"#;

const STATE: &str =
    "query($id: ID!) { task(id: $id) { state steps { id name state attempts results } } }";

async fn claim_one(server: &TestServer, handler: &str) -> Value {
    let leases = server
        .data(
            CLAIM,
            json!({ "i": { "workerId": "w", "handlers": [handler] } }),
        )
        .await["claimSteps"]["leases"]
        .clone();
    assert_eq!(
        leases.as_array().unwrap().len(),
        1,
        "one {handler} step ready"
    );
    leases[0].clone()
}

async fn complete(server: &TestServer, token: &Value) -> (Option<String>, Value) {
    let body = server
        .graphql(
            "mutation($t: ID!) { completeStep(input: { leaseToken: $t }) { step { state } } }",
            json!({ "t": token }),
        )
        .await;
    let code = body["errors"][0]["extensions"]["code"]
        .as_str()
        .map(str::to_owned);
    (code, body)
}

#[tokio::test]
async fn people_retry_resolve_skip_and_cancel_with_state_checks() {
    for server in TestServer::all().await {
        server.register(TWO_STEPS).await;
        let id = server
            .create_task(json!({ "namespace": "ops", "template": "pair" }))
            .await["task"]["id"]
            .clone();
        let a = claim_one(&server, "ext.a").await;
        assert_eq!(complete(&server, &a["leaseToken"]).await.0, None);
        let b = claim_one(&server, "ext.b").await;
        server
            .data(
                "mutation($t: ID!) { failStep(input: { leaseToken: $t, message: \"no\" }) { step { state } } }",
                json!({ "t": b["leaseToken"] }),
            )
            .await;
        let task = server.data(STATE, json!({ "id": id })).await["task"].clone();
        assert_eq!(task["state"], "ERROR", "{}", server.backend());
        let a_id = task["steps"][0]["id"].clone();
        let b_id = task["steps"][1]["id"].clone();

        let retry_step = "mutation($id: ID!) { retryStep(input: { id: $id }) { step { state attempts } task { state } } }";
        let (code, error) = server.error(retry_step, json!({ "id": a_id })).await;
        assert_eq!(code, "CONFLICT");
        assert!(error["message"].as_str().unwrap().contains("complete"));

        let retried = server
            .data("mutation($id: ID!) { retryTask(input: { id: $id, reason: \"fixed the card\" }) { task { state steps { state attempts } } } }", json!({ "id": id }))
            .await;
        let task = &retried["retryTask"]["task"];
        assert_eq!(task["state"], "IN_PROGRESS");
        assert_eq!(
            task["steps"][1],
            json!({ "state": "PENDING", "attempts": 0 })
        );
        let b = claim_one(&server, "ext.b").await;
        assert_eq!(b["attempt"], 1);

        // Resolving the running step by hand finishes the task; the worker's lease is gone.
        let resolved = server
            .data(
                "mutation($id: ID!) { resolveStepManually(input: { id: $id, results: { paid: true }, reason: \"paid by phone\" }) { step { state results } task { state } } }",
                json!({ "id": b_id }),
            )
            .await;
        assert_eq!(
            resolved["resolveStepManually"]["step"]["state"],
            "RESOLVED_MANUALLY"
        );
        assert_eq!(resolved["resolveStepManually"]["task"]["state"], "COMPLETE");
        assert_eq!(
            complete(&server, &b["leaseToken"]).await.0.as_deref(),
            Some("LEASE_LOST")
        );
        let (code, _) = server
            .error(
                "mutation($id: ID!) { retryTask(input: { id: $id }) { task { state } } }",
                json!({ "id": id }),
            )
            .await;
        assert_eq!(code, "CONFLICT");

        // Skipping a pending root lets its dependent run; skipping that finishes the task.
        let other = server
            .create_task(json!({ "namespace": "ops", "template": "pair" }))
            .await["task"]["id"]
            .clone();
        let steps = server.data(STATE, json!({ "id": other })).await["task"]["steps"].clone();
        let skip = "mutation($id: ID!) { skipStep(input: { id: $id, reason: \"not needed\" }) { step { state } task { state } } }";
        let skipped = server.data(skip, json!({ "id": steps[0]["id"] })).await;
        assert_eq!(skipped["skipStep"]["task"]["state"], "IN_PROGRESS");
        let b = claim_one(&server, "ext.b").await;
        assert_eq!(b["name"], "b");
        // Cancelling drops the running lease: the worker's completion is refused.
        server
            .data(
                "mutation($id: ID!) { cancelTask(input: { id: $id }) { task { state } } }",
                json!({ "id": other }),
            )
            .await;
        assert_eq!(
            complete(&server, &b["leaseToken"]).await.0.as_deref(),
            Some("LEASE_LOST")
        );
        let (code, _) = server.error(skip, json!({ "id": steps[1]["id"] })).await;
        assert_eq!(code, "CONFLICT", "a cancelled step stays cancelled");
    }
}

const APPROVAL: &str = r#"
namespace: ops
name: release
version: 1.0.0
steps:
  - { name: build, handler: noop, config: { result: { artifact: v1 } } }
  - { name: wait, handler: sleep, depends_on: [build], config: { seconds: 0 } }
  - { name: sign_off, handler: approval, depends_on: [wait] }
  - { name: deploy, handler: noop, depends_on: [sign_off] }
"#;

/// Waits until the embedded pool has parked the task's approval step.
async fn parked_approval(server: &TestServer, task: &Value) -> Value {
    let query = "query($id: ID!) { task(id: $id) { steps { id name state leaseHolder } } }";
    let started = std::time::Instant::now();
    loop {
        let steps = server.data(query, json!({ "id": task })).await["task"]["steps"].clone();
        let step = steps[2].clone();
        if step["leaseHolder"] == "awaiting-decision" {
            assert_eq!(step["state"], "IN_PROGRESS");
            return step["id"].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never parked: {steps}"
        );
        // The pool works in the background of this process; look again shortly.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_steps_wait_for_a_person_and_timers_complete() {
    let server = TestServer::start_running(
        TestDatabase::sqlite(std::sync::Arc::new(tasker_domain::SystemClock)).await,
    )
    .await;
    server.register(APPROVAL).await;
    let approve = "mutation($id: ID!) { approveStep(input: { id: $id, results: { by: \"ada\" } }) { step { state results } task { id } } }";
    let reject = "mutation($id: ID!) { rejectStep(input: { id: $id, reason: \"not today\" }) { step { state lastError } task { state } } }";

    let first = server
        .create_task(json!({ "namespace": "ops", "template": "release" }))
        .await["task"]["id"]
        .clone();
    let step = parked_approval(&server, &first).await;
    let mut finished = server.engine.finished_tasks();
    let approved = server.data(approve, json!({ "id": step })).await;
    assert_eq!(approved["approveStep"]["step"]["state"], "COMPLETE");
    assert_eq!(
        approved["approveStep"]["step"]["results"],
        json!({ "by": "ada" })
    );
    let (code, _) = server.error(approve, json!({ "id": step })).await;
    assert_eq!(code, "CONFLICT", "a decided step takes no second decision");
    loop {
        let task = server.data(TASK, json!({ "id": first })).await["task"].clone();
        if task["state"] == "COMPLETE" {
            assert_eq!(task["steps"][1]["results"], json!({ "slept_seconds": 0.0 }));
            break;
        }
        tokio::time::timeout(Duration::from_secs(20), finished.changed())
            .await
            .expect("the task completes after the approval")
            .unwrap();
    }

    let second = server
        .create_task(json!({ "namespace": "ops", "template": "release" }))
        .await["task"]["id"]
        .clone();
    let step = parked_approval(&server, &second).await;
    let rejected = server.data(reject, json!({ "id": step })).await;
    assert_eq!(rejected["rejectStep"]["step"]["state"], "ERROR");
    assert_eq!(
        rejected["rejectStep"]["step"]["lastError"],
        "rejected: not today"
    );
    assert_eq!(rejected["rejectStep"]["task"]["state"], "ERROR");
}

/// A local HTTP service for the `http` handler: an echo, a flaky endpoint (503 once), a
/// redirect to it by address, a missing one (404) and a busy one (429 with a long
/// Retry-After).
async fn http_service() -> String {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/orders/{id}",
            post(
                |Path(id): Path<String>, headers: HeaderMap, body: axum::Json<Value>| async move {
                    let token = headers
                        .get("x-token")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    axum::Json(json!({ "id": id, "token": token, "body": body.0 }))
                },
            ),
        )
        .route(
            "/flaky",
            get(
                |State(calls): State<std::sync::Arc<AtomicUsize>>| async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [("retry-after", "0")],
                            "try again",
                        )
                            .into_response()
                    } else {
                        axum::Json(json!({ "ok": true })).into_response()
                    }
                },
            ),
        )
        .route("/ok", get(|| async { axum::Json(json!({ "ok": true })) }))
        .route(
            "/hop",
            get(|headers: HeaderMap| async move {
                // A redirect to the same service, named by its address.
                let host = headers
                    .get("host")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let port = host.rsplit(':').next().unwrap_or("");
                (
                    StatusCode::FOUND,
                    [("location", format!("http://127.0.0.1:{port}/flaky"))],
                )
            }),
        )
        .route(
            "/gone",
            get(|| async { (StatusCode::NOT_FOUND, "no such thing") }),
        )
        .route(
            "/busy",
            get(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "3600")],
                    "slow down",
                )
            }),
        )
        .with_state(calls);
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_handler_calls_services_with_placeholders_and_retries_by_status() {
    let service = http_service().await;
    // The service is on loopback, which the handler reaches only when told to.
    let server = TestServer::start_running_allowing(
        TestDatabase::sqlite(std::sync::Arc::new(tasker_domain::SystemClock)).await,
        &["127.0.0.1"],
    )
    .await;
    let template = r#"
namespace: web
name: calls
version: 1.0.0
steps:
  - { name: quote, handler: noop, config: { result: { total: 42 } } }
  - name: post
    handler: http
    depends_on: [quote]
    config:
      url: "http://SERVICE/orders/{{ context.order_id }}"
      headers: { x-token: "{{ context.token }}" }
      body: { total: "{{ steps.quote.results.total }}" }
  - { name: flaky, handler: http, depends_on: [quote], config: { url: "http://SERVICE/flaky" },
      retry: { max_attempts: 3, backoff: { base: 0, jitter: 0 } } }
"#
    .replace("SERVICE", &service);
    server.register(&template).await;
    let id = server
        .create_task(json!({ "namespace": "web", "template": "calls", "context": { "order_id": 7, "token": "s3cret" } }))
        .await["task"]["id"]
        .clone();
    let task = server.finished_task(TASK, &id).await;
    assert_eq!(task["state"], "COMPLETE", "{task:#}");
    assert_eq!(
        task["steps"][1]["results"],
        json!({ "id": "7", "token": "s3cret", "body": { "total": 42 } })
    );
    assert_eq!(task["steps"][2]["attempts"], 2, "a 503 is retried");
    assert_eq!(task["steps"][2]["results"], json!({ "ok": true }));

    let failing = r#"
namespace: web
name: failing
version: 1.0.0
steps:
  - { name: gone, handler: http, config: { url: "http://SERVICE/gone" } }
  - { name: busy, handler: http, config: { url: "http://SERVICE/busy" } }
"#
    .replace("SERVICE", &service);
    server.register(&failing).await;
    let id = server
        .create_task(json!({ "namespace": "web", "template": "failing" }))
        .await["task"]["id"]
        .clone();
    let query = "query($id: ID!) { task(id: $id) { steps { name state attempts lastError nextAttemptAt } } }";
    // Each failure appends events: wait on that signal, not on a clock.
    let mut appended = server.db.store.events_appended();
    let steps = loop {
        let steps = server.data(query, json!({ "id": id })).await["task"]["steps"].clone();
        if steps
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "ERROR")
        {
            break steps;
        }
        tokio::time::timeout(Duration::from_secs(20), appended.changed())
            .await
            .unwrap_or_else(|_| panic!("the failures were never recorded: {steps}"))
            .unwrap();
    };
    assert_eq!(steps[0]["attempts"], 1);
    assert!(steps[0]["nextAttemptAt"].is_null(), "a 404 is not retried");
    assert!(steps[0]["lastError"].as_str().unwrap().contains("404"));
    let retry_at =
        chrono::DateTime::parse_from_rfc3339(steps[1]["nextAttemptAt"].as_str().unwrap()).unwrap();
    let wait = (retry_at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
    assert!(
        (3500..=3600).contains(&wait),
        "429 honours Retry-After: {wait} s"
    );
}

#[tokio::test]
async fn workers_publish_the_custom_events_their_template_declares() {
    for server in TestServer::all().await {
        let template = "namespace: pay\nname: card\nversion: 1.0.0\ncustom_events:\n  - { name: fraud_checked, description: The fraud score is known }\nsteps:\n  - {name: charge, handler: ext.charge}\n";
        server.register(template).await;
        let catalog = server
            .data("{ eventCatalog { name template } }", json!({}))
            .await;
        assert!(
            catalog["eventCatalog"]
                .as_array()
                .unwrap()
                .contains(&json!({ "name": "custom.fraud_checked", "template": "pay/card@1.0.0" }))
        );
        server
            .create_task(json!({ "namespace": "pay", "template": "card" }))
            .await;
        let lease = claim_one(&server, "ext.charge").await;
        let publish = "mutation($t: ID!, $n: String!, $p: JSON) { publishEvent(input: { leaseToken: $t, name: $n, payload: $p }) { event { name payload } } }";
        let published = server
            .data(
                publish,
                json!({ "t": lease["leaseToken"], "n": "fraud_checked", "p": { "score": 0.2 } }),
            )
            .await;
        let event = &published["publishEvent"]["event"];
        assert_eq!(event["name"], "custom.fraud_checked");
        assert_eq!(event["payload"]["data"], json!({ "score": 0.2 }));
        assert_eq!(event["payload"]["step"], "charge");

        let (code, error) = server
            .error(
                publish,
                json!({ "t": lease["leaseToken"], "n": "made_up", "p": {} }),
            )
            .await;
        assert_eq!(code, "VALIDATION_FAILED");
        assert!(error["message"].as_str().unwrap().contains("fraud_checked"));
        let big = "x".repeat(70 * 1024);
        let (code, _) = server
            .error(
                publish,
                json!({ "t": lease["leaseToken"], "n": "fraud_checked", "p": { "big": big } }),
            )
            .await;
        assert_eq!(code, "VALIDATION_FAILED");
        let (code, _) = server
            .error(
                publish,
                json!({ "t": uuid::Uuid::now_v7().to_string(), "n": "fraud_checked", "p": {} }),
            )
            .await;
        assert_eq!(code, "LEASE_LOST");
        let custom = server
            .data(
                "{ events(filter: { names: [\"custom.fraud_checked\"] }) { nodes { name } } }",
                json!({}),
            )
            .await;
        assert_eq!(custom["events"]["nodes"].as_array().unwrap().len(), 1);
    }
}

/// The steps of a task once none of them can change any more without a person.
async fn settled_steps(server: &TestServer, id: &Value) -> Value {
    let query = "query($id: ID!) { task(id: $id) { state steps { name state attempts lastError nextAttemptAt results } } }";
    server.finished_task(query, id).await["steps"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_handler_refuses_internal_destinations_unless_allowed() {
    let service = http_service().await;
    let port = service.rsplit(':').next().unwrap().to_owned();
    let template = |name: &str, url: &str| {
        format!(
            "namespace: web\nname: {name}\nversion: 1.0.0\nsteps:\n  - {{ name: call, handler: http, config: {{ url: \"{url}\" }} }}\n"
        )
    };
    let cases = [
        // An address in the URL (no resolver involved), a name that resolves to loopback,
        // IPv6 loopback, and the same address spelled as a hexadecimal IPv4 address.
        (
            "literal",
            format!("http://127.0.0.1:{port}/ok"),
            "127.0.0.1 is a loopback address",
        ),
        (
            "named",
            format!("http://localhost:{port}/ok"),
            "localhost resolves to",
        ),
        (
            "six",
            format!("http://[::1]:{port}/ok"),
            "[::1] is a loopback address",
        ),
        (
            "hex",
            format!("http://0x7f.0.0.1:{port}/ok"),
            "127.0.0.1 is a loopback address",
        ),
    ];

    let closed = TestServer::start_running(
        TestDatabase::sqlite(std::sync::Arc::new(tasker_domain::SystemClock)).await,
    )
    .await;
    for (name, url, says) in &cases {
        closed.register(&template(name, url)).await;
        let id = closed
            .create_task(json!({ "namespace": "web", "template": name }))
            .await["task"]["id"]
            .clone();
        let steps = settled_steps(&closed, &id).await;
        let step = &steps[0];
        assert_eq!(step["state"], "ERROR", "{name}: {step:#}");
        assert_eq!(step["attempts"], 1, "{name}: a refusal is final");
        assert!(step["nextAttemptAt"].is_null(), "{name}: not retried");
        let error = step["lastError"].as_str().unwrap();
        assert!(error.contains(says), "{name}: {error}");
        assert!(error.contains("--http-allow"), "{name}: {error}");
    }

    // Shown able to fail: the same calls are made once the destination is allowed.
    let open = TestServer::start_running_allowing(
        TestDatabase::sqlite(std::sync::Arc::new(tasker_domain::SystemClock)).await,
        &["127.0.0.1", "localhost"],
    )
    .await;
    // (The service listens on IPv4 only; allowing `::1` is shown in the engine's unit tests.)
    for (name, url, _) in cases.iter().filter(|(name, ..)| *name != "six") {
        open.register(&template(name, url)).await;
        let id = open
            .create_task(json!({ "namespace": "web", "template": name }))
            .await["task"]["id"]
            .clone();
        let steps = settled_steps(&open, &id).await;
        assert_eq!(steps[0]["state"], "COMPLETE", "{name}: {steps:#}");
    }

    // A redirect is checked too: `localhost` is allowed by name, the address it redirects
    // to is not.
    let by_name = TestServer::start_running_allowing(
        TestDatabase::sqlite(std::sync::Arc::new(tasker_domain::SystemClock)).await,
        &["localhost"],
    )
    .await;
    by_name
        .register(&template("hop", &format!("http://localhost:{port}/hop")))
        .await;
    let id = by_name
        .create_task(json!({ "namespace": "web", "template": "hop" }))
        .await["task"]["id"]
        .clone();
    let steps = settled_steps(&by_name, &id).await;
    let error = steps[0]["lastError"].as_str().unwrap_or_default();
    assert_eq!(steps[0]["state"], "ERROR", "{steps:#}");
    assert!(error.contains("127.0.0.1 is a loopback address"), "{error}");
}

const ONE_AT_A_TIME: &str = r#"
namespace: payments
name: payout
version: 1.0.0
concurrency: { key: "{{ context.account }}", limit: 1 }
steps:
  - { name: send, handler: payments.send }
"#;

const WAITING: &str =
    "query($id: ID!) { task(id: $id) { state executionStatus concurrencyKey priority } }";

/// A task whose key is at its limit waits, says so, and starts when the holder ends; the
/// template shows its rule. Cancelling the holder over GraphQL hands the slot on.
#[tokio::test]
async fn a_task_waits_for_its_concurrency_slot_and_says_so() {
    for server in TestServer::all().await {
        let backend = server.backend();
        server.register(ONE_AT_A_TIME).await;
        let rule = server
            .data(
                "{ namespaces { templates { key concurrency { key limit strategy } } } }",
                json!({}),
            )
            .await;
        let templates = rule["namespaces"][0]["templates"].clone();
        assert_eq!(
            templates[0]["concurrency"],
            json!({ "key": "{{ context.account }}", "limit": 1, "strategy": "QUEUE" }),
            "{backend}: {rule:#}"
        );
        let start = |priority: i64| json!({ "namespace": "payments", "template": "payout", "context": { "account": "a-1" }, "priority": priority });
        let holder = server.create_task(start(2)).await["task"]["id"].clone();
        let waiting = server.create_task(start(3)).await["task"]["id"].clone();
        let task = server.data(WAITING, json!({ "id": waiting })).await["task"].clone();
        assert_eq!(
            task,
            json!({
                "state": "PENDING",
                "executionStatus": "WAITING_FOR_CONCURRENCY_SLOT",
                "concurrencyKey": "payments/payout:a-1",
                "priority": 3
            }),
            "{backend}"
        );
        let holding = server.data(WAITING, json!({ "id": holder })).await["task"].clone();
        assert_eq!(holding["executionStatus"], "HAS_READY_STEPS", "{backend}");

        server
            .data(
                "mutation($id: ID!) { cancelTask(input: { id: $id }) { task { state } } }",
                json!({ "id": holder }),
            )
            .await;
        let started = server.data(WAITING, json!({ "id": waiting })).await["task"].clone();
        assert_eq!(started["executionStatus"], "HAS_READY_STEPS", "{backend}");
        let events = server
            .data(
                "query($id: ID!) { events(filter: { taskId: $id }) { edges { node { name } } } }",
                json!({ "id": waiting }),
            )
            .await;
        let names: Vec<&str> = events["events"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|edge| edge["node"]["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"task.queued"), "{backend}: {names:?}");
        assert!(names.contains(&"task.steps_ready"), "{backend}: {names:?}");
    }
}

const PARTNER_CALLS: &str = r#"
namespace: payments
name: partner_sync
version: 1.0.0
steps:
  - { name: call, handler: payments.partner, rate_limit: { name: partner_api, limit: 2, per: 1h } }
"#;

const THROTTLED: &str = "query($id: ID!) { task(id: $id) { executionStatus steps { rateLimit { bucket limit perSeconds spentUntil } } } }";

const ONE_UPLOAD: &str = r#"
namespace: payments
name: upload
version: 1.0.0
steps:
  - { name: put, handler: payments.upload, concurrency: { limit: 1 } }
"#;

/// Step limits over GraphQL: the template shows its rules; a third call in the hour is not
/// leased, and its task says it waits for the rate limit, and until when; a second upload
/// waits for the first under the step's concurrency limit, and says so.
#[tokio::test]
async fn a_step_held_by_its_limits_waits_and_says_why() {
    for server in TestServer::all().await {
        let backend = server.backend();
        server.register(PARTNER_CALLS).await;
        let rule = server
            .data(
                "{ namespaces { templates { steps { rateLimit { name limit perSeconds key } } } } }",
                json!({}),
            )
            .await;
        assert_eq!(
            rule["namespaces"][0]["templates"][0]["steps"][0]["rateLimit"],
            json!({ "name": "partner_api", "limit": 2, "perSeconds": 3600.0, "key": null }),
            "{backend}: {rule:#}"
        );
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let created = server
                .create_task(
                    json!({ "namespace": "payments", "template": "partner_sync", "context": {} }),
                )
                .await;
            tasks.push(created["task"]["id"].clone());
        }
        assert_eq!(
            server.claim("payments.partner", 10).await.len(),
            2,
            "{backend}"
        );
        assert!(
            server.claim("payments.partner", 10).await.is_empty(),
            "{backend}"
        );
        let waiting = server.data(THROTTLED, json!({ "id": tasks[2] })).await["task"].clone();
        assert_eq!(
            waiting["executionStatus"], "WAITING_FOR_RATE_LIMIT",
            "{backend}: {waiting:#}"
        );
        let limit = &waiting["steps"][0]["rateLimit"];
        assert_eq!(limit["bucket"], "payments/partner_api");
        assert!(limit["spentUntil"].is_string(), "{backend}: {limit:#}");
        let running = server.data(THROTTLED, json!({ "id": tasks[0] })).await["task"].clone();
        assert_eq!(running["executionStatus"], "PROCESSING", "{backend}");

        // A step concurrency limit: the second upload waits for the first to end.
        server.register(ONE_UPLOAD).await;
        let upload = json!({ "namespace": "payments", "template": "upload", "context": {} });
        server.create_task(upload.clone()).await;
        let second = server.create_task(upload).await["task"]["id"].clone();
        let leases = server.claim("payments.upload", 10).await;
        assert_eq!(leases.len(), 1, "{backend}");
        let waits = server
            .data(
                "query($id: ID!) { task(id: $id) { executionStatus steps { concurrencyLimit { bucket limit running } } } }",
                json!({ "id": second }),
            )
            .await["task"]
            .clone();
        assert_eq!(
            waits,
            json!({
                "executionStatus": "WAITING_FOR_CONCURRENCY_SLOT",
                "steps": [{ "concurrencyLimit": { "bucket": "payments/upload/put", "limit": 1, "running": 1 } }]
            }),
            "{backend}"
        );
        let rule = server
            .data(
                "{ namespaces { templates { key steps { concurrency { name limit key } } } } }",
                json!({}),
            )
            .await;
        let upload_rule = rule["namespaces"][0]["templates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == "payments/upload@1.0.0")
            .map(|t| t["steps"][0]["concurrency"].clone());
        assert_eq!(
            upload_rule,
            Some(json!({ "name": null, "limit": 1, "key": null })),
            "{backend}: {rule:#}"
        );
    }
}

/// Schedules over GraphQL: created with its next fire times, paused, resumed, deleted; a bad
/// cron or time zone is refused with the path of each problem.
#[tokio::test]
async fn schedules_are_created_listed_paused_and_deleted_over_graphql() {
    for server in TestServer::all().await {
        let backend = server.backend();
        server.register(EXTERNAL).await;
        let created = server
            .data(
                "mutation($i: CreateScheduleInput!) { createSchedule(input: $i) { schedule { name cron timezone catchUp paused nextFireAt nextFireTimes(count: 3) } } }",
                json!({ "i": { "namespace": "payments", "name": "nightly", "template": "charge", "cron": "0 2 * * *", "timezone": "Europe/Berlin", "catchUp": "SKIP" } }),
            )
            .await;
        let schedule = &created["createSchedule"]["schedule"];
        assert_eq!(schedule["catchUp"], "SKIP", "{backend}: {created:#}");
        let times = schedule["nextFireTimes"].as_array().unwrap();
        assert_eq!(times.len(), 3);
        assert_eq!(times[0], schedule["nextFireAt"]);

        let listed = server
            .data(
                "{ schedules(namespace: \"payments\") { name paused } }",
                json!({}),
            )
            .await;
        assert_eq!(
            listed["schedules"],
            json!([{ "name": "nightly", "paused": false }])
        );
        let key = json!({ "i": { "namespace": "payments", "name": "nightly" } });
        let paused = server
            .data("mutation($i: ScheduleKeyInput!) { pauseSchedule(input: $i) { schedule { paused } } }", key.clone())
            .await;
        assert_eq!(paused["pauseSchedule"]["schedule"]["paused"], true);
        let resumed = server
            .data("mutation($i: ScheduleKeyInput!) { resumeSchedule(input: $i) { schedule { paused } } }", key.clone())
            .await;
        assert_eq!(resumed["resumeSchedule"]["schedule"]["paused"], false);
        server
            .data("mutation($i: ScheduleKeyInput!) { deleteSchedule(input: $i) { schedule { name } } }", key.clone())
            .await;
        let (code, _) = server
            .error(
                "query { schedule(namespace: \"payments\", name: \"nightly\") { name } }",
                json!({}),
            )
            .await;
        assert_eq!(code, "NOT_FOUND", "{backend}");

        let (code, error) = server
            .error(
                "mutation($i: CreateScheduleInput!) { createSchedule(input: $i) { schedule { name } } }",
                json!({ "i": { "namespace": "payments", "name": "bad", "template": "charge", "cron": "61 * * * *", "timezone": "Nowhere/City" } }),
            )
            .await;
        assert_eq!(code, "VALIDATION_FAILED", "{backend}");
        let paths: Vec<&str> = error["extensions"]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|problem| problem["path"].as_str().unwrap())
            .collect();
        assert_eq!(paths, ["cron", "timezone"], "{backend}");
    }
}
