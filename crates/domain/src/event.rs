//! The catalog of events: every state change appends one, in the same transaction as the
//! change, so the event log is a faithful history that streams can replay.

use crate::state::{StepState, TaskState};

/// The name of an event in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventName {
    TemplateRegistered,
    ScheduleCreated,
    ScheduleFired,
    SchedulePaused,
    ScheduleResumed,
    ScheduleDeleted,
    TaskCreated,
    TaskStarted,
    TaskCompleted,
    TaskFailed,
    TaskRetryRequested,
    TaskCancelled,
    TaskResolvedManually,
    TaskStepsReady,
    TaskWaiting,
    TaskQueued,
    TaskTimedOut,
    TaskFinalized,
    StepCreated,
    StepStarted,
    StepCompleted,
    StepFailed,
    StepRetryRequested,
    StepCancelled,
    StepResolvedManually,
    StepSkipped,
    StepBackoff,
    StepMaxRetriesReached,
    StepLeaseExpired,
    StepTimedOut,
    StepStartTimedOut,
    StepReleased,
}

/// The payload fields of a template's custom event (`custom.<name>`): where it happened and
/// the worker's `data`.
pub const CUSTOM_EVENT_FIELDS: &[&str] = &[
    "task_id",
    "step_id",
    "step",
    "namespace",
    "template",
    "correlation_id",
    "attempt",
    "data",
];

/// Where an event about a task happened: the first fields of its payload.
const TASK_SUBJECT: &[&str] = &["task_id", "namespace", "template", "correlation_id"];
/// Where an event about a step happened.
const STEP_SUBJECT: &[&str] = &[
    "task_id",
    "step_id",
    "step",
    "namespace",
    "template",
    "correlation_id",
];

impl EventName {
    pub const ALL: [EventName; 32] = [
        EventName::TemplateRegistered,
        EventName::ScheduleCreated,
        EventName::ScheduleFired,
        EventName::SchedulePaused,
        EventName::ScheduleResumed,
        EventName::ScheduleDeleted,
        EventName::TaskCreated,
        EventName::TaskStarted,
        EventName::TaskCompleted,
        EventName::TaskFailed,
        EventName::TaskRetryRequested,
        EventName::TaskCancelled,
        EventName::TaskResolvedManually,
        EventName::TaskStepsReady,
        EventName::TaskWaiting,
        EventName::TaskQueued,
        EventName::TaskTimedOut,
        EventName::TaskFinalized,
        EventName::StepCreated,
        EventName::StepStarted,
        EventName::StepCompleted,
        EventName::StepFailed,
        EventName::StepRetryRequested,
        EventName::StepCancelled,
        EventName::StepResolvedManually,
        EventName::StepSkipped,
        EventName::StepBackoff,
        EventName::StepMaxRetriesReached,
        EventName::StepLeaseExpired,
        EventName::StepTimedOut,
        EventName::StepStartTimedOut,
        EventName::StepReleased,
    ];

    /// The changes of a task's own state: what a list of tasks follows.
    pub const TASK_LIFECYCLE: [EventName; 7] = [
        EventName::TaskCreated,
        EventName::TaskStarted,
        EventName::TaskCompleted,
        EventName::TaskFailed,
        EventName::TaskRetryRequested,
        EventName::TaskCancelled,
        EventName::TaskResolvedManually,
    ];

