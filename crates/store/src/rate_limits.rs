//! Rate limits in the claim (the rule itself: [`tasker_domain::rate_limit`]). A rate-limited
//! step is never in the claim's ready set (`rate_limit IS NULL` there); a claim takes it only
//! through [`Store::admit_rate_limited`], in the same transaction, which locks its bucket's
//! row, counts the bucket's recent starts and lets through what the rule allows. The claim
//! then records how many of them it really started. A bucket found spent keeps the time its
//! next start frees (`next_start_ms`): the ready counts pass over its steps until then, and
//! the maintenance loop wakes the claimers at that time, so a throttled step waits without
//! anyone polling for it.
//!
//! Claims look for rate-limited steps only once this store knows some exist (it created
//! them, or [`Store::notice_rate_limits`] found them), so work without rate limits pays
//! nothing for the feature.

use crate::sql::Sql;
use crate::write::WriteTxn;
use crate::{Result, Store};
use sea_orm::{ConnectionTrait, FromQueryResult};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use tasker_domain::rate_limit::{self, Rule};
use uuid::Uuid;

/// Whether claims look for rate-limited steps, and the claims' news for the maintenance loop.
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    /// Rate-limited steps may exist: set once and for good.
    in_use: AtomicBool,
    /// A claim found a bucket spent: its next start is a new time to wake at.
    throttled: tokio::sync::Notify,
}

/// What [`Store::admit_rate_limited`] let through: the steps, and the buckets they draw from.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    pub steps: Vec<Uuid>,
    /// A bucket was found spent (its `next_start_ms` changed).
    pub throttled: bool,
}

#[derive(Debug, FromQueryResult)]
struct Candidate {
    id: Uuid,
    bucket: String,
    tokens: i32,
    per_ms: i64,
}

#[derive(Debug, FromQueryResult)]
struct Started {
    bucket: String,
    started_ms: i64,
    count: i32,
}

#[derive(Debug, FromQueryResult)]
struct Found {
    found: i64,
}

#[derive(Debug, FromQueryResult)]
struct Spent {
    bucket: String,
    next_start_ms: i64,
}

impl Store {
    /// Claims look for rate-limited steps from now on.
    pub(crate) fn rate_limits_in_use(&self) {
        self.rate_limits.in_use.store(true, Ordering::Relaxed);
    }

    fn rate_limits_known(&self) -> bool {
        self.rate_limits.in_use.load(Ordering::Relaxed)
    }

