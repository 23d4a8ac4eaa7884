//! `tasker bench`: runs an embedded engine over fresh databases and prints how fast steps run.
//! Tasks are created first; the clock starts when the worker pool starts, and stops when the
//! last task completes. Every transition and event is persisted as in production.

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tasker::App;
use tasker::config::Settings;
use tasker_domain::{SystemClock, TaskRequest, TaskState};
use tasker_store::{NewTask, Store, StoreOptions, TaskFilter};
use uuid::Uuid;

/// One workload: a template and how many tasks of it.
struct Scenario {
    key: &'static str,
    description: &'static str,
    template: String,
    tasks: usize,
}

fn scenarios() -> Vec<Scenario> {
    let noop = |name: String, depends: Vec<String>| json!({ "name": name, "handler": "noop", "depends_on": depends });
    let chain = |n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| {
                noop(
                    format!("s{i}"),
                    if i == 0 {
                        vec![]
                    } else {
                        vec![format!("s{}", i - 1)]
                    },
                )
            })
            .collect()
    };
    let mut diamond = vec![noop("top".into(), vec![])];
    diamond.extend((0..50).map(|i| noop(format!("m{i}"), vec!["top".into()])));
    diamond.push(noop(
        "bottom".into(),
        (0..50).map(|i| format!("m{i}")).collect(),
    ));
    let template = |name: &str, steps: Vec<serde_json::Value>| {
        json!({ "namespace": "bench", "name": name, "version": "1.0.0", "steps": steps })
            .to_string()
    };
    vec![
        Scenario {
            key: "a",
            description: "1 task, a chain of 40 noop steps",
            template: template("chain40", chain(40)),
            tasks: 1,
        },
        Scenario {
            key: "b",
            description: "1 task, a diamond 1 -> 50 -> 1",
            template: template("diamond50", diamond),
            tasks: 1,
        },
        Scenario {
            key: "c",
            description: "1,000 tasks of one noop step",
            template: template("single", chain(1)),
            tasks: 1000,
        },
        Scenario {
            key: "d",
            description: "100 tasks, each a chain of 10",
            template: template("chain10", chain(10)),
            tasks: 100,
        },
    ]
}

/// What one scenario measured.
#[derive(Debug, Serialize)]
pub struct Measurement {
    backend: String,
    scenario: String,
    description: String,
    tasks: usize,
    steps: usize,
    total_ms: f64,
    steps_per_second: f64,
    /// From a parent's completion to its child's start, in milliseconds.
    handoff_p50_ms: Option<f64>,
    handoff_p99_ms: Option<f64>,
    create_ms: f64,
}

/// Runs every scenario on SQLite and, when given, PostgreSQL; prints text or JSON.
pub async fn run(
    postgres_url: Option<String>,
    json_output: bool,
    workers: usize,
) -> anyhow::Result<()> {
    let mut results = Vec::new();
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    for scenario in scenarios() {
        let database = Database::sqlite(dir.path(), scenario.key).await?;
        results.push(measure(&database.store, "sqlite", &scenario, workers).await?);
        database.drop().await?;
    }
    if let Some(url) = postgres_url {
        for scenario in scenarios() {
            let database = Database::postgres(&url).await?;
            let measured = measure(&database.store, "postgres", &scenario, workers).await;
            database.drop().await?;
            results.push(measured?);
        }
    }
    if json_output {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!(
            "{:<9} {:<2} {:<36} {:>6} {:>10} {:>10} {:>9} {:>9}",
            "backend", "", "scenario", "steps", "total ms", "steps/s", "p50 ms", "p99 ms"
        );
        for m in &results {
            let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
            println!(
                "{:<9} {:<2} {:<36} {:>6} {:>10.1} {:>10.0} {:>9} {:>9}",
                m.backend,
                m.scenario,
                m.description,
                m.steps,
                m.total_ms,
                m.steps_per_second,
                ms(m.handoff_p50_ms),
                ms(m.handoff_p99_ms)
            );
        }
    }
    Ok(())
}

