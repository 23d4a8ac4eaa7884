//! Limits on the shape of an operation, checked before it runs: how deep, how complex, how
//! many aliases and root fields. Deep, wide and alias-bomb queries are refused with
//! `QUERY_LIMIT_EXCEEDED` instead of costing the server.

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{Name, Pos, ServerError, ServerResult, Variables};
use std::collections::HashSet;
use std::sync::Arc;

/// The code of every refusal here (and of async-graphql's depth and complexity limits).
pub const LIMIT_CODE: &str = "QUERY_LIMIT_EXCEEDED";

/// Limits on operations; each has a safe default.
#[derive(Debug, Clone)]
pub struct QueryLimits {
    /// Deepest nesting of selections.
    pub max_depth: usize,
    /// Largest complexity (each field selected costs 1, counted after fragments expand).
    pub max_complexity: usize,
    /// Most aliased fields in one document.
    pub max_aliases: usize,
    /// Most fields at the root of one operation.
    pub max_root_fields: usize,
    /// Whether `__schema` and `__type` may be queried.
    pub introspection: bool,
    /// Largest page of tasks.
    pub max_tasks_page: usize,
    /// Largest page of events.
    pub max_events_page: usize,
    /// Most tasks one `createTasks` may start.
    pub max_tasks_per_batch: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_depth: 16,
            max_complexity: 2000,
            max_aliases: 30,
            max_root_fields: 10,
            introspection: true,
            max_tasks_page: 100,
            max_events_page: 500,
            max_tasks_per_batch: 1000,
        }
    }
}

/// The most entries one list of a filter may hold (task and event filters, worker inputs):
/// each entry costs a comparison per row, so an unbounded list is a cheap way to slow a query.
pub(crate) const MAX_FILTER_ENTRIES: usize = 100;

/// `VALIDATION_FAILED` when a filter list at `path` holds more than [`MAX_FILTER_ENTRIES`].
pub(crate) fn filter_list<T>(path: &str, list: Option<&Vec<T>>) -> Result<(), crate::ApiError> {
    match list {
        Some(list) if list.len() > MAX_FILTER_ENTRIES => Err(crate::ApiError::invalid(
            path,
            format!("at most {MAX_FILTER_ENTRIES} entries, got {}", list.len()),
        )),
        _ => Ok(()),
    }
}

/// `first` checked against the configured largest page (`VALIDATION_FAILED` otherwise).
pub(crate) fn page_size(
    ctx: &async_graphql::Context<'_>,
    first: i32,
    largest: fn(&QueryLimits) -> usize,
) -> async_graphql::Result<u64> {
    use crate::error::GqlResultExt;
    let max = configured(ctx, largest);
    match u64::try_from(first) {
        Ok(first) if first <= max as u64 => Ok(first),
        _ => Err(crate::error::ApiError::invalid(
            "first",
            format!("must be between 0 and {max}, got {first}"),
        ))
        .gql(),
    }
}

/// One of the server's limits (its default when the schema was built without them).
pub(crate) fn configured(
    ctx: &async_graphql::Context<'_>,
    limit: fn(&QueryLimits) -> usize,
) -> usize {
    ctx.data_opt::<QueryLimits>()
        .map_or_else(|| limit(&QueryLimits::default()), limit)
}

pub(crate) struct QueryShape(pub QueryLimits);

impl ExtensionFactory for QueryShape {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(QueryShapeExtension(self.0.clone()))
    }
}

struct QueryShapeExtension(QueryLimits);

fn refusal(message: String) -> ServerError {
    crate::error::with_code(ServerError::new(message, Some(Pos::default())), LIMIT_CODE)
}

#[async_graphql::async_trait::async_trait]
impl Extension for QueryShapeExtension {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        let aliases = alias_count(&document);
        if aliases > self.0.max_aliases {
            return Err(refusal(format!(
                "the query has {aliases} aliases; the limit is {}",
                self.0.max_aliases
            )));
        }
        for (_, operation) in document.operations.iter() {
            let mut seen = HashSet::new();
            let roots = root_fields(&document, &operation.node.selection_set.node, &mut seen);
            if roots > self.0.max_root_fields {
                return Err(refusal(format!(
                    "the operation selects {roots} root fields; the limit is {}: split it",
                    self.0.max_root_fields
                )));
            }
        }
        Ok(document)
    }
}

/// Aliased fields written in the document (operations and fragments, each once).
fn alias_count(document: &ExecutableDocument) -> usize {
    fn count(set: &SelectionSet) -> usize {
        set.items
            .iter()
            .map(|item| match &item.node {
                Selection::Field(field) => {
                    usize::from(field.node.alias.is_some()) + count(&field.node.selection_set.node)
                }
                Selection::InlineFragment(fragment) => count(&fragment.node.selection_set.node),
                Selection::FragmentSpread(_) => 0,
            })
            .sum()
    }
    document
        .operations
        .iter()
        .map(|(_, operation)| count(&operation.node.selection_set.node))
        .chain(
            document
                .fragments
                .values()
                .map(|fragment| count(&fragment.node.selection_set.node)),
        )
        .sum()
}

/// Fields at the root of a selection set, through fragments (each fragment once).
fn root_fields<'a>(
    document: &'a ExecutableDocument,
    set: &'a SelectionSet,
    seen: &mut HashSet<&'a Name>,
) -> usize {
    set.items
        .iter()
        .map(|item| match &item.node {
            Selection::Field(_) => 1,
            Selection::InlineFragment(fragment) => {
                root_fields(document, &fragment.node.selection_set.node, seen)
            }
            Selection::FragmentSpread(spread) => {
                let name = &spread.node.fragment_name.node;
                match document.fragments.get(name) {
                    Some(fragment) if seen.insert(name) => {
                        root_fields(document, &fragment.node.selection_set.node, seen)
                    }
                    _ => 0,
                }
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasker_store::testing::TestDatabase;

    async fn run(limits: QueryLimits, query: &str) -> async_graphql::Response {
        let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
        let schema = crate::schema::build_schema(
            crate::access::Services::new(tasker_engine::Engine::new(db.store.clone())),
            &limits,
            crate::quota::Quotas::new(Default::default()),
        );
        schema
            .execute(
                async_graphql::Request::new(query).data(crate::auth::Principal::unrestricted()),
            )
            .await
    }

    #[tokio::test]
    async fn introspection_can_be_turned_off() {
        let query = "{ __schema { queryType { name } } }";
        let open = run(QueryLimits::default(), query).await;
        assert!(open.errors.is_empty(), "{:?}", open.errors);
        let closed = run(
            QueryLimits {
                introspection: false,
                ..QueryLimits::default()
            },
            query,
        )
        .await;
        let data = closed.data.into_json().unwrap();
        assert!(
            !closed.errors.is_empty() || data["__schema"].is_null(),
            "introspection answered: {data}"
        );
    }

    #[tokio::test]
    async fn fragments_count_once_for_aliases_and_through_for_root_fields() {
        let limits = QueryLimits {
            max_aliases: 2,
            max_root_fields: 2,
            ..QueryLimits::default()
        };
        let fine =
            "query { ...Q } fragment Q on Query { a: tasks { totalCount } b: namespaces { name } }";
        assert!(run(limits.clone(), fine).await.errors.is_empty());
        let three = "query { ...Q templates { key } } fragment Q on Query { tasks { totalCount } namespaces { name } }";
        let refused = run(limits, three).await;
        assert_eq!(refused.errors.len(), 1);
        assert!(refused.errors[0].message.contains("3 root fields"));
    }
}
