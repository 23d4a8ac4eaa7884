//! The task and step state machines: which state changes are allowed, and a typed error for
//! every other one. Stored states use the lowercase names (`in_progress`); the API shows them
//! in SCREAMING_CASE.

use crate::{Error, Result};

/// What the task and step machines share: named states and a table of allowed successors.
pub trait StateMachine: Copy + PartialEq + 'static {
    /// "task" or "step", for error messages.
    const ENTITY: &'static str;
    /// Every state, in declaration order.
    fn all() -> &'static [Self];
    /// The stored name (`in_progress`).
    fn as_str(self) -> &'static str;
    /// The allowed next states.
    fn successors(self) -> &'static [Self];

    /// Reads a stored name back.
    fn parse(value: &str) -> Result<Self> {
        Self::all()
            .iter()
            .copied()
            .find(|state| state.as_str() == value)
            .ok_or_else(|| Error::UnknownState {
                entity: Self::ENTITY,
                value: value.to_owned(),
            })
    }

    /// The name the API shows (`IN_PROGRESS`): the schema's enum value, also used in event
    /// payloads so a client compares one spelling.
    fn api_name(self) -> &'static str;

    /// No further transition is possible.
    fn is_terminal(self) -> bool {
        self.successors().is_empty()
    }

    /// Checks a state change against the table.
    fn transition_to(self, to: Self) -> Result<Self> {
        if self.successors().contains(&to) {
            Ok(to)
        } else {
            Err(Error::InvalidTransition {
                entity: Self::ENTITY,
                from: self.as_str(),
                to: to.as_str(),
            })
        }
    }
}

/// The life of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskState {
    Pending,
    InProgress,
    Complete,
    Error,
    Cancelled,
    ResolvedManually,
}

/// The life of one workflow step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepState {
    Pending,
    InProgress,
    Complete,
    Error,
    Cancelled,
    ResolvedManually,
    Skipped,
}

impl TaskState {
    /// Nothing more happens to the task unless a person acts: finished for good, or failed
    /// (a person may retry or resolve it). A live view of one task ends here.
    pub fn has_ended(self) -> bool {
        self == TaskState::Error || self.is_terminal()
    }

    pub const ALL: [TaskState; 6] = [
        TaskState::Pending,
        TaskState::InProgress,
        TaskState::Complete,
        TaskState::Error,
        TaskState::Cancelled,
        TaskState::ResolvedManually,
    ];
}

impl StateMachine for TaskState {
    const ENTITY: &'static str = "task";

    fn all() -> &'static [Self] {
        &Self::ALL
    }

    fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::InProgress => "in_progress",
            TaskState::Complete => "complete",
            TaskState::Error => "error",
            TaskState::Cancelled => "cancelled",
            TaskState::ResolvedManually => "resolved_manually",
        }
    }

    fn api_name(self) -> &'static str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::InProgress => "IN_PROGRESS",
            TaskState::Complete => "COMPLETE",
            TaskState::Error => "ERROR",
            TaskState::Cancelled => "CANCELLED",
            TaskState::ResolvedManually => "RESOLVED_MANUALLY",
        }
    }

    /// A failed task can be retried (back to pending or straight to in progress), resolved by
    /// a person, or cancelled; finished tasks stay finished.
    fn successors(self) -> &'static [TaskState] {
        use TaskState::*;
        match self {
            // A task ends before it starts when a step of it is not started in time.
            Pending => &[InProgress, Complete, Error, Cancelled],
            InProgress => &[Complete, Error, Cancelled],
            Error => &[Pending, InProgress, Cancelled, ResolvedManually],
            Complete | Cancelled | ResolvedManually => &[],
        }
    }
}

impl StepState {
    pub const ALL: [StepState; 7] = [
        StepState::Pending,
        StepState::InProgress,
        StepState::Complete,
        StepState::Error,
        StepState::Cancelled,
        StepState::ResolvedManually,
        StepState::Skipped,
    ];

    /// Whether a re-run from a step may send a step in this state back to pending: it
    /// finished or failed; one running (or cancelled with its task) may not. Pending ones
    /// stay as they are.
    pub fn can_rerun(self) -> bool {
        self.satisfies_dependency() || self == StepState::Error
    }

    /// Where a step goes when its worker releases the attempt unfinished: the attempt does
    /// not count, so with no earlier attempt it is pending again, and after earlier failed
    /// attempts it is back in `error`, due at once.
    pub fn released_to(attempts_before: u32) -> StepState {
        if attempts_before == 0 {
            StepState::Pending
        } else {
            StepState::Error
        }
    }

    /// Whether a child may start once this parent is in this state.
    pub fn satisfies_dependency(self) -> bool {
        matches!(
            self,
            StepState::Complete | StepState::Skipped | StepState::ResolvedManually
        )
    }
}

impl StateMachine for StepState {
    const ENTITY: &'static str = "step";

