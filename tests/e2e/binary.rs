//! The real `tasker` binary: first start on an empty data directory, examples loaded,
//! playground and GraphQL served, clean exit on SIGTERM; `migrate` and `schema` commands.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BINARY: &str = env!("CARGO_BIN_EXE_tasker");

/// Starts `tasker serve` on port 0 and reads the address it logged.
fn start(data_dir: &std::path::Path) -> (Child, String, mpsc::Receiver<String>) {
    start_with(data_dir, &[])
}

/// Starts `tasker serve` with `extra` flags. SIGXFSZ is ignored in it, so that a write past a
/// file-size limit (how the fault tests fill the disk) fails with an error instead of killing
/// the process.
pub(crate) fn start_with(
    data_dir: &std::path::Path,
    extra: &[&str],
) -> (Child, String, mpsc::Receiver<String>) {
    start_with_env(data_dir, extra, &[])
}

/// [`start_with`], with these environment variables set too.
pub(crate) fn start_with_env(
    data_dir: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Child, String, mpsc::Receiver<String>) {
    use std::os::unix::process::CommandExt as _;
    let mut command = Command::new(BINARY);
    command.envs(env.iter().copied());
    command
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .env_remove("TASKER_DATABASE_URL")
        .env_remove("TASKER_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only an async-signal-safe call between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = command.spawn().expect("tasker starts");
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let address = loop {
        let line = received
            .recv_timeout(Duration::from_secs(60))
            .expect("tasker logs its address");
        let entry: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if let Some(address) = entry["fields"]["address"].as_str() {
            break address.to_owned();
        }
    };
    (child, address, received)
}

/// Sends SIGTERM and waits for the process to end.
pub(crate) fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap()
}

