//! Subscriptions over `graphql-transport-ws` that survive a dropped connection: every item
//! carries the server's cursor, and after a drop the client connects again and subscribes
//! with `after` set to the last cursor it delivered, so nothing is missed or repeated.

use crate::error::GraphqlError;
use crate::operations::{EVENT_FIELDS, STEP_FIELDS, TASK_FIELDS};
use crate::types::{Event, EventFilter, TaskUpdate};
use crate::{Client, Error, Result};
use futures::{SinkExt as _, Stream, StreamExt as _};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// How a subscription comes back after its connection drops.
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    /// The wait before the first new attempt; it doubles after each failed one.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Give up (the stream yields [`Error::Unreachable`] and ends) after failing this long
    /// without getting back.
    pub give_up_after: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            give_up_after: Duration::from_secs(60),
        }
    }
}

/// How often the client pings a quiet connection, and how long it waits for any message
/// before it counts the connection as dead (a cut that sent no FIN looks like silence).
const PING_EVERY: Duration = Duration::from_secs(10);
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// How long the server has to acknowledge `connection_init`.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection must stay up to count as having come back.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// A live subscription: a stream of items (or one final error). Dropping it closes the
/// connection.
pub struct Follow<T> {
    items: mpsc::Receiver<Result<T>>,
    driver: tokio::task::JoinHandle<()>,
}

impl<T> Stream for Follow<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.items.poll_recv(cx)
    }
}

impl<T> Drop for Follow<T> {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Client {
    /// Follows one task: first the task as it is (or, with `after`, the updates since that
    /// cursor), then an update each time something about it changes. The stream ends after
    /// the update with `last: true` (the task has ended).
    pub fn follow_task(&self, id: &str, after: Option<String>) -> Follow<TaskUpdate> {
        let query = format!(
            "subscription Follow($id: ID!, $after: String) {{ taskUpdated(id: $id, after: $after) {{ cursor last task {{ {TASK_FIELDS} }} changedSteps {{ {STEP_FIELDS} }} events {{ {EVENT_FIELDS} }} }} }}"
        );
        let id = id.to_owned();
        // Without a cursor the first update is the task as it is, carrying one.
        let start = match after {
            Some(after) => Start::At(Some(after)),
            None => Start::Snapshot,
        };
        self.follow(
            query,
            "taskUpdated",
            start,
            move |after| json!({ "id": id, "after": after }),
        )
    }

    /// Follows the event log: the events after `after` (or from now: the log's head is read
    /// first, so a drop before the first event loses nothing), then new ones as they commit,
    /// in log order.
    pub fn follow_events(&self, filter: &EventFilter, after: Option<String>) -> Follow<Event> {
        let query = format!(
            "subscription Events($filter: EventFilterInput, $after: String) {{ events(filter: $filter, after: $after) {{ {EVENT_FIELDS} }} }}"
        );
        let filter = serde_json::to_value(filter).unwrap_or(Value::Null);
        self.follow(
            query,
            "events",
            Start::At(after),
            move |after| json!({ "filter": filter, "after": after }),
        )
    }

    /// Runs a resumable subscription whose items carry a `cursor` field.
    fn follow<T>(
        &self,
        query: String,
        root: &'static str,
        start: Start,
        variables: impl Fn(Option<&str>) -> Value + Send + Sync + 'static,
    ) -> Follow<T>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let (sender, items) = mpsc::channel(64);
        let driver = tokio::spawn(drive(
            self.clone(),
            Subscription {
                query,
                root,
                variables: Box::new(variables),
            },
            start,
            sender,
        ));
        Follow { items, driver }
    }
}

/// Where a subscription starts.
enum Start {
    /// After this cursor; from the log's head read first when `None`.
    At(Option<String>),
    /// With what the server sends first, which carries a cursor.
    Snapshot,
}

