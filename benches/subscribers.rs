//! Live-event delivery under load: the real `tasker serve` binary, many `events` subscribers
//! over WebSocket (`graphql-transport-ws`), and a producer creating tasks over HTTP.
//!
//! Prints, per round: events produced, whether every subscriber received every event exactly
//! once and in order, the server's CPU and resident memory, and delivery latency two ways,
//! which bracket commit → delivery:
//! - from the event's `occurredAt`, taken as the writing request starts (before its
//!   transaction): an upper bound, since it includes the write itself;
//! - from the moment the producer received the createTask answer, which comes after the
//!   commit (an event delivered before that counts as 0): a lower bound.
//!
//! The createTask round trip is printed too. Some subscribers can be made slow: they read
//! nothing until production ends, then must catch up from the log.
//!
//! ```sh
//! cargo bench --bench subscribers                      # SQLite
//! cargo bench --bench subscribers -- --postgres-url postgres://postgres@127.0.0.1:5432/test
//! cargo bench --bench subscribers -- --subscribers 100 --tasks 1000 --rounds 2 --slow 2 --rate 1000
//! ```

// A test crate: a failed assumption is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Steps per task: each task writes task.created, a step.created per step and one
/// task.steps_ready, so 8 steps make 10 events.
const STEPS_PER_TASK: usize = 8;
const EVENTS_PER_TASK: usize = STEPS_PER_TASK + 2;
/// Create-task requests in flight at once.
const PRODUCERS: usize = 4;

struct Options {
    subscribers: usize,
    slow: usize,
    tasks: usize,
    rounds: usize,
    /// Events written per second; as fast as the server takes them when absent.
    rate: Option<usize>,
    postgres_url: Option<String>,
}

impl Options {
    fn parse() -> Options {
        let mut options = Options {
            subscribers: 100,
            slow: 2,
            tasks: 1000,
            rounds: 2,
            rate: None,
            postgres_url: std::env::var("TASKER_BENCH_POSTGRES_URL").ok(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut number = |name: &str| -> usize {
                args.next()
                    .and_then(|value| value.parse().ok())
                    .unwrap_or_else(|| panic!("{name} takes a number"))
            };
            match arg.as_str() {
                "--subscribers" => options.subscribers = number("--subscribers"),
                "--slow" => options.slow = number("--slow"),
                "--tasks" => options.tasks = number("--tasks"),
                "--rounds" => options.rounds = number("--rounds"),
                "--rate" => options.rate = Some(number("--rate")),
                "--postgres-url" => options.postgres_url = args.next(),
                // `cargo bench` passes --bench to every bench program.
                "--bench" => {}
                other => panic!("unknown argument {other}"),
            }
        }
        options
    }
}

fn main() {
    let options = Options::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        run("sqlite", None, &options).await;
        if let Some(url) = &options.postgres_url {
            let schema = format!("tasker_bench_{}", uuid::Uuid::new_v4().simple());
            psql(url, &format!("CREATE SCHEMA {schema}"));
            let separator = if url.contains('?') { '&' } else { '?' };
            let scoped = format!("{url}{separator}options=-csearch_path%3D{schema}");
            run("postgres", Some(&scoped), &options).await;
            psql(url, &format!("DROP SCHEMA {schema} CASCADE"));
        }
    });
}

/// Runs one statement with the `psql` client (the benchmark needs no database driver).
fn psql(url: &str, statement: &str) {
    let status = Command::new("psql")
        .args([url, "-qc", statement])
        .env("PGOPTIONS", "--client-min-messages=warning")
        .status()
        .expect("psql runs");
    assert!(status.success(), "psql failed: {statement}");
}

