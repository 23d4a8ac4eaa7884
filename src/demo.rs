//! `--demo`: something to watch. Registers templates that take time and sometimes fail
//! (`sleep` steps, retries with backoff, an `approval`, `http` calls), serves the small
//! services their `http` steps call (`/demo/{service}`), and starts a steady trickle of tasks,
//! so a newcomer sees the dashboard move within seconds, offline.

use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tasker_domain::TaskRequest;
use tasker_engine::{BundledTemplate, Engine};
use tasker_store::NewTask;
use tokio::sync::watch;

/// The demo templates, modelled on the Rails engine's demo apps.
pub(crate) const TEMPLATES: &[BundledTemplate] = &[
    bundled!("examples/demo/order_fulfillment.yaml"),
    bundled!("examples/demo/inventory_restock.yaml"),
    bundled!("examples/demo/customer_onboarding.yaml"),
];

/// How often the trickle starts a task.
pub(crate) const EVERY: Duration = Duration::from_secs(3);

const CUSTOMERS: &[&str] = &[
    "ada", "grace", "linus", "barbara", "ken", "margaret", "dennis",
];

/// The demo services: each answers after a short pause, and fails (503) with the probability
/// its `fail` query parameter gives (0 to 1).
pub(crate) fn routes() -> axum::Router {
    axum::Router::new().route("/demo/{service}", axum::routing::any(service))
}

async fn service(
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    let fail = params
        .get("fail")
        .and_then(|value| value.parse::<f64>().ok())
        .filter(|chance| chance.is_finite())
        .unwrap_or(0.0)
        .clamp(0.0, 1.0);
    tokio::time::sleep(Duration::from_millis(fastrand::u64(100..600))).await;
    if fastrand::f64() < fail {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": format!("the demo {name} service is busy; try again") })),
        );
    }
    (
        StatusCode::OK,
        axum::Json(json!({ "service": name, "ok": true, "reference": uuid::Uuid::now_v7() })),
    )
}

/// The `n`th task of the trickle: mostly orders, some onboardings, now and then a restock that
/// waits for a person's approval.
fn nth_task(n: u64, service: &str) -> NewTask {
    let customer = CUSTOMERS[(n as usize) % CUSTOMERS.len()];
    let (template, context) = match n % 10 {
        0..=5 => (
            "order_fulfillment",
            json!({ "order_id": 1000 + n, "customer": customer, "service": service }),
        ),
        6..=8 => (
            "customer_onboarding",
            json!({ "customer": customer, "service": service }),
        ),
        _ => (
            "inventory_restock",
            json!({ "sku": format!("SKU-{}", 100 + n % 7), "quantity": 50, "service": service }),
        ),
    };
    NewTask {
        namespace: "demo".into(),
        template: template.into(),
        version: None,
        trace_parent: None,
        request: TaskRequest {
            context,
            initiator: Some("demo".into()),
            tags: vec!["demo".into()],
            ..TaskRequest::default()
        },
    }
}

/// Starts a demo task every `every` (the first at once) until `stop` changes.
pub(crate) async fn trickle(
    engine: Arc<Engine>,
    service: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    let mut n = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(err) = engine.create_task(nth_task(n, &service)).await {
            tracing::warn!(error = %err, "the demo could not start a task");
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_templates_are_valid_and_the_trickle_uses_each() {
        for template in TEMPLATES {
            tasker_domain::TaskTemplate::parse(template.source)
                .unwrap_or_else(|err| panic!("{}: {err}", template.file));
        }
        let used: std::collections::BTreeSet<String> =
            (0..10).map(|n| nth_task(n, "http://x").template).collect();
        assert_eq!(used.len(), TEMPLATES.len());
    }
}
