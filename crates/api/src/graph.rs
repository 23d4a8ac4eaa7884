//! What a task's steps add up to: counts by state, and the dependency graph with its levels,
//! critical path and bottlenecks, ready to draw.

use crate::enums::StepStateValue;
use crate::ids::id;
use async_graphql::{ComplexObject, ID, SimpleObject};
use chrono::{DateTime, Utc};
use tasker_domain::insight::{StepTiming, analyze, attempt_seconds};
use tasker_domain::{Dag, StepState};
use tasker_store::{EdgeRecord, StepRecord};
use uuid::Uuid;

/// A task's steps as a DAG over their positions in `steps`.
pub(crate) fn step_dag(steps: &[StepRecord], edges: &[EdgeRecord]) -> Dag {
    let ids: Vec<Uuid> = steps.iter().map(|step| step.id).collect();
    Dag::from_keys(
        &ids,
        edges
            .iter()
            .map(|edge| (edge.parent_step_id, edge.child_step_id)),
    )
}

/// Steps per state.
#[derive(SimpleObject, Default)]
pub struct StepCounts {
    total: u32,
    pending: u32,
    in_progress: u32,
    complete: u32,
    error: u32,
    cancelled: u32,
    resolved_manually: u32,
    skipped: u32,
}

impl StepCounts {
    pub(crate) fn of(steps: &[StepRecord]) -> Self {
        let mut counts = StepCounts::default();
        for step in steps {
            counts.total += 1;
            *match step.state {
                StepState::Pending => &mut counts.pending,
                StepState::InProgress => &mut counts.in_progress,
                StepState::Complete => &mut counts.complete,
                StepState::Error => &mut counts.error,
                StepState::Cancelled => &mut counts.cancelled,
                StepState::ResolvedManually => &mut counts.resolved_manually,
                StepState::Skipped => &mut counts.skipped,
            } += 1;
        }
        counts
    }
}

/// A task's dependency graph, ready to draw.
#[derive(SimpleObject)]
#[graphql(complex)]
pub struct TaskGraph {
    nodes: Vec<GraphNode>,
    edges: Vec<GraphEdge>,
    /// Steps grouped by dependency level: level 0 has no dependencies.
    levels: Vec<GraphLevel>,
    /// Steps with no dependencies.
    roots: Vec<ID>,
    /// Steps nothing depends on.
    leaves: Vec<ID>,
    /// Every step, parents before children.
    topological_order: Vec<ID>,
    /// The chain of steps that decides how long the run takes.
    critical_path: CriticalPath,
    /// The most steps that can run at once (the widest level).
    parallelism: usize,
    /// Unfinished steps holding back the most unfinished steps after them, most first.
    bottlenecks: Vec<Bottleneck>,
}

/// The longest path through the graph, weighted by how long each step took (or is taking);
/// steps that have not run count the mean of similar steps.
#[derive(SimpleObject)]
pub struct CriticalPath {
    step_ids: Vec<ID>,
    step_names: Vec<String>,
    total_seconds: f64,
    /// True when some steps on it have not run and their durations are estimates.
    estimated: bool,
}

#[derive(SimpleObject)]
pub struct Bottleneck {
    step_id: ID,
    name: String,
    state: StepStateValue,
    /// How many unfinished steps wait on it, directly or not.
    blocked_steps: usize,
}

#[ComplexObject]
impl TaskGraph {
    /// The number of levels (the longest chain of dependencies).
    async fn depth(&self) -> usize {
        self.levels.len()
    }
}

#[derive(SimpleObject)]
pub struct GraphNode {
    step_id: ID,
    name: String,
    handler: String,
    state: StepStateValue,
    level: usize,
    /// Attempts made so far.
    attempts: u32,
    /// When its current (or last) attempt started.
    started_at: Option<DateTime<Utc>>,
    /// When it finished.
    completed_at: Option<DateTime<Utc>>,
    /// How long its current attempt has run, or its last one took.
    duration_ms: Option<i64>,
}

