//! Step limits in the claim: rate limits (the rule: [`tasker_domain::rate_limit`]) and step
//! concurrency limits (at most `limit` attempts of a bucket running at once). A limited step
//! is never in the claim's ready set (`rate_limit IS NULL AND concurrency_bucket IS NULL`
//! there); a claim takes it only through [`Store::admit_limited`], in the same transaction,
//! which locks its buckets, counts what they hold and lets through what fits:
//!
//! - a rate limit's bucket row is locked (one upsert for all, in name order), and its starts
//!   recorded in the window counted; the claim then records the starts it made. A bucket
//!   found spent keeps the time its next start frees (`next_start_ms`): the ready counts pass
//!   over its steps until then, and the maintenance loop wakes the claimers at that time, so a
//!   throttled step waits without anyone polling for it;
//! - a concurrency bucket's advisory lock is taken (PostgreSQL; SQLite has one writer), then
//!   its running attempts counted. A running attempt's end (completion, failure, release,
//!   lease expiry, cancellation) is what frees room, and each of those wakes the claimers.
//!
//! Claims look for limited steps only once this store knows some exist (it created them, or
//! [`Store::notice_step_limits`] found them), so work without limits pays nothing for them.

use crate::concurrency::Counted;
use crate::sql::Sql;
use crate::write::WriteTxn;
use crate::{Result, Store};
use sea_orm::{ConnectionTrait, FromQueryResult};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use tasker_domain::rate_limit::{self, Rule};
use uuid::Uuid;

/// The first half of every step concurrency bucket's advisory lock: apart from task keys'.
const STEP_LOCK_CLASS: i32 = 0x7374_6570; // "step"

/// Whether claims look for limited steps, and the claims' news for the maintenance loop.
#[derive(Debug, Default)]
pub(crate) struct StepLimits {
    /// Limited steps may exist: set once and for good.
    in_use: AtomicBool,
    /// A claim found a rate limit spent: its next start is a new time to wake at.
    throttled: tokio::sync::Notify,
}

/// What [`Store::admit_limited`] let through, and what its rate limits hold.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    pub steps: Vec<Uuid>,
    /// The rate limit buckets that refused a step, with the rule of the first one refused.
    refused: BTreeMap<String, Rule>,
    /// The starts recorded in the window of the candidates' rate limit buckets.
    starts: HashMap<String, Vec<(i64, u32)>>,
}

#[derive(Debug, FromQueryResult)]
struct Candidate {
    id: Uuid,
    rate_bucket: Option<String>,
    tokens: Option<i32>,
    per_ms: Option<i64>,
    slot_bucket: Option<String>,
    slot_limit: Option<i32>,
}

impl Candidate {
    fn rule(&self) -> Option<(&str, Rule)> {
        Some((
            self.rate_bucket.as_deref()?,
            Rule {
                limit: u32::try_from(self.tokens?).unwrap_or(0),
                per_ms: self.per_ms?,
            },
        ))
    }

    fn slots(&self) -> Option<(&str, u64)> {
        Some((
            self.slot_bucket.as_deref()?,
            u64::try_from(self.slot_limit?).unwrap_or(0),
        ))
    }
}

#[derive(Debug, FromQueryResult)]
struct Started {
    bucket: String,
    started_ms: i64,
    count: i32,
}

#[derive(Debug, FromQueryResult)]
struct Running {
    bucket: String,
    running: i64,
}

/// The predicate of a limited step, as the partial index over them states it.
pub(crate) const LIMITED: &str = "(rate_limit IS NOT NULL OR concurrency_bucket IS NOT NULL)";
/// The partial index over the limited steps that may still start an attempt.
pub(crate) const LIMITED_INDEX: &str = "ix_steps_limited";

/// The most idle rate limit buckets one call forgets (and locks).
const FORGET_BATCH: i64 = 1_000;

#[derive(Debug, FromQueryResult)]
struct Bucket {
    bucket: String,
}

