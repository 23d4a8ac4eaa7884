//! A server per test on its own database, and a small GraphQL client.

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tasker::config::Settings;
use tasker_api::auth::AuthSettings;
use tasker_domain::SystemClock;
use tasker_engine::Engine;
use tasker_store::testing::TestDatabase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub const DIAMOND: &str = r#"
namespace: shop
name: fulfil
version: 1.0.0
context_schema:
  type: object
  required: [order_id]
  properties: { order_id: { type: integer } }
steps:
  - { name: validate, handler: noop }
  - { name: reserve, handler: noop, depends_on: [validate] }
  - { name: charge, handler: noop, depends_on: [validate] }
  - { name: ship, handler: noop, depends_on: [reserve, charge] }
"#;

/// A running server; stopped (and its database dropped) at the end of the test.
pub struct TestServer {
    pub address: SocketAddr,
    pub engine: Arc<Engine>,
    pub db: TestDatabase,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// The settings of a test server: production's defaults, on a free port, without the
    /// example templates and without the embedded worker pool (steps stay where the test puts
    /// them).
    pub fn settings() -> Settings {
        Settings {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            examples: false,
            workers: 0,
            ..Settings::default()
        }
    }

    /// One server per backend under test.
    pub async fn all() -> Vec<TestServer> {
        let mut servers = Vec::new();
        for db in TestDatabase::all(Arc::new(SystemClock)).await {
            servers.push(Self::start(db).await);
        }
        servers
    }

    /// A server with the test settings.
    pub async fn start(db: TestDatabase) -> TestServer {
        Self::start_with(db, Self::settings()).await
    }

    /// A server that requires bearer tokens checked with `auth`.
    pub async fn start_secured(db: TestDatabase, auth: AuthSettings) -> TestServer {
        Self::start_limited(db, auth, Default::default()).await
    }

    /// A server that requires bearer tokens, with these limits.
    pub async fn start_limited(
        db: TestDatabase,
        auth: AuthSettings,
        limits: tasker_api::HttpLimits,
    ) -> TestServer {
        Self::start_with_browser(db, Some(auth), limits, &[], &[]).await
    }

    /// A server with these allowlists of web origins and host names.
    pub async fn start_with_browser(
        db: TestDatabase,
        auth: Option<AuthSettings>,
        limits: tasker_api::HttpLimits,
        origins: &[&str],
        hosts: &[&str],
    ) -> TestServer {
        let browser = tasker_api::BrowserPolicy::new(origins, hosts).unwrap();
        let settings = Settings {
            auth,
            http: limits,
            browser,
            ..Self::settings()
        };
        Self::start_with(db, settings).await
    }

    /// A server whose embedded worker pool runs built-in steps; its `http` handler reaches
    /// only public addresses.
    pub async fn start_running(db: TestDatabase) -> TestServer {
        Self::start_running_allowing(db, &[]).await
    }

    /// A server whose embedded worker pool runs built-in steps; its `http` handler may also
    /// reach these hosts and networks.
    pub async fn start_running_allowing(db: TestDatabase, allowed: &[&str]) -> TestServer {
        let settings = Settings {
            workers: tasker_engine::WorkerPoolConfig::default().concurrency,
            outbound: tasker_engine::OutboundPolicy::allowing(allowed).unwrap(),
            ..Self::settings()
        };
        Self::start_with(db, settings).await
    }

