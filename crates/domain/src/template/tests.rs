use super::*;
use serde_json::json;

const DIAMOND: &str = r#"
namespace: shop
name: order_fulfillment
version: 1.2.0
description: Validate, then reserve and charge in parallel, then ship.
context_schema:
  type: object
  required: [order_id]
  properties:
    order_id: { type: integer }
steps:
  - name: validate
    handler: noop
  - name: reserve
    handler: inventory.reserve
    depends_on: [validate]
    timeout: 30s
  - name: charge
    handler: payments.charge
    depends_on: validate
    retry:
      max_attempts: 5
      backoff: { base: 500ms, factor: 3, max: 2m, jitter: 0.2 }
  - name: ship
    handler: noop
    depends_on: [reserve, charge]
    skippable: true
    config: { carrier: ups }
"#;

fn problems_of(source: &str) -> Vec<Problem> {
    match TaskTemplate::parse(source) {
        Err(Error::InvalidTemplate(problems)) => problems,
        other => panic!("expected InvalidTemplate, got {other:?}"),
    }
}

fn has(problems: &[Problem], path: &str, fragment: &str) -> bool {
    problems
        .iter()
        .any(|p| p.path == path && p.message.contains(fragment))
}

#[test]
fn parses_and_normalizes_a_yaml_diamond() {
    let template = TaskTemplate::parse(DIAMOND).unwrap();
    assert_eq!(template.key(), "shop/order_fulfillment@1.2.0");
    assert_eq!(template.steps.len(), 4);
    let charge = &template.steps[2];
    assert_eq!(charge.depends_on, vec!["validate"]);
    assert_eq!(charge.retry.max_attempts, 5);
    assert_eq!(
        charge.retry.backoff,
        Backoff {
            base: 0.5,
            factor: 3.0,
            max: 120.0,
            jitter: 0.2
        }
    );
    assert_eq!(template.steps[1].timeout, Some(30.0));
    assert_eq!(template.steps[0].retry, RetryPolicy::default());
    assert_eq!(template.steps[0].config, json!({}));
    assert!(template.steps[3].skippable);
    assert_eq!(template.dag().levels(), Some(vec![0, 1, 1, 2]));
}

#[test]
fn the_normalized_form_reads_back_and_reparses_to_the_same_template() {
    let template = TaskTemplate::parse(DIAMOND).unwrap();
    let normalized = template.to_normalized();
    assert_eq!(
        TaskTemplate::from_normalized(normalized.clone()).unwrap(),
        template
    );
    let as_json = serde_json::to_string(&normalized).unwrap();
    assert_eq!(TaskTemplate::parse(&as_json).unwrap(), template);
}

#[test]
fn json_and_yaml_of_the_same_definition_are_equal() {
    let json = r#"{"namespace":"a","name":"b","version":"1.0.0",
                   "steps":[{"name":"x","handler":"noop"}]}"#;
    let yaml = "namespace: a\nname: b\nversion: 1.0.0\nsteps:\n  - {name: x, handler: noop}\n";
    assert_eq!(
        TaskTemplate::parse(json).unwrap(),
        TaskTemplate::parse(yaml).unwrap()
    );
}

#[test]
fn every_problem_is_reported_at_once_with_its_path() {
    let problems = problems_of(
        r#"
namespace: Bad Namespace
name: ok
version: one
steps:
  - name: a
    handler: noop
    depends_on: [missing, a]
  - name: a
    handler: "!bad"
  - name: c
    handler: noop
    retry: { max_attempts: 0, backoff: { factor: 0.5, jitter: 2 } }
    colour: blue
"#,
    );
    assert!(
        has(&problems, "namespace", "lowercase letter"),
        "{problems:?}"
    );
    assert!(has(&problems, "version", "not a semantic version"));
    assert!(has(
        &problems,
        "steps[0].depends_on[0]",
        "unknown step \"missing\""
    ));
    assert!(has(
        &problems,
        "steps[0].depends_on[1]",
        "depends on itself"
    ));
    assert!(has(
        &problems,
        "steps[1].name",
        "already the name of steps[0]"
    ));
    assert!(has(&problems, "steps[1].handler", "must start with"));
    assert!(has(
        &problems,
        "steps[2].retry.max_attempts",
        "from 1 to 100"
    ));
    assert!(has(
        &problems,
        "steps[2].retry.backoff.factor",
        "between 1 and 100"
    ));
    assert!(has(
        &problems,
        "steps[2].retry.backoff.jitter",
        "between 0 and 1"
    ));
    assert!(has(&problems, "steps[2].colour", "unknown field"));
    assert_eq!(problems.len(), 10, "{problems:#?}");
}