/// The variables of a subscription resuming after a cursor (or starting without one).
type Variables = Box<dyn Fn(Option<&str>) -> Value + Send + Sync>;

struct Subscription {
    query: String,
    root: &'static str,
    variables: Variables,
}

/// How one connection ended.
enum Ended {
    /// The server completed the subscription.
    Complete,
    /// Nobody reads the stream any more.
    Abandoned,
    /// An error retrying will not change.
    Fatal(Error),
    /// The connection broke, or the server ended the stream early (a server that drains
    /// completes its subscriptions so clients resume elsewhere); `progressed` when it got as
    /// far as being acknowledged (or, for an early end, delivering something).
    Dropped { error: Error, progressed: bool },
}

async fn drive<T: DeserializeOwned>(
    client: Client,
    subscription: Subscription,
    start: Start,
    sender: mpsc::Sender<Result<T>>,
) {
    let policy = client.inner.reconnect;
    let mut delay = policy.first_delay;
    let mut failing_since: Option<Instant> = None;
    let (mut after, mut need_head) = match start {
        Start::At(after) => (after.clone(), after.is_none()),
        Start::Snapshot => (None, false),
    };
    loop {
        let ended = if need_head {
            match client.event_head().await {
                Ok(head) => {
                    after = Some(head);
                    need_head = false;
                    continue;
                }
                Err(error) if error.is_transient() => Ended::Dropped {
                    error,
                    progressed: false,
                },
                Err(error) => Ended::Fatal(error),
            }
        } else {
            connection(&client, &subscription, &mut after, &sender).await
        };
        match ended {
            Ended::Complete | Ended::Abandoned => return,
            Ended::Fatal(error) => {
                let _ = sender.send(Err(error)).await;
                return;
            }
            Ended::Dropped { error, progressed } => {
                if progressed {
                    failing_since = None;
                    delay = policy.first_delay;
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= policy.give_up_after {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                tracing::warn!(
                    error = %error,
                    after = after.as_deref().unwrap_or("(start)"),
                    "subscription connection lost; resuming"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(policy.max_delay);
            }
        }
    }
}

/// One WebSocket connection: connect, initialise, subscribe, deliver until it ends.
async fn connection<T: DeserializeOwned>(
    client: &Client,
    subscription: &Subscription,
    after: &mut Option<String>,
    sender: &mpsc::Sender<Result<T>>,
) -> Ended {
    // A connection that delivered something, or stayed up a while, made progress: the
    // next outage is counted afresh. One that fails at once again and again does not.
    let dropped = |reason: String, delivered: bool, up_since: Option<Instant>| Ended::Dropped {
        error: Error::Unreachable {
            server: client.server(),
            reason,
        },
        progressed: delivered || up_since.is_some_and(|at| at.elapsed() >= STABLE_AFTER),
    };
    let mut request = match client.inner.ws_endpoint.as_str().into_client_request() {
        Ok(request) => request,
        Err(err) => return Ended::Fatal(Error::Protocol(err.to_string())),
    };
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("graphql-transport-ws"),
    );
    let connector = match client.tls_connector() {
        Ok(connector) => connector,
        Err(err) => return Ended::Fatal(err),
    };
    let socket = tokio::time::timeout(
        ACK_TIMEOUT,
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector),
    )
    .await;
    let mut socket = match socket {
        Err(_) => return dropped("the WebSocket handshake timed out".into(), false, None),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .map(|body| String::from_utf8_lossy(body).chars().take(300).collect())
                .unwrap_or_default();
            let error = Error::Http {
                status,
                message: body,
            };
            return if error.is_transient() {
                Ended::Dropped {
                    error,
                    progressed: false,
                }
            } else {
                Ended::Fatal(error)
            };
        }
        Ok(Err(err)) => return dropped(crate::root_cause(&err), false, None),
        Ok(Ok((socket, _))) => socket,
    };
    let init = match &client.inner.token {
        Some(token) => {
            json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } })
        }
        None => json!({ "type": "connection_init", "payload": {} }),
    };
    let subscribe = json!({
        "id": "1",
        "type": "subscribe",
        "payload": {
            "query": subscription.query,
            "variables": (subscription.variables)(after.as_deref()),
        },
    });
    for message in [init, subscribe] {
        if let Err(err) = socket.send(Message::text(message.to_string())).await {
            return dropped(crate::root_cause(&err), false, None);
        }
    }
    let mut acknowledged = false;
    let mut delivered = false;
    let connected_at = Instant::now();
    // Whether the last item said it was the stream's last (`last: true`).
    let mut final_delivered = false;
    let mut last_heard = Instant::now();
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        let silence_limit = if acknowledged {
            SILENCE_LIMIT
        } else {
            ACK_TIMEOUT
        };
        let message = tokio::select! {
            message = socket.next() => message,
            _ = ping.tick() => {
                if last_heard.elapsed() >= silence_limit {
                    return dropped("the server stopped answering".into(), delivered, acknowledged.then_some(connected_at));
                }
                if acknowledged
                    && let Err(err) = socket.send(Message::text(r#"{"type":"ping"}"#)).await
                {
                    return dropped(crate::root_cause(&err), delivered, Some(connected_at));
                }
                continue;
            }
            _ = tokio::time::sleep_until(last_heard + silence_limit) => {
                return dropped("the server stopped answering".into(), delivered, acknowledged.then_some(connected_at));
            }
        };
        last_heard = Instant::now();
        let text = match message {
            None => {
                return dropped(
                    "the connection closed".into(),
                    delivered,
                    acknowledged.then_some(connected_at),
                );
            }
            Some(Err(err)) => {
                return dropped(
                    crate::root_cause(&err),
                    delivered,
                    acknowledged.then_some(connected_at),
                );
            }
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|frame| (u16::from(frame.code), frame.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                // The server refused this connection on purpose: 4400–4499, or before its
                // acknowledgement a protocol or policy close (how a refused `connection_init`
                // — credentials, quotas — ends). Anything else is a broken connection.
                let refused =
                    (4400..4500).contains(&code) || (!acknowledged && matches!(code, 1002 | 1008));
                return if refused {
                    Ended::Fatal(Error::Refused(if reason.is_empty() {
                        format!("close code {code}")
                    } else {
                        reason
                    }))
                } else {
                    dropped(
                        format!("the server closed the connection ({code})"),
                        delivered,
                        acknowledged.then_some(connected_at),
                    )
                };
            }
            Some(Ok(_)) => continue,
        };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            return Ended::Fatal(Error::Protocol(format!("not JSON: {text}")));
        };
        match frame["type"].as_str() {
            Some("connection_ack") => acknowledged = true,
            Some("ping") => {
                if let Err(err) = socket.send(Message::text(r#"{"type":"pong"}"#)).await {
                    return dropped(
                        crate::root_cause(&err),
                        delivered,
                        acknowledged.then_some(connected_at),
                    );
                }
            }
            Some("next") => {
                let payload = &frame["payload"];
                if let Some(first) = payload["errors"]
                    .as_array()
                    .and_then(|errors| errors.first())
                {
                    let error = serde_json::from_value::<GraphqlError>(first.clone())
                        .map(Error::from_graphql)
                        .unwrap_or_else(|err| Error::Protocol(err.to_string()));
                    return if error.is_transient() {
                        Ended::Dropped {
                            error,
                            progressed: delivered
                                || (acknowledged && connected_at.elapsed() >= STABLE_AFTER),
                        }
                    } else {
                        Ended::Fatal(error)
                    };
                }
                let item = &payload["data"][subscription.root];
                let Some(cursor) = item["cursor"].as_str().map(str::to_owned) else {
                    return Ended::Fatal(Error::Protocol(format!(
                        "a `{}` message without a cursor",
                        subscription.root
                    )));
                };
                let item = match serde_json::from_value::<T>(item.clone()) {
                    Ok(item) => item,
                    Err(err) => {
                        return Ended::Fatal(Error::Protocol(format!(
                            "`{}` does not have the expected shape: {err}",
                            subscription.root
                        )));
                    }
                };
                *after = Some(cursor);
                delivered = true;
                final_delivered = payload["data"][subscription.root]["last"] == Value::Bool(true);
                if sender.send(Ok(item)).await.is_err() {
                    let _ = socket.close(None).await;
                    return Ended::Abandoned;
                }
            }
            Some("error") => {
                let first = frame["payload"]
                    .as_array()
                    .and_then(|errors| errors.first())
                    .cloned()
                    .unwrap_or(Value::Null);
                let error = serde_json::from_value::<GraphqlError>(first)
                    .map(Error::from_graphql)
                    .unwrap_or_else(|err| Error::Protocol(err.to_string()));
                return Ended::Fatal(error);
            }
            Some("complete") => {
                let _ = socket.close(None).await;
                if final_delivered {
                    return Ended::Complete;
                }
                return Ended::Dropped {
                    error: Error::Unreachable {
                        server: client.server(),
                        reason: "the server ended the subscription early".into(),
                    },
                    progressed: delivered,
                };
            }
            _ => {}
        }
    }
}