    /// Looks (once it has not yet) for rate-limited steps that another replica or an earlier
    /// run created, so that this store's claims take them too; answers whether claims look
    /// for them now. The maintenance loop calls it now and then.
    pub async fn notice_rate_limits(&self) -> Result<bool> {
        if self.rate_limits_known() {
            return Ok(true);
        }
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT COUNT(*) AS found FROM (SELECT 1 AS one FROM workflow_steps")
            .indexed_by("ix_steps_rate_limited")
            .push(" WHERE rate_limit IS NOT NULL AND state IN ('pending', 'error') LIMIT 1) AS any_step");
        let found = Found::find_by_statement(sql.build())
            .one(&self.db)
            .await?
            .is_some_and(|row| row.found > 0);
        if found {
            self.rate_limits_in_use();
        }
        Ok(found)
    }

    /// Of `buckets`, those a claim found spent whose next start is still to come, with its
    /// time: their steps wait until then.
    pub async fn spent_rate_limits(
        &self,
        buckets: &[String],
    ) -> Result<HashMap<String, chrono::DateTime<chrono::Utc>>> {
        if buckets.is_empty() {
            return Ok(HashMap::new());
        }
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT bucket, next_start_ms FROM rate_limits WHERE bucket IN ")
            .bind_list(buckets.iter().cloned())
            .push(" AND next_start_ms > ")
            .bind(self.now_ms());
        let spent = Spent::find_by_statement(sql.build()).all(&self.db).await?;
        Ok(spent
            .into_iter()
            .filter_map(|row| Some((row.bucket, crate::records::from_millis(row.next_start_ms)?)))
            .collect())
    }

    /// Resolves when a claim has found a bucket spent, so the wake-up time may be earlier
    /// than the one the maintenance loop sleeps until.
    pub async fn throttled(&self) {
        self.rate_limits.throttled.notified().await;
    }

    /// Tells the maintenance loop, after the claim that found a bucket spent committed.
    pub(crate) fn note_throttled(&self) {
        self.rate_limits.throttled.notify_one();
    }

    /// Inside a claim: the rate-limited steps it may start now, at most `limit`, in claim
    /// order. Locks the buckets of the candidates (in name order, so claims never deadlock
    /// over them) before counting their starts; a bucket whose next candidate is refused
    /// records when that one could start, and holds back its later candidates.
    pub(crate) async fn admit_rate_limited(
        &self,
        txn: &WriteTxn,
        handlers: &[String],
        within: &tasker_domain::Within,
        limit: u32,
        now_ms: i64,
    ) -> Result<Admission> {
        if !self.rate_limits_known() || limit == 0 {
            return Ok(Admission::default());
        }
        let backend = self.db.get_database_backend();
        let mut sql = Sql::new(backend);
        sql.push("SELECT s.id AS id, s.rate_limit AS bucket, s.rate_limit_tokens AS tokens, s.rate_limit_per_ms AS per_ms");
        crate::execution::push_ready_steps(
            &mut sql,
            now_ms,
            handlers,
            within,
            crate::execution::RateLimited::Only,
        );
        crate::execution::push_claim_order(&mut sql);
        sql.push(" LIMIT ").bind(i64::from(limit));
        let candidates = Candidate::find_by_statement(sql.build()).all(txn).await?;
        if candidates.is_empty() {
            return Ok(Admission::default());
        }
        // The longest window each bucket's candidates use.
        let mut windows: BTreeMap<&str, i64> = BTreeMap::new();
        for candidate in &candidates {
            let window = windows.entry(candidate.bucket.as_str()).or_default();
            *window = (*window).max(candidate.per_ms);
        }
        self.lock_buckets(txn, &windows).await?;
        let starts = self.recent_starts(txn, &windows, now_ms).await?;
        let mut admitted: HashMap<&str, u64> = HashMap::new();
        let mut spent: BTreeMap<&str, i64> = BTreeMap::new();
        let mut steps = Vec::new();
        for candidate in &candidates {
            let bucket = candidate.bucket.as_str();
            if spent.contains_key(bucket) {
                continue;
            }
            let rule = Rule {
                limit: u32::try_from(candidate.tokens).unwrap_or(0),
                per_ms: candidate.per_ms,
            };
            let recorded = starts.get(bucket).map_or(&[][..], Vec::as_slice);
            let taken = admitted.entry(bucket).or_default();
            if *taken < rate_limit::room(recorded, now_ms, rule) {
                *taken += 1;
                steps.push(candidate.id);
            } else {
                let mut with_these = recorded.to_vec();
                with_these.push((now_ms, u32::try_from(*taken).unwrap_or(u32::MAX)));
                spent.insert(bucket, rate_limit::next_start_ms(&with_these, now_ms, rule));
            }
        }
        if !spent.is_empty() {
            let mut sql = Sql::new(backend);
            sql.push("UPDATE rate_limits SET next_start_ms = CASE bucket");
            for (bucket, at) in &spent {
                sql.push(" WHEN ").bind(*bucket).push(" THEN ").bind(*at);
            }
            sql.push(" END WHERE bucket IN ")
                .bind_list(spent.keys().map(|bucket| (*bucket).to_owned()));
            txn.execute_raw(sql.build()).await?;
        }
        Ok(Admission {
            steps,
            throttled: !spent.is_empty(),
        })
    }

    /// Takes the rows of `windows`' buckets (creating the missing ones), which serializes
    /// the admissions of a bucket across replicas, and widens each row's window to the longest
    /// a candidate uses; then forgets the starts that left every window.
    async fn lock_buckets(&self, txn: &WriteTxn, windows: &BTreeMap<&str, i64>) -> Result<()> {
        let backend = self.db.get_database_backend();
        let mut sql = Sql::new(backend);
        let greatest = if sql.is_postgres() { "GREATEST" } else { "MAX" };
        sql.push("INSERT INTO rate_limits (bucket, window_ms) VALUES ");
        for (i, (bucket, window)) in windows.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.push("(")
                .bind(*bucket)
                .push(", ")
                .bind(*window)
                .push(")");
        }
        sql.push(&format!(
            " ON CONFLICT (bucket) DO UPDATE SET window_ms = {greatest}(rate_limits.window_ms, excluded.window_ms)"
        ));
        txn.execute_raw(sql.build()).await?;
        Ok(())
    }

