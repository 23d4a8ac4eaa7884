//! The API's operations as typed methods: each sends one GraphQL document and reads its
//! answer into the types of `types.rs`.

use crate::types::*;
use crate::{Client, Error, Result};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::time::Duration;

/// What every task read selects.
pub(crate) const TASK_FIELDS: &str = "id namespace templateName templateVersion state tags \
     correlationId priority createdAt completedAt completionPercentage \
     stepCounts { total pending inProgress complete error cancelled resolvedManually skipped }";

/// What every step read selects.
pub(crate) const STEP_FIELDS: &str =
    "id name handler state attempts maxAttempts startedAt completedAt durationMs lastError";

/// What every event read selects.
pub(crate) const EVENT_FIELDS: &str = "id cursor name namespace taskId stepId payload occurredAt";

const LEASE_FIELDS: &str = "leaseToken leaseExpiresAt stepId taskId name handler config \
     attempt maxAttempts namespace template context parentResults correlationId traceparent";

/// Reads the one root field of an answer.
fn field<T: DeserializeOwned>(mut data: Value, name: &str) -> Result<T> {
    let value = data
        .get_mut(name)
        .map(Value::take)
        .ok_or_else(|| Error::Protocol(format!("the answer has no `{name}`")))?;
    serde_json::from_value(value)
        .map_err(|err| Error::Protocol(format!("`{name}` does not have the expected shape: {err}")))
}

#[derive(Deserialize)]
struct Steps {
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct TaskOnly {
    task: Task,
}

impl Client {
    async fn root<T: DeserializeOwned>(
        &self,
        query: &str,
        variables: Value,
        name: &str,
    ) -> Result<T> {
        let data: Value = self.execute(query, variables).await?;
        field(data, name)
    }

    /// Registers a template version (YAML or JSON): `Created`, `Unchanged` for an identical
    /// definition, `Replaced` with `replace`; a different definition under an existing
    /// version is a `CONFLICT` without it.
    pub async fn register_template(&self, definition: &str, replace: bool) -> Result<Registration> {
        self.root(
            "mutation Register($input: RegisterTemplateInput!) { registerTemplate(input: $input) { result template { key namespace name version } } }",
            json!({ "input": { "definition": definition, "replace": replace } }),
            "registerTemplate",
        )
        .await
    }

    /// Starts a task.
    pub async fn create_task(&self, task: &NewTask) -> Result<Created> {
        let query = format!(
            "mutation Create($input: CreateTaskInput!) {{ createTask(input: $input) {{ created task {{ {TASK_FIELDS} }} }} }}"
        );
        self.root(&query, json!({ "input": task }), "createTask")
            .await
    }

    /// Starts many tasks in one transaction, all or none: one refused input refuses the call
    /// (`VALIDATION_FAILED`, each problem under `inputs[i]`). Answers each input in order; the
    /// server caps the number per call (1,000 by default).
    pub async fn create_tasks(&self, tasks: &[NewTask]) -> Result<Vec<Created>> {
        #[derive(Deserialize)]
        struct Batch {
            results: Vec<Created>,
        }
        let query = format!(
            "mutation CreateMany($inputs: [CreateTaskInput!]!) {{ createTasks(inputs: $inputs) {{ results {{ created task {{ {TASK_FIELDS} }} }} }} }}"
        );
        let batch: Batch = self
            .root(&query, json!({ "inputs": tasks }), "createTasks")
            .await?;
        Ok(batch.results)
    }

    /// A task with its context, its steps (with their results) and dependency edges.
    pub async fn task(&self, id: &str) -> Result<Task> {
        let query = format!(
            "query Task($id: ID!) {{ task(id: $id) {{ {TASK_FIELDS} context steps {{ {STEP_FIELDS} results }} edges {{ parentId childId }} }} }}"
        );
        self.root(&query, json!({ "id": id }), "task").await
    }

    /// Tasks matching `filter`, newest first, `first` at a time after `after`.
    pub async fn tasks(
        &self,
        filter: &TaskFilter,
        first: u32,
        after: Option<&str>,
    ) -> Result<TaskPage> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Connection {
            nodes: Vec<Task>,
            total_count: u64,
            page_info: PageInfo,
        }
        let query = format!(
            "query Tasks($filter: TaskFilterInput, $first: Int!, $after: String) {{ tasks(filter: $filter, first: $first, after: $after) {{ totalCount pageInfo {{ hasNextPage endCursor }} nodes {{ {TASK_FIELDS} }} }} }}"
        );
        let page: Connection = self
            .root(
                &query,
                json!({ "filter": filter, "first": first, "after": after }),
                "tasks",
            )
            .await?;
        Ok(TaskPage {
            tasks: page.nodes,
            total_count: page.total_count,
            next_cursor: page
                .page_info
                .has_next_page
                .then_some(page.page_info.end_cursor)
                .flatten(),
        })
    }

    /// Cancels a task and its unfinished steps (a finished task is a `CONFLICT`).
    pub async fn cancel_task(&self, id: &str, reason: Option<&str>) -> Result<Task> {
        self.task_change("cancelTask", "CancelTaskInput", id, reason)
            .await
    }

    /// Runs a failed task again (one that has not failed is a `CONFLICT`).
    pub async fn retry_task(&self, id: &str, reason: Option<&str>) -> Result<Task> {
        self.task_change("retryTask", "RetryTaskInput", id, reason)
            .await
    }

    async fn task_change(
        &self,
        mutation: &str,
        input: &str,
        id: &str,
        reason: Option<&str>,
    ) -> Result<Task> {
        let query = format!(
            "mutation Change($input: {input}!) {{ {mutation}(input: $input) {{ task {{ {TASK_FIELDS} }} }} }}"
        );
        let answer: TaskOnly = self
            .root(
                &query,
                json!({ "input": { "id": id, "reason": reason } }),
                mutation,
            )
            .await?;
        Ok(answer.task)
    }

