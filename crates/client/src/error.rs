//! What can go wrong talking to a server, each kind as a variant a caller can act on.

use serde::Deserialize;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure of the client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server address cannot be used.
    #[error("invalid server address {server:?}: {reason}")]
    InvalidServer { server: String, reason: String },
    /// No connection: refused, unknown host, reset, or lost and not regained.
    #[error("cannot reach the server at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    /// No answer in time.
    #[error("the server did not answer within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// An answer that is not GraphQL (a proxy's error page, for instance).
    #[error("the server answered HTTP {status}: {message}")]
    Http { status: u16, message: String },
    /// The server refused the operation; `code` is its stable `extensions.code`.
    #[error("{message}")]
    Graphql {
        /// `VALIDATION_FAILED`, `NOT_FOUND`, `CONFLICT`, `LEASE_LOST`, `UNAUTHENTICATED`,
        /// `FORBIDDEN`, `RATE_LIMITED`, `UNAVAILABLE`, `INTERNAL`, …
        code: String,
        message: String,
        /// Each broken rule of a `VALIDATION_FAILED`, with its path.
        problems: Vec<Problem>,
        /// The server says the same request may succeed later.
        retryable: bool,
    },
    /// The server closed a subscription's connection for a reason that a retry will not
    /// change (credentials refused, too many connections).
    #[error("the server closed the subscription: {0}")]
    Refused(String),
    /// The answer did not have the shape this client expects (a server of another version).
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

/// One broken rule, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl Error {
    /// The server's `extensions.code`, when the server reported the error.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Graphql { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether trying again later may succeed: the connection, a timeout, or a server that
    /// says so. A refusal (validation, permission, conflict) will not change by retrying.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout(_) => true,
            Error::Http { status, .. } => *status >= 500 || *status == 429,
            Error::Graphql {
                code, retryable, ..
            } => *retryable || code == "RATE_LIMITED" || code == "UNAVAILABLE",
            Error::InvalidServer { .. } | Error::Refused(_) | Error::Protocol(_) => false,
        }
    }

    pub(crate) fn from_graphql(error: GraphqlError) -> Error {
        let extensions = error.extensions.unwrap_or_default();
        Error::Graphql {
            code: extensions.code.unwrap_or_else(|| "UNKNOWN".into()),
            message: error.message,
            problems: extensions.problems,
            retryable: extensions.retryable,
        }
    }
}

/// One entry of a GraphQL answer's `errors`.
#[derive(Debug, Deserialize)]
pub(crate) struct GraphqlError {
    message: String,
    extensions: Option<Extensions>,
}

#[derive(Debug, Default, Deserialize)]
struct Extensions {
    code: Option<String>,
    #[serde(default)]
    problems: Vec<Problem>,
    #[serde(default)]
    retryable: bool,
}
