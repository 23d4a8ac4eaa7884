//! `tasker validate` (offline, the domain's own checks) and `tasker apply` (the same checks,
//! then one registration per file).

use super::{Connection, Exit, Failure, Outcome, Output, print_json};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use tasker_domain::{Problem, TaskTemplate};

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    /// Template files (YAML or JSON), or directories of them (searched recursively for
    /// `.yaml`, `.yml` and `.json`).
    #[arg(short = 'f', long = "file", value_name = "FILE|DIR", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Args, Debug, Clone)]
pub struct ApplyArgs {
    /// Template files (YAML or JSON), or directories of them.
    #[arg(short = 'f', long = "file", value_name = "FILE|DIR", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Overwrite a different definition already registered under the same version.
    #[arg(long)]
    pub replace: bool,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub connection: Connection,
}

/// One template file, read and checked.
struct Checked {
    path: PathBuf,
    source: String,
    result: Result<TaskTemplate, Vec<Problem>>,
}

/// `tasker validate`: exit 1 when any file has a problem.
pub fn validate(args: &ValidateArgs) -> Outcome {
    let checked = check_all(&args.files)?;
    let mut failed = false;
    for file in &checked {
        let path = file.path.display().to_string();
        match &file.result {
            Ok(template) => match args.output {
                Output::Text => say!("{:<10} {}  {path}", "VALID", template.key()),
                Output::Json => print_json(
                    &json!({ "file": path, "result": "VALID", "template": template.key() }),
                ),
            },
            Err(problems) => {
                failed = true;
                report_problems(&path, problems, args.output);
            }
        }
    }
    Ok(if failed { Exit::Failed } else { Exit::Success })
}

/// `tasker apply`: checks every file first and registers none when any has a problem; then
/// registers each (one transaction each: a refusal part-way, a `CONFLICT`, leaves the files
/// before it registered) and exits 1 if any registration was refused.
pub async fn apply(args: &ApplyArgs) -> Outcome {
    let checked = check_all(&args.files)?;
    let mut failed = false;
    for file in &checked {
        if let Err(problems) = &file.result {
            failed = true;
            report_problems(&file.path.display().to_string(), problems, args.output);
        }
    }
    if failed {
        complain!("error: nothing was applied: fix the problems above first");
        return Ok(Exit::Failed);
    }
    let client = args.connection.client()?;
    for file in &checked {
        let path = file.path.display().to_string();
        match client.register_template(&file.source, args.replace).await {
            Ok(registration) => match args.output {
                Output::Text => say!(
                    "{:<10} {}  {path}",
                    registration.result.as_str(),
                    registration.template.key
                ),
                Output::Json => print_json(&json!({
                    "file": path,
                    "result": registration.result.as_str(),
                    "template": registration.template.key,
                })),
            },
            // A definition the server refuses (a conflict with what is registered) fails this
            // file; an error about the connection or the token fails the whole command.
            Err(tasker_client::Error::Graphql {
                code,
                message,
                problems,
                ..
            }) if code == "CONFLICT" || code == "VALIDATION_FAILED" => {
                failed = true;
                let problems = if problems.is_empty() {
                    vec![Problem::new("", format!("{code}: {message}"))]
                } else {
                    problems
                        .into_iter()
                        .map(|problem| Problem::new(problem.path, problem.message))
                        .collect()
                };
                report_problems(&path, &problems, args.output);
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(if failed { Exit::Failed } else { Exit::Success })
}

/// A failed file: a `FAILED` result on stdout, and each problem on stderr.
fn report_problems(path: &str, problems: &[Problem], output: Output) {
    match output {
        Output::Text => say!("{:<10} {path}", "FAILED"),
        Output::Json => print_json(&json!({
            "file": path,
            "result": "FAILED",
            "problems": problems
                .iter()
                .map(|problem| json!({ "path": problem.path, "message": problem.message }))
                .collect::<Vec<_>>(),
        })),
    }
    for problem in problems {
        if problem.path.is_empty() {
            complain!("error: {path}: {}", problem.message);
        } else {
            complain!("error: {path}: {}: {}", problem.path, problem.message);
        }
    }
}

/// Reads and checks every template file under `paths`, in a stable order.
fn check_all(paths: &[PathBuf]) -> Result<Vec<Checked>, Failure> {
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files)?;
    }
    if files.is_empty() {
        return Err(Failure::usage(
            "no template files (.yaml, .yml or .json) in the paths given",
        ));
    }
    Ok(files
        .into_iter()
        .map(|path| match std::fs::read_to_string(&path) {
            Ok(source) => {
                let result = TaskTemplate::parse(&source).map_err(|err| match err {
                    tasker_domain::Error::InvalidTemplate(problems) => problems,
                    other => vec![Problem::new("", other.to_string())],
                });
                Checked {
                    path,
                    source,
                    result,
                }
            }
            Err(err) => Checked {
                path,
                source: String::new(),
                result: Err(vec![Problem::new("", format!("cannot read it: {err}"))]),
            },
        })
        .collect())
}

/// A file as given, or a directory's template files (recursively, sorted).
fn collect(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), Failure> {
    let metadata = std::fs::metadata(path)
        .map_err(|err| Failure::usage(format!("{}: {err}", path.display())))?;
    if !metadata.is_dir() {
        files.push(path.to_owned());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|err| Failure::usage(format!("{}: {err}", path.display())))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    entries.sort();
    for entry in entries {
        // Directories are followed only when they are not links (a link back up would loop);
        // linked files are read like any other.
        let is_real_dir = std::fs::symlink_metadata(&entry).is_ok_and(|meta| meta.is_dir());
        if is_real_dir {
            collect(&entry, files)?;
        } else if entry.is_dir() {
            continue;
        } else if entry
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| matches!(ext, "yaml" | "yml" | "json"))
        {
            files.push(entry);
        }
    }
    Ok(())
}
