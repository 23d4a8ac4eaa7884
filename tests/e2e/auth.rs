//! Authentication and authorization over real HTTP and WebSocket: hostile tokens, missing
//! permissions, and namespace isolation.

use crate::support::{DIAMOND, TestServer};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::sync::Arc;
use tasker_api::auth::{AuthSettings, KeySource};
use tasker_store::testing::TestDatabase;

pub(crate) const SECRET: &str = "an-e2e-secret-of-more-than-thirty-two-bytes";
pub(crate) const ISSUER: &str = "https://issuer.example";
pub(crate) const AUDIENCE: &str = "tasker";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(crate) async fn secured() -> TestServer {
    secured_on(TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await).await
}

async fn secured_on(db: TestDatabase) -> TestServer {
    let settings = AuthSettings {
        key: KeySource::Secret(SECRET.as_bytes().to_vec()),
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        leeway_seconds: 5,
        roles: [("reader".to_owned(), vec!["tasker.task:index".to_owned()])].into(),
    };
    TestServer::start_secured(db, settings).await
}

/// Valid claims for `permissions` in `namespaces`, with `changes` merged in.
fn claims(permissions: &[&str], namespaces: &[&str], changes: Value) -> Value {
    let mut claims = json!({
        "sub": "e2e", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600,
        "permissions": permissions, "namespaces": namespaces,
    });
    for (key, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

fn sign(claims: &Value, secret: &str, algorithm: Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub(crate) fn token(permissions: &[&str], namespaces: &[&str]) -> String {
    sign(
        &claims(permissions, namespaces, json!({})),
        SECRET,
        Algorithm::HS256,
    )
}

/// A token for everything that expired an hour ago.
pub(crate) fn expired_token() -> String {
    sign(
        &claims(&["*"], &["*"], json!({ "exp": now() - 3600 })),
        SECRET,
        Algorithm::HS256,
    )
}

/// A token assembled by hand: any header, any claims, any signature.
fn forged(header: Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

async fn post(server: &TestServer, authorization: Option<&str>, query: &str) -> (u16, Value) {
    let mut request = crate::support::http_client()
        .post(server.url("/graphql"))
        .json(&json!({ "query": query }));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Registers a template as `auth`; returns the answer.
async fn register(server: &TestServer, auth: &str, definition: &str) -> Value {
    let definition = serde_json::to_string(definition).unwrap();
    post(
        server,
        Some(auth),
        &format!(
            "mutation {{ registerTemplate(input: {{definition: {definition}}}) {{ result }} }}"
        ),
    )
    .await
    .1
}

fn code(body: &Value) -> &str {
    body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("none")
}

#[tokio::test]
async fn hostile_tokens_are_refused_with_401_and_a_reason() {
    let server = secured().await;
    let all = ["*"];
    let good = claims(&all, &["*"], json!({}));
    let signed = sign(&good, SECRET, Algorithm::HS256);
    let mut tampered_parts: Vec<String> = signed.split('.').map(str::to_owned).collect();
    tampered_parts[1] =
        URL_SAFE_NO_PAD.encode(claims(&all, &["*"], json!({ "sub": "someone-else" })).to_string());
    let tampered = tampered_parts.join(".");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no header", None, "authentication required"),
        (
            "basic scheme",
            Some("Basic dXNlcjpwYXNz".into()),
            "malformed",
        ),
        ("empty bearer", Some("Bearer ".into()), "malformed"),
        ("not a JWT", Some("Bearer not-a-jwt".into()), "malformed"),
        ("two parts", Some("Bearer abc.def".into()), "malformed"),
        ("bad base64", Some("Bearer @@@.###.$$$".into()), "malformed"),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                sign(
                    &claims(&all, &["*"], json!({ "exp": now() - 3600 })),
                    SECRET,
                    Algorithm::HS256
                )
            )),
            "expired",
        ),
        (
            "no exp",
            Some(format!(
                "Bearer {}",
                sign(
                    &claims(&all, &["*"], json!({ "exp": null })),
                    SECRET,
                    Algorithm::HS256
                )
            )),
            "exp claim is missing",
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                sign(
                    &claims(&all, &["*"], json!({ "nbf": now() + 3600 })),
                    SECRET,
                    Algorithm::HS256
                )
            )),
            "not valid yet",
        ),
        (
            "wrong secret",
            Some(format!(
                "Bearer {}",
                sign(
                    &good,
                    "another-secret-that-is-long-enough-too!",
                    Algorithm::HS256
                )
            )),
            "signature",
        ),
        (
            "tampered claims",
            Some(format!("Bearer {tampered}")),
            "signature",
        ),
        (
            "alg none",
            Some(format!(
                "Bearer {}",
                forged(json!({ "alg": "none", "typ": "JWT" }), &good, "")
            )),
            "algorithm",
        ),
        (
            "HS/RS confusion",
            Some(format!(
                "Bearer {}",
                forged(
                    json!({ "alg": "RS256", "typ": "JWT" }),
                    &good,
                    "c2lnbmF0dXJl"
                )
            )),
            "algorithm",
        ),
        (
            // Correctly signed, but it demands an extension the server does not know.
            "critical extension",
            Some(format!("Bearer {}", {
                let mut header = Header::new(Algorithm::HS256);
                header.crit = Some(vec!["http://example.com/must-check".to_owned()]);
                jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(SECRET.as_bytes()))
                    .unwrap()
            })),
            "crit",
        ),
        (
            "HS512 with the secret",
            Some(format!("Bearer {}", sign(&good, SECRET, Algorithm::HS512))),
            "algorithm",
        ),
        (
            "wrong issuer",
            Some(format!(
                "Bearer {}",
                sign(
                    &claims(&all, &["*"], json!({ "iss": "https://evil.example" })),
                    SECRET,
                    Algorithm::HS256
                )
            )),
            "issuer",
        ),
        (
            "no issuer",
            Some(format!(
                "Bearer {}",
                sign(
                    &claims(&all, &["*"], json!({ "iss": null })),
                    SECRET,
                    Algorithm::HS256
                )
            )),
            "iss claim is missing",
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                sign(
                    &claims(&all, &["*"], json!({ "aud": "someone-else" })),
                    SECRET,
                    Algorithm::HS256
                )
            )),
            "audience",
        ),
        (
            "permissions not a list",
            Some(format!(
                "Bearer {}",
                sign(
                    &claims(&all, &["*"], json!({ "permissions": "tasker.task:index" })),
                    SECRET,
                    Algorithm::HS256
                )
            )),
            "malformed",
        ),
    ];
    for (name, authorization, reason) in &cases {
        let (status, body) = post(
            &server,
            authorization.as_deref(),
            "{ tasks { totalCount } }",
        )
        .await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(code(&body), "UNAUTHENTICATED", "{name}: {body}");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.contains(reason),
            "{name}: {message:?} lacks {reason:?}"
        );
    }
    // The server keeps serving, and a good token works.
    let (status, body) = post(
        &server,
        Some(&format!("Bearer {signed}")),
        "{ tasks { totalCount } }",
    )
    .await;
    assert_eq!((status, code(&body)), (200, "none"), "{body}");
}

