//! The HTTP surface: GraphQL over HTTP POST and WebSocket at `/graphql`, the playground at `/`,
//! and health checks.

use crate::auth::{AuthMode, Principal, bearer, token_of_header};
use crate::browser::BrowserPolicy;
use crate::deadline::Deadline;
use crate::playground;
use crate::schema::{TaskerSchema, build_schema};
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Path, State, WebSocketUpgrade,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tasker_engine::Engine;
use tasker_store::Store;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

/// Limits of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest request body; larger ones get 413. Above the 1 MiB definition limit, so an
    /// oversized template gets its own clear GraphQL error instead.
    pub max_body_bytes: usize,
    /// Longest a query or mutation may take.
    pub request_timeout: Duration,
    /// The shape of operations.
    pub query: crate::limits::QueryLimits,
    /// Per-token quotas.
    pub quota: crate::quota::QuotaLimits,
    /// How long a step may wait claimable before `/health/status` calls the server
    /// unhealthy (nothing is claiming its work).
    pub max_ready_age: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            query: crate::limits::QueryLimits::default(),
            quota: crate::quota::QuotaLimits::default(),
            max_ready_age: Duration::from_secs(300),
        }
    }
}

#[derive(Clone)]
struct AppState {
    auth: AuthMode,
    quotas: Arc<crate::quota::Quotas>,
    schema: TaskerSchema,
    /// For the liveness and readiness probes, which answer anyone.
    store: Store,
    /// For `/health/status`, through a grant like any resolver.
    services: crate::access::Services,
    limits: HttpLimits,
    playground: std::sync::Arc<str>,
    /// When the router was built: the server's uptime.
    started: std::time::Instant,
}

/// The whole application as an axum router; `extra_routes` (stateless) are served behind
/// the same browser guard, limits and panic catcher as every other route.
pub fn router(
    engine: Arc<Engine>,
    limits: HttpLimits,
    auth: AuthMode,
    browser: BrowserPolicy,
    extra_routes: Router,
) -> Router {
    let browser = browser.authenticated(matches!(auth, AuthMode::Jwt(_)));
    let quotas = crate::quota::Quotas::new(limits.quota.clone());
    let services = crate::access::Services::new(engine.clone());
    let state = AppState {
        auth,
        quotas: quotas.clone(),
        schema: build_schema(services.clone(), &limits.query, quotas),
        store: engine.store().clone(),
        services,
        limits: limits.clone(),
        playground: playground::page().into(),
        started: std::time::Instant::now(),
    };
    Router::new()
        .route("/", get(playground_page))
        .route("/playground", get(playground_page))
        .route("/playground/vendor/{file}", get(vendor_asset))
        .route(
            "/dashboard",
            get(|| async { crate::dashboard::serve("index.html") }),
        )
        .route(
            "/dashboard/{file}",
            get(|Path(file): Path<String>| async move { crate::dashboard::serve(&file) }),
        )
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/status", get(status))
        .route("/metrics", get(metrics))
        // The composition root's own routes (the demo's services) sit behind the same guards.
        .merge(extra_routes.with_state(()))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(browser.cors())
        // Outside CORS: a refused origin or host gets nothing, not even a preflight answer.
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(browser),
            crate::browser::guard,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("a request handler panicked");
            crate::error::error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                "internal error",
            )
        }))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        // Outermost: even a refused request has its id, in the log and the response.
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state)
}

/// The header that names a request in the logs.
const REQUEST_ID: &str = "x-request-id";

/// `X-Request-Id`: the caller's own (1 to 128 letters, digits, `.`, `_`, `:`, `-`), or a new
/// UUID. It
/// is returned on the response and carried by every log line of the request.
async fn request_id(mut request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let given = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        })
        .map(str::to_owned);
    let id = given.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let Ok(value) = HeaderValue::from_str(&id) else {
        return next.run(request).await;
    };
    request.headers_mut().insert(REQUEST_ID, value.clone());
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID, value);
    response
}

/// The span of one request: every log line inside it carries these fields.
fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    // At error level, so that the strictest filter still keeps the id on what it logs.
    let span = tracing::error_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    // A caller's W3C `traceparent` makes this request part of its trace (when traces are
    // exported; otherwise nothing listens).
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&Headers(request.headers()))
    });
    let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
    span
}

/// Request headers as OpenTelemetry reads propagated context from them.
struct Headers<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

