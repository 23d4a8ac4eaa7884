//! The worker SDKs against a real server with authentication on: the Rust `Worker` runs a
//! diamond whose middle steps use external handlers (one retried after its Retry-After),
//! keeps a long attempt alive with heartbeats and releases what it holds when it stops; the
//! Python example does the same diamond.

use crate::auth::token;
use crate::support::TestServer;
use futures::StreamExt as _;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tasker_client::{Client, Lease, NewTask, StepError, StepState, Task, TaskState, Worker};
use tasker_store::testing::TestDatabase;

const RUST_DIAMOND: &str = include_str!("../../examples/workers/rust_diamond.yaml");
const PYTHON_DIAMOND: &str = include_str!("../../examples/workers/python_diamond.yaml");

async fn echo(lease: Lease) -> Result<Value, StepError> {
    Ok(json!({ "parents": lease.parent_results, "order": lease.context["order_id"] }))
}

async fn flaky(lease: Lease) -> Result<Value, StepError> {
    if lease.attempt < 2 {
        return Err(StepError::retry_after(
            "flaky by design",
            Duration::from_millis(300),
        ));
    }
    Ok(json!({ "succeeded_on_attempt": lease.attempt }))
}

/// A client of `server` allowed everything.
fn client(server: &TestServer) -> Client {
    Client::new(&server.url(""))
        .unwrap()
        .with_token(token(&["*"], &["*"]))
}

/// Starts a task of `namespace/template` and follows it until it ends.
async fn run_to_end(client: &Client, namespace: &str, template: &str) -> Task {
    let created = client
        .create_task(&NewTask {
            context: Some(json!({ "order_id": 7 })),
            priority: Some(3),
            ..NewTask::new(namespace, template)
        })
        .await
        .unwrap();
    assert_eq!(created.task.priority, Some(3), "the caller's priority");
    let mut updates = client.follow_task(&created.task.id, None);
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(update) = updates.next().await {
            let update = update.unwrap();
            if update.last {
                return update.task;
            }
        }
        panic!("the stream ended before the task did");
    })
    .await
    .expect("the task ends");
    client.task(&ended.id).await.unwrap()
}

