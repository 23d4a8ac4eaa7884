//! The dashboard's supports: the demo that gives it something to watch.

use crate::support::TestServer;
use serde_json::json;
use std::sync::Arc;
use tasker_store::testing::TestDatabase;

/// A server in demo mode: its templates, services and trickle of tasks.
async fn demo_server() -> TestServer {
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

    // The first task starts at once and the embedded workers take its first step: the log
    // says so, replayed from its first event (the demo's registration), so nothing is missed.
    use crate::websocket::{connect_to, receive, send};
    let first = server
        .data("{ events(first: 1) { edges { cursor } } }", json!({}))
        .await["events"]["edges"][0]["cursor"]
        .clone();
    let mut socket = connect_to(server.address, "graphql-transport-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");
    send(&mut socket, json!({ "type": "subscribe", "id": "1", "payload": {
        "query": "subscription($a: String) { events(filter: {namespaces: [\"demo\"], names: [\"step.started\"]}, after: $a) { payload } }",
        "variables": { "a": first } } })).await;
    let started = receive(&mut socket).await;
    let payload = &started["payload"]["data"]["events"]["payload"];
    assert_eq!(payload["template"], "order_fulfillment", "{started}");
    assert_eq!(payload["step"], "validate_order", "{started}");

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

// ---------------------------------------------------------------------------------------------
// The dashboard in a real browser.

use crate::cdp::Browser;
use crate::support::Proxy;

pub(crate) const WORK: &str = "namespace: ui\nname: diamond\nversion: 1.0.0\nsteps:\n  - {name: fetch, handler: ext.work}\n  - {name: left, handler: ext.work, depends_on: [fetch]}\n  - {name: right, handler: ext.work, depends_on: [fetch]}\n  - {name: merge, handler: ext.work, depends_on: [left, right]}\n";

/// Claims up to `limit` steps of `ext.work` and completes them; how many there were.
pub(crate) async fn run_steps(server: &TestServer, limit: u32) -> usize {
    let leases = server.claim("ext.work", limit).await;
    for lease in &leases {
        server.complete(lease).await;
    }
    leases.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_tasks_live_resumes_after_a_drop_and_acts_in_a_real_browser() {
    let Some((chromium, server)) = browser_and_server().await else {
        return;
    };
    server.register(WORK).await;
    let proxy = Proxy::start(server.address, false).await;
    let mut browser = Browser::open(&chromium, &proxy.url("/dashboard#/?namespace=ui")).await;
    browser
        .wait_for("document.querySelector('#connection').dataset.state === 'live'")
        .await;

    // A new task appears in the list live.
    let task = server
        .create_task(json!({ "namespace": "ui", "template": "diamond", "tags": ["ui"] }))
        .await["task"]["id"]
        .clone();
    browser
        .wait_for(&format!(
            "document.querySelector('tr[data-task-id=\"{}\"]')",
            task.as_str().unwrap()
        ))
        .await;
    browser.screenshot("dashboard-list").await;

    // Its view: four nodes, pending; they turn COMPLETE as the steps run, through a drop.
    browser
        .eval(&format!(
            "location.hash = '#/task/{}'",
            task.as_str().unwrap()
        ))
        .await;
    browser
        .wait_for(&format!("document.body.dataset.rendered === '{}' && document.querySelectorAll('g.node').length === 4", task.as_str().unwrap()))
        .await;
    browser
        .wait_for("document.querySelector('#connection').dataset.state === 'live'")
        .await;
    assert_eq!(run_steps(&server, 1).await, 1);
    browser
        .wait_for("document.querySelector('g.node[data-name=fetch]').dataset.state === 'COMPLETE'")
        .await;
    proxy.cut();
    browser
        .wait_for("document.querySelector('#connection').dataset.state !== 'live'")
        .await;
    // While the page is away, both middle steps run; it learns of them only by resuming.
    assert_eq!(run_steps(&server, 2).await, 2);
    proxy.restore();
    browser
        .wait_for("document.querySelector('#connection').dataset.state === 'live'")
        .await;
    assert_eq!(run_steps(&server, 1).await, 1);
    browser
        .wait_for("document.querySelectorAll('g.node[data-state=COMPLETE]').length === 4 && document.querySelector('#task-state').dataset.state === 'COMPLETE'")
        .await;
    // The event stream shows the log exactly: no duplicate, no gap.
    let expected = server.event_cursors(&task).await;
    let shown = shown_cursors(&mut browser, expected.len()).await;
    assert_eq!(shown, json!(expected), "the page's events are the log's");
    assert_eq!(
        browser.eval("window.taskerMetrics.received").await,
        json!(expected.len()),
        "the server sent each event once, across the drop"
    );
    // The timeline catches up with the attempts (re-read once updates settle).
    browser
        .wait_for("document.querySelectorAll('#gantt rect.attempt.COMPLETE').length === 4")
        .await;
    browser.screenshot("dashboard-task-complete").await;

    // An action on the graph: a failed task is retried from its button.
    let failing = server
        .create_task(json!({ "namespace": "ui", "template": "diamond" }))
        .await["task"]["id"]
        .clone();
    let lease = server
        .data(
            "mutation { claimSteps(input: { workerId: \"ui\", handlers: [\"ext.work\"], limit: 1 }) { leases { leaseToken } } }",
            json!({}),
        )
        .await["claimSteps"]["leases"][0]["leaseToken"]
        .clone();
    server
        .data(
            "mutation($t: ID!) { failStep(input: { leaseToken: $t, message: \"upstream said no\", retryable: false }) { step { state } } }",
            json!({ "t": lease }),
        )
        .await;
    browser
        .eval(&format!(
            "location.hash = '#/task/{}'",
            failing.as_str().unwrap()
        ))
        .await;
    browser
        .wait_for("document.querySelector('#task-state') && document.querySelector('#task-state').dataset.state === 'ERROR' && document.querySelector('button[data-action=retryTask]')")
        .await;
    browser
        .eval("document.querySelector('g.node[data-name=fetch]').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
        .await;
    browser
        .wait_for("document.querySelector('#step-error') && document.querySelector('#step-error').textContent.includes('upstream said no')")
        .await;
    browser.screenshot("dashboard-step-drawer").await;
    browser
        .eval("document.querySelector('button[data-action=retryTask]').click()")
        .await;
    browser
        .wait_for("document.querySelector('#task-state').dataset.state === 'IN_PROGRESS' && document.querySelector('g.node[data-name=fetch]').dataset.state === 'PENDING'")
        .await;
    let state = server
        .data(
            "query($id: ID!) { task(id: $id) { state } }",
            json!({ "id": failing }),
        )
        .await;
    assert_eq!(state["task"]["state"], "IN_PROGRESS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_polls_the_log_when_websockets_are_blocked() {
    let Some((chromium, server)) = browser_and_server().await else {
        return;
    };
    server.register(WORK).await;
    let task = server
        .create_task(json!({ "namespace": "ui", "template": "diamond" }))
        .await["task"]["id"]
        .clone();
    let proxy = Proxy::start(server.address, true).await;
    let mut browser = Browser::open(
        &chromium,
        &proxy.url(&format!("/dashboard#/task/{}", task.as_str().unwrap())),
    )
    .await;
    browser
        .wait_for("document.querySelector('#connection').dataset.state === 'polling'")
        .await;
    while run_steps(&server, 4).await > 0 {}
    browser
        .wait_for("document.querySelectorAll('g.node[data-state=COMPLETE]').length === 4")
        .await;
    let expected = server.event_cursors(&task).await;
    let shown = shown_cursors(&mut browser, expected.len()).await;
    assert_eq!(shown, json!(expected));
    assert_eq!(
        browser.eval("window.taskerMetrics.received").await,
        json!(expected.len()),
        "each poll read after the last cursor"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_a_token_once_and_keeps_it_for_the_session() {
    let Some(chromium) = crate::chromium::chromium() else {
        return;
    };
    let server = crate::auth::secured().await;
    let token = crate::auth::token(&["*"], &["*"]);
    let registered = server
        .http()
        .post(server.url("/graphql"))
        .bearer_auth(&token)
        .json(&json!({ "query": "mutation($d: String!) { registerTemplate(input: {definition: $d}) { result } }", "variables": { "d": WORK } }))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(registered["data"]["registerTemplate"]["result"], "CREATED");
    let mut browser =
        Browser::open(&chromium, &format!("http://{}/dashboard", server.address)).await;
    browser
        .wait_for("document.querySelector('#token-dialog').open")
        .await;
    browser
        .eval("document.querySelector('#token-input').focus()")
        .await;
    browser.type_and_enter(&token).await;
    let ready = "document.querySelector('#connection').dataset.state === 'live' && document.querySelector('#total') && document.querySelector('#total').textContent === '0 tasks'";
    browser.wait_for(ready).await;
    assert_eq!(
        browser.eval("sessionStorage.getItem('tasker.token')").await,
        json!(token)
    );
    // Once per session: after a reload it is not asked again.
    browser
        .eval("window.beforeReload = true; location.reload()")
        .await;
    browser
        .wait_for(&format!("!window.beforeReload && {ready}"))
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#token-dialog').open")
            .await,
        json!(false)
    );
    // Live under authentication: a new task appears.
    let created = server
        .http()
        .post(server.url("/graphql"))
        .bearer_auth(&token)
        .json(&json!({ "query": "mutation { createTask(input: {namespace: \"ui\", template: \"diamond\"}) { task { id } } }" }))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let id = created["data"]["createTask"]["task"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    browser
        .wait_for(&format!(
            "document.querySelector('tr[data-task-id=\"{id}\"]')"
        ))
        .await;
    browser.screenshot("dashboard-authenticated").await;
}

/// The Chromium to drive and a server on SQLite for it; `None` where there is no browser.
async fn browser_and_server() -> Option<(String, TestServer)> {
    let chromium = crate::chromium::chromium()?;
    let server =
        TestServer::start(TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await).await;
    Some((chromium, server))
}

/// The cursors of the events the page lists, oldest first.
/// The cursors of the events the page lists, oldest first, once it lists at least `count`
/// (a task's state can arrive a message before its last events: each update reads the task
/// as it is then).
async fn shown_cursors(browser: &mut Browser, count: usize) -> serde_json::Value {
    browser
        .wait_for(&format!(
            "document.querySelectorAll('#events li').length >= {count}"
        ))
        .await;
    browser
        .eval("[...document.querySelectorAll('#events li')].map(li => li.dataset.cursor).reverse()")
        .await
}

/// A template of `levels` × `width` steps, each depending on two of the level before.
fn wide_template(levels: usize, width: usize) -> String {
    let mut yaml = String::from("namespace: ui\nname: big\nversion: 1.0.0\nsteps:\n");
    for level in 0..levels {
        for i in 0..width {
            let depends = if level == 0 {
                String::new()
            } else {
                format!(
                    ", depends_on: [s{}_{i}, s{}_{}]",
                    level - 1,
                    level - 1,
                    (i + 1) % width
                )
            };
            yaml.push_str(&format!(
                "  - {{name: s{level}_{i}, handler: ext.bulk{depends}}}\n"
            ));
        }
    }
    yaml
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Figures, not assertions on time: how long a task of 1,000 steps takes to render, and how
/// long the page spends on each live update while about 200 events a second arrive. The page
/// must keep up (every completed step shown complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_a_thousand_step_task_and_keeps_up_with_a_stream_of_events() {
    let Some((chromium, server)) = browser_and_server().await else {
        return;
    };
    server.register(&wide_template(10, 100)).await;
    let task = server
        .create_task(json!({ "namespace": "ui", "template": "big" }))
        .await["task"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut browser = Browser::open(
        &chromium,
        &format!("http://{}/dashboard#/task/{task}", server.address),
    )
    .await;
    browser
        .wait_for(&format!("document.body.dataset.rendered === '{task}' && document.querySelectorAll('g.node').length === 1000 && document.querySelector('#connection').dataset.state === 'live'"))
        .await;
    let load_ms = browser.eval("window.taskerMetrics.loadMs").await;
    let render_ms = browser.eval("window.taskerMetrics.renderMs").await;

    // Aiming at 200 events a second or more: every 100 ms, 20 steps claimed and completed (20
    // started, 20 completed, and the readiness events between), as fast as the server allows.
    let completions: String = (0..10)
        .map(|i| {
            format!("c{i}: completeStep(input: {{ leaseToken: $t{i} }}) {{ step {{ state }} }} ")
        })
        .collect();
    let variables: String = (0..10).map(|i| format!("$t{i}: ID!, ")).collect();
    let complete = format!("mutation({variables}) {{ {completions} }}");
    let started = std::time::Instant::now();
    let mut done = 0;
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(100));
    while started.elapsed() < std::time::Duration::from_secs(5) {
        ticks.tick().await;
        let claimed = server
            .data(
                "mutation { claimSteps(input: { workerId: \"ui\", handlers: [\"ext.bulk\"], limit: 20 }) { leases { leaseToken } } }",
                json!({}),
            )
            .await;
        let leases = claimed["claimSteps"]["leases"].as_array().unwrap().clone();
        if leases.len() < 20 {
            break;
        }
        // Two mutations of ten completions (the root-field limit), at once.
        let tokens = |half: &[serde_json::Value]| {
            serde_json::Value::Object(
                half.iter()
                    .enumerate()
                    .map(|(i, lease)| (format!("t{i}"), lease["leaseToken"].clone()))
                    .collect(),
            )
        };
        tokio::join!(
            server.data(&complete, tokens(&leases[..10])),
            server.data(&complete, tokens(&leases[10..]))
        );
        done += 20;
    }
    assert!(done > 0, "the steps were claimed and completed");
    let elapsed = started.elapsed().as_secs_f64();
    browser
        .wait_for(&format!(
            "document.querySelectorAll('g.node[data-state=COMPLETE]').length === {done}"
        ))
        .await;
    let live_events = browser
        .eval("window.taskerMetrics.live")
        .await
        .as_f64()
        .unwrap();
    let mut updates: Vec<f64> =
        serde_json::from_value(browser.eval("window.taskerMetrics.updates").await).unwrap();
    updates.sort_by(f64::total_cmp);
    browser.screenshot("dashboard-1000-steps").await;
    eprintln!(
        "dashboard figures: 1,000-step task drawn in {:.0} ms ({:.0} ms with its query); {done} steps completed in {elapsed:.1} s \
         ({:.0} events/s reached the page live); {} live updates, page time per update p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        render_ms.as_f64().unwrap(),
        load_ms.as_f64().unwrap(),
        live_events / elapsed,
        updates.len(),
        percentile(&updates, 0.5),
        percentile(&updates, 0.99),
        updates.last().copied().unwrap_or(0.0),
    );
}
