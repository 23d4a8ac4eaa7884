//! Browser safety over real HTTP and WebSocket: what a hostile page in the user's browser can
//! send (simple-request content types, foreign origins, rebound host names) is refused before
//! anything runs, while the same request from the server's own page, an allowlisted origin or
//! a script is served. Also the GraphQL over HTTP answers (media types and status codes).

use crate::support::TestServer;
use crate::websocket::{receive, send};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HOST, ORIGIN};
use serde_json::{Value, json};
use std::sync::Arc;
use tasker_api::auth::{AuthSettings, KeySource};
use tasker_store::testing::TestDatabase;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const TEMPLATE: &str = "namespace: web\nname: probe\nversion: 1.0.0\nsteps:\n  - {name: call, handler: http, config: {url: \"http://127.0.0.1:9/health/status\"}}\n";
const REGISTER: &str =
    "mutation($d: String!) { registerTemplate(input: { definition: $d }) { result } }";
const GRAPHQL_RESPONSE: &str = "application/graphql-response+json";

async fn server() -> TestServer {
    TestServer::start(TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await).await
}

async fn server_allowing(origins: &[&str], hosts: &[&str]) -> TestServer {
    TestServer::start_with_browser(
        TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await,
        None,
        Default::default(),
        origins,
        hosts,
    )
    .await
}

fn register_body() -> String {
    json!({ "query": REGISTER, "variables": { "d": TEMPLATE } }).to_string()
}

/// How many templates the server holds: proof that a refused request wrote nothing.
async fn templates(server: &TestServer) -> usize {
    server.data("{ templates { key } }", json!({})).await["templates"]
        .as_array()
        .unwrap()
        .len()
}

/// Status, the error code if any, and the body.
async fn answer(response: reqwest::Response) -> (u16, String, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code, body)
}

#[tokio::test]
async fn only_json_bodies_are_executed() {
    let server = server().await;
    let post = |content_type: Option<&str>| {
        let mut request = server
            .http()
            .post(server.url("/graphql"))
            .body(register_body());
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        request.send()
    };
    // What a page can send without a preflight, and other non-JSON declarations.
    for refused in [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/json; charset=latin1"),
        Some("application/jsonp"),
        None,
    ] {
        let (status, code, body) = answer(post(refused).await.unwrap()).await;
        assert_eq!(
            (status, code.as_str()),
            (415, "UNSUPPORTED_MEDIA_TYPE"),
            "{refused:?}: {body}"
        );
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("application/json")
        );
    }
    assert_eq!(templates(&server).await, 0, "nothing was registered");
    // Shown able to fail: the same body declared as JSON is executed.
    for accepted in [
        "application/json",
        "application/json; charset=UTF-8",
        "Application/JSON;charset=\"utf-8\"",
        GRAPHQL_RESPONSE,
    ] {
        let (status, _, body) = answer(post(Some(accepted)).await.unwrap()).await;
        assert_eq!(status, 200, "{accepted}: {body}");
        assert!(body["errors"].is_null(), "{accepted}: {body}");
    }
    assert_eq!(templates(&server).await, 1);
}

