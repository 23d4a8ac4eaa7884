//! `tasker run`: starts a task and, with `--wait`, follows it over the subscription until it
//! ends, mapping its outcome to the exit code.

use super::{Connection, Exit, Failure, Outcome, Output, parse_duration, print_json};
use clap::Args;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};
use tasker_client::{Client, Event, NewTask, Task, TaskState};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The template: `NAMESPACE/NAME`, or `NAMESPACE/NAME@VERSION` for one version (the
    /// newest otherwise).
    #[arg(value_name = "NAMESPACE/NAME[@VERSION]")]
    pub template: String,
    /// The task's context: JSON, or `@FILE` to read it from a file (`@-` for stdin).
    #[arg(long, value_name = "JSON|@FILE")]
    pub context: Option<String>,
    /// A second run with the same key (in the namespace) returns the first task.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// A tag for the task; repeat for more.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Why the task runs (shown in its history).
    #[arg(long)]
    pub reason: Option<String>,
    /// 1 (low) to 4 (urgent); the template's priority when omitted.
    #[arg(long, value_name = "1-4", value_parser = clap::value_parser!(i32).range(1..=4))]
    pub priority: Option<i32>,
    /// Follow the task until it ends; the exit code says how it ended.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (`30s`, `5m`, `1h`): exit 3. Creation included.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "wait")]
    pub timeout: Option<Duration>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub connection: Connection,
}

pub async fn run(args: &RunArgs) -> Outcome {
    let started = Instant::now();
    let deadline = args
        .timeout
        .and_then(|timeout| started.checked_add(timeout));
    let new_task = new_task(args)?;
    let mut client = args.connection.client()?;
    if let Some(timeout) = args.timeout {
        // A server away for a while (a restart) is waited for as long as the task is.
        client = client.with_reconnect(tasker_client::Reconnect {
            give_up_after: timeout,
            ..tasker_client::Reconnect::default()
        });
    }
    // Following from the log's head as it was before the task existed shows all of its
    // events, its creation included.
    let head = if args.wait {
        Some(within(deadline, client.event_head()).await??)
    } else {
        None
    };
    let created = within(deadline, client.create_task(&new_task)).await??;
    let task = created.task;
    if !args.wait {
        match args.output {
            Output::Text => say!("{}", task.id),
            Output::Json => {
                print_json(&json!({ "type": "created", "created": created.created, "task": task }))
            }
        }
        return Ok(Exit::Success);
    }
    match args.output {
        Output::Text => say!(
            "task {}  {}  {}",
            task.id,
            task.template_key(),
            if created.created {
                "created"
            } else {
                "already existed"
            }
        ),
        Output::Json => {
            print_json(&json!({ "type": "created", "created": created.created, "task": task }))
        }
    }
    let show = Show::new(args.output, &task);
    let ended = within(deadline, follow(&client, &task, head, &show)).await;
    show.finish();
    let elapsed = started.elapsed();
    match ended {
        Ok(Ok(task)) => {
            let exit = exit_of(task.state);
            match args.output {
                Output::Text => say!(
                    "task {}  {}  {} steps done of {}  {:.2} s",
                    task.id,
                    task.state,
                    task.step_counts.unwrap_or_default().done(),
                    task.step_counts.unwrap_or_default().total,
                    elapsed.as_secs_f64()
                ),
                Output::Json => print_json(&json!({
                    "type": "result",
                    "task": task,
                    "exitCode": exit as u8,
                    "elapsedMs": elapsed.as_millis() as u64,
                })),
            }
            Ok(exit)
        }
        Ok(Err(failure)) => Err(failure),
        Err(timed_out) => {
            if args.output == Output::Json {
                print_json(&json!({
                    "type": "timeout",
                    "taskId": task.id,
                    "exitCode": Exit::Timeout as u8,
                    "elapsedMs": elapsed.as_millis() as u64,
                }));
            }
            Err(Failure {
                exit: Exit::Timeout,
                message: format!(
                    "task {} had not ended after {:.1} s ({})",
                    task.id,
                    elapsed.as_secs_f64(),
                    timed_out.0
                ),
            })
        }
    }
}

/// How an ended task's state reads as an exit code.
fn exit_of(state: TaskState) -> Exit {
    match state {
        // Resolved by hand: a person declared it done.
        TaskState::Complete | TaskState::ResolvedManually => Exit::Success,
        _ => Exit::Failed,
    }
}

/// Follows the task until its last update; the task as it ended.
async fn follow(
    client: &Client,
    task: &Task,
    after: Option<String>,
    show: &Show,
) -> Result<Task, Failure> {
    let mut updates = client.follow_task(&task.id, after);
    let mut latest = task.clone();
    while let Some(update) = updates.next().await {
        let update = update?;
        for event in &update.events {
            show.event(event);
        }
        show.progress(&update.task);
        latest = update.task;
        if update.last {
            return Ok(latest);
        }
    }
    if latest.state.has_ended() {
        Ok(latest)
    } else {
        Err(Failure {
            exit: Exit::Unreachable,
            message: format!("the server stopped following task {}", latest.id),
        })
    }
}

