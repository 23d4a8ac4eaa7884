//! The questions people ask of a slow or stuck run: which chain of steps decides its length
//! (the critical path), how wide it runs (parallelism), and which unfinished steps hold back
//! the most of the rest (bottlenecks).

use crate::graph::Dag;
use crate::state::{StateMachine, StepState};
use std::collections::HashMap;

/// A step as the analysis sees it.
#[derive(Debug, Clone)]
pub struct StepTiming {
    pub state: StepState,
    pub handler: String,
    /// Seconds it took (finished) or has taken so far (running); `None` if it never ran.
    pub seconds: Option<f64>,
}

/// Seconds an attempt took (finished) or has taken so far (running, until `now`); `None` if
/// it never started or has no end.
pub fn attempt_seconds(
    state: StepState,
    started: Option<chrono::DateTime<chrono::Utc>>,
    completed: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<f64> {
    let started = started?;
    let end = match state {
        StepState::InProgress => now,
        _ => completed?,
    };
    Some((end - started).num_milliseconds().max(0) as f64 / 1000.0)
}

/// What the analysis found.
#[derive(Debug, Clone, PartialEq)]
pub struct Insight {
    /// Steps of the longest path, parents first.
    pub critical_path: Vec<usize>,
    pub critical_seconds: f64,
    /// Whether the path counts expected durations for steps that have not run.
    pub estimated: bool,
    /// The most steps on one dependency level.
    pub parallelism: usize,
    /// Unfinished steps and how many unfinished steps depend on them, most first (at most 5).
    pub bottlenecks: Vec<(usize, usize)>,
}

const MAX_BOTTLENECKS: usize = 5;

/// Analyzes a task's DAG; `None` when it has a cycle (a stored task never does).
pub fn analyze(dag: &Dag, steps: &[StepTiming]) -> Option<Insight> {
    let (weights, estimated) = expected_durations(steps);
    let (critical_path, critical_seconds) = dag.longest_path(&weights)?;
    let parallelism = dag
        .nodes_by_level()?
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0);
    let unfinished =
        |i: usize| !steps[i].state.satisfies_dependency() && !steps[i].state.is_terminal();
    let mut bottlenecks: Vec<(usize, usize)> = (0..steps.len())
        .filter(|&i| unfinished(i))
        .map(|i| (i, unfinished_descendants(dag, i, &unfinished)))
        .filter(|&(_, count)| count > 0)
        .collect();
    bottlenecks.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    bottlenecks.truncate(MAX_BOTTLENECKS);
    Some(Insight {
        critical_path,
        critical_seconds,
        estimated: estimated.iter().any(|&e| e),
        parallelism,
        bottlenecks,
    })
}

/// Actual durations where known; for steps that never ran, the mean of steps with the same
/// handler, else of all steps that ran, else 0. Also says which were estimated.
fn expected_durations(steps: &[StepTiming]) -> (Vec<f64>, Vec<bool>) {
    let mut by_handler: HashMap<&str, (f64, usize)> = HashMap::new();
    let mut all = (0.0, 0usize);
    for step in steps {
        if let Some(seconds) = step.seconds {
            let entry = by_handler.entry(step.handler.as_str()).or_default();
            entry.0 += seconds;
            entry.1 += 1;
            all.0 += seconds;
            all.1 += 1;
        }
    }
    let mean = |(sum, count): (f64, usize)| (count > 0).then(|| sum / count as f64);
    steps
        .iter()
        .map(|step| match step.seconds {
            Some(seconds) => (seconds, false),
            None if step.state.satisfies_dependency() => (0.0, false),
            None => {
                let expected = by_handler
                    .get(step.handler.as_str())
                    .copied()
                    .and_then(mean)
                    .or_else(|| mean(all))
                    .unwrap_or(0.0);
                (expected, true)
            }
        })
        .unzip()
}

fn unfinished_descendants(dag: &Dag, start: usize, unfinished: &impl Fn(usize) -> bool) -> usize {
    let mut seen = vec![false; dag.node_count()];
    let mut stack = dag.children(start).to_vec();
    let mut count = 0;
    while let Some(node) = stack.pop() {
        if std::mem::replace(&mut seen[node], true) {
            continue;
        }
        if unfinished(node) {
            count += 1;
        }
        stack.extend_from_slice(dag.children(node));
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_timed_to_their_end_or_to_now_while_running() {
        let at = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap();
        let timed = |state, started, completed| attempt_seconds(state, started, completed, at(100));
        assert_eq!(
            timed(StepState::Complete, Some(at(10)), Some(at(12))),
            Some(2.0)
        );
        assert_eq!(timed(StepState::InProgress, Some(at(40)), None), Some(60.0));
        assert_eq!(timed(StepState::Pending, None, None), None);
        assert_eq!(timed(StepState::Error, Some(at(10)), None), None);
        // A clock that moved back never gives a negative duration.
        assert_eq!(
            timed(StepState::Complete, Some(at(12)), Some(at(10))),
            Some(0.0)
        );
    }
    use StepState::*;

    fn timing(state: StepState, handler: &str, seconds: Option<f64>) -> StepTiming {
        StepTiming {
            state,
            handler: handler.into(),
            seconds,
        }
    }

    /// validate -> {reserve, charge} -> ship, as in the bundled order example.
    fn diamond() -> Dag {
        Dag::new(4, [(0, 1), (0, 2), (1, 3), (2, 3)])
    }

    #[test]
    fn a_finished_run_follows_its_slowest_branch() {
        let steps = [
            timing(Complete, "noop", Some(1.0)),
            timing(Complete, "http", Some(4.0)),
            timing(Complete, "http", Some(2.0)),
            timing(Complete, "noop", Some(1.0)),
        ];
        let insight = analyze(&diamond(), &steps).unwrap();
        assert_eq!(insight.critical_path, vec![0, 1, 3]);
        assert_eq!(insight.critical_seconds, 6.0);
        assert!(!insight.estimated);
        assert_eq!(insight.parallelism, 2);
        assert!(insight.bottlenecks.is_empty());
    }

    #[test]
    fn a_stuck_run_names_what_holds_it_back_and_estimates_the_rest() {
        let steps = [
            timing(Complete, "noop", Some(1.0)),
            timing(Error, "http", Some(3.0)),
            timing(InProgress, "http", Some(1.0)),
            timing(Pending, "noop", None),
        ];
        let insight = analyze(&diamond(), &steps).unwrap();
        // ship never ran: it is expected to take as long as the other noop step (1 s).
        assert_eq!(insight.critical_path, vec![0, 1, 3]);
        assert_eq!(insight.critical_seconds, 5.0);
        assert!(insight.estimated);
        assert_eq!(insight.bottlenecks, vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn a_fresh_fan_out_is_as_wide_as_its_widest_level() {
        let dag = Dag::new(
            6,
            [
                (0, 1),
                (0, 2),
                (0, 3),
                (0, 4),
                (1, 5),
                (2, 5),
                (3, 5),
                (4, 5),
            ],
        );
        let steps: Vec<_> = (0..6).map(|_| timing(Pending, "noop", None)).collect();
        let insight = analyze(&dag, &steps).unwrap();
        assert_eq!(insight.parallelism, 4);
        assert_eq!(insight.critical_seconds, 0.0);
        assert_eq!(
            insight.bottlenecks[0],
            (0, 5),
            "the root holds back everything"
        );
    }
}