#[tokio::test]
async fn answers_follow_the_graphql_over_http_spec() {
    let server = server().await;
    let post = |accept: Option<&str>, body: Value| {
        let mut request = server
            .http()
            .post(server.url("/graphql"))
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        request.send()
    };
    let unparsable = json!({ "query": "{" });
    let invalid = json!({ "query": "{ noSuchField }" });
    let uncoerced =
        json!({ "query": "query($id: ID!) { task(id: $id) { id } }", "variables": { "id": null } });
    let fine = json!({ "query": "{ __typename }" });

    for (name, body) in [
        ("parse", &unparsable),
        ("validation", &invalid),
        ("variables", &uncoerced),
    ] {
        // The spec's media type: 400, and no data entry since nothing ran.
        let response = post(Some(GRAPHQL_RESPONSE), body.clone()).await.unwrap();
        let media = response.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let (status, _, answer_body) = answer(response).await;
        assert_eq!(status, 400, "{name}: {answer_body}");
        assert!(media.starts_with(GRAPHQL_RESPONSE), "{name}: {media}");
        assert!(answer_body.get("data").is_none(), "{name}: {answer_body}");
        assert!(answer_body["errors"][0]["message"].is_string(), "{name}");
        // Plain JSON: 200 with the errors, still without data.
        for accept in [None, Some("application/json"), Some("*/*")] {
            let response = post(accept, body.clone()).await.unwrap();
            let media = response.headers()[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned();
            let (status, _, answer_body) = answer(response).await;
            assert_eq!(status, 200, "{name} {accept:?}");
            assert!(media.starts_with("application/json"), "{name}: {media}");
            assert!(answer_body.get("data").is_none(), "{name}: {answer_body}");
        }
    }
    // Executed: 200 in both, with data; the client's preference decides the media type.
    for (accept, media) in [
        (Some(GRAPHQL_RESPONSE), GRAPHQL_RESPONSE),
        (
            Some("application/graphql-response+json, application/json;q=0.9"),
            GRAPHQL_RESPONSE,
        ),
        (
            Some("application/json, application/graphql-response+json;q=0.5"),
            "application/json",
        ),
        (Some("application/json"), "application/json"),
        (None, "application/json"),
    ] {
        let response = post(accept, fine.clone()).await.unwrap();
        let got = response.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let (status, _, body) = answer(response).await;
        assert_eq!(status, 200, "{accept:?}");
        assert!(got.starts_with(media), "{accept:?}: {got}");
        assert_eq!(body["data"]["__typename"], "Query");
    }
    // A field error after execution began is still 200 with data under the spec's type.
    let missing =
        json!({ "query": "{ task(id: \"0190a6b0-0000-7000-8000-000000000000\") { id } }" });
    let (status, code, body) = answer(post(Some(GRAPHQL_RESPONSE), missing).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (200, "NOT_FOUND"), "{body}");
    assert!(body.get("data").is_some(), "{body}");

    // Bodies that are not GraphQL requests: 400 whatever the client accepts.
    for bad in [
        "",
        "{ \"not JSON",
        "[{\"query\": \"{ __typename }\"}]",
        "{\"qeury\": \"{ __typename }\"}",
        "{\"query\": 1}",
        "{\"query\": \"{ __typename }\", \"variables\": \"x\"}",
        "{\"query\": \"{ __typename }\", \"operationName\": 0}",
        "{\"query\": \"{ __typename }\", \"extensions\": []}",
    ] {
        let response = server
            .http()
            .post(server.url("/graphql"))
            .header(CONTENT_TYPE, "application/json")
            .body(bad)
            .send()
            .await
            .unwrap();
        let (status, code, body) = answer(response).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "BAD_REQUEST"),
            "{bad}: {body}"
        );
    }
    // Null parameters are no parameters.
    let nulls = json!({ "query": "{ __typename }", "operationName": null, "variables": null, "extensions": null });
    let (status, _, body) = answer(post(None, nulls).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["__typename"], "Query");
}

