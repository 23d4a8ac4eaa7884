//! Built-in handlers: steps whose handler is one of these run inside the server.

use serde_json::Value;
use tasker_store::ClaimedStep;

/// The handlers the embedded worker pool serves; any other name is for external workers.
pub const BUILT_IN_HANDLERS: &[&str] = &["noop"];

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Complete(Value),
    Fail {
        message: String,
        retryable: bool,
        retry_after_seconds: Option<f64>,
    },
}

/// Runs a built-in handler that finishes at once (no I/O).
pub fn run_immediate(claimed: &ClaimedStep) -> Outcome {
    match claimed.step.handler.as_str() {
        "noop" => noop(claimed),
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
                return Outcome::Fail {
                    message: "noop: config.fail_attempts must be a whole number".into(),
                    retryable: false,
                    retry_after_seconds: None,
                };
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
