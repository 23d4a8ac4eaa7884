//! The `tasker` binary: command line, configuration, logging and start-up.

mod bench;
mod otel;

use anyhow::Context as _;
use clap::Parser;
use std::process::ExitCode;
use tasker::App;
use tasker::config::{self, Cli, Command, LogFormat, Settings};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(Command::Schema) = cli.command {
        print!("{}", tasker_api::sdl());
        return Ok(ExitCode::SUCCESS);
    }
    // The client commands need no server settings and have exit codes of their own.
    if let Some(command) = &cli.command
        && let Some(outcome) = tasker::cli::dispatch(command)
    {
        return Ok(tasker::cli::finish(outcome));
    }
    let settings = Settings::load(&cli)?;
    // One TLS crypto provider for the process (the trace exporter's client is built first).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let traces = init_logging(&settings)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let outcome = match cli.command {
        Some(Command::Migrate) => runtime.block_on(migrate(&settings)),
        Some(Command::Serve) | None => runtime.block_on(serve(settings)),
        Some(Command::Bench(args)) => runtime.block_on(bench::run(args)),
        Some(Command::Token(args)) => token(&settings, &args),
        // Answered above.
        Some(_) => Ok(()),
    };
    drop(runtime);
    // The spans still batched go out before the process ends.
    if let Some(traces) = traces
        && let Err(err) = traces.shutdown()
    {
        tracing::warn!(error = %err, "some trace spans could not be exported at the stop");
    }
    outcome?;
    Ok(ExitCode::SUCCESS)
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

/// Logs to stderr (text or JSON), and spans to an OTLP collector when one is configured
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`); returns the trace provider to flush at the end.
fn init_logging(
    settings: &Settings,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_env("TASKER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn"));
    let traces = otel::provider()?;
    // Each layer has its own filter: the database statements' spans go to the trace
    // exporter, not into the log lines.
    let exported = traces
        .as_ref()
        .map(|provider| otel::layer(provider).with_filter(otel::filter()));
    let lines = tracing_subscriber::fmt::layer().with_writer(|| LogWriter(std::io::stderr()));
    let registry = tracing_subscriber::registry().with(exported);
    match settings.log_format {
        LogFormat::Json => registry.with(lines.json().with_filter(filter)).init(),
        LogFormat::Text => registry.with(lines.with_filter(filter)).init(),
    }
    Ok(traces)
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

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = tasker::connect(settings).await?;
    tracing::info!(database = %settings.database_description(), "migrations applied");
    store.close().await?;
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    let app = App::build(&settings).await?;
    let address = app.address();
    tracing::info!(
        %address,
        database = %settings.database_description(),
        "listening; open http://{address}/ for the playground"
    );
    app.serve(shutdown).await
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
