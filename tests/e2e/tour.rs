//! The path a new user takes: register a template, start a task, read it, list, cancel.

use crate::support::{DIAMOND, TestServer};
use serde_json::{Value, json};

const TASK_DETAIL: &str = r#"
query($id: ID!) {
  task(id: $id) {
    id namespace templateName templateVersion state context tags initiator correlationId
    template { key }
    steps { id name handler state attempts maxAttempts parents { name } children { name } transitions { fromState toState } }
    edges { parent { name } child { name } }
    stepCounts { total pending cancelled }
    graph { roots leaves depth topologicalOrder levels { level stepNames } nodes { name level } edges { from to } }
    transitions { fromState toState sortKey metadata }
    events { name payload }
  }
}"#;

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|item| item["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn register_create_read_list_and_cancel() {
    for server in TestServer::all().await {
        let registered = server.register(DIAMOND).await;
        assert_eq!(registered["result"], "CREATED");
        assert_eq!(registered["template"]["key"], "shop/fulfil@1.0.0");
        assert_eq!(server.register(DIAMOND).await["result"], "UNCHANGED");

        let created = server
            .create_task(json!({
                "namespace": "shop", "template": "fulfil",
                "context": { "order_id": 42 }, "tags": ["vip", "web"], "initiator": "e2e",
                "correlationId": "ci-run-42"
            }))
            .await;
        assert_eq!(created["created"], true);
        assert_eq!(created["task"]["state"], "PENDING");
        let id = created["task"]["id"].as_str().unwrap().to_owned();

        let task = server.data(TASK_DETAIL, json!({ "id": id })).await["task"].clone();
        assert_eq!(task["templateVersion"], "1.0.0");
        assert_eq!(task["template"]["key"], "shop/fulfil@1.0.0");
        assert_eq!(task["context"], json!({ "order_id": 42 }));
        assert_eq!(task["tags"], json!(["vip", "web"]));
        assert_eq!(
            names(&task["steps"]),
            ["validate", "reserve", "charge", "ship"]
        );
        let ship = &task["steps"][3];
        assert_eq!(names(&ship["parents"]), ["reserve", "charge"]);
        assert_eq!(names(&task["steps"][0]["children"]), ["reserve", "charge"]);
        assert_eq!(
            ship["transitions"],
            json!([{ "fromState": null, "toState": "PENDING" }])
        );
        assert_eq!(task["edges"].as_array().unwrap().len(), 4);
        assert_eq!(task["stepCounts"]["total"], 4);
        assert_eq!(task["stepCounts"]["pending"], 4);
        let graph = &task["graph"];
        assert_eq!(graph["depth"], 3);
        assert_eq!(
            graph["levels"],
            json!([
                { "level": 0, "stepNames": ["validate"] },
                { "level": 1, "stepNames": ["reserve", "charge"] },
                { "level": 2, "stepNames": ["ship"] }
            ])
        );
        assert_eq!(graph["roots"], json!([task["steps"][0]["id"]]));
        assert_eq!(graph["leaves"], json!([task["steps"][3]["id"]]));
        assert_eq!(graph["topologicalOrder"].as_array().unwrap().len(), 4);
        // task.created, step.created × 4, task.steps_ready (the root).
        assert_eq!(task["events"].as_array().unwrap().len(), 6);
        assert_eq!(task["correlationId"], "ci-run-42");
        assert!(
            task["events"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["payload"]["correlation_id"] == "ci-run-42"),
            "every event of the task carries its correlation id"
        );

        // The step query and its way back to the task.
        let step_id = task["steps"][1]["id"].clone();
        let step = server
            .data(
                "query($id: ID!) { step(id: $id) { name task { id } parents { name } } }",
                json!({ "id": step_id }),
            )
            .await;
        assert_eq!(step["step"]["task"]["id"], id.as_str());
        assert_eq!(names(&step["step"]["parents"]), ["validate"]);

        let cancelled = server
            .data(
                "mutation($id: ID!) { cancelTask(input: { id: $id, reason: \"done testing\" }) { task { state steps { state } } } }",
                json!({ "id": id }),
            )
            .await;
        let task = &cancelled["cancelTask"]["task"];
        assert_eq!(task["state"], "CANCELLED");
        assert!(
            task["steps"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["state"] == "CANCELLED")
        );
        let detail = server.data(TASK_DETAIL, json!({ "id": id })).await["task"].clone();
        assert_eq!(detail["transitions"][1]["toState"], "CANCELLED");
        assert_eq!(
            detail["transitions"][1]["metadata"]["reason"],
            "done testing"
        );
        assert_eq!(detail["stepCounts"]["cancelled"], 4);
    }
}

