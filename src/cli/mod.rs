//! The command line for CI jobs and people: `apply`, `validate`, `run`, `tasks`, `task`,
//! `cancel`, `retry` and `events`, talking to a server through `tasker-client` (`validate`
//! needs no server).
//!
//! Output is stable (README, "Command line"): results on stdout, one line each (or one JSON
//! object per line with `--output json`); errors on stderr, one line naming the cause. Exit
//! codes: [`Exit`].

/// `println!` for results: a closed stdout (`| head`) ends the command quietly instead of
/// panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}

/// `eprintln!` that cannot panic: a closed stderr loses the line.
macro_rules! complain {
    ($($arg:tt)*) => {
        $crate::cli::write_error(format_args!($($arg)*))
    };
}

mod apply;
mod run;
mod tasks;

use crate::config::Command;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use tasker_client::{Client, Error};

pub use apply::{ApplyArgs, ValidateArgs};
pub use run::RunArgs;
pub use tasks::{EventsArgs, TaskArgs, TaskChangeArgs, TasksArgs};

/// The documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done; with `run --wait`, the task completed.
    Success = 0,
    /// The task failed or was cancelled; a template has problems; the server refused the
    /// change (a conflict).
    Failed = 1,
    /// A usage, authentication or validation error: wrong flags, a token refused, an unknown
    /// template or task, a malformed context.
    Usage = 2,
    /// `--timeout` passed before the task ended, or the server did not answer in time.
    Timeout = 3,
    /// The server cannot be reached or failed (refused connection, unknown host, HTTP 5xx,
    /// `UNAVAILABLE`, `INTERNAL`).
    Unreachable = 4,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// A command that could not do its work: one line for stderr, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            exit: Exit::Usage,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Failure {
        let exit = match &err {
            Error::InvalidServer { .. } => Exit::Usage,
            Error::Unreachable { .. } | Error::Http { .. } | Error::Protocol(_) => {
                Exit::Unreachable
            }
            Error::Timeout(_) => Exit::Timeout,
            Error::Refused(_) => Exit::Usage,
            Error::Graphql { code, .. } => match code.as_str() {
                "CONFLICT" | "LEASE_LOST" => Exit::Failed,
                "UNAVAILABLE" | "INTERNAL" | "RATE_LIMITED" => Exit::Unreachable,
                _ => Exit::Usage,
            },
        };
        let message = match &err {
            Error::Graphql { code, problems, .. } if !problems.is_empty() => {
                let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                format!("{code}: {}", problems.join("; "))
            }
            Error::Graphql { code, message, .. } => format!("{code}: {message}"),
            other => other.to_string(),
        };
        Failure { exit, message }
    }
}

pub type Outcome = Result<Exit, Failure>;

/// How results are printed.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// Lines for people (and `cut`/`awk`).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the server is and who is asking.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// The server's address.
    #[arg(
        long,
        env = "TASKER_SERVER",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL"
    )]
    pub server: String,
    /// A bearer token (when the server has authentication on).
    #[arg(long, env = "TASKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the token (wins over --token).
    #[arg(long, env = "TASKER_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

impl Connection {
    /// The client these flags describe.
    pub fn client(&self) -> Result<Client, Failure> {
        let client = Client::new(&self.server)?;
        let token = match &self.token_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|err| {
                Failure::usage(format!(
                    "cannot read the token file {}: {err}",
                    path.display()
                ))
            })?),
            None => self.token.clone(),
        };
        match token.map(|token| token.trim().to_owned()) {
            Some(token) if token.is_empty() => Err(Failure::usage("the token is empty")),
            Some(token) => Ok(client.with_token(token)),
            None => Ok(client),
        }
    }
}

