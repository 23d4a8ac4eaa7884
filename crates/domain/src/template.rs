//! Task templates: parsing a YAML or JSON definition, validating it (every problem at once,
//! each with its path) and the normalized form that is stored and compared.
//!
//! Parsing goes through an untyped JSON value first and reads it field by field, so that one
//! pass reports every problem instead of stopping at the first one, and so that no input can
//! make it panic.

use crate::concurrency::{ConcurrencyPolicy, KeyExpression, MAX_LIMIT, StepConcurrency, Strategy};
use crate::graph::Dag;
use crate::priority::Priority;
use crate::problem::Problem;
use crate::rate_limit::{self, RateLimit};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// The largest definition accepted, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 1024 * 1024;
/// The most steps one template may have.
pub const MAX_STEPS: usize = 10_000;
/// The most attempts a retry policy may allow.
pub const MAX_ATTEMPTS: u32 = 100;
/// The longest timeout or backoff cap, in seconds (30 days).
pub const MAX_SECONDS: f64 = 30.0 * 24.0 * 3600.0;

/// Whether `seconds` is a duration a template or a worker may ask for: 0 to [`MAX_SECONDS`].
pub fn seconds_in_range(seconds: f64) -> bool {
    seconds.is_finite() && (0.0..=MAX_SECONDS).contains(&seconds)
}
const MAX_NAME_LEN: usize = 64;
const MAX_HANDLER_LEN: usize = 128;
const MAX_DESCRIPTION_LEN: usize = 4096;
const MAX_PROBLEMS: usize = 200;

/// A validated, normalized task template (`namespace/name@version`). Its JSON form (serde) is
/// what the store keeps and compares to decide whether a registration is identical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskTemplate {
    pub namespace: String,
    pub name: String,
    pub version: semver::Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_schema: Option<Value>,
    pub steps: Vec<StepTemplate>,
    /// The priority of its tasks when their creator does not choose one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// How many of its tasks with the same key may run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyPolicy>,
    /// Seconds a task may take from its creation to its end; past them it is cancelled
    /// (`task.timed_out`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Events its workers may publish (as `custom.<name>`) while they hold a lease.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_events: Vec<CustomEvent>,
}

/// An event a template declares for its workers to publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomEvent {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// How a person names a template: `namespace/name@version`, or `namespace/name` for its
/// newest version.
pub fn reference(namespace: &str, name: &str, version: Option<impl std::fmt::Display>) -> String {
    match version {
        Some(version) => format!("{namespace}/{name}@{version}"),
        None => format!("{namespace}/{name}"),
    }
}

/// The prefix that keeps custom event names apart from the catalog's.
pub const CUSTOM_EVENT_PREFIX: &str = "custom.";

/// The largest payload a custom event may carry, serialized.
pub const MAX_CUSTOM_PAYLOAD_BYTES: usize = 64 * 1024;

/// One node of the template's DAG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTemplate {
    pub name: String,
    pub handler: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub config: Value,
    pub depends_on: Vec<String>,
    pub retry: RetryPolicy,
    /// Seconds an attempt may run before it counts as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    pub skippable: bool,
    /// Its own priority, whatever its task's (a cleanup step that may wait, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Seconds it may wait, claimable, for a worker to start it; past them it fails
    /// (`step.start_timed_out`), or is skipped when skippable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<f64>,
    /// Each attempt starts only within this limit's rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// At most so many attempts of its bucket run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<StepConcurrency>,
}

/// How often a step may run and how long to wait between attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Total executions allowed, the first one included.
    pub max_attempts: u32,
    /// `false` means exactly one attempt.
    pub retryable: bool,
    pub backoff: Backoff,
}

/// Exponential backoff: `base × factor^(attempt-1)` seconds, capped at `max`, with ±`jitter`
/// as a fraction of the delay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub base: f64,
    pub factor: f64,
    pub max: f64,
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retryable: true,
            backoff: Backoff::default(),
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: 1.0,
            factor: 2.0,
            max: 60.0,
            jitter: 0.1,
        }
    }
}

