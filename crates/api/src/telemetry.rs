//! What the API adds to the server's metrics: every query and mutation (over HTTP or a
//! WebSocket) counted by type, root field and outcome with its latency, and open WebSocket
//! connections and subscriptions.

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextRequest,
};
use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationType, Selection,
};
use async_graphql::{Response, ServerResult, Variables};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tasker_engine::Engine;

/// Counts operations into the engine's metrics.
pub(crate) struct OperationMetrics(pub(crate) Arc<Engine>);

impl ExtensionFactory for OperationMetrics {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(OperationMetricsExtension {
            engine: self.0.clone(),
            parsed: Mutex::default(),
            executed: Mutex::default(),
            over_http: Mutex::default(),
        })
    }
}

struct OperationMetricsExtension {
    engine: Arc<Engine>,
    /// Each operation of the document: its name, type and first root field.
    parsed: Mutex<Vec<(Option<String>, &'static str, String)>>,
    /// Whether an operation reached execution (only those are named, so the labels stay
    /// within the schema's fields; the others count as `invalid`).
    executed: Mutex<bool>,
    /// The request's span, when the operation came as an HTTP request.
    over_http: Mutex<Option<tracing::Span>>,
}

fn kind(ty: OperationType) -> &'static str {
    match ty {
        OperationType::Query => "query",
        OperationType::Mutation => "mutation",
        OperationType::Subscription => "subscription",
    }
}

/// The first field an operation selects at its root (`fragment` when it starts with one).
fn root_field(selections: &[async_graphql::Positioned<Selection>]) -> String {
    match selections.first().map(|selection| &selection.node) {
        Some(Selection::Field(field)) => field.node.name.node.to_string(),
        Some(_) => "fragment".to_owned(),
        None => "none".to_owned(),
    }
}

fn summary(document: &ExecutableDocument) -> Vec<(Option<String>, &'static str, String)> {
    match &document.operations {
        DocumentOperations::Single(operation) => vec![(
            None,
            kind(operation.node.ty),
            root_field(&operation.node.selection_set.node.items),
        )],
        DocumentOperations::Multiple(operations) => operations
            .iter()
            .map(|(name, operation)| {
                (
                    Some(name.to_string()),
                    kind(operation.node.ty),
                    root_field(&operation.node.selection_set.node.items),
                )
            })
            .collect(),
    }
}

impl OperationMetricsExtension {
    /// Counts one operation with its outcome and latency, and names them on its span.
    fn count(
        &self,
        span: &tracing::Span,
        kind: &'static str,
        field: String,
        response: &Response,
        seconds: f64,
    ) {
        span.record("graphql.operation.type", kind);
        span.record("graphql.operation.field", field.as_str());
        if kind == "subscription" {
            // A subscription sent as a plain request (refused: they run over WebSockets,
            // counted in tasker_subscriptions) is not an operation here.
            return;
        }
        let outcome = match response.errors.first() {
            None => "ok",
            Some(error) => crate::error::code_of(error).unwrap_or("error"),
        }
        .to_owned();
        span.record("outcome", outcome.as_str());
        let metrics = self.engine.metrics();
        let labels = [("type", kind.to_owned()), ("operation", field)];
        metrics
            .histogram("tasker_graphql_operation_duration_seconds", &labels)
            .record(seconds);
        let [kind, field] = labels;
        metrics
            .counter(
                "tasker_graphql_operations_total",
                &[kind, field, ("outcome", outcome)],
            )
            .increment(1);
    }
}

fn operation_span() -> tracing::Span {
    // Its root field and outcome are recorded once known (exported with traces).
    tracing::info_span!(
        "graphql.operation",
        graphql.operation.type = tracing::field::Empty,
        graphql.operation.field = tracing::field::Empty,
        outcome = tracing::field::Empty,
    )
}

#[async_graphql::async_trait::async_trait]
impl Extension for OperationMetricsExtension {
    /// A request over HTTP: one span around it all; one that never reached execution (it did
    /// not parse or validate) is counted here.
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let started = Instant::now();
        let span = operation_span();
        if let Ok(mut over_http) = self.over_http.lock() {
            *over_http = Some(span.clone());
        }
        let response = tracing::Instrument::instrument(next.run(ctx), span.clone()).await;
        let executed = self.executed.lock().is_ok_and(|executed| *executed);
        if !executed {
            let seconds = started.elapsed().as_secs_f64();
            self.count(&span, "invalid", "none".to_owned(), &response, seconds);
        }
        response
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        if let Ok(mut parsed) = self.parsed.lock() {
            *parsed = summary(&document);
        }
        Ok(document)
    }

    /// A query or mutation that passed validation, over HTTP or a WebSocket (where no
    /// request hook runs): counted with its root field.
    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        let started = Instant::now();
        let chosen = self.parsed.lock().ok().and_then(|parsed| {
            parsed
                .iter()
                .find(|(name, _, _)| operation_name.is_none() || name.as_deref() == operation_name)
                .map(|(_, kind, field)| (*kind, field.clone()))
        });
        if let Ok(mut executed) = self.executed.lock() {
            *executed = true;
        }
        let over_http = self.over_http.lock().ok().and_then(|span| span.clone());
        let span = over_http.unwrap_or_else(operation_span);
        let response =
            tracing::Instrument::instrument(next.run(ctx, operation_name), span.clone()).await;
        let (kind, field) = chosen.unwrap_or(("invalid", "none".to_owned()));
        self.count(
            &span,
            kind,
            field,
            &response,
            started.elapsed().as_secs_f64(),
        );
        response
    }
}

/// Counts one open thing (a WebSocket connection, a subscription) while it lives.
pub(crate) struct Open(metrics::Gauge);

impl Open {
    pub(crate) fn new(engine: &Engine, gauge: &'static str) -> Open {
        let gauge = engine.metrics().gauge(gauge, &[]);
        gauge.increment(1.0);
        Open(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