#[tokio::test]
async fn get_runs_queries_only() {
    let server = server().await;
    let get = |params: &[(&str, &str)]| {
        let url = reqwest::Url::parse_with_params(&server.url("/graphql"), params).unwrap();
        server
            .http()
            .get(url)
            .header(ACCEPT, GRAPHQL_RESPONSE)
            .send()
    };
    let (status, _, body) = answer(
        get(&[
            (
                "query",
                "query Type($name: String!) { __type(name: $name) { name } }",
            ),
            ("variables", "{\"name\": \"Task\"}"),
        ])
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["__type"]["name"], "Task");

    let mutation = format!(
        "mutation {{ registerTemplate(input: {{ definition: {} }}) {{ result }} }}",
        serde_json::to_string(TEMPLATE).unwrap()
    );
    let response = get(&[("query", &mutation)]).await.unwrap();
    assert_eq!(response.headers()["allow"], "POST");
    let (status, code, _) = answer(response).await;
    assert_eq!((status, code.as_str()), (405, "METHOD_NOT_ALLOWED"));
    let named = get(&[
        ("query", "query Q { __typename } mutation M { __typename }"),
        ("operationName", "M"),
    ])
    .await
    .unwrap();
    assert_eq!(named.status(), 405);
    assert_eq!(templates(&server).await, 0, "a GET changed nothing");
    let (status, code, _) = answer(
        get(&[("query", "{ __typename }"), ("variables", "nope")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "BAD_REQUEST"));

    // Without a query, a browser gets the playground.
    let page = server
        .http()
        .get(server.url("/graphql"))
        .send()
        .await
        .unwrap();
    assert!(page.text().await.unwrap().contains("<html"));
}

/// Sends the register mutation as a page of `origin` would, to `server` under `host`.
async fn from_page(
    server: &TestServer,
    origin: Option<&str>,
    host: Option<&str>,
) -> (u16, String, Value) {
    let mut request = server
        .http()
        .post(server.url("/graphql"))
        .header(CONTENT_TYPE, "application/json")
        .body(register_body());
    if let Some(origin) = origin {
        request = request.header(ORIGIN, origin);
    }
    if let Some(host) = host {
        request = request.header(HOST, host);
    }
    answer(request.send().await.unwrap()).await
}

#[tokio::test]
async fn pages_of_other_origins_are_refused_unless_listed() {
    let server = server_allowing(&["https://dash.example.com"], &[]).await;
    let own = format!("http://{}", server.address);
    let port = server.address.port();
    for foreign in [
        "http://evil.example".to_owned(),
        "null".to_owned(),
        format!("http://127.0.0.1:{}", port + 1),
        format!("http://localhost:{port}"),
        "https://dash.example.com.evil.example".to_owned(),
    ] {
        let (status, code, body) = from_page(&server, Some(&foreign), None).await;
        assert_eq!(
            (status, code.as_str()),
            (403, "ORIGIN_NOT_ALLOWED"),
            "{foreign}: {body}"
        );
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("--allowed-origins")
        );
    }
    assert_eq!(templates(&server).await, 0, "nothing ran");
    // The server's own page, a listed origin and a script without Origin are served.
    let (status, _, body) = from_page(&server, Some(&own), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["registerTemplate"]["result"], "CREATED");
    for origin in [Some("https://dash.example.com"), None] {
        let (status, _, body) = from_page(&server, origin, None).await;
        assert_eq!(status, 200, "{origin:?}: {body}");
        assert_eq!(body["data"]["registerTemplate"]["result"], "UNCHANGED");
    }

    // CORS answers go to the listed origin only.
    let preflight = |origin: &'static str| {
        server
            .http()
            .request(reqwest::Method::OPTIONS, server.url("/graphql"))
            .header(ORIGIN, origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type, authorization",
            )
            .send()
    };
    let allowed = preflight("https://dash.example.com").await.unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://dash.example.com"
    );
    let refused = preflight("http://evil.example").await.unwrap();
    assert_eq!(refused.status(), 403);
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    let simple = server
        .http()
        .post(server.url("/graphql"))
        .header(CONTENT_TYPE, "application/json")
        .header(ORIGIN, "https://dash.example.com")
        .body(json!({ "query": "{ __typename }" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        simple.headers()["access-control-allow-origin"],
        "https://dash.example.com"
    );
}

/// A WebSocket upgrade to `server` with these headers: the upgrade's status, and the socket
/// when it was accepted.
async fn upgrade(
    server: &TestServer,
    headers: &[(&str, String)],
) -> (u16, Option<crate::websocket::Socket>) {
    let mut request = format!("ws://{}/graphql", server.address)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    for (name, value) in headers {
        let name: reqwest::header::HeaderName = name.parse().unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, response)) => (response.status().as_u16(), Some(socket)),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            (response.status().as_u16(), None)
        }
        Err(err) => panic!("the upgrade failed: {err}"),
    }
}

