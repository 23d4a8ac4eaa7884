//! Prometheus metrics of one server: what its engine and API did (attempts by handler and
//! outcome with their durations, claims, waits, retries, GraphQL operations), and gauges set
//! from the database when scraped. Each [`Metrics`] has its own recorder, so servers sharing a
//! process (tests, benchmarks) never mix their figures; rendering uses
//! `metrics-exporter-prometheus`, not hand-formatted text.
//!
//! Label values are bounded: handler names, namespaces, states, outcomes, operation names of
//! the schema and error codes, never task or step ids.

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds buckets from a millisecond to ten minutes: step attempts, waits and GraphQL
/// operations all land somewhere in this range.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];

/// Every family: name, kind, unit, help. Documented in the README's "Operating" section.
pub const FAMILIES: &[(&str, Kind, Option<Unit>, &str)] = &[
    (
        "tasker_build_info",
        Kind::Gauge,
        None,
        "1, labelled with the running version.",
    ),
    (
        "tasker_start_time_seconds",
        Kind::Gauge,
        Some(Unit::Seconds),
        "When this server started, in seconds since the Unix epoch.",
    ),
    (
        "tasker_step_attempts_total",
        Kind::Counter,
        Some(Unit::Count),
        "Attempts this server recorded the end of, by handler and outcome (completed, failed, timed_out, lease_expired, released).",
    ),
    (
        "tasker_step_attempt_duration_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "How long attempts ran, from claim to outcome, by handler and outcome.",
    ),
    (
        "tasker_steps_claimed_total",
        Kind::Counter,
        Some(Unit::Count),
        "Steps leased by this server (to its pool or to external workers), by handler.",
    ),
    (
        "tasker_step_claim_wait_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Claim-to-start latency: how long a step was claimable before it was claimed, by handler.",
    ),
    (
        "tasker_step_retries_total",
        Kind::Counter,
        Some(Unit::Count),
        "Failed attempts that scheduled another attempt, by handler.",
    ),
    (
        "tasker_graphql_operations_total",
        Kind::Counter,
        Some(Unit::Count),
        "GraphQL queries and mutations, by type, root field and outcome (ok or the error code).",
    ),
    (
        "tasker_graphql_operation_duration_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "How long GraphQL queries and mutations took, by type and root field.",
    ),
    (
        "tasker_websocket_connections",
        Kind::Gauge,
        Some(Unit::Count),
        "Open GraphQL WebSocket connections.",
    ),
    (
        "tasker_subscriptions",
        Kind::Gauge,
        Some(Unit::Count),
        "Running GraphQL subscriptions.",
    ),
    (
        "tasker_tasks",
        Kind::Gauge,
        Some(Unit::Count),
        "Tasks in the database, by namespace and state (read when scraped).",
    ),
    (
        "tasker_steps",
        Kind::Gauge,
        Some(Unit::Count),
        "Steps in the database, by namespace and state (read when scraped).",
    ),
    (
        "tasker_ready_steps",
        Kind::Gauge,
        Some(Unit::Count),
        "The ready queue: steps claimable now (read when scraped).",
    ),
    (
        "tasker_oldest_ready_step_age_seconds",
        Kind::Gauge,
        Some(Unit::Seconds),
        "How long the longest-waiting claimable step has been claimable (0 when none).",
    ),
    (
        "tasker_event_log_head",
        Kind::Gauge,
        None,
        "The event log's newest position.",
    ),
    (
        "tasker_event_feed_lag_events",
        Kind::Gauge,
        Some(Unit::Count),
        "Events committed that this server's subscription feed has not read yet.",
    ),
    (
        "tasker_subscriber_lag_events",
        Kind::Gauge,
        Some(Unit::Count),
        "Events committed that the furthest-behind subscription on this server has not looked at yet.",
    ),
    (
        "tasker_claim_waiters",
        Kind::Gauge,
        Some(Unit::Count),
        "Waiting for work: parked long-poll claims, stepsAvailable subscriptions and the embedded pool.",
    ),
    (
        "tasker_database_up",
        Kind::Gauge,
        None,
        "1 when the database answered the scrape's queries; 0 when not (the gauges read from it then keep their last values).",
    ),
    (
        "tasker_db_connections",
        Kind::Gauge,
        Some(Unit::Count),
        "Database pool connections, by state (in_use, idle).",
    ),
];

/// The kind of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One server's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    /// The (namespace, state) pairs each grouped gauge has been given, to zero those gone.
    grouped: Mutex<HashMap<&'static str, HashSet<(String, String)>>>,
}

/// What an attempt came to, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Completed,
    Failed,
    TimedOut,
    LeaseExpired,
    Released,
}

