//! GraphQL over WebSocket with a real client, in both subprotocols.

use crate::support::TestServer;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use tasker_store::testing::TestDatabase;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer, protocol: &str) -> Socket {
    let mut request = format!("ws://{}/graphql", server.address)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], protocol);
    socket
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::text(message.to_string()))
        .await
        .unwrap();
}

/// The next JSON message, skipping keep-alives.
async fn receive(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] != "ka" && value["type"] != "ping" {
                return value;
            }
        }
    }
}

async fn server() -> TestServer {
    TestServer::start(TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await).await
}

#[tokio::test]
async fn graphql_transport_ws_runs_operations_and_reports_errors_with_codes() {
    let server = server().await;
    let mut socket = connect(&server, "graphql-transport-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");

    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "1", "payload": { "query": "{ namespaces { name } }" } }),
    )
    .await;
    let next = receive(&mut socket).await;
    assert_eq!(next["type"], "next");
    assert_eq!(next["payload"]["data"]["namespaces"], json!([]));
    assert_eq!(
        receive(&mut socket).await,
        json!({ "type": "complete", "id": "1" })
    );

    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "2",
                "payload": { "query": "subscription { heartbeat(everySeconds: 0) { sequence } }" } }),
    )
    .await;
    let error = receive(&mut socket).await;
    assert_eq!(error["id"], "2");
    let code = if error["type"] == "error" {
        error["payload"][0]["extensions"]["code"].clone()
    } else {
        error["payload"]["errors"][0]["extensions"]["code"].clone()
    };
    assert_eq!(code, "VALIDATION_FAILED", "{error}");

    // The connection still works after the error.
    send(
        &mut socket,
        json!({ "type": "subscribe", "id": "3", "payload": { "query": "{ tasks { totalCount } }" } }),
    )
    .await;
    let next = loop {
        let message = receive(&mut socket).await;
        if message["id"] == "3" {
            break message;
        }
    };
    assert_eq!(next["payload"]["data"]["tasks"]["totalCount"], 0, "{next}");
}

#[tokio::test]
async fn the_legacy_graphql_ws_subprotocol_works_too() {
    let server = server().await;
    let mut socket = connect(&server, "graphql-ws").await;
    send(&mut socket, json!({ "type": "connection_init" })).await;
    assert_eq!(receive(&mut socket).await["type"], "connection_ack");
    send(
        &mut socket,
        json!({ "type": "start", "id": "1", "payload": { "query": "{ tasks { totalCount } }" } }),
    )
    .await;
    let data = receive(&mut socket).await;
    assert_eq!(data["type"], "data");
    assert_eq!(data["payload"]["data"]["tasks"]["totalCount"], 0);
}