/// Serves until `shutdown` resolves, then lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    // Small messages (events, answers) go out at once instead of waiting, under Nagle's
    // algorithm, for the client's delayed ACK (up to 40 ms).
    let listener = listener.tap_io(|socket| {
        if let Err(err) = socket.set_nodelay(true) {
            tracing::debug!(error = %err, "TCP_NODELAY could not be set");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The caller of an HTTP request, or the 401 that refuses it.
fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, Box<Response>> {
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or_default());
    token_of_header(header)
        .and_then(|token| state.auth.principal(token))
        .map_err(|err| {
            tracing::warn!(reason = %err, "refused a request without valid credentials");
            let mut response = crate::error::error_response(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                &err.to_string(),
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Box::new(response)
        })
}

/// POST /graphql: a GraphQL request in a JSON body, answered as the GraphQL over HTTP spec
/// says. Only JSON bodies are executed: the content types a page can send without asking
/// (`text/plain`, forms) are refused before anything is read.
async fn graphql_post(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    let headers = request.headers();
    if let Err(response) = json_body(headers) {
        return *response;
    }
    let principal = match authenticate(&state, headers) {
        Ok(principal) => principal,
        Err(response) => return *response,
    };
    let answer = Answer::negotiate(headers);
    let body: Result<Bytes, BytesRejection> = Bytes::from_request(request, &state).await;
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return crate::error::error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                &format!(
                    "the request body is larger than {} bytes",
                    state.limits.max_body_bytes
                ),
            );
        }
        Err(_) => {
            return crate::error::error_response(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "unreadable request body",
            );
        }
    };
    let params = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(params) => params,
        Err(err) => {
            let message = if body.is_empty() {
                "the request has no body: send {\"query\": \"...\"} as JSON".to_owned()
            } else {
                format!("the body is not JSON: {err}")
            };
            return bad_request(&message);
        }
    };
    if params.is_array() {
        return bad_request("batched requests are not supported: send one operation per request");
    }
    let request = match graphql_request(params) {
        Ok(request) => request,
        Err(message) => return bad_request(&message),
    };
    execute(&state, request, principal, answer).await
}

/// GET /graphql: a WebSocket upgrade speaks GraphQL (`graphql-transport-ws` or the legacy
/// `graphql-ws`); a `query` parameter runs a query (never a mutation: a GET must not change
/// anything); a browser without either gets the playground.
async fn graphql_get(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    if let Ok(upgrade) = WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
        return websocket(&state, &mut parts, upgrade).await;
    }
    let params = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map(|query| query.0)
        .unwrap_or_default();
    if !params.iter().any(|(key, _)| key == "query") {
        return Html(state.playground.to_string()).into_response();
    }
    let principal = match authenticate(&state, &parts.headers) {
        Ok(principal) => principal,
        Err(response) => return *response,
    };
    let mut object = serde_json::Map::new();
    for (key, value) in params {
        let value = match key.as_str() {
            // Variables and extensions come as JSON text in a query string.
            "variables" | "extensions" => match serde_json::from_str(&value) {
                Ok(value) => value,
                Err(_) => return bad_request(&format!("the {key} parameter is not JSON")),
            },
            _ => serde_json::Value::String(value),
        };
        object.insert(key, value);
    }
    let request = match graphql_request(serde_json::Value::Object(object)) {
        Ok(request) => request,
        Err(message) => return bad_request(&message),
    };
    if !runs_a_query(&request) {
        tracing::warn!("refused a mutation or subscription sent with GET");
        let mut response = crate::error::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "only queries run over GET: send mutations and subscriptions with POST (or over WebSocket)",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    execute(
        &state,
        request,
        principal,
        Answer::negotiate(&parts.headers),
    )
    .await
}

/// Whether the request's operation is a query. A document that does not parse, or names no
/// operation it has, is left to the executor, which reports that without running anything.
fn runs_a_query(request: &async_graphql::Request) -> bool {
    use async_graphql::parser::types::{DocumentOperations, OperationType};
    let Ok(document) = async_graphql::parser::parse_query(&request.query) else {
        return true;
    };
    let operation = match (&document.operations, &request.operation_name) {
        (DocumentOperations::Single(operation), _) => Some(operation),
        (DocumentOperations::Multiple(operations), Some(name)) => operations.get(name.as_str()),
        (DocumentOperations::Multiple(operations), None) if operations.len() == 1 => {
            operations.values().next()
        }
        (DocumentOperations::Multiple(_), None) => None,
    };
    operation.is_none_or(|operation| operation.node.ty == OperationType::Query)
}

