//! `tasker bench`: runs the engine over fresh databases and prints how fast steps run, beside
//! the database's own commit rate measured in the same run (so a figure reads as a ratio on
//! any machine). For each scenario, tasks are created first (timed: what a user waits for
//! includes it); the execution clock starts when the worker pool starts and stops when the
//! last task completes. Every transition and event is persisted as in production. Then the
//! public API: chains created over HTTP and awaited over the event subscription, one at a time.

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tasker::App;
use tasker::config::{BenchArgs, Settings};
use tasker_domain::{SystemClock, TaskRequest, TaskState};
use tasker_store::{NewTask, Store, StoreOptions, TaskFilter};
use uuid::Uuid;

/// One workload: a template and how many tasks of it.
struct Scenario {
    key: &'static str,
    description: String,
    template: String,
    tasks: usize,
}

/// Every scenario, (c) with `one_step_tasks` tasks.
fn scenarios_list(one_step_tasks: usize) -> Vec<Scenario> {
    let mut diamond = vec![noop("top".into(), vec![])];
    diamond.extend((0..50).map(|i| noop(format!("m{i}"), vec!["top".into()])));
    diamond.push(noop(
        "bottom".into(),
        (0..50).map(|i| format!("m{i}")).collect(),
    ));
    vec![
        Scenario {
            key: "a",
            description: "1 task, a chain of 40 noop steps".into(),
            template: template("chain40", chain(40)),
            tasks: 1,
        },
        Scenario {
            key: "b",
            description: "1 task, a diamond 1 -> 50 -> 1".into(),
            template: template("diamond50", diamond),
            tasks: 1,
        },
        one_step(one_step_tasks),
        Scenario {
            key: "d",
            description: "100 tasks, each a chain of 10".into(),
            template: chain_template(),
            tasks: 100,
        },
        limited(one_step_tasks),
    ]
}

/// Scenario (g): (c) with each step under a concurrency limit of 100 and a rate limit that
/// never runs out, so every claim goes through both admissions: their cost beside (c)'s.
fn limited(tasks: usize) -> Scenario {
    let step = json!({
        "name": "s0",
        "handler": "noop",
        "concurrency": { "limit": 100 },
        "rate_limit": { "name": "bench", "limit": 100_000, "per": 1 },
    });
    Scenario {
        key: "g",
        description: format!("{tasks} tasks of one step, (c) with limits"),
        template: template("limited", vec![step]),
        tasks,
    }
}

/// Scenario (c): `tasks` tasks of one step.
fn one_step(tasks: usize) -> Scenario {
    Scenario {
        key: "c",
        description: format!("{tasks} tasks of one noop step"),
        template: template("single", chain(1)),
        tasks,
    }
}

/// The template of scenario (d) and of the public-API figure: a chain of [`API_CHAIN`].
fn chain_template() -> String {
    template("chain10", chain(API_CHAIN))
}

/// A template of the bench namespace with these steps.
fn template(name: &str, steps: Vec<serde_json::Value>) -> String {
    json!({ "namespace": "bench", "name": name, "version": "1.0.0", "steps": steps }).to_string()
}

/// `n` noop steps, each depending on the one before.
fn chain(n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let parents = if i == 0 {
                vec![]
            } else {
                vec![format!("s{}", i - 1)]
            };
            noop(format!("s{i}"), parents)
        })
        .collect()
}

fn noop(name: String, depends_on: Vec<String>) -> serde_json::Value {
    json!({ "name": name, "handler": "noop", "depends_on": depends_on })
}

/// What one scenario measured.
#[derive(Debug, Serialize)]
pub struct Measurement {
    scenario: String,
    description: String,
    tasks: usize,
    steps: usize,
    /// Creating the tasks, one `createTask` after another through the engine.
    create_ms: f64,
    create_tasks_per_second: f64,
    /// From the pool's start to the last task's completion.
    execute_ms: f64,
    execute_steps_per_second: f64,
    /// Steps over creation and execution together: what a user gets.
    end_to_end_steps_per_second: f64,
    /// Execution steps/s over the database's single-row commits/s.
    execute_to_commit_ratio: f64,
    /// From a parent's completion to its child's start, in milliseconds.
    handoff_p50_ms: Option<f64>,
    handoff_p99_ms: Option<f64>,
    /// SQL statements the store ran, per task created and per step executed.
    statements_per_task_created: f64,
    statements_per_step: f64,
    /// Commands sent to the database (several statements may go in one), per task created
    /// and per step executed: the round trips to the driver's thread or the server.
    round_trips_per_task_created: f64,
    round_trips_per_step: f64,
    /// CPU time this process (the server: API, engine and, on SQLite, the database itself)
    /// spent per step executed, in microseconds.
    cpu_us_per_step: f64,
    /// The most memory this process (server and benchmark) held resident while the steps
    /// executed, in MiB, sampled every few milliseconds (freed memory returned to the system
    /// before the scenario starts).
    peak_rss_mib: f64,
    /// What the finished tasks take in the database (tables and indexes), per task and per
    /// step.
    bytes_per_task: f64,
    bytes_per_step: f64,
}