#[test]
fn cycles_are_named() {
    let problems = problems_of(
        r#"
namespace: n
name: t
version: 1.0.0
steps:
  - { name: a, handler: noop, depends_on: [c] }
  - { name: b, handler: noop, depends_on: [a] }
  - { name: c, handler: noop, depends_on: [b] }
  - { name: d, handler: noop, depends_on: [a] }
"#,
    );
    assert_eq!(
        problems,
        vec![Problem::new(
            "steps[0].depends_on",
            "dependency cycle: a -> b -> c -> a"
        )]
    );
}

#[test]
fn missing_fields_and_no_steps() {
    let problems = problems_of("description: nothing else\n");
    for path in ["namespace", "name", "version", "steps"] {
        assert!(has(&problems, path, "required"), "{path}: {problems:?}");
    }
    let problems = problems_of("namespace: a\nname: b\nversion: 1.0.0\nsteps: []\n");
    assert!(has(&problems, "steps", "at least one step"));
}

#[test]
fn retryable_false_means_exactly_one_attempt() {
    let base = "namespace: a\nname: b\nversion: 1.0.0\nsteps:\n  - name: x\n    handler: noop\n";
    let once = TaskTemplate::parse(&format!("{base}    retry: {{ retryable: false }}\n")).unwrap();
    assert_eq!(once.steps[0].retry.max_attempts, 1);
    assert!(!once.steps[0].retry.retryable);
    let problems = problems_of(&format!(
        "{base}    retry: {{ retryable: false, max_attempts: 4 }}\n"
    ));
    assert!(has(
        &problems,
        "steps[0].retry.max_attempts",
        "exactly one attempt"
    ));
}

#[test]
fn durations_and_timeouts_are_checked() {
    let base = "namespace: a\nname: b\nversion: 1.0.0\nsteps:\n  - name: x\n    handler: noop\n";
    let problems = problems_of(&format!(
        "{base}    timeout: soon\n    retry: {{ backoff: {{ base: 10, max: 5 }} }}\n"
    ));
    assert!(has(&problems, "steps[0].timeout", "duration"));
    assert!(has(
        &problems,
        "steps[0].retry.backoff.max",
        "below the base"
    ));
    let problems = problems_of(&format!("{base}    timeout: -3\n"));
    assert!(has(&problems, "steps[0].timeout", "between 0 and"));
    let problems = problems_of(&format!("{base}    timeout: 0\n"));
    assert!(has(&problems, "steps[0].timeout", "more than 0"));
}

#[test]
fn invalid_json_schemas_are_refused() {
    let base = "namespace: a\nname: b\nversion: 1.0.0\nsteps:\n  - {name: x, handler: noop}\n";
    let problems = problems_of(&format!("{base}context_schema: {{ type: 12 }}\n"));
    assert!(
        problems.iter().any(|p| p.path.starts_with("context_schema")
            && p.message.contains("not a valid JSON Schema")),
        "{problems:?}"
    );
    let problems = problems_of(&format!("{base}context_schema: [1, 2]\n"));
    assert!(has(&problems, "context_schema", "object or a boolean"));
    // A remote reference is never fetched: it is refused instead.
    let problems = problems_of(&format!(
        "{base}context_schema: {{ $ref: \"http://127.0.0.1:1/schema.json\" }}\n"
    ));
    assert!(
        has(&problems, "context_schema", "cannot be used"),
        "{problems:?}"
    );
    let problems = problems_of(&format!(
        "{base}context_schema: {{ $ref: \"file:///etc/passwd\" }}\n"
    ));
    assert!(
        has(&problems, "context_schema", "cannot be used"),
        "{problems:?}"
    );
}

#[test]
fn malformed_documents_and_size_limit() {
    let problems = problems_of("namespace: [unclosed\n");
    assert!(
        problems[0].message.starts_with("malformed YAML"),
        "{problems:?}"
    );
    let problems = problems_of("{\"namespace\": ");
    assert!(problems[0].message.starts_with("malformed JSON"));
    let problems = problems_of("   \n");
    assert!(problems[0].message.contains("empty"));
    let problems = problems_of("just a string");
    assert!(has(&problems, "", "expected an object"));
    let huge = format!("description: \"{}\"\n", "x".repeat(MAX_DEFINITION_BYTES));
    let problems = problems_of(&huge);
    assert!(problems[0].message.contains("limit is 1048576 bytes"));
}

