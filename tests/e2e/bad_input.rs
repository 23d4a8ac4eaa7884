//! Every kind of bad input gets a GraphQL error with a stable code, writes nothing, and the
//! server keeps serving.

use crate::support::{DIAMOND, TestServer};
use serde_json::{Value, json};

const REGISTER: &str = "mutation($d: String!, $r: Boolean) { registerTemplate(input: { definition: $d, replace: $r }) { result } }";
const CREATE: &str = "mutation($i: CreateTaskInput!) { createTask(input: $i) { task { id } } }";
const COUNTS: &str = "{ tasks { totalCount } namespaces { name templates { key } } }";

fn problems(error: &Value) -> Vec<(String, String)> {
    error["extensions"]["problems"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|p| {
                    (
                        p["path"].as_str().unwrap().to_owned(),
                        p["message"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn bad_definitions_are_refused_with_every_problem_listed() {
    for server in TestServer::all().await {
        let before = server.data(COUNTS, json!({})).await;

        let (code, error) = server
            .error(REGISTER, json!({ "d": "namespace: [unclosed" }))
            .await;
        assert_eq!(code, "VALIDATION_FAILED");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("malformed YAML")
        );

        let (code, error) = server
            .error(REGISTER, json!({ "d": "{\"namespace\": \"a\", " }))
            .await;
        assert_eq!(code, "VALIDATION_FAILED");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("malformed JSON")
        );

        let invalid_dag = r#"
namespace: shop
name: broken
version: 1.0.0
steps:
  - { name: a, handler: noop, depends_on: [c] }
  - { name: b, handler: noop, depends_on: [a, ghost] }
  - { name: c, handler: noop, depends_on: [b] }
  - { name: d, handler: noop, depends_on: [d] }
"#;
        let (code, error) = server.error(REGISTER, json!({ "d": invalid_dag })).await;
        assert_eq!(code, "VALIDATION_FAILED");
        let found = problems(&error);
        assert!(found.contains(&(
            "steps[1].depends_on[1]".into(),
            "unknown step \"ghost\"".into()
        )));
        assert!(found.contains(&(
            "steps[3].depends_on[0]".into(),
            "step \"d\" depends on itself".into()
        )));
        assert!(found.contains(&(
            "steps[0].depends_on".into(),
            "dependency cycle: a -> b -> c -> a".into()
        )));

        let (code, error) = server
            .error(
                REGISTER,
                json!({ "d": DIAMOND.replace("version: 1.0.0", "version: 1.0.0\npriority: 9") }),
            )
            .await;
        assert_eq!(code, "VALIDATION_FAILED");
        assert_eq!(problems(&error)[0].0, "priority");

        let (code, error) = server
            .error(
                REGISTER,
                json!({ "d": DIAMOND.replace("version: 1.0.0", "version: 1.0.0\nconcurrency: { key: customer, limit: 0, strategy: fifo }") }),
            )
            .await;
        assert_eq!(code, "VALIDATION_FAILED");
        let paths: Vec<String> = problems(&error).into_iter().map(|(path, _)| path).collect();
        assert_eq!(
            paths,
            [
                "concurrency.key",
                "concurrency.limit",
                "concurrency.strategy"
            ]
        );

        let oversized = format!("{DIAMOND}description: \"{}\"\n", "x".repeat(1024 * 1024));
        let (code, error) = server.error(REGISTER, json!({ "d": oversized })).await;
        assert_eq!(code, "VALIDATION_FAILED");
        assert!(error["message"].as_str().unwrap().contains("1 MiB"));

        server.register(DIAMOND).await;
        let changed = DIAMOND.replace(
            "handler: noop, depends_on: [reserve, charge]",
            "handler: courier, depends_on: [reserve, charge]",
        );
        let (code, error) = server
            .error(REGISTER, json!({ "d": changed, "r": false }))
            .await;
        assert_eq!(code, "CONFLICT");
        assert!(error["message"].as_str().unwrap().contains("replace: true"));

        let after = server.data(COUNTS, json!({})).await;
        let templates = |data: &Value| -> usize {
            data["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["templates"].as_array().unwrap().len())
                .sum()
        };
        assert_eq!(
            templates(&after),
            templates(&before) + 1,
            "only the valid one was stored"
        );
    }
}

#[tokio::test]
async fn bad_task_requests_are_refused_and_leave_no_row_behind() {
    for server in TestServer::all().await {
        server.register(DIAMOND).await;

        let (code, error) = server
            .error(CREATE, json!({ "i": { "namespace": "shop", "template": "fulfil", "context": { "order_id": "seven" } } }))
            .await;
        assert_eq!(code, "VALIDATION_FAILED");
        assert_eq!(problems(&error)[0].0, "context/order_id");

        let (code, _) = server
            .error(
                CREATE,
                json!({ "i": { "namespace": "shop", "template": "fulfil", "context": [1, 2] } }),
            )
            .await;
        assert_eq!(code, "VALIDATION_FAILED");

        let (code, error) = server
            .error(
                CREATE,
                json!({ "i": { "namespace": "nowhere", "template": "fulfil" } }),
            )
            .await;
        assert_eq!(code, "NOT_FOUND");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("nowhere/fulfil")
        );

        let (code, _) = server
            .error(CREATE, json!({ "i": { "namespace": "shop", "template": "fulfil", "version": "9.9.9", "context": { "order_id": 1 } } }))
            .await;
        assert_eq!(code, "NOT_FOUND");

        let (code, _) = server
            .error(
                CREATE,
                json!({ "i": { "namespace": "shop", "template": "fulfil", "version": "latest" } }),
            )
            .await;
        assert_eq!(code, "VALIDATION_FAILED");

        let (code, _) = server
            .error(CREATE, json!({ "i": { "namespace": "shop", "template": "fulfil", "context": { "order_id": 1 }, "tags": [""] } }))
            .await;
        assert_eq!(code, "VALIDATION_FAILED");

        let (code, error) = server
            .error(CREATE, json!({ "i": { "namespace": "shop", "template": "fulfil", "context": { "order_id": 1 }, "priority": 0 } }))
            .await;
        assert_eq!(code, "VALIDATION_FAILED");
        assert_eq!(
            problems(&error),
            [(
                "priority".to_owned(),
                "must be a whole number from 1 (low) to 4 (urgent), found 0".to_owned()
            )]
        );

        let counts = server.data(COUNTS, json!({})).await;
        assert_eq!(counts["tasks"]["totalCount"], 0, "{}", server.backend());
    }
}

#[tokio::test]
async fn malformed_ids_cursors_and_pages_are_refused() {
    for server in TestServer::all().await {
        for query in [
            "{ task(id: \"42\") { id } }",
            "{ step(id: \"not-a-uuid\") { id } }",
            "mutation { cancelTask(input: { id: \"x\" }) { task { id } } }",
            "{ tasks(after: \"bm90IGEgY3Vyc29y\") { totalCount } }",
            "{ tasks(first: 1000) { totalCount } }",
            "{ tasks(first: -1) { totalCount } }",
        ] {
            let (code, _) = server.error(query, json!({})).await;
            assert_eq!(code, "VALIDATION_FAILED", "{query}");
        }
        let unknown = uuid::Uuid::now_v7();
        for query in [
            format!("{{ task(id: \"{unknown}\") {{ id }} }}"),
            format!("{{ step(id: \"{unknown}\") {{ id }} }}"),
            format!(
                "mutation {{ cancelTask(input: {{ id: \"{unknown}\" }}) {{ task {{ id }} }} }}"
            ),
            "{ template(namespace: \"shop\", name: \"nope\") { key } }".to_owned(),
        ] {
            let (code, _) = server.error(&query, json!({})).await;
            assert_eq!(code, "NOT_FOUND", "{query}");
        }
    }
}

#[tokio::test]
async fn cancelling_a_finished_task_is_a_conflict() {
    for server in TestServer::all().await {
        server.register(DIAMOND).await;
        let created = server
            .create_task(
                json!({ "namespace": "shop", "template": "fulfil", "context": { "order_id": 1 } }),
            )
            .await;
        let cancel = "mutation($id: ID!) { cancelTask(input: { id: $id }) { task { state } } }";
        let id = json!({ "id": created["task"]["id"] });
        server.data(cancel, id.clone()).await;
        let (code, error) = server.error(cancel, id).await;
        assert_eq!(code, "CONFLICT");
        assert_eq!(
            error["message"],
            "a task cannot go from cancelled to cancelled"
        );
    }
}

#[tokio::test]
async fn broken_requests_get_codes_and_the_server_keeps_serving() {
    for server in TestServer::all().await {
        let (code, _) = server
            .error("{ tasks { edges { node { id } }", json!({}))
            .await;
        assert_eq!(code, "GRAPHQL_PARSE_FAILED");
        let (code, _) = server.error("{ nonsense }", json!({})).await;
        assert_eq!(code, "GRAPHQL_VALIDATION_FAILED");
        let (code, _) = server
            .error(
                "query($n: Int!) { tasks(first: $n) { totalCount } }",
                json!({ "n": "ten" }),
            )
            .await;
        assert_eq!(code, "GRAPHQL_VALIDATION_FAILED");
        let deep = format!(
            "{{ {}id{} }}",
            "task(id: \"x\") { steps { task { ".repeat(20),
            " } } }".repeat(20)
        );
        let (code, _) = server.error(&deep, json!({})).await;
        assert!(code.starts_with("GRAPHQL_"), "{code}");

        let post = |body: String| {
            server
                .http()
                .post(server.url("/graphql"))
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        let response = post("not json".into()).await.unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_REQUEST");
        let response = post("[{\"query\": \"{ namespaces { name } }\"}]".into())
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let huge = format!("{{\"query\": \"{}\"}}", " ".repeat(5 * 1024 * 1024));
        let response = post(huge).await.unwrap();
        assert_eq!(response.status(), 413);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["extensions"]["code"], "PAYLOAD_TOO_LARGE");

        // Still serving.
        let data = server.data("{ namespaces { name } }", json!({})).await;
        assert!(data["namespaces"].is_array());
    }
}
