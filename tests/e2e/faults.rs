//! Faults under the real binary: the data directory's files stop growing (the process's
//! file-size limit, lowered from outside as a full disk would), then grow again. Whatever the
//! server acknowledged must survive a restart, and whatever it refused must have left nothing.

use crate::binary::post;
use serde_json::{Value, json};
use std::process::Child;
use std::sync::mpsc;

const TEMPLATE: &str = "namespace: shop\nname: order\nversion: 1.0.0\nsteps:\n  - {name: a, handler: ext.a}\n  - {name: b, handler: ext.b, depends_on: [a]}\n";

/// The real server, its steps left to the test's worker.
fn start(data_dir: &std::path::Path) -> (Child, String, mpsc::Receiver<String>) {
    crate::binary::start_with(data_dir, &["--workers", "0", "--no-examples"])
}

/// Sets the soft file-size limit of a running process (`None`: unlimited).
fn limit_file_size(pid: u32, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain system call on a process of ours, with a valid struct.
    let result = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(result, 0, "prlimit: {}", std::io::Error::last_os_error());
}

const CREATE: &str = "mutation($i: CreateTaskInput!) { createTask(input: $i) { task { id } } }";
const REGISTER: &str =
    "mutation($d: String!) { registerTemplate(input: { definition: $d }) { result } }";
const CLAIM: &str = "mutation { claimSteps(input: { workerId: \"w\", limit: 20 }) { leases { leaseToken stepId } } }";
const COMPLETE: &str = "mutation($t: ID!) { completeStep(input: { leaseToken: $t, results: { ok: true } }) { step { id } } }";

/// What the server acknowledged, and what it refused.
#[derive(Default)]
struct Ledger {
    tasks: Vec<String>,
    steps: Vec<String>,
    templates: Vec<String>,
    refusals: usize,
}

impl Ledger {
    /// The acknowledged value, or a refusal that must be UNAVAILABLE and retryable.
    fn record<'a>(&mut self, body: &'a Value, field: &str) -> Option<&'a Value> {
        if body.get("errors").is_none() {
            return Some(&body["data"][field]);
        }
        let error = &body["errors"][0];
        assert_eq!(error["extensions"]["code"], "UNAVAILABLE", "{body}");
        assert_eq!(error["extensions"]["retryable"], true, "{body}");
        self.refusals += 1;
        None
    }

    /// A round of writes: a task, completions of whatever is claimable, a template.
    async fn round(&mut self, client: &reqwest::Client, address: &str, n: usize) {
        let body = post(
            client,
            address,
            CREATE,
            json!({ "i": { "namespace": "shop", "template": "order", "context": { "n": n } } }),
        )
        .await;
        if let Some(created) = self.record(&body, "createTask") {
            self.tasks
                .push(created["task"]["id"].as_str().unwrap().to_owned());
        }
        let body = post(client, address, CLAIM, json!({})).await;
        let leases = self
            .record(&body, "claimSteps")
            .map(|claimed| claimed["leases"].as_array().unwrap().clone())
            .unwrap_or_default();
        for lease in leases {
            let body = post(
                client,
                address,
                COMPLETE,
                json!({ "t": lease["leaseToken"] }),
            )
            .await;
            if let Some(done) = self.record(&body, "completeStep") {
                self.steps
                    .push(done["step"]["id"].as_str().unwrap().to_owned());
            }
        }
        let name = format!("t{n}");
        let definition = TEMPLATE.replace("name: order", &format!("name: {name}"));
        let body = post(client, address, REGISTER, json!({ "d": definition })).await;
        if self.record(&body, "registerTemplate").is_some() {
            self.templates.push(name);
        }
    }
}

