//! Rate limits: a bucket lets at most `limit` attempts start in any window of `per`, across
//! replicas; the others wait, and say until when.

use crate::{claim, complete, databases};
use chrono::Duration;
use serde_json::json;
use std::collections::HashMap;
use tasker_domain::{Clock, Within};
use tasker_store::{AttemptFailure, ClaimedStep, NewTask, Store};

/// A step that calls a partner's API at most 3 times a minute, beside one without a limit;
/// and a step limited to once a minute per account.
const PARTNER: &str = r#"
namespace: billing
name: sync
version: 1.0.0
context_schema:
  type: object
  properties: { account: { type: string } }
steps:
  - { name: call, handler: partner, rate_limit: { name: partner_api, limit: 3, per: 1m },
      retry: { max_attempts: 3, backoff: { base: 1, jitter: 0 } } }
  - { name: note, handler: noop }
  - { name: per_account, handler: account, rate_limit: { name: account_api, limit: 1, per: 60, key: "{{ context.account }}" } }
"#;

fn sync(account: &str) -> NewTask {
    let mut new = crate::order("billing", "sync", 0);
    new.request.context = json!({ "account": account });
    new
}

/// Claims of one handler, up to `limit`.
fn claim_of(handler: &str, limit: u32) -> tasker_store::ClaimRequest {
    tasker_store::ClaimRequest {
        handlers: vec![handler.to_owned()],
        ..claim(limit)
    }
}

fn names(claimed: &[ClaimedStep]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for step in claimed {
        *counts.entry(step.step.name.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_rate_limit_of_n_per_interval_admits_n_across_replicas() {
    let (clock, databases) = databases().await;
    for db in databases {
        let backend = db.backend();
        let store = db.store.clone();
        store.register_template(PARTNER, false).await.unwrap();
        let other = Store::connect(&db.options, clock.clone()).await.unwrap();
        assert!(!other.notice_rate_limits().await.unwrap(), "none yet");
        store
            .create_tasks((0..8).map(|_| sync("acme")).collect())
            .await
            .unwrap();
        assert!(
            other.notice_rate_limits().await.unwrap(),
            "{backend}: the other replica finds them"
        );
        let task = store.create_task(sync("acme")).await.unwrap().task.id;
        let mut steps = store.steps_for_tasks(&[task]).await.unwrap();
        steps.sort_by_key(|step| step.position);
        let limit = steps[0].rate_limit.clone().unwrap();
        assert_eq!(limit.bucket, "billing/partner_api");
        assert_eq!((limit.limit, limit.per_seconds), (3, 60.0));
        assert_eq!(
            steps[2].rate_limit.as_ref().unwrap().bucket,
            "billing/account_api:acme"
        );

        // Both replicas claim at once, many times: three calls start, every note does.
        let mut claims = Vec::new();
        for replica in [store.clone(), other.clone()] {
            claims.push(tokio::spawn(async move {
                let mut claimed = Vec::new();
                for _ in 0..5 {
                    claimed.extend(replica.claim_steps(&claim(4)).await.unwrap());
                }
                claimed
            }));
        }
        let mut first_minute = Vec::new();
        for claim in claims {
            first_minute.extend(claim.await.unwrap());
        }
        let counts = names(&first_minute);
        assert_eq!(counts.get("call"), Some(&3), "{backend}: {counts:?}");
        assert_eq!(counts.get("note"), Some(&9), "{backend}");
        assert_eq!(
            counts.get("per_account"),
            Some(&1),
            "{backend}: one per account a minute"
        );
        // The spent bucket says when it frees: the maintenance loop sleeps until then, and
        // workers are not told of steps they could not claim.
        complete(&store, &first_minute).await;
        let now = clock.now().timestamp_millis();
        assert_eq!(
            store.next_wakeup_ms(now).await.unwrap(),
            Some(now + 60_000),
            "{backend}"
        );
        let partner = ["partner".to_owned()];
        assert_eq!(
            store
                .count_ready_steps(&partner, &Within::Any, 100)
                .await
                .unwrap(),
            0
        );

        clock.advance(Duration::milliseconds(59_999));
        assert!(
            store
                .claim_steps(&claim_of("partner", 10))
                .await
                .unwrap()
                .is_empty()
        );
        clock.advance(Duration::milliseconds(1));
        assert_eq!(
            store
                .count_ready_steps(&partner, &Within::Any, 100)
                .await
                .unwrap(),
            6,
            "{backend}: the window has passed"
        );
        let second_minute = other.claim_steps(&claim_of("partner", 10)).await.unwrap();
        assert_eq!(second_minute.len(), 3, "{backend}");

        // A retry is an attempt like any other: it waits for the bucket too.
        let failed = store
            .fail_step(&AttemptFailure {
                lease_token: second_minute[0].lease_token,
                message: "partner said 503".into(),
                retryable: true,
                retry_after_seconds: None,
            })
            .await
            .unwrap();
        assert_eq!(failed.step.attempts, 1);
        complete(&store, &second_minute[1..]).await;
        clock.advance(Duration::seconds(30));
        assert!(
            store
                .claim_steps(&claim_of("partner", 10))
                .await
                .unwrap()
                .is_empty(),
            "{backend}: the retry is due, the bucket is not"
        );
        clock.advance(Duration::seconds(30));
        let third_minute = store.claim_steps(&claim_of("partner", 10)).await.unwrap();
        assert_eq!(third_minute.len(), 3, "{backend}");
        assert!(
            third_minute.iter().all(|c| c.step.id != failed.step.id),
            "{backend}: the calls that waited since their task started go first"
        );
        clock.advance(Duration::seconds(60));
        let fourth_minute = store.claim_steps(&claim_of("partner", 10)).await.unwrap();
        assert_eq!(fourth_minute.len(), 1, "{backend}");
        assert_eq!(fourth_minute[0].step.id, failed.step.id);
        assert_eq!(fourth_minute[0].step.attempts, 2);

        // Keyed buckets are apart: another account calls at once.
        let globex = store.create_task(sync("globex")).await.unwrap().task.id;
        let per_account = store.claim_steps(&claim_of("account", 10)).await.unwrap();
        assert!(
            per_account.iter().any(|c| c.step.task_id == globex),
            "{backend}"
        );

        // Buckets no step used for a day are forgotten; a limit starts afresh after that.
        clock.advance(Duration::hours(25));
        assert!(
            store.forget_idle_rate_limits().await.unwrap() > 0,
            "{backend}"
        );
        assert_eq!(
            store.forget_idle_rate_limits().await.unwrap(),
            0,
            "{backend}"
        );
        let globex_call = store.claim_steps(&claim_of("partner", 10)).await.unwrap();
        assert_eq!(globex_call.len(), 1, "{backend}");
        assert_eq!(globex_call[0].step.task_id, globex);
    }
}
