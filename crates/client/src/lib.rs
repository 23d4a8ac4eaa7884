//! A typed client for Tasker's GraphQL API, and the Rust worker SDK.
//!
//! [`Client`] sends queries and mutations over HTTP and follows subscriptions over
//! `graphql-transport-ws`, resuming from the last cursor after a dropped connection
//! ([`Client::follow_task`], [`Client::follow_events`]). Every failure is an [`Error`]; one
//! the server reported carries its stable `extensions.code`. [`Worker`] runs handlers for
//! steps of external handlers: a claim loop with bounded concurrency, heartbeats, outcomes,
//! and a graceful stop that releases what it cannot finish.
//!
//! ```no_run
//! # async fn example() -> Result<(), tasker_client::Error> {
//! use tasker_client::{Client, NewTask, TaskState};
//! let client = Client::new("http://127.0.0.1:8080")?;
//! let created = client
//!     .create_task(&NewTask::new("shop", "order_fulfillment"))
//!     .await?;
//! assert_eq!(created.task.state, TaskState::Pending);
//! # Ok(()) }
//! ```

mod error;
mod operations;
mod subscription;
mod types;
mod worker;

pub use error::{Error, Problem, Result};
pub use operations::Claim;
pub use subscription::{Follow, Reconnect};
pub use types::*;
pub use worker::{Handler, StepError, StopReport, Worker, WorkerBuilder};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// How long a query or mutation may take unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one Tasker server: cheap to clone (clones share the HTTP connection pool).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `http(s)://host:port/graphql`
    endpoint: reqwest::Url,
    /// `ws(s)://host:port/graphql`
    ws_endpoint: reqwest::Url,
    token: Option<String>,
    timeout: Duration,
    reconnect: Reconnect,
    /// The TLS setup of `wss://` subscriptions, made on first use.
    tls: Arc<std::sync::OnceLock<Arc<rustls::ClientConfig>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        f.debug_struct("Client")
            .field("endpoint", &self.inner.endpoint.as_str())
            .field("authenticated", &self.inner.token.is_some())
            .finish()
    }
}

impl Client {
    /// A client of the server at `server`: `http://host:port` (or `https://…`, or a bare
    /// `host:port`); a path ending in `/graphql` is accepted too.
    pub fn new(server: &str) -> Result<Client> {
        Self::build(server)
    }

    /// The same server, sending `token` as `Authorization: Bearer …` (and in the WebSocket's
    /// `connection_init`).
    pub fn with_token(&self, token: impl Into<String>) -> Client {
        let token = token.into().trim().to_owned();
        self.rebuilt(|inner| inner.token = Some(token))
    }

