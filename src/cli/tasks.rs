//! `tasker tasks`, `tasker task ID` (its steps as a tree), `tasker cancel`, `tasker retry`
//! and `tasker events [--follow]`.

use super::run::event_line;
use super::{Connection, Exit, Failure, Outcome, Output, print_json};
use clap::Args;
use futures::StreamExt as _;
use std::collections::HashMap;
use tasker_client::{EventFilter, Step, Task, TaskFilter, TaskState};

#[derive(Args, Debug, Clone)]
pub struct TasksArgs {
    #[arg(long)]
    pub namespace: Option<String>,
    /// The template's name.
    #[arg(long)]
    pub template: Option<String>,
    /// Only tasks in this state (`complete`, `error`, `in_progress`, …); repeat for more.
    #[arg(long = "state", value_name = "STATE", value_parser = parse_state)]
    pub states: Vec<TaskState>,
    /// Only tasks with every one of these tags.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// How many tasks (newest first).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// The page after this cursor (printed on stderr when more tasks match).
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug, Clone)]
pub struct TaskArgs {
    /// The task's id.
    pub id: String,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug, Clone)]
pub struct TaskChangeArgs {
    /// The task's id.
    pub id: String,
    /// Why (kept in the task's history).
    #[arg(long)]
    pub reason: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug, Clone)]
pub struct EventsArgs {
    /// Keep following new events as they commit (resuming after a dropped connection).
    #[arg(long)]
    pub follow: bool,
    /// Start after this cursor: from the beginning of the log without it, or from now with
    /// `--follow`.
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
    /// Only this task's events.
    #[arg(long, value_name = "ID")]
    pub task: Option<String>,
    /// Only events of this namespace; repeat for more.
    #[arg(long = "namespace", value_name = "NAMESPACE")]
    pub namespaces: Vec<String>,
    /// Only events with this name (`task.completed`, `step.failed`, …); repeat for more.
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// Without --follow: how many events to print.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub connection: Connection,
}

fn parse_state(text: &str) -> Result<TaskState, String> {
    let upper = text.trim().to_ascii_uppercase().replace('-', "_");
    serde_json::from_value::<TaskState>(serde_json::Value::String(upper))
        .ok()
        .filter(|state| *state != TaskState::Unknown)
        .ok_or_else(|| {
            format!(
                "{text:?} is not a task state (pending, in_progress, complete, error, cancelled, resolved_manually)"
            )
        })
}

/// `tasker tasks`: one line per task, newest first.
pub async fn list(args: &TasksArgs) -> Outcome {
    let client = args.connection.client()?;
    let filter = TaskFilter {
        namespace: args.namespace.clone(),
        template: args.template.clone(),
        states: args.states.clone(),
        tags: args.tags.clone(),
    };
    let page = client
        .tasks(&filter, args.limit, args.after.as_deref())
        .await?;
    if args.output == Output::Text && !page.tasks.is_empty() {
        say!(
            "{:<36}  {:<17}  {:<7}  {:<24}  TEMPLATE",
            "ID",
            "STATE",
            "STEPS",
            "CREATED"
        );
    }
    for task in &page.tasks {
        match args.output {
            Output::Text => {
                let counts = task.step_counts.unwrap_or_default();
                say!(
                    "{:<36}  {:<17}  {:<7}  {:<24}  {}",
                    task.id,
                    task.state.as_str(),
                    format!("{}/{}", counts.done(), counts.total),
                    task.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    task.template_key()
                );
            }
            Output::Json => print_json(task),
        }
    }
    if let Some(cursor) = &page.next_cursor {
        complain!(
            "{} of {} shown; more with --after {cursor}",
            page.tasks.len(),
            page.total_count
        );
    }
    Ok(Exit::Success)
}

/// `tasker task ID`: the task, then its steps as a tree.
pub async fn show(args: &TaskArgs) -> Outcome {
    let client = args.connection.client()?;
    let task = client.task(&args.id).await?;
    if args.output == Output::Json {
        print_json(&task);
        return Ok(Exit::Success);
    }
    let counts = task.step_counts.unwrap_or_default();
    say!("task       {}", task.id);
    say!("template   {}", task.template_key());
    say!(
        "state      {}  ({} of {} steps done)",
        task.state,
        counts.done(),
        counts.total
    );
    say!("created    {}", task.created_at.to_rfc3339());
    if let Some(completed) = task.completed_at {
        say!("completed  {}", completed.to_rfc3339());
    }
    if !task.tags.is_empty() {
        say!("tags       {}", task.tags.join(", "));
    }
    say!("steps");
    for line in step_tree(&task) {
        say!("{line}");
    }
    Ok(Exit::Success)
}