/// Runs `command` when it is a client command (`None` otherwise): `validate` without a
/// server, the others on a small runtime of their own.
pub fn dispatch(command: &Command) -> Option<Outcome> {
    if let Command::Validate(args) = command {
        return Some(apply::validate(args));
    }
    if !matches!(
        command,
        Command::Apply(_)
            | Command::Run(_)
            | Command::Tasks(_)
            | Command::Task(_)
            | Command::Cancel(_)
            | Command::Retry(_)
            | Command::Events(_)
    ) {
        return None;
    }
    init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return Some(Err(Failure {
                exit: Exit::Unreachable,
                message: format!("cannot start the async runtime: {err}"),
            }));
        }
    };
    Some(runtime.block_on(async {
        match command {
            Command::Apply(args) => apply::apply(args).await,
            Command::Run(args) => run::run(args).await,
            Command::Tasks(args) => tasks::list(args).await,
            Command::Task(args) => tasks::show(args).await,
            Command::Cancel(args) => tasks::change(args, true).await,
            Command::Retry(args) => tasks::change(args, false).await,
            Command::Events(args) => tasks::events(args).await,
            _ => Ok(Exit::Success),
        }
    }))
}

/// The client library's warnings (a subscription resuming after a drop) as short lines on
/// stderr; `TASKER_LOG` changes the filter.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TASKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tasker_client=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}

/// Prints one JSON object as a line of stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string(value) {
        Ok(line) => say!("{line}"),
        Err(err) => complain!("error: cannot print JSON: {err}"),
    }
}

/// Writes a line to stdout. When the reader has gone (a closed pipe) the command stops with
/// 141, the status of a Unix tool killed by SIGPIPE, so a pipeline sees what happened; any
/// other failure to write (a full disk) stops it with 1 and says so.
pub(crate) fn write_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        write_error(format_args!("error: cannot write the output: {err}"));
        std::process::exit(Exit::Failed as i32);
    }
}

/// Writes a line to stderr; a closed stderr loses it.
pub(crate) fn write_error(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stderr = std::io::stderr().lock();
    let _ = stderr
        .write_fmt(line)
        .and_then(|()| stderr.write_all(b"\n"));
}

/// Runs a command's future to its exit code, printing a failure's line on stderr.
pub fn finish(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(exit) => exit.into(),
        Err(failure) => {
            // One line, whatever the cause carried (a proxy's error page, say).
            let message: Vec<&str> = failure.message.split_whitespace().collect();
            complain!("error: {}", message.join(" "));
            failure.exit.into()
        }
    }
}

/// The longest duration a flag takes.
const LONGEST: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Reads a duration: `500ms`, `30s`, `5m`, `2h`, or a number of seconds; at most 30 days.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 30s, 5m or 1h)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ms, s, m or h)"
            ));
        }
    };
    let duration = std::time::Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))?;
    if duration > LONGEST {
        return Err(format!("{text:?} is longer than 30 days"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_read_with_their_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("720h"), Ok(LONGEST));
        for bad in [
            "",
            "0s",
            "-1s",
            "5 days",
            "s",
            "1e400",
            "721h",
            "10000000000000000000",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_errors_map_to_the_documented_exit_codes() {
        let graphql = |code: &str| Error::Graphql {
            code: code.into(),
            message: "m".into(),
            problems: vec![],
            retryable: false,
        };
        let cases = [
            (graphql("VALIDATION_FAILED"), Exit::Usage),
            (graphql("NOT_FOUND"), Exit::Usage),
            (graphql("UNAUTHENTICATED"), Exit::Usage),
            (graphql("FORBIDDEN"), Exit::Usage),
            (graphql("CONFLICT"), Exit::Failed),
            (graphql("UNAVAILABLE"), Exit::Unreachable),
            (
                Error::Unreachable {
                    server: "s".into(),
                    reason: "r".into(),
                },
                Exit::Unreachable,
            ),
            (Error::Timeout(Duration::from_secs(1)), Exit::Timeout),
        ];
        for (error, exit) in cases {
            assert_eq!(Failure::from(error).exit, exit);
        }
    }
}
