//! Configuration: command-line flags, each with a `TASKER_*` environment variable, over an
//! optional TOML file, over defaults that need nothing (SQLite under `./tasker-data`,
//! 127.0.0.1:8080).

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "tasker",
    version,
    about = "A GraphQL-first workflow control plane"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// A TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "TASKER_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "TASKER_BIND", global = true)]
    pub bind: Option<SocketAddr>,

    /// Database URL: `postgres://user@host/db` or `sqlite://path/file.db`. Default: a SQLite
    /// file in the data directory.
    #[arg(
        long,
        env = "TASKER_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// Directory for the default SQLite database.
    #[arg(long, env = "TASKER_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// Something to watch: register the demo templates, serve their demo services and start
    /// a task every few seconds (the `http` handler may then reach this server's address).
    #[arg(long, env = "TASKER_DEMO", global = true)]
    pub demo: bool,

    /// Do not register the example templates on an empty database.
    #[arg(long, env = "TASKER_NO_EXAMPLES", global = true)]
    pub no_examples: bool,

    /// Steps the embedded worker pool runs at once (built-in handlers); 0 turns it off.
    #[arg(long, env = "TASKER_WORKERS", global = true)]
    pub workers: Option<usize>,

    /// Lease of the embedded pool's attempts: how soon a step held by a crashed server runs
    /// again elsewhere.
    #[arg(long, env = "TASKER_WORKER_LEASE_SECONDS", global = true)]
    pub worker_lease_seconds: Option<u64>,

    /// On SIGTERM, how long `http` steps in flight may take to finish before their leases are
    /// given back, in seconds (default 10).
    #[arg(long, env = "TASKER_DRAIN_SECONDS", global = true)]
    pub drain_seconds: Option<u64>,

    /// Finished tasks (with their steps, transitions and events) are deleted this many days
    /// after they ended (default 30); 0 keeps everything.
    #[arg(long, env = "TASKER_RETENTION_DAYS", global = true)]
    pub retention_days: Option<u64>,

    /// Log format.
    #[arg(long, env = "TASKER_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,

    /// PostgreSQL connection pool size.
    #[arg(long, env = "TASKER_DB_MAX_CONNECTIONS", global = true)]
    pub db_max_connections: Option<u32>,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "TASKER_MAX_BODY_BYTES", global = true)]
    pub max_body_bytes: Option<usize>,

    /// Longest a query or mutation may run, in seconds.
    #[arg(long, env = "TASKER_REQUEST_TIMEOUT_SECONDS", global = true)]
    pub request_timeout_seconds: Option<u64>,

    /// How long a step may wait to be claimed before `/health/status` reports the server
    /// unhealthy, in seconds (default 300).
    #[arg(long, env = "TASKER_HEALTH_MAX_READY_AGE_SECONDS", global = true)]
    pub health_max_ready_age_seconds: Option<u64>,

    /// Turns authentication on with HS256 tokens signed by this shared secret (32 bytes or
    /// more); `tasker token` mints them.
    #[arg(long, env = "TASKER_JWT_SECRET", global = true, hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Turns authentication on with RS256, ES256 or EdDSA tokens checked by this public key
    /// (a PEM file).
    #[arg(long, env = "TASKER_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,

    /// Turns authentication on with tokens checked by the keys of this JWKS file, chosen by
    /// each token's `kid`.
    #[arg(long, env = "TASKER_JWKS_FILE", global = true)]
    pub jwks_file: Option<PathBuf>,

    /// The `iss` tokens must carry.
    #[arg(long, env = "TASKER_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,

    /// The `aud` tokens must carry.
    #[arg(long, env = "TASKER_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,

    /// Clock skew tolerated on `exp` and `nbf`, in seconds (default 30).
    #[arg(long, env = "TASKER_JWT_LEEWAY_SECONDS", global = true)]
    pub jwt_leeway_seconds: Option<u64>,

    /// Deepest selection nesting an operation may have (default 16).
    #[arg(long, env = "TASKER_MAX_QUERY_DEPTH", global = true)]
    pub max_query_depth: Option<usize>,

    /// Largest operation complexity, each selected field counting 1 (default 2000).
    #[arg(long, env = "TASKER_MAX_QUERY_COMPLEXITY", global = true)]
    pub max_query_complexity: Option<usize>,

    /// Most aliases in one document (default 30).
    #[arg(long, env = "TASKER_MAX_ALIASES", global = true)]
    pub max_aliases: Option<usize>,

    /// Most root fields in one operation (default 10).
    #[arg(long, env = "TASKER_MAX_ROOT_FIELDS", global = true)]
    pub max_root_fields: Option<usize>,

    /// Largest page of tasks a query may ask for (default 100).
    #[arg(long, env = "TASKER_MAX_TASKS_PAGE", global = true)]
    pub max_tasks_page: Option<usize>,

    /// Largest page of events a query may ask for (default 500).
    #[arg(long, env = "TASKER_MAX_EVENTS_PAGE", global = true)]
    pub max_events_page: Option<usize>,

    /// Most tasks one createTasks call may start (default 1000).
    #[arg(long, env = "TASKER_MAX_TASKS_PER_BATCH", global = true)]
    pub max_tasks_per_batch: Option<usize>,

    /// Refuse introspection (`__schema`, `__type`); the playground then cannot explore.
    #[arg(long, env = "TASKER_NO_INTROSPECTION", global = true)]
    pub no_introspection: bool,

    /// WebSocket connections one token may hold open (default 32).
    #[arg(long, env = "TASKER_MAX_CONNECTIONS_PER_TOKEN", global = true)]
    pub max_connections_per_token: Option<usize>,

    /// Subscriptions one token may run at once (default 128).
    #[arg(long, env = "TASKER_MAX_SUBSCRIPTIONS_PER_TOKEN", global = true)]
    pub max_subscriptions_per_token: Option<usize>,

    /// claimSteps calls per second per worker id (default 20, bursts of twice that).
    #[arg(long, env = "TASKER_CLAIMS_PER_SECOND", global = true)]
    pub claims_per_second: Option<f64>,

    /// Serve a non-loopback address without authentication. Anyone who can reach it can
    /// do anything.
    #[arg(long, env = "TASKER_INSECURE_NO_AUTH", global = true)]
    pub insecure_no_auth: bool,

    /// Web origins, besides the server's own, whose pages may call the API (comma-separated,
    /// e.g. `https://dash.example.com`). Browser requests from any other origin get 403.
    #[arg(
        long,
        env = "TASKER_ALLOWED_ORIGINS",
        global = true,
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Host names the server answers to besides `localhost` and IP addresses
    /// (comma-separated; `*.example.com` for subdomains). Checked without authentication
    /// always, with it when given.
    #[arg(
        long,
        env = "TASKER_ALLOWED_HOSTS",
        global = true,
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,

    /// Internal destinations the `http` handler may call (comma-separated host names,
    /// `*.internal`, IP addresses or CIDR networks). Loopback, private, link-local and other
    /// internal addresses are refused otherwise.
    #[arg(long, env = "TASKER_HTTP_ALLOW", global = true, value_delimiter = ',')]
    pub http_allow: Vec<String>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Measure the engine on fresh databases (SQLite; PostgreSQL with --postgres-url).
    Bench(BenchArgs),
    /// Print an HS256 token signed with the configured --jwt-secret.
    Token(TokenArgs),
    /// Register template files with a server: one line per template (CREATED, UNCHANGED,
    /// REPLACED, FAILED); nothing is registered when any file fails the checks.
    Apply(crate::cli::ApplyArgs),
    /// Check template files without a server (for pull requests); exit 1 on any problem.
    Validate(crate::cli::ValidateArgs),
    /// Start a task; with --wait, follow it and exit 0 COMPLETE, 1 ERROR or CANCELLED, 3 on
    /// --timeout.
    Run(crate::cli::RunArgs),
    /// List tasks, newest first.
    Tasks(crate::cli::TasksArgs),
    /// Show a task and its steps as a tree, with states and durations.
    Task(crate::cli::TaskArgs),
    /// Cancel a task and its unfinished steps.
    Cancel(crate::cli::TaskChangeArgs),
    /// Run a failed task again.
    Retry(crate::cli::TaskChangeArgs),
    /// Print the event log, or follow it with --follow.
    Events(crate::cli::EventsArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TokenArgs {
    /// Who the token is for (`sub`).
    #[arg(long, default_value = "tasker-cli")]
    pub subject: String,
    /// Permissions, comma-separated: `tasker.task:show`, `tasker.task:*` or `*`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub permissions: Vec<String>,
    /// Namespaces the token may see, comma-separated; `*` for all.
    #[arg(long, value_delimiter = ',', required = true)]
    pub namespaces: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: i64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Also run on PostgreSQL, in a temporary schema of this database.
    #[arg(long, env = "TASKER_BENCH_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Steps in flight at once in the worker pool.
    #[arg(long, default_value_t = 256)]
    pub workers: usize,
    /// Chains run one after another through the public API (HTTP and the subscription).
    #[arg(long, default_value_t = 200)]
    pub api_tasks: usize,
    /// Tasks in scenarios (c), (f) and (g): more than the default 1,000 make their figures
    /// steadier (a longer measurement) on a noisy machine.
    #[arg(long, default_value_t = 1000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub one_step_tasks: usize,
    /// Finished one-step tasks already in the database when scenario (f) runs (c) again; 0
    /// leaves (f) out.
    #[arg(long, default_value_t = 100_000)]
    pub history_tasks: usize,
}

#[derive(ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The TOML file: the same settings, all optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    bind: Option<SocketAddr>,
    database_url: Option<String>,
    data_dir: Option<PathBuf>,
    examples: Option<bool>,
    demo: Option<bool>,
    workers: Option<usize>,
    worker_lease_seconds: Option<u64>,
    drain_seconds: Option<u64>,
    retention_days: Option<u64>,
    log_format: Option<LogFormat>,
    db_max_connections: Option<u32>,
    max_body_bytes: Option<usize>,
    request_timeout_seconds: Option<u64>,
    health_max_ready_age_seconds: Option<u64>,
    max_query_depth: Option<usize>,
    max_query_complexity: Option<usize>,
    max_aliases: Option<usize>,
    max_root_fields: Option<usize>,
    introspection: Option<bool>,
    max_tasks_page: Option<usize>,
    max_events_page: Option<usize>,
    max_tasks_per_batch: Option<usize>,
    max_connections_per_token: Option<usize>,
    max_subscriptions_per_token: Option<usize>,
    claims_per_second: Option<f64>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<PathBuf>,
    jwks_file: Option<PathBuf>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    jwt_leeway_seconds: Option<u64>,
    insecure_no_auth: Option<bool>,
    allowed_origins: Option<Vec<String>>,
    allowed_hosts: Option<Vec<String>>,
    http_allow: Option<Vec<String>>,
    /// Role name → permission patterns, for tokens that carry `roles`.
    #[serde(default)]
    roles: std::collections::HashMap<String, Vec<String>>,
}