    /// The event log's newest cursor now.
    pub async fn event_head(&self) -> Result<String> {
        self.root("query Head { eventHead }", json!({}), "eventHead")
            .await
    }

    /// A page of the event log after `after` (from the beginning when `None`).
    pub async fn events(
        &self,
        filter: &EventFilter,
        first: u32,
        after: Option<&str>,
    ) -> Result<EventPage> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Connection {
            nodes: Vec<Event>,
            page_info: PageInfo,
        }
        let query = format!(
            "query Events($filter: EventFilterInput, $first: Int!, $after: String) {{ events(filter: $filter, first: $first, after: $after) {{ pageInfo {{ hasNextPage endCursor }} nodes {{ {EVENT_FIELDS} }} }} }}"
        );
        let page: Connection = self
            .root(
                &query,
                json!({ "filter": filter, "first": first, "after": after }),
                "events",
            )
            .await?;
        Ok(EventPage {
            events: page.nodes,
            end_cursor: page.page_info.end_cursor,
            has_next_page: page.page_info.has_next_page,
        })
    }

    /// Leases up to `limit` ready steps of `handlers` (all when empty) in `namespaces` (all
    /// when empty) for `lease`, waiting up to `wait` (at most 60 s) for some.
    pub async fn claim_steps(&self, claim: &Claim<'_>) -> Result<Vec<Lease>> {
        #[derive(Deserialize)]
        struct Payload {
            leases: Vec<Lease>,
        }
        let query = format!(
            "mutation Claim($input: ClaimStepsInput!) {{ claimSteps(input: $input) {{ leases {{ {LEASE_FIELDS} }} }} }}"
        );
        let input = json!({
            "workerId": claim.worker_id,
            "handlers": (!claim.handlers.is_empty()).then_some(claim.handlers),
            "namespaces": (!claim.namespaces.is_empty()).then_some(claim.namespaces),
            "limit": claim.limit,
            "leaseSeconds": claim.lease.as_secs().max(1),
            "waitSeconds": claim.wait.as_secs(),
        });
        // The wait is not the server being slow.
        let timeout = self.inner.timeout + claim.wait;
        let data: Value = self
            .execute_within(&query, json!({ "input": input }), timeout)
            .await?;
        let payload: Payload = field(data, "claimSteps")?;
        Ok(payload.leases)
    }

    /// Extends leases by `lease` from now; each token's status.
    pub async fn heartbeat_steps(
        &self,
        tokens: &[String],
        lease: Duration,
    ) -> Result<Vec<LeaseStatus>> {
        #[derive(Deserialize)]
        struct Payload {
            leases: Vec<LeaseStatus>,
        }
        let payload: Payload = self
            .root(
                "mutation Heartbeat($input: HeartbeatStepsInput!) { heartbeatSteps(input: $input) { leases { leaseToken alive } } }",
                json!({ "input": { "leaseTokens": tokens, "leaseSeconds": lease.as_secs().max(1) } }),
                "heartbeatSteps",
            )
            .await?;
        Ok(payload.leases)
    }

    /// Records a successful attempt; a lost lease is a `LEASE_LOST` error.
    pub async fn complete_step(&self, lease_token: &str, results: &Value) -> Result<Step> {
        self.step_outcome(
            "completeStep",
            "CompleteStepInput",
            json!({ "leaseToken": lease_token, "results": results }),
        )
        .await
    }

    /// Records a failed attempt: retried after the backoff (or `retry_after`) while attempts
    /// remain and `retryable` holds.
    pub async fn fail_step(
        &self,
        lease_token: &str,
        message: &str,
        retryable: bool,
        retry_after: Option<Duration>,
    ) -> Result<Step> {
        self.step_outcome(
            "failStep",
            "FailStepInput",
            json!({
                "leaseToken": lease_token,
                "message": message,
                "retryable": retryable,
                "retryAfterSeconds": retry_after.map(|wait| wait.as_secs_f64()),
            }),
        )
        .await
    }

    async fn step_outcome(&self, mutation: &str, input_type: &str, input: Value) -> Result<Step> {
        #[derive(Deserialize)]
        struct Payload {
            step: Step,
        }
        let query = format!(
            "mutation Outcome($input: {input_type}!) {{ {mutation}(input: $input) {{ step {{ {STEP_FIELDS} }} }} }}"
        );
        let payload: Payload = self
            .root(&query, json!({ "input": input }), mutation)
            .await?;
        Ok(payload.step)
    }

    /// Gives leases back unfinished: their attempts do not count and the steps can be
    /// claimed again at once. Tokens that held no live lease are not in the answer.
    pub async fn release_steps(&self, tokens: &[String]) -> Result<Vec<Step>> {
        let query = format!(
            "mutation Release($input: ReleaseStepsInput!) {{ releaseSteps(input: $input) {{ steps {{ {STEP_FIELDS} }} }} }}"
        );
        let payload: Steps = self
            .root(
                &query,
                json!({ "input": { "leaseTokens": tokens } }),
                "releaseSteps",
            )
            .await?;
        Ok(payload.steps)
    }
}

/// A `claimSteps` request.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    /// Shown as the lease holder.
    pub worker_id: &'a str,
    pub handlers: &'a [String],
    pub namespaces: &'a [String],
    /// 1 to 100.
    pub limit: u32,
    pub lease: Duration,
    /// 0 to 60 s.
    pub wait: Duration,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PageInfo {
    has_next_page: bool,
    end_cursor: Option<String>,
}