/// A 400 for a request that is not a GraphQL request.
fn bad_request(message: &str) -> Response {
    crate::error::error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
}

/// Refuses a POST whose body is not declared JSON (415), before reading it.
fn json_body(headers: &HeaderMap) -> Result<(), Box<Response>> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .map(|value| value.to_str().unwrap_or("\u{fffd}"));
    let acceptable = declared.is_some_and(|declared| {
        let mut parts = declared.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let utf8 = parts.all(|parameter| match parameter.split_once('=') {
            Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
                value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            }
            _ => true,
        });
        (media == "application/json" || media == GRAPHQL_RESPONSE) && utf8
    });
    if acceptable {
        return Ok(());
    }
    tracing::warn!(content_type = ?declared, "refused a POST /graphql whose body is not JSON");
    Err(Box::new(crate::error::error_response(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
        &format!(
            "POST /graphql takes a JSON body in UTF-8: send Content-Type: application/json (got {})",
            declared.map_or_else(|| "none".to_owned(), |declared| format!("{declared:?}"))
        ),
    )))
}

/// A GraphQL request from its parameters (`query`, `operationName`, `variables`,
/// `extensions`), or why they are not one.
fn graphql_request(params: serde_json::Value) -> Result<async_graphql::Request, String> {
    use serde_json::Value;
    let Value::Object(mut params) = params else {
        return Err("the body must be a JSON object: {\"query\": \"...\"}".to_owned());
    };
    let query = match params.remove("query") {
        Some(Value::String(query)) => query,
        Some(_) => return Err("query must be a string".to_owned()),
        None => return Err("the request has no query".to_owned()),
    };
    let mut request = async_graphql::Request::new(query);
    match params.remove("operationName") {
        Some(Value::String(name)) => request = request.operation_name(name),
        Some(Value::Null) | None => {}
        Some(_) => return Err("operationName must be a string or null".to_owned()),
    }
    match params.remove("variables") {
        Some(variables @ Value::Object(_)) => {
            request = request.variables(async_graphql::Variables::from_json(variables));
        }
        Some(Value::Null) | None => {}
        Some(_) => return Err("variables must be an object or null".to_owned()),
    }
    match params.remove("extensions") {
        Some(Value::Object(_) | Value::Null) | None => {}
        Some(_) => return Err("extensions must be an object or null".to_owned()),
    }
    Ok(request)
}

/// The media type of the GraphQL over HTTP spec.
const GRAPHQL_RESPONSE: &str = "application/graphql-response+json";
const GRAPHQL_RESPONSE_UTF8: &str = "application/graphql-response+json; charset=utf-8";

/// How an answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `application/graphql-response+json`: a request that never ran (it did not parse, validate
    /// or coerce its variables) is a 400 without `data`.
    GraphqlResponse,
    /// `application/json`: always 200, errors in the body (the legacy behaviour clients expect).
    Json,
}

impl Answer {
    /// The client's preference among the two (by `q`; the spec's own type wins a tie); plain
    /// JSON when it states none.
    fn negotiate(headers: &HeaderMap) -> Answer {
        let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
            return Answer::Json;
        };
        let mut graphql = 0.0_f32;
        let mut json = 0.0_f32;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let quality = parts
                .find_map(|parameter| parameter.strip_prefix("q="))
                .and_then(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                GRAPHQL_RESPONSE => graphql = graphql.max(quality),
                "application/json" | "application/*" | "*/*" => json = json.max(quality),
                _ => {}
            }
        }
        if graphql > 0.0 && graphql >= json {
            Answer::GraphqlResponse
        } else {
            Answer::Json
        }
    }
}

/// Runs a request under the request timeout (extended by a long poll's wait) and writes the
/// answer in the negotiated media type.
async fn execute(
    state: &AppState,
    request: async_graphql::Request,
    principal: Principal,
    answer: Answer,
) -> Response {
    let deadline = Arc::new(Deadline::after(
        state.limits.request_timeout,
        tasker_engine::MAX_CLAIM_WAIT,
    ));
    let executed = Arc::new(crate::schema::Executed::default());
    let request = request
        .data(principal)
        .data(deadline.clone())
        .data(executed.clone());
    let Some(response) = deadline.run(state.schema.execute(request)).await else {
        return crate::error::error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "TIMEOUT",
            "the request took too long and was stopped",
        );
    };
    let ran = executed.happened();
    let (status, media) = match answer {
        Answer::GraphqlResponse if !ran => (StatusCode::BAD_REQUEST, GRAPHQL_RESPONSE_UTF8),
        Answer::GraphqlResponse => (StatusCode::OK, GRAPHQL_RESPONSE_UTF8),
        Answer::Json => (StatusCode::OK, "application/json; charset=utf-8"),
    };
    let mut http = if ran {
        (status, Json(response)).into_response()
    } else {
        // Nothing executed (a parse, validation or variable error): no data entry at all.
        (status, Json(NotExecuted::from(response))).into_response()
    };
    let headers = http.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    http
}