#[tokio::test]
async fn serve_loads_the_examples_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, address, logs) = start(dir.path());
    let client = crate::support::http_client();
    let body: Value = client
        .post(format!("http://{address}/graphql"))
        .json(&json!({ "query": "{ templates { key } }" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut keys: Vec<&str> = body["data"]["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["key"].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "inventory/restock@1.0.0",
            "notifications/welcome_sequence@1.0.0",
            "shop/order_fulfillment@1.0.0"
        ]
    );
    let created: Value = client
        .post(format!("http://{address}/graphql"))
        .json(&json!({ "query": "mutation { createTask(input: { namespace: \"shop\", template: \"order_fulfillment\", context: { order_id: 1 } }) { task { id } } }" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        created["data"]["createTask"]["task"]["id"].is_string(),
        "{created}"
    );
    let page = client
        .get(format!("http://{address}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);

    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status}");
    // The process has exited: the reader thread ends at the log's end, so every line is seen.
    let stopped = logs.iter().any(|line| line.contains("\"stopped\""));
    assert!(stopped, "the server logs its clean stop");

    // A second start keeps the data and does not register the examples again.
    let (mut child, address, logs) = start(dir.path());
    let body: Value = client
        .post(format!("http://{address}/graphql"))
        .json(&json!({ "query": "{ tasks { totalCount } templates { key } }" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["data"]["tasks"]["totalCount"], 1);
    assert_eq!(body["data"]["templates"].as_array().unwrap().len(), 3);
    assert!(terminate(&mut child).success());
    assert!(
        !logs
            .iter()
            .any(|line| line.contains("registered example template"))
    );
}

/// Sends one operation to a server at `address`; the whole response body.
pub(crate) async fn post(
    client: &reqwest::Client,
    address: &str,
    query: &str,
    variables: Value,
) -> Value {
    client
        .post(format!("http://{address}/graphql"))
        .json(&json!({ "query": query, "variables": variables }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The `data` of an operation that must succeed.
async fn graphql(client: &reqwest::Client, address: &str, query: &str, variables: Value) -> Value {
    let body = post(client, address, query, variables).await;
    assert!(body.get("errors").is_none(), "{body:#}");
    body["data"].clone()
}

/// Registers a template (namespace and name taken from it) through the first address, then
/// starts `count` tasks of it, spread over the addresses in turn.
async fn start_diamonds(
    client: &reqwest::Client,
    addresses: &[&str],
    definition: &str,
    count: usize,
) {
    let registered = graphql(
        client,
        addresses[0],
        "mutation($d: String!) { registerTemplate(input: { definition: $d }) { template { namespace name } } }",
        json!({ "d": definition }),
    )
    .await;
    let template = &registered["registerTemplate"]["template"];
    for i in 0..count {
        graphql(
            client,
            addresses[i % addresses.len()],
            "mutation($i: CreateTaskInput!) { createTask(input: $i) { task { id } } }",
            json!({ "i": { "namespace": template["namespace"], "template": template["name"], "context": { "n": i } } }),
        )
        .await;
    }
}

const CRASH_DIAMOND: &str = r#"
namespace: crash
name: diamond
version: 1.0.0
steps:
  - { name: top, handler: noop }
  - { name: left, handler: noop, depends_on: [top], config: { fail_attempts: 1 },
      retry: { backoff: { base: 0.3, jitter: 0 } } }
  - { name: right, handler: noop, depends_on: [top] }
  - { name: bottom, handler: noop, depends_on: [left, right] }
"#;

/// Kill -9 in the middle of 200 running tasks, start again: every task completes, every
/// step is recorded complete exactly once, and every transition is there.
#[tokio::test]
async fn a_killed_server_finishes_every_task_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let lease = ["--worker-lease-seconds", "1", "--no-examples"];
    let (mut child, address, _logs) = start_with(dir.path(), &lease);
    let client = crate::support::http_client();
    start_diamonds(&client, &[&address], CRASH_DIAMOND, 200).await;
    // Mid-run: every task's `left` step waits out a backoff after its first failure.
    let status = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();

    let (mut child, address, _logs) = start_with(dir.path(), &lease);
    let count =
        "{ tasks(filter: { states: [COMPLETE] }) { totalCount } all: tasks { totalCount } }";
    let started = std::time::Instant::now();
    loop {
        let data = graphql(&client, &address, count, json!({})).await;
        assert_eq!(data["all"]["totalCount"], 200, "no task was lost");
        if data["tasks"]["totalCount"] == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "tasks stalled: {data}"
        );
        // The server is another process: watch it from outside at a modest pace.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let page = r#"query($after: String) { tasks(first: 100, after: $after) {
        pageInfo { endCursor hasNextPage }
        nodes { state transitions { toState sortKey }
                steps { id name state transitions { toState sortKey } }
                events { name stepId } } } }"#;
    let mut after = Value::Null;
    let mut tasks = Vec::new();
    loop {
        let data = graphql(&client, &address, page, json!({ "after": after })).await;
        tasks.extend(data["tasks"]["nodes"].as_array().unwrap().iter().cloned());
        if data["tasks"]["pageInfo"]["hasNextPage"] == false {
            break;
        }
        after = data["tasks"]["pageInfo"]["endCursor"].clone();
    }
    assert_eq!(tasks.len(), 200);
    let contiguous = |transitions: &Value| {
        transitions
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .all(|(i, t)| t["sortKey"] == i as u64 + 1)
    };
    for task in &tasks {
        assert_eq!(task["state"], "COMPLETE");
        assert!(contiguous(&task["transitions"]), "{task}");
        let states: Vec<&str> = task["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["toState"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["PENDING", "IN_PROGRESS", "COMPLETE"]);
        let events = task["events"].as_array().unwrap();
        assert_eq!(
            events
                .iter()
                .filter(|e| e["name"] == "task.completed")
                .count(),
            1
        );
        for step in task["steps"].as_array().unwrap() {
            assert_eq!(step["state"], "COMPLETE");
            assert!(contiguous(&step["transitions"]), "{step}");
            let completions = step["transitions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["toState"] == "COMPLETE")
                .count();
            assert_eq!(completions, 1, "{step}");
            let completed_events = events
                .iter()
                .filter(|e| e["name"] == "step.completed" && e["stepId"] == step["id"])
                .count();
            assert_eq!(completed_events, 1, "{step}");
        }
    }
    assert!(terminate(&mut child).success());
}

const SHARED_DIAMOND: &str = r#"
namespace: shared
name: diamond
version: 1.0.0
steps:
  - { name: top, handler: noop }
  - { name: left, handler: noop, depends_on: [top] }
  - { name: right, handler: noop, depends_on: [top] }
  - { name: bottom, handler: noop, depends_on: [left, right] }
"#;

/// Two `tasker serve` replicas on one PostgreSQL database run 500 tasks together: each step is
/// leased once, every task completes, and both replicas take part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_postgres_without_double_leases() {
    let Some(url) = tasker_store::testing::postgres_url() else {
        return;
    };
    let db = tasker_store::testing::TestDatabase::postgres(
        &url,
        std::sync::Arc::new(tasker_domain::SystemClock),
    )
    .await;
    let schema = db.options.schema.clone().unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    let replica_url = format!("{url}{separator}options=-csearch_path%3D{schema}");
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--database-url",
        replica_url.as_str(),
        "--no-examples",
        "--worker-lease-seconds",
        "5",
    ];
    let (mut first, a, _first_logs) = start_with(dir.path(), &args);
    let (mut second, b, _second_logs) = start_with(dir.path(), &args);
    let client = crate::support::http_client();
    start_diamonds(&client, &[&a, &b], SHARED_DIAMOND, 500).await;
    let count = "{ tasks(filter: { states: [COMPLETE] }) { totalCount } }";
    let started = std::time::Instant::now();
    while graphql(&client, &b, count, json!({})).await["tasks"]["totalCount"] != 500 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the replicas stalled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = db
        .store
        .events_for_tasks(
            &db.store
                .list_tasks(
                    &tasker_store::TaskFilter::within(tasker_domain::Within::Any),
                    None,
                    1000,
                )
                .await
                .unwrap()
                .iter()
                .map(|t| t.id)
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let mut starts: std::collections::HashMap<uuid::Uuid, Vec<String>> = Default::default();
    for event in events.iter().filter(|e| e.name == "step.started") {
        starts
            .entry(event.step_id.unwrap())
            .or_default()
            .push(event.payload["worker_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(starts.len(), 2000, "every step started");
    assert!(
        starts.values().all(|holders| holders.len() == 1),
        "a step was leased twice"
    );
    let holders: std::collections::HashSet<&String> = starts.values().flatten().collect();
    assert_eq!(holders.len(), 2, "both replicas ran steps: {holders:?}");
    assert!(terminate(&mut first).success());
    assert!(terminate(&mut second).success());
}

#[test]
fn migrate_and_schema_commands() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(BINARY)
        .args(["migrate", "--data-dir"])
        .arg(dir.path())
        .env_remove("TASKER_DATABASE_URL")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(dir.path().join("tasker.db").exists());

    let output = Command::new(BINARY).arg("schema").output().unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap(), tasker_api::sdl());
}

/// Beyond loopback without a key the server refuses to start; `tasker token` mints tokens the
/// server accepts.
#[test]
fn non_loopback_needs_a_key_and_token_mints_one() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BINARY)
        .args([
            "serve",
            "--bind",
            "0.0.0.0:0",
            "--no-examples",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("TASKER_DATABASE_URL")
        .env_remove("TASKER_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to serve 0.0.0.0:0 without authentication"),
        "{stderr}"
    );

    // Explicitly insecure, it serves, and says so before it listens.
    let mut child = Command::new(BINARY)
        .args([
            "serve",
            "--bind",
            "0.0.0.0:0",
            "--no-examples",
            "--insecure-no-auth",
        ])
        .args(["--log-format", "json", "--data-dir"])
        .arg(dir.path())
        .env_remove("TASKER_DATABASE_URL")
        .env_remove("TASKER_JWT_SECRET")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut warned = false;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref().map_while(Result::ok) {
        warned |= line.contains("authentication off beyond loopback");
        if line.contains("listening;") {
            break;
        }
    }
    // Keep reading, so the server's last log lines have somewhere to go.
    std::thread::spawn(move || lines.for_each(drop));
    let status = terminate(&mut child);
    assert!(status.success(), "{status:?}");
    assert!(warned, "the insecure mode is logged");

    let secret = "a-secret-for-the-token-command-test-0123456789";
    let output = Command::new(BINARY)
        .args([
            "token",
            "--permissions",
            "tasker.task:*,tasker.event:subscribe",
        ])
        .args([
            "--namespaces",
            "shop",
            "--ttl",
            "600",
            "--jwt-secret",
            secret,
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout).unwrap();
    let settings = tasker_api::auth::AuthSettings {
        key: tasker_api::auth::KeySource::Secret(secret.as_bytes().to_vec()),
        issuer: None,
        audience: None,
        leeway_seconds: 0,
        roles: Default::default(),
    };
    let principal = tasker_api::auth::Authenticator::new(&settings)
        .unwrap()
        .authenticate(token.trim())
        .unwrap();
    assert!(
        principal
            .permissions
            .contains(tasker_domain::Permission::TaskCancel)
    );
    assert!(
        !principal
            .permissions
            .contains(tasker_domain::Permission::WorkerClaim)
    );
    assert!(principal.namespaces.allows("shop") && !principal.namespaces.allows("billing"));
}