#[tokio::test]
async fn each_operation_needs_its_permission() {
    let server = secured().await;
    let admin = format!("Bearer {}", token(&["*"], &["*"]));
    let body = register(&server, &admin, DIAMOND).await;
    assert_eq!(code(&body), "none", "{body}");
    let definition = serde_json::to_string(DIAMOND).unwrap();
    let (_, body) = post(&server, Some(&admin), "mutation { createTask(input: {namespace: \"shop\", template: \"fulfil\", context: {order_id: 1}}) { task { id steps { id } } } }").await;
    let task = body["data"]["createTask"]["task"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let step = body["data"]["createTask"]["task"]["steps"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let lease = "00000000-0000-7000-8000-000000000000";
    // A reader holds only tasker.task:index (through its role).
    let reader = format!(
        "Bearer {}",
        sign(
            &claims(&[], &["*"], json!({ "roles": ["reader"] })),
            SECRET,
            Algorithm::HS256
        )
    );
    let (_, body) = post(&server, Some(&reader), "{ tasks { totalCount } }").await;
    assert_eq!(
        body["data"]["tasks"]["totalCount"], 1,
        "the role grants tasker.task:index"
    );
    let operations = [
        ("tasker.task:show", format!("{{ task(id: \"{task}\") {{ id }} }}")),
        ("tasker.workflow_step:show", format!("{{ step(id: \"{step}\") {{ id }} }}")),
        ("tasker.template:index", "{ templates { key } }".to_owned()),
        ("tasker.template:index", "{ namespaces { name } }".to_owned()),
        ("tasker.template:show", "{ template(namespace: \"shop\", name: \"fulfil\") { key } }".to_owned()),
        ("tasker.event:subscribe", "{ events { edges { cursor } } }".to_owned()),
        ("tasker.event:subscribe", "{ eventCatalog { name } }".to_owned()),
        ("tasker.event:subscribe", "{ eventHead }".to_owned()),
        ("tasker.task:update", format!("mutation {{ resolveTask(input: {{id: \"{task}\"}}) {{ task {{ id }} }} }}")),
        ("tasker.workflow_step:retry", format!("mutation {{ rerunFromStep(input: {{id: \"{step}\"}}) {{ task {{ id }} }} }}")),
        ("tasker.template:register", format!("mutation {{ registerTemplate(input: {{definition: {definition}}}) {{ result }} }}")),
        ("tasker.task:create", "mutation { createTask(input: {namespace: \"shop\", template: \"fulfil\"}) { created } }".to_owned()),
        ("tasker.schedule:index", "{ schedules { name } }".to_owned()),
        ("tasker.schedule:create", "mutation { createSchedule(input: {namespace: \"shop\", name: \"n\", template: \"fulfil\", cron: \"* * * * *\"}) { schedule { name } } }".to_owned()),
        ("tasker.schedule:update", "mutation { pauseSchedule(input: {namespace: \"shop\", name: \"n\"}) { schedule { name } } }".to_owned()),
        ("tasker.schedule:delete", "mutation { deleteSchedule(input: {namespace: \"shop\", name: \"n\"}) { schedule { name } } }".to_owned()),
        ("tasker.task:cancel", format!("mutation {{ cancelTask(input: {{id: \"{task}\"}}) {{ task {{ id }} }} }}")),
        ("tasker.task:retry", format!("mutation {{ retryTask(input: {{id: \"{task}\"}}) {{ task {{ id }} }} }}")),
        ("tasker.workflow_step:retry", format!("mutation {{ retryStep(input: {{id: \"{step}\"}}) {{ step {{ id }} }} }}")),
        ("tasker.workflow_step:resolve", format!("mutation {{ resolveStepManually(input: {{id: \"{step}\"}}) {{ step {{ id }} }} }}")),
        ("tasker.workflow_step:update", format!("mutation {{ skipStep(input: {{id: \"{step}\"}}) {{ step {{ id }} }} }}")),
        ("tasker.workflow_step:update", format!("mutation {{ approveStep(input: {{id: \"{step}\"}}) {{ step {{ id }} }} }}")),
        ("tasker.workflow_step:update", format!("mutation {{ rejectStep(input: {{id: \"{step}\", reason: \"no\"}}) {{ step {{ id }} }} }}")),
        ("tasker.worker:claim", "mutation { claimSteps(input: {workerId: \"w\"}) { leases { leaseToken } } }".to_owned()),
        ("tasker.worker:claim", format!("mutation {{ heartbeatSteps(input: {{leaseTokens: [\"{lease}\"]}}) {{ leases {{ alive }} }} }}")),
        ("tasker.worker:claim", format!("mutation {{ completeStep(input: {{leaseToken: \"{lease}\"}}) {{ step {{ id }} }} }}")),
        ("tasker.worker:claim", format!("mutation {{ failStep(input: {{leaseToken: \"{lease}\", message: \"x\"}}) {{ step {{ id }} }} }}")),
        ("tasker.worker:claim", format!("mutation {{ publishEvent(input: {{leaseToken: \"{lease}\", name: \"x\"}}) {{ event {{ id }} }} }}")),
    ];
    for (permission, operation) in &operations {
        let (status, body) = post(&server, Some(&reader), operation).await;
        assert_eq!(status, 200, "{operation}");
        assert_eq!(code(&body), "FORBIDDEN", "{operation}: {body}");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(permission), "{operation}: {message}");
    }
    // Nothing changed: the task is still pending with its steps.
    let (_, body) = post(
        &server,
        Some(&admin),
        &format!("{{ task(id: \"{task}\") {{ state }} }}"),
    )
    .await;
    assert_eq!(body["data"]["task"]["state"], "PENDING");
}

/// The live task subscriptions show tasks: an events-only token may not follow them.
#[tokio::test]
async fn following_tasks_live_needs_a_task_permission_too() {
    use crate::websocket::{connect_to, receive, send};
    let server = secured().await;
    let admin = format!("Bearer {}", token(&["*"], &["*"]));
    register(&server, &admin, DIAMOND).await;
    let (_, body) = post(&server, Some(&admin), "mutation { createTask(input: {namespace: \"shop\", template: \"fulfil\", context: {order_id: 1}}) { task { id } } }").await;
    let task = body["data"]["createTask"]["task"]["id"].clone();
    let events_only = format!("Bearer {}", token(&["tasker.event:subscribe"], &["*"]));
    let subscriptions = [
        (
            "tasker.task:show",
            "subscription($id: ID!) { taskUpdated(id: $id) { cursor } }",
        ),
        (
            "tasker.task:index",
            "subscription { tasksUpdated { cursor } }",
        ),
    ];
    for (permission, query) in subscriptions {
        let mut socket = connect_to(server.address, "graphql-transport-ws").await;
        send(
            &mut socket,
            json!({ "type": "connection_init", "payload": { "authorization": events_only } }),
        )
        .await;
        assert_eq!(receive(&mut socket).await["type"], "connection_ack");
        send(&mut socket, json!({ "type": "subscribe", "id": "1", "payload": { "query": query, "variables": { "id": task } } })).await;
        let refused = receive(&mut socket).await;
        let error = &refused["payload"]["errors"][0];
        assert_eq!(
            error["extensions"]["code"], "FORBIDDEN",
            "{query}: {refused}"
        );
        assert!(
            error["message"].as_str().unwrap().contains(permission),
            "{refused}"
        );
    }
}

#[tokio::test]
async fn a_token_scoped_to_one_namespace_sees_nothing_of_another() {
    let server = secured().await;
    let admin = format!("Bearer {}", token(&["*"], &["*"]));
    let billing = DIAMOND.replace("namespace: shop", "namespace: billing");
    for definition in [DIAMOND.to_owned(), billing] {
        register(&server, &admin, &definition).await;
    }
    let mut ids = Vec::new();
    for namespace in ["shop", "billing"] {
        let (_, body) = post(&server, Some(&admin), &format!("mutation {{ createTask(input: {{namespace: \"{namespace}\", template: \"fulfil\", context: {{order_id: 1}}}}) {{ task {{ id }} }} }}")).await;
        ids.push(
            body["data"]["createTask"]["task"]["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let shop = format!("Bearer {}", token(&["*"], &["shop"]));
    let (_, body) = post(
        &server,
        Some(&shop),
        "{ tasks { totalCount nodes { namespace } } namespaces { name } templates { namespace } }",
    )
    .await;
    assert_eq!(body["data"]["tasks"]["totalCount"], 1, "{body}");
    assert_eq!(
        body["data"]["tasks"]["nodes"],
        json!([{ "namespace": "shop" }])
    );
    assert_eq!(body["data"]["namespaces"], json!([{ "name": "shop" }]));
    assert_eq!(body["data"]["templates"], json!([{ "namespace": "shop" }]));
    // Another namespace's task answers exactly like a task that does not exist.
    let missing = "01900000-0000-7000-8000-000000000000";
    let (_, foreign) = post(
        &server,
        Some(&shop),
        &format!("{{ task(id: \"{}\") {{ id }} }}", ids[1]),
    )
    .await;
    let (_, absent) = post(
        &server,
        Some(&shop),
        &format!("{{ task(id: \"{missing}\") {{ id }} }}"),
    )
    .await;
    assert_eq!(code(&foreign), "NOT_FOUND");
    assert_eq!(
        foreign["errors"][0]["message"]
            .as_str()
            .unwrap()
            .replace(&ids[1], "ID"),
        absent["errors"][0]["message"]
            .as_str()
            .unwrap()
            .replace(missing, "ID")
    );
    let (_, body) = post(
        &server,
        Some(&shop),
        &format!(
            "mutation {{ cancelTask(input: {{id: \"{}\"}}) {{ task {{ id }} }} }}",
            ids[1]
        ),
    )
    .await;
    assert_eq!(code(&body), "NOT_FOUND", "{body}");
    let (_, body) = post(&server, Some(&shop), "mutation { createTask(input: {namespace: \"billing\", template: \"fulfil\"}) { created } }").await;
    assert_eq!(code(&body), "NOT_FOUND", "{body}");
    let (_, body) = post(
        &server,
        Some(&shop),
        "{ events(first: 500) { nodes { namespace } } }",
    )
    .await;
    let namespaces: Vec<&Value> = body["data"]["events"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["namespace"])
        .collect();
    assert!(
        !namespaces.is_empty() && namespaces.iter().all(|n| *n == "shop"),
        "{body}"
    );
    let (_, body) = post(
        &server,
        Some(&shop),
        &format!(
            "{{ events(filter: {{taskId: \"{}\"}}) {{ nodes {{ name }} }} }}",
            ids[1]
        ),
    )
    .await;
    assert_eq!(code(&body), "NOT_FOUND", "{body}");
    let (_, body) = post(&server, Some(&shop), "mutation { claimSteps(input: {workerId: \"w\", namespaces: [\"billing\"], handlers: [\"noop\"]}) { leases { stepId } } }").await;
    assert_eq!(body["data"]["claimSteps"]["leases"], json!([]), "{body}");
    let (_, body) = post(
        &server,
        Some(&admin),
        &format!("{{ task(id: \"{}\") {{ state }} }}", ids[1]),
    )
    .await;
    assert_eq!(
        body["data"]["task"]["state"], "PENDING",
        "the billing task was not touched"
    );
    // A lease on another namespace's step is worth nothing to this token: LEASE_LOST, like an
    // expired one, and the step is not touched.
    let (_, body) = post(&server, Some(&admin), "mutation { claimSteps(input: {workerId: \"admin\", namespaces: [\"billing\"]}) { leases { leaseToken stepId } } }").await;
    let lease = body["data"]["claimSteps"]["leases"][0]["leaseToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let step = body["data"]["claimSteps"]["leases"][0]["stepId"]
        .as_str()
        .unwrap()
        .to_owned();
    for operation in [
        format!(
            "mutation {{ completeStep(input: {{leaseToken: \"{lease}\"}}) {{ step {{ id }} }} }}"
        ),
        format!(
            "mutation {{ failStep(input: {{leaseToken: \"{lease}\", message: \"x\"}}) {{ step {{ id }} }} }}"
        ),
        format!(
            "mutation {{ publishEvent(input: {{leaseToken: \"{lease}\", name: \"x\"}}) {{ event {{ id }} }} }}"
        ),
    ] {
        let (_, body) = post(&server, Some(&shop), &operation).await;
        assert_eq!(code(&body), "LEASE_LOST", "{operation}: {body}");
    }
    let (_, body) = post(&server, Some(&shop), &format!("mutation {{ heartbeatSteps(input: {{leaseTokens: [\"{lease}\"]}}) {{ leases {{ alive }} }} }}")).await;
    assert_eq!(
        body["data"]["heartbeatSteps"]["leases"][0]["alive"], false,
        "{body}"
    );
    let (_, body) = post(
        &server,
        Some(&admin),
        &format!("{{ step(id: \"{step}\") {{ state attempts }} }}"),
    )
    .await;
    assert_eq!(
        body["data"]["step"],
        json!({ "state": "IN_PROGRESS", "attempts": 1 }),
        "{body}"
    );
    // A token for no namespace at all: every list is empty, nothing is claimed, the counts
    // are zero, while the same queries with the admin token do see the work.
    let nobody = format!("Bearer {}", token(&["*"], &[]));
    let seen = "{ tasks { totalCount nodes { id } } events(first: 100) { edges { cursor } } }";
    let (_, body) = post(&server, Some(&nobody), seen).await;
    assert_eq!(
        body["data"]["tasks"]["totalCount"], 0,
        "an empty scope sees nothing: {body}"
    );
    assert_eq!(body["data"]["tasks"]["nodes"], json!([]), "{body}");
    assert_eq!(body["data"]["events"]["edges"], json!([]), "{body}");
    let (_, body) = post(&server, Some(&admin), seen).await;
    assert!(
        body["data"]["tasks"]["totalCount"].as_u64().unwrap() > 0,
        "{body}"
    );
    assert!(
        !body["data"]["events"]["edges"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let claim =
        "mutation { claimSteps(input: { workerId: \"nobody\", limit: 10 }) { leases { stepId } } }";
    let (_, body) = post(&server, Some(&nobody), claim).await;
    assert_eq!(body["data"]["claimSteps"]["leases"], json!([]), "{body}");
    let status = server
        .http()
        .get(server.url("/health/status"))
        .header("authorization", &nobody)
        .send()
        .await
        .unwrap();
    let status: Value = status.json().await.unwrap();
    assert_eq!(status["ready_steps"], 0, "{status}");
    assert!(
        status["tasks"]
            .as_object()
            .unwrap()
            .values()
            .all(|count| *count == 0),
        "{status}"
    );
}

#[tokio::test]
async fn hostile_queries_are_refused_with_codes_and_the_server_keeps_serving() {
    let server = secured().await;
    let admin = format!("Bearer {}", token(&["*"], &["*"]));
    let deep = format!(
        "{{ tasks {{ nodes {{ {} id {} }} }} }}",
        "steps { task { ".repeat(8),
        "} } ".repeat(8)
    );
    let aliases: String = (0..31)
        .map(|i| format!("a{i}: tasks {{ totalCount }} "))
        .collect();
    let roots = format!("{{ {}}}", "tasks { totalCount } ".repeat(11));
    let fields =
        "id state namespace templateName templateVersion createdAt updatedAt initiator reason tags";
    let wide = format!(
        "{{ tasks {{ nodes {{ ...C ...C ...C }} }} }} fragment A on Task {{ {fields} }} fragment B on Task {{ {} }} fragment C on Task {{ {} }}",
        "...A ".repeat(10),
        "...B ".repeat(10)
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("deep", deep, 200, "QUERY_LIMIT_EXCEEDED"),
        (
            "alias bomb",
            format!("{{ {aliases} }}"),
            200,
            "QUERY_LIMIT_EXCEEDED",
        ),
        ("too many root fields", roots, 200, "QUERY_LIMIT_EXCEEDED"),
        ("wide through fragments", wide, 200, "QUERY_LIMIT_EXCEEDED"),
        (
            "unparsable",
            "{ tasks { ".to_owned(),
            200,
            "GRAPHQL_PARSE_FAILED",
        ),
        (
            "unknown field",
            "{ nothing }".to_owned(),
            200,
            "GRAPHQL_VALIDATION_FAILED",
        ),
    ];
    for (name, query, status, expected) in &cases {
        let (got, body) = post(&server, Some(&admin), query).await;
        assert_eq!((got, code(&body)), (*status, *expected), "{name}: {body}");
    }
    // Batch arrays and oversized bodies are refused before GraphQL.
    let client = crate::support::http_client();
    let batch = client
        .post(server.url("/graphql"))
        .header("authorization", &admin)
        .json(&json!([{ "query": "{ tasks { totalCount } }" }, { "query": "{ tasks { totalCount } }" }]))
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), 400);
    let big = client
        .post(server.url("/graphql"))
        .header("authorization", &admin)
        .header("content-type", "application/json")
        .body(format!(
            "{{\"query\": \"{}\"}}",
            " ".repeat(5 * 1024 * 1024)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    let (status, body) = post(&server, Some(&admin), "{ tasks { totalCount } }").await;
    assert_eq!((status, code(&body)), (200, "none"), "{body}");
}

/// The next WebSocket message, or how the server closed the socket.
async fn next_message(socket: &mut crate::websocket::Socket) -> Value {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s");
        match message {
            Some(Ok(Message::Text(text))) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] != "ka" && value["type"] != "ping" {
                    return value;
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return json!({ "closed": frame.map(|f| f.reason.to_string()) });
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return json!({ "closed": null }),
        }
    }
}

#[tokio::test]
async fn websocket_connections_authenticate_in_connection_init_and_close_on_expiry() {
    use crate::websocket::{connect_to, send};
    let clock = Arc::new(tasker_domain::ManualClock::new(chrono::Utc::now()));
    let server = secured_on(TestDatabase::sqlite(clock.clone()).await).await;
    let admin = format!("Bearer {}", token(&["*"], &["*"]));
    register(&server, &admin, DIAMOND).await;

    // Without a token the connection is refused, with the reason.
    let mut socket = connect_to(server.address, "graphql-transport-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    let refused = next_message(&mut socket).await;
    assert!(
        refused["closed"]
            .as_str()
            .unwrap_or_default()
            .contains("authentication required"),
        "{refused}"
    );

    // A token in the upgrade request's header works too (legacy graphql-ws here).
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{}/graphql", server.address)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "graphql-ws".parse().unwrap());
        request
            .headers_mut()
            .insert("authorization", admin.parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        send(&mut socket, json!({ "type": "connection_init" })).await;
        assert_eq!(next_message(&mut socket).await["type"], "connection_ack");
    }

    // With a token in the payload, events flow, until the token expires.
    let mut socket = connect_to(server.address, "graphql-transport-ws").await;
    send(
        &mut socket,
        json!({ "type": "connection_init", "payload": { "authorization": admin } }),
    )
    .await;
    assert_eq!(next_message(&mut socket).await["type"], "connection_ack");
    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "e", "payload": {
            "query": "subscription { events(filter: { names: [\"task.created\"] }) { name } }" } }),
    )
    .await;
    let create = "mutation { createTask(input: {namespace: \"shop\", template: \"fulfil\", context: {order_id: 1}}) { created } }";
    post(&server, Some(&admin), create).await;
    let first = next_message(&mut socket).await;
    assert_eq!(
        first["payload"]["data"]["events"]["name"], "task.created",
        "{first}"
    );
    clock.advance(chrono::Duration::seconds(601));
    post(&server, Some(&admin), create).await;
    let closing = next_message(&mut socket).await;
    assert_eq!(
        closing["payload"]["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{closing}"
    );
    assert!(
        closing["payload"]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    assert_eq!(
        next_message(&mut socket).await,
        json!({ "type": "complete", "id": "e" })
    );
}

#[tokio::test]
async fn quotas_limit_connections_and_claims_per_token() {
    use crate::websocket::{connect_to, send};
    let settings = AuthSettings {
        key: KeySource::Secret(SECRET.as_bytes().to_vec()),
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        leeway_seconds: 5,
        roles: Default::default(),
    };
    let limits = tasker_api::HttpLimits {
        quota: tasker_api::quota::QuotaLimits {
            connections_per_token: 1,
            subscriptions_per_token: 1,
            claims_per_second: 0.001,
            claim_burst: 2.0,
        },
        ..Default::default()
    };
    let server = TestServer::start_limited(
        TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await,
        settings,
        limits,
    )
    .await;
    let one = format!("Bearer {}", token(&["*"], &["*"]));
    let other = format!("Bearer {}", token(&["*"], &["shop"]));
    let init =
        |auth: &str| json!({ "type": "connection_init", "payload": { "authorization": auth } });

    let mut first = connect_to(server.address, "graphql-transport-ws").await;
    send(&mut first, init(&one)).await;
    assert_eq!(next_message(&mut first).await["type"], "connection_ack");
    let mut second = connect_to(server.address, "graphql-transport-ws").await;
    send(&mut second, init(&one)).await;
    let refused = next_message(&mut second).await;
    assert!(
        refused["closed"]
            .as_str()
            .unwrap_or_default()
            .contains("1 WebSocket connections open"),
        "{refused}"
    );
    let mut third = connect_to(server.address, "graphql-transport-ws").await;
    send(&mut third, init(&other)).await;
    assert_eq!(
        next_message(&mut third).await["type"],
        "connection_ack",
        "another token has its own quota"
    );

    // One subscription per token: the second on the same connection is refused.
    let beat = |id: &str| json!({ "type": "subscribe", "id": id, "payload": { "query": "subscription { heartbeat(everySeconds: 3600) { sequence } }" } });
    send(&mut first, beat("a")).await;
    send(&mut first, beat("b")).await;
    let refused = next_message(&mut first).await;
    assert_eq!(refused["id"], "b", "{refused}");
    assert_eq!(
        refused["payload"]["errors"][0]["extensions"]["code"], "RATE_LIMITED",
        "{refused}"
    );
    // Closing the first connection gives its place back.
    drop(first);
    let mut again = connect_to(server.address, "graphql-transport-ws").await;
    let mut acked = false;
    for _ in 0..50 {
        send(&mut again, init(&one)).await;
        if next_message(&mut again).await["type"] == "connection_ack" {
            acked = true;
            break;
        }
        // The server notices the first socket's close asynchronously: retry on a fresh one.
        again = connect_to(server.address, "graphql-transport-ws").await;
        tokio::task::yield_now().await;
    }
    assert!(acked, "the released connection can be used again");

    // Claims: a burst of two, then RATE_LIMITED for this worker only.
    let claim = |worker: &str| {
        format!(
            "mutation {{ claimSteps(input: {{workerId: \"{worker}\"}}) {{ leases {{ stepId }} }} }}"
        )
    };
    for _ in 0..2 {
        let (_, body) = post(&server, Some(&one), &claim("w1")).await;
        assert_eq!(code(&body), "none", "{body}");
    }
    let (_, body) = post(&server, Some(&one), &claim("w1")).await;
    assert_eq!(code(&body), "RATE_LIMITED", "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("retry in")
    );
    let (_, body) = post(&server, Some(&one), &claim("w2")).await;
    assert_eq!(code(&body), "none", "{body}");
}

#[tokio::test]
async fn health_status_needs_its_permission_and_counts_within_scope() {
    let server = secured().await;
    let admin = format!("Bearer {}", token(&["*"], &["*"]));
    register(&server, &admin, DIAMOND).await;
    post(&server, Some(&admin), "mutation { createTask(input: {namespace: \"shop\", template: \"fulfil\", context: {order_id: 1}}) { created } }").await;
    let client = crate::support::http_client();
    let status = |auth: Option<String>| {
        let mut request = client.get(server.url("/health/status"));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    assert_eq!(status(None).await.0, 401);
    let (code, body) = status(Some(format!(
        "Bearer {}",
        token(&["tasker.task:*"], &["*"])
    )))
    .await;
    assert_eq!(
        (code, &body["errors"][0]["extensions"]["code"]),
        (403, &json!("FORBIDDEN")),
        "{body}"
    );
    let (code, body) = status(Some(format!(
        "Bearer {}",
        token(&["tasker.health_status:index"], &["*"])
    )))
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (&body["tasks"]["pending"], &body["ready_steps"]),
        (&json!(1), &json!(1)),
        "{body}"
    );
    let (_, body) = status(Some(format!(
        "Bearer {}",
        token(&["tasker.health_status:index"], &["billing"])
    )))
    .await;
    assert_eq!(
        (&body["tasks"]["pending"], &body["ready_steps"]),
        (&json!(0), &json!(0)),
        "{body}"
    );
    // Liveness and readiness stay open for orchestrators.
    assert_eq!(
        client
            .get(server.url("/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