/// Chains created over HTTP and awaited over the subscription, one at a time.
#[derive(Debug, Serialize)]
pub struct ApiLatency {
    description: String,
    tasks: usize,
    steps_per_task: usize,
    /// From sending `createTask` to receiving the task's `task.completed` event.
    p50_ms: f64,
    p99_ms: f64,
}

/// Everything measured on one database.
#[derive(Debug, Serialize)]
pub struct Backend {
    backend: String,
    /// Single-row autocommitted writes per second through the same driver and pool: the
    /// database's own speed on this machine, measured in the same run.
    commits_per_second: f64,
    scenarios: Vec<Measurement>,
    /// One-step tasks started with `createTasks`-sized batches, through the engine.
    batch_create: BatchCreation,
    api: ApiLatency,
    http_create: HttpCreation,
}

/// Tasks created over HTTP, as scripts and services start them: `createTask` from clients
/// sending at once, then `createTasks` batches. Their step is for an external worker, so the
/// server's pool leaves them alone and only creation is timed.
#[derive(Debug, Serialize)]
pub struct HttpCreation {
    single: Vec<ConcurrentCreation>,
    batch_tasks: usize,
    batch_size: usize,
    /// `createTasks` calls one after another from one client.
    batch_tasks_per_second: f64,
}

/// `createTask` calls from `clients` clients at once, each sending its next call when the
/// last one is answered.
#[derive(Debug, Serialize)]
pub struct ConcurrentCreation {
    clients: usize,
    tasks: usize,
    tasks_per_second: f64,
    /// One call's answer time.
    p50_ms: f64,
    p99_ms: f64,
}

/// Tasks started in batches.
#[derive(Debug, Serialize)]
pub struct BatchCreation {
    tasks: usize,
    batch_size: usize,
    tasks_per_second: f64,
    statements_per_batch: f64,
    round_trips_per_batch: f64,
}

/// How long the commit rate is measured.
const COMMIT_RATE_FOR: Duration = Duration::from_secs(1);
/// How many tasks, in batches of how many, the batch creation figure starts.
const BATCH_TASKS: usize = 10_000;
const BATCH_SIZE: usize = 1_000;
/// The chain the public-API figure runs.
const API_CHAIN: usize = 10;
/// How many tasks each HTTP creation figure starts, and from how many clients at once.
const HTTP_TASKS: usize = 4_000;
const HTTP_CLIENTS: [usize; 3] = [1, 4, 16];

/// Runs every scenario on SQLite and, when given, PostgreSQL; prints text or JSON.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let mut backends =
        vec![measure_backend("sqlite", &args, |key| Database::sqlite(dir.path(), key)).await?];
    if let Some(url) = &args.postgres_url {
        backends.push(measure_backend("postgres", &args, |_| Database::postgres(url)).await?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&backends)?);
    } else {
        for backend in &backends {
            print_backend(backend);
        }
    }
    Ok(())
}