    pub fn as_str(self) -> &'static str {
        use EventName::*;
        match self {
            TemplateRegistered => "template.registered",
            ScheduleCreated => "schedule.created",
            ScheduleFired => "schedule.fired",
            SchedulePaused => "schedule.paused",
            ScheduleResumed => "schedule.resumed",
            ScheduleDeleted => "schedule.deleted",
            TaskCreated => "task.created",
            TaskStarted => "task.started",
            TaskCompleted => "task.completed",
            TaskFailed => "task.failed",
            TaskRetryRequested => "task.retry_requested",
            TaskCancelled => "task.cancelled",
            TaskResolvedManually => "task.resolved_manually",
            TaskStepsReady => "task.steps_ready",
            TaskWaiting => "task.waiting",
            TaskQueued => "task.queued",
            TaskTimedOut => "task.timed_out",
            TaskFinalized => "task.finalized",
            StepCreated => "step.created",
            StepStarted => "step.started",
            StepCompleted => "step.completed",
            StepFailed => "step.failed",
            StepRetryRequested => "step.retry_requested",
            StepCancelled => "step.cancelled",
            StepResolvedManually => "step.resolved_manually",
            StepSkipped => "step.skipped",
            StepBackoff => "step.backoff",
            StepMaxRetriesReached => "step.max_retries_reached",
            StepLeaseExpired => "step.lease_expired",
            StepTimedOut => "step.timed_out",
            StepStartTimedOut => "step.start_timed_out",
            StepReleased => "step.released",
        }
    }

    /// What the event means, for the catalog.
    pub fn description(self) -> &'static str {
        use EventName::*;
        match self {
            TemplateRegistered => {
                "A template version was registered, or replaced with replace: true."
            }
            ScheduleCreated => "A schedule was created: its cron (or one time) and next tick.",
            ScheduleFired => {
                "A schedule's tick started a task (task_id); skipped counts the missed ticks \
                 its catch-up policy dropped."
            }
            SchedulePaused => "A schedule was paused: no tick fires until it is resumed.",
            ScheduleResumed => {
                "A paused schedule was resumed: it fires again from its next tick (the ticks \
                 of the pause are not made up)."
            }
            ScheduleDeleted => "A schedule was deleted.",
            TaskCreated => "A task was created with its steps, all pending.",
            TaskStarted => {
                "A task started running: its first step was claimed, or a person reopened it."
            }
            TaskCompleted => "Every step of a task is complete, skipped or resolved.",
            TaskFailed => "A step failed for good and nothing else in the task can run.",
            TaskRetryRequested => {
                "A person retried a failed task: it went back to pending with its failed steps \
                 (listed in steps), and starts again at once."
            }
            TaskCancelled => "A task was cancelled; its unfinished steps were cancelled with it.",
            TaskResolvedManually => "A person marked a failed task as resolved.",
            TaskStepsReady => {
                "Steps of a task became claimable: it was created, their parents finished, \
                 or a person reopened them. A failed step whose backoff ends is announced by \
                 its step.backoff event instead."
            }
            TaskWaiting => {
                "After a change, nothing in a running task can be claimed or is running: it \
                 waits for a failed step's retry time (the payload says the earliest)."
            }
            TaskQueued => {
                "A new task waits for a slot of its concurrency key (the key is at its limit): \
                 its steps start, with task.steps_ready, as soon as a slot frees."
            }
            TaskTimedOut => {
                "A task ran past its template's timeout: it is cancelled with its unfinished \
                 steps (task.cancelled follows)."
            }
            TaskFinalized => {
                "A task reached its outcome on its own (complete or error): a summary with its \
                 duration and step counts, following task.completed or task.failed."
            }
            StepCreated => {
                "A step was created, pending, with its task; the payload names its handler and \
                 the steps it depends on, so a live graph can be drawn from the events alone."
            }
            StepStarted => "A step was claimed under a lease and an attempt began.",
            StepCompleted => "An attempt succeeded; the step's results are recorded.",
            StepFailed => {
                "An attempt failed; the payload says whether and when it will be retried."
            }
            StepRetryRequested => {
                "A person reopened a step with fresh attempts: a failed one (retry), or a step \
                 and everything downstream of it (re-run, with rerun_from naming where it began)."
            }
            StepCancelled => "A step was cancelled with its task.",
            StepResolvedManually => {
                "A person marked a step done, with the results its dependents see."
            }
            StepSkipped => {
                "A step was skipped (by a person, or when a skippable step ran out of attempts)."
            }
            StepBackoff => {
                "A failed step waits before its next attempt; the payload says until when."
            }
            StepMaxRetriesReached => {
                "A step used its last allowed attempt and will not be retried."
            }
            StepLeaseExpired => {
                "A worker's lease ran out without a heartbeat; the attempt counts as failed."
            }
            StepTimedOut => "An attempt ran past its step's timeout and counts as failed.",
            StepStartTimedOut => {
                "A claimable step waited longer than its start_timeout for a worker: it fails \
                 for good, or is skipped when skippable (step.failed or step.skipped follows)."
            }
            StepReleased => {
                "A worker gave its lease back unfinished (it is stopping): the attempt does not \
                 count and the step can be claimed again at once."
            }
        }
    }

    /// The fields its payload carries (those that apply): where it happened, then its own.
    pub fn payload_fields(self) -> Vec<&'static str> {
        use EventName::*;
        let (subject, own): (&[&str], &[&str]) = match self {
            TemplateRegistered => (
                &[],
                &[
                    "template_id",
                    "namespace",
                    "template",
                    "version",
                    "replaced",
                    "steps",
                ],
            ),
            ScheduleCreated | SchedulePaused | ScheduleResumed | ScheduleDeleted => (
                &[],
                &[
                    "schedule_id",
                    "schedule",
                    "namespace",
                    "template",
                    "cron",
                    "timezone",
                    "next_fire_ms",
                ],
            ),
            ScheduleFired => (
                &["task_id", "namespace", "correlation_id"],
                &["schedule_id", "schedule", "template", "tick_ms", "skipped"],
            ),
            TaskCreated | TaskStarted | TaskCompleted | TaskFailed | TaskRetryRequested
            | TaskCancelled | TaskResolvedManually => (
                TASK_SUBJECT,
                &[
                    "from_state",
                    "to_state",
                    "reason",
                    "initiator",
                    "source_system",
                    "version",
                    "triggered_by",
                    "steps",
                ],
            ),
            TaskStepsReady => (TASK_SUBJECT, &["steps", "step_ids", "count"]),
            TaskWaiting => (TASK_SUBJECT, &["waiting_steps", "retry_at_ms"]),
            TaskQueued => (TASK_SUBJECT, &["concurrency_key", "limit"]),
            TaskTimedOut => (TASK_SUBJECT, &["timeout_ms"]),
            TaskFinalized => (
                TASK_SUBJECT,
                &[
                    "outcome",
                    "duration_ms",
                    "steps_total",
                    "steps_done",
                    "steps_failed",
                ],
            ),
            StepCreated => (
                STEP_SUBJECT,
                &[
                    "from_state",
                    "to_state",
                    "handler",
                    "position",
                    "depends_on",
                    "depends_on_ids",
                ],
            ),
            StepStarted
            | StepCompleted
            | StepFailed
            | StepRetryRequested
            | StepCancelled
            | StepResolvedManually
            | StepSkipped
            | StepBackoff
            | StepMaxRetriesReached
            | StepLeaseExpired
            | StepTimedOut
            | StepStartTimedOut
            | StepReleased => (
                STEP_SUBJECT,
                &[
                    "from_state",
                    "to_state",
                    "attempt",
                    "worker_id",
                    "duration_ms",
                    "error",
                    "retryable",
                    "retry_at_ms",
                    "delay_ms",
                    "max_attempts",
                    "reason",
                    "triggered_by",
                    "rerun_from",
                    "start_timeout_ms",
                    "waited_ms",
                ],
            ),
        };
        [subject, own].concat()
    }

    /// The catalog entry with this name.
    pub fn parse(name: &str) -> Option<EventName> {
        Self::ALL.into_iter().find(|event| event.as_str() == name)
    }

    /// Whether a subscriber may ask for events named `name`: one of the catalog's, or a
    /// well-formed custom one (`custom.<name>`).
    pub fn is_subscribable(name: &str) -> bool {
        EventName::parse(name).is_some()
            || name
                .strip_prefix(crate::template::CUSTOM_EVENT_PREFIX)
                .is_some_and(|custom| crate::template::check_name(custom).is_ok())
    }

    /// The event a task's arrival in `to` (from `from`, or newly created) stands for.
    pub fn of_task_transition(from: Option<TaskState>, to: TaskState) -> EventName {
        use EventName::*;
        match (from, to) {
            (None, _) => TaskCreated,
            (Some(_), TaskState::Pending) => TaskRetryRequested,
            (Some(_), TaskState::InProgress) => TaskStarted,
            (Some(_), TaskState::Complete) => TaskCompleted,
            (Some(_), TaskState::Error) => TaskFailed,
            (Some(_), TaskState::Cancelled) => TaskCancelled,
            (Some(_), TaskState::ResolvedManually) => TaskResolvedManually,
        }
    }

    /// The event a step's arrival in `to` (from `from`, or newly created) stands for.
    pub fn of_step_transition(from: Option<StepState>, to: StepState) -> EventName {
        use EventName::*;
        match (from, to) {
            (None, _) => StepCreated,
            (Some(_), StepState::Pending) => StepRetryRequested,
            (Some(_), StepState::InProgress) => StepStarted,
            (Some(_), StepState::Complete) => StepCompleted,
            (Some(_), StepState::Error) => StepFailed,
            (Some(_), StepState::Cancelled) => StepCancelled,
            (Some(_), StepState::ResolvedManually) => StepResolvedManually,
            (Some(_), StepState::Skipped) => StepSkipped,
        }
    }
}