/// The steps as a tree in template order: a step sits under the last of its parents (the one
/// it waited for longest in the template's order), with its other parents named.
fn step_tree(task: &Task) -> Vec<String> {
    let position: HashMap<&str, usize> = task
        .steps
        .iter()
        .enumerate()
        .map(|(index, step)| (step.id.as_str(), index))
        .collect();
    let mut parents: HashMap<usize, Vec<usize>> = HashMap::new();
    for edge in &task.edges {
        if let (Some(&parent), Some(&child)) = (
            position.get(edge.parent_id.as_str()),
            position.get(edge.child_id.as_str()),
        ) {
            parents.entry(child).or_default().push(parent);
        }
    }
    let mut children: HashMap<Option<usize>, Vec<usize>> = HashMap::new();
    for index in 0..task.steps.len() {
        let under = parents.get_mut(&index).and_then(|list| {
            list.sort_unstable();
            list.last().copied()
        });
        children.entry(under).or_default().push(index);
    }
    let name_width = task
        .steps
        .iter()
        .map(|step| step.name.chars().count())
        .max()
        .unwrap_or(0)
        + 2 * depth_bound(task.steps.len());
    let mut lines = Vec::with_capacity(task.steps.len());
    // Iterative depth-first walk: (step, prefix for its children, its own branch).
    let mut stack: Vec<(usize, String, String)> = children
        .get(&None)
        .into_iter()
        .flatten()
        .rev()
        .map(|&root| (root, String::new(), String::new()))
        .collect();
    while let Some((index, prefix, branch)) = stack.pop() {
        let step = &task.steps[index];
        let label = format!("{prefix}{branch}{}", step.name);
        let mut line = format!(
            "  {label:<name_width$}  {:<17}  {}",
            step.state.as_str(),
            step_detail(step)
        );
        let others: Vec<&str> = parents
            .get(&index)
            .map(|list| {
                list.iter()
                    .rev()
                    .skip(1)
                    .rev()
                    .map(|&parent| task.steps[parent].name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        if !others.is_empty() {
            line.push_str(&format!("  (also after {})", others.join(", ")));
        }
        lines.push(line.trim_end().to_owned());
        let kids = children.get(&Some(index)).cloned().unwrap_or_default();
        let child_prefix = match branch.as_str() {
            "" => prefix.clone(),
            "└─ " => format!("{prefix}   "),
            _ => format!("{prefix}│  "),
        };
        for (position, &kid) in kids.iter().enumerate().rev() {
            let branch = if position + 1 == kids.len() {
                "└─ "
            } else {
                "├─ "
            };
            stack.push((kid, child_prefix.clone(), branch.to_owned()));
        }
    }
    lines
}

/// Room for the tree's indentation (capped so a deep chain does not push columns away).
fn depth_bound(steps: usize) -> usize {
    steps.min(8) * 3 / 2
}

/// Attempts, duration and the last error of a step.
fn step_detail(step: &Step) -> String {
    let mut detail = format!("attempt {}/{}", step.attempts, step.max_attempts);
    if let Some(ms) = step.duration_ms {
        detail.push_str(&format!("  {ms} ms"));
    }
    if let Some(error) = &step.last_error {
        let error: String = error.chars().take(120).collect();
        detail.push_str(&format!("  error: {error}"));
    }
    detail
}

/// `tasker cancel ID` and `tasker retry ID`.
pub async fn change(args: &TaskChangeArgs, cancel: bool) -> Outcome {
    let client = args.connection.client()?;
    let reason = args.reason.as_deref();
    let task = if cancel {
        client.cancel_task(&args.id, reason).await?
    } else {
        client.retry_task(&args.id, reason).await?
    };
    match args.output {
        Output::Text => say!("{}  {}", task.id, task.state),
        Output::Json => print_json(&task),
    }
    Ok(Exit::Success)
}

/// `tasker events`: a page of the log, or with `--follow` the log as it grows.
pub async fn events(args: &EventsArgs) -> Outcome {
    let client = args.connection.client()?;
    let filter = EventFilter {
        namespaces: args.namespaces.clone(),
        task_id: args.task.clone(),
        names: args.names.clone(),
    };
    let print = |event: &tasker_client::Event| match args.output {
        Output::Text => say!("{}  cursor={}", event_line(event), event.cursor),
        Output::Json => print_json(event),
    };
    if !args.follow {
        let page = client
            .events(&filter, args.limit, args.after.as_deref())
            .await?;
        for event in &page.events {
            print(event);
        }
        if page.has_next_page
            && let Some(cursor) = &page.end_cursor
        {
            complain!("more with --after {cursor}");
        }
        return Ok(Exit::Success);
    }
    let mut events = client.follow_events(&filter, args.after.clone());
    while let Some(event) = events.next().await {
        print(&event?);
    }
    Err(Failure {
        exit: Exit::Unreachable,
        message: "the server ended the event stream".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasker_client::{Edge, StepState};

    fn step(id: &str, state: StepState) -> Step {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "handler": "noop", "state": state, "attempts": 1,
            "maxAttempts": 3, "durationMs": 5
        }))
        .unwrap()
    }

    #[test]
    fn a_diamond_prints_as_a_tree_with_the_join_under_its_last_parent() {
        let mut task: Task = serde_json::from_value(serde_json::json!({
            "id": "t", "namespace": "n", "templateName": "x", "templateVersion": "1.0.0",
            "state": "COMPLETE", "createdAt": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        task.steps = ["validate", "reserve", "charge", "ship"]
            .map(|name| step(name, StepState::Complete))
            .to_vec();
        let edge = |parent: &str, child: &str| Edge {
            parent_id: parent.into(),
            child_id: child.into(),
        };
        task.edges = vec![
            edge("validate", "reserve"),
            edge("validate", "charge"),
            edge("reserve", "ship"),
            edge("charge", "ship"),
        ];
        let lines = step_tree(&task);
        let names: Vec<&str> = lines
            .iter()
            .map(|line| line.split("  COMPLETE").next().unwrap().trim_end())
            .collect();
        assert_eq!(
            names,
            ["  validate", "  ├─ reserve", "  └─ charge", "     └─ ship"]
        );
        assert!(lines[3].ends_with("(also after reserve)"), "{}", lines[3]);
        assert!(lines[0].contains("attempt 1/3  5 ms"));
    }

    #[test]
    fn states_read_in_any_case() {
        assert_eq!(parse_state("in_progress"), Ok(TaskState::InProgress));
        assert_eq!(parse_state("COMPLETE"), Ok(TaskState::Complete));
        assert!(parse_state("done").is_err());
    }
}