fn print_backend(backend: &Backend) {
    println!(
        "{}: {:.0} single-row commits/s (the database's own rate, measured in this run)",
        backend.backend, backend.commits_per_second
    );
    println!(
        "   {:<36} {:>6} {:>9} {:>8} {:>9} {:>8} {:>8} {:>6} {:>7} {:>7} {:>6} {:>6} {:>6} {:>5} {:>7} {:>7} {:>7} {:>7}",
        "scenario",
        "steps",
        "create ms",
        "tasks/s",
        "exec ms",
        "steps/s",
        "e2e/s",
        "÷commit",
        "sql/tsk",
        "sql/stp",
        "rt/tsk",
        "rt/stp",
        "µs cpu",
        "MiB",
        "p50 ms",
        "p99 ms",
        "B/task",
        "B/step"
    );
    for m in &backend.scenarios {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        println!(
            "{:<2} {:<36} {:>6} {:>9.1} {:>8.0} {:>9.1} {:>8.0} {:>8.0} {:>6.2} {:>7.1} {:>7.1} {:>6.1} {:>6.1} {:>6.0} {:>5.0} {:>7} {:>7} {:>7.0} {:>7.0}",
            m.scenario,
            m.description,
            m.steps,
            m.create_ms,
            m.create_tasks_per_second,
            m.execute_ms,
            m.execute_steps_per_second,
            m.end_to_end_steps_per_second,
            m.execute_to_commit_ratio,
            m.statements_per_task_created,
            m.statements_per_step,
            m.round_trips_per_task_created,
            m.round_trips_per_step,
            m.cpu_us_per_step,
            m.peak_rss_mib,
            ms(m.handoff_p50_ms),
            ms(m.handoff_p99_ms),
            m.bytes_per_task,
            m.bytes_per_step
        );
    }
    let batch = &backend.batch_create;
    println!(
        "   createTasks through the engine (no HTTP): {} one-step tasks in batches of {}: {:.0} tasks/s, {:.0} statements in {:.0} round trips per batch",
        batch.tasks,
        batch.batch_size,
        batch.tasks_per_second,
        batch.statements_per_batch,
        batch.round_trips_per_batch
    );
    let http = &backend.http_create;
    for single in &http.single {
        println!(
            "   createTask over HTTP from {:>2} {} at once: {:.0} tasks/s, p50 {:.2} ms, p99 {:.2} ms per call",
            single.clients,
            if single.clients == 1 {
                "client"
            } else {
                "clients"
            },
            single.tasks_per_second,
            single.p50_ms,
            single.p99_ms
        );
    }
    println!(
        "   createTasks over HTTP: {} one-step tasks in batches of {}: {:.0} tasks/s",
        http.batch_tasks, http.batch_size, http.batch_tasks_per_second
    );
    let api = &backend.api;
    println!(
        "e  {}: {} tasks, p50 {:.1} ms, p99 {:.1} ms per task\n",
        api.description, api.tasks, api.p50_ms, api.p99_ms
    );
}