#[tokio::test]
async fn listing_filters_and_paginates_with_cursors() {
    for server in TestServer::all().await {
        server.register(DIAMOND).await;
        server
            .register(&DIAMOND.replace("namespace: shop", "namespace: billing"))
            .await;
        let mut ids = Vec::new();
        for i in 0..5 {
            let namespace = if i < 3 { "shop" } else { "billing" };
            let tags = if i % 2 == 0 {
                json!(["even"])
            } else {
                json!([])
            };
            let created = server
                .create_task(json!({
                    "namespace": namespace, "template": "fulfil",
                    "context": { "order_id": i }, "tags": tags
                }))
                .await;
            ids.push(created["task"]["id"].as_str().unwrap().to_owned());
        }
        let page_query = r#"query($f: TaskFilterInput, $after: String) {
            tasks(filter: $f, first: 2, after: $after) {
              totalCount
              pageInfo { hasNextPage hasPreviousPage endCursor }
              edges { cursor node { id namespace } }
            }}"#;
        let mut seen = Vec::new();
        let mut after = Value::Null;
        loop {
            let page = server
                .data(page_query, json!({ "f": null, "after": after }))
                .await["tasks"]
                .clone();
            assert_eq!(page["totalCount"], 5);
            for edge in page["edges"].as_array().unwrap() {
                seen.push(edge["node"]["id"].as_str().unwrap().to_owned());
            }
            if page["pageInfo"]["hasNextPage"] == false {
                break;
            }
            assert_eq!(page["edges"].as_array().unwrap().len(), 2);
            after = page["pageInfo"]["endCursor"].clone();
        }
        let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
        assert_eq!(seen, newest_first, "{}", server.backend());

        let count = |filter: Value| {
            let server = &server;
            async move {
                server
                    .data(page_query, json!({ "f": filter, "after": null }))
                    .await["tasks"]["totalCount"]
                    .as_u64()
                    .unwrap()
            }
        };
        assert_eq!(count(json!({ "namespace": "shop" })).await, 3);
        assert_eq!(
            count(json!({ "namespace": "billing", "template": "fulfil" })).await,
            2
        );
        assert_eq!(count(json!({ "tags": ["even"] })).await, 3);
        assert_eq!(count(json!({ "states": ["PENDING"] })).await, 5);
        assert_eq!(count(json!({ "states": ["COMPLETE", "ERROR"] })).await, 0);
        assert_eq!(
            count(json!({ "createdAfter": "2000-01-01T00:00:00Z" })).await,
            5
        );
        assert_eq!(
            count(json!({ "createdBefore": "2000-01-01T00:00:00Z" })).await,
            0
        );
    }
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_task() {
    for server in TestServer::all().await {
        server.register(DIAMOND).await;
        let input = json!({
            "namespace": "shop", "template": "fulfil",
            "context": { "order_id": 9 }, "idempotencyKey": "order-9"
        });
        let first = server.create_task(input.clone()).await;
        let second = server.create_task(input).await;
        assert_eq!(first["created"], true);
        assert_eq!(second["created"], false);
        assert_eq!(first["task"]["id"], second["task"]["id"]);
    }
}