#[tokio::test]
async fn websockets_of_other_origins_and_hosts_are_refused() {
    let server = server_allowing(&["https://dash.example.com"], &[]).await;
    let port = server.address.port();
    for headers in [
        vec![("origin", "http://evil.example".to_owned())],
        vec![("host", format!("evil.example:{port}"))],
        vec![
            ("host", format!("evil.example:{port}")),
            ("origin", format!("http://evil.example:{port}")),
        ],
    ] {
        let (status, socket) = upgrade(&server, &headers).await;
        assert_eq!(status, 403, "{headers:?}");
        assert!(socket.is_none());
    }
    // Shown able to fail: the server's own page and a listed origin get a working socket.
    for origin in [
        format!("http://{}", server.address),
        "https://dash.example.com".to_owned(),
    ] {
        let (status, socket) = upgrade(&server, &[("origin", origin.clone())]).await;
        assert_eq!(status, 101, "{origin}");
        let mut socket = socket.unwrap();
        send(&mut socket, json!({ "type": "connection_init" })).await;
        assert_eq!(receive(&mut socket).await["type"], "connection_ack");
        send(
            &mut socket,
            json!({ "id": "1", "type": "subscribe", "payload": { "query": "{ __typename }" } }),
        )
        .await;
        let message = receive(&mut socket).await;
        assert_eq!(
            message["payload"]["data"]["__typename"], "Query",
            "{message}"
        );
    }
}

#[tokio::test]
async fn rebound_host_names_are_refused_without_authentication() {
    let server = server_allowing(&[], &["tasker.internal"]).await;
    let port = server.address.port();
    let evil = format!("evil.example:{port}");
    let (status, code, body) = from_page(&server, None, Some(&evil)).await;
    assert_eq!((status, code.as_str()), (403, "HOST_NOT_ALLOWED"), "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("--allowed-hosts")
    );
    // Even with a matching origin: the rebound page's own origin is evil.example.
    let (status, code, _) = from_page(&server, Some(&format!("http://{evil}")), Some(&evil)).await;
    assert_eq!((status, code.as_str()), (403, "HOST_NOT_ALLOWED"));
    let page = server
        .http()
        .get(server.url("/health/status"))
        .header(HOST, &evil)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 403, "every route is covered");
    assert_eq!(templates(&server).await, 0);
    // Local names, addresses and configured names are served.
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("tasker.internal:{port}"),
    ] {
        let (status, _, body) = from_page(&server, None, Some(&host)).await;
        assert_eq!(status, 200, "{host}: {body}");
    }

    // With authentication on, the host is not checked: a page has no token to present.
    let settings = AuthSettings {
        key: KeySource::Secret(b"a-browser-test-secret-of-more-than-32-bytes".to_vec()),
        issuer: None,
        audience: None,
        leeway_seconds: 5,
        roles: Default::default(),
    };
    let secured = TestServer::start_with_browser(
        TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await,
        Some(settings),
        Default::default(),
        &[],
        &[],
    )
    .await;
    let evil = format!("evil.example:{}", secured.address.port());
    let (status, code, _) = from_page(&secured, None, Some(&evil)).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHENTICATED"));
}

#[tokio::test]
async fn a_long_poll_outlives_the_request_timeout() {
    let limits = tasker_api::HttpLimits {
        request_timeout: std::time::Duration::from_millis(200),
        ..Default::default()
    };
    let server = TestServer::start_with_browser(
        TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await,
        None,
        limits,
        &[],
        &[],
    )
    .await;
    // Nothing will become ready: the claim waits its full second, five times the request
    // timeout, and answers with no leases instead of a TIMEOUT.
    let started = std::time::Instant::now();
    let claimed = server
        .data(
            "mutation { claimSteps(input: { workerId: \"w\", handlers: [\"nothing\"], waitSeconds: 1 }) { leases { leaseToken } } }",
            json!({}),
        )
        .await;
    assert_eq!(claimed["claimSteps"]["leases"], json!([]));
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "the claim waited its full second, past the 200 ms request timeout"
    );
}