/// The answer to a request that never ran: its errors (and extensions), without `data`.
#[derive(serde::Serialize)]
struct NotExecuted {
    errors: Vec<async_graphql::ServerError>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    extensions: std::collections::BTreeMap<String, async_graphql::Value>,
}

impl From<async_graphql::Response> for NotExecuted {
    fn from(response: async_graphql::Response) -> Self {
        NotExecuted {
            errors: response.errors,
            extensions: response.extensions,
        }
    }
}

/// The token of a `connection_init` payload: `{"authorization": "Bearer …"}` (any case) or
/// `{"token": "…"}`.
fn init_token(payload: &serde_json::Value) -> Option<String> {
    let object = payload.as_object()?;
    object.iter().find_map(|(key, value)| {
        let text = value.as_str()?;
        if key.eq_ignore_ascii_case("authorization") {
            bearer(text).map(str::to_owned)
        } else if key == "token" {
            Some(text.to_owned())
        } else {
            None
        }
    })
}

/// Resolves a moment after the server starts draining (the subscriptions' `complete`
/// messages are sent by then); never when it does not.
async fn closing(mut draining: tokio::sync::watch::Receiver<bool>) {
    if draining.wait_for(|draining| *draining).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(WEBSOCKET_DRAIN_FLUSH).await;
}

/// How long a draining server leaves its WebSockets open for their last messages.
const WEBSOCKET_DRAIN_FLUSH: Duration = Duration::from_millis(250);

/// The read buffer of a WebSocket connection.
const WS_READ_BUFFER_BYTES: usize = 8 * 1024;

/// A GraphQL WebSocket connection (`graphql-transport-ws` or the legacy `graphql-ws`).
async fn websocket(
    state: &AppState,
    parts: &mut axum::http::request::Parts,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Ok(protocol) = GraphQLProtocol::from_request_parts(parts, state).await else {
        return crate::error::error_response(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "unsupported WebSocket subprotocol: use graphql-transport-ws or graphql-ws",
        );
    };
    let schema = state.schema.clone();
    // The token comes in the connection_init payload, or else in the upgrade request.
    let header_token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer)
        .map(str::to_owned);
    let auth = state.auth.clone();
    let quotas = state.quotas.clone();
    let held = state.services.hold_websocket();
    let draining = state.services.draining();
    // The connection's lines carry the upgrade request's id.
    let span = tracing::Span::current();
    upgrade
        .protocols(async_graphql::http::ALL_WEBSOCKET_PROTOCOLS)
        // Clients send small messages. tungstenite zero-fills its whole read buffer before
        // every read (snapview/tungstenite-rs#547), once per message sent to the client: at the
        // default 128 KiB that memset was the largest cost of delivering events.
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .max_message_size(state.limits.max_body_bytes)
        .max_frame_size(state.limits.max_body_bytes)
        .on_upgrade(move |socket| {
            let connection = async move {
                let _held = held;
                let serve = GraphQLWebSocket::new(socket, schema, protocol)
                    .on_connection_init(move |payload| async move {
                        let token = init_token(&payload).or(header_token);
                        let principal = auth.principal(token.as_deref()).map_err(|err| {
                            tracing::warn!(reason = %err, "refused a WebSocket without valid credentials");
                            async_graphql::Error::new(err.to_string())
                        })?;
                        // Held in the connection's data: released when the connection closes.
                        let held = quotas
                            .connect(principal.key)
                            .map_err(|err| async_graphql::Error::new(err.to_string()))?;
                        let mut data = async_graphql::Data::default();
                        data.insert(principal);
                        data.insert(held);
                        Ok(data)
                    })
                    .serve();
                // A draining server completes its subscriptions, lets those messages go out,
                // then closes the connection so the stop need not wait for the client.
                tokio::select! {
                    () = serve => {}
                    () = closing(draining) => {}
                }
            };
            tracing::Instrument::instrument(connection, span)
        })
}