/// `createTasks` starts a batch in one call, answers each input in order, and refuses the
/// whole batch (nothing written) when one input is bad, naming it; it has a size limit.
#[tokio::test]
async fn create_tasks_starts_a_batch_all_or_nothing() {
    for server in TestServer::all().await {
        server.register(DIAMOND).await;
        let create = "mutation($inputs: [CreateTaskInput!]!) { createTasks(inputs: $inputs) { results { created task { id state context steps { name state } } } } }";
        let order = |i: i64| json!({ "namespace": "shop", "template": "fulfil", "context": { "order_id": i } });
        let mut inputs: Vec<Value> = (0..20).map(order).collect();
        inputs[3]["idempotencyKey"] = json!("order-3");
        let data = server.data(create, json!({ "inputs": inputs })).await;
        let results = data["createTasks"]["results"].as_array().unwrap();
        assert_eq!(results.len(), 20);
        for (i, result) in results.iter().enumerate() {
            assert_eq!(result["created"], true);
            assert_eq!(result["task"]["context"]["order_id"], i as i64, "in order");
            assert_eq!(result["task"]["state"], "PENDING");
            assert_eq!(result["task"]["steps"].as_array().unwrap().len(), 4);
        }
        // The same key again answers the task it started.
        let again = server.data(create, json!({ "inputs": [inputs[3]] })).await;
        assert_eq!(again["createTasks"]["results"][0]["created"], false);
        assert_eq!(
            again["createTasks"]["results"][0]["task"]["id"],
            results[3]["task"]["id"]
        );

        // One bad input: nothing is written, and the error names it.
        let listed = "{ tasks(first: 100) { edges { node { id } } } }";
        let before = server.data(listed, json!({})).await["tasks"]["edges"]
            .as_array()
            .unwrap()
            .len();
        let mut bad = vec![order(100), order(101)];
        bad[1]["context"] = json!({ "order_id": "a string" });
        let (code, error) = server.error(create, json!({ "inputs": bad })).await;
        assert_eq!(code, "VALIDATION_FAILED", "{error}");
        assert!(error.to_string().contains("inputs[1].context"), "{error}");
        let after = server.data(listed, json!({})).await["tasks"]["edges"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(before, after, "{}: nothing written", server.backend());

        let too_many: Vec<Value> = (0..1001).map(order).collect();
        let (code, error) = server.error(create, json!({ "inputs": too_many })).await;
        assert_eq!(code, "VALIDATION_FAILED");
        assert!(error.to_string().contains("at most 1000"), "{error}");
    }
}

/// Listing 100 tasks with their steps, edges and derived fields costs a constant number of
/// SQL statements, the same as listing 10.
#[tokio::test]
async fn listing_many_tasks_with_nested_data_costs_a_constant_number_of_statements() {
    for server in TestServer::all().await {
        server.register(DIAMOND).await;
        for i in 0..100 {
            server
                .create_task(json!({ "namespace": "shop", "template": "fulfil", "context": { "order_id": i } }))
                .await;
        }
        let query = r#"query($first: Int!) { tasks(first: $first) {
            edges { node {
              id state template { key }
              steps { name state parents { name } children { name } }
              edges { parentId childId }
              stepCounts { total }
              graph { levels { level stepNames } }
              transitions { toState }
            } } } }"#;
        let mut costs = Vec::new();
        for first in [10, 100] {
            let (data, cost) = server
                .data_with_statements(query, json!({ "first": first }))
                .await;
            let tasks = data["tasks"]["edges"].as_array().unwrap();
            assert_eq!(tasks.len(), first as usize);
            assert!(
                tasks
                    .iter()
                    .all(|t| t["node"]["steps"].as_array().unwrap().len() == 4)
            );
            println!(
                "{}: listing {first} tasks with steps, edges, graph, transitions and template: {cost} SQL statements",
                server.backend()
            );
            costs.push(cost);
        }
        assert_eq!(costs[0], costs[1], "the cost must not grow with the page");
        assert!(costs[1] <= 5, "{} statements", costs[1]);
    }
}