/// The commit rate, every scenario and the public-API figure on one kind of database, each on
/// a fresh database.
async fn measure_backend<F, D>(backend: &str, args: &BenchArgs, fresh: F) -> anyhow::Result<Backend>
where
    F: Fn(&'static str) -> D,
    D: std::future::Future<Output = anyhow::Result<Database>>,
{
    let database = fresh("commits").await?;
    let commits_per_second = commit_rate(&database.store).await;
    database.drop().await?;
    let commits_per_second = commits_per_second?;
    let workers = args.workers;
    let mut scenarios = Vec::new();
    for scenario in scenarios_list(args.one_step_tasks) {
        let database = fresh(scenario.key).await?;
        let measured = measure(&database.store, &scenario, workers, commits_per_second).await;
        database.drop().await?;
        scenarios.push(measured?);
    }
    if args.history_tasks > 0 {
        let mut database = fresh("f").await?;
        // Running the history stops its server, which closes the store: connect again.
        fill_history(&database.store, args.history_tasks, workers).await?;
        database.reconnect().await?;
        // A history this size builds up over days, while autovacuum keeps pace; filled in
        // seconds, it leaves PostgreSQL's autovacuum catching up through the measurement
        // (creation 2.5x slower in one run). Vacuumed first, (f) measures the steady state.
        database.store.vacuum_analyze().await?;
        let at_scale = at_scale(args.one_step_tasks);
        let measured = measure(&database.store, &at_scale, workers, commits_per_second).await;
        database.drop().await?;
        scenarios.push(measured?);
    }
    let database = fresh("batch").await?;
    let batch_create = batch_creation(&database.store).await;
    database.drop().await?;
    let database = fresh("api").await?;
    let api = api_latency(database.store.clone(), workers, args.api_tasks).await;
    database.drop().await?;
    let database = fresh("http").await?;
    let http_create = http_creation(database.store.clone(), workers).await;
    database.drop().await?;
    Ok(Backend {
        backend: backend.to_owned(),
        commits_per_second,
        scenarios,
        batch_create: batch_create?,
        api: api?,
        http_create: http_create?,
    })
}

/// [`BATCH_TASKS`] one-step tasks started [`BATCH_SIZE`] at a time, as `createTasks` does.
async fn batch_creation(store: &Store) -> anyhow::Result<BatchCreation> {
    let single = one_step(BATCH_TASKS);
    let template = store
        .register_template(&single.template, false)
        .await?
        .template
        .template;
    let statements_before = store.statement_count();
    let trips_before = store.round_trip_count();
    let started = Instant::now();
    create_in_batches(store, &template, BATCH_TASKS).await?;
    let seconds = started.elapsed().as_secs_f64();
    let batches = (BATCH_TASKS / BATCH_SIZE) as f64;
    Ok(BatchCreation {
        tasks: BATCH_TASKS,
        batch_size: BATCH_SIZE,
        tasks_per_second: BATCH_TASKS as f64 / seconds,
        statements_per_batch: (store.statement_count() - statements_before) as f64 / batches,
        round_trips_per_batch: (store.round_trip_count() - trips_before) as f64 / batches,
    })
}

/// Starts `tasks` tasks of `template`, [`BATCH_SIZE`] at a time, as `createTasks` does.
async fn create_in_batches(
    store: &Store,
    template: &tasker_domain::TaskTemplate,
    tasks: usize,
) -> anyhow::Result<()> {
    let creator = tasker_engine::Engine::new(store.clone());
    for first in (0..tasks).step_by(BATCH_SIZE) {
        let news = (first..tasks.min(first + BATCH_SIZE))
            .map(|n| numbered_task(template, n))
            .collect();
        creator.create_tasks(news).await?;
    }
    Ok(())
}

/// `history` finished one-step tasks (of a template of their own), started in batches and
/// run by the pool, for (f).
async fn fill_history(store: &Store, history: usize, workers: usize) -> anyhow::Result<()> {
    let filler = one_step(history)
        .template
        .replace("\"single\"", "\"history\"");
    let template = store
        .register_template(&filler, false)
        .await?
        .template
        .template;
    create_in_batches(store, &template, history).await?;
    let app = App::build_on(&server_settings(workers), store.clone()).await?;
    wait_for_finished(&app, history as u64, "f (history)").await?;
    app.stop().await
}

/// (f): scenario (c) again, over a database that already holds finished tasks: claiming and
/// completing must not get dearer as history grows.
fn at_scale(tasks: usize) -> Scenario {
    Scenario {
        key: "f",
        description: "(c) over finished tasks already held".into(),
        ..one_step(tasks)
    }
}

/// Waits until the app's engine has finished `expected` tasks.
async fn wait_for_finished(app: &App, expected: u64, scenario: &str) -> anyhow::Result<()> {
    let mut finished = app.engine().finished_tasks();
    while *finished.borrow_and_update() < expected {
        if tokio::time::timeout(Duration::from_secs(120), finished.changed())
            .await
            .is_err()
        {
            bail!(
                "scenario {scenario} stalled: {} of {expected} tasks finished",
                *finished.borrow()
            );
        }
    }
    Ok(())
}

/// Task `n` of a scenario, its number in its context.
fn numbered_task(template: &tasker_domain::TaskTemplate, n: usize) -> NewTask {
    NewTask {
        namespace: template.namespace.clone(),
        template: template.name.clone(),
        version: None,
        trace_parent: None,
        request: TaskRequest {
            context: json!({ "n": n }),
            ..TaskRequest::default()
        },
    }
}

/// The server as production wires it, on loopback, with no examples; the pool is what is
/// measured, so it has at least one worker.
fn server_settings(workers: usize) -> Settings {
    Settings {
        bind: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        examples: false,
        workers: workers.max(1),
        ..Settings::default()
    }
}

/// Single-row autocommitted writes per second, one after another.
async fn commit_rate(store: &Store) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut commits = 0u64;
    while started.elapsed() < COMMIT_RATE_FOR {
        store.probe_write().await?;
        commits += 1;
    }
    Ok(commits as f64 / started.elapsed().as_secs_f64())
}