/// The diamond's outcome, the same whichever worker ran it: `charge` failed once and was
/// retried after the worker's Retry-After (`retry_after_ms`), not the template's backoff.
async fn assert_diamond_ran(client: &Client, task: &Task, retry_after_ms: u64, backend: &str) {
    assert_eq!(task.state, TaskState::Complete, "{backend}: {task:#?}");
    let step = |name: &str| task.steps.iter().find(|step| step.name == name).unwrap();
    assert_eq!(step("reserve").attempts, 1);
    assert_eq!(step("charge").attempts, 2, "{backend}: retried once");
    assert!(
        task.steps
            .iter()
            .all(|step| step.state == StepState::Complete)
    );
    let events = client
        .events(
            &tasker_client::EventFilter {
                task_id: Some(task.id.clone()),
                ..Default::default()
            },
            500,
            None,
        )
        .await
        .unwrap()
        .events;
    let backoff = events.iter().find(|e| e.name == "step.backoff").unwrap();
    assert_eq!(backoff.payload["step"], "charge");
    assert_eq!(backoff.payload["delay_ms"], retry_after_ms, "{backend}");
    assert!(
        events
            .iter()
            .all(|e| e.name != "step.lease_expired" && e.name != "step.released")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_worker_runs_a_diamond_of_external_steps_with_one_retry() {
    for db in TestDatabase::all(Arc::new(tasker_domain::SystemClock)).await {
        let backend = db.backend();
        let server = crate::cli::secured_running(db).await;
        let client = client(&server);
        client.register_template(RUST_DIAMOND, false).await.unwrap();
        let worker = Worker::builder(client.clone(), "rust-sdk-test")
            .handler("rust.echo", echo)
            .handler("rust.flaky", flaky)
            .poll_wait(Duration::from_secs(5))
            .build()
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(worker.run(async move {
            let _ = stopped.await;
        }));
        let task = run_to_end(&client, "workers", "rust_diamond").await;
        assert_diamond_ran(&client, &task, 300, backend).await;
        stop.send(()).unwrap();
        let report = running.await.unwrap().unwrap();
        assert_eq!(
            (
                report.completed,
                report.failed,
                report.released,
                report.lost
            ),
            (2, 1, 0, 0),
            "{backend}"
        );
    }
}

const LONG_AND_STUCK: &str = "namespace: workers\nname: long_and_stuck\nversion: 1.0.0\nsteps:\n  - {name: long, handler: sdk.long}\n  - {name: stuck, handler: sdk.stuck}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_long_attempt_and_a_stop_releases_what_is_left() {
    let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
    let server = crate::cli::secured_running(db).await;
    let client = client(&server);
    client
        .register_template(LONG_AND_STUCK, false)
        .await
        .unwrap();
    let (long_done, mut long_finished) = tokio::sync::watch::channel(false);
    let long_done = Arc::new(long_done);
    let worker = Worker::builder(client.clone(), "rust-sdk-stop")
        // Runs past its 3 s lease: only the heartbeats (every second) keep it.
        .handler("sdk.long", move |_lease: Lease| {
            let long_done = long_done.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(4500)).await;
                let _ = long_done.send(true);
                Ok(json!({ "slept_ms": 4500 }))
            }
        })
        // Never finishes: the stop must give it back.
        .handler("sdk.stuck", |_lease: Lease| std::future::pending())
        .lease(Duration::from_secs(3))
        .poll_wait(Duration::from_secs(2))
        .grace(Duration::from_millis(300))
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    let created = client
        .create_task(&NewTask::new("workers", "long_and_stuck"))
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        long_finished.wait_for(|done| *done),
    )
    .await
    .unwrap()
    .unwrap();
    // The long step's completion is recorded by the worker shortly after its handler ends.
    let mut updates = client.follow_task(&created.task.id, None);
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = updates.next().await {
            let task = update.unwrap().task;
            if task.step_counts.unwrap().complete == 1 {
                return;
            }
        }
    })
    .await
    .unwrap();
    drop(updates);
    stop.send(()).unwrap();
    let report = running.await.unwrap().unwrap();
    assert_eq!(
        (
            report.completed,
            report.failed,
            report.released,
            report.lost
        ),
        (1, 0, 1, 0)
    );
    let task = client.task(&created.task.id).await.unwrap();
    let step = |name: &str| task.steps.iter().find(|step| step.name == name).unwrap();
    assert_eq!(step("long").state, StepState::Complete);
    assert_eq!(step("long").attempts, 1, "the lease never ran out");
    assert_eq!(
        step("stuck").state,
        StepState::Pending,
        "released, ready again"
    );
    assert_eq!(
        step("stuck").attempts,
        0,
        "the released attempt does not count"
    );
    let names: Vec<String> = client
        .events(
            &tasker_client::EventFilter {
                task_id: Some(task.id.clone()),
                ..Default::default()
            },
            500,
            None,
        )
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|event| event.name)
        .collect();
    assert!(names.contains(&"step.released".to_owned()), "{names:?}");
    assert!(
        !names.contains(&"step.lease_expired".to_owned()),
        "{names:?}"
    );
}