impl std::fmt::Display for EventName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_dotted() {
        let mut names: Vec<_> = EventName::ALL.iter().map(|e| e.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), EventName::ALL.len());
        assert!(names.iter().all(|n| n.split('.').count() == 2));
    }

    #[test]
    fn subscribers_may_ask_for_catalog_and_well_formed_custom_names() {
        assert!(EventName::is_subscribable("task.completed"));
        assert!(EventName::is_subscribable("custom.invoice_sent"));
        for bad in [
            "task.unknown",
            "custom.",
            "custom.has space",
            "invoice_sent",
            "",
        ] {
            assert!(!EventName::is_subscribable(bad), "{bad}");
        }
    }

    #[test]
    fn transitions_map_to_lifecycle_events() {
        assert_eq!(
            EventName::of_task_transition(None, TaskState::Pending),
            EventName::TaskCreated
        );
        assert_eq!(
            EventName::of_task_transition(Some(TaskState::Error), TaskState::Pending),
            EventName::TaskRetryRequested
        );
        assert_eq!(
            EventName::of_step_transition(Some(StepState::Pending), StepState::Cancelled),
            EventName::StepCancelled
        );
        assert_eq!(
            EventName::of_step_transition(Some(StepState::InProgress), StepState::Skipped),
            EventName::StepSkipped
        );
    }
}
