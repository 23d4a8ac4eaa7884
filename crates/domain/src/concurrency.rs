//! Concurrency keys: at most `limit` tasks of a template with the same key hold a slot at
//! once ("one run per customer at a time"). A task holds its slot from its admission until it
//! ends (complete, failed or cancelled); a task that cannot have one when it is created waits
//! for it, is cancelled, or makes room by cancelling the oldest holder, as the template's
//! strategy says.

use crate::problem::Problem;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// The most tasks one key may let run at once.
pub const MAX_LIMIT: u32 = 1_000;
/// The longest key a task may get, rendered, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// The longest key expression a template may write.
const MAX_EXPRESSION_LEN: usize = 256;

/// A template's concurrency rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConcurrencyPolicy {
    /// What tells tasks apart (`{{ context.customer_id }}`); `None`: all the template's tasks
    /// share one limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyExpression>,
    pub limit: u32,
    pub strategy: Strategy,
}

/// What happens to a new task when its key is at its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// It waits, and starts as soon as a slot frees (higher priority first, then oldest).
    #[default]
    Queue,
    /// It is cancelled at once: the running ones go on.
    CancelNewest,
    /// The oldest holders are cancelled to make room for it.
    CancelInProgress,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [
        Strategy::Queue,
        Strategy::CancelNewest,
        Strategy::CancelInProgress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Queue => "queue",
            Strategy::CancelNewest => "cancel_newest",
            Strategy::CancelInProgress => "cancel_in_progress",
        }
    }

    /// The strategy written `name` in a template.
    pub fn parse(name: &str) -> Option<Strategy> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key expression: text with `{{ context.<field>[.<field>…] }}` placeholders, filled in from
/// each task's context. Kept as written; its JSON form is that text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyExpression {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// A path into the context (field names).
    Context(Vec<String>),
}

impl KeyExpression {
    /// Reads `source`; the message says what is wrong with it.
    pub fn parse(source: &str) -> Result<KeyExpression, String> {
        if source.chars().count() > MAX_EXPRESSION_LEN {
            return Err(format!("is longer than {MAX_EXPRESSION_LEN} characters"));
        }
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| "a \"{{\" is never closed with \"}}\"".to_owned())?;
            let reference = after[..close].trim();
            let path = reference
                .strip_prefix("context.")
                .filter(|path| !path.is_empty())
                .ok_or_else(|| {
                    format!(
                        "{{{{ {reference} }}}} references nothing a task has: write {{{{ context.<field> }}}}"
                    )
                })?;
            let fields: Vec<String> = path.split('.').map(str::to_owned).collect();
            if let Some(bad) = fields.iter().find(|field| !is_field_name(field)) {
                return Err(format!(
                    "{{{{ {reference} }}}}: {bad:?} is not a field name (letters, digits, '_' and '-')"
                ));
            }
            parts.push(Part::Context(fields));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if !parts.iter().any(|part| matches!(part, Part::Context(_))) {
            return Err(
                "references nothing: write the context field that tells tasks apart, such as \
                 \"{{ context.customer_id }}\" (leave key out to limit all of the template's \
                 tasks together)"
                    .to_owned(),
            );
        }
        Ok(KeyExpression {
            source: source.to_owned(),
            parts,
        })
    }

    /// The first field of each context path it reads.
    pub fn top_fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Context(fields) => fields.first().map(String::as_str),
            Part::Text(_) => None,
        })
    }

    /// The key of a task with `context`: strings as they are, other values as JSON. A field
    /// that is missing or null is a problem at its path (`context/customer_id`); `what` names
    /// the key in messages ("concurrency key", "rate limit key").
    pub fn render(&self, context: &Value, what: &str) -> Result<String, Problem> {
        let mut key = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => key.push_str(text),
                Part::Context(fields) => {
                    let value = fields
                        .iter()
                        .try_fold(context, |value, field| value.get(field))
                        .filter(|value| !value.is_null());
                    let path = format!("context/{}", fields.join("/"));
                    match value {
                        Some(Value::String(text)) => key.push_str(text),
                        Some(other) => key.push_str(&other.to_string()),
                        None => {
                            return Err(Problem::new(
                                path,
                                format!("is required: the template's {what} is {:?}", self.source),
                            ));
                        }
                    }
                }
            }
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(Problem::new(
                "context",
                format!(
                    "makes a {what} of {} bytes; the limit is {MAX_KEY_BYTES}",
                    key.len()
                ),
            ));
        }
        Ok(key)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

fn is_field_name(field: &str) -> bool {
    !field.is_empty()
        && field
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
}

impl TryFrom<String> for KeyExpression {
    type Error = String;

    fn try_from(source: String) -> Result<Self, Self::Error> {
        KeyExpression::parse(&source)
    }
}