#[test]
fn hostile_yaml_is_refused_without_exhausting_memory() {
    // The "billion laughs": each level multiplies the previous one by ten.
    let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        doc.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let problems = problems_of(&doc);
    assert!(
        problems[0].message.starts_with("malformed YAML"),
        "{problems:?}"
    );
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let problems = problems_of(&format!("namespace: {deep}\n"));
    assert!(problems[0].message.starts_with("malformed YAML"));
    let deep_json = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let problems = problems_of(&deep_json);
    assert!(problems[0].message.starts_with("malformed JSON"));
}

#[test]
fn arbitrary_input_never_panics() {
    // A small deterministic fuzz: mutate a valid definition byte by byte.
    let seed = DIAMOND.as_bytes();
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..2_000 {
        let mut bytes = seed.to_vec();
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state % bytes.len() as u64) as usize;
            bytes[at] = (state >> 32) as u8;
        }
        let text = String::from_utf8_lossy(&bytes);
        let _ = TaskTemplate::parse(&text);
    }
}

#[test]
fn context_is_validated_against_the_schema() {
    let check = TaskTemplate::parse(DIAMOND)
        .unwrap()
        .context_check()
        .unwrap()
        .expect("the template has a schema");
    assert!(check.validate(&json!({"order_id": 7})).is_ok());
    match check.validate(&json!({"order_id": "seven"})) {
        Err(Error::InvalidContext(problems)) => {
            assert_eq!(problems.len(), 1);
            assert_eq!(problems[0].path, "context/order_id");
        }
        other => panic!("expected InvalidContext, got {other:?}"),
    }
    match check.validate(&json!({})) {
        Err(Error::InvalidContext(problems)) => {
            assert!(problems[0].message.contains("order_id"), "{problems:?}")
        }
        other => panic!("expected InvalidContext, got {other:?}"),
    }
}

#[test]
fn backoff_grows_caps_and_jitters() {
    let backoff = Backoff {
        base: 1.0,
        factor: 2.0,
        max: 10.0,
        jitter: 0.1,
    };
    assert_eq!(backoff.delay_seconds(1, 0.5), 1.0);
    assert_eq!(backoff.delay_seconds(3, 0.5), 4.0);
    assert_eq!(backoff.delay_seconds(10, 0.5), 10.0);
    assert_eq!(backoff.delay_seconds(u32::MAX, 0.5), 10.0);
    assert!((backoff.delay_seconds(3, 0.0) - 3.6).abs() < 1e-9);
    assert!((backoff.delay_seconds(3, 1.0) - 4.4).abs() < 1e-9);
}

#[test]
fn names_follow_the_rules() {
    assert!(check_name("order_fulfillment-2").is_ok());
    assert!(check_name("").is_err());
    assert!(check_name("9lives").is_err());
    assert!(check_name("Upper").is_err());
    assert!(check_name("with space").is_err());
    assert!(check_name(&"a".repeat(65)).is_err());
    assert!(check_handler("Payments::Charge").is_ok());
    assert!(check_handler("billing/charge.v2").is_ok());
    assert!(check_handler("rm -rf").is_err());
}

#[test]
fn custom_events_are_declared_by_name_or_with_a_description() {
    let base = "namespace: a\nname: b\nversion: 1.0.0\nsteps:\n  - {name: x, handler: noop}\n";
    let template = TaskTemplate::parse(&format!(
        "{base}custom_events:\n  - payment_authorized\n  - {{ name: fraud_flagged, description: A score over 0.9 }}\n"
    ))
    .unwrap();
    assert_eq!(template.custom_events.len(), 2);
    assert_eq!(
        template.custom_events[1].description.as_deref(),
        Some("A score over 0.9")
    );
    let problems = problems_of(&format!("{base}custom_events: [ok, ok, Bad, 7]\n"));
    assert!(
        has(&problems, "custom_events[1].name", "declared twice"),
        "{problems:?}"
    );
    assert!(has(&problems, "custom_events[2].name", "lowercase"));
    assert!(has(&problems, "custom_events[3]", "expected a name"));
}

