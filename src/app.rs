//! The composition root: one place that turns [`Settings`] into a running server — database,
//! migrations, example templates, engine, background tasks, HTTP router and listener. `main`,
//! the end-to-end tests and the benchmark all start the server through [`App`], so what they
//! run is what production runs.

use crate::config::Settings;
use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::Arc;
use tasker_api::auth::{AuthMode, Authenticator};
use tasker_engine::{BundledTemplate, Engine, WorkerPoolConfig};
use tasker_store::{Store, StoreOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a stop waits for WebSocket connections to close after draining.
const WEBSOCKETS_CLOSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The example templates, registered on first start.
const EXAMPLES: &[BundledTemplate] = &[
    bundled!("examples/order_fulfillment.yaml"),
    bundled!("examples/inventory_restock.yaml"),
    bundled!("examples/notification_chain.yaml"),
];

/// A server, wired and listening, its background tasks running; [`App::serve`] answers
/// requests until told to stop.
pub struct App {
    address: SocketAddr,
    store: Store,
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: watch::Sender<bool>,
    background: Vec<JoinHandle<()>>,
}

impl App {
    /// Checks the authentication settings (before touching the database: a refused
    /// configuration migrates nothing), connects to the configured database and migrates it,
    /// then wires the server as [`App::build_on`] does.
    pub async fn build(settings: &Settings) -> anyhow::Result<App> {
        let auth = auth_mode(settings)?;
        let store = connect(settings).await?;
        Self::wire(settings, store, auth).await
    }

    /// Wires a server over a connected, migrated store (tests and benchmarks bring their
    /// own): checks the authentication settings, registers the examples on an empty
    /// database, binds the address, starts the engine's background tasks.
    pub async fn build_on(settings: &Settings, store: Store) -> anyhow::Result<App> {
        let auth = auth_mode(settings)?;
        Self::wire(settings, store, auth).await
    }

    async fn wire(settings: &Settings, store: Store, auth: AuthMode) -> anyhow::Result<App> {
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
        let engine = Engine::new(store.clone());
        let (stop, stopping) = watch::channel(false);
        let mut background = Vec::new();
        let mut outbound = settings.outbound.clone();
        if settings.demo {
            tasker_engine::register_bundled(&store, crate::demo::TEMPLATES).await?;
            // The demo's http steps call this server; 0.0.0.0 is reached over loopback.
            let own = if address.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], address.port()))
            } else {
                address
            };
            outbound = outbound.also_allowing(own.ip());
            tracing::warn!(address = %own.ip(), "demo: the http handler may reach this server's address");
            background.push(tokio::spawn(crate::demo::trickle(
                engine.clone(),
                format!("http://{own}/demo"),
                crate::demo::EVERY,
                stopping.clone(),
            )));
        }
        if settings.workers > 0 {
            let pool = WorkerPoolConfig {
                concurrency: settings.workers,
                lease: settings.worker_lease,
                outbound,
                drain_grace: settings.drain_grace,
                ..WorkerPoolConfig::default()
            };
            background.push(tokio::spawn(
                engine.clone().run_workers(pool, stopping.clone())?,
            ));
        }
        background.push(tokio::spawn(
            engine.clone().run_maintenance(stopping.clone()),
        ));
        background.push(tokio::spawn(
            engine
                .clone()
                .run_retention(settings.retention.clone(), stopping.clone()),
        ));
        background.push(tokio::spawn(engine.clone().run_listener(stopping)));
        let demo_routes = if settings.demo {
            crate::demo::routes()
        } else {
            axum::Router::new()
        };
        let router = tasker_api::router(
            engine.clone(),
            settings.http.clone(),
            auth,
            settings.browser.clone(),
            demo_routes,
        );
        Ok(App {
            address,
            store,
            engine,
            listener,
            router,
            stop,
            background,
        })
    }

    /// Where the server listens (the real port when the settings said 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Serves until `shutdown` resolves, lets requests in flight finish, stops the
    /// background tasks (the batch in hand is recorded) and closes the database.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let App {
            listener,
            router,
            store,
            engine,
            stop,
            background,
            ..
        } = self;
        // Told to stop, the server first drains: it claims nothing more, parked claims answer
        // empty and subscriptions complete (their clients resume elsewhere), readiness fails;
        // then it stops accepting, finishes the requests in flight, and the pool gets its
        // grace for the steps it runs.
        let draining = engine.clone();
        let drained = async move {
            shutdown.await;
            tracing::info!("draining: no more claims; subscriptions complete");
            draining.drain();
        };
        tasker_api::serve(listener, router, drained).await?;
        // WebSockets are not requests the graceful shutdown waits for: they close themselves
        // once their last messages are out.
        if !engine.connections_closed(WEBSOCKETS_CLOSE_WITHIN).await {
            tracing::warn!("some WebSocket connections were still open at the stop");
        }
        stop_background(stop, background, store).await
    }

    /// Stops the background tasks (the batch in hand is recorded) and closes the database,
    /// without serving: for a caller that only wanted the engine running (the benchmark).
    pub async fn stop(self) -> anyhow::Result<()> {
        stop_background(self.stop, self.background, self.store).await
    }
}

async fn stop_background(
    stop: watch::Sender<bool>,
    background: Vec<JoinHandle<()>>,
    store: Store,
) -> anyhow::Result<()> {
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

/// Connects to the configured database and applies the migrations.
pub async fn connect(settings: &Settings) -> anyhow::Result<Store> {
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

/// How callers are authenticated: with tokens when a key is configured; without, only on a
/// loopback address unless explicitly told otherwise.
fn auth_mode(settings: &Settings) -> anyhow::Result<AuthMode> {
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
