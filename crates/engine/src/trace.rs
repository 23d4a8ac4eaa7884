//! Trace context for task work. A task remembers the W3C `traceparent` of the span that
//! created it, and the spans of its steps' attempts join that trace, whichever replica runs
//! them and however much later. With no OpenTelemetry layer installed, spans carry no trace
//! context: nothing is stored, and a replica that does not export keeps no span of the work
//! on tasks another one traced.

use chrono::{DateTime, Utc};
use opentelemetry::trace::TraceContextExt as _;
use std::collections::HashMap;
use tasker_domain::StateMachine as _;
use tasker_store::{ClaimedStep, TaskRecord};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

const TRACEPARENT: &str = "traceparent";

/// The span's W3C trace context as headers (`traceparent`, and `tracestate` when there is
/// one); none when traces are not exported.
pub(crate) fn headers_of(span: &Span) -> HashMap<String, String> {
    let mut headers = HashMap::new();
    let context = span.context();
    if context.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut headers);
        });
    }
    headers
}

/// The span's W3C `traceparent`, when traces are exported.
pub(crate) fn traceparent_of(span: &Span) -> Option<String> {
    headers_of(span).remove(TRACEPARENT)
}

/// Makes `span` a child of the span a stored `traceparent` names; false when the span is not
/// exported (no OpenTelemetry layer here, or its filter leaves the span out).
pub(crate) fn join(span: &Span, traceparent: &str) -> bool {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier));
    span.set_parent(parent).is_ok()
}

/// A `task.finish` span in the trace of a traced task that ended.
pub(crate) fn finished(task: &TaskRecord) {
    if let Some(traceparent) = &task.trace_parent {
        let span = tracing::info_span!(
            "task.finish",
            task_id = %task.id,
            state = task.state.as_str(),
        );
        join(&span, traceparent);
    }
}

/// The lease a worker gets carries a `step.claim` span in its task's trace, so that the
/// worker's own spans join that trace (or, on a replica that does not export, the task's own
/// trace context).
pub(crate) fn leased(claimed: &mut [ClaimedStep], worker_id: &str) {
    for claim in claimed {
        if let Some(traceparent) = &claim.trace_parent {
            let span = tracing::info_span!(
                "step.claim",
                task_id = %claim.step.task_id,
                step_id = %claim.step.id,
                step = %claim.step.name,
                handler = %claim.step.handler,
                attempt = claim.step.attempts,
                worker_id,
            );
            if join(&span, traceparent) {
                claim.trace_parent = traceparent_of(&span);
            }
        }
    }
}

/// The `step.attempt` spans of the attempts the worker pool runs, by lease token: each from
/// the claim to the recorded outcome, with `step.run` and `step.complete` inside. Only attempts
/// of traced tasks have one. An attempt whose outcome was never recorded (its inputs could not
/// be read, say) ends with its lease.
#[derive(Default)]
pub(crate) struct Attempts(HashMap<Uuid, (Span, DateTime<Utc>)>);

impl Attempts {
    /// Opens the span of each claimed attempt whose task is traced, once the attempts whose
    /// lease ran out have ended.
    pub fn open(&mut self, claimed: &[ClaimedStep], now: DateTime<Utc>) {
        self.0
            .retain(|_, (_, lease_expires_at)| *lease_expires_at > now);
        for claim in claimed {
            if let Some(traceparent) = &claim.trace_parent {
                let step = &claim.step;
                let span = tracing::info_span!(
                    "step.attempt",
                    task_id = %step.task_id,
                    step_id = %step.id,
                    step = %step.name,
                    handler = %step.handler,
                    attempt = step.attempts,
                    correlation_id = %claim.correlation_id,
                );
                if join(&span, traceparent) {
                    self.0
                        .insert(claim.lease_token, (span, claim.lease_expires_at));
                }
            }
        }
    }

    /// The span the attempt runs inside, if it is traced.
    pub fn of(&self, lease_token: Uuid) -> Option<&Span> {
        self.0.get(&lease_token).map(|(span, _)| span)
    }

    /// A `step.run` span for a handler that finishes at once (or none).
    pub fn run(&self, lease_token: Uuid) -> Span {
        self.of(lease_token).map_or_else(
            Span::none,
            |attempt| tracing::info_span!(parent: attempt, "step.run"),
        )
    }

    /// A `step.complete` span for writing the outcome (or none).
    pub fn recording(&self, lease_token: Uuid, outcome: &'static str) -> Span {
        self.of(lease_token).map_or_else(
            Span::none,
            |attempt| tracing::info_span!(parent: attempt, "step.complete", outcome),
        )
    }

    /// Ends the spans of the attempts among `tokens` whose outcome is written (or never will
    /// be); those `kept` for another try stay open.
    pub fn close(&mut self, tokens: &[Uuid], kept: &[Uuid]) {
        if self.0.is_empty() {
            return;
        }
        let kept: std::collections::HashSet<&Uuid> = kept.iter().collect();
        for token in tokens.iter().filter(|token| !kept.contains(token)) {
            self.0.remove(token);
        }
    }
}