#[test]
fn priorities_are_one_to_four_on_the_template_and_its_steps() {
    let template = TaskTemplate::parse(
        "namespace: a\nname: b\nversion: 1.0.0\npriority: 3\nsteps:\n  - name: x\n    handler: noop\n  - name: y\n    handler: noop\n    priority: 1\n",
    )
    .unwrap();
    assert_eq!(template.priority, Priority::new(3).ok());
    assert_eq!(
        template.steps[0].priority, None,
        "the step follows its task"
    );
    assert_eq!(template.steps[1].priority, Priority::new(1).ok());
    let reread = TaskTemplate::from_normalized(template.to_normalized()).unwrap();
    assert_eq!(reread, template);
    // No priority written: none stored, so older definitions compare equal.
    let plain = TaskTemplate::parse(
        "namespace: a\nname: b\nversion: 1.0.0\nsteps:\n  - name: x\n    handler: noop\n",
    )
    .unwrap();
    assert!(plain.to_normalized().get("priority").is_none());

    let problems = problems_of(
        "namespace: a\nname: b\nversion: 1.0.0\npriority: 0\nsteps:\n  - name: x\n    handler: noop\n    priority: urgent\n  - name: y\n    handler: noop\n    priority: 2.5\n",
    );
    assert!(has(
        &problems,
        "priority",
        "from 1 (low) to 4 (urgent), found 0"
    ));
    assert!(has(&problems, "steps[0].priority", "found a string"));
    assert!(has(&problems, "steps[1].priority", "found 2.5"));
}

#[test]
fn concurrency_is_a_key_a_limit_and_a_strategy_checked_at_registration() {
    let base = "namespace: a\nname: b\nversion: 1.0.0\nsteps:\n  - name: x\n    handler: noop\n";
    let template = TaskTemplate::parse(&format!(
        "{base}concurrency: {{ key: \"{{{{ context.customer_id }}}}\", limit: 2, strategy: cancel_in_progress }}\n"
    ))
    .unwrap();
    let policy = template.concurrency.clone().unwrap();
    assert_eq!(policy.limit, 2);
    assert_eq!(
        policy.strategy,
        crate::concurrency::Strategy::CancelInProgress
    );
    assert_eq!(
        policy.key.as_ref().unwrap().as_str(),
        "{{ context.customer_id }}"
    );
    assert_eq!(
        TaskTemplate::from_normalized(template.to_normalized()).unwrap(),
        template
    );
    let everyone = TaskTemplate::parse(&format!("{base}concurrency: {{ limit: 1 }}\n")).unwrap();
    let policy = everyone.concurrency.unwrap();
    assert!(policy.key.is_none());
    assert_eq!(policy.strategy, crate::concurrency::Strategy::Queue);

    let problems = problems_of(&format!(
        "{base}concurrency: {{ key: customer, limit: 0, strategy: fifo, burst: 3 }}\n"
    ));
    assert!(has(&problems, "concurrency.key", "references nothing"));
    assert!(has(
        &problems,
        "concurrency.limit",
        "from 1 to 1000, found 0"
    ));
    assert!(has(
        &problems,
        "concurrency.strategy",
        "unknown strategy \"fifo\""
    ));
    assert!(has(&problems, "concurrency.burst", "unknown field"));
    let problems = problems_of(&format!(
        "{base}concurrency: {{ key: \"{{{{ context.x }}}}\" }}\n"
    ));
    assert!(has(&problems, "concurrency.limit", "is required"));

    // With declared properties, the key must read one of them.
    let problems = problems_of(&format!(
        "{base}context_schema: {{ type: object, properties: {{ order_id: {{ type: integer }} }} }}\nconcurrency: {{ key: \"{{{{ context.customer_id }}}}\", limit: 1 }}\n"
    ));
    assert!(has(
        &problems,
        "concurrency.key",
        "context_schema declares no property \"customer_id\" (it has: order_id)"
    ));
}

#[test]
fn a_task_timeout_and_a_step_start_timeout_are_durations() {
    let template = TaskTemplate::parse(
        "namespace: a\nname: b\nversion: 1.0.0\ntimeout: 1h\nsteps:\n  - name: x\n    handler: noop\n    start_timeout: 10m\n",
    )
    .unwrap();
    assert_eq!(template.timeout, Some(3600.0));
    assert_eq!(template.steps[0].start_timeout, Some(600.0));
    let problems = problems_of(
        "namespace: a\nname: b\nversion: 1.0.0\ntimeout: 0\nsteps:\n  - name: x\n    handler: noop\n    start_timeout: soon\n",
    );
    assert!(has(&problems, "timeout", "more than 0"));
    assert!(has(&problems, "steps[0].start_timeout", "duration"));
}