async fn measure(
    store: &Store,
    scenario: &Scenario,
    workers: usize,
    commits_per_second: f64,
) -> anyhow::Result<Measurement> {
    let registration = store.register_template(&scenario.template, false).await?;
    let template = registration.template.template;
    let bytes_before = store.database_bytes().await?;
    // Tasks are created as the API creates them, through an engine (without its background
    // work, which starts with the clock below).
    let creator = tasker_engine::Engine::new(store.clone());
    let statements_before_creation = store.statement_count();
    let trips_before_creation = store.round_trip_count();
    let create_started = Instant::now();
    let mut ids = Vec::with_capacity(scenario.tasks);
    for i in 0..scenario.tasks {
        let creation = creator.create_task(numbered_task(&template, i)).await?;
        ids.push(creation.task.id);
    }
    let create_seconds = create_started.elapsed().as_secs_f64();
    let creation_statements = store.statement_count() - statements_before_creation;
    let creation_trips = store.round_trip_count() - trips_before_creation;

    // The server as production wires it, its pool started with the clock.
    let settings = server_settings(workers);
    let statements_before_execution = store.statement_count();
    let trips_before_execution = store.round_trip_count();
    let cpu_before = process_cpu();
    let memory = PeakMemory::watch();
    let started = Instant::now();
    let app = App::build_on(&settings, store.clone()).await?;
    let done = TaskFilter {
        namespace: Some(template.namespace.clone()),
        template: Some(template.name.clone()),
        states: vec![TaskState::Complete],
        ..TaskFilter::within(tasker_domain::Within::Any)
    };
    // The engine counts the tasks it finished: wait for all of this scenario's.
    let expected = ids.len() as u64;
    wait_for_finished(&app, expected, scenario.key).await?;
    let execute_seconds = started.elapsed().as_secs_f64();
    let execution_cpu = process_cpu().saturating_sub(cpu_before);
    let peak_rss_mib = memory.stop().await;
    let execution_statements = store.statement_count() - statements_before_execution;
    let execution_trips = store.round_trip_count() - trips_before_execution;

    let complete = store.count_tasks(&done).await?;
    if complete != expected {
        bail!(
            "scenario {}: {complete} of {expected} tasks completed",
            scenario.key
        );
    }
    let steps = template.steps.len() * ids.len();
    let bytes = store.database_bytes().await?.saturating_sub(bytes_before) as f64;
    let (p50, p99) = handoff_latencies(store, &ids).await?;
    // Stops the pool and closes the database.
    app.stop().await?;
    let tasks = ids.len();
    Ok(Measurement {
        scenario: scenario.key.to_owned(),
        description: scenario.description.clone(),
        tasks,
        steps,
        create_ms: create_seconds * 1000.0,
        create_tasks_per_second: tasks as f64 / create_seconds,
        execute_ms: execute_seconds * 1000.0,
        execute_steps_per_second: steps as f64 / execute_seconds,
        end_to_end_steps_per_second: steps as f64 / (create_seconds + execute_seconds),
        execute_to_commit_ratio: steps as f64 / execute_seconds / commits_per_second,
        handoff_p50_ms: p50,
        handoff_p99_ms: p99,
        statements_per_task_created: creation_statements as f64 / tasks as f64,
        statements_per_step: execution_statements as f64 / steps as f64,
        round_trips_per_task_created: creation_trips as f64 / tasks as f64,
        round_trips_per_step: execution_trips as f64 / steps as f64,
        cpu_us_per_step: execution_cpu.as_secs_f64() * 1e6 / steps as f64,
        peak_rss_mib,
        bytes_per_task: bytes / tasks as f64,
        bytes_per_step: bytes / steps as f64,
    })
}