    /// The starts of the buckets still inside their longest window, per bucket; the older
    /// ones are deleted first.
    async fn recent_starts(
        &self,
        txn: &WriteTxn,
        windows: &BTreeMap<&str, i64>,
        now_ms: i64,
    ) -> Result<HashMap<String, Vec<(i64, u32)>>> {
        let backend = self.db.get_database_backend();
        let buckets = || windows.keys().map(|bucket| (*bucket).to_owned());
        let mut sql = Sql::new(backend);
        sql.push("DELETE FROM rate_limit_starts WHERE bucket IN ")
            .bind_list(buckets())
            .push(" AND started_ms <= ")
            .bind(now_ms)
            .push(" - (SELECT r.window_ms FROM rate_limits r WHERE r.bucket = rate_limit_starts.bucket)");
        txn.execute_raw(sql.build()).await?;
        let mut sql = Sql::new(backend);
        sql.push("SELECT bucket, started_ms, count FROM rate_limit_starts WHERE bucket IN ")
            .bind_list(buckets());
        let mut starts: HashMap<String, Vec<(i64, u32)>> = HashMap::new();
        for row in Started::find_by_statement(sql.build()).all(txn).await? {
            starts
                .entry(row.bucket)
                .or_default()
                .push((row.started_ms, u32::try_from(row.count).unwrap_or(0)));
        }
        Ok(starts)
    }

    /// Forgets the buckets no admission has used for a day (the longest window): their
    /// starts, and their rows once no start is left. An admission prunes only its own
    /// buckets, so without this a keyed limit would keep a row for every key it ever saw.
    /// Answers how many rows went.
    pub async fn forget_idle_rate_limits(&self) -> Result<u64> {
        if !self.rate_limits_known() {
            return Ok(0);
        }
        let longest = (rate_limit::MAX_PER_SECONDS * 1000.0) as i64;
        let before = self.now_ms() - longest;
        self.writing(async {
            let txn = self.begin_write().await?;
            let backend = self.db.get_database_backend();
            let mut starts = Sql::new(backend);
            starts
                .push("DELETE FROM rate_limit_starts WHERE started_ms <= ")
                .bind(before);
            let mut buckets = Sql::new(backend);
            buckets
                .push("DELETE FROM rate_limits WHERE (next_start_ms IS NULL OR next_start_ms <= ")
                .bind(before)
                .push(") AND NOT EXISTS (SELECT 1 FROM rate_limit_starts s WHERE s.bucket = rate_limits.bucket)");
            let mut gone = txn.execute_raw(starts.build()).await?.rows_affected();
            gone += txn.execute_raw(buckets.build()).await?.rows_affected();
            txn.commit().await?;
            Ok(gone)
        })
        .await
    }

    /// Records the attempts a claim started, per bucket, at `now_ms`.
    pub(crate) async fn record_starts(
        &self,
        txn: &WriteTxn,
        buckets: impl IntoIterator<Item = &str>,
        now_ms: i64,
    ) -> Result<()> {
        let mut counts: BTreeMap<&str, i32> = BTreeMap::new();
        for bucket in buckets {
            *counts.entry(bucket).or_default() += 1;
        }
        if counts.is_empty() {
            return Ok(());
        }
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("INSERT INTO rate_limit_starts (bucket, started_ms, count) VALUES ");
        for (i, (bucket, count)) in counts.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.push("(")
                .bind(*bucket)
                .push(", ")
                .bind(now_ms)
                .push(", ")
                .bind(*count)
                .push(")");
        }
        sql.push(" ON CONFLICT (bucket, started_ms) DO UPDATE SET count = rate_limit_starts.count + excluded.count");
        txn.execute_raw(sql.build()).await?;
        Ok(())
    }
}
