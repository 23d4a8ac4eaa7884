//! The command line as a CI job runs it: the real `tasker` binary against a real server with
//! authentication on — `apply` twice, `validate` offline, `run --wait` to each exit code, the
//! read and change commands, `events --follow`, resuming after a dropped connection, and bad
//! input answered with one line and the documented code.

use crate::auth::{SECRET, expired_token, token};
use crate::support::{Proxy, TestServer};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tasker::config::Settings;
use tasker_api::auth::{AuthSettings, KeySource};
use tasker_store::testing::TestDatabase;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_tasker");

/// What a command printed, and how it ended.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

/// The binary with no settings from the environment, as a CI job starts it.
fn tasker(server: &str, args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .env_remove("TASKER_TOKEN")
        .env_remove("TASKER_TOKEN_FILE")
        .env_remove("TASKER_LOG")
        .env("TASKER_SERVER", server)
        // A panic would print its backtrace: the tests check that none ever does.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn run(mut command: Command) -> Ran {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the command ends")
        .unwrap();
    let ran = Ran {
        code: output.status.code().expect("an exit code, not a signal"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    };
    assert!(
        !ran.stderr.contains("panicked") && !ran.stderr.contains("backtrace"),
        "{ran:#?}"
    );
    ran
}

/// A server with authentication on whose embedded pool runs built-in steps.
pub(crate) async fn secured_running(db: TestDatabase) -> TestServer {
    let settings = Settings {
        auth: Some(AuthSettings {
            key: KeySource::Secret(SECRET.as_bytes().to_vec()),
            issuer: Some(crate::auth::ISSUER.into()),
            audience: Some(crate::auth::AUDIENCE.into()),
            leeway_seconds: 5,
            roles: Default::default(),
        }),
        workers: tasker_engine::WorkerPoolConfig::default().concurrency,
        ..TestServer::settings()
    };
    TestServer::start_with(db, settings).await
}

const CHAIN: &str = "namespace: ci\nname: chain\nversion: 1.0.0\nsteps:\n  - {name: build, handler: noop}\n  - {name: test, handler: noop, depends_on: [build]}\n";
const FAILING: &str = "namespace: ci\nname: failing\nversion: 1.0.0\nsteps:\n  - {name: build, handler: noop}\n  - {name: deploy, handler: noop, depends_on: [build], config: {fail_attempts: 9}, retry: {max_attempts: 1}}\n";
/// In JSON, which `apply` reads as well as YAML.
const SLOW: &str = r#"{
  "namespace": "ci", "name": "slow", "version": "1.0.0",
  "context_schema": { "type": "object", "required": ["env"], "properties": { "env": { "type": "string" } } },
  "steps": [ { "name": "wait", "handler": "sleep", "config": { "seconds": 3600 } } ]
}"#;
const CYCLIC: &str = "namespace: ci\nname: cyclic\nversion: 1.0.0\nsteps:\n  - {name: a, handler: noop, depends_on: [b]}\n  - {name: b, handler: noop, depends_on: [a]}\n";

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_job_applies_templates_runs_tasks_and_reads_the_outcome_from_the_exit_code() {
    for db in TestDatabase::all(Arc::new(tasker_domain::SystemClock)).await {
        let backend = db.backend();
        let server = secured_running(db).await;
        let url = server.url("");
        let dir = tempfile::tempdir().unwrap();
        let templates = dir.path().join("templates");
        std::fs::create_dir(&templates).unwrap();
        write(&templates, "chain.yaml", CHAIN);
        write(&templates, "failing.yaml", FAILING);
        write(&templates, "slow.json", SLOW);
        let token_file = dir.path().join("token");
        std::fs::write(
            &token_file,
            token(&["*"], &["*"]) + "\n", // as `tasker token > file` writes it
        )
        .unwrap();
        let token_file = token_file.to_str().unwrap();
        let templates = templates.to_str().unwrap();

        // apply, twice: the second run changes nothing.
        let first = run(tasker(
            &url,
            &["apply", "-f", templates, "--token-file", token_file],
        ))
        .await;
        assert_eq!(first.code, 0, "{backend}: {first:#?}");
        let expected = |result: &str| {
            [
                "chain.yaml ci/chain",
                "failing.yaml ci/failing",
                "slow.json ci/slow",
            ]
            .map(|pair| {
                let (file, key) = pair.split_once(' ').unwrap();
                format!("{result:<10} {key}@1.0.0  {templates}/{file}")
            })
            .to_vec()
        };
        assert_eq!(first.lines(), expected("CREATED"), "{backend}");
        let second = run(tasker(
            &url,
            &["apply", "-f", templates, "--token-file", token_file],
        ))
        .await;
        assert_eq!(
            (second.code, second.lines()),
            (
                0,
                expected("UNCHANGED").iter().map(String::as_str).collect()
            ),
            "{backend}"
        );
        // A changed definition under the same version: refused without --replace, per file.
        let changed = dir.path().join("changed");
        std::fs::create_dir(&changed).unwrap();
        write(
            &changed,
            "chain.yaml",
            &CHAIN.replace("name: test", "name: lint"),
        );
        let changed = changed.to_str().unwrap();
        let conflict = run(tasker(
            &url,
            &["apply", "-f", changed, "--token-file", token_file],
        ))
        .await;
        assert_eq!(conflict.code, 1, "{backend}: {conflict:#?}");
        assert_eq!(
            conflict.lines(),
            [format!("FAILED     {changed}/chain.yaml")]
        );
        assert!(conflict.stderr.contains("CONFLICT"), "{conflict:#?}");
        let replaced = run(tasker(
            &url,
            &[
                "apply",
                "-f",
                changed,
                "--replace",
                "--token-file",
                token_file,
            ],
        ))
        .await;
        assert_eq!(replaced.code, 0, "{backend}: {replaced:#?}");
        assert_eq!(
            replaced.lines(),
            [format!("REPLACED   ci/chain@1.0.0  {changed}/chain.yaml")]
        );
        run(tasker(
            &url,
            &[
                "apply",
                "-f",
                templates,
                "--replace",
                "--token-file",
                token_file,
            ],
        ))
        .await;

        // Without --wait, run prints the task's id; the same idempotency key, the same task.
        let keyed = |key: &str| {
            let mut command = tasker(&url, &["run", "ci/chain", "--idempotency-key", key]);
            command.env("TASKER_TOKEN", token(&["*"], &["*"]));
            command
        };
        let first_run = run(keyed("build-42")).await;
        assert_eq!(first_run.code, 0, "{first_run:#?}");
        assert_eq!(run(keyed("build-42")).await.stdout, first_run.stdout);
        assert_ne!(run(keyed("build-43")).await.stdout, first_run.stdout);

        // run --wait: exit 0 when the task completes, 1 when it fails, 3 past --timeout.
        let bearer = token(&["*"], &["*"]);
        let waited = |template: &str, extra: &[&str]| {
            let mut command = tasker(&url, &["run", template, "--wait"]);
            command.args(extra).env("TASKER_TOKEN", &bearer);
            command
        };
        let completed = run(waited("ci/chain", &["--timeout", "30s"])).await;
        assert_eq!(completed.code, 0, "{backend}: {completed:#?}");
        let last = completed.lines().last().unwrap().to_owned();
        assert!(
            last.starts_with("task ") && last.contains("  COMPLETE  2 steps done of 2"),
            "{last}"
        );
        assert!(
            completed.stdout.contains("step.completed             test"),
            "{completed:#?}"
        );
        let failed = run(waited("ci/failing", &["--timeout", "30s"])).await;
        assert_eq!(failed.code, 1, "{backend}: {failed:#?}");
        assert!(
            failed
                .lines()
                .last()
                .unwrap()
                .contains("  ERROR  1 steps done of 2"),
            "{failed:#?}"
        );
        assert!(
            failed.stdout.contains("fails on purpose"),
            "the failure's reason is shown"
        );
        let timed_out = run(waited(
            "ci/slow",
            &["--context", r#"{"env": "prod"}"#, "--timeout", "1s"],
        ))
        .await;
        assert_eq!(timed_out.code, 3, "{backend}: {timed_out:#?}");
        assert!(
            timed_out.stderr.contains("had not ended after"),
            "{timed_out:#?}"
        );
        assert_eq!(timed_out.stderr.lines().count(), 1, "{timed_out:#?}");

        // On a terminal (util-linux `script` gives it one): a progress bar, no event lines.
        let mut on_terminal = Command::new("script");
        on_terminal
            .args(["--quiet", "--return", "--command"])
            .arg(format!("{BINARY} run ci/chain --wait"))
            .arg("/dev/null")
            .env("TASKER_SERVER", &url)
            .env("TASKER_TOKEN", &bearer)
            .stdin(Stdio::null());
        let drawn = run(on_terminal).await;
        assert_eq!(drawn.code, 0, "{drawn:#?}");
        assert!(drawn.stdout.contains("2/2 steps"), "a bar: {drawn:#?}");
        assert!(!drawn.stdout.contains("step.started"), "{drawn:#?}");
        assert!(
            drawn.stdout.contains("  COMPLETE  2 steps done of 2"),
            "{drawn:#?}"
        );

        // --output json: one object per line, the last one the result.
        let json = run(waited("ci/chain", &["--output", "json"])).await;
        assert_eq!(json.code, 0);
        let lines = json.json_lines();
        assert_eq!(lines[0]["type"], "created");
        assert!(
            lines
                .iter()
                .any(|line| line["type"] == "event" && line["event"]["name"] == "task.completed")
        );
        let result = lines.last().unwrap();
        assert_eq!(
            (result["type"].as_str(), result["exitCode"].as_u64()),
            (Some("result"), Some(0))
        );
        assert_eq!(result["task"]["state"], "COMPLETE");

        // Reading and changing tasks.
        let with_token = |args: &[&str]| {
            let mut command = tasker(&url, args);
            command.env("TASKER_TOKEN", &bearer);
            command
        };
        let listed = run(with_token(&[
            "tasks",
            "--namespace",
            "ci",
            "--output",
            "json",
        ]))
        .await;
        let tasks = listed.json_lines();
        assert_eq!(tasks.len(), 7, "{backend}: {listed:#?}");
        let slow_id = tasks
            .iter()
            .find(|task| task["templateName"] == "slow")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let failed_id = tasks.iter().find(|task| task["state"] == "ERROR").unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let table = run(with_token(&["tasks", "--state", "error"])).await;
        assert_eq!(table.lines().len(), 2, "a header and one task: {table:#?}");
        assert!(table.lines()[1].starts_with(&format!("{failed_id}  ERROR")));
        let shown = run(with_token(&["task", &failed_id])).await;
        assert_eq!(shown.code, 0);
        assert!(shown.stdout.contains("\n  build "), "{shown:#?}");
        assert!(shown.stdout.contains("\n  └─ deploy "), "{shown:#?}");
        assert!(
            shown
                .stdout
                .contains("error: noop: attempt 1 fails on purpose"),
            "{shown:#?}"
        );
        let cancelled = run(with_token(&["cancel", &slow_id, "--reason", "not needed"])).await;
        assert_eq!(
            (cancelled.code, cancelled.stdout.trim()),
            (0, format!("{slow_id}  CANCELLED").as_str())
        );
        let again = run(with_token(&["cancel", &slow_id])).await;
        assert_eq!(again.code, 1, "a refused change: {again:#?}");
        assert!(again.stderr.starts_with("error: CONFLICT: "), "{again:#?}");
        let retried = run(with_token(&["retry", &failed_id])).await;
        assert_eq!(retried.code, 0, "{retried:#?}");
        let events = run(with_token(&[
            "events", "--task", &slow_id, "--output", "json",
        ]))
        .await;
        let names: Vec<String> = events
            .json_lines()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names.first().map(String::as_str), Some("task.created"));
        assert!(names.contains(&"task.cancelled".to_owned()), "{names:?}");
        assert!(!names.contains(&"task.completed".to_owned()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_one_line_naming_the_cause_and_the_documented_exit_code() {
    let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
    let server = secured_running(db).await;
    let url = server.url("");
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    write(dir.path(), "cyclic.yaml", CYCLIC);
    write(dir.path(), "chain.yaml", CHAIN);
    write(dir.path(), "context.json", "{\"env\": ");
    let bearer = token(&["*"], &["*"]);
    let authed = |args: &[&str]| {
        let mut command = tasker(&url, args);
        command.env("TASKER_TOKEN", &bearer);
        command
    };
    let one_line = |ran: &Ran, code: i32, needle: &str| {
        assert_eq!(ran.code, code, "{ran:#?}");
        assert_eq!(ran.stderr.lines().count(), 1, "{ran:#?}");
        assert!(
            ran.stderr.starts_with("error: ") && ran.stderr.contains(needle),
            "{needle}: {ran:#?}"
        );
    };

    // Every template the repository ships is valid.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let shipped = run(tasker("http://127.0.0.1:1", &["validate", "-f", examples])).await;
    assert_eq!(shipped.code, 0, "{shipped:#?}");
    assert!(
        shipped.stdout.contains("workers/python_diamond@1.0.0"),
        "{shipped:#?}"
    );

    // validate needs no server: the cycle is named, exit 1.
    let offline = run(tasker(
        "http://127.0.0.1:1",
        &[
            "validate",
            "-f",
            &path("cyclic.yaml"),
            "-f",
            &path("chain.yaml"),
        ],
    ))
    .await;
    assert_eq!(offline.code, 1, "{offline:#?}");
    assert_eq!(
        offline.lines()[0],
        format!("FAILED     {}", path("cyclic.yaml"))
    );
    assert_eq!(
        offline.lines()[1],
        format!("VALID      ci/chain@1.0.0  {}", path("chain.yaml"))
    );
    assert!(
        offline.stderr.contains("cycle")
            && offline.stderr.contains("a")
            && offline.stderr.contains("b"),
        "{offline:#?}"
    );
    // apply checks first and registers nothing when a file has a problem.
    let refused = run(authed(&["apply", "-f", dir.path().to_str().unwrap()])).await;
    assert_eq!(refused.code, 1, "{refused:#?}");
    assert!(
        refused.stderr.contains("nothing was applied"),
        "{refused:#?}"
    );
    let listed = authed_query(&server, &bearer, "{ templates(namespace: \"ci\") { key } }").await;
    assert_eq!(listed["templates"], json!([]), "nothing registered");

    // No token, an expired one, a missing token file.
    let anonymous = run(tasker(&url, &["tasks"])).await;
    one_line(&anonymous, 2, "UNAUTHENTICATED");
    let mut expired = tasker(&url, &["tasks"]);
    expired.env("TASKER_TOKEN", expired_token());
    one_line(&run(expired).await, 2, "expired");
    // The same over the WebSocket: refused at once, not retried.
    let head = authed_query(&server, &bearer, "{ eventHead }").await["eventHead"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut following = tasker(&url, &["events", "--follow", "--after", &head]);
    following.env("TASKER_TOKEN", expired_token());
    one_line(&run(following).await, 2, "the token has expired");
    one_line(
        &run(tasker(&url, &["tasks", "--token-file", &path("missing")])).await,
        2,
        "cannot read the token file",
    );

    // An unknown template, a malformed context file, a malformed template reference.
    one_line(
        &run(authed(&["run", "ci/nope", "--wait"])).await,
        2,
        "NOT_FOUND",
    );
    run(authed(&["apply", "-f", &path("chain.yaml")])).await;
    one_line(
        &run(authed(&[
            "run",
            "ci/chain",
            "--context",
            &format!("@{}", path("context.json")),
        ]))
        .await,
        2,
        "is not valid JSON",
    );
    one_line(
        &run(authed(&["run", "ci/chain", "--context", "@/no/such/file"])).await,
        2,
        "cannot read the context file",
    );
    one_line(
        &run(authed(&["run", "chain"])).await,
        2,
        "is not NAMESPACE/NAME",
    );
    // Usage errors are clap's: exit 2.
    assert_eq!(run(authed(&["run"])).await.code, 2);
    assert_eq!(
        run(authed(&["run", "ci/chain", "--timeout", "soon", "--wait"]))
            .await
            .code,
        2
    );

    // A refused connection and an unknown host: exit 4.
    one_line(
        &run(tasker("http://127.0.0.1:1", &["tasks"])).await,
        4,
        "Connection refused",
    );
    one_line(
        &run(tasker("http://no-such-host.invalid", &["tasks"])).await,
        4,
        "cannot reach the server at http://no-such-host.invalid:80",
    );
    one_line(
        &run(tasker("ftp://example.com", &["tasks"])).await,
        2,
        "invalid server address",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_wait_resumes_after_a_dropped_connection_without_a_gap_or_a_duplicate() {
    let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
    let server = TestServer::start(db).await;
    server.register(crate::dashboard::WORK).await;
    let proxy = Proxy::start(server.address, false).await;
    let mut child = tasker(
        &proxy.url(""),
        &["run", "ui/diamond", "--wait", "--output", "json"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut output = JsonLines(BufReader::new(child.stdout.take().unwrap()).lines());
    let created = output.next().await;
    assert_eq!(created["type"], "created");
    let task_id = created["task"]["id"].clone();
    let mut printed: Vec<Value> = Vec::new();
    assert_eq!(crate::dashboard::run_steps(&server, 1).await, 1);
    output.until(&mut printed, "step.completed", "fetch").await;

    // The connection drops while the middle steps run; the command comes back by itself.
    proxy.cut();
    assert_eq!(crate::dashboard::run_steps(&server, 2).await, 2);
    proxy.restore();
    output.until(&mut printed, "step.completed", "right").await;
    assert_eq!(crate::dashboard::run_steps(&server, 1).await, 1);
    output.until(&mut printed, "task.finalized", "").await;
    let result = output.next().await;
    assert_eq!(result["type"], "result");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert!(
        stderr.contains("resuming"),
        "the drop was noticed: {stderr}"
    );
    // Every event of the task printed once, in log order (creation included).
    let cursors: Vec<String> = printed
        .iter()
        .filter(|line| line["type"] == "event")
        .map(|line| line["event"]["cursor"].as_str().unwrap().to_owned())
        .collect();
    let shown: Vec<String> = server.event_cursors(&task_id).await.into_iter().collect();
    let without_creation_notices: Vec<String> = shown
        .iter()
        .zip(server_event_names(&server, &task_id).await)
        .filter(|(_, name)| name != "step.created" && name != "task.steps_ready")
        .map(|(cursor, _)| cursor.clone())
        .collect();
    assert_eq!(cursors, without_creation_notices);
}

/// The `data` of a query sent with a bearer token.
async fn authed_query(server: &TestServer, bearer: &str, query: &str) -> Value {
    let body: Value = server
        .http()
        .post(server.url("/graphql"))
        .bearer_auth(bearer)
        .json(&json!({ "query": query }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["data"].clone()
}

/// A command's stdout, one JSON object per line.
struct JsonLines(tokio::io::Lines<BufReader<tokio::process::ChildStdout>>);

impl JsonLines {
    async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(30), self.0.next_line())
            .await
            .expect("the command keeps printing")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap()
    }

    /// Reads lines into `printed` up to the event `name` about `step` (`""`: about none).
    async fn until(&mut self, printed: &mut Vec<Value>, name: &str, step: &str) {
        loop {
            let line = self.next().await;
            let event = &line["event"];
            let done =
                event["name"] == name && event["payload"]["step"].as_str().unwrap_or("") == step;
            printed.push(line);
            if done {
                return;
            }
        }
    }
}

/// The names of a task's events, in log order.
async fn server_event_names(server: &TestServer, task_id: &Value) -> Vec<String> {
    let page = server
        .data(
            "query($f: EventFilterInput) { events(filter: $f, first: 500) { nodes { name } } }",
            json!({ "f": { "taskId": task_id } }),
        )
        .await;
    page["events"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_prints_the_log_as_it_grows_from_a_cursor() {
    let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
    let server = TestServer::start_running(db).await;
    server.register(crate::support::DIAMOND).await;
    let head = server.data("{ eventHead }", json!({})).await["eventHead"].clone();
    let first = server
        .create_task(
            json!({ "namespace": "shop", "template": "fulfil", "context": { "order_id": 1 } }),
        )
        .await;
    let mut child = tasker(
        &server.url(""),
        &[
            "events",
            "--follow",
            "--after",
            head.as_str().unwrap(),
            "--name",
            "task.completed",
            "--output",
            "json",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = JsonLines(BufReader::new(child.stdout.take().unwrap()).lines());
    let mut completed = Vec::new();
    // The first task finished before or after the command started: it is printed either way;
    // the second one only while it follows.
    let second = server
        .create_task(
            json!({ "namespace": "shop", "template": "fulfil", "context": { "order_id": 2 } }),
        )
        .await;
    while completed.len() < 2 {
        let event = lines.next().await;
        assert_eq!(event["name"], "task.completed");
        completed.push(event["taskId"].clone());
    }
    assert_eq!(
        completed,
        [first["task"]["id"].clone(), second["task"]["id"].clone()]
    );
    child.kill().await.unwrap();
}
