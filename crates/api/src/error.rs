//! Errors as clients see them: a message a person can act on and a stable `extensions.code`.
//! Internal details (SQL, causes) are logged here and never returned.

use async_graphql::{ErrorExtensions, ServerError, Value as GqlValue};
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tasker_domain::Problem;

/// Every error a resolver can answer with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    /// Bad input; `problems` lists each one with its path.
    #[error("{message}")]
    Validation {
        message: String,
        problems: Vec<Problem>,
    },
    #[error("{0}")]
    Conflict(String),
    /// A worker's lease token no longer holds its step; nothing was recorded.
    #[error("{0}")]
    LeaseLost(String),
    /// An event cursor older than what the log retains; `pruned_through` is the (opaque)
    /// cursor from which everything retained can be read.
    #[error(
        "this cursor is older than the retained event log: the retention policy deleted older events, so some after it may be gone; start again from eventHead, or resume from cursor {pruned_through} (extensions.prunedThrough) to read everything retained"
    )]
    CursorExpired { pruned_through: String },
    /// No valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the permission this needs.
    #[error("{0}")]
    Forbidden(String),
    /// A quota is used up (connections, subscriptions, claim rate).
    #[error("{0}")]
    RateLimited(String),
    /// The database cannot do its part now (a full disk, a lost connection): nothing was
    /// written; the same request may succeed later.
    #[error("{message}")]
    Unavailable {
        message: String,
        /// The fault's stable name (`disk_full`, `unreachable`, …).
        fault: &'static str,
        /// The connection was lost while committing: the change may have been saved.
        uncertain: bool,
    },
    #[error("internal error; the server log has the details")]
    Internal,
}

/// One broken rule of the input: a `VALIDATION_FAILED` naming where.
impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        ApiError::Validation {
            message: problem.to_string(),
            problems: vec![problem],
        }
    }
}

impl ApiError {
    /// The stable code clients switch on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "NOT_FOUND",
            ApiError::Validation { .. } => "VALIDATION_FAILED",
            ApiError::Conflict(_) => "CONFLICT",
            ApiError::LeaseLost(_) => "LEASE_LOST",
            ApiError::CursorExpired { .. } => "CURSOR_EXPIRED",
            ApiError::Unauthenticated(_) => "UNAUTHENTICATED",
            ApiError::Forbidden(_) => "FORBIDDEN",
            ApiError::RateLimited(_) => "RATE_LIMITED",
            ApiError::Unavailable { .. } => "UNAVAILABLE",
            ApiError::Internal => "INTERNAL",
        }
    }

    /// A validation error about one input field.
    pub fn invalid(path: &str, message: impl Into<String>) -> Self {
        Problem::new(path, message).into()
    }
}

impl ErrorExtensions for ApiError {
    fn extend(&self) -> async_graphql::Error {
        async_graphql::Error::new(self.to_string()).extend_with(|_, extensions| {
            extensions.set("code", self.code());
            if let ApiError::Unavailable {
                fault, uncertain, ..
            } = self
            {
                extensions.set("fault", *fault);
                extensions.set("retryable", true);
                // Whether the change may have been saved: retry with the same idempotency
                // key (or look first) when it may.
                extensions.set("outcome", if *uncertain { "unknown" } else { "not_saved" });
            }
            if let ApiError::CursorExpired { pruned_through } = self {
                extensions.set("prunedThrough", pruned_through.as_str());
            }
            if let ApiError::Validation { problems, .. } = self {
                let list = problems
                    .iter()
                    .map(|problem| {
                        let mut entry = async_graphql::indexmap::IndexMap::new();
                        entry.insert(
                            async_graphql::Name::new("path"),
                            GqlValue::from(problem.path.as_str()),
                        );
                        entry.insert(
                            async_graphql::Name::new("message"),
                            GqlValue::from(problem.message.as_str()),
                        );
                        GqlValue::Object(entry)
                    })
                    .collect::<Vec<_>>();
                extensions.set("problems", GqlValue::List(list));
            }
        })
    }
}

impl From<tasker_store::Error> for ApiError {
    fn from(err: tasker_store::Error) -> Self {
        use tasker_domain::Error as Domain;
        use tasker_store::Error as Store;
        match err {
            Store::NotFound { .. } => ApiError::NotFound(err.to_string()),
            Store::Conflict(message) => ApiError::Conflict(message),
            Store::LeaseLost => ApiError::LeaseLost(err.to_string()),
            Store::CursorExpired { pruned_through, .. } => ApiError::CursorExpired {
                pruned_through: crate::ids::event_cursor(tasker_store::EventCursor(pruned_through)),
            },
            Store::Domain(domain) => match domain {
                Domain::InvalidTemplate(ref problems)
                | Domain::InvalidContext(ref problems)
                | Domain::InvalidRequest(ref problems) => ApiError::Validation {
                    message: domain.to_string(),
                    problems: problems.clone(),
                },
                Domain::InvalidTransition { .. } => ApiError::Conflict(domain.to_string()),
                Domain::UnknownState { .. } => {
                    tracing::error!(error = %domain, "stored data is unreadable");
                    ApiError::Internal
                }
            },
            Store::Unavailable {
                fault,
                uncertain,
                ref cause,
            } => {
                tracing::debug!(error = %cause, "refused for a database fault");
                let message = if uncertain {
                    format!(
                        "the connection to the database was lost while committing: the change may or may not have been saved; {}",
                        "retry with the same idempotency key, or read it back first"
                    )
                } else {
                    err.to_string()
                };
                ApiError::Unavailable {
                    message,
                    fault: fault.name(),
                    uncertain,
                }
            }
            Store::Database(source) => {
                tracing::error!(error = %source, "database operation failed");
                ApiError::Internal
            }
        }
    }
}

impl From<tasker_engine::Error> for ApiError {
    fn from(err: tasker_engine::Error) -> Self {
        match err {
            tasker_engine::Error::Store(err) => err.into(),
            other => {
                tracing::error!(error = %other, "engine operation failed");
                ApiError::Internal
            }
        }
    }
}

/// Turns any store or API result into a GraphQL result carrying its code. Resolvers use
/// `.gql()?` so that no error reaches a client without one.
pub trait GqlResultExt<T> {
    fn gql(self) -> async_graphql::Result<T>;
}

impl<T, E: Into<ApiError>> GqlResultExt<T> for Result<T, E> {
    fn gql(self) -> async_graphql::Result<T> {
        self.map_err(|err| err.into().extend())
    }
}

/// The error's `extensions.code`, when it has one.
pub(crate) fn code_of(error: &ServerError) -> Option<&str> {
    match error.extensions.as_ref()?.get("code")? {
        GqlValue::String(code) => Some(code),
        _ => None,
    }
}

/// Sets the error's code unless it has one.
pub(crate) fn with_code(mut error: ServerError, code: &str) -> ServerError {
    let has_code = error
        .extensions
        .as_ref()
        .is_some_and(|extensions| extensions.get("code").is_some());
    if !has_code {
        error
            .extensions
            .get_or_insert_with(Default::default)
            .set("code", code);
    }
    error
}

/// A JSON body shaped like a GraphQL response, for requests that never reached GraphQL.
pub(crate) fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "errors": [{ "message": message, "extensions": { "code": code } }] });
    (status, Json(body)).into_response()
}