#[derive(Debug, FromQueryResult)]
struct Spent {
    bucket: String,
    next_start_ms: i64,
}

/// The rate limit buckets of the candidates with the longest window each uses, and their
/// concurrency buckets.
fn buckets_of(candidates: &[Candidate]) -> (BTreeMap<&str, i64>, BTreeSet<&str>) {
    let mut windows: BTreeMap<&str, i64> = BTreeMap::new();
    let mut slots = BTreeSet::new();
    for candidate in candidates {
        if let Some((bucket, rule)) = candidate.rule() {
            let window = windows.entry(bucket).or_default();
            *window = (*window).max(rule.per_ms);
        }
        if let Some((bucket, _)) = candidate.slots() {
            slots.insert(bucket);
        }
    }
    (windows, slots)
}

impl Store {
    /// Claims look for limited steps from now on.
    pub(crate) fn step_limits_in_use(&self) {
        self.step_limits.in_use.store(true, Ordering::Relaxed);
    }

    /// Whether claims look for limited steps: ends of running attempts then wake claimers,
    /// since they may free a concurrency limit's room.
    pub fn step_limits_known(&self) -> bool {
        self.step_limits.in_use.load(Ordering::Relaxed)
    }

    /// Looks (once it has not yet) for limited steps that another replica or an earlier run
    /// created, so that this store's claims take them too; answers whether claims look for
    /// them now. The maintenance loop calls it now and then.
    pub async fn notice_step_limits(&self) -> Result<bool> {
        if self.step_limits_known() {
            return Ok(true);
        }
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT COUNT(*) AS n FROM (SELECT 1 AS one FROM workflow_steps")
            .indexed_by(LIMITED_INDEX)
            .push(" WHERE ")
            .push(LIMITED)
            .push(" AND state IN ('pending', 'error') LIMIT 1) AS any_step");
        let found = Counted::find_by_statement(sql.build())
            .one(&self.db)
            .await?
            .is_some_and(|row| row.n > 0);
        if found {
            self.step_limits_in_use();
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
        self.step_limits.throttled.notified().await;
    }

    /// Tells the maintenance loop, after the claim that found a bucket spent committed.
    pub(crate) fn note_throttled(&self) {
        self.step_limits.throttled.notify_one();
    }

    /// Inside a claim: the limited steps it may start now, at most `limit`, in claim order.
    /// Locks the candidates' buckets (rate limit rows, then concurrency buckets' advisory
    /// locks, each kind in one sorted batch, so claims never deadlock over them) before
    /// counting what they hold. A bucket that refuses a candidate holds back its later ones;
    /// a spent rate limit records when the refused one could start.
    pub(crate) async fn admit_limited(
        &self,
        txn: &WriteTxn,
        handlers: &[String],
        within: &tasker_domain::Within,
        limit: u32,
        now_ms: i64,
    ) -> Result<Admission> {
        if !self.step_limits_known() || limit == 0 {
            return Ok(Admission::default());
        }
        let backend = self.db.get_database_backend();
        let mut sql = Sql::new(backend);
        sql.push("SELECT s.id AS id, s.rate_limit AS rate_bucket, s.rate_limit_tokens AS tokens, s.rate_limit_per_ms AS per_ms, s.concurrency_bucket AS slot_bucket, s.concurrency_limit AS slot_limit");
        crate::execution::push_ready_steps(
            &mut sql,
            now_ms,
            handlers,
            within,
            crate::execution::Limited::Only,
        );
        crate::execution::push_claim_order(&mut sql);
        sql.push(" LIMIT ").bind(i64::from(limit));
        let candidates = Candidate::find_by_statement(sql.build()).all(txn).await?;
        if candidates.is_empty() {
            return Ok(Admission::default());
        }
        let (windows, slot_buckets) = buckets_of(&candidates);
        let mut starts = HashMap::new();
        if !windows.is_empty() {
            self.lock_buckets(txn, &windows).await?;
            starts = self.recent_starts(txn, &windows, now_ms).await?;
        }
        let mut running = HashMap::new();
        if !slot_buckets.is_empty() {
            crate::concurrency::lock_keys(txn, STEP_LOCK_CLASS, slot_buckets.iter().copied())
                .await?;
            running = self.running_in(txn, slot_buckets.iter().copied()).await?;
        }
        let mut started: HashMap<&str, u64> = HashMap::new();
        let mut refused: BTreeMap<String, Rule> = BTreeMap::new();
        let mut full: BTreeSet<&str> = BTreeSet::new();
        let mut steps = Vec::new();
        for candidate in &candidates {
            let rate = candidate.rule();
            if let Some((bucket, rule)) = rate {
                if refused.contains_key(bucket) {
                    continue;
                }
                let recorded = starts.get(bucket).map_or(&[][..], Vec::as_slice);
                let taken = started.get(bucket).copied().unwrap_or(0);
                if taken >= rate_limit::room(recorded, now_ms, rule) {
                    refused.insert(bucket.to_owned(), rule);
                    continue;
                }
            }
            if let Some((bucket, limit)) = candidate.slots() {
                let busy = running.get(bucket).copied().unwrap_or(0);
                if full.contains(bucket) || busy >= limit {
                    full.insert(bucket);
                    continue;
                }
                running.insert(bucket.to_owned(), busy + 1);
            }
            if let Some((bucket, _)) = rate {
                *started.entry(bucket).or_default() += 1;
            }
            steps.push(candidate.id);
        }
        Ok(Admission {
            steps,
            refused,
            starts,
        })
    }

    /// After the claim of an admission's steps: records the starts it made (`started`, the
    /// rate limit bucket of each step it really leased), and for each bucket that refused a
    /// step, when that step could start — counting only the starts that happened, since on
    /// PostgreSQL another claim may have leased an admitted step first. Answers whether a
    /// bucket's next start changed (a new time for the maintenance loop to wake at).
    pub(crate) async fn settle_admission(
        &self,
        txn: &WriteTxn,
        admission: &Admission,
        started: impl IntoIterator<Item = &str>,
        now_ms: i64,
    ) -> Result<bool> {
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for bucket in started {
            *counts.entry(bucket).or_default() += 1;
        }
        let backend = self.db.get_database_backend();
        if !counts.is_empty() {
            let mut sql = Sql::new(backend);
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
                    .bind(i32::try_from(*count).unwrap_or(i32::MAX))
                    .push(")");
            }
            sql.push(" ON CONFLICT (bucket, started_ms) DO UPDATE SET count = rate_limit_starts.count + excluded.count");
            txn.execute_raw(sql.build()).await?;
        }
        if admission.refused.is_empty() {
            return Ok(false);
        }
        let next_starts: Vec<(&str, i64)> = admission
            .refused
            .iter()
            .map(|(bucket, rule)| {
                let mut starts = admission.starts.get(bucket).cloned().unwrap_or_default();
                starts.push((now_ms, counts.get(bucket.as_str()).copied().unwrap_or(0)));
                (
                    bucket.as_str(),
                    rate_limit::next_start_ms(&starts, now_ms, *rule),
                )
            })
            .collect();
        let mut sql = Sql::new(backend);
        sql.push("UPDATE rate_limits SET next_start_ms = CASE bucket");
        let when = |sql: &mut Sql| {
            for (bucket, at) in &next_starts {
                sql.push(" WHEN ").bind(*bucket).push(" THEN ").bind(*at);
            }
            sql.push(" END");
        };
        when(&mut sql);
        sql.push(" WHERE bucket IN ")
            .bind_list(next_starts.iter().map(|(bucket, _)| (*bucket).to_owned()))
            .push(" AND (next_start_ms IS NULL OR next_start_ms <> CASE bucket");
        when(&mut sql);
        sql.push(")");
        Ok(txn.execute_raw(sql.build()).await?.rows_affected() > 0)
    }

    /// How many attempts of each of `buckets` run now, read on `conn` (a claim's
    /// transaction, or the store for a reader).
    async fn running_in<C: ConnectionTrait>(
        &self,
        conn: &C,
        buckets: impl IntoIterator<Item = &str>,
    ) -> Result<HashMap<String, u64>> {
        let mut sql = Sql::new(self.db.get_database_backend());
        sql.push("SELECT concurrency_bucket AS bucket, COUNT(*) AS running FROM workflow_steps")
            .indexed_by("ix_steps_running_limited")
            .push(" WHERE concurrency_bucket IN ")
            .bind_list(buckets.into_iter().map(str::to_owned))
            .push(" AND state = 'in_progress' GROUP BY concurrency_bucket");
        Ok(Running::find_by_statement(sql.build())
            .all(conn)
            .await?
            .into_iter()
            .map(|row| (row.bucket, u64::try_from(row.running).unwrap_or(0)))
            .collect())
    }

    /// How many attempts of each of `buckets` (step concurrency limits) run now.
    pub async fn running_attempts(&self, buckets: &[String]) -> Result<HashMap<String, u64>> {
        if buckets.is_empty() {
            return Ok(HashMap::new());
        }
        self.running_in(&self.db, buckets.iter().map(String::as_str))
            .await
    }

    /// Takes the rows of `windows`' buckets (creating the missing ones), which serializes
    /// the admissions of a bucket across replicas, and widens each row's window to the longest
    /// a candidate uses.
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

    /// Forgets up to [`FORGET_BATCH`] rate limit buckets with no start for a day (the
    /// longest window): their old starts, then their rows. An admission prunes only its own
    /// buckets, so without this a keyed limit would keep a row for every key it ever saw.
    /// The rows are locked first, in name order as admissions lock them, and the deletes
    /// count again after the locks (a claim may have just recorded a start). Answers how many
    /// buckets went.
    pub async fn forget_idle_rate_limits(&self) -> Result<u64> {
        if !self.step_limits_known() {
            return Ok(0);
        }
        let longest = (rate_limit::MAX_PER_SECONDS * 1000.0) as i64;
        let before = self.now_ms() - longest;
        self.writing(async {
            let txn = self.begin_write().await?;
            let backend = self.db.get_database_backend();
            let recent = |sql: &mut Sql| {
                sql.push(" AND NOT EXISTS (SELECT 1 FROM rate_limit_starts s WHERE s.bucket = rate_limits.bucket AND s.started_ms > ")
                    .bind(before)
                    .push(")");
            };
            let mut idle = Sql::new(backend);
            idle.push("SELECT bucket FROM rate_limits WHERE (next_start_ms IS NULL OR next_start_ms <= ")
                .bind(before)
                .push(")");
            recent(&mut idle);
            // Byte order, as admissions sort buckets (PostgreSQL's default collation is not).
            if idle.is_postgres() {
                idle.push(" ORDER BY bucket COLLATE \"C\" LIMIT ")
                    .bind(FORGET_BATCH)
                    .push(" FOR UPDATE");
            } else {
                idle.push(" ORDER BY bucket LIMIT ").bind(FORGET_BATCH);
            }
            let buckets: Vec<String> = Bucket::find_by_statement(idle.build())
                .all(&txn)
                .await?
                .into_iter()
                .map(|row| row.bucket)
                .collect();
            if buckets.is_empty() {
                txn.commit().await?;
                return Ok(0);
            }
            let mut starts = Sql::new(backend);
            starts
                .push("DELETE FROM rate_limit_starts WHERE bucket IN ")
                .bind_list(buckets.iter().cloned())
                .push(" AND started_ms <= ")
                .bind(before);
            txn.execute_raw(starts.build()).await?;
            let mut rows = Sql::new(backend);
            rows.push("DELETE FROM rate_limits WHERE bucket IN ")
                .bind_list(buckets.iter().cloned());
            recent(&mut rows);
            let gone = txn.execute_raw(rows.build()).await?.rows_affected();
            txn.commit().await?;
            Ok(gone)
        })
        .await
    }
}
