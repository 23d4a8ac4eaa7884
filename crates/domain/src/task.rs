//! The rules a request to start a task must follow before anything is written.

use crate::priority::Priority;
use crate::problem::Problem;
use crate::{Error, Result};
use serde_json::Value;

/// Most tags one task may carry.
pub const MAX_TAGS: usize = 50;
const MAX_TAG_LEN: usize = 64;
const MAX_SHORT_TEXT: usize = 255;
const MAX_REASON: usize = 4096;
/// The largest task context accepted, serialized, in bytes.
pub const MAX_CONTEXT_BYTES: usize = 1024 * 1024;

/// What a caller supplies to start a task, besides which template to run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskRequest {
    pub context: Value,
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    /// Carried by every event about the task (a CI run, an order, a trace id).
    pub correlation_id: Option<String>,
    /// 1 (low) to 4 (urgent), as the caller gave it; the template's (or 2) when `None`.
    pub priority: Option<i64>,
}

impl TaskRequest {
    /// Checks sizes and shapes; every problem is reported, each with its path.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if !self.context.is_object() {
            problems.push(Problem::new("context", "must be a JSON object"));
        } else if serde_json::to_vec(&self.context).map_or(0, |bytes| bytes.len())
            > MAX_CONTEXT_BYTES
        {
            problems.push(Problem::new(
                "context",
                format!("is larger than {MAX_CONTEXT_BYTES} bytes"),
            ));
        }
        for (path, value, limit) in [
            ("initiator", &self.initiator, MAX_SHORT_TEXT),
            ("sourceSystem", &self.source_system, MAX_SHORT_TEXT),
            ("idempotencyKey", &self.idempotency_key, MAX_SHORT_TEXT),
            ("correlationId", &self.correlation_id, MAX_SHORT_TEXT),
            ("reason", &self.reason, MAX_REASON),
        ] {
            match value.as_deref() {
                Some("") => problems.push(Problem::new(path, "must not be empty when given")),
                Some(text) if text.chars().count() > limit => problems.push(Problem::new(
                    path,
                    format!("is longer than {limit} characters"),
                )),
                _ => {}
            }
        }
        if let Some(Err(message)) = self.priority.map(Priority::new) {
            problems.push(Problem::new("priority", message));
        }
        if self.tags.len() > MAX_TAGS {
            problems.push(Problem::new(
                "tags",
                format!("{} tags; the limit is {MAX_TAGS}", self.tags.len()),
            ));
        }
        for (i, tag) in self.tags.iter().enumerate() {
            let valid = !tag.is_empty()
                && tag.chars().count() <= MAX_TAG_LEN
                && !tag.chars().any(char::is_control);
            if !valid {
                problems.push(Problem::new(
                    format!("tags[{i}]"),
                    format!("a tag has 1 to {MAX_TAG_LEN} printable characters"),
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidRequest(problems))
        }
    }

    /// The task's priority: the caller's, else its template's default, else 2. A caller's
    /// value out of range is refused by [`TaskRequest::validate`] before this is read.
    pub fn priority_under(&self, template_default: Option<Priority>) -> Priority {
        self.priority
            .and_then(|level| Priority::new(level).ok())
            .or(template_default)
            .unwrap_or_default()
    }

    /// Tags without repeats, in the order first given.
    pub fn distinct_tags(&self) -> Vec<String> {
        let mut tags: Vec<String> = Vec::with_capacity(self.tags.len());
        for tag in &self.tags {
            if !tags.contains(tag) {
                tags.push(tag.clone());
            }
        }
        tags
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_plain_request_is_valid() {
        let request = TaskRequest {
            context: json!({"order_id": 1}),
            tags: vec!["a".into(), "b".into(), "a".into()],
            ..TaskRequest::default()
        };
        assert!(request.validate().is_ok());
        assert_eq!(request.distinct_tags(), vec!["a", "b"]);
    }

    #[test]
    fn every_problem_is_listed() {
        let request = TaskRequest {
            context: json!([1, 2]),
            initiator: Some(String::new()),
            correlation_id: Some("c".repeat(256)),
            reason: Some("x".repeat(MAX_REASON + 1)),
            tags: vec!["ok".into(), String::new(), "bad\u{7}".into()],
            priority: Some(9),
            ..TaskRequest::default()
        };
        let Err(Error::InvalidRequest(problems)) = request.validate() else {
            panic!("expected InvalidRequest");
        };
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "context",
                "initiator",
                "correlationId",
                "reason",
                "priority",
                "tags[1]",
                "tags[2]"
            ]
        );
    }

    #[test]
    fn the_callers_priority_wins_over_the_templates_and_two_is_the_default() {
        let three = Priority::new(3).ok();
        let mut request = TaskRequest::default();
        assert_eq!(request.priority_under(None), Priority::DEFAULT);
        assert_eq!(request.priority_under(three), Priority::new(3).unwrap());
        request.priority = Some(4);
        assert_eq!(request.priority_under(three), Priority::HIGHEST);
    }
}