impl AttemptOutcome {
    fn label(self) -> &'static str {
        match self {
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::TimedOut => "timed_out",
            AttemptOutcome::LeaseExpired => "lease_expired",
            AttemptOutcome::Released => "released",
        }
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        // Every histogram here measures seconds, so they share one set of buckets (a fixed,
        // non-empty list: the builder's only error cannot happen).
        let builder = PrometheusBuilder::new()
            .set_buckets(SECONDS_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        for (name, kind, unit, help) in FAMILIES {
            let name = metrics::KeyName::from_const_str(name);
            let help = metrics::SharedString::const_str(help);
            match kind {
                Kind::Counter => recorder.describe_counter(name, *unit, help),
                Kind::Gauge => recorder.describe_gauge(name, *unit, help),
                Kind::Histogram => recorder.describe_histogram(name, *unit, help),
            }
        }
        let metrics = Metrics {
            recorder,
            grouped: Mutex::default(),
        };
        metrics
            .gauge(
                "tasker_build_info",
                &[("version", env!("CARGO_PKG_VERSION").to_owned())],
            )
            .set(1.0);
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_secs_f64())
            .unwrap_or_default();
        metrics.gauge("tasker_start_time_seconds", &[]).set(started);
        metrics
    }

    fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(key, value)| Label::new(*key, value.clone()))
            .collect();
        Key::from_parts(name, labels)
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, String)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, String)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// An attempt ended (or was given back) after `seconds` of running.
    pub fn attempt(&self, handler: &str, outcome: AttemptOutcome, seconds: Option<f64>) {
        let labels = [
            ("handler", handler.to_owned()),
            ("outcome", outcome.label().to_owned()),
        ];
        self.counter("tasker_step_attempts_total", &labels)
            .increment(1);
        if let Some(seconds) = seconds {
            self.histogram("tasker_step_attempt_duration_seconds", &labels)
                .record(seconds.max(0.0));
        }
    }

    /// A step was leased after being claimable for `waited` seconds (when known).
    pub fn claimed(&self, handler: &str, waited: Option<f64>) {
        let labels = [("handler", handler.to_owned())];
        self.counter("tasker_steps_claimed_total", &labels)
            .increment(1);
        if let Some(waited) = waited {
            self.histogram("tasker_step_claim_wait_seconds", &labels)
                .record(waited.max(0.0));
        }
    }

    /// A failed attempt scheduled another one.
    pub fn retry(&self, handler: &str) {
        self.counter(
            "tasker_step_retries_total",
            &[("handler", handler.to_owned())],
        )
        .increment(1);
    }

    /// Sets the gauges read from the database at a scrape. A namespace and state that had a
    /// figure before and has none now reads 0 rather than keeping its old value.
    pub fn set_status(&self, status: &tasker_store::StoreStatus, pool: tasker_store::PoolStatus) {
        self.set_grouped("tasker_tasks", &status.tasks);
        self.set_grouped("tasker_steps", &status.steps);
        self.gauge("tasker_ready_steps", &[])
            .set(status.ready_steps as f64);
        self.gauge("tasker_oldest_ready_step_age_seconds", &[])
            .set(status.oldest_ready_ms.unwrap_or(0) as f64 / 1000.0);
        if let Some(head) = status.event_head {
            self.gauge("tasker_event_log_head", &[]).set(head as f64);
        }
        self.gauge("tasker_db_connections", &[("state", "in_use".to_owned())])
            .set(f64::from(pool.in_use));
        self.gauge("tasker_db_connections", &[("state", "idle".to_owned())])
            .set(f64::from(pool.idle));
    }

    fn set_grouped(&self, name: &'static str, rows: &[(String, String, u64)]) {
        let now: HashSet<(String, String)> = rows
            .iter()
            .map(|(namespace, state, _)| (namespace.clone(), state.clone()))
            .collect();
        let mut seen = self
            .grouped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = seen.entry(name).or_default();
        for (namespace, state) in before.difference(&now) {
            self.gauge(
                name,
                &[("namespace", namespace.clone()), ("state", state.clone())],
            )
            .set(0.0);
        }
        for (namespace, state, count) in rows {
            self.gauge(
                name,
                &[("namespace", namespace.clone()), ("state", state.clone())],
            )
            .set(*count as f64);
        }
        before.extend(now);
    }

    /// Folds the histograms' recent samples into their buckets; runs periodically (from the
    /// maintenance loop) so samples do not pile up between scrapes, or without any.
    pub fn upkeep(&self) {
        self.recorder.handle().run_upkeep();
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }
}
