//! The worker protocol: external workers (any language, plain GraphQL) claim ready steps under
//! a lease, heartbeat long attempts, and report each attempt's outcome.

use crate::access::grant;
use crate::error::{ApiError, GqlResultExt};
use crate::limits::filter_list;
use crate::objects::Step;
use async_graphql::{Context, ID, InputObject, Json, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use tasker_domain::Permission;
use tasker_store::{AttemptFailure, ClaimRequest, Completion};
use uuid::Uuid;

const MAX_CLAIM: i32 = 100;
const MAX_LEASE_SECONDS: i32 = 3600;
const MAX_WAIT_SECONDS: i32 = 60;

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

fn bounded(value: Option<i32>, default: i32, range: (i32, i32), field: &str) -> Result<i32> {
    let value = value.unwrap_or(default);
    if (range.0..=range.1).contains(&value) {
        Ok(value)
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be between {} and {}, got {value}", range.0, range.1),
        ))
        .gql()
    }
}

fn token(id: &ID, field: &str) -> Result<Uuid> {
    crate::ids::parse_id(id, field).gql()
}

/// The step a worker holds, with its task (the lease was checked to be in scope).
async fn step_payload(
    granted: &crate::access::Granted<'_>,
    step: tasker_store::StepRecord,
) -> Result<StepPayload> {
    let task = granted.store.task(step.task_id).await.gql()?;
    Ok(StepPayload {
        step: Step::single(granted.store.clone(), step, task),
    })
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
        let granted = grant(ctx, Permission::WorkerClaim)?;
        let limit = bounded(input.limit, 10, (1, MAX_CLAIM), "input.limit")?;
        let lease = bounded(
            input.lease_seconds,
            60,
            (1, MAX_LEASE_SECONDS),
            "input.leaseSeconds",
        )?;
        let wait = bounded(
            input.wait_seconds,
            0,
            (0, MAX_WAIT_SECONDS),
            "input.waitSeconds",
        )?;
        if input.worker_id.trim().is_empty() || input.worker_id.chars().count() > 255 {
            return Err(ApiError::invalid(
                "input.workerId",
                "must have 1 to 255 characters",
            ))
            .gql();
        }
        filter_list("input.handlers", input.handlers.as_ref()).gql()?;
        filter_list("input.namespaces", input.namespaces.as_ref()).gql()?;
        let handlers = input.handlers.unwrap_or_default();
        let namespaces = input.namespaces.unwrap_or_default();
        // The wait is not work: the request timeout makes room for it (once per request).
        let wait = Duration::from_secs(wait as u64);
        let wait = match ctx.data_opt::<std::sync::Arc<crate::deadline::Deadline>>() {
            Some(deadline) => deadline.allow_wait(wait),
            None => wait,
        };
        if crate::access::principal(ctx)?.key.is_some() {
            ctx.data_unchecked::<std::sync::Arc<crate::quota::Quotas>>()
                .claim(&input.worker_id, granted.store.clock().now())
                .gql()?;
        }
        let Some(within) = granted.narrow(&namespaces) else {
            return Ok(ClaimStepsPayload { leases: Vec::new() });
        };
        let request = ClaimRequest {
            worker_id: input.worker_id,
            handlers,
            within,
            limit: limit as u32,
            lease: Duration::from_secs(lease as u64),
        };
        let claimed = granted.engine.claim(&request, wait).await.gql()?;
        let steps: Vec<_> = claimed.iter().map(|c| c.step.clone()).collect();
        let mut inputs = granted.store.step_inputs(&steps).await.gql()?;
        let leases = claimed
            .into_iter()
            .map(|claim| {
                let input = inputs.remove(&claim.step.id).unwrap_or_default();
                Lease {
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
                }
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
        let lease = bounded(
            input.lease_seconds,
            60,
            (1, MAX_LEASE_SECONDS),
            "input.leaseSeconds",
        )?;
        if input.lease_tokens.len() > MAX_CLAIM as usize {
            return Err(ApiError::invalid(
                "input.leaseTokens",
                format!("at most {MAX_CLAIM} tokens per call"),
            ))
            .gql();
        }
        let tokens = input
            .lease_tokens
            .iter()
            .map(|id| token(id, "input.leaseTokens"))
            .collect::<Result<Vec<_>>>()?;
        let granted = grant(ctx, Permission::WorkerClaim)?;
        let in_scope = granted.leases_in_scope(tokens.clone()).await?;
        let alive = granted
            .store
            .heartbeat(&in_scope, Duration::from_secs(lease as u64))
            .await
            .gql()?;
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

    /// Records a successful attempt. A lost lease answers LEASE_LOST and records nothing.
    async fn complete_step(
        &self,
        ctx: &Context<'_>,
        input: CompleteStepInput,
    ) -> Result<StepPayload> {
        let granted = grant(ctx, Permission::WorkerClaim)?;
        let lease_token = granted
            .lease(&input.lease_token, "input.leaseToken")
            .await?;
        let report = granted
            .engine
            .complete(&[Completion {
                lease_token,
                results: input
                    .results
                    .map(|json| json.0)
                    .unwrap_or_else(|| Value::Object(Default::default())),
            }])
            .await
            .gql()?;
        let step = report
            .completed
            .into_iter()
            .next()
            .ok_or(tasker_store::Error::LeaseLost)
            .gql()?;
        step_payload(&granted, step).await
    }

    /// Publishes one of the template's custom events while the lease is held. A lost lease is
    /// LEASE_LOST; an undeclared name or an oversized payload is VALIDATION_FAILED.
    async fn publish_event(
        &self,
        ctx: &Context<'_>,
        input: PublishEventInput,
    ) -> Result<PublishEventPayload> {
        let granted = grant(ctx, Permission::WorkerClaim)?;
        let lease_token = granted
            .lease(&input.lease_token, "input.leaseToken")
            .await?;
        let payload = input.payload.map_or(Value::Null, |json| json.0);
        let event = granted
            .store
            .publish_event(lease_token, &input.name, payload)
            .await
            .gql()?;
        Ok(PublishEventPayload {
            event: crate::objects::Event(event),
        })
    }

    /// Records a failed attempt: retried after the backoff (or `retryAfterSeconds`) while
    /// attempts remain and the failure is retryable.
    async fn fail_step(&self, ctx: &Context<'_>, input: FailStepInput) -> Result<StepPayload> {
        if let Some(wait) = input.retry_after_seconds
            && !(wait.is_finite() && (0.0..=tasker_domain::template::MAX_SECONDS).contains(&wait))
        {
            return Err(ApiError::invalid(
                "input.retryAfterSeconds",
                "must be a number of seconds from 0 to 30 days",
            ))
            .gql();
        }
        let granted = grant(ctx, Permission::WorkerClaim)?;
        let lease_token = granted
            .lease(&input.lease_token, "input.leaseToken")
            .await?;
        let report = granted
            .engine
            .fail(&AttemptFailure {
                lease_token,
                message: input.message,
                retryable: input.retryable.unwrap_or(true),
                retry_after_seconds: input.retry_after_seconds,
            })
            .await
            .gql()?;
        step_payload(&granted, report.step).await
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
    let granted = grant(ctx, Permission::WorkerClaim)?;
    let Some(within) = granted.narrow(&namespaces) else {
        // Out of scope entirely: no work will ever be reported.
        return Ok(futures::stream::pending().left_stream());
    };
    let store = granted.store.clone();
    let signal = granted.engine.work_signal();
    let counts = ctx.data_unchecked::<std::sync::Arc<ReadyCounts>>().clone();
    let filter = ReadyCounts::key(handlers, within);
    let state = (store, signal, counts, filter, true);
    Ok(futures::stream::unfold(
        state,
        |(store, mut signal, counts, filter, mut first)| async move {
            loop {
                // Counted afresh at first and on the safety sweep (time can make steps ready
                // without a signal); after a signal, shared with every subscriber alike.
                let mut fresh = first;
                if !first {
                    // The safety sweep's cadence backs up the signal.
                    match tokio::time::timeout(Duration::from_secs(5), signal.changed()).await {
                        Ok(Err(_)) => return None,
                        Ok(Ok(())) => {}
                        Err(_) => fresh = true,
                    }
                }
                first = false;
                let generation = *signal.borrow_and_update();
                let counted = counts
                    .count(&filter, generation, fresh, || {
                        store.count_ready_steps(&filter.0, &filter.1, 1000)
                    })
                    .await;
                match counted {
                    Ok(0) => {}
                    Ok(ready_steps) => {
                        let message = StepsAvailable {
                            ready_steps,
                            at: store.clock().now(),
                        };
                        return Some((message, (store, signal, counts, filter, first)));
                    }
                    Err(err) => tracing::warn!(error = %err, "counting ready steps failed"),
                }
            }
        },
    )
    .right_stream())
}

/// A `stepsAvailable` filter: handlers (sorted) and namespaces.
type ReadyFilter = (Vec<String>, tasker_domain::Within);

/// Ready-step counts shared by the `stepsAvailable` subscriptions of one filter: after a
/// signal, one count query serves every subscriber waiting on it, however many workers wait.
#[derive(Debug, Default)]
pub(crate) struct ReadyCounts {
    /// Per filter: the signal generation it was counted at, and the count.
    counts: tokio::sync::Mutex<HashMap<ReadyFilter, (u64, u64)>>,
}

/// Filters remembered at most; beyond, the memory starts over.
const MAX_REMEMBERED_FILTERS: usize = 1024;

impl ReadyCounts {
    fn key(mut handlers: Vec<String>, within: tasker_domain::Within) -> ReadyFilter {
        handlers.sort();
        handlers.dedup();
        (handlers, within)
    }

    /// The count for `filter` at `generation`: the one already made for it, unless `fresh`;
    /// otherwise `count` runs (one at a time, so subscribers waking together share it).
    async fn count<F, Fut>(
        &self,
        filter: &ReadyFilter,
        generation: u64,
        fresh: bool,
        count: F,
    ) -> tasker_store::Result<u64>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = tasker_store::Result<u64>>,
    {
        let mut counts = self.counts.lock().await;
        if !fresh
            && let Some((at, ready)) = counts.get(filter)
            && *at == generation
        {
            return Ok(*ready);
        }
        let ready = count().await?;
        if counts.len() >= MAX_REMEMBERED_FILTERS {
            counts.clear();
        }
        counts.insert(filter.clone(), (generation, ready));
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn one_count_per_signal_serves_every_subscriber_of_a_filter() {
        let counts = ReadyCounts::default();
        let queries = AtomicUsize::new(0);
        let count = |ready: u64| {
            queries.fetch_add(1, Ordering::SeqCst);
            async move { Ok(ready) }
        };
        let shop = ReadyCounts::key(vec!["b".into(), "a".into()], tasker_domain::Within::Any);
        let same = ReadyCounts::key(
            vec!["a".into(), "b".into(), "a".into()],
            tasker_domain::Within::Any,
        );
        assert_eq!(counts.count(&shop, 1, false, || count(3)).await.unwrap(), 3);
        assert_eq!(counts.count(&same, 1, false, || count(9)).await.unwrap(), 3);
        assert_eq!(
            queries.load(Ordering::SeqCst),
            1,
            "the same filter at the same signal"
        );
        assert_eq!(counts.count(&shop, 2, false, || count(4)).await.unwrap(), 4);
        assert_eq!(counts.count(&shop, 2, true, || count(5)).await.unwrap(), 5);
        let billing = tasker_domain::NamespaceSet::new(["billing".to_owned()]).unwrap();
        let other = ReadyCounts::key(vec![], tasker_domain::Within::Only(billing));
        assert_eq!(
            counts.count(&other, 2, false, || count(0)).await.unwrap(),
            0
        );
        assert_eq!(
            queries.load(Ordering::SeqCst),
            4,
            "a new signal, a fresh sweep, another filter"
        );
    }
}