/// What `--timeout` cut short.
struct TimedOut(&'static str);

/// Runs `work` until `deadline`.
async fn within<T>(
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = T>,
) -> Result<T, TimedOut> {
    match deadline {
        None => Ok(work.await),
        Some(deadline) => tokio::time::timeout_at(deadline.into(), work)
            .await
            .map_err(|_| TimedOut("--timeout")),
    }
}

impl From<TimedOut> for Failure {
    fn from(timed_out: TimedOut) -> Failure {
        Failure {
            exit: Exit::Timeout,
            message: format!("no task was created before {} passed", timed_out.0),
        }
    }
}

/// The request `run` sends.
fn new_task(args: &RunArgs) -> Result<NewTask, Failure> {
    let (namespace, rest) = args.template.split_once('/').ok_or_else(|| {
        Failure::usage(format!(
            "{:?} is not NAMESPACE/NAME[@VERSION]",
            args.template
        ))
    })?;
    let (name, version) = match rest.split_once('@') {
        Some((name, version)) => (name, Some(version.to_owned())),
        None => (rest, None),
    };
    if namespace.is_empty() || name.is_empty() || version.as_deref() == Some("") {
        return Err(Failure::usage(format!(
            "{:?} is not NAMESPACE/NAME[@VERSION]",
            args.template
        )));
    }
    Ok(NewTask {
        namespace: namespace.to_owned(),
        template: name.to_owned(),
        version,
        context: args.context.as_deref().map(read_context).transpose()?,
        idempotency_key: args.idempotency_key.clone(),
        reason: args.reason.clone(),
        tags: args.tags.clone(),
        priority: args.priority,
        source_system: Some("tasker-cli".into()),
        ..NewTask::default()
    })
}

/// `--context`: inline JSON, or `@file` (`@-`: stdin).
fn read_context(given: &str) -> Result<Value, Failure> {
    let (text, origin) = match given.strip_prefix('@') {
        Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|err| {
                Failure::usage(format!("cannot read the context from stdin: {err}"))
            })?;
            (text, "stdin".to_owned())
        }
        Some(path) => (
            std::fs::read_to_string(path).map_err(|err| {
                Failure::usage(format!("cannot read the context file {path}: {err}"))
            })?,
            format!("the context file {path}"),
        ),
        None => (given.to_owned(), "--context".to_owned()),
    };
    serde_json::from_str(&text)
        .map_err(|err| Failure::usage(format!("{origin} is not valid JSON: {err}")))
}

/// How progress is shown: a bar on a terminal, plain lines otherwise, JSON lines with
/// `--output json`.
enum Show {
    Bar(ProgressBar),
    Lines,
    Json,
}

impl Show {
    fn new(output: Output, task: &Task) -> Show {
        match output {
            Output::Json => Show::Json,
            // The bar is drawn on stderr; lines are for anything else reading stdout.
            Output::Text if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() => {
                let total = task.step_counts.unwrap_or_default().total;
                let bar = ProgressBar::new(u64::from(total));
                let style = ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.enable_steady_tick(Duration::from_millis(120));
                Show::Bar(bar)
            }
            Output::Text => Show::Lines,
        }
    }

    fn event(&self, event: &Event) {
        // Creation notices add nothing to a progress report.
        if matches!(event.name.as_str(), "step.created" | "task.steps_ready") {
            return;
        }
        match self {
            Show::Json => print_json(&json!({ "type": "event", "event": event })),
            Show::Lines => say!("{}", event_line(event)),
            Show::Bar(bar) => {
                if event.name == "step.failed" || event.name == "task.failed" {
                    bar.println(event_line(event));
                }
            }
        }
    }

    fn progress(&self, task: &Task) {
        if let Show::Bar(bar) = self {
            let counts = task.step_counts.unwrap_or_default();
            bar.set_length(u64::from(counts.total));
            bar.set_position(u64::from(counts.done()));
            bar.set_message(format!(
                "{}  running {}  failed {}",
                task.state, counts.in_progress, counts.error
            ));
        }
    }

    fn finish(&self) {
        if let Show::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// One event as a line: time, name, step, then the payload's telling fields.
pub(crate) fn event_line(event: &Event) -> String {
    let step = event.payload["step"].as_str().unwrap_or("-");
    let mut line = format!(
        "{}  {:<26} {step}",
        event.occurred_at.format("%H:%M:%S%.3f"),
        event.name
    );
    for field in ["to_state", "attempt", "duration_ms", "retry_at_ms", "error"] {
        match &event.payload[field] {
            Value::Null => {}
            Value::String(text) => line.push_str(&format!("  {field}={text:?}")),
            other => line.push_str(&format!("  {field}={other}")),
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(template: &str, context: Option<&str>) -> RunArgs {
        RunArgs {
            template: template.into(),
            context: context.map(str::to_owned),
            idempotency_key: None,
            tags: vec![],
            reason: None,
            priority: None,
            wait: false,
            timeout: None,
            output: Output::Text,
            connection: Connection {
                server: "http://127.0.0.1:1".into(),
                token: None,
                token_file: None,
            },
        }
    }

    #[test]
    fn template_references_and_contexts_are_read_or_refused_with_a_reason() {
        let task = new_task(&args("shop/order@1.2.0", Some(r#"{"id": 1}"#))).unwrap();
        assert_eq!(
            (task.namespace.as_str(), task.template.as_str()),
            ("shop", "order")
        );
        assert_eq!(task.version.as_deref(), Some("1.2.0"));
        assert_eq!(task.context, Some(json!({ "id": 1 })));
        assert_eq!(new_task(&args("shop/order", None)).unwrap().version, None);
        for bad in ["order", "/order", "shop/", "shop/order@"] {
            let failure = new_task(&args(bad, None)).unwrap_err();
            assert_eq!(failure.exit, Exit::Usage, "{bad}");
        }
        let failure = new_task(&args("shop/order", Some("{not json"))).unwrap_err();
        assert_eq!(failure.exit, Exit::Usage);
        assert!(failure.message.contains("--context is not valid JSON"));
        let failure = new_task(&args("shop/order", Some("@/no/such/file"))).unwrap_err();
        assert!(
            failure
                .message
                .contains("cannot read the context file /no/such/file")
        );
    }
}