/// The settings in force. `Settings::default()` is the server with no configuration at all
/// (what `cargo run` serves); every default lives here or in the crate that owns the setting.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    /// `None`: a SQLite file in `data_dir`.
    pub database_url: Option<String>,
    pub data_dir: PathBuf,
    pub examples: bool,
    /// Demo templates, services and a trickle of tasks (`--demo`).
    pub demo: bool,
    /// Steps of built-in handlers at once; 0 turns the embedded pool off.
    pub workers: usize,
    pub worker_lease: Duration,
    /// How long steps in flight may take to finish when the server drains.
    pub drain_grace: Duration,
    /// What the retention sweep deletes, and when.
    pub retention: tasker_engine::RetentionPolicy,
    pub log_format: LogFormat,
    pub db_max_connections: u32,
    pub http: tasker_api::HttpLimits,
    /// How tokens are checked; `None`: no key configured.
    pub auth: Option<tasker_api::auth::AuthSettings>,
    pub insecure_no_auth: bool,
    /// Which web pages and host names are served besides the server's own and local ones
    /// (whether `Host` is checked follows from `auth`).
    pub browser: tasker_api::BrowserPolicy,
    /// Where the `http` handler may connect.
    pub outbound: tasker_engine::OutboundPolicy,
}

impl Default for Settings {
    fn default() -> Self {
        let pool = tasker_engine::WorkerPoolConfig::default();
        Settings {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: None,
            data_dir: PathBuf::from("tasker-data"),
            examples: true,
            demo: false,
            workers: pool.concurrency,
            worker_lease: pool.lease,
            drain_grace: pool.drain_grace,
            retention: tasker_engine::RetentionPolicy::default(),
            log_format: LogFormat::default(),
            db_max_connections: tasker_store::StoreOptions::new("").max_connections,
            http: tasker_api::HttpLimits::default(),
            auth: None,
            insecure_no_auth: false,
            browser: tasker_api::BrowserPolicy::local(),
            outbound: tasker_engine::OutboundPolicy::default(),
        }
    }
}

