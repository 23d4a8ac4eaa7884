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
    let mut child = Command::new(BINARY)
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(data_dir)
        .env_remove("TASKER_DATABASE_URL")
        .env_remove("TASKER_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tasker starts");
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

fn terminate(child: &mut Child) -> std::process::ExitStatus {
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
    let client = reqwest::Client::new();
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
    let stopped = logs.try_iter().any(|line| line.contains("\"stopped\""));
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
            .try_iter()
            .any(|line| line.contains("registered example template"))
    );
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
