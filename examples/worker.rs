//! A Rust worker for steps of external handlers, with the `tasker-client` SDK.
//!
//! ```text
//! TASKER_SERVER=http://127.0.0.1:8080 cargo run --example worker
//! ```
//!
//! It runs steps whose handler is `rust.echo`, `rust.flaky` or `rust.slow` (see
//! `examples/workers/rust_diamond.yaml`), four at a time, until Ctrl-C or SIGTERM, then lets
//! running attempts finish for up to ten seconds and gives the rest back. `TASKER_TOKEN`
//! (needs `tasker.worker:claim`) is sent when set.

use serde_json::json;
use std::time::Duration;
use tasker_client::{Client, Lease, StepError, Worker};

/// Returns what it was given: the task's context and its parents' results.
async fn echo(lease: Lease) -> Result<serde_json::Value, StepError> {
    Ok(json!({
        "echo": lease.context,
        "parents": lease.parent_results,
        "attempt": lease.attempt,
    }))
}

/// Fails (retryably, again in 200 ms) until attempt `succeed_on_attempt` (default 2).
async fn flaky(lease: Lease) -> Result<serde_json::Value, StepError> {
    let succeed_on = lease.config["succeed_on_attempt"].as_u64().unwrap_or(2);
    if u64::from(lease.attempt) < succeed_on {
        return Err(StepError::retry_after(
            format!("flaky by design: attempt {} of {succeed_on}", lease.attempt),
            Duration::from_millis(200),
        ));
    }
    Ok(json!({ "succeeded_on_attempt": lease.attempt }))
}

/// Sleeps `seconds` (default 1); the worker's heartbeats keep the lease meanwhile.
async fn slow(lease: Lease) -> Result<serde_json::Value, StepError> {
    let seconds = lease.config["seconds"]
        .as_f64()
        .unwrap_or(1.0)
        .clamp(0.0, 3600.0);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    Ok(json!({ "slept": seconds }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TASKER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let server = std::env::var("TASKER_SERVER").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let mut client = Client::new(&server)?;
    if let Ok(token) = std::env::var("TASKER_TOKEN") {
        client = client.with_token(token);
    }
    let worker_id = format!("rust-example-{}", std::process::id());
    let worker = Worker::builder(client, worker_id)
        .handler("rust.echo", echo)
        .handler("rust.flaky", flaky)
        .handler("rust.slow", slow)
        .concurrency(4)
        .lease(Duration::from_secs(30))
        .grace(Duration::from_secs(10))
        .build()?;
    let report = worker.run(stop_signal()).await?;
    println!(
        "completed {} failed {} released {} lost {}",
        report.completed, report.failed, report.released, report.lost
    );
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