async fn playground_page(State(state): State<AppState>) -> Html<String> {
    Html(state.playground.to_string())
}

async fn vendor_asset(Path(file): Path<String>) -> Response {
    match playground::asset(&file) {
        Some((content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "public, max-age=86400"),
            ],
            bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "live" }))
}

/// GET /health/status: tasks by state and claimable steps, within the caller's namespaces;
/// needs `tasker.health_status:index` when authentication is on.
async fn status(State(state): State<AppState>, headers: HeaderMap) -> Response {
    with_grant::<crate::access::can::HealthStatusIndex>(&state, &headers, async |granted| {
        status_report(&state, granted).await
    })
    .await
}

/// Answers a plain HTTP route for a caller holding `P`, or refuses them with 401 or 403.
async fn with_grant<P: crate::access::Grant>(
    state: &AppState,
    headers: &HeaderMap,
    answer: impl AsyncFnOnce(crate::access::Granted<'_, P>) -> Response,
) -> Response {
    let principal = match authenticate(state, headers) {
        Ok(principal) => principal,
        Err(response) => return *response,
    };
    match crate::access::grant_to::<P>(&principal, &state.services) {
        Ok(granted) => answer(granted).await,
        Err(err) => {
            crate::error::error_response(StatusCode::FORBIDDEN, err.code(), &err.to_string())
        }
    }
}

async fn status_report(
    state: &AppState,
    granted: crate::access::Granted<'_, crate::access::can::HealthStatusIndex>,
) -> Response {
    let identity = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "replica_id": crate::health::replica_id(),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "database": granted.backend_name(),
    });
    match granted.status().await {
        Ok(status) => {
            let status = status.unwrap_or_default();
            let pool = granted.pool();
            let report = crate::health::Report::of(
                &status,
                granted.draining(),
                granted.write_fault(),
                state.limits.max_ready_age,
            );
            let code = if report.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = report.to_json(&status, pool);
            if let (Some(body), Some(identity)) = (body.as_object_mut(), identity.as_object()) {
                body.extend(identity.clone());
            }
            (code, Json(body)).into_response()
        }
        Err(err) => {
            tracing::warn!(error = %err, "health status could not read the database");
            let mut body = json!({
                "status": "unhealthy",
                "problems": ["the database did not answer; the server log has the details"],
            });
            if let (Some(body), Some(identity)) = (body.as_object_mut(), identity.as_object()) {
                body.extend(identity.clone());
            }
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// GET /metrics: the Prometheus text format. With authentication on, it needs
/// `tasker.metrics:index` for all namespaces.
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    with_grant::<crate::access::can::MetricsIndex>(&state, &headers, async |granted| {
        metrics_text(granted).await
    })
    .await
}

async fn metrics_text(
    granted: crate::access::Granted<'_, crate::access::can::MetricsIndex>,
) -> Response {
    match granted.metrics().await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        // The only refusal: a token kept to some namespaces (a silent database is reported in
        // tasker_database_up instead).
        Err(err) => {
            crate::error::error_response(StatusCode::FORBIDDEN, err.code(), &err.to_string())
        }
    }
}

/// How long readiness waits for its probe write while writes are failing.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// GET /health/ready: 503 while the database does not answer, or while writes fail (then a
/// probe write tells whether they work again, so the server recovers with no client writing).
async fn ready(State(state): State<AppState>) -> Response {
    let database = state.store.backend_name();
    if state.services.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "draining",
                "database": database,
                "reason": "the server is stopping: send work to another replica",
            })),
        )
            .into_response();
    }
    let unavailable = |fault: &str, reason: &str, since: Option<String>| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unavailable",
                "database": database,
                "fault": fault,
                "reason": reason,
                "since": since,
            })),
        )
            .into_response()
    };
    if let Err(err) = state.store.ping().await {
        tracing::warn!(error = %err, "readiness check failed: the database does not answer");
        return unavailable("unreachable", "the database does not answer", None);
    }
    if let Some((fault, since)) = state.store.write_fault() {
        // Within a readiness check's patience: a busy database would hold the probe for its
        // whole busy timeout.
        let probe = tokio::time::timeout(READY_PROBE_TIMEOUT, state.store.probe_write()).await;
        if !matches!(probe, Ok(Ok(()))) {
            return unavailable(fault.name(), fault.reason(), Some(since.to_rfc3339()));
        }
    }
    Json(json!({ "status": "ready", "database": database })).into_response()
}
