//! The GraphiQL playground, embedded in the binary with its assets so it works offline, and
//! preloaded with the example operations of `playground/operations/`.

use serde_json::{Value, json};

/// The example operations, one playground tab each, with their example variables.
const OPERATIONS: &[(&str, Option<&str>)] = &[
    (
        include_str!("../../../playground/operations/01-explore-templates.graphql"),
        None,
    ),
    (
        include_str!("../../../playground/operations/02-register-template.graphql"),
        Some(include_str!(
            "../../../playground/operations/02-register-template.json"
        )),
    ),
    (
        include_str!("../../../playground/operations/03-create-task.graphql"),
        Some(include_str!(
            "../../../playground/operations/03-create-task.json"
        )),
    ),
    (
        include_str!("../../../playground/operations/04-list-tasks.graphql"),
        None,
    ),
    (
        include_str!("../../../playground/operations/05-task-graph.graphql"),
        Some("{ \"id\": \"paste a task id here\" }"),
    ),
    (
        include_str!("../../../playground/operations/06-cancel-task.graphql"),
        Some("{ \"id\": \"paste a task id here\" }"),
    ),
    (
        include_str!("../../../playground/operations/07-heartbeat.graphql"),
        None,
    ),
    (
        include_str!("../../../playground/operations/08-follow-events.graphql"),
        None,
    ),
    (
        include_str!("../../../playground/operations/09-follow-a-task.graphql"),
        Some("{ \"id\": \"paste a task id here\" }"),
    ),
    (
        include_str!("../../../playground/operations/10-follow-the-task-list.graphql"),
        None,
    ),
    (
        include_str!("../../../playground/operations/11-rerun-from-a-step.graphql"),
        Some("{ \"id\": \"paste a step id here\" }"),
    ),
];

const PAGE: &str = include_str!("../../../playground/index.html");
const TABS_MARKER: &str = "/*TASKER_OPERATIONS*/[]";

/// The playground page with the example operations filled in.
pub fn page() -> String {
    let tabs: Vec<Value> = OPERATIONS
        .iter()
        .map(|(query, variables)| json!({ "query": query, "variables": variables }))
        .collect();
    // `</` must not appear inside a <script>; JSON allows escaping the slash.
    let tabs = Value::Array(tabs).to_string().replace("</", "<\\/");
    PAGE.replace(TABS_MARKER, &tabs)
}

/// A vendored browser asset by file name, with its content type.
pub fn asset(file: &str) -> Option<(&'static str, &'static [u8])> {
    const JS: &str = "text/javascript; charset=utf-8";
    const CSS: &str = "text/css; charset=utf-8";
    Some(match file {
        "graphiql.min.js" => (
            JS,
            include_bytes!("../../../playground/vendor/graphiql.min.js"),
        ),
        "graphiql.min.css" => (
            CSS,
            include_bytes!("../../../playground/vendor/graphiql.min.css"),
        ),
        "react.production.min.js" => (
            JS,
            include_bytes!("../../../playground/vendor/react.production.min.js"),
        ),
        "react-dom.production.min.js" => (
            JS,
            include_bytes!("../../../playground/vendor/react-dom.production.min.js"),
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_every_operation_and_references_only_local_assets() {
        let page = page();
        assert!(!page.contains(TABS_MARKER));
        for name in [
            "ExploreTemplates",
            "RegisterTemplate",
            "CreateTask",
            "ListTasks",
            "Heartbeat",
        ] {
            assert!(page.contains(name), "{name} is missing from the playground");
        }
        assert!(
            !page.contains("https://"),
            "the playground must work offline"
        );
        for src in [
            "graphiql.min.js",
            "graphiql.min.css",
            "react.production.min.js",
            "react-dom.production.min.js",
        ] {
            assert!(page.contains(&format!("/playground/vendor/{src}")));
            assert!(asset(src).is_some());
        }
        assert!(asset("../Cargo.toml").is_none());
    }
}