    /// A server built by the application's own composition root over the test's database.
    pub async fn start_with(db: TestDatabase, settings: Settings) -> TestServer {
        let app = tasker::App::build_on(&settings, db.store.clone())
            .await
            .expect("the server starts");
        let address = app.address();
        let engine = app.engine().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(async move {
            let _ = stopped.await;
        }));
        TestServer {
            address,
            engine,
            db,
            client: http_client(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn backend(&self) -> &'static str {
        self.db.backend()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    /// Sends one GraphQL operation; returns the whole response body.
    pub async fn graphql(&self, query: &str, variables: Value) -> Value {
        let response = self
            .client
            .post(self.url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 200, "{}", self.backend());
        response.json().await.expect("a JSON body")
    }

    /// Task `id` as `query` (taking `$id` and selecting `task { state … }`) reads it once it
    /// has finished; woken by the engine when tasks finish, for 30 s at most.
    pub async fn finished_task(&self, query: &str, id: &Value) -> Value {
        let mut finished = self.engine.finished_tasks();
        loop {
            let task = self.data(query, json!({ "id": id })).await["task"].clone();
            if !matches!(task["state"].as_str(), Some("PENDING" | "IN_PROGRESS")) {
                return task;
            }
            tokio::time::timeout(std::time::Duration::from_secs(30), finished.changed())
                .await
                .unwrap_or_else(|_| panic!("the task never finished: {task:#}"))
                .unwrap();
        }
    }

    /// The `data` of an operation that must succeed.
    pub async fn data(&self, query: &str, variables: Value) -> Value {
        let body = self.graphql(query, variables).await;
        assert!(
            body.get("errors").is_none(),
            "{}: unexpected errors: {body:#}",
            self.backend()
        );
        body["data"].clone()
    }

    /// The data of a read, and the statements it cost: the fewest of three runs, since the
    /// engine's background loops may run meanwhile and count their own.
    pub async fn data_with_statements(&self, query: &str, variables: Value) -> (Value, u64) {
        let mut statements = u64::MAX;
        let mut data = Value::Null;
        for _ in 0..3 {
            let before = self.db.store.statement_count();
            data = self.data(query, variables.clone()).await;
            statements = statements.min(self.db.store.statement_count() - before);
        }
        (data, statements)
    }

    /// The first error of an operation that must fail: its code and the whole error.
    pub async fn error(&self, query: &str, variables: Value) -> (String, Value) {
        let body = self.graphql(query, variables).await;
        let error = body["errors"][0].clone();
        assert!(
            error.is_object(),
            "{}: expected an error: {body:#}",
            self.backend()
        );
        let code = error["extensions"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("an error without a code: {error:#}"))
            .to_owned();
        (code, error)
    }

    pub async fn register(&self, definition: &str) -> Value {
        self.data(
            "mutation($d: String!) { registerTemplate(input: { definition: $d }) { result template { id key } } }",
            json!({ "d": definition }),
        )
        .await["registerTemplate"]
            .clone()
    }

    pub async fn create_task(&self, input: Value) -> Value {
        self.data(
            "mutation($i: CreateTaskInput!) { createTask(input: $i) { created task { id state } } }",
            json!({ "i": input }),
        )
        .await["createTask"]
            .clone()
    }

    /// Claims up to `limit` steps of `handler` as worker `w`; their lease tokens.
    pub async fn claim(&self, handler: &str, limit: u32) -> Vec<Value> {
        let claimed = self
            .data(
                "mutation($h: String!, $n: Int!) { claimSteps(input: { workerId: \"w\", handlers: [$h], limit: $n }) { leases { leaseToken } } }",
                json!({ "h": handler, "n": limit }),
            )
            .await;
        claimed["claimSteps"]["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|lease| lease["leaseToken"].clone())
            .collect()
    }

    /// Completes the step a lease holds (the answer must be free of errors).
    pub async fn complete(&self, lease_token: &Value) {
        self.data(
            "mutation($t: ID!) { completeStep(input: { leaseToken: $t }) { step { state } } }",
            json!({ "t": lease_token }),
        )
        .await;
    }

    /// The cursors of a task's events as the log has them (at most 500).
    pub async fn event_cursors(&self, task_id: &Value) -> Vec<String> {
        let page = self
            .data(
                "query($f: EventFilterInput) { events(filter: $f, first: 500) { edges { cursor } } }",
                json!({ "f": { "taskId": task_id } }),
            )
            .await;
        page["events"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|edge| edge["cursor"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An HTTP client for the tests; TLS (unused on loopback) needs the process's crypto provider.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A TCP proxy in front of the server that the test can cut (every connection through it
/// drops at once and new ones are refused until it is restored, as when a network drops) and
/// that can refuse WebSocket upgrades (as some corporate proxies do).
pub struct Proxy {
    address: SocketAddr,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start(target: SocketAddr, refuse_websockets: bool) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tracked = connections.clone();
        let refusing = down.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let handle = tokio::spawn(async move {
                    // The request head, to see whether it asks for a WebSocket.
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match inbound.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    if refuse_websockets && text.contains("upgrade: websocket") {
                        let _ = inbound
                            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    if outbound.write_all(&head).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                tracked.lock().unwrap().push(handle.abort_handle());
            }
        });
        Proxy {
            address,
            connections,
            down,
        }
    }

    /// Drops every connection open through the proxy and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}
