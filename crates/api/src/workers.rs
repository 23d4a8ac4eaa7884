//! The worker protocol: external workers (any language, plain GraphQL) claim ready steps under
//! a lease, heartbeat long attempts, and report each attempt's outcome.

use crate::access::{can, grant};
use crate::error::{ApiError, GqlResultExt};
use crate::limits::filter_list;
use crate::objects::Step;
use async_graphql::{Context, ID, InputObject, Json, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde_json::Value;
use std::time::Duration;
use tasker_domain::worker;
use tasker_store::AttemptFailure;
use uuid::Uuid;

#[derive(Default)]
pub struct WorkerMutation;

#[derive(InputObject)]
pub struct ClaimStepsInput {
    /// Who claims; shown as the lease holder.
    worker_id: String,
    /// Only steps with these handlers; all handlers when omitted.
    handlers: Option<Vec<String>>,
    /// Only steps of tasks in these namespaces; all when omitted.
    namespaces: Option<Vec<String>>,
    /// At most this many steps (1 to 100, default 10).
    limit: Option<i32>,
    /// How long the lease lasts without a heartbeat (1 to 3600 s, default 60).
    lease_seconds: Option<i32>,
    /// Wait up to this long for work when none is ready (0 to 60 s, default 0).
    wait_seconds: Option<i32>,
}

/// A step leased to a worker, with everything needed to run it.
#[derive(SimpleObject)]
pub struct Lease {
    /// Pass it back to heartbeat, complete or fail the attempt.
    lease_token: ID,
    lease_expires_at: DateTime<Utc>,
    step_id: ID,
    task_id: ID,
    name: String,
    handler: String,
    config: Json<Value>,
    /// This attempt's number, from 1.
    attempt: u32,
    max_attempts: u32,
    namespace: String,
    template: String,
    /// The task's context.
    context: Json<Value>,
    /// The results of the steps this one depends on, by step name.
    parent_results: Json<Value>,
    /// The task's correlation id, for the worker's logs.
    correlation_id: String,
    /// W3C trace context of this attempt's `step.claim` span in the task's trace, when the
    /// server exports traces: start the worker's spans from it (and send it as the
    /// `traceparent` header of `completeStep`) to join that trace.
    traceparent: Option<String>,
}

#[derive(SimpleObject)]
pub struct ClaimStepsPayload {
    leases: Vec<Lease>,
}

#[derive(InputObject)]
pub struct HeartbeatStepsInput {
    lease_tokens: Vec<ID>,
    /// The new lease length from now (1 to 3600 s, default 60).
    lease_seconds: Option<i32>,
}

#[derive(SimpleObject)]
pub struct LeaseStatus {
    lease_token: ID,
    /// False when the lease was lost: stop working on the step.
    alive: bool,
    lease_expires_at: Option<DateTime<Utc>>,
}

#[derive(SimpleObject)]
pub struct HeartbeatStepsPayload {
    leases: Vec<LeaseStatus>,
}

#[derive(InputObject)]
pub struct ReleaseStepsInput {
    /// The leases to give back (at most 100).
    lease_tokens: Vec<ID>,
}

#[derive(SimpleObject)]
pub struct ReleaseStepsPayload {
    /// The steps given back, each pending again (or failed and due at once); a token that
    /// held no live lease is left out.
    steps: Vec<Step>,
}

#[derive(InputObject)]
pub struct CompleteStepInput {
    lease_token: ID,
    /// What the step produced; its dependents receive it as parent results.
    results: Option<Json<Value>>,
}

#[derive(InputObject)]
pub struct FailStepInput {
    lease_token: ID,
    message: String,
    /// Whether another attempt may help (default true).
    retryable: Option<bool>,
    /// Wait at least this long before the retry, instead of the backoff.
    retry_after_seconds: Option<f64>,
}

#[derive(InputObject)]
pub struct PublishEventInput {
    /// The lease of the step the event is about.
    lease_token: ID,
    /// A name from the template's `custom_events` (published as `custom.<name>`).
    name: String,
    /// Up to 64 KiB of JSON.
    payload: Option<Json<Value>>,
}

#[derive(SimpleObject)]
pub struct PublishEventPayload {
    event: crate::objects::Event,
}

#[derive(SimpleObject)]
pub struct StepPayload {
    step: Step,
}

fn token(id: &ID, field: &str) -> Result<Uuid> {
    crate::ids::parse_id(id, field).gql()
}

/// `input.leaseTokens`: at most a claim's worth, each a lease token.
fn tokens(ids: &[ID]) -> Result<Vec<Uuid>> {
    if ids.len() > worker::CLAIM_LIMIT.max as usize {
        return Err(ApiError::invalid(
            "input.leaseTokens",
            format!("at most {} tokens per call", worker::CLAIM_LIMIT.max),
        ))
        .gql();
    }
    ids.iter()
        .map(|id| token(id, "input.leaseTokens"))
        .collect()
}

#[Object]
impl WorkerMutation {
    /// Leases ready steps. With `waitSeconds`, answers as soon as work is ready, or empty at
    /// the deadline.
    async fn claim_steps(
        &self,
        ctx: &Context<'_>,
        input: ClaimStepsInput,
    ) -> Result<ClaimStepsPayload> {
        let granted = grant::<can::WorkerClaim>(ctx)?;
        let limit = worker::CLAIM_LIMIT
            .check(input.limit, "input.limit")
            .gql()?;
        let lease = worker::LEASE_SECONDS
            .check(input.lease_seconds, "input.leaseSeconds")
            .gql()?;
        let wait = worker::WAIT_SECONDS
            .check(input.wait_seconds, "input.waitSeconds")
            .gql()?;
        worker::check_worker_id(&input.worker_id, "input.workerId").gql()?;
        filter_list("input.handlers", input.handlers.as_ref()).gql()?;
        filter_list("input.namespaces", input.namespaces.as_ref()).gql()?;
        let handlers = input.handlers.unwrap_or_default();
        let namespaces = input.namespaces.unwrap_or_default();
        // The wait is not work: the request timeout makes room for it (once per request).
        let wait = Duration::from_secs(wait.into());
        let wait = match ctx.data_opt::<std::sync::Arc<crate::deadline::Deadline>>() {
            Some(deadline) => deadline.allow_wait(wait),
            None => wait,
        };
        if crate::access::principal(ctx)?.key.is_some() {
            ctx.data_unchecked::<std::sync::Arc<crate::quota::Quotas>>()
                .claim(&input.worker_id, granted.now())
                .gql()?;
        }
        let claimed = granted
            .claim(
                input.worker_id,
                handlers,
                &namespaces,
                limit,
                Duration::from_secs(lease.into()),
                wait,
            )
            .await?;
        let leases = claimed
            .into_iter()
            .map(|(claim, input)| Lease {
                lease_token: ID::from(claim.lease_token.to_string()),
                lease_expires_at: claim.lease_expires_at,
                step_id: ID::from(claim.step.id.to_string()),
                task_id: ID::from(claim.step.task_id.to_string()),
                name: claim.step.name,
                handler: claim.step.handler,
                config: Json(claim.step.config),
                attempt: claim.step.attempts,
                max_attempts: claim.step.max_attempts,
                namespace: input.namespace,
                template: input.template,
                context: Json(input.context),
                parent_results: Json(Value::Object(input.parent_results)),
                correlation_id: claim.correlation_id,
                traceparent: claim.trace_parent,
            })
            .collect();
        Ok(ClaimStepsPayload { leases })
    }

    /// Extends leases; a lease that was lost answers `alive: false`.
    async fn heartbeat_steps(
        &self,
        ctx: &Context<'_>,
        input: HeartbeatStepsInput,
    ) -> Result<HeartbeatStepsPayload> {
        let lease = worker::LEASE_SECONDS
            .check(input.lease_seconds, "input.leaseSeconds")
            .gql()?;
        let tokens = tokens(&input.lease_tokens)?;
        let granted = grant::<can::WorkerClaim>(ctx)?;
        let alive = granted
            .heartbeat(tokens.clone(), Duration::from_secs(lease.into()))
            .await?;
        Ok(HeartbeatStepsPayload {
            leases: tokens
                .into_iter()
                .map(|token| LeaseStatus {
                    lease_token: ID::from(token.to_string()),
                    alive: alive.contains_key(&token),
                    lease_expires_at: alive.get(&token).copied(),
                })
                .collect(),
        })
    }

    /// Gives leases back unfinished, for a worker that stops: each attempt is undone (it does
    /// not count) and its step can be claimed again at once (`step.released`).
    async fn release_steps(
        &self,
        ctx: &Context<'_>,
        input: ReleaseStepsInput,
    ) -> Result<ReleaseStepsPayload> {
        let tokens = tokens(&input.lease_tokens)?;
        let granted = grant::<can::WorkerClaim>(ctx)?;
        let steps = granted.release(tokens).await?;
        Ok(ReleaseStepsPayload { steps })
    }

    /// Records a successful attempt. A lost lease answers LEASE_LOST and records nothing.
    async fn complete_step(
        &self,
        ctx: &Context<'_>,
        input: CompleteStepInput,
    ) -> Result<StepPayload> {
        let granted = grant::<can::WorkerClaim>(ctx)?;
        let lease_token = token(&input.lease_token, "input.leaseToken")?;
        let results = crate::objects::object_or_empty(input.results);
        let step = granted.complete(lease_token, results).await?;
        Ok(StepPayload { step })
    }

    /// Publishes one of the template's custom events while the lease is held. A lost lease is
    /// LEASE_LOST; an undeclared name or an oversized payload is VALIDATION_FAILED.
    async fn publish_event(
        &self,
        ctx: &Context<'_>,
        input: PublishEventInput,
    ) -> Result<PublishEventPayload> {
        let granted = grant::<can::WorkerClaim>(ctx)?;
        let lease_token = token(&input.lease_token, "input.leaseToken")?;
        let payload = input.payload.map_or(Value::Null, |json| json.0);
        let event = granted
            .publish_event(lease_token, &input.name, payload)
            .await?;
        Ok(PublishEventPayload {
            event: crate::objects::Event(event),
        })
    }

    /// Records a failed attempt: retried after the backoff (or `retryAfterSeconds`) while
    /// attempts remain and the failure is retryable.
    async fn fail_step(&self, ctx: &Context<'_>, input: FailStepInput) -> Result<StepPayload> {
        if let Some(wait) = input.retry_after_seconds {
            worker::check_retry_after(wait, "input.retryAfterSeconds").gql()?;
        }
        let granted = grant::<can::WorkerClaim>(ctx)?;
        let step = granted
            .fail(AttemptFailure {
                lease_token: token(&input.lease_token, "input.leaseToken")?,
                message: input.message,
                retryable: input.retryable.unwrap_or(true),
                retry_after_seconds: input.retry_after_seconds,
            })
            .await?;
        Ok(StepPayload { step })
    }
}

/// Which work a worker waits for.
#[derive(InputObject, Default)]
pub struct StepsAvailableInput {
    /// Only steps with these handlers; all when omitted.
    handlers: Option<Vec<String>>,
    /// Only steps of tasks in these namespaces; all when omitted.
    namespaces: Option<Vec<String>>,
}

/// Claimable work exists.
#[derive(SimpleObject)]
pub struct StepsAvailable {
    /// How many steps are claimable (counted up to 1,000).
    ready_steps: u64,
    at: DateTime<Utc>,
}

/// The `stepsAvailable` subscription: a message whenever claimable work for the filter
/// exists after something changed (and at once if some already does), so workers can claim
/// instead of polling.
pub async fn steps_available(
    ctx: &Context<'_>,
    input: Option<StepsAvailableInput>,
) -> Result<impl futures::Stream<Item = StepsAvailable> + use<>> {
    let input = input.unwrap_or_default();
    filter_list("input.handlers", input.handlers.as_ref()).gql()?;
    filter_list("input.namespaces", input.namespaces.as_ref()).gql()?;
    let handlers = input.handlers.unwrap_or_default();
    let namespaces = input.namespaces.unwrap_or_default();
    let granted = grant::<can::WorkerClaim>(ctx)?;
    let Some(counts) = granted.ready_steps(handlers, &namespaces) else {
        // Out of scope entirely: no work will ever be reported.
        return Ok(futures::stream::pending().left_stream());
    };
    Ok(counts
        .map(|(ready_steps, at)| StepsAvailable { ready_steps, at })
        .right_stream())
}