/// A virtual environment under `target/` with the Python example's requirements, made once
/// (again when `requirements.txt` changes); `None` (with a note) where there is no Python
/// 3.10+ and none is required (`TASKER_TEST_REQUIRE_PYTHON` makes it a failure).
fn python_venv() -> Option<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let requirements = root.join("examples/python-worker/requirements.txt");
    let python = std::env::var("TASKER_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let usable = std::process::Command::new(&python)
        .args([
            "-c",
            "import sys, venv; sys.exit(sys.version_info < (3, 10))",
        ])
        .status()
        .is_ok_and(|status| status.success());
    if !usable {
        assert!(
            std::env::var("TASKER_TEST_REQUIRE_PYTHON").is_err(),
            "TASKER_TEST_REQUIRE_PYTHON is set but {python} (3.10+ with venv) is missing"
        );
        eprintln!("skipped: no {python} 3.10+ with venv (apt-get install python3-venv)");
        return None;
    }
    let venv = root.join("target/python-worker-venv");
    let stamp = venv.join("requirements.installed");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let made = std::process::Command::new(&python)
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "{python} -m venv failed");
        let installed = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements)
            .status()
            .unwrap();
        assert!(
            installed.success(),
            "pip install -r {requirements:?} failed"
        );
        std::fs::write(&stamp, wanted).unwrap();
    }
    Some(venv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_runs_the_same_diamond_and_stops_on_sigterm() {
    let Some(venv) = tokio::task::spawn_blocking(python_venv).await.unwrap() else {
        return;
    };
    let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
    let server = crate::cli::secured_running(db).await;
    let client = client(&server);
    client
        .register_template(PYTHON_DIAMOND, false)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token(&["tasker.worker:claim"], &["workers"])).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python-worker/worker.py");
    let mut worker = tokio::process::Command::new(venv.join("bin/python"))
        .arg(script)
        .args([
            "--server",
            &server.url(""),
            "--worker-id",
            "py-e2e",
            "--token-file",
        ])
        .arg(&token_file)
        .env_remove("TASKER_TOKEN")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(worker.stderr.take().unwrap()));
    let mut lines = Vec::new();
    // Its signal handlers are in place once it says it started.
    while !lines
        .iter()
        .any(|line: &String| line.contains(" started worker=py-e2e"))
    {
        let line = tokio::time::timeout(Duration::from_secs(30), log.next_line())
            .await
            .expect("the worker starts")
            .unwrap()
            .expect("the worker is running");
        lines.push(line);
    }
    let task = run_to_end(&client, "workers", "python_diamond").await;
    assert_diamond_ran(&client, &task, 200, "sqlite").await;

    let pid = i32::try_from(worker.id().unwrap()).unwrap();
    // SAFETY: sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker stops on SIGTERM")
        .unwrap();
    while let Some(line) = log.next_line().await.unwrap() {
        lines.push(line);
    }
    let log = lines.join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    for expected in [
        "completed step=reserve",
        "failed step=charge",
        "attempt=1 retryable=true",
        "stopped worker=py-e2e",
    ] {
        assert!(log.contains(expected), "{expected:?} in:\n{log}");
    }
    assert!(
        log.lines()
            .any(|line| line.contains("completed step=charge") && line.contains("attempt=2")),
        "{log}"
    );
}

/// The client starts a batch in one call; an input outside the token's namespaces refuses
/// the call, named by its index like a template that does not exist.
#[tokio::test]
async fn the_client_starts_a_batch_and_a_refused_input_names_its_index() {
    let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
    let server = crate::cli::secured_running(db).await;
    let client = client(&server);
    client.register_template(RUST_DIAMOND, false).await.unwrap();
    let batch: Vec<NewTask> = (0..3)
        .map(|i| NewTask {
            context: Some(json!({ "order_id": i })),
            ..NewTask::new("workers", "rust_diamond")
        })
        .collect();
    let created = client.create_tasks(&batch).await.unwrap();
    assert_eq!(created.len(), 3);
    assert!(
        created
            .iter()
            .all(|c| c.created && c.task.state == TaskState::Pending)
    );

    let elsewhere = Client::new(&server.url(""))
        .unwrap()
        .with_token(token(&["*"], &["billing"]));
    let mut mixed = batch.clone();
    mixed.insert(0, NewTask::new("billing", "rust_diamond"));
    match elsewhere.create_tasks(&mixed).await {
        Err(tasker_client::Error::Graphql { code, problems, .. }) => {
            assert_eq!(code, "VALIDATION_FAILED");
            let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
            assert_eq!(
                paths,
                [
                    "inputs[1].template",
                    "inputs[2].template",
                    "inputs[3].template"
                ]
            );
            assert!(
                problems[0].message.contains("was not found"),
                "{problems:?}"
            );
        }
        other => panic!("expected the batch refused, got {other:?}"),
    }
}