/// `/health/ready`: its status and body.
async fn ready(client: &reqwest::Client, address: &str) -> (u16, Value) {
    let response = client
        .get(format!("http://{address}/health/ready"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Every event of the log, in order, by the `events` query.
async fn log_cursors(client: &reqwest::Client, address: &str) -> Vec<String> {
    let mut cursors = Vec::new();
    let mut after = Value::Null;
    loop {
        let body = post(client, address, "query($a: String) { events(first: 500, after: $a) { edges { cursor } pageInfo { hasNextPage endCursor } } }", json!({ "a": after })).await;
        let page = &body["data"]["events"];
        cursors.extend(
            page["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["cursor"].as_str().unwrap().to_owned()),
        );
        if page["pageInfo"]["hasNextPage"] != true {
            return cursors;
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
}

/// The scenario with the disk filling under a stream of writes: nothing acknowledged
/// is lost, refusals are UNAVAILABLE, readiness says why, a live subscriber sees every event
/// exactly once, and the server recovers by itself when space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_turns_into_acknowledged_writes_that_vanish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, address, logs) = start(dir.path());
    let client = crate::support::http_client();
    post(&client, &address, REGISTER, json!({ "d": TEMPLATE })).await;
    // A live subscriber from here on: it must see the rest of the log, no more, no less.
    let before = log_cursors(&client, &address).await;
    let mut socket =
        crate::websocket::connect_to(address.parse().unwrap(), "graphql-transport-ws").await;
    crate::websocket::send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(
        crate::websocket::receive(&mut socket).await["type"],
        "connection_ack"
    );
    crate::websocket::send(&mut socket, json!({ "id": "1", "type": "subscribe", "payload": { "query": "subscription($a: String) { events(after: $a) { cursor } }", "variables": { "a": before.last() } } })).await;
    let mut ledger = Ledger::default();
    for n in 0..10 {
        ledger.round(&client, &address, n).await;
    }
    assert_eq!(ledger.refusals, 0);
    // Everything in the database file, then no file may grow past the database's size:
    // commits append to the write-ahead log until it reaches that size, and a checkpoint
    // cannot add pages to the database. The disk is full; reads still work.
    let checkpoint = tasker_store::Store::connect(
        &tasker_store::StoreOptions::new(format!(
            "sqlite://{}",
            dir.path().join("tasker.db").display()
        )),
        std::sync::Arc::new(tasker_domain::SystemClock),
    )
    .await
    .unwrap();
    checkpoint
        .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
        .await
        .unwrap();
    checkpoint.close().await.unwrap();
    let database = std::fs::metadata(dir.path().join("tasker.db"))
        .unwrap()
        .len();
    limit_file_size(child.id(), Some(database));
    let mut not_ready = None;
    for n in 10..150 {
        ledger.round(&client, &address, n).await;
        if not_ready.is_none() && ledger.refusals > 0 {
            let (status, body) = ready(&client, &address).await;
            if status == 503 {
                not_ready = Some(body);
            }
        }
    }
    assert!(ledger.refusals > 0, "the fault was hit");
    let not_ready = not_ready.expect("readiness reported the fault");
    // Reads are served meanwhile.
    let body = post(&client, &address, "{ tasks { totalCount } }", json!({})).await;
    assert_eq!(
        body["data"]["tasks"]["totalCount"].as_u64(),
        Some(ledger.tasks.len() as u64),
        "{body}"
    );
    assert!(
        not_ready["reason"].is_string() && not_ready["fault"].is_string(),
        "{not_ready}"
    );

    // Space returns: the server recovers without a restart.
    limit_file_size(child.id(), None);
    let (status, body) = ready(&client, &address).await;
    assert_eq!(
        status, 200,
        "the readiness probe finds writes working: {body}"
    );
    let refusals = ledger.refusals;
    for n in 150..170 {
        ledger.round(&client, &address, n).await;
    }
    assert_eq!(
        ledger.refusals, refusals,
        "nothing is refused after the fault"
    );

    // The subscriber saw exactly the log.
    let log = log_cursors(&client, &address).await[before.len()..].to_vec();
    let mut streamed = Vec::new();
    while streamed.len() < log.len() {
        let message = crate::websocket::receive(&mut socket).await;
        assert_eq!(message["type"], "next", "{message}");
        streamed.push(
            message["payload"]["data"]["events"]["cursor"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        streamed, log,
        "every event once, in order, across the fault"
    );

    assert!(crate::binary::terminate(&mut child).success());
    // The reader thread ends at the log's end: every line is here.
    let lines: Vec<String> = logs.iter().collect();
    let began = lines
        .iter()
        .filter(|l| l.contains("writes are failing"))
        .count();
    let ended = lines
        .iter()
        .filter(|l| l.contains("writes work again"))
        .count();
    eprintln!(
        "disk full: {} tasks, {} completions and {} templates acknowledged, {} refusals (UNAVAILABLE), {began} fault episodes logged",
        ledger.tasks.len(),
        ledger.steps.len(),
        ledger.templates.len(),
        ledger.refusals
    );
    assert!(
        began >= 1 && began == ended,
        "each episode logged once, with its end: {began} / {ended}"
    );

    // After a restart: exactly what was acknowledged.
    let (mut child, address, _logs) = start(dir.path());
    let body = post(&client, &address, "{ tasks { totalCount } }", json!({})).await;
    assert_eq!(
        body["data"]["tasks"]["totalCount"].as_u64().unwrap() as usize,
        ledger.tasks.len(),
        "no refused task exists"
    );
    for id in &ledger.tasks {
        let body = post(
            &client,
            &address,
            "query($id: ID!) { task(id: $id) { id } }",
            json!({ "id": id }),
        )
        .await;
        assert!(
            body["data"]["task"].is_object(),
            "acknowledged task {id} is gone: {body}"
        );
    }
    for id in &ledger.steps {
        let body = post(
            &client,
            &address,
            "query($id: ID!) { step(id: $id) { state } }",
            json!({ "id": id }),
        )
        .await;
        assert_eq!(
            body["data"]["step"]["state"], "COMPLETE",
            "acknowledged completion of {id}: {body}"
        );
    }
    let body = post(
        &client,
        &address,
        "{ templates(namespace: \"shop\") { name } }",
        json!({}),
    )
    .await;
    let names: Vec<&str> = body["data"]["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for name in &ledger.templates {
        assert!(
            names.contains(&name.as_str()),
            "acknowledged template {name}"
        );
    }
    assert_eq!(
        names.len(),
        ledger.templates.len() + 1,
        "no refused template exists"
    );
    assert_eq!(
        log_cursors(&client, &address).await[before.len()..],
        log,
        "the log survived as it was served"
    );
    crate::binary::terminate(&mut child);
}
