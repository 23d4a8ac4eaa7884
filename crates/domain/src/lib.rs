//! Tasker's pure rules: task templates and their validation, the DAG of steps, the task and
//! step state machines, and the clock abstraction everything time-dependent goes through.
//!
//! Nothing here performs I/O or needs an async runtime, so every rule is unit-tested directly.

pub mod clock;
pub mod concurrency;
pub mod event;
pub mod execution;
pub mod graph;
pub mod host;
pub mod insight;
pub mod permission;
pub mod priority;
pub mod rate_limit;
pub mod schedule;
pub mod state;
pub mod task;
pub mod template;
pub mod worker;

mod problem;

pub use clock::{Clock, ManualClock, SystemClock};
pub use concurrency::ConcurrencyPolicy;
pub use event::EventName;
pub use execution::{ExecutionStatus, Failure, FailureOutcome, StepProgress};
pub use graph::Dag;
pub use host::HostPattern;
pub use permission::{NamespaceScope, NamespaceSet, Permission, Permissions, Within};
pub use priority::Priority;
pub use problem::Problem;
pub use state::{StateMachine, StepState, TaskState};
pub use task::TaskRequest;
pub use template::{Backoff, ContextCheck, RetryPolicy, StepTemplate, TaskTemplate};

/// Every way a domain rule can refuse its input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A template definition broke one or more rules; every problem found is listed.
    #[error("the template definition is invalid: {}", problem::summary(.0))]
    InvalidTemplate(Vec<Problem>),
    /// A task context does not match its template's JSON Schema.
    #[error("the task context does not match the template's context_schema: {}", problem::summary(.0))]
    InvalidContext(Vec<Problem>),
    /// A request to start a task has malformed fields; every problem is listed.
    #[error("the task request is invalid: {}", problem::summary(.0))]
    InvalidRequest(Vec<Problem>),
    /// A state change that the state machine does not allow.
    #[error("a {entity} cannot go from {from} to {to}")]
    InvalidTransition {
        entity: &'static str,
        from: &'static str,
        to: &'static str,
    },
    /// A stored value that is not one of the known state names.
    #[error("unknown {entity} state {value:?}")]
    UnknownState { entity: &'static str, value: String },
}

/// Result alias for domain operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
