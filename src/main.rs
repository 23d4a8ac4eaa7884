//! The `tasker` binary: command line, configuration, logging and start-up.

mod bench;
mod config;

use anyhow::Context as _;
use clap::Parser;
use config::{Cli, Command, LogFormat, Settings};
use std::sync::Arc;
use tasker_engine::{BundledTemplate, Engine, WorkerPoolConfig};
use tasker_store::{Store, StoreOptions};
use tracing_subscriber::EnvFilter;

/// The example templates, registered on first start.
const EXAMPLES: &[BundledTemplate] = &[
    BundledTemplate {
        file: "examples/order_fulfillment.yaml",
        source: include_str!("../examples/order_fulfillment.yaml"),
    },
    BundledTemplate {
        file: "examples/inventory_restock.yaml",
        source: include_str!("../examples/inventory_restock.yaml"),
    },
    BundledTemplate {
        file: "examples/notification_chain.yaml",
        source: include_str!("../examples/notification_chain.yaml"),
    },
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Schema) = cli.command {
        print!("{}", tasker_api::sdl());
        return Ok(());
    }
    let settings = Settings::load(&cli)?;
    init_logging(&settings);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Some(Command::Migrate) => runtime.block_on(migrate(&settings)),
        Some(Command::Serve) | None => runtime.block_on(serve(settings)),
        Some(Command::Bench(args)) => {
            runtime.block_on(bench::run(args.postgres_url, args.json, args.workers))
        }
        Some(Command::Token(args)) => token(&settings, &args),
        Some(Command::Schema) => Ok(()),
    }
}

/// `tasker token`: prints an HS256 token signed with the configured secret.
fn token(settings: &Settings, args: &config::TokenArgs) -> anyhow::Result<()> {
    let Some(tasker_api::auth::AuthSettings {
        key: tasker_api::auth::KeySource::Secret(secret),
        issuer,
        audience,
        ..
    }) = &settings.auth
    else {
        anyhow::bail!(
            "tasker token signs with the shared secret: set --jwt-secret (or TASKER_JWT_SECRET)"
        );
    };
    if args.ttl <= 0 {
        anyhow::bail!("--ttl must be a positive number of seconds");
    }
    let token = tasker_api::auth::mint_token(
        secret,
        &tasker_api::auth::TokenRequest {
            subject: &args.subject,
            permissions: &args.permissions,
            namespaces: &args.namespaces,
            issued_at: chrono::Utc::now().timestamp(),
            ttl_seconds: args.ttl,
            issuer: issuer.as_deref(),
            audience: audience.as_deref(),
        },
    )?;
    println!("{token}");
    Ok(())
}

/// How callers are authenticated: with tokens when a key is configured; without, only on a
/// loopback address unless explicitly told otherwise.
fn auth_mode(settings: &Settings) -> anyhow::Result<tasker_api::auth::AuthMode> {
    use tasker_api::auth::{AuthMode, Authenticator};
    if let Some(auth) = &settings.auth {
        let authenticator = Authenticator::new(auth)?;
        tracing::info!("authentication on: bearer tokens required");
        return Ok(AuthMode::Jwt(Arc::new(authenticator)));
    }
    if settings.bind.ip().is_loopback() {
        tracing::info!(
            "authentication off: no key is configured, so only this machine can connect (set --jwt-secret to turn it on)"
        );
    } else if settings.insecure_no_auth {
        tracing::warn!(
            address = %settings.bind,
            "authentication off beyond loopback (--insecure-no-auth): anyone who can reach this address can use the API"
        );
    } else {
        anyhow::bail!(
            "refusing to serve {} without authentication: configure --jwt-secret, --jwt-public-key or --jwks-file, or pass --insecure-no-auth",
            settings.bind
        );
    }
    Ok(AuthMode::Off)
}

fn init_logging(settings: &Settings) {
    let filter = EnvFilter::try_from_env("TASKER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter(std::io::stderr()));
    match settings.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Standard error for logs, where a failed write (a closed pipe, a full disk) drops the line
/// instead of taking the server down.
struct LogWriter(std::io::Stderr);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A log line that cannot be written is lost; the server keeps serving.
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

async fn connect(settings: &Settings) -> anyhow::Result<Store> {
    let url = settings.database_url()?;
    let mut options = StoreOptions::new(url);
    options.max_connections = settings.db_max_connections;
    let store = Store::connect(&options, Arc::new(tasker_domain::SystemClock))
        .await
        .with_context(|| format!("connecting to {}", settings.database_description()))?;
    store
        .migrate()
        .await
        .context("applying database migrations")?;
    Ok(store)
}

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = connect(settings).await?;
    tracing::info!(database = %settings.database_description(), "migrations applied");
    store.close().await?;
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    let auth = auth_mode(&settings)?;
    let store = connect(&settings).await?;
    if settings.examples {
        let seeded = tasker_engine::seed_templates(&store, EXAMPLES).await?;
        if seeded > 0 {
            tracing::info!(count = seeded, "example templates registered");
        }
    }
    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .with_context(|| format!("binding {}", settings.bind))?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        database = %settings.database_description(),
        "listening; open http://{address}/ for the playground"
    );
    let engine = Engine::new(store.clone());
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut background = Vec::new();
    if settings.workers > 0 {
        let config = WorkerPoolConfig {
            concurrency: settings.workers,
            lease: settings.worker_lease,
            outbound: settings.outbound.clone(),
            ..WorkerPoolConfig::default()
        };
        background.push(tokio::spawn(
            engine.clone().run_workers(config, stopping.clone())?,
        ));
    }
    background.push(tokio::spawn(
        engine.clone().run_maintenance(stopping.clone()),
    ));
    background.push(tokio::spawn(engine.clone().run_listener(stopping)));
    let app = tasker_api::router(
        engine,
        settings.http_limits(),
        auth,
        settings.browser.clone(),
    );
    tasker_api::serve(listener, app, shutdown).await?;
    // Stop claiming, let the batch in hand be recorded, then close the pool.
    let _ = stop.send(true);
    for task in background {
        if let Err(err) = task.await {
            tracing::error!(error = %err, "a background task ended abnormally");
        }
    }
    store.close().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is called,
/// not when the future is first polled, so a signal that arrives while the server is still
/// starting is not lost (nor does it kill the process outright).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(terminate), Ok(interrupt)) => Some((terminate, interrupt)),
            (Err(err), _) | (_, Err(err)) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM and SIGINT");
                None
            }
        }
    };
    async move {
        #[cfg(unix)]
        match signals {
            Some((mut terminate, mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {},
                    _ = interrupt.recv() => {},
                }
            }
            None => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("shutting down: finishing requests in flight");
    }
}