impl TaskTemplate {
    /// Parses and validates a definition written in YAML or JSON (JSON when it starts with `{`).
    pub fn parse(source: &str) -> Result<TaskTemplate> {
        if source.len() > MAX_DEFINITION_BYTES {
            return Err(Error::InvalidTemplate(vec![Problem::new(
                "",
                format!(
                    "the definition is {} bytes; the limit is {MAX_DEFINITION_BYTES} bytes (1 MiB)",
                    source.len()
                ),
            )]));
        }
        let value = parse_document(source).map_err(|p| Error::InvalidTemplate(vec![p]))?;
        Self::from_value(&value)
    }

    /// Validates an already-parsed definition.
    pub fn from_value(value: &Value) -> Result<TaskTemplate> {
        let mut problems = Problems::default();
        let template = read_template(value, &mut problems);
        match template {
            Some(template) if problems.list.is_empty() => Ok(template),
            _ => Err(Error::InvalidTemplate(problems.list)),
        }
    }

    /// The normalized JSON form: defaults filled in, durations in seconds.
    pub fn to_normalized(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Reads back a normalized form written by [`TaskTemplate::to_normalized`].
    pub fn from_normalized(value: Value) -> Result<TaskTemplate> {
        serde_json::from_value(value).map_err(|err| {
            Error::InvalidTemplate(vec![Problem::new(
                "",
                format!("stored definition unreadable: {err}"),
            )])
        })
    }

    /// The key people use to name it: `namespace/name@version`.
    pub fn key(&self) -> String {
        reference(&self.namespace, &self.name, Some(&self.version))
    }

    /// The step DAG, nodes in declaration order. Validation guarantees it is acyclic.
    pub fn dag(&self) -> Dag {
        let names: Vec<&str> = self.steps.iter().map(|step| step.name.as_str()).collect();
        let edges = self.steps.iter().flat_map(|step| {
            step.depends_on
                .iter()
                .map(|parent| (parent.as_str(), step.name.as_str()))
        });
        Dag::from_keys(&names, edges)
    }

    /// The template's `context_schema` compiled, to check task contexts against (`None`: there
    /// is none, and any context passes). Compiled once per definition by its callers.
    pub fn context_check(&self) -> Result<Option<ContextCheck>> {
        let Some(schema) = &self.context_schema else {
            return Ok(None);
        };
        let validator = jsonschema::validator_for(schema).map_err(|err| {
            Error::InvalidContext(vec![Problem::new(
                "context_schema",
                format!("the template's schema cannot be used: {}", err.masked()),
            )])
        })?;
        Ok(Some(ContextCheck(Arc::new(validator))))
    }
}

/// A template's context schema, compiled; cheap to clone.
#[derive(Clone)]
pub struct ContextCheck(Arc<jsonschema::Validator>);

impl std::fmt::Debug for ContextCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContextCheck")
    }
}

impl ContextCheck {
    /// Every way `context` breaks the schema, each reported with its JSON path under
    /// `context` (at most a few dozen).
    pub fn validate(&self, context: &Value) -> Result<()> {
        let problems: Vec<Problem> = self
            .0
            .iter_errors(context)
            .take(MAX_PROBLEMS)
            .map(|err| {
                Problem::new(
                    format!("context{}", err.instance_path()),
                    truncate(&err.masked().to_string()),
                )
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidContext(problems))
        }
    }
}

impl Backoff {
    /// The wait before attempt `attempt + 1`, after `attempt` attempts (1-based), in seconds.
    /// `unit_sample` is a uniform random number in `[0, 1)`, injected so the rule stays pure.
    pub fn delay_seconds(&self, attempt: u32, unit_sample: f64) -> f64 {
        let exponent = attempt.saturating_sub(1).min(1024) as i32;
        let raw = (self.base * self.factor.powi(exponent)).min(self.max);
        let spread = raw * self.jitter * (unit_sample.clamp(0.0, 1.0) * 2.0 - 1.0);
        (raw + spread).clamp(0.0, self.max * (1.0 + self.jitter))
    }
}