/// The public API as a user drives it: the real server on the store, a chain of
/// [`API_CHAIN`] steps created over HTTP, its `task.completed` event awaited over one
/// `events` subscription, one task after another.
async fn api_latency(store: Store, workers: usize, tasks: usize) -> anyhow::Result<ApiLatency> {
    let registration = store.register_template(&chain_template(), false).await?;
    let template = registration.template.template;
    let server = Served::start(store, workers).await?;
    let client = &server.client;
    let measured = async {
        let head = client.event_head().await?;
        let filter = tasker_client::EventFilter {
            namespaces: vec![template.namespace.clone()],
            names: vec!["task.completed".to_owned()],
            ..Default::default()
        };
        let mut completed = client.follow_events(&filter, Some(head));
        let mut latencies = Vec::with_capacity(tasks);
        for _ in 0..tasks {
            let started = Instant::now();
            let created = client
                .create_task(&tasker_client::NewTask::new(
                    template.namespace.clone(),
                    template.name.clone(),
                ))
                .await?;
            loop {
                let event = tokio::time::timeout(Duration::from_secs(60), completed.next())
                    .await
                    .context("a task did not complete within 60 s")?
                    .context("the subscription ended")??;
                if event.task_id.as_deref() == Some(created.task.id.as_str()) {
                    break;
                }
            }
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        anyhow::Ok(latencies)
    }
    .await;
    server.stop().await?;
    let mut latencies = measured?;
    latencies.sort_by(f64::total_cmp);
    Ok(ApiLatency {
        description: format!(
            "public API: a chain of {API_CHAIN} created over HTTP, awaited over the subscription"
        ),
        tasks,
        steps_per_task: template.steps.len(),
        p50_ms: quantile(&latencies, 0.50).unwrap_or(0.0),
        p99_ms: quantile(&latencies, 0.99).unwrap_or(0.0),
    })
}

/// [`HTTP_TASKS`] tasks created over HTTP for each number of clients in [`HTTP_CLIENTS`],
/// then as many again in `createTasks` batches of [`BATCH_SIZE`].
async fn http_creation(store: Store, workers: usize) -> anyhow::Result<HttpCreation> {
    let definition = json!({
        "namespace": "bench",
        "name": "external",
        "version": "1.0.0",
        "steps": [{ "name": "only", "handler": "bench.external" }],
    })
    .to_string();
    store.register_template(&definition, false).await?;
    let server = Served::start(store, workers).await?;
    let client = &server.client;
    let new_task = |n: usize| {
        let mut task = tasker_client::NewTask::new("bench", "external");
        task.context = Some(json!({ "n": n }));
        task
    };
    let measured = async {
        let mut single = Vec::new();
        for clients in HTTP_CLIENTS {
            let started = Instant::now();
            let senders = (0..clients).map(|c| {
                let client = client.clone();
                async move {
                    let mut latencies = Vec::new();
                    for n in (c..HTTP_TASKS).step_by(clients) {
                        let sent = Instant::now();
                        client.create_task(&new_task(n)).await?;
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    anyhow::Ok(latencies)
                }
            });
            let mut latencies: Vec<f64> = futures::future::try_join_all(senders)
                .await?
                .into_iter()
                .flatten()
                .collect();
            let seconds = started.elapsed().as_secs_f64();
            latencies.sort_by(f64::total_cmp);
            single.push(ConcurrentCreation {
                clients,
                tasks: HTTP_TASKS,
                tasks_per_second: HTTP_TASKS as f64 / seconds,
                p50_ms: quantile(&latencies, 0.50).unwrap_or(0.0),
                p99_ms: quantile(&latencies, 0.99).unwrap_or(0.0),
            });
        }
        let started = Instant::now();
        for first in (0..HTTP_TASKS).step_by(BATCH_SIZE) {
            let batch: Vec<_> = (first..HTTP_TASKS.min(first + BATCH_SIZE))
                .map(new_task)
                .collect();
            client.create_tasks(&batch).await?;
        }
        anyhow::Ok((single, HTTP_TASKS as f64 / started.elapsed().as_secs_f64()))
    }
    .await;
    server.stop().await?;
    let (single, batch_tasks_per_second) = measured?;
    Ok(HttpCreation {
        single,
        batch_tasks: HTTP_TASKS,
        batch_size: BATCH_SIZE,
        batch_tasks_per_second,
    })
}

/// CPU time (user and system) this process has used so far.
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return Duration::ZERO;
        }
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// The highest resident memory of this process seen while it watches.
struct PeakMemory {
    stop: tokio::sync::oneshot::Sender<()>,
    watching: tokio::task::JoinHandle<u64>,
}

/// How often [`PeakMemory`] looks.
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_millis(5);

impl PeakMemory {
    /// Starts watching, after handing back to the system what earlier scenarios freed (the
    /// allocator keeps freed memory resident otherwise), so the peak is this scenario's.
    fn watch() -> PeakMemory {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
        unsafe {
            libc::malloc_trim(0);
        }
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let watching = tokio::spawn(async move {
            let mut peak = resident_bytes();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    () = tokio::time::sleep(MEMORY_SAMPLE_EVERY) => {}
                }
                peak = peak.max(resident_bytes());
            }
            peak.max(resident_bytes())
        });
        PeakMemory { stop, watching }
    }

    /// The peak seen, in MiB.
    async fn stop(self) -> f64 {
        let _ = self.stop.send(());
        self.watching.await.unwrap_or(0) as f64 / (1024.0 * 1024.0)
    }
}