impl Settings {
    pub fn load(cli: &Cli) -> anyhow::Result<Settings> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<FileSettings>(&text)
                    .with_context(|| format!("reading {}", path.display()))?
            }
            None => FileSettings::default(),
        };
        let auth = auth_settings(cli, &file)?;
        let query_defaults = tasker_api::limits::QueryLimits::default();
        let query_limits = tasker_api::limits::QueryLimits {
            max_depth: cli
                .max_query_depth
                .or(file.max_query_depth)
                .unwrap_or(query_defaults.max_depth),
            max_complexity: cli
                .max_query_complexity
                .or(file.max_query_complexity)
                .unwrap_or(query_defaults.max_complexity),
            max_aliases: cli
                .max_aliases
                .or(file.max_aliases)
                .unwrap_or(query_defaults.max_aliases),
            max_root_fields: cli
                .max_root_fields
                .or(file.max_root_fields)
                .unwrap_or(query_defaults.max_root_fields),
            introspection: !cli.no_introspection
                && file.introspection.unwrap_or(query_defaults.introspection),
            max_tasks_page: cli
                .max_tasks_page
                .or(file.max_tasks_page)
                .unwrap_or(query_defaults.max_tasks_page),
            max_events_page: cli
                .max_events_page
                .or(file.max_events_page)
                .unwrap_or(query_defaults.max_events_page),
            max_tasks_per_batch: cli
                .max_tasks_per_batch
                .or(file.max_tasks_per_batch)
                .unwrap_or(query_defaults.max_tasks_per_batch)
                .max(1),
        };
        let quota_defaults = tasker_api::quota::QuotaLimits::default();
        let claims_per_second = cli
            .claims_per_second
            .or(file.claims_per_second)
            .filter(|rate| rate.is_finite() && *rate > 0.0)
            .unwrap_or(quota_defaults.claims_per_second);
        let quota_limits = tasker_api::quota::QuotaLimits {
            connections_per_token: cli
                .max_connections_per_token
                .or(file.max_connections_per_token)
                .unwrap_or(quota_defaults.connections_per_token),
            subscriptions_per_token: cli
                .max_subscriptions_per_token
                .or(file.max_subscriptions_per_token)
                .unwrap_or(quota_defaults.subscriptions_per_token),
            claims_per_second,
            claim_burst: claims_per_second * 2.0,
        };
        let insecure_no_auth = cli.insecure_no_auth || file.insecure_no_auth.unwrap_or(false);
        // A flag or variable replaces the file's list.
        let list = |flag: &Vec<String>, file: &Option<Vec<String>>| {
            if flag.is_empty() {
                file.clone().unwrap_or_default()
            } else {
                flag.clone()
            }
        };
        let browser = tasker_api::BrowserPolicy::new(
            &list(&cli.allowed_origins, &file.allowed_origins),
            &list(&cli.allowed_hosts, &file.allowed_hosts),
        )?;
        let outbound =
            tasker_engine::OutboundPolicy::allowing(&list(&cli.http_allow, &file.http_allow))?;
        let defaults = Settings::default();
        Ok(Settings {
            bind: cli.bind.or(file.bind).unwrap_or(defaults.bind),
            database_url: cli.database_url.clone().or(file.database_url),
            data_dir: cli
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or(defaults.data_dir),
            examples: !cli.no_examples && file.examples.unwrap_or(defaults.examples),
            demo: cli.demo || file.demo.unwrap_or(defaults.demo),
            workers: cli.workers.or(file.workers).unwrap_or(defaults.workers),
            worker_lease: cli
                .worker_lease_seconds
                .or(file.worker_lease_seconds)
                .map_or(defaults.worker_lease, |seconds| {
                    Duration::from_secs(seconds.max(1))
                }),
            drain_grace: cli
                .drain_seconds
                .or(file.drain_seconds)
                .map_or(defaults.drain_grace, Duration::from_secs),
            retention: match cli.retention_days.or(file.retention_days) {
                None => defaults.retention,
                Some(0) => tasker_engine::RetentionPolicy {
                    keep: None,
                    ..defaults.retention
                },
                Some(days) => tasker_engine::RetentionPolicy {
                    keep: Some(Duration::from_secs(days.saturating_mul(24 * 3600))),
                    ..defaults.retention
                },
            },
            log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
            db_max_connections: cli
                .db_max_connections
                .or(file.db_max_connections)
                .unwrap_or(defaults.db_max_connections),
            http: tasker_api::HttpLimits {
                max_body_bytes: cli
                    .max_body_bytes
                    .or(file.max_body_bytes)
                    .unwrap_or(defaults.http.max_body_bytes),
                request_timeout: cli
                    .request_timeout_seconds
                    .or(file.request_timeout_seconds)
                    .map(Duration::from_secs)
                    .unwrap_or(defaults.http.request_timeout),
                query: query_limits,
                quota: quota_limits,
                max_ready_age: cli
                    .health_max_ready_age_seconds
                    .or(file.health_max_ready_age_seconds)
                    .map(Duration::from_secs)
                    .unwrap_or(defaults.http.max_ready_age),
            },
            insecure_no_auth,
            browser,
            outbound,
            auth,
        })
    }

    /// The database URL, creating the data directory for the default SQLite file.
    pub fn database_url(&self) -> anyhow::Result<String> {
        if let Some(url) = &self.database_url {
            return Ok(url.clone());
        }
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating the data directory {}", self.data_dir.display()))?;
        Ok(format!(
            "sqlite://{}",
            self.data_dir.join("tasker.db").display()
        ))
    }

    /// The database for logs: the SQLite path, or the PostgreSQL host and database without
    /// credentials.
    pub fn database_description(&self) -> String {
        match &self.database_url {
            None => format!("sqlite:{}", self.data_dir.join("tasker.db").display()),
            Some(url) => match url.split_once('@') {
                Some((scheme_and_credentials, rest)) => {
                    let scheme = scheme_and_credentials
                        .split_once("://")
                        .map_or("", |(scheme, _)| scheme);
                    format!("{scheme}://{rest}")
                }
                None => url.clone(),
            },
        }
    }
}