fn parse_document(source: &str) -> std::result::Result<Value, Problem> {
    if source.trim().is_empty() {
        return Err(Problem::new("", "the definition is empty"));
    }
    if source.trim_start().starts_with('{') {
        return serde_json::from_str(source)
            .map_err(|err| Problem::new("", format!("malformed JSON: {err}")));
    }
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = 500_000;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_depth = 64;
    budget.max_nodes = 500_000;
    budget.max_total_scalar_bytes = 2 * MAX_DEFINITION_BYTES;
    budget.max_documents = 1;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    // YAML 1.2 booleans only: a step or namespace called `n`, `no` or `on` stays a string.
    options.strict_booleans = true;
    serde_saphyr::from_str_with_options::<Value>(source, options).map_err(|err| {
        let message = err.to_string();
        let first_line = message.lines().next().unwrap_or("unreadable document");
        Problem::new("", format!("malformed YAML: {}", truncate(first_line)))
    })
}

fn truncate(text: &str) -> String {
    const LIMIT: usize = 300;
    if text.len() <= LIMIT {
        return text.to_owned();
    }
    let mut end = LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Collects problems, up to a cap so hostile input cannot make the answer huge.
#[derive(Default)]
struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        if self.list.len() < MAX_PROBLEMS {
            self.list.push(Problem::new(path, message));
        }
    }
}

/// A JSON object being read field by field; unknown keys are reported when it is finished.
struct ObjectReader<'a> {
    map: &'a Map<String, Value>,
    path: String,
    known: &'static [&'static str],
}

