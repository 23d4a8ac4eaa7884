//! Rate limits: a step that declares `rate_limit: {name, limit, per}` starts an attempt only
//! while fewer than `limit` attempts of its bucket started in the last `per` ("no more than
//! 100 calls a minute to this API"). Every attempt counts, retries included. The window
//! slides: a burst of `limit` may start at once, and then nothing more until the oldest of
//! them is `per` old, so no window of `per` ever holds more than `limit` starts.
//!
//! A bucket is the limit's name within its namespace, and with a `key` one bucket per
//! rendered key (`{{ context.account_id }}`: one limit per account). Steps of different
//! templates that name the same limit share its bucket; each is admitted under its own
//! declared rule, in claim order: a step refused holds back the later ones of its bucket.

use crate::concurrency::KeyExpression;
use crate::problem::Problem;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The most starts one rule may allow per window.
pub const MAX_LIMIT: u32 = 100_000;
/// The longest window, in seconds (one day): the starts a bucket remembers never go back
/// further.
pub const MAX_PER_SECONDS: f64 = 86_400.0;

/// A step's rate limit, as its template declares it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    /// The limit's name, shared by every step (of any template of the namespace) that
    /// consumes it.
    pub name: String,
    /// Starts allowed per window.
    pub limit: u32,
    /// The window, in seconds.
    pub per: f64,
    /// One bucket per rendered key; `None`: one bucket for the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyExpression>,
}

impl RateLimit {
    /// The window in milliseconds (at least 1).
    pub fn per_ms(&self) -> i64 {
        ((self.per * 1000.0).round() as i64).max(1)
    }

    /// The bucket a step of a task with `context` in `namespace` draws from:
    /// `namespace/name`, then `:` and the rendered key when the limit has one.
    pub fn bucket_for(&self, namespace: &str, context: &Value) -> Result<String, Problem> {
        match &self.key {
            Some(key) => Ok(format!(
                "{namespace}/{}:{}",
                self.name,
                key.render(context, "rate limit key")?
            )),
            None => Ok(format!("{namespace}/{}", self.name)),
        }
    }
}

/// What one waiting step asks of its bucket: at most `limit` starts in any `per_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub limit: u32,
    pub per_ms: i64,
}

/// Starts a bucket recorded: (epoch ms, how many started then).
pub type Starts = [(i64, u32)];

/// How many more attempts under `rule` may start at `now_ms`, given the bucket's recorded
/// `starts`: the rule's limit less the starts still in its window.
pub fn room(starts: &Starts, now_ms: i64, rule: Rule) -> u64 {
    let recent: u64 = starts
        .iter()
        .filter(|(at, _)| *at > now_ms - rule.per_ms)
        .map(|(_, count)| u64::from(*count))
        .sum();
    u64::from(rule.limit).saturating_sub(recent)
}

/// The earliest time, `now_ms` or later, at which a step under `rule` may start, given the
/// bucket's `starts` (those of `now_ms` included): when enough of the newest starts have left
/// the window that fewer than `limit` remain in it.
pub fn next_start_ms(starts: &Starts, now_ms: i64, rule: Rule) -> i64 {
    let mut newest_first: Vec<(i64, u32)> = starts.to_vec();
    newest_first.sort_by_key(|start| std::cmp::Reverse(start.0));
    let mut counted: u64 = 0;
    for (at, count) in newest_first {
        counted += u64::from(count);
        if counted >= u64::from(rule.limit) {
            // This start (and every older one) must have left the window.
            return (at + rule.per_ms).max(now_ms);
        }
    }
    now_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const THREE_A_MINUTE: Rule = Rule {
        limit: 3,
        per_ms: 60_000,
    };

    #[test]
    fn a_burst_of_the_limit_starts_then_nothing_until_its_oldest_leaves_the_window() {
        assert_eq!(room(&[], 0, THREE_A_MINUTE), 3);
        let starts = [(0, 3)];
        assert_eq!(room(&starts, 59_999, THREE_A_MINUTE), 0);
        assert_eq!(next_start_ms(&starts, 10_000, THREE_A_MINUTE), 60_000);
        assert_eq!(room(&starts, 60_000, THREE_A_MINUTE), 3);
        // Spread starts leave one at a time.
        let spread = [(0, 1), (20_000, 1), (40_000, 1)];
        assert_eq!(room(&spread, 50_000, THREE_A_MINUTE), 0);
        assert_eq!(next_start_ms(&spread, 50_000, THREE_A_MINUTE), 60_000);
        assert_eq!(room(&spread, 60_000, THREE_A_MINUTE), 1);
        assert_eq!(
            next_start_ms(&[(0, 1)], 5, THREE_A_MINUTE),
            5,
            "a token is free"
        );
    }

    #[test]
    fn no_window_of_the_period_ever_holds_more_than_the_limit() {
        // Claims every 7 seconds for 10 minutes, each taking what the rule allows.
        let mut starts: Vec<(i64, u32)> = Vec::new();
        let mut now = 0;
        while now < 600_000 {
            let n = room(&starts, now, THREE_A_MINUTE).min(10);
            if n > 0 {
                starts.push((now, n as u32));
            }
            now += 7_000;
        }
        for &(from, _) in &starts {
            let within: u32 = starts
                .iter()
                .filter(|(at, _)| (from..from + 60_000).contains(at))
                .map(|(_, n)| n)
                .sum();
            assert!(within <= 3, "{within} starts in the minute from {from}");
        }
        let total: u32 = starts.iter().map(|(_, n)| n).sum();
        assert!(total >= 27, "the limit is used, not starved: {total}");
    }

    #[test]
    fn each_rule_counts_its_own_window() {
        let strict = Rule {
            limit: 1,
            per_ms: 60_000,
        };
        let hourly = Rule {
            limit: 5,
            per_ms: 3_600_000,
        };
        let starts = [(0, 1), (100_000, 1)];
        assert_eq!(room(&starts, 120_000, strict), 0);
        assert_eq!(room(&starts, 120_000, THREE_A_MINUTE), 2);
        assert_eq!(room(&starts, 120_000, hourly), 3);
        assert_eq!(next_start_ms(&starts, 120_000, strict), 160_000);
    }

    #[test]
    fn buckets_are_named_within_the_namespace_and_keyed_by_the_context() {
        let limit = RateLimit {
            name: "stripe".into(),
            limit: 100,
            per: 60.0,
            key: Some(KeyExpression::parse("{{ context.account }}").unwrap()),
        };
        assert_eq!(
            limit
                .bucket_for("shop", &json!({"account": "a-1"}))
                .unwrap(),
            "shop/stripe:a-1"
        );
        let missing = limit.bucket_for("shop", &json!({})).unwrap_err();
        assert_eq!(missing.path, "context/account");
        assert!(
            missing.message.contains("rate limit key"),
            "{}",
            missing.message
        );
        let shared = RateLimit { key: None, ..limit };
        assert_eq!(
            shared.bucket_for("shop", &json!({})).unwrap(),
            "shop/stripe"
        );
        assert_eq!(shared.per_ms(), 60_000);
    }
}