async fn run(backend: &str, database_url: Option<&str>, options: &Options) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let server = Server::start(dir.path(), database_url);
    let http = {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    };
    let endpoint = format!("http://{}/graphql", server.address);
    graphql(
        &http,
        &endpoint,
        "mutation($d: String!) { registerTemplate(input: {definition: $d}) { result } }",
        json!({ "d": template() }),
    )
    .await;
    let head = graphql(
        &http,
        &endpoint,
        "{ events(first: 500) { pageInfo { endCursor } } }",
        json!({}),
    )
    .await["events"]["pageInfo"]["endCursor"]
        .clone();

    // Subscribers, each from the same cursor; a round's deliveries go to `rounds`.
    let total_subscribers = options.subscribers + options.slow;
    let production_done = Arc::new(Barrier::new(options.slow + 1));
    let expected = EVENTS_PER_TASK + options.rounds * options.tasks * EVENTS_PER_TASK;
    let mut subscribers = Vec::new();
    let mut progress = Vec::new();
    for i in 0..total_subscribers {
        let slow = i >= options.subscribers;
        let socket = subscribe(&server.address, &head).await;
        let received = Arc::new(AtomicUsize::new(0));
        if !slow {
            progress.push(received.clone());
        }
        subscribers.push(tokio::spawn(receive_all(
            socket,
            slow.then(|| production_done.clone()),
            expected,
            received,
            i < SAMPLED_SUBSCRIBERS,
        )));
    }
    let all_received = |count: usize| {
        let progress = progress.clone();
        async move {
            while progress.iter().any(|p| p.load(Ordering::SeqCst) < count) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    println!(
        "{backend}: {} subscribers ({} slow), {} rounds of {} events, written {}",
        total_subscribers,
        options.slow,
        options.rounds,
        options.tasks * EVENTS_PER_TASK,
        options.rate.map_or(
            "as fast as the server takes them".to_owned(),
            |rate| format!("at {rate} events/s")
        )
    );
    // Warm-up: one task, so every subscription is live before anything is timed.
    produce(&http, &endpoint, 1, None).await;
    all_received(EVENTS_PER_TASK).await;
    LATENCIES.take();
    ARRIVALS.take();
    let baseline = server.rss_kib();
    println!("  server memory after warm-up: {} MiB", baseline / 1024);
    let mut peak = baseline;
    for round in 1..=options.rounds {
        let started = Instant::now();
        let sampler = server.sample_rss();
        let cpu_before = server.cpu_seconds();
        produce(&http, &endpoint, options.tasks, options.rate).await;
        let produced_in = started.elapsed();
        let events = options.tasks * EVENTS_PER_TASK;
        all_received(EVENTS_PER_TASK + round * events).await;
        let delivered_in = started.elapsed();
        let round_peak = sampler.stop();
        let server_cpu = server.cpu_seconds() - cpu_before;
        peak = peak.max(round_peak);
        let latencies = LATENCIES.take();
        let after_answer = ARRIVALS.after_answer();
        let round_trips = ROUND_TRIPS.take();
        println!(
            "  round {round}: {events} events written in {:.0} ms ({:.0} events/s), all delivered to {} subscribers after {:.0} ms; createTask round trip p50 {:.1} ms, p99 {:.1} ms; delivery from write start p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; from the answer p50 {:.1} ms, p99 {:.1} ms; server CPU {:.0}% of one core; server memory peak {} MiB, now {} MiB",
            produced_in.as_secs_f64() * 1000.0,
            events as f64 / produced_in.as_secs_f64(),
            options.subscribers,
            delivered_in.as_secs_f64() * 1000.0,
            percentile(&round_trips, 0.50),
            percentile(&round_trips, 0.99),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
            percentile(&after_answer, 0.50),
            percentile(&after_answer, 0.99),
            server_cpu / delivered_in.as_secs_f64() * 100.0,
            round_peak / 1024,
            server.rss_kib() / 1024,
        );
    }
    production_done.wait().await;
    let mut reference: Option<Vec<String>> = None;
    for subscriber in subscribers {
        let cursors = subscriber.await.expect("a subscriber ran");
        assert_eq!(cursors.len(), expected, "a subscriber missed events");
        match &reference {
            None => reference = Some(cursors),
            Some(reference) => assert_eq!(
                &cursors, reference,
                "subscribers disagree on the events or their order"
            ),
        }
    }
    // The query agrees with what was streamed, cursor for cursor.
    let mut logged = Vec::new();
    let mut after = head.clone();
    loop {
        let page = graphql(
            &http,
            &endpoint,
            "query($after: String) { events(filter: {namespaces: [\"bench\"]}, first: 500, after: $after) { edges { cursor } pageInfo { hasNextPage endCursor } } }",
            json!({ "after": after }),
        )
        .await;
        let page = &page["events"];
        logged.extend(
            page["edges"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|edge| edge["cursor"].as_str().unwrap_or_default().to_owned()),
        );
        if page["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
    assert_eq!(Some(&logged), reference.as_ref(), "the stream is the log");
    println!(
        "  every subscriber (slow ones included) received all {expected} events exactly once, in log order; server memory: {} MiB after warm-up, peak {} MiB, end {} MiB",
        baseline / 1024,
        peak / 1024,
        server.rss_kib() / 1024
    );
    server.stop();
}

fn template() -> String {
    let steps: Vec<Value> = (0..STEPS_PER_TASK)
        .map(|i| json!({ "name": format!("s{i}"), "handler": "bench.external" }))
        .collect();
    json!({ "namespace": "bench", "name": "fanout", "version": "1.0.0", "steps": steps })
        .to_string()
}

/// Creates `tasks` tasks, `PRODUCERS` requests at a time, paced to `rate` events per second
/// when given.
async fn produce(http: &reqwest::Client, endpoint: &str, tasks: usize, rate: Option<usize>) {
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let interval = rate.map(|rate| Duration::from_secs_f64(EVENTS_PER_TASK as f64 / rate as f64));
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS.min(tasks) {
        let (http, endpoint, next) = (http.clone(), endpoint.to_owned(), next.clone());
        producers.push(tokio::spawn(async move {
            loop {
                let task = next.fetch_add(1, Ordering::Relaxed);
                if task >= tasks as u64 {
                    break;
                }
                if let Some(interval) = interval {
                    tokio::time::sleep_until(start + interval * task as u32).await;
                }
                let sent = Instant::now();
                let created = graphql(
                    &http,
                    &endpoint,
                    "mutation { createTask(input: {namespace: \"bench\", template: \"fanout\"}) { task { id } } }",
                    json!({}),
                )
                .await;
                ROUND_TRIPS.push(sent.elapsed().as_secs_f64() * 1000.0);
                if let Some(id) = created["createTask"]["task"]["id"].as_str() {
                    ARRIVALS.answered(id, chrono::Utc::now());
                }
            }
        }));
    }
    for producer in producers {
        producer.await.expect("a producer ran");
    }
}

async fn graphql(http: &reqwest::Client, endpoint: &str, query: &str, variables: Value) -> Value {
    let body: Value = http
        .post(endpoint)
        .json(&json!({ "query": query, "variables": variables }))
        .send()
        .await
        .expect("the server answers")
        .json()
        .await
        .expect("a JSON answer");
    assert!(body["errors"].is_null(), "{body}");
    body["data"].clone()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn subscribe(address: &str, after: &Value) -> Socket {
    let mut request = format!("ws://{address}/graphql")
        .into_client_request()
        .expect("a WebSocket request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().expect("a header value"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the WebSocket opens");
    for message in [
        json!({ "type": "connection_init" }),
        json!({ "type": "subscribe", "id": "events", "payload": {
            "query": "subscription($after: String) { events(filter: {namespaces: [\"bench\"]}, after: $after) { cursor occurredAt taskId } }",
            "variables": { "after": after } } }),
    ] {
        socket
            .send(Message::text(message.to_string()))
            .await
            .expect("the WebSocket takes a message");
    }
    socket
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    payload: Option<Payload>,
}

#[derive(Deserialize)]
struct Payload {
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    events: Delivered,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Delivered {
    cursor: String,
    occurred_at: chrono::DateTime<chrono::Utc>,
    task_id: Option<String>,
}

/// Reads `expected` events and returns their cursors, counting them in `received`; a slow
/// subscriber first waits for production to end without reading its socket. Latencies of
/// the others are recorded.
async fn receive_all(
    mut socket: Socket,
    slow: Option<Arc<Barrier>>,
    expected: usize,
    received: Arc<AtomicUsize>,
    sampled: bool,
) -> Vec<String> {
    if let Some(done) = &slow {
        done.wait().await;
    }
    let mut cursors = Vec::with_capacity(expected);
    while cursors.len() < expected {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("an event within 60 s")
            .expect("the socket stays open")
            .expect("a WebSocket message");
        let Message::Text(text) = message else {
            continue;
        };
        let received_at = chrono::Utc::now();
        let envelope: Envelope = serde_json::from_str(&text).expect("a protocol message");
        match envelope.kind.as_str() {
            "next" => {}
            "ping" | "pong" | "connection_ack" => continue,
            other => panic!("unexpected {other} message: {text}"),
        }
        let Some(event) = envelope.payload.and_then(|p| p.data).map(|d| d.events) else {
            panic!("a next message without an event: {text}");
        };
        cursors.push(event.cursor);
        if slow.is_none() {
            let latency = (received_at - event.occurred_at)
                .num_microseconds()
                .unwrap_or(0);
            LATENCIES.push(latency as f64 / 1000.0);
            if sampled && let Some(task_id) = event.task_id {
                ARRIVALS.arrived(task_id, received_at);
            }
        }
        received.store(cursors.len(), Ordering::SeqCst);
    }
    cursors
}

static LATENCIES: Latencies = Latencies(std::sync::Mutex::new(Vec::new()));
static ROUND_TRIPS: Latencies = Latencies(std::sync::Mutex::new(Vec::new()));
static ARRIVALS: Arrivals = Arrivals(std::sync::Mutex::new((Vec::new(), None)));
/// Subscribers whose deliveries are matched with the producer's answers.
const SAMPLED_SUBSCRIBERS: usize = 10;

type Moment = chrono::DateTime<chrono::Utc>;

/// Sampled subscribers' (task id, received at), and the producer's answer time per task id.
type ArrivalLog = (Vec<(String, Moment)>, Option<HashMap<String, Moment>>);

/// When the producer got each task's answer, and when sampled subscribers got its events.
struct Arrivals(std::sync::Mutex<ArrivalLog>);

impl Arrivals {
    fn answered(&self, task_id: &str, at: Moment) {
        let mut guard = self.0.lock().expect("not poisoned");
        guard
            .1
            .get_or_insert_with(HashMap::new)
            .insert(task_id.to_owned(), at);
    }
    fn arrived(&self, task_id: String, at: Moment) {
        self.0.lock().expect("not poisoned").0.push((task_id, at));
    }
    fn take(&self) -> (Vec<(String, Moment)>, HashMap<String, Moment>) {
        let mut guard = self.0.lock().expect("not poisoned");
        (
            std::mem::take(&mut guard.0),
            guard.1.take().unwrap_or_default(),
        )
    }
    /// Delivery after the producer's answer, in ms (0 when the event came first), sorted.
    fn after_answer(&self) -> Vec<f64> {
        let (arrivals, answers) = self.take();
        let mut latencies: Vec<f64> = arrivals
            .iter()
            .filter_map(|(task, at)| {
                let answered = answers.get(task)?;
                let micros = (*at - *answered).num_microseconds()?;
                Some(micros.max(0) as f64 / 1000.0)
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        latencies
    }
}

struct Latencies(std::sync::Mutex<Vec<f64>>);

impl Latencies {
    fn push(&self, ms: f64) {
        self.0.lock().expect("not poisoned").push(ms);
    }
    fn take(&self) -> Vec<f64> {
        let mut all = std::mem::take(&mut *self.0.lock().expect("not poisoned"));
        all.sort_by(f64::total_cmp);
        all
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The `tasker serve` process under test.
struct Server {
    child: Child,
    address: String,
}

impl Server {
    fn start(data_dir: &std::path::Path, database_url: Option<&str>) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tasker"));
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--log-format", "json"])
            .args(["--no-examples", "--data-dir"])
            .arg(data_dir)
            .env_remove("TASKER_DATABASE_URL")
            .env_remove("TASKER_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(url) = database_url {
            command.args(["--database-url", url]);
        }
        let mut child = command.spawn().expect("tasker starts");
        let stderr = child.stderr.take().expect("its stderr");
        let mut lines = BufReader::new(stderr).lines();
        let address = loop {
            let line = lines
                .next()
                .expect("tasker logs its address")
                .expect("a log line");
            let entry: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if let Some(address) = entry["fields"]["address"].as_str() {
                break address.to_owned();
            }
        };
        // Keep draining the log so the server never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, address }
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// CPU time the server has used (user and system), in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The fields after the command name (which is in parentheses).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// Samples resident memory every 20 ms until stopped; returns the peak.
    fn sample_rss(&self) -> Sampler {
        let pid = self.child.id();
        let stop = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let (stop_flag, peak_seen) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while stop_flag.load(Ordering::SeqCst) == 0 {
                peak_seen.fetch_max(rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler { stop, peak, thread }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

struct Sampler {
    stop: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn stop(self) -> u64 {
        self.stop.store(1, Ordering::SeqCst);
        let _ = self.thread.join();
        self.peak.load(Ordering::SeqCst)
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