impl Client {
    /// The TLS setup of `wss://` connections (the system's trust store), or none for `ws://`.
    fn tls_connector(&self) -> Result<Option<tokio_tungstenite::Connector>> {
        if self.inner.ws_endpoint.scheme() != "wss" {
            return Ok(None);
        }
        // Built once per client (it reads the system's trust store), on the first wss://
        // connection.
        if let Some(config) = self.inner.tls.get() {
            return Ok(Some(tokio_tungstenite::Connector::Rustls(config.clone())));
        }
        use rustls_platform_verifier::ConfigVerifierExt as _;
        let config = rustls::ClientConfig::with_platform_verifier()
            .map_err(|err| Error::Protocol(format!("cannot set up TLS: {err}")))?;
        let config = self.inner.tls.get_or_init(|| std::sync::Arc::new(config));
        Ok(Some(tokio_tungstenite::Connector::Rustls(config.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A graphql-transport-ws server that plays `script` on each connection in turn: whether
    /// to acknowledge `connection_init`, then the messages to send after `subscribe` (then the
    /// connection closes), after checking the `after` the client subscribed with.
    async fn scripted_server(script: Vec<(Option<&'static str>, bool, Vec<Message>)>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for (expected_after, ack, messages) in script {
                let (stream, _) = listener.accept().await.unwrap();
                // The server agrees to the subprotocol, as a real one does (the error type is
                // tungstenite's, not ours).
                #[allow(clippy::result_large_err)]
                let agree = |_: &tokio_tungstenite::tungstenite::handshake::server::Request,
                             mut response: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    response.headers_mut().insert(
                        "Sec-WebSocket-Protocol",
                        HeaderValue::from_static("graphql-transport-ws"),
                    );
                    Ok(response)
                };
                let mut socket = tokio_tungstenite::accept_hdr_async(stream, agree)
                    .await
                    .unwrap();
                let mut subscribed = None;
                while let Some(Ok(Message::Text(text))) = socket.next().await {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    match frame["type"].as_str() {
                        Some("connection_init") if ack => socket
                            .send(Message::text(r#"{"type":"connection_ack"}"#))
                            .await
                            .unwrap(),
                        Some("subscribe") => {
                            subscribed = Some(frame["payload"]["variables"]["after"].clone());
                            break;
                        }
                        _ => {}
                    }
                }
                assert_eq!(
                    subscribed.unwrap().as_str(),
                    expected_after,
                    "resumed from the last cursor delivered"
                );
                for message in messages {
                    socket.send(message).await.unwrap();
                }
                let _ = socket.close(None).await;
            }
        });
        format!("http://{address}")
    }

    fn next(cursor: &str, last: bool) -> Message {
        Message::text(
            json!({ "id": "1", "type": "next", "payload": { "data": { "taskUpdated": {
                "cursor": cursor, "last": last, "changedSteps": [], "events": [],
                "task": { "id": "t", "namespace": "n", "templateName": "x",
                          "templateVersion": "1.0.0", "state": (if last { "COMPLETE" } else { "IN_PROGRESS" }),
                          "createdAt": "2026-01-01T00:00:00Z" } } } } })
            .to_string(),
        )
    }

    fn complete() -> Message {
        Message::text(r#"{"id":"1","type":"complete"}"#)
    }

    fn quick(client: Client) -> Client {
        client.with_reconnect(Reconnect {
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            give_up_after: Duration::from_secs(5),
        })
    }

    #[tokio::test]
    async fn a_dropped_or_early_ended_stream_resumes_from_the_last_cursor_until_the_last_update() {
        let server = scripted_server(vec![
            // Cut after one update; then ended early (a draining server); then the end.
            (None, true, vec![next("c1", false)]),
            (Some("c1"), true, vec![next("c2", false), complete()]),
            (Some("c2"), true, vec![next("c3", true), complete()]),
        ])
        .await;
        let client = quick(Client::new(&server).unwrap());
        let updates: Vec<TaskUpdate> = client
            .follow_task("t", None)
            .map(|update| update.unwrap())
            .collect()
            .await;
        let cursors: Vec<&str> = updates.iter().map(|u| u.cursor.as_str()).collect();
        assert_eq!(cursors, ["c1", "c2", "c3"]);
        assert!(updates[2].last);
    }

    #[tokio::test]
    async fn a_refusal_ends_the_stream_with_its_reason_and_an_outage_with_unreachable() {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        // A refused `connection_init` (how async-graphql closes: 1002 with the reason), and
        // a refusal code later on.
        for (ack, code) in [(false, 1002), (true, 4403)] {
            let refusal = Message::Close(Some(CloseFrame {
                code: code.into(),
                reason: "the token has expired".into(),
            }));
            let server = scripted_server(vec![(None, ack, vec![refusal])]).await;
            let client = quick(Client::new(&server).unwrap());
            let items: Vec<_> = client.follow_task("t", None).collect().await;
            assert!(
                matches!(&items[..], [Err(Error::Refused(reason))] if reason == "the token has expired"),
                "{code}: {items:?}"
            );
        }

        let nobody = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = nobody.local_addr().unwrap();
        drop(nobody);
        let client = Client::new(&format!("http://{address}"))
            .unwrap()
            .with_reconnect(Reconnect {
                first_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(20),
                give_up_after: Duration::from_millis(100),
            });
        let items: Vec<_> = client
            .follow_events(&EventFilter::default(), None)
            .collect()
            .await;
        assert!(
            matches!(&items[..], [Err(Error::Unreachable { .. })]),
            "{items:?}"
        );
    }

    #[test]
    fn updates_decode_from_the_subscription_shape() {
        let update: TaskUpdate = serde_json::from_value(json!({
            "cursor": "c1",
            "last": true,
            "task": {
                "id": "t", "namespace": "n", "templateName": "x", "templateVersion": "1.0.0",
                "state": "COMPLETE", "createdAt": "2026-01-01T00:00:00Z",
                "stepCounts": { "total": 1, "pending": 0, "inProgress": 0, "complete": 1,
                                "error": 0, "cancelled": 0, "resolvedManually": 0, "skipped": 0 }
            },
            "changedSteps": [],
            "events": []
        }))
        .unwrap();
        assert!(update.last);
        assert_eq!(update.task.state, crate::TaskState::Complete);
        assert_eq!(update.task.step_counts.unwrap().done(), 1);
    }
}