/// Milliseconds the step's current attempt has run, or its last one took.
pub(crate) fn attempt_ms(step: &StepRecord, now: DateTime<Utc>) -> Option<i64> {
    attempt_seconds(step.state, step.attempt_started_at, step.completed_at, now)
        .map(|seconds| (seconds * 1000.0).round() as i64)
}

#[derive(SimpleObject)]
pub struct GraphEdge {
    /// The step depended on.
    from: ID,
    /// The step that depends on it.
    to: ID,
}

#[derive(SimpleObject)]
pub struct GraphLevel {
    level: usize,
    step_ids: Vec<ID>,
    step_names: Vec<String>,
}

impl TaskGraph {
    pub(crate) fn build(steps: &[StepRecord], edges: &[EdgeRecord], now: DateTime<Utc>) -> Self {
        let dag = step_dag(steps, edges);
        let timings: Vec<StepTiming> = steps
            .iter()
            .map(|step| StepTiming {
                state: step.state,
                handler: step.handler.clone(),
                seconds: attempt_seconds(
                    step.state,
                    step.attempt_started_at,
                    step.completed_at,
                    now,
                ),
            })
            .collect();
        let insight = analyze(&dag, &timings);
        // A stored task's graph is acyclic (templates are validated); fall back to flat levels.
        let levels = dag.levels().unwrap_or_else(|| vec![0; steps.len()]);
        let by_level = dag
            .nodes_by_level()
            .unwrap_or_else(|| vec![(0..steps.len()).collect()]);
        let order = dag
            .topological_order()
            .unwrap_or_else(|| (0..steps.len()).collect());
        let step_id = |i: usize| id(steps[i].id);
        TaskGraph {
            nodes: steps
                .iter()
                .zip(&levels)
                .map(|(step, &level)| GraphNode {
                    step_id: id(step.id),
                    name: step.name.clone(),
                    handler: step.handler.clone(),
                    state: step.state.into(),
                    level,
                    attempts: step.attempts,
                    started_at: step.attempt_started_at,
                    completed_at: step.completed_at,
                    duration_ms: attempt_ms(step, now),
                })
                .collect(),
            edges: edges
                .iter()
                .map(|edge| GraphEdge {
                    from: id(edge.parent_step_id),
                    to: id(edge.child_step_id),
                })
                .collect(),
            levels: by_level
                .into_iter()
                .enumerate()
                .map(|(level, nodes)| GraphLevel {
                    level,
                    step_ids: nodes.iter().map(|&i| step_id(i)).collect(),
                    step_names: nodes.iter().map(|&i| steps[i].name.clone()).collect(),
                })
                .collect(),
            roots: dag.roots().into_iter().map(step_id).collect(),
            leaves: dag.leaves().into_iter().map(step_id).collect(),
            topological_order: order.into_iter().map(step_id).collect(),
            critical_path: CriticalPath {
                step_ids: insight
                    .as_ref()
                    .map(|i| i.critical_path.iter().map(|&n| step_id(n)).collect())
                    .unwrap_or_default(),
                step_names: insight
                    .as_ref()
                    .map(|i| {
                        i.critical_path
                            .iter()
                            .map(|&n| steps[n].name.clone())
                            .collect()
                    })
                    .unwrap_or_default(),
                total_seconds: insight.as_ref().map_or(0.0, |i| i.critical_seconds),
                estimated: insight.as_ref().is_some_and(|i| i.estimated),
            },
            parallelism: insight.as_ref().map_or(0, |i| i.parallelism),
            bottlenecks: insight
                .map(|i| i.bottlenecks)
                .unwrap_or_default()
                .into_iter()
                .map(|(n, blocked_steps)| Bottleneck {
                    step_id: step_id(n),
                    name: steps[n].name.clone(),
                    state: steps[n].state.into(),
                    blocked_steps,
                })
                .collect(),
        }
    }
}
