//! The GraphQL mirrors of the domain's state enums, generated from them (`remote`), so the
//! schema and the rules can never disagree on a state.

use async_graphql::Enum;

/// Where a task is in its life.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "TaskState", remote = "tasker_domain::TaskState")]
pub enum TaskStateValue {
    Pending,
    InProgress,
    Complete,
    Error,
    Cancelled,
    ResolvedManually,
}

/// Where a step is in its life.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "StepState", remote = "tasker_domain::StepState")]
pub enum StepStateValue {
    Pending,
    InProgress,
    Complete,
    Error,
    Cancelled,
    ResolvedManually,
    Skipped,
}

/// Where a task's execution stands.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "ExecutionStatus", remote = "tasker_domain::ExecutionStatus")]
pub enum ExecutionStatusValue {
    /// At least one step can be claimed now.
    HasReadySteps,
    /// Steps are running and nothing else can start yet.
    Processing,
    /// Nothing runs; failed steps wait for their retry time.
    WaitingForRetry,
    /// A step failed for good and nothing else can run.
    BlockedByFailures,
    /// Every step is complete, skipped or resolved.
    AllComplete,
    /// Nothing can run and nothing failed: the remaining steps were cancelled.
    Halted,
    /// The task waits for a slot of its concurrency key: nothing of it runs until one frees.
    WaitingForConcurrencySlot,
    /// Steps are ready but their rate limit is spent, and nothing else can start: they start
    /// as the limit frees.
    WaitingForRateLimit,
}

/// What happens to a new task when its concurrency key is at its limit.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(
    name = "ConcurrencyStrategy",
    remote = "tasker_domain::concurrency::Strategy"
)]
pub enum ConcurrencyStrategyValue {
    /// It waits, and starts as soon as a slot frees (higher priority first, then oldest).
    Queue,
    /// It is cancelled at once: the running ones go on.
    CancelNewest,
    /// The oldest holders are cancelled to make room for it.
    CancelInProgress,
}

/// What a schedule does with the ticks missed while no server ran.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "CatchUp", remote = "tasker_domain::schedule::CatchUp")]
pub enum CatchUpValue {
    /// Missed ticks are dropped; the schedule goes on from the next one.
    Skip,
    /// One task for all the missed ticks (for the latest of them).
    RunOnce,
    /// One task per missed tick, oldest first (at most 100 per sweep).
    RunAll,
}