impl From<KeyExpression> for String {
    fn from(expression: KeyExpression) -> String {
        expression.source
    }
}

impl ConcurrencyPolicy {
    /// The key a task with `context` of template `namespace/name` gets: the template's own
    /// name, then the rendered expression, so that two templates never share slots.
    pub fn key_for(&self, namespace: &str, name: &str, context: &Value) -> Result<String, Problem> {
        match &self.key {
            Some(expression) => Ok(format!(
                "{namespace}/{name}:{}",
                expression.render(context, "concurrency key")?
            )),
            None => Ok(format!("{namespace}/{name}")),
        }
    }
}

/// A step's own concurrency limit: at most `limit` attempts of the steps that share its
/// bucket run at once. Without a `name` the bucket is the step's own (every task of the
/// template counts); with one it is shared by every step of the namespace that names it —
/// the way to limit a handler, or a service several steps call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepConcurrency {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub limit: u32,
    /// One bucket per rendered key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyExpression>,
}

impl StepConcurrency {
    /// The bucket step `step` of template `namespace/template` draws from in a task with
    /// `context`: `namespace/name` or `namespace/template/step`, then `:` and the rendered
    /// key when there is one.
    pub fn bucket_for(
        &self,
        namespace: &str,
        template: &str,
        step: &str,
        context: &Value,
    ) -> Result<String, Problem> {
        let base = match &self.name {
            Some(name) => format!("{namespace}/{name}"),
            None => format!("{namespace}/{template}/{step}"),
        };
        match &self.key {
            Some(key) => Ok(format!(
                "{base}:{}",
                key.render(context, "step concurrency key")?
            )),
            None => Ok(base),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_step_limit_is_its_own_or_shared_by_name() {
        let own = StepConcurrency {
            name: None,
            limit: 2,
            key: None,
        };
        assert_eq!(
            own.bucket_for("shop", "order", "charge", &json!({}))
                .unwrap(),
            "shop/order/charge"
        );
        let shared = StepConcurrency {
            name: Some("stripe".into()),
            key: Some(KeyExpression::parse("{{ context.account }}").unwrap()),
            ..own
        };
        assert_eq!(
            shared
                .bucket_for("shop", "order", "charge", &json!({"account": 7}))
                .unwrap(),
            "shop/stripe:7"
        );
        let missing = shared
            .bucket_for("shop", "order", "charge", &json!({}))
            .unwrap_err();
        assert_eq!(missing.path, "context/account");
    }

    #[test]
    fn keys_are_rendered_from_the_context() {
        let key =
            KeyExpression::parse("customer-{{ context.customer.id }}/{{context.region}}").unwrap();
        let context = json!({"customer": {"id": 42}, "region": "eu"});
        assert_eq!(
            key.render(&context, "concurrency key").unwrap(),
            "customer-42/eu"
        );
        assert_eq!(key.top_fields().collect::<Vec<_>>(), ["customer", "region"]);
        let missing = key
            .render(&json!({"customer": {"id": null}}), "concurrency key")
            .unwrap_err();
        assert_eq!(missing.path, "context/customer/id");
        let policy = ConcurrencyPolicy {
            key: Some(key),
            limit: 2,
            strategy: Strategy::Queue,
        };
        assert_eq!(
            policy.key_for("shop", "order", &context).unwrap(),
            "shop/order:customer-42/eu"
        );
        let everyone = ConcurrencyPolicy {
            key: None,
            ..policy
        };
        assert_eq!(
            everyone.key_for("shop", "order", &context).unwrap(),
            "shop/order"
        );
    }

    #[test]
    fn a_key_must_reference_the_context() {
        for (source, fragment) in [
            ("customer", "references nothing"),
            ("{{ customer_id }}", "references nothing a task has"),
            ("{{ context. }}", "references nothing a task has"),
            ("{{ context.a b }}", "not a field name"),
            ("{{ context.a", "never closed"),
        ] {
            let err = KeyExpression::parse(source).unwrap_err();
            assert!(err.contains(fragment), "{source}: {err}");
        }
        let huge = format!("{{{{ context.a }}}}{}", "x".repeat(300));
        assert!(KeyExpression::parse(&huge).is_err());
        let long_value = json!({"a": "y".repeat(600)});
        let err = KeyExpression::parse("{{ context.a }}")
            .unwrap()
            .render(&long_value, "concurrency key")
            .unwrap_err();
        assert!(err.message.contains("limit is 512"));
    }

    #[test]
    fn strategies_have_their_template_names() {
        for strategy in Strategy::ALL {
            assert_eq!(Strategy::parse(strategy.as_str()), Some(strategy));
        }
        assert_eq!(Strategy::parse("fifo"), None);
    }
}