#[tokio::test]
async fn filter_lists_are_capped() {
    let server = server().await;
    let many = |n: usize| (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>();
    let tasks = "query($tags: [String!]) { tasks(filter: { tags: $tags }) { totalCount } }";
    let (code, error) = server.error(tasks, json!({ "tags": many(101) })).await;
    assert_eq!(code, "VALIDATION_FAILED");
    assert_eq!(error["extensions"]["problems"][0]["path"], "filter.tags");
    server.data(tasks, json!({ "tags": many(100) })).await;
    let states = "query($s: [TaskState!]) { tasks(filter: { states: $s }) { totalCount } }";
    let (code, _) = server
        .error(states, json!({ "s": vec!["PENDING"; 101] }))
        .await;
    assert_eq!(code, "VALIDATION_FAILED");
    let events = "query($n: [String!], $ns: [String!]) { events(filter: { names: $n, namespaces: $ns }) { edges { cursor } } }";
    let (code, error) = server
        .error(events, json!({ "n": vec!["task.created"; 101] }))
        .await;
    assert_eq!(code, "VALIDATION_FAILED");
    assert_eq!(error["extensions"]["problems"][0]["path"], "filter.names");
    let (code, error) = server.error(events, json!({ "ns": many(101) })).await;
    assert_eq!(code, "VALIDATION_FAILED");
    assert_eq!(
        error["extensions"]["problems"][0]["path"],
        "filter.namespaces"
    );
    server
        .data(
            events,
            json!({ "n": vec!["task.created"; 100], "ns": many(100) }),
        )
        .await;
}

/// The exploit chain of the issue that found these holes, step by step against a default
/// server (loopback, no authentication, the embedded pool running): each step fails on its
/// own, even when the steps before it are granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_exploit_chain_fails_at_every_step() {
    let server =
        TestServer::start_running(TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await)
            .await;
    let evil = "http://evil.example";
    let probe = TEMPLATE.replace("127.0.0.1:9", &server.address.to_string());

    // 1. A "simple request" (text/plain, no preflight) registering a template: refused for
    // its origin, and for its content type even from an origin that would be allowed.
    let body = json!({ "query": REGISTER, "variables": { "d": probe } }).to_string();
    let own = format!("http://{}", server.address);
    for (origin, status) in [(evil, 403), (own.as_str(), 415)] {
        let response = server
            .http()
            .post(server.url("/graphql"))
            .header(CONTENT_TYPE, "text/plain;charset=UTF-8")
            .header(ORIGIN, origin)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{origin}");
    }
    // The same with a JSON type needs a preflight, and the request itself is refused.
    let (status, code, _) = from_page(&server, Some(evil), None).await;
    assert_eq!((status, code.as_str()), (403, "ORIGIN_NOT_ALLOWED"));
    assert_eq!(templates(&server).await, 0);

    // 2. Granted the template, the page's WebSocket (to start a task and read its results).
    server.register(&probe).await;
    let (status, _) = upgrade(&server, &[("origin", evil.to_owned())]).await;
    assert_eq!(status, 403);

    // 3. Granted a started task, its step cannot read the internal address.
    let id = server
        .create_task(json!({ "namespace": "web", "template": "probe" }))
        .await["task"]["id"]
        .clone();
    let query = "query($id: ID!) { task(id: $id) { state steps { state results lastError } } }";
    let task = server.finished_task(query, &id).await;
    assert_eq!(task["state"], "ERROR", "{task:#}");
    assert!(
        task["steps"][0]["results"].is_null(),
        "no internal answer: {task:#}"
    );
    assert!(
        task["steps"][0]["lastError"]
            .as_str()
            .unwrap()
            .contains("loopback")
    );

    // 4. DNS rebinding: the page on its own domain, resolved to the server's address.
    let rebound = format!("evil.example:{}", server.address.port());
    let (status, code, _) =
        from_page(&server, Some(&format!("http://{rebound}")), Some(&rebound)).await;
    assert_eq!((status, code.as_str()), (403, "HOST_NOT_ALLOWED"));
    let (status, _) = upgrade(&server, &[("host", rebound.clone())]).await;
    assert_eq!(status, 403);
}