    fn all() -> &'static [Self] {
        &Self::ALL
    }

    fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::InProgress => "in_progress",
            StepState::Complete => "complete",
            StepState::Error => "error",
            StepState::Cancelled => "cancelled",
            StepState::ResolvedManually => "resolved_manually",
            StepState::Skipped => "skipped",
        }
    }

    fn api_name(self) -> &'static str {
        match self {
            StepState::Pending => "PENDING",
            StepState::InProgress => "IN_PROGRESS",
            StepState::Complete => "COMPLETE",
            StepState::Error => "ERROR",
            StepState::Cancelled => "CANCELLED",
            StepState::ResolvedManually => "RESOLVED_MANUALLY",
            StepState::Skipped => "SKIPPED",
        }
    }

    /// `error` is where a failed attempt waits for its retry (back to in progress when claimed
    /// again, or pending when a person reopens it); a step that ran out of attempts is skipped
    /// only if its template says it is skippable (decided by the engine). A worker that stops
    /// releases its attempt through an operation of its own, outside this table (a person
    /// may not send a running step back to pending): see [`StepState::released_to`].
    fn successors(self) -> &'static [StepState] {
        use StepState::*;
        match self {
            // A pending step fails when nothing claims it within its start timeout.
            Pending => &[InProgress, Error, Cancelled, ResolvedManually, Skipped],
            InProgress => &[Complete, Error, Cancelled, ResolvedManually, Skipped],
            Error => &[InProgress, Pending, Cancelled, ResolvedManually, Skipped],
            Complete | Cancelled | ResolvedManually | Skipped => &[],
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for StepState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_names_are_the_stored_names_in_capitals() {
        for state in TaskState::ALL {
            assert_eq!(state.api_name(), state.as_str().to_ascii_uppercase());
        }
        for state in StepState::ALL {
            assert_eq!(state.api_name(), state.as_str().to_ascii_uppercase());
        }
    }

    #[test]
    fn a_released_attempt_goes_back_to_where_it_was_claimed_from() {
        assert_eq!(StepState::released_to(0), StepState::Pending);
        assert_eq!(StepState::released_to(2), StepState::Error);
    }

    #[test]
    fn finished_and_failed_steps_can_rerun_running_and_cancelled_ones_cannot() {
        use StepState::*;
        let rerunnable: Vec<StepState> = StepState::ALL
            .into_iter()
            .filter(|state| state.can_rerun())
            .collect();
        assert_eq!(rerunnable, [Complete, Error, ResolvedManually, Skipped]);
    }

    /// The whole task table, written out independently of `successors`: every pair is checked.
    #[test]
    fn every_task_pair_is_allowed_or_refused_as_the_table_says() {
        use TaskState::*;
        let allowed = [
            (Pending, InProgress),
            (Pending, Complete),
            (Pending, Error),
            (Pending, Cancelled),
            (InProgress, Complete),
            (InProgress, Error),
            (InProgress, Cancelled),
            (Error, Pending),
            (Error, InProgress),
            (Error, Cancelled),
            (Error, ResolvedManually),
        ];
        for from in TaskState::ALL {
            for to in TaskState::ALL {
                let result = from.transition_to(to);
                if allowed.contains(&(from, to)) {
                    assert_eq!(result, Ok(to), "{from} -> {to} should be allowed");
                } else {
                    assert_eq!(
                        result,
                        Err(crate::Error::InvalidTransition {
                            entity: "task",
                            from: from.as_str(),
                            to: to.as_str()
                        }),
                        "{from} -> {to} should be refused"
                    );
                }
            }
        }
    }

    #[test]
    fn every_step_pair_is_allowed_or_refused_as_the_table_says() {
        use StepState::*;
        let allowed = [
            (Pending, InProgress),
            (Pending, Error),
            (Pending, Cancelled),
            (Pending, ResolvedManually),
            (Pending, Skipped),
            (InProgress, Complete),
            (InProgress, Error),
            (InProgress, Cancelled),
            (InProgress, ResolvedManually),
            (InProgress, Skipped),
            (Error, InProgress),
            (Error, Pending),
            (Error, Cancelled),
            (Error, ResolvedManually),
            (Error, Skipped),
        ];
        for from in StepState::ALL {
            for to in StepState::ALL {
                let result = from.transition_to(to);
                if allowed.contains(&(from, to)) {
                    assert_eq!(result, Ok(to), "{from} -> {to} should be allowed");
                } else {
                    assert!(
                        matches!(
                            result,
                            Err(crate::Error::InvalidTransition { entity: "step", .. })
                        ),
                        "{from} -> {to} should be refused"
                    );
                }
            }
        }
    }

    #[test]
    fn terminal_states_and_dependency_satisfaction() {
        assert!(TaskState::Complete.is_terminal());
        assert!(!TaskState::Error.is_terminal());
        assert!(StepState::Skipped.is_terminal());
        let satisfying: Vec<_> = StepState::ALL
            .into_iter()
            .filter(|s| s.satisfies_dependency())
            .collect();
        assert_eq!(
            satisfying,
            [
                StepState::Complete,
                StepState::ResolvedManually,
                StepState::Skipped
            ]
        );
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in TaskState::ALL {
            assert_eq!(TaskState::parse(state.as_str()), Ok(state));
        }
        for state in StepState::ALL {
            assert_eq!(StepState::parse(state.as_str()), Ok(state));
        }
        assert!(matches!(
            TaskState::parse("running"),
            Err(Error::UnknownState { entity: "task", .. })
        ));
    }
}
