//! Built-in handlers: steps whose handler is one of these run inside the server.

use serde_json::Value;
use tasker_store::ClaimedStep;

/// The handlers the embedded worker pool serves; any other name is for external workers.
pub const BUILT_IN_HANDLERS: &[&str] = &["noop", "sleep", "approval", "http"];

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Complete(Value),
    Fail {
        message: String,
        retryable: bool,
        retry_after_seconds: Option<f64>,
    },
    /// Wait without holding a worker: until a time (epoch ms), or for a person's decision.
    Park {
        wake_at_ms: Option<i64>,
    },
}

impl Outcome {
    fn misconfigured(message: String) -> Outcome {
        Outcome::Fail {
            message,
            retryable: false,
            retry_after_seconds: None,
        }
    }
}

/// Runs a built-in handler that finishes at once (no I/O); `http` runs in the background
/// (see `http.rs`).
pub fn run_immediate(claimed: &ClaimedStep) -> Outcome {
    match claimed.step.handler.as_str() {
        "noop" => noop(claimed),
        "sleep" => sleep(claimed),
        "approval" => Outcome::Park { wake_at_ms: None },
        other => Outcome::Fail {
            message: format!("{other:?} is not a built-in handler"),
            retryable: false,
            retry_after_seconds: None,
        },
    }
}

/// Completes with `config.result` (or `{}`); `config.fail_attempts: n` fails the first n
/// attempts, to show retries.
fn noop(claimed: &ClaimedStep) -> Outcome {
    let config = &claimed.step.config;
    let fail_attempts = match config.get("fail_attempts") {
        None | Some(Value::Null) => 0,
        Some(value) => match value.as_u64() {
            Some(n) => n,
            None => {
                return Outcome::misconfigured(
                    "noop: config.fail_attempts must be a whole number".into(),
                );
            }
        },
    };
    let attempt = u64::from(claimed.step.attempts);
    if attempt <= fail_attempts {
        return Outcome::Fail {
            message: format!(
                "noop: attempt {attempt} fails on purpose (config.fail_attempts = {fail_attempts})"
            ),
            retryable: true,
            retry_after_seconds: None,
        };
    }
    Outcome::Complete(
        config
            .get("result")
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default())),
    )
}

/// A durable timer: completes `config.seconds` after the attempt started, holding no worker
/// and no connection meanwhile, and across restarts.
fn sleep(claimed: &ClaimedStep) -> Outcome {
    let Some(seconds) = sleep_seconds(&claimed.step.config) else {
        return Outcome::misconfigured(format!(
            "sleep: config.seconds must be a number of seconds from 0 to {}",
            tasker_domain::template::MAX_SECONDS
        ));
    };
    let started = claimed
        .step
        .attempt_started_at
        .map_or(0, |at| at.timestamp_millis());
    Outcome::Park {
        wake_at_ms: Some(started.saturating_add((seconds * 1000.0).round() as i64)),
    }
}

fn sleep_seconds(config: &Value) -> Option<f64> {
    config
        .get("seconds")
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && (0.0..=tasker_domain::template::MAX_SECONDS).contains(s))
}

/// The results of a sleep that is over: `config.result`, or how long it slept.
pub fn woken_results(config: &Value) -> Value {
    config.get("result").cloned().unwrap_or_else(
        || serde_json::json!({ "slept_seconds": sleep_seconds(config).unwrap_or_default() }),
    )
}