impl<'a> ObjectReader<'a> {
    fn new(
        value: &'a Value,
        path: &str,
        known: &'static [&'static str],
        problems: &mut Problems,
    ) -> Option<Self> {
        match value {
            Value::Object(map) => {
                for key in map.keys() {
                    if !known.contains(&key.as_str()) {
                        problems.push(
                            join(path, key),
                            format!("unknown field (expected one of: {})", known.join(", ")),
                        );
                    }
                }
                Some(Self {
                    map,
                    path: path.to_owned(),
                    known,
                })
            }
            other => {
                problems.push(path, format!("expected an object, found {}", kind(other)));
                None
            }
        }
    }

    fn path(&self, key: &str) -> String {
        debug_assert!(self.known.contains(&key));
        join(&self.path, key)
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str, required: bool, problems: &mut Problems) -> Option<String> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                problems.push(
                    self.path(key),
                    format!("expected a string, found {}", kind(other)),
                );
                None
            }
            None => {
                if required {
                    problems.push(self.path(key), "is required");
                }
                None
            }
        }
    }

    /// A name (`key`): lowercase letters, digits, `_` and `-` (see `check_name`).
    fn name(&self, key: &str, required: bool, problems: &mut Problems) -> Option<String> {
        let name = self.string(key, required, problems);
        if let Some(Err(message)) = name.as_deref().map(check_name) {
            problems.push(self.path(key), message);
        }
        name
    }

    fn description(&self, problems: &mut Problems) -> Option<String> {
        let text = self.string("description", false, problems)?;
        if text.chars().count() > MAX_DESCRIPTION_LEN {
            problems.push(
                self.path("description"),
                format!("is longer than {MAX_DESCRIPTION_LEN} characters"),
            );
        }
        Some(text)
    }

    fn bool(&self, key: &str, default: bool, problems: &mut Problems) -> bool {
        match self.get(key) {
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                problems.push(
                    self.path(key),
                    format!("expected true or false, found {}", kind(other)),
                );
                default
            }
            None => default,
        }
    }

    fn number(&self, key: &str, problems: &mut Problems) -> Option<f64> {
        match self.get(key)? {
            Value::Number(n) => n.as_f64(),
            other => {
                problems.push(
                    self.path(key),
                    format!("expected a number, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// A required whole number from 1 to `max`; `purpose` says what it counts when missing.
    fn whole_number(
        &self,
        key: &str,
        max: u32,
        purpose: &str,
        problems: &mut Problems,
    ) -> Option<u32> {
        match self.get(key) {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(value) if (1..=u64::from(max)).contains(&value) => Some(value as u32),
                _ => {
                    problems.push(
                        self.path(key),
                        format!("must be a whole number from 1 to {max}, found {n}"),
                    );
                    None
                }
            },
            Some(other) => {
                problems.push(
                    self.path(key),
                    format!(
                        "expected a whole number from 1 to {max}, found {}",
                        kind(other)
                    ),
                );
                None
            }
            None => {
                problems.push(self.path(key), format!("is required: {purpose}"));
                None
            }
        }
    }

    /// [`ObjectReader::seconds`] that must be more than 0.
    fn positive_seconds(&self, key: &str, problems: &mut Problems) -> Option<f64> {
        let seconds = self.seconds(key, problems);
        if seconds == Some(0.0) {
            problems.push(self.path(key), "must be more than 0 seconds");
        }
        seconds
    }

    /// A priority, 1 (low) to 4 (urgent).
    fn priority(&self, problems: &mut Problems) -> Option<Priority> {
        let value = self.get("priority")?;
        let level = match value {
            Value::Number(n) => n.as_i64().ok_or_else(|| {
                format!("must be a whole number from 1 (low) to 4 (urgent), found {n}")
            }),
            other => Err(format!(
                "expected a whole number from 1 (low) to 4 (urgent), found {}",
                kind(other)
            )),
        };
        match level.and_then(Priority::new) {
            Ok(priority) => Some(priority),
            Err(message) => {
                problems.push(self.path("priority"), message);
                None
            }
        }
    }

    /// Seconds, given as a number or as a string with a unit: `500ms`, `30s`, `5m`, `2h`.
    fn seconds(&self, key: &str, problems: &mut Problems) -> Option<f64> {
        let value = self.get(key)?;
        let seconds = match value {
            Value::Number(n) => n.as_f64(),
            Value::String(text) => parse_duration(text),
            _ => None,
        };
        match seconds {
            Some(s) if seconds_in_range(s) => Some(s),
            Some(_) => {
                problems.push(
                    self.path(key),
                    format!("must be between 0 and {MAX_SECONDS} seconds"),
                );
                None
            }
            None => {
                problems.push(
                    self.path(key),
                    "expected seconds as a number or a duration such as \"500ms\", \"30s\", \"5m\", \"2h\"",
                );
                None
            }
        }
    }
}

fn parse_duration(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" | "seconds" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" | "minutes" => 60.0,
        "h" | "hours" => 3600.0,
        "d" | "days" => 86_400.0,
        _ => return None,
    };
    Some(number * scale)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Names of namespaces, templates and steps: a lowercase letter, then lowercase letters,
/// digits, `_` or `-`; at most 64 characters. They appear in URLs, logs and permissions.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err("must not be empty".into());
    };
    if name.len() > MAX_NAME_LEN {
        return Err(format!("must be at most {MAX_NAME_LEN} characters"));
    }
    if !first.is_ascii_lowercase() {
        return Err(format!("{name:?} must start with a lowercase letter"));
    }
    if let Some(bad) =
        chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "{name:?} contains {bad:?}; use lowercase letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

/// Handler names may also carry the separators other systems use (`payments.charge`,
/// `Payments::Charge`, `billing/charge`).
fn check_handler(handler: &str) -> std::result::Result<(), String> {
    let mut chars = handler.chars();
    let Some(first) = chars.next() else {
        return Err("must not be empty".into());
    };
    if handler.len() > MAX_HANDLER_LEN {
        return Err(format!("must be at most {MAX_HANDLER_LEN} characters"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(format!("{handler:?} must start with a letter or digit"));
    }
    if let Some(bad) =
        chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/')))
    {
        return Err(format!(
            "{handler:?} contains {bad:?}; use letters, digits, '_', '-', '.', ':' and '/'"
        ));
    }
    Ok(())
}

const TEMPLATE_FIELDS: &[&str] = &[
    "namespace",
    "name",
    "version",
    "description",
    "context_schema",
    "steps",
    "custom_events",
    "priority",
    "concurrency",
    "timeout",
];
const CONCURRENCY_FIELDS: &[&str] = &["key", "limit", "strategy"];
const CUSTOM_EVENT_FIELDS: &[&str] = &["name", "description"];
const STEP_FIELDS: &[&str] = &[
    "name",
    "handler",
    "description",
    "config",
    "depends_on",
    "retry",
    "timeout",
    "skippable",
    "priority",
    "start_timeout",
    "rate_limit",
    "concurrency",
];
const RATE_LIMIT_FIELDS: &[&str] = &["name", "limit", "per", "key"];
const STEP_CONCURRENCY_FIELDS: &[&str] = &["name", "limit", "key"];
const RETRY_FIELDS: &[&str] = &["max_attempts", "retryable", "backoff"];
const BACKOFF_FIELDS: &[&str] = &["base", "factor", "max", "jitter"];

fn read_template(value: &Value, problems: &mut Problems) -> Option<TaskTemplate> {
    let reader = ObjectReader::new(value, "", TEMPLATE_FIELDS, problems)?;
    let namespace = reader.string("namespace", true, problems);
    let name = reader.string("name", true, problems);
    for (key, value) in [("namespace", &namespace), ("name", &name)] {
        if let Some(Err(message)) = value.as_deref().map(check_name) {
            problems.push(key, message);
        }
    }
    let version = reader.string("version", true, problems).and_then(|text| {
        semver::Version::parse(&text)
            .map_err(|err| {
                problems.push(
                    "version",
                    format!("{text:?} is not a semantic version such as 1.0.0 ({err})"),
                )
            })
            .ok()
    });
    let description = reader.description(problems);
    let context_schema = reader.get("context_schema").cloned();
    if let Some(schema) = &context_schema {
        check_schema(schema, problems);
    }
    let steps = read_steps(reader.get("steps"), context_schema.as_ref(), problems);
    let custom_events = read_custom_events(reader.get("custom_events"), problems);
    let priority = reader.priority(problems);
    let timeout = reader.positive_seconds("timeout", problems);
    let concurrency = reader
        .get("concurrency")
        .and_then(|value| read_concurrency(value, context_schema.as_ref(), problems));
    Some(TaskTemplate {
        namespace: namespace?,
        name: name?,
        version: version?,
        description,
        context_schema,
        steps: steps?,
        priority,
        concurrency,
        timeout,
        custom_events,
    })
}

/// The `key` of a concurrency rule or rate limit. A key that reads a field the context schema
/// does not declare (when it declares its properties) references nothing.
fn read_key(
    reader: &ObjectReader<'_>,
    context_schema: Option<&Value>,
    problems: &mut Problems,
) -> Option<KeyExpression> {
    let key = reader.string("key", false, problems).and_then(|source| {
        match KeyExpression::parse(&source) {
            Ok(key) => Some(key),
            Err(message) => {
                problems.push(reader.path("key"), message);
                None
            }
        }
    });
    if let (Some(key), Some(declared)) = (
        &key,
        context_schema.and_then(|schema| schema.get("properties")?.as_object()),
    ) {
        for field in key.top_fields() {
            if !declared.contains_key(field) {
                problems.push(
                    reader.path("key"),
                    format!(
                        "references nothing: context_schema declares no property {field:?} (it has: {})",
                        declared.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
    }
    key
}

/// A template's `concurrency: {key, limit, strategy}`.
fn read_concurrency(
    value: &Value,
    context_schema: Option<&Value>,
    problems: &mut Problems,
) -> Option<ConcurrencyPolicy> {
    let reader = ObjectReader::new(value, "concurrency", CONCURRENCY_FIELDS, problems)?;
    let key = read_key(&reader, context_schema, problems);
    let limit = reader.whole_number(
        "limit",
        MAX_LIMIT,
        "how many tasks with the same key may run at once",
        problems,
    );
    let strategy = match reader.string("strategy", false, problems) {
        None => Some(Strategy::default()),
        Some(name) => Strategy::parse(&name).or_else(|| {
            problems.push(
                reader.path("strategy"),
                format!(
                    "unknown strategy {name:?} (expected one of: {})",
                    Strategy::ALL.map(Strategy::as_str).join(", ")
                ),
            );
            None
        }),
    };
    Some(ConcurrencyPolicy {
        key,
        limit: limit?,
        strategy: strategy?,
    })
}

/// Events the template's workers may publish: names (`payment_authorized`) or objects with a
/// name and a description.
fn read_custom_events(value: Option<&Value>, problems: &mut Problems) -> Vec<CustomEvent> {
    let list = match value {
        None => return Vec::new(),
        Some(Value::Array(list)) => list,
        Some(other) => {
            problems.push(
                "custom_events",
                format!("expected a list of event names, found {}", kind(other)),
            );
            return Vec::new();
        }
    };
    let mut events: Vec<CustomEvent> = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let path = format!("custom_events[{i}]");
        let event = match item {
            Value::String(name) => Some(CustomEvent {
                name: name.clone(),
                description: None,
            }),
            object @ Value::Object(_) => {
                ObjectReader::new(object, &path, CUSTOM_EVENT_FIELDS, problems).and_then(|reader| {
                    let description = reader.description(problems);
                    reader
                        .string("name", true, problems)
                        .map(|name| CustomEvent { name, description })
                })
            }
            other => {
                problems.push(
                    &path,
                    format!("expected a name or an object, found {}", kind(other)),
                );
                None
            }
        };
        let Some(event) = event else { continue };
        if let Err(message) = check_name(&event.name) {
            problems.push(format!("{path}.name"), message);
        } else if events.iter().any(|e| e.name == event.name) {
            problems.push(
                format!("{path}.name"),
                format!("{:?} is declared twice", event.name),
            );
        } else {
            events.push(event);
        }
    }
    events
}

fn check_schema(schema: &Value, problems: &mut Problems) {
    if !matches!(schema, Value::Object(_) | Value::Bool(_)) {
        problems.push(
            "context_schema",
            format!(
                "a JSON Schema is an object or a boolean, found {}",
                kind(schema)
            ),
        );
        return;
    }
    if let Err(err) = jsonschema::meta::validate(schema) {
        problems.push(
            format!("context_schema{}", err.instance_path()),
            format!(
                "not a valid JSON Schema: {}",
                truncate(&err.masked().to_string())
            ),
        );
        return;
    }
    if let Err(err) = jsonschema::validator_for(schema) {
        problems.push(
            "context_schema",
            format!(
                "the schema cannot be used: {}",
                truncate(&err.masked().to_string())
            ),
        );
    }
}

fn read_steps(
    value: Option<&Value>,
    context_schema: Option<&Value>,
    problems: &mut Problems,
) -> Option<Vec<StepTemplate>> {
    let list = match value {
        Some(Value::Array(list)) => list,
        Some(other) => {
            problems.push(
                "steps",
                format!("expected a list of steps, found {}", kind(other)),
            );
            return None;
        }
        None => {
            problems.push("steps", "is required: a template needs at least one step");
            return None;
        }
    };
    if list.is_empty() {
        problems.push("steps", "a template needs at least one step");
        return None;
    }
    if list.len() > MAX_STEPS {
        problems.push(
            "steps",
            format!("{} steps; the limit is {MAX_STEPS}", list.len()),
        );
        return None;
    }
    let steps: Vec<Option<StepTemplate>> = list
        .iter()
        .enumerate()
        .map(|(i, step)| read_step(step, &format!("steps[{i}]"), context_schema, problems))
        .collect();
    let steps: Option<Vec<StepTemplate>> = steps.into_iter().collect();
    let steps = steps?;
    check_dependencies(&steps, problems);
    Some(steps)
}

fn read_step(
    value: &Value,
    path: &str,
    context_schema: Option<&Value>,
    problems: &mut Problems,
) -> Option<StepTemplate> {
    let reader = ObjectReader::new(value, path, STEP_FIELDS, problems)?;
    let name = reader.name("name", true, problems);
    let handler = reader.string("handler", true, problems);
    if let Some(Err(message)) = handler.as_deref().map(check_handler) {
        problems.push(reader.path("handler"), message);
    }
    let description = reader.description(problems);
    let config = match reader.get("config") {
        None => Value::Object(Map::new()),
        Some(config @ Value::Object(_)) => config.clone(),
        Some(other) => {
            problems.push(
                reader.path("config"),
                format!("expected an object, found {}", kind(other)),
            );
            Value::Object(Map::new())
        }
    };
    let depends_on = read_depends_on(&reader, problems);
    let retry = match reader.get("retry") {
        Some(value) => read_retry(value, &reader.path("retry"), problems),
        None => RetryPolicy::default(),
    };
    let timeout = reader.positive_seconds("timeout", problems);
    let start_timeout = reader.positive_seconds("start_timeout", problems);
    let skippable = reader.bool("skippable", false, problems);
    let priority = reader.priority(problems);
    let rate_limit = reader.get("rate_limit").and_then(|value| {
        read_rate_limit(value, &reader.path("rate_limit"), context_schema, problems)
    });
    let concurrency = reader.get("concurrency").and_then(|value| {
        read_step_concurrency(value, &reader.path("concurrency"), context_schema, problems)
    });
    Some(StepTemplate {
        name: name?,
        handler: handler?,
        description,
        config,
        depends_on,
        retry,
        timeout,
        skippable,
        priority,
        start_timeout,
        rate_limit,
        concurrency,
    })
}

/// A step's `concurrency: {limit, name, key}`.
fn read_step_concurrency(
    value: &Value,
    path: &str,
    context_schema: Option<&Value>,
    problems: &mut Problems,
) -> Option<StepConcurrency> {
    let reader = ObjectReader::new(value, path, STEP_CONCURRENCY_FIELDS, problems)?;
    let name = reader.name("name", false, problems);
    let key = read_key(&reader, context_schema, problems);
    let limit = reader.whole_number(
        "limit",
        MAX_LIMIT,
        "how many attempts of the step may run at once",
        problems,
    );
    Some(StepConcurrency {
        name,
        limit: limit?,
        key,
    })
}

/// `rate_limit: {name, limit, per, key}` of a step.
fn read_rate_limit(
    value: &Value,
    path: &str,
    context_schema: Option<&Value>,
    problems: &mut Problems,
) -> Option<RateLimit> {
    let reader = ObjectReader::new(value, path, RATE_LIMIT_FIELDS, problems)?;
    let name = reader.name("name", true, problems);
    let key = read_key(&reader, context_schema, problems);
    let limit = reader.whole_number(
        "limit",
        rate_limit::MAX_LIMIT,
        "how many attempts may start per window",
        problems,
    );
    let per = match reader.positive_seconds("per", problems) {
        Some(seconds) if seconds > rate_limit::MAX_PER_SECONDS => {
            problems.push(
                reader.path("per"),
                format!(
                    "is longer than a day ({seconds} seconds): use a window of at most {} seconds",
                    rate_limit::MAX_PER_SECONDS
                ),
            );
            None
        }
        None if reader.get("per").is_none() => {
            problems.push(
                reader.path("per"),
                "is required: the window, such as 60s or 1m",
            );
            None
        }
        per => per,
    };
    Some(RateLimit {
        name: name?,
        limit: limit?,
        per: per?,
        key,
    })
}

fn read_depends_on(reader: &ObjectReader<'_>, problems: &mut Problems) -> Vec<String> {
    let path = reader.path("depends_on");
    match reader.get("depends_on") {
        None => Vec::new(),
        // A single dependency may be written as a plain string.
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(items)) => {
            let mut names: Vec<String> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(name) if names.contains(name) => problems.push(
                        format!("{path}[{i}]"),
                        format!("{name:?} is listed more than once"),
                    ),
                    Value::String(name) => names.push(name.clone()),
                    other => problems.push(
                        format!("{path}[{i}]"),
                        format!("expected a step name, found {}", kind(other)),
                    ),
                }
            }
            names
        }
        Some(other) => {
            problems.push(
                path,
                format!("expected a list of step names, found {}", kind(other)),
            );
            Vec::new()
        }
    }
}

fn read_retry(value: &Value, path: &str, problems: &mut Problems) -> RetryPolicy {
    let defaults = RetryPolicy::default();
    let Some(reader) = ObjectReader::new(value, path, RETRY_FIELDS, problems) else {
        return defaults;
    };
    let retryable = reader.bool("retryable", true, problems);
    let max_attempts = match reader.get("max_attempts") {
        None if retryable => defaults.max_attempts,
        None => 1,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(count) if (1..=u64::from(MAX_ATTEMPTS)).contains(&count) => {
                let count = count as u32;
                if !retryable && count != 1 {
                    problems.push(
                        reader.path("max_attempts"),
                        format!(
                            "retryable: false means exactly one attempt, but max_attempts is {count}"
                        ),
                    );
                }
                count
            }
            _ => {
                problems.push(
                    reader.path("max_attempts"),
                    format!("must be a whole number from 1 to {MAX_ATTEMPTS}, found {n}"),
                );
                defaults.max_attempts
            }
        },
        Some(other) => {
            problems.push(
                reader.path("max_attempts"),
                format!("expected a whole number, found {}", kind(other)),
            );
            defaults.max_attempts
        }
    };
    let backoff = match reader.get("backoff") {
        Some(value) => read_backoff(value, &reader.path("backoff"), problems),
        None => Backoff::default(),
    };
    RetryPolicy {
        max_attempts,
        retryable,
        backoff,
    }
}

fn read_backoff(value: &Value, path: &str, problems: &mut Problems) -> Backoff {
    let defaults = Backoff::default();
    let Some(reader) = ObjectReader::new(value, path, BACKOFF_FIELDS, problems) else {
        return defaults;
    };
    let base = reader.seconds("base", problems).unwrap_or(defaults.base);
    let max = reader
        .seconds("max", problems)
        .unwrap_or(defaults.max.max(base));
    let factor = reader.number("factor", problems).unwrap_or(defaults.factor);
    let jitter = reader.number("jitter", problems).unwrap_or(defaults.jitter);
    if !(1.0..=100.0).contains(&factor) {
        problems.push(
            reader.path("factor"),
            format!("must be between 1 and 100 (1 means a constant delay), found {factor}"),
        );
    }
    if !(0.0..=1.0).contains(&jitter) {
        problems.push(
            reader.path("jitter"),
            format!("is a fraction of the delay between 0 and 1, found {jitter}"),
        );
    }
    if max < base {
        problems.push(
            reader.path("max"),
            format!("the cap ({max}s) is below the base delay ({base}s)"),
        );
    }
    Backoff {
        base,
        factor,
        max,
        jitter,
    }
}

/// Duplicate names, unknown and self dependencies, then cycles over the remaining edges.
fn check_dependencies(steps: &[StepTemplate], problems: &mut Problems) {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        if let Some(first) = index.insert(&step.name, i) {
            index.insert(&steps[first].name, first);
            problems.push(
                format!("steps[{i}].name"),
                format!("{:?} is already the name of steps[{first}]", step.name),
            );
        }
    }
    let mut edges = Vec::new();
    for (child, step) in steps.iter().enumerate() {
        for (d, parent) in step.depends_on.iter().enumerate() {
            let path = format!("steps[{child}].depends_on[{d}]");
            match index.get(parent.as_str()) {
                None => problems.push(path, format!("unknown step {parent:?}")),
                Some(_) if *parent == step.name => {
                    problems.push(path, format!("step {parent:?} depends on itself"))
                }
                Some(&p) => edges.push((p, child)),
            }
        }
    }
    for cycle in Dag::new(steps.len(), edges).cycles() {
        let names: Vec<&str> = cycle.iter().map(|&i| steps[i].name.as_str()).collect();
        problems.push(
            format!("steps[{}].depends_on", cycle[0]),
            format!("dependency cycle: {}", names.join(" -> ")),
        );
    }
}

#[cfg(test)]
mod tests;
