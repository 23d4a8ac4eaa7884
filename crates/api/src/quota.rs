//! Per-token quotas: open WebSocket connections, live subscriptions, and the rate of
//! `claimSteps` per worker. They apply to authenticated callers; a server without
//! authentication serves only its own machine and trusts it.

use crate::error::ApiError;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The quotas; each has a safe default.
#[derive(Debug, Clone)]
pub struct QuotaLimits {
    /// WebSocket connections one token may hold open.
    pub connections_per_token: usize,
    /// Subscriptions one token may have running, across its connections.
    pub subscriptions_per_token: usize,
    /// `claimSteps` calls per second one worker id may make, on average.
    pub claims_per_second: f64,
    /// How many calls a worker may make at once above that rate.
    pub claim_burst: f64,
}

impl Default for QuotaLimits {
    fn default() -> Self {
        Self {
            connections_per_token: 32,
            subscriptions_per_token: 128,
            claims_per_second: 20.0,
            claim_burst: 40.0,
        }
    }
}

/// Worker ids not seen for this long are forgotten.
const IDLE_WORKER_SECONDS: i64 = 600;

/// Counts kept in memory for the quotas.
#[derive(Debug, Default)]
pub struct Quotas {
    limits: QuotaLimits,
    open: Mutex<HashMap<u64, Open>>,
    claims: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Open {
    connections: usize,
    subscriptions: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: DateTime<Utc>,
}

/// Which count a [`Held`] holds one of.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Connection,
    Subscription,
}

/// One open connection or subscription; released when dropped.
#[derive(Debug)]
pub struct Held {
    quotas: Arc<Quotas>,
    key: u64,
    kind: Kind,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.quotas.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = open.get_mut(&self.key) {
            match self.kind {
                Kind::Connection => entry.connections = entry.connections.saturating_sub(1),
                Kind::Subscription => entry.subscriptions = entry.subscriptions.saturating_sub(1),
            }
            if entry.connections == 0 && entry.subscriptions == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl Quotas {
    pub fn new(limits: QuotaLimits) -> Arc<Quotas> {
        Arc::new(Quotas {
            limits,
            ..Quotas::default()
        })
    }

    fn hold(self: &Arc<Self>, key: u64, kind: Kind) -> Result<Held, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let entry = open.entry(key).or_default();
        let (count, limit, what) = match kind {
            Kind::Connection => (
                &mut entry.connections,
                self.limits.connections_per_token,
                "WebSocket connections",
            ),
            Kind::Subscription => (
                &mut entry.subscriptions,
                self.limits.subscriptions_per_token,
                "subscriptions",
            ),
        };
        if *count >= limit {
            return Err(ApiError::RateLimited(format!(
                "this token already has {limit} {what} open, the most allowed; close one first"
            )));
        }
        *count += 1;
        Ok(Held {
            quotas: Arc::clone(self),
            key,
            kind,
        })
    }

    /// Opens a connection for the token with this key (`None`: no quota).
    pub fn connect(self: &Arc<Self>, key: Option<u64>) -> Result<Option<Held>, ApiError> {
        key.map(|key| self.hold(key, Kind::Connection)).transpose()
    }

    /// Starts a subscription for the token with this key (`None`: no quota).
    pub fn subscribe(self: &Arc<Self>, key: Option<u64>) -> Result<Option<Held>, ApiError> {
        key.map(|key| self.hold(key, Kind::Subscription))
            .transpose()
    }

    /// Takes one `claimSteps` call from the worker's bucket, or says when to come back.
    pub fn claim(&self, worker_id: &str, now: DateTime<Utc>) -> Result<(), ApiError> {
        let mut buckets = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 10_000 {
            buckets.retain(|_, bucket| (now - bucket.at).num_seconds() < IDLE_WORKER_SECONDS);
        }
        let rate = self.limits.claims_per_second;
        let burst = self.limits.claim_burst.max(1.0);
        let bucket = buckets.entry(worker_id.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = (now - bucket.at).num_milliseconds().max(0) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / rate;
            Err(ApiError::RateLimited(format!(
                "worker {worker_id:?} claims faster than {rate} times a second; retry in {wait:.2} s (or use waitSeconds to long-poll)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> QuotaLimits {
        QuotaLimits {
            connections_per_token: 2,
            subscriptions_per_token: 1,
            claims_per_second: 2.0,
            claim_burst: 3.0,
        }
    }

    #[test]
    fn connections_and_subscriptions_are_counted_per_token_and_released() {
        let quotas = Quotas::new(limits());
        let a = quotas.connect(Some(1)).unwrap();
        let b = quotas.connect(Some(1)).unwrap();
        assert_eq!(quotas.connect(Some(1)).unwrap_err().code(), "RATE_LIMITED");
        assert!(
            quotas.connect(Some(2)).is_ok(),
            "another token has its own count"
        );
        assert!(
            quotas.connect(None).unwrap().is_none(),
            "no quota without a token"
        );
        drop(a);
        let c = quotas.connect(Some(1)).unwrap();
        let s = quotas.subscribe(Some(1)).unwrap();
        assert!(quotas.subscribe(Some(1)).is_err());
        drop((b, c, s));
        assert!(
            quotas.open.lock().unwrap().is_empty(),
            "nothing left behind"
        );
    }

    #[test]
    fn claims_refill_at_the_rate_by_the_clock() {
        let quotas = Quotas::new(limits());
        let start = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        for _ in 0..3 {
            quotas.claim("w", start).unwrap();
        }
        let refused = quotas.claim("w", start).unwrap_err();
        assert!(refused.to_string().contains("retry in 0.50 s"), "{refused}");
        assert!(quotas.claim("other", start).is_ok());
        let later = start + chrono::Duration::milliseconds(500);
        quotas.claim("w", later).unwrap();
        assert!(quotas.claim("w", later).is_err());
    }
}
