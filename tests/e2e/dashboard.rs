//! The dashboard's supports: the demo that gives it something to watch.

use crate::support::TestServer;
use serde_json::json;
use std::sync::Arc;
use tasker_store::testing::TestDatabase;

/// A server in demo mode: its templates, services and trickle of tasks.
pub(crate) async fn demo_server() -> TestServer {
    let settings = tasker::config::Settings {
        demo: true,
        workers: tasker_engine::WorkerPoolConfig::default().concurrency,
        ..TestServer::settings()
    };
    TestServer::start_with(
        TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await,
        settings,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_registers_its_templates_serves_its_services_and_starts_tasks() {
    let server = demo_server().await;
    let templates = server
        .data("{ templates(namespace: \"demo\") { name } }", json!({}))
        .await;
    let mut names: Vec<&str> = templates["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "customer_onboarding",
            "inventory_restock",
            "order_fulfillment"
        ]
    );

    // The first task starts at once, and the embedded workers take its first step.
    let mut state = json!(null);
    for _ in 0..200 {
        let tasks = server
            .data(
                "{ tasks(filter: {namespace: \"demo\", tags: [\"demo\"]}, first: 1) { edges { node { templateName steps { state } } } } }",
                json!({}),
            )
            .await;
        state = tasks["tasks"]["edges"][0]["node"].clone();
        if state["steps"][0]["state"] != json!(null) && state["steps"][0]["state"] != "PENDING" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state["templateName"], "order_fulfillment", "{state}");
    assert_ne!(state["steps"][0]["state"], "PENDING", "{state}");

    // The services fail as often as asked.
    let busy = server
        .http()
        .post(server.url("/demo/payments?fail=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 503);
    let fine = server
        .http()
        .get(server.url("/demo/quotes?fail=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(fine.status(), 200);
    assert_eq!(fine.json::<serde_json::Value>().await.unwrap()["ok"], true);
}
