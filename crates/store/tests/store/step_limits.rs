//! Step limits: a rate limit's bucket lets at most `limit` attempts start in any window of
//! `per`, and a step concurrency limit's at most `limit` run at once, across replicas; the
//! others wait.

use crate::{claim, complete, databases};
use chrono::Duration;
use serde_json::json;
use std::collections::HashMap;
use std::collections::HashSet;
use tasker_domain::{Clock, Within};
use tasker_store::EventFilter;
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
        assert!(!other.notice_step_limits().await.unwrap(), "none yet");
        store
            .create_tasks((0..8).map(|_| sync("acme")).collect())
            .await
            .unwrap();
        assert!(
            other.notice_step_limits().await.unwrap(),
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

        // Keyed buckets are apart: another account calls at once, even behind a backlog
        // of the first account's calls claimed one at a time.
        let globex = store.create_task(sync("globex")).await.unwrap().task.id;
        let mut per_account = Vec::new();
        for _ in 0..3 {
            per_account.extend(store.claim_steps(&claim_of("account", 1)).await.unwrap());
        }
        let tasks: Vec<_> = per_account.iter().map(|c| c.step.task_id).collect();
        assert_eq!(tasks.len(), 2, "{backend}: one per account");
        assert!(tasks.contains(&globex), "{backend}");

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

/// At most two uploads run at once for the template; the mail step shares a named limit of one
/// per account with another template's step.
const EXPORT: &str = r#"
namespace: billing
name: export
version: 1.0.0
context_schema:
  type: object
  properties: { account: { type: string } }
steps:
  - { name: upload, handler: uploader, concurrency: { limit: 2 } }
  - { name: mail, handler: mailer, depends_on: [upload],
      concurrency: { name: mail, limit: 1, key: "{{ context.account }}" } }
"#;

const REMINDER: &str = r#"
namespace: billing
name: reminder
version: 1.0.0
steps:
  - { name: mail, handler: mailer, concurrency: { name: mail, limit: 1, key: "{{ context.account }}" } }
"#;

fn export(template: &str, account: &str) -> NewTask {
    let mut new = crate::order("billing", template, 0);
    new.request.context = json!({ "account": account });
    new
}

#[tokio::test]
async fn a_step_concurrency_limit_holds_across_replicas_and_frees_as_attempts_end() {
    let (clock, databases) = databases().await;
    for db in databases {
        let backend = db.backend();
        let store = db.store.clone();
        store.register_template(EXPORT, false).await.unwrap();
        store.register_template(REMINDER, false).await.unwrap();
        let other = Store::connect(&db.options, clock.clone()).await.unwrap();
        store
            .create_tasks((0..5).map(|_| export("export", "acme")).collect())
            .await
            .unwrap();
        assert!(other.notice_step_limits().await.unwrap());
        let mut steps = store
            .steps_for_tasks(&[store
                .create_task(export("reminder", "acme"))
                .await
                .unwrap()
                .task
                .id])
            .await
            .unwrap();
        let mail = steps.pop().unwrap().concurrency.unwrap();
        assert_eq!((mail.bucket.as_str(), mail.limit), ("billing/mail:acme", 1));

        let mut claims = Vec::new();
        for replica in [store.clone(), other.clone()] {
            claims.push(tokio::spawn(async move {
                let mut claimed = Vec::new();
                for _ in 0..4 {
                    claimed.extend(replica.claim_steps(&claim(3)).await.unwrap());
                }
                claimed
            }));
        }
        let mut running = Vec::new();
        for claim in claims {
            running.extend(claim.await.unwrap());
        }
        let counts = names(&running);
        assert_eq!(counts.get("upload"), Some(&2), "{backend}: {counts:?}");
        assert_eq!(counts.get("mail"), Some(&1), "{backend}: the reminder's");
        assert_eq!(
            store
                .count_ready_steps(&["uploader".to_owned()], &Within::Any, 100)
                .await
                .unwrap(),
            0,
            "{backend}: workers are not told of uploads with no room"
        );

        // An ended attempt makes room: completed, failed or given back.
        let uploads: Vec<_> = running.iter().filter(|c| c.step.name == "upload").collect();
        complete(&store, std::slice::from_ref(uploads[0])).await;
        let next = store.claim_steps(&claim_of("uploader", 5)).await.unwrap();
        assert_eq!(next.len(), 1, "{backend}");
        store.release_leases(&[next[0].lease_token]).await.unwrap();
        let again = other.claim_steps(&claim_of("uploader", 5)).await.unwrap();
        assert_eq!(again.len(), 1, "{backend}");
        // The export's mail waits for the reminder's: they share the account's limit.
        assert!(
            store
                .claim_steps(&claim_of("mailer", 5))
                .await
                .unwrap()
                .is_empty(),
            "{backend}"
        );
        let reminder = running.iter().find(|c| c.step.name == "mail").unwrap();
        complete(&store, std::slice::from_ref(reminder)).await;
        let mails = store.claim_steps(&claim_of("mailer", 5)).await.unwrap();
        assert_eq!(mails.len(), 1, "{backend}");
    }
}

/// Two replicas claim and complete 60 uploads with a limit of 3; replaying the steps' starts
/// and ends in the log's order, never more than 3 ran at once.
#[tokio::test]
async fn two_replicas_never_run_more_attempts_than_a_step_limit() {
    const TASKS: usize = 60;
    let (clock, databases) = databases().await;
    for db in databases {
        let backend = db.backend();
        let store = db.store.clone();
        store
            .register_template(&EXPORT.replace("limit: 2 }", "limit: 3 }"), false)
            .await
            .unwrap();
        store
            .create_tasks(
                (0..TASKS)
                    .map(|i| export("export", &format!("a{i}")))
                    .collect(),
            )
            .await
            .unwrap();
        let other = Store::connect(&db.options, clock.clone()).await.unwrap();
        other.notice_step_limits().await.unwrap();
        let mut workers = Vec::new();
        for replica in [store.clone(), other] {
            workers.push(tokio::spawn(async move {
                let mut idle = 0;
                while idle < 50 {
                    let claimed = replica.claim_steps(&claim_of("uploader", 5)).await.unwrap();
                    if claimed.is_empty() {
                        idle += 1;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    idle = 0;
                    tokio::task::yield_now().await;
                    complete(&replica, &claimed).await;
                }
            }));
        }
        for worker in workers {
            worker.await.unwrap();
        }
        let filter = EventFilter {
            names: vec!["step.started".into(), "step.completed".into()],
            ..EventFilter::within(Within::Any)
        };
        let mut cursor = None;
        let mut running: HashSet<uuid::Uuid> = HashSet::new();
        let (mut most, mut uploads) = (0, 0);
        loop {
            let page = store.events_page(&filter, cursor, 500).await.unwrap();
            let Some(last) = page.last() else { break };
            cursor = Some(last.cursor());
            for event in &page {
                let step = event.step_id.unwrap();
                if event.name == "step.started" {
                    running.insert(step);
                    uploads += 1;
                    most = most.max(running.len());
                } else {
                    running.remove(&step);
                }
            }
        }
        assert_eq!(uploads, TASKS, "{backend}: every upload ran");
        assert_eq!(most, 3, "{backend}: the limit was reached and never passed");
    }
}