    /// The same server, with queries and mutations given up after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        self.rebuilt(|inner| inner.timeout = timeout)
    }

    /// The same server, with subscriptions coming back after a drop as `reconnect` says.
    pub fn with_reconnect(&self, reconnect: Reconnect) -> Client {
        self.rebuilt(|inner| inner.reconnect = reconnect)
    }

    fn rebuilt(&self, change: impl FnOnce(&mut Inner)) -> Client {
        let mut inner = Inner {
            http: self.inner.http.clone(),
            endpoint: self.inner.endpoint.clone(),
            ws_endpoint: self.inner.ws_endpoint.clone(),
            token: self.inner.token.clone(),
            timeout: self.inner.timeout,
            reconnect: self.inner.reconnect,
            tls: self.inner.tls.clone(),
        };
        change(&mut inner);
        Client {
            inner: Arc::new(inner),
        }
    }

    fn build(server: &str) -> Result<Client> {
        let endpoint = endpoint(server)?;
        let mut ws_endpoint = endpoint.clone();
        let scheme = if endpoint.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        ws_endpoint
            .set_scheme(scheme)
            .map_err(|()| Error::InvalidServer {
                server: server.to_owned(),
                reason: "no WebSocket address can be made from it".into(),
            })?;
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("tasker-client/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| Error::InvalidServer {
                server: server.to_owned(),
                reason: format!("cannot set up HTTP: {err}"),
            })?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                endpoint,
                ws_endpoint,
                token: None,
                timeout: DEFAULT_TIMEOUT,
                reconnect: Reconnect::default(),
                tls: Arc::default(),
            }),
        })
    }

    /// The GraphQL endpoint requests go to.
    pub fn endpoint(&self) -> &str {
        self.inner.endpoint.as_str()
    }

    /// Runs one query or mutation and reads its `data` as `T`. A GraphQL error becomes
    /// [`Error::Graphql`] with the first error's code and message (and every problem of a
    /// `VALIDATION_FAILED`).
    pub async fn execute<T: DeserializeOwned>(&self, query: &str, variables: Value) -> Result<T> {
        self.execute_within(query, variables, self.inner.timeout)
            .await
    }

    /// [`Client::execute`] with a timeout of its own (a long-polling claim waits longer).
    pub async fn execute_within<T: DeserializeOwned>(
        &self,
        query: &str,
        variables: Value,
        timeout: Duration,
    ) -> Result<T> {
        let mut request = self
            .inner
            .http
            .post(self.inner.endpoint.clone())
            .timeout(timeout)
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = &self.inner.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|err| self.transport_error(err, timeout))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|err| self.transport_error(err, timeout))?;
        let answer: GraphqlAnswer = match serde_json::from_slice(&body) {
            Ok(answer) => answer,
            Err(_) => {
                return Err(Error::Http {
                    status: status.as_u16(),
                    message: String::from_utf8_lossy(&body).chars().take(300).collect(),
                });
            }
        };
        if let Some(error) = answer.errors.into_iter().next() {
            return Err(Error::from_graphql(error));
        }
        if !status.is_success() {
            return Err(Error::Http {
                status: status.as_u16(),
                message: status.canonical_reason().unwrap_or("").to_owned(),
            });
        }
        serde_json::from_value(answer.data.unwrap_or(Value::Null)).map_err(|err| {
            Error::Protocol(format!(
                "the answer does not have the expected shape: {err}"
            ))
        })
    }

    fn transport_error(&self, err: reqwest::Error, timeout: Duration) -> Error {
        if err.is_timeout() {
            Error::Timeout(timeout)
        } else {
            Error::Unreachable {
                server: self.server(),
                reason: root_cause(&err),
            }
        }
    }

    /// `scheme://host:port` of the server, for messages.
    pub fn server(&self) -> String {
        let url = &self.inner.endpoint;
        match url.port_or_known_default() {
            Some(port) => format!(
                "{}://{}:{port}",
                url.scheme(),
                url.host_str().unwrap_or_default()
            ),
            None => format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default()),
        }
    }
}

/// The innermost cause of a transport error ("Connection refused", "failed to lookup
/// address"), which is what a person can act on.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let text = cause.to_string();
    // io errors end with their code: "Connection refused (os error 111)".
    match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// Reads a server address into its GraphQL endpoint.
fn endpoint(server: &str) -> Result<reqwest::Url> {
    let invalid = |reason: &str| Error::InvalidServer {
        server: server.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = server.trim();
    if trimmed.is_empty() {
        return Err(invalid("it is empty"));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let mut url = reqwest::Url::parse(&with_scheme).map_err(|err| invalid(&err.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("use an http:// or https:// address"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it names no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            "give the server's address without a query or fragment",
        ));
    }
    let path = url.path().trim_end_matches('/').to_owned();
    let path = if path.ends_with("/graphql") {
        path
    } else {
        format!("{path}/graphql")
    };
    url.set_path(&path);
    Ok(url)
}

/// rustls needs one process-wide crypto provider; the server binary installs the same one.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(serde::Deserialize)]
struct GraphqlAnswer {
    data: Option<Value>,
    #[serde(default)]
    errors: Vec<error::GraphqlError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_become_graphql_endpoints() {
        for (given, endpoint_url) in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/graphql"),
            ("127.0.0.1:8080", "http://127.0.0.1:8080/graphql"),
            (
                "https://tasker.example.com/",
                "https://tasker.example.com/graphql",
            ),
            ("http://h:1/base/graphql", "http://h:1/base/graphql"),
            ("http://h:1/base", "http://h:1/base/graphql"),
        ] {
            assert_eq!(endpoint(given).unwrap().as_str(), endpoint_url, "{given}");
        }
        for bad in [
            "",
            "ftp://h",
            "http://",
            "http://h/?x=1",
            "not a url at all",
        ] {
            assert!(
                matches!(endpoint(bad), Err(Error::InvalidServer { .. })),
                "{bad}"
            );
        }
        let client = Client::new("https://tasker.example.com").unwrap();
        assert_eq!(
            client.inner.ws_endpoint.as_str(),
            "wss://tasker.example.com/graphql"
        );
        assert_eq!(client.server(), "https://tasker.example.com:443");
    }
}