/// The key and checks of token authentication, when a key is configured (one of a secret, a
/// public key or a JWKS file).
fn auth_settings(
    cli: &Cli,
    file: &FileSettings,
) -> anyhow::Result<Option<tasker_api::auth::AuthSettings>> {
    use tasker_api::auth::{AuthSettings, KeySource};
    let secret = cli.jwt_secret.clone().or_else(|| file.jwt_secret.clone());
    let public_key = cli
        .jwt_public_key
        .clone()
        .or_else(|| file.jwt_public_key.clone());
    let jwks = cli.jwks_file.clone().or_else(|| file.jwks_file.clone());
    let read =
        |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let key = match (secret, public_key, jwks) {
        (None, None, None) => return Ok(None),
        (Some(secret), None, None) => KeySource::Secret(secret.into_bytes()),
        (None, Some(path), None) => KeySource::PublicKeyPem(read(&path)?),
        (None, None, Some(path)) => KeySource::Jwks(
            String::from_utf8(read(&path)?)
                .with_context(|| format!("{} is not UTF-8 text", path.display()))?,
        ),
        _ => anyhow::bail!("give one of --jwt-secret, --jwt-public-key or --jwks-file"),
    };
    Ok(Some(AuthSettings {
        key,
        issuer: cli.jwt_issuer.clone().or_else(|| file.jwt_issuer.clone()),
        audience: cli
            .jwt_audience
            .clone()
            .or_else(|| file.jwt_audience.clone()),
        leeway_seconds: cli
            .jwt_leeway_seconds
            .or(file.jwt_leeway_seconds)
            .unwrap_or(30),
        roles: file.roles.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("tasker").chain(args.iter().copied())).unwrap()
    }

    /// A TOML file holding `text`, and its path (the directory goes when dropped).
    fn config_file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasker.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap().to_owned();
        (dir, path)
    }

    #[test]
    fn defaults_need_no_configuration() {
        let settings = Settings::load(&parse(&[])).unwrap();
        assert_eq!(settings.bind.to_string(), "127.0.0.1:8080");
        assert!(settings.examples);
        assert_eq!(
            settings.database_description(),
            "sqlite:tasker-data/tasker.db"
        );
    }

    #[test]
    fn flags_win_over_the_file_and_credentials_are_never_shown() {
        let (_dir, config) = config_file(
            "bind = \"127.0.0.1:9000\"\nexamples = false\ndatabase_url = \"postgres://admin:secret@db:5432/tasker\"\n",
        );
        let config = config.as_str();
        let settings = Settings::load(&parse(&["serve", "--config", config])).unwrap();
        assert_eq!(settings.bind.to_string(), "127.0.0.1:9000");
        assert!(!settings.examples);
        assert_eq!(settings.database_description(), "postgres://db:5432/tasker");
        let settings =
            Settings::load(&parse(&["--config", config, "--bind", "127.0.0.1:0"])).unwrap();
        assert_eq!(settings.bind.port(), 0);
    }

    #[test]
    fn allowlists_come_from_flags_or_the_file_and_bad_entries_stop_the_start() {
        let (_dir, config) = config_file(
            "allowed_origins = [\"https://dash.example.com\"]\nhttp_allow = [\"10.0.0.0/8\"]\n",
        );
        let config = config.as_str();
        let from_file = Settings::load(&parse(&["--config", config])).unwrap();
        let expected = tasker_engine::OutboundPolicy::allowing(&["10.0.0.0/8"]).unwrap();
        assert_eq!(from_file.outbound, expected);
        let from_flag = Settings::load(&parse(&[
            "--config",
            config,
            "--http-allow",
            "127.0.0.1,api.internal",
        ]))
        .unwrap();
        let expected =
            tasker_engine::OutboundPolicy::allowing(&["127.0.0.1", "api.internal"]).unwrap();
        assert_eq!(from_flag.outbound, expected);
        let bad_origin = Settings::load(&parse(&["--allowed-origins", "dash.example.com"]));
        assert!(
            bad_origin
                .unwrap_err()
                .to_string()
                .contains("allowed_origins[0]")
        );
        let bad_network = Settings::load(&parse(&["--http-allow", "10.0.0.0/40"]));
        assert!(bad_network.unwrap_err().to_string().contains("10.0.0.0/40"));
    }

    #[test]
    fn unknown_file_settings_are_refused() {
        let (_dir, config) = config_file("bnid = \"127.0.0.1:9000\"\n");
        let cli = parse(&["--config", &config]);
        assert!(Settings::load(&cli).is_err());
    }
}