#[test]
fn a_rate_limit_is_a_name_a_limit_a_window_and_a_key_checked_at_registration() {
    let base = "namespace: a\nname: b\nversion: 1.0.0\ncontext_schema: { type: object, properties: { account: { type: string } } }\nsteps:\n  - name: x\n    handler: noop\n    rate_limit: ";
    let template = TaskTemplate::parse(&format!(
        "{base}{{ name: partner_api, limit: 100, per: 1m, key: \"{{{{ context.account }}}}\" }}\n"
    ))
    .unwrap();
    let limit = template.steps[0].rate_limit.clone().unwrap();
    assert_eq!(
        (limit.name.as_str(), limit.limit, limit.per),
        ("partner_api", 100, 60.0)
    );
    assert_eq!(limit.per_ms(), 60_000);
    assert_eq!(
        TaskTemplate::from_normalized(template.to_normalized()).unwrap(),
        template
    );
    for (rule, path, fragment) in [
        (
            "{ name: api, limit: 0, per: 60 }",
            "limit",
            "from 1 to 100000, found 0",
        ),
        ("{ name: api, per: 60 }", "limit", "is required"),
        ("{ name: api, limit: 5 }", "per", "is required"),
        ("{ name: api, limit: 5, per: 0 }", "per", "more than 0"),
        (
            "{ name: api, limit: 5, per: 25h }",
            "per",
            "longer than a day",
        ),
        (
            "{ name: api, limit: 5, per: 60, key: \"{{ context.nope }}\" }",
            "key",
            "declares no property",
        ),
        (
            "{ name: api, limit: 5, per: 60, key: fixed }",
            "key",
            "references nothing",
        ),
        ("{ limit: 5, per: 60 }", "name", "is required"),
        ("{ name: \"a b\", limit: 5, per: 60 }", "name", ""),
        (
            "{ name: api, limit: 5, per: 60, burst: 2 }",
            "burst",
            "unknown field",
        ),
        ("100", "", "expected an object"),
    ] {
        let problems = problems_of(&format!("{base}{rule}\n"));
        let path = if path.is_empty() {
            "steps[0].rate_limit".to_owned()
        } else {
            format!("steps[0].rate_limit.{path}")
        };
        assert!(has(&problems, &path, fragment), "{rule}: {problems:?}");
    }
}

#[test]
fn a_step_concurrency_limit_is_a_limit_with_an_optional_name_and_key() {
    let base = "namespace: a\nname: b\nversion: 1.0.0\ncontext_schema: { type: object, properties: { account: { type: string } } }\nsteps:\n  - name: x\n    handler: noop\n    concurrency: ";
    let template = TaskTemplate::parse(&format!(
        "{base}{{ name: stripe, limit: 5, key: \"{{{{ context.account }}}}\" }}\n"
    ))
    .unwrap();
    let limit = template.steps[0].concurrency.clone().unwrap();
    assert_eq!((limit.name.as_deref(), limit.limit), (Some("stripe"), 5));
    assert_eq!(
        TaskTemplate::from_normalized(template.to_normalized()).unwrap(),
        template
    );
    let own = TaskTemplate::parse(&format!("{base}{{ limit: 1 }}\n")).unwrap();
    assert!(own.steps[0].concurrency.as_ref().unwrap().name.is_none());
    for (rule, path, fragment) in [
        ("{ limit: 0 }", "limit", "from 1 to 1000, found 0"),
        ("{ name: stripe }", "limit", "is required"),
        (
            "{ limit: 2, key: \"{{ context.nope }}\" }",
            "key",
            "declares no property",
        ),
        ("{ limit: 2, key: fixed }", "key", "references nothing"),
        ("{ limit: 2, strategy: queue }", "strategy", "unknown field"),
    ] {
        let problems = problems_of(&format!("{base}{rule}\n"));
        let path = format!("steps[0].concurrency.{path}");
        assert!(has(&problems, &path, fragment), "{rule}: {problems:?}");
    }
}
