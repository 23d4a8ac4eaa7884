//! The only way a resolver reaches data: [`grant`] checks the caller's permission and hands
//! back a [`Granted`] view that carries the caller's namespace scope. Records outside the
//! scope are answered exactly like missing ones, so a caller cannot learn that they exist.

use crate::auth::Principal;
use crate::error::{ApiError, GqlResultExt};
use async_graphql::{Context, Result};
use std::sync::Arc;
use tasker_domain::{NamespaceScope, Permission};
use tasker_engine::Engine;
use tasker_store::{StepRecord, Store, TaskRecord};
use uuid::Uuid;

/// What a caller was granted for one resolver.
pub(crate) struct Granted<'a> {
    pub store: &'a Store,
    pub engine: &'a Arc<Engine>,
    pub scope: &'a NamespaceScope,
}

/// The caller of this operation (set by the HTTP handler or the WebSocket's init).
pub(crate) fn principal<'a>(ctx: &'a Context<'_>) -> Result<&'a Principal> {
    ctx.data_opt::<Principal>()
        .ok_or_else(|| ApiError::Unauthenticated("authentication required".to_owned()))
        .gql()
}

/// Checks that the caller holds `permission`.
pub(crate) fn grant<'a>(ctx: &'a Context<'_>, permission: Permission) -> Result<Granted<'a>> {
    let principal = principal(ctx)?;
    if !principal.permissions.contains(permission) {
        return Err(ApiError::Forbidden(format!(
            "this needs the {permission} permission, which your token does not grant"
        )))
        .gql();
    }
    Ok(Granted {
        store: ctx.data_unchecked::<Store>(),
        engine: ctx.data_unchecked::<Arc<Engine>>(),
        scope: &principal.namespaces,
    })
}

impl Granted<'_> {
    /// `NOT_FOUND` (worded like a missing record) unless the namespace is in scope.
    pub fn check(&self, namespace: &str, what: &str, key: &str) -> Result<(), ApiError> {
        if self.scope.allows(namespace) {
            Ok(())
        } else {
            Err(ApiError::NotFound(format!("{what} {key} was not found")))
        }
    }

    /// The namespaces to look in (see [`NamespaceScope::narrow`]).
    pub fn narrow(&self, asked: &[String]) -> Option<Vec<String>> {
        self.scope.narrow(asked)
    }

    pub async fn task(&self, id: Uuid) -> Result<TaskRecord> {
        let task = self.store.task(id).await.gql()?;
        self.check(&task.namespace, "task", &id.to_string()).gql()?;
        Ok(task)
    }

    /// A step with its task.
    pub async fn step(&self, id: Uuid) -> Result<(StepRecord, TaskRecord)> {
        let step = self.store.step(id).await.gql()?;
        let task = self.store.task(step.task_id).await.gql()?;
        self.check(&task.namespace, "step", &id.to_string()).gql()?;
        Ok((step, task))
    }
}