#[tokio::test]
async fn health_checks_answer() {
    for server in TestServer::all().await {
        let live = server
            .http()
            .get(server.url("/health/live"))
            .send()
            .await
            .unwrap();
        assert_eq!(live.status(), 200);
        let ready = server
            .http()
            .get(server.url("/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200);
        let body: Value = ready.json().await.unwrap();
        assert_eq!(body["database"], server.backend());
    }
}

#[tokio::test]
async fn the_playground_is_served_with_its_assets() {
    let server = TestServer::start(
        tasker_store::testing::TestDatabase::sqlite(std::sync::Arc::new(
            tasker_domain::SystemClock,
        ))
        .await,
    )
    .await;
    for path in ["/", "/playground"] {
        let page = server.http().get(server.url(path)).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        assert!(html.contains("GraphiQL.createFetcher"));
        assert!(html.contains("query ExploreTemplates"));
    }
    let asset = server
        .http()
        .get(server.url("/playground/vendor/graphiql.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(asset.status(), 200);
    assert!(
        asset.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let missing = server
        .http()
        .get(server.url("/playground/vendor/..%2FCargo.toml"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[test]
fn schema_graphql_matches_the_schema_the_server_builds() {
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql"))
            .expect("schema.graphql at the repository root");
    assert!(
        checked_in == tasker_api::sdl(),
        "schema.graphql is out of date: run `cargo run -- schema > schema.graphql`"
    );
}

#[tokio::test]
async fn namespaces_with_their_templates_cost_two_statements() {
    for server in TestServer::all().await {
        for namespace in ["alpha", "beta", "gamma"] {
            server
                .register(&DIAMOND.replace("namespace: shop", &format!("namespace: {namespace}")))
                .await;
        }
        let (data, statements) = server
            .data_with_statements("{ namespaces { name templates { key } } }", json!({}))
            .await;
        assert_eq!(statements, 2);
        assert_eq!(data["namespaces"][1]["name"], "beta");
        assert_eq!(
            data["namespaces"][1]["templates"],
            json!([{ "key": "beta/fulfil@1.0.0" }])
        );
    }
}

/// A task of 1,000 steps answers its whole graph, critical path and bottlenecks included, with
/// the same few statements as a small one.
#[tokio::test]
async fn a_thousand_step_graph_with_insight_costs_a_constant_number_of_statements() {
    for server in TestServer::all().await {
        // 100 chains of 10 under one root.
        let mut steps = vec![json!({ "name": "root", "handler": "noop" })];
        for chain in 0..100 {
            for level in 0..10 {
                let parent = if level == 0 {
                    "root".to_owned()
                } else {
                    format!("c{chain}_{}", level - 1)
                };
                steps.push(json!({ "name": format!("c{chain}_{level}"), "handler": "noop", "depends_on": [parent] }));
            }
        }
        steps.truncate(1000);
        let template =
            json!({ "namespace": "big", "name": "wide", "version": "1.0.0", "steps": steps });
        server.register(&template.to_string()).await;
        let id = server
            .create_task(json!({ "namespace": "big", "template": "wide" }))
            .await["task"]["id"]
            .clone();
        let query = r#"query($id: ID!) { task(id: $id) { graph {
            nodes { stepId level } edges { from to } levels { level stepIds }
            criticalPath { stepNames totalSeconds estimated } parallelism
            bottlenecks { name blockedSteps } } } }"#;
        let started = std::time::Instant::now();
        let (data, statements) = server
            .data_with_statements(query, json!({ "id": id }))
            .await;
        let elapsed = started.elapsed() / 3;
        let graph = data["task"]["graph"].clone();
        println!(
            "{}: 1,000-step graph with critical path and bottlenecks: {statements} statements, {:.1} ms (debug build)",
            server.backend(),
            elapsed.as_secs_f64() * 1000.0
        );
        assert_eq!(statements, 3, "task, steps, edges");
        assert_eq!(graph["nodes"].as_array().unwrap().len(), 1000);
        assert_eq!(graph["edges"].as_array().unwrap().len(), 999);
        assert_eq!(graph["levels"].as_array().unwrap().len(), 11);
        assert_eq!(graph["parallelism"], 100);
        assert_eq!(
            graph["criticalPath"]["stepNames"].as_array().unwrap().len(),
            11
        );
        assert_eq!(graph["criticalPath"]["estimated"], true);
        assert_eq!(
            graph["bottlenecks"][0],
            json!({ "name": "root", "blockedSteps": 999 })
        );
    }
}
