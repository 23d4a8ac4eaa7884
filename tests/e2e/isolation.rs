//! Tenant isolation generated from the schema: every root query, mutation and subscription
//! field found by introspection is called with a token scoped to the empty namespace `shop`,
//! with arguments pointing at the namespace `billing` (its ids, its name, its template). The
//! answers must reveal nothing of `billing`, and `billing` must be unchanged afterwards. A
//! field added later is covered without anyone remembering to add it here.

use crate::support::{DIAMOND, TestServer};
use crate::websocket::{connect_to, send};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use tasker_api::auth::{AuthSettings, KeySource};
use tasker_store::testing::TestDatabase;

const SECRET: &str = "isolation-test-secret-of-at-least-32-bytes";

fn token(namespaces: &[&str]) -> String {
    let claims = json!({
        "sub": "isolation", "exp": chrono::Utc::now().timestamp() + 600,
        "permissions": ["*"], "namespaces": namespaces,
    });
    let signed = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    format!("Bearer {signed}")
}

async fn graphql(server: &TestServer, auth: &str, query: &str, variables: Value) -> Value {
    crate::support::http_client()
        .post(server.url("/graphql"))
        .header("authorization", auth)
        .json(&json!({ "query": query, "variables": variables }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

const INTROSPECTION: &str = r#"{ __schema {
  queryType { name } mutationType { name } subscriptionType { name }
  types { name kind
    fields { name args { name type { ...T } } type { ...T } }
    inputFields { name type { ...T } }
    enumValues { name } } } }
fragment T on __Type { kind name ofType { kind name ofType { kind name ofType { kind name } } } }"#;

/// The schema's types by name.
struct Types(HashMap<String, Value>);

impl Types {
    fn get(&self, name: &str) -> &Value {
        &self.0[name]
    }
}

/// The type as written in a variable definition (`[String!]!`).
fn type_string(t: &Value) -> String {
    match t["kind"].as_str().unwrap() {
        "NON_NULL" => format!("{}!", type_string(&t["ofType"])),
        "LIST" => format!("[{}]", type_string(&t["ofType"])),
        _ => t["name"].as_str().unwrap().to_owned(),
    }
}

/// The named type under NON_NULL and LIST wrappers.
fn named(t: &Value) -> &Value {
    if t["name"].is_null() {
        named(&t["ofType"])
    } else {
        t
    }
}

fn is_list(t: &Value) -> bool {
    match t["kind"].as_str().unwrap() {
        "NON_NULL" => is_list(&t["ofType"]),
        kind => kind == "LIST",
    }
}

/// What an argument or input field gets: `billing`'s things by name, a plain value of its
/// type when it is required, nothing when it is optional and unknown.
struct Foreign {
    task_id: String,
    step_id: String,
    definition: String,
    lease: String,
    first_cursor: Value,
}

impl Foreign {
    fn value(&self, name: &str, t: &Value, types: &Types, field: &str) -> Option<Value> {
        let required = t["kind"] == "NON_NULL";
        let id = if field.to_lowercase().contains("step") {
            &self.step_id
        } else {
            &self.task_id
        };
        let known = match name {
            "id" | "taskId" => Some(json!(id)),
            "namespace" => Some(json!("billing")),
            "namespaces" => Some(json!(["billing"])),
            "template" | "name" => Some(json!("fulfil")),
            "definition" => Some(json!(self.definition)),
            "leaseToken" => Some(json!(self.lease)),
            "leaseTokens" => Some(json!([self.lease])),
            "after" => Some(self.first_cursor.clone()),
            "context" => Some(json!({ "order_id": 1 })),
            _ => None,
        };
        let value = known.or_else(|| required.then(|| self.plain(t, types, field)))?;
        Some(if is_list(t) && !value.is_array() {
            json!([value])
        } else {
            value
        })
    }

    /// A valid value of a type: input objects get their fields filled the same way.
    fn plain(&self, t: &Value, types: &Types, field: &str) -> Value {
        let base = named(t);
        let name = base["name"].as_str().unwrap();
        match base["kind"].as_str().unwrap() {
            "INPUT_OBJECT" => {
                let mut object = Map::new();
                for input in types.get(name)["inputFields"].as_array().unwrap() {
                    let key = input["name"].as_str().unwrap();
                    if let Some(value) = self.value(key, &input["type"], types, field) {
                        object.insert(key.to_owned(), value);
                    }
                }
                Value::Object(object)
            }
            "ENUM" => types.get(name)["enumValues"][0]["name"].clone(),
            _ => match name {
                "Int" => json!(1),
                "Float" => json!(1.0),
                "Boolean" => json!(false),
                "ID" => json!(self.task_id),
                "JSON" => json!({}),
                "DateTime" => json!("2026-01-01T00:00:00Z"),
                _ => json!("x"),
            },
        }
    }
}

/// Every scalar field of a type (and of the objects it holds, `depth` levels down) that needs
/// no argument.
fn selection(types: &Types, t: &Value, depth: usize) -> String {
    let base = named(t);
    let name = base["name"].as_str().unwrap();
    if base["kind"] != "OBJECT" {
        return String::new();
    }
    let mut fields = vec!["__typename".to_owned()];
    for field in types.get(name)["fields"].as_array().unwrap() {
        let needs_args = field["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|arg| arg["type"]["kind"] == "NON_NULL");
        if needs_args {
            continue;
        }
        let field_name = field["name"].as_str().unwrap();
        if named(&field["type"])["kind"] == "OBJECT" {
            if depth > 0 {
                fields.push(format!(
                    "{field_name} {}",
                    selection(types, &field["type"], depth - 1)
                ));
            }
        } else {
            fields.push(field_name.to_owned());
        }
    }
    format!("{{ {} }}", fields.join(" "))
}

/// An operation calling one root field with `billing`'s arguments.
fn operation(
    kind: &str,
    field: &Value,
    types: &Types,
    foreign: &Foreign,
    all_args: bool,
) -> (String, Value) {
    let name = field["name"].as_str().unwrap();
    let mut definitions = Vec::new();
    let mut arguments = Vec::new();
    let mut variables = Map::new();
    for arg in field["args"].as_array().unwrap() {
        let arg_name = arg["name"].as_str().unwrap();
        let value = if all_args || arg["type"]["kind"] == "NON_NULL" || arg_name == "after" {
            foreign.value(arg_name, &arg["type"], types, name)
        } else {
            None
        };
        if let Some(value) = value {
            definitions.push(format!("${arg_name}: {}", type_string(&arg["type"])));
            arguments.push(format!("{arg_name}: ${arg_name}"));
            variables.insert(arg_name.to_owned(), value);
        }
    }
    let wrap = |list: &[String]| {
        if list.is_empty() {
            String::new()
        } else {
            format!("({})", list.join(", "))
        }
    };
    let query = format!(
        "{kind}{} {{ {name}{} {} }}",
        wrap(&definitions),
        wrap(&arguments),
        selection(types, &field["type"], 2)
    );
    (query, Value::Object(variables))
}

/// Whether a value shows anything: only nulls, empty lists, zeros, booleans and the strings
/// the caller itself sent are "nothing".
fn reveals(value: &Value, sent: &Value) -> bool {
    let sent_text = sent.to_string();
    match value {
        Value::Null | Value::Bool(_) => false,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !sent_text.contains(s.as_str()) && !s.is_empty(),
        Value::Array(items) => items.iter().any(|item| reveals(item, sent)),
        Value::Object(fields) => fields
            .iter()
            .any(|(key, value)| key != "__typename" && reveals(value, sent)),
    }
}

fn markers(value: &Value, marks: &[&str]) -> Vec<String> {
    let text = value.to_string();
    marks
        .iter()
        .filter(|mark| text.contains(**mark))
        .map(|mark| (*mark).to_owned())
        .collect()
}

#[tokio::test]
async fn a_token_for_one_namespace_reaches_nothing_of_another_through_any_root_field() {
    for db in TestDatabase::all(Arc::new(tasker_domain::SystemClock)).await {
        isolation_on(db).await;
    }
}

async fn isolation_on(db: TestDatabase) {
    let settings = AuthSettings {
        key: KeySource::Secret(SECRET.as_bytes().to_vec()),
        issuer: None,
        audience: None,
        leeway_seconds: 5,
        roles: HashMap::new(),
    };
    let server = TestServer::start_secured(db, settings).await;
    let admin = token(&["*"]);
    let scoped = token(&["shop"]);

    // billing: a template with a custom event, three tasks; shop: nothing yet.
    let billing = DIAMOND.replace("namespace: shop", "namespace: billing")
        + "custom_events: [billing_secret]\n";
    let register = "mutation($d: String!) { registerTemplate(input: {definition: $d}) { result } }";
    let body = graphql(&server, &admin, register, json!({ "d": billing })).await;
    assert_eq!(
        body["data"]["registerTemplate"]["result"], "CREATED",
        "{body}"
    );
    let mut task_ids = Vec::new();
    let mut step_ids = Vec::new();
    for _ in 0..3 {
        let body = graphql(&server, &admin, "mutation { createTask(input: {namespace: \"billing\", template: \"fulfil\", context: {order_id: 1}}) { task { id steps { id } } } }", json!({})).await;
        let task = &body["data"]["createTask"]["task"];
        task_ids.push(task["id"].as_str().unwrap().to_owned());
        step_ids.extend(
            task["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned()),
        );
    }
    let first_cursor = graphql(
        &server,
        &admin,
        "{ events(first: 1) { edges { cursor } } }",
        json!({}),
    )
    .await["data"]["events"]["edges"][0]["cursor"]
        .clone();
    let before = graphql(
        &server,
        &admin,
        "{ tasks { totalCount nodes { state steps { state attempts } } } templates { key } }",
        json!({}),
    )
    .await;
    let foreign = Foreign {
        task_id: task_ids[0].clone(),
        step_id: step_ids[0].clone(),
        definition: billing.clone(),
        lease: "01900000-0000-7000-8000-0000000000aa".to_owned(),
        first_cursor,
    };
    let mut marks: Vec<&str> = vec!["billing", "billing_secret"];
    marks.extend(task_ids.iter().map(String::as_str));
    marks.extend(step_ids.iter().map(String::as_str));

    let schema =
        graphql(&server, &admin, INTROSPECTION, json!({})).await["data"]["__schema"].clone();
    let types = Types(
        schema["types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].as_str().unwrap().to_owned(), t.clone()))
            .collect(),
    );
    // Root fields whose answers hold no tenant data (the same for everyone, the caller's own
    // token, or a position in the log like the cursors every event carries): checked for
    // markers only.
    let shared = ["eventCatalog", "heartbeat", "viewer", "eventHead"];
    let mut checked = 0;
    let mut revealing_with_admin = 0;
    for (kind, root) in [
        ("query", &schema["queryType"]),
        ("mutation", &schema["mutationType"]),
    ] {
        let fields = types.get(root["name"].as_str().unwrap())["fields"]
            .as_array()
            .unwrap()
            .clone();
        for field in &fields {
            let name = field["name"].as_str().unwrap();
            for all_args in [false, true] {
                let (query, variables) = operation(kind, field, &types, &foreign, all_args);
                let body = graphql(&server, &scoped, &query, variables.clone()).await;
                let code = &body["errors"][0]["extensions"]["code"];
                assert!(
                    ![
                        "GRAPHQL_VALIDATION_FAILED",
                        "GRAPHQL_PARSE_FAILED",
                        "QUERY_LIMIT_EXCEEDED"
                    ]
                    .contains(&code.as_str().unwrap_or_default()),
                    "the generated operation for {name} is not valid: {body}\n{query}"
                );
                // The same operation with an unscoped token does reach billing: the check
                // below can fail.
                if kind == "query" && !all_args {
                    let open = graphql(&server, &admin, &query, variables.clone()).await;
                    if !markers(&open["data"], &marks).is_empty() {
                        revealing_with_admin += 1;
                    }
                }
                let data = &body["data"];
                let leaked = markers(data, &marks);
                assert!(
                    leaked.is_empty(),
                    "{name} revealed {leaked:?}: {body}\n{query}"
                );
                if !shared.contains(&name) {
                    assert!(
                        !reveals(&data[name], &variables),
                        "{name} revealed data: {body}\n{query}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 2 * 20, "only {checked} operations ran");
    assert!(
        revealing_with_admin >= 4,
        "an unscoped token should see billing through tasks, task, step, templates, events…"
    );
    let after = graphql(
        &server,
        &admin,
        "{ tasks { totalCount nodes { state steps { state attempts } } } templates { key } }",
        json!({}),
    )
    .await;
    assert_eq!(before, after, "billing changed through a shop token");

    // Subscriptions: open each with the scoped token, then billing changes, then a shop
    // sentinel. The first thing each stream delivers must be about shop (or an error).
    let subscription_fields =
        types.get(schema["subscriptionType"]["name"].as_str().unwrap())["fields"]
            .as_array()
            .unwrap()
            .clone();
    let mut sockets = Vec::new();
    for field in &subscription_fields {
        let name = field["name"].as_str().unwrap().to_owned();
        if name == "heartbeat" {
            continue;
        }
        let (query, variables) = operation("subscription", field, &types, &foreign, false);
        let mut socket = connect_to(server.address, "graphql-transport-ws").await;
        send(
            &mut socket,
            json!({ "type": "connection_init", "payload": { "authorization": scoped } }),
        )
        .await;
        assert_eq!(
            crate::websocket::receive(&mut socket).await["type"],
            "connection_ack"
        );
        send(&mut socket, json!({ "type": "subscribe", "id": "s", "payload": { "query": query, "variables": variables } })).await;
        sockets.push((name, socket, variables));
    }
    assert!(
        sockets.len() >= 4,
        "events, taskUpdated, tasksUpdated, stepsAvailable at least"
    );
    for _ in 0..2 {
        graphql(&server, &admin, "mutation { createTask(input: {namespace: \"billing\", template: \"fulfil\", context: {order_id: 2}}) { created } }", json!({})).await;
    }
    let body = graphql(&server, &admin, register, json!({ "d": DIAMOND })).await;
    assert_eq!(body["data"]["registerTemplate"]["result"], "CREATED");
    graphql(&server, &admin, "mutation { createTask(input: {namespace: \"shop\", template: \"fulfil\", context: {order_id: 3}}) { created } }", json!({})).await;
    for (name, socket, _) in &mut sockets {
        let message = crate::websocket::receive(socket).await;
        // Error messages may echo the caller's own arguments; data may show nothing.
        let leaked = markers(&message["payload"]["data"], &marks);
        assert!(
            leaked.is_empty(),
            "subscription {name} revealed {leaked:?}: {message}"
        );
        if message["type"] == "next" && message["payload"]["errors"].is_null() {
            let data = &message["payload"]["data"][name.as_str()];
            match name.as_str() {
                "stepsAvailable" => assert_eq!(
                    data["readySteps"], 1,
                    "only shop's ready step counts: {message}"
                ),
                "tasksUpdated" => assert_eq!(data["task"]["namespace"], "shop", "{message}"),
                _ => assert_eq!(data["namespace"], "shop", "{message}"),
            }
        }
    }
}