async fn measure(
    store: &Store,
    backend: &str,
    scenario: &Scenario,
    workers: usize,
) -> anyhow::Result<Measurement> {
    let registration = store.register_template(&scenario.template, false).await?;
    let template = registration.template.template;
    // Tasks are created as the API creates them, through an engine (without its background
    // work, which starts with the clock below).
    let creator = tasker_engine::Engine::new(store.clone());
    let create_started = Instant::now();
    let mut ids = Vec::with_capacity(scenario.tasks);
    for i in 0..scenario.tasks {
        let creation = creator
            .create_task(NewTask {
                namespace: template.namespace.clone(),
                template: template.name.clone(),
                version: None,
                trace_parent: None,
                request: TaskRequest {
                    context: json!({ "n": i }),
                    ..TaskRequest::default()
                },
            })
            .await?;
        ids.push(creation.task.id);
    }
    let create_ms = create_started.elapsed().as_secs_f64() * 1000.0;

    // The server as production wires it, its pool started with the clock.
    let settings = Settings {
        bind: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        examples: false,
        // The pool is what is measured: at least one worker.
        workers: workers.max(1),
        ..Settings::default()
    };
    let started = Instant::now();
    let app = App::build_on(&settings, store.clone()).await?;
    let mut finished = app.engine().finished_tasks();
    let done = TaskFilter {
        namespace: Some(template.namespace.clone()),
        template: Some(template.name.clone()),
        states: vec![TaskState::Complete],
        ..TaskFilter::within(tasker_domain::Within::Any)
    };
    // The engine counts the tasks it finished: wait for all of this scenario's.
    let expected = ids.len() as u64;
    while *finished.borrow_and_update() < expected {
        if tokio::time::timeout(Duration::from_secs(120), finished.changed())
            .await
            .is_err()
        {
            bail!(
                "scenario {} stalled: {} of {expected} tasks finished",
                scenario.key,
                *finished.borrow()
            );
        }
    }
    let total = started.elapsed();

    let complete = store.count_tasks(&done).await?;
    if complete != expected {
        bail!(
            "scenario {}: {complete} of {expected} tasks completed",
            scenario.key
        );
    }
    let steps = template.steps.len() * ids.len();
    let (p50, p99) = handoff_latencies(store, &ids).await?;
    // Stops the pool and closes the database.
    app.stop().await?;
    Ok(Measurement {
        backend: backend.to_owned(),
        scenario: scenario.key.to_owned(),
        description: scenario.description.to_owned(),
        tasks: ids.len(),
        steps,
        total_ms: total.as_secs_f64() * 1000.0,
        steps_per_second: steps as f64 / total.as_secs_f64(),
        handoff_p50_ms: p50,
        handoff_p99_ms: p99,
        create_ms,
    })
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
    if latencies.is_empty() {
        return Ok((None, None));
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok((Some(at(0.50)), Some(at(0.99))))
}

/// A fresh database for one scenario, removed afterwards.
struct Database {
    store: Store,
    cleanup: Option<(String, String)>,
}

impl Database {
    async fn sqlite(dir: &std::path::Path, key: &str) -> anyhow::Result<Database> {
        let url = format!("sqlite://{}", dir.join(format!("bench-{key}.db")).display());
        let store = Store::connect(&StoreOptions::new(url), Arc::new(SystemClock)).await?;
        store.migrate().await?;
        Ok(Database {
            store,
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
            cleanup: Some((url.to_owned(), schema)),
        })
    }

    /// Removes the database; the scenario's app closed its store.
    async fn drop(self) -> anyhow::Result<()> {
        if let Some((url, schema)) = self.cleanup {
            let admin = Store::connect(&StoreOptions::new(url), Arc::new(SystemClock)).await?;
            admin.drop_schema(&schema).await?;
            admin.close().await?;
        }
        Ok(())
    }
}