/// This process's resident memory now (Linux: `/proc/self/statm`; 0 where it cannot be read).
fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages = statm
        .split_whitespace()
        .nth(1)
        .and_then(|pages| pages.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page_size).unwrap_or(4096)
}

/// The real server on a store, serving HTTP on loopback until stopped, and a client of it.
struct Served {
    client: tasker_client::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Served {
    async fn start(store: Store, workers: usize) -> anyhow::Result<Served> {
        let app = App::build_on(&server_settings(workers), store).await?;
        let client = tasker_client::Client::new(&format!("http://{}", app.address()))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(app.serve(async move {
            let _ = stopped.await;
        }));
        Ok(Served {
            client,
            stop,
            serving,
        })
    }

    /// Stops the server (it drains, then closes the database).
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.serving.await?
    }
}

/// The value at quantile `q` of sorted values.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get((last as f64 * q).round() as usize).copied()
}

/// For every step with parents: its start minus its last parent's completion, from the
/// persisted events.
async fn handoff_latencies(
    store: &Store,
    task_ids: &[Uuid],
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let events = store.events_for_tasks(task_ids).await?;
    let edges = store.edges_for_tasks(task_ids).await?;
    let mut completed = HashMap::new();
    let mut started = HashMap::new();
    for event in &events {
        let Some(step) = event.step_id else { continue };
        match event.name.as_str() {
            "step.completed" => {
                completed.insert(step, event.occurred_at);
            }
            "step.started" => {
                started.entry(step).or_insert(event.occurred_at);
            }
            _ => {}
        }
    }
    let mut last_parent: HashMap<Uuid, chrono::DateTime<chrono::Utc>> = HashMap::new();
    for edge in &edges {
        if let Some(&done) = completed.get(&edge.parent_step_id) {
            let entry = last_parent.entry(edge.child_step_id).or_insert(done);
            if done > *entry {
                *entry = done;
            }
        }
    }
    let mut latencies: Vec<f64> = last_parent
        .iter()
        .filter_map(|(child, parent_done)| {
            let start = started.get(child)?;
            Some((*start - *parent_done).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok((quantile(&latencies, 0.50), quantile(&latencies, 0.99)))
}

/// A fresh database for one scenario, removed afterwards.
struct Database {
    store: Store,
    options: StoreOptions,
    cleanup: Option<(String, String)>,
}

impl Database {
    async fn sqlite(dir: &std::path::Path, key: &str) -> anyhow::Result<Database> {
        let url = format!("sqlite://{}", dir.join(format!("bench-{key}.db")).display());
        let options = StoreOptions::new(url);
        let store = Store::connect(&options, Arc::new(SystemClock)).await?;
        store.migrate().await?;
        Ok(Database {
            store,
            options,
            cleanup: None,
        })
    }

    async fn postgres(url: &str) -> anyhow::Result<Database> {
        let schema = format!("tasker_bench_{}", Uuid::new_v4().simple());
        let admin = Store::connect(&StoreOptions::new(url), Arc::new(SystemClock)).await?;
        admin.create_schema(&schema).await?;
        admin.close().await?;
        let mut options = StoreOptions::new(url);
        options.schema = Some(schema.clone());
        let store = Store::connect(&options, Arc::new(SystemClock)).await?;
        store.migrate().await?;
        Ok(Database {
            store,
            options,
            cleanup: Some((url.to_owned(), schema)),
        })
    }

    /// A new connection to the same database (after a server stopped and closed the store).
    async fn reconnect(&mut self) -> anyhow::Result<()> {
        self.store = Store::connect(&self.options, Arc::new(SystemClock)).await?;
        Ok(())
    }

    /// Closes its store (if a scenario's app has not already) and removes the database.
    async fn drop(self) -> anyhow::Result<()> {
        self.store.close().await?;
        if let Some((url, schema)) = self.cleanup {
            let admin = Store::connect(&StoreOptions::new(url), Arc::new(SystemClock)).await?;
            admin.drop_schema(&schema).await?;
            admin.close().await?;
        }
        Ok(())
    }
}
