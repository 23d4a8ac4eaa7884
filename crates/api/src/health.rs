//! `/health/status`: what the database holds within the caller's scope, and whether the
//! server is healthy by documented thresholds (README, "Operating").

use serde_json::{Value, json};
use std::time::Duration;
use tasker_store::{PoolStatus, StoreStatus};

/// This process among the replicas: `TASKER_REPLICA_ID`, or host name and process id.
pub(crate) fn replica_id() -> String {
    if let Ok(id) = std::env::var("TASKER_REPLICA_ID")
        && !id.trim().is_empty()
    {
        return id.trim().to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .map(|host| host.trim().to_owned())
        .unwrap_or_default();
    let host = if host.is_empty() { "localhost" } else { &host };
    format!("{host}-{}", std::process::id())
}

/// The verdict: healthy unless a threshold is crossed, with each crossed one named.
pub(crate) struct Report {
    pub(crate) healthy: bool,
    problems: Vec<String>,
}

impl Report {
    /// Unhealthy when the server drains, when writes fail (a fault episode is on), or when a
    /// step has waited claimable longer than `max_ready_age` (nothing claims that work).
    pub(crate) fn of(
        status: &StoreStatus,
        draining: bool,
        write_fault: Option<&'static str>,
        max_ready_age: Duration,
    ) -> Report {
        let mut problems = Vec::new();
        if draining {
            problems.push("the server is draining: it is stopping".to_owned());
        }
        if let Some(fault) = write_fault {
            problems.push(format!("writes are failing ({fault})"));
        }
        let oldest =
            Duration::from_millis(u64::try_from(status.oldest_ready_ms.unwrap_or(0)).unwrap_or(0));
        if oldest > max_ready_age {
            problems.push(format!(
                "a step has waited {} s to be claimed (threshold {} s): is any worker running its handler?",
                oldest.as_secs(),
                max_ready_age.as_secs()
            ));
        }
        Report {
            healthy: problems.is_empty(),
            problems,
        }
    }

    pub(crate) fn to_json(&self, status: &StoreStatus, pool: PoolStatus) -> Value {
        use tasker_domain::StateMachine as _;
        // Every state, 0 when none: a stable shape for whoever reads it.
        let mut tasks: serde_json::Map<String, Value> = tasker_domain::TaskState::ALL
            .iter()
            .map(|state| (state.as_str().to_owned(), json!(0)))
            .collect();
        let mut by_namespace = serde_json::Map::new();
        for (namespace, state, count) in &status.tasks {
            let total = tasks.entry(state.clone()).or_insert(json!(0));
            *total = json!(total.as_u64().unwrap_or(0) + count);
            let entry = by_namespace
                .entry(namespace.clone())
                .or_insert_with(|| json!({}));
            entry[state.as_str()] = json!(count);
        }
        json!({
            "status": if self.healthy { "ok" } else { "unhealthy" },
            "problems": self.problems,
            "tasks": tasks,
            "tasks_by_namespace": by_namespace,
            "ready_steps": status.ready_steps,
            "oldest_ready_seconds": status.oldest_ready_ms.unwrap_or(0) as f64 / 1000.0,
            "event_log_head": status.event_head,
            "pool": { "in_use": pool.in_use, "idle": pool.idle },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_fault_or_an_old_ready_step_makes_the_server_unhealthy() {
        let fresh = StoreStatus {
            oldest_ready_ms: Some(1_000),
            ..StoreStatus::default()
        };
        let limit = Duration::from_secs(300);
        assert!(Report::of(&fresh, false, None, limit).healthy);
        assert!(!Report::of(&fresh, true, None, limit).healthy);
        let stale = StoreStatus {
            oldest_ready_ms: Some(301_000),
            ..StoreStatus::default()
        };
        let report = Report::of(&stale, false, None, limit);
        assert!(!report.healthy);
        assert!(report.problems[0].contains("waited 301 s"));
        assert!(!Report::of(&fresh, false, Some("disk_full"), limit).healthy);
    }

    #[test]
    fn tasks_are_summed_across_namespaces_and_kept_per_namespace() {
        let status = StoreStatus {
            tasks: vec![
                ("a".into(), "complete".into(), 2),
                ("b".into(), "complete".into(), 3),
                ("b".into(), "error".into(), 1),
            ],
            ..StoreStatus::default()
        };
        let body = Report::of(&status, false, None, Duration::from_secs(1))
            .to_json(&status, PoolStatus::default());
        assert_eq!(body["tasks"]["complete"], 5);
        assert_eq!(body["tasks"]["error"], 1);
        assert_eq!(body["tasks"]["pending"], 0, "every state is there");
        assert_eq!(
            body["tasks_by_namespace"]["b"],
            json!({ "complete": 3, "error": 1 })
        );
    }
}
