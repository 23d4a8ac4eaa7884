//! The only way a resolver reaches data: [`grant`] checks the caller's permission and hands
//! back a [`Granted`] view that carries the caller's namespace scope. Records outside the
//! scope are answered exactly like missing ones, so a caller cannot learn that they exist.

use crate::auth::Principal;
use crate::error::{ApiError, GqlResultExt};
use async_graphql::{Context, Result};
use futures::{Stream, StreamExt};
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
    /// The store's `NOT_FOUND` for a missing record unless the namespace is in scope, so the
    /// two cannot be told apart.
    pub fn check(
        &self,
        namespace: &str,
        what: &'static str,
        key: &str,
    ) -> Result<(), tasker_store::Error> {
        if self.scope.allows(namespace) {
            Ok(())
        } else {
            Err(tasker_store::Error::NotFound {
                what,
                key: key.to_owned(),
            })
        }
    }

    /// A worker's lease token from input, if its step is in scope (`LEASE_LOST` otherwise).
    pub async fn lease(&self, id: &async_graphql::ID, field: &str) -> Result<Uuid> {
        let token = crate::ids::parse_id(id, field).gql()?;
        self.lease_in_scope(token).await
    }

    /// Where to look (see [`NamespaceScope::narrow`]); `None`: nowhere, answer empty.
    pub fn narrow(&self, asked: &[String]) -> Option<tasker_domain::Within> {
        self.scope.narrow(asked)
    }

    /// The lease tokens among `tokens` whose steps are in scope; the others are treated as
    /// lost leases. Costs nothing for a caller that sees every namespace.
    pub async fn leases_in_scope(&self, tokens: Vec<Uuid>) -> Result<Vec<Uuid>> {
        if *self.scope == NamespaceScope::All {
            return Ok(tokens);
        }
        let namespaces = self.store.lease_namespaces(&tokens).await.gql()?;
        Ok(tokens
            .into_iter()
            .filter(|token| {
                namespaces
                    .get(token)
                    .is_some_and(|namespace| self.scope.allows(namespace))
            })
            .collect())
    }

    /// A lease token, if its step is in scope; `LEASE_LOST` otherwise, like an expired lease.
    pub async fn lease_in_scope(&self, token: Uuid) -> Result<Uuid> {
        self.leases_in_scope(vec![token])
            .await?
            .pop()
            .ok_or(tasker_store::Error::LeaseLost)
            .gql()
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

/// A subscription's stream, counted against the token's subscription quota, and ended by an
/// `UNAUTHENTICATED` error once the token has expired: checked before each item, and at the
/// expiry time for a quiet stream.
pub(crate) fn until_expiry<T, S>(
    ctx: &Context<'_>,
    stream: S,
) -> Result<impl Stream<Item = Result<T>> + Send + 'static + use<T, S>>
where
    T: Send + 'static,
    S: Stream<Item = T> + Send + 'static,
{
    let caller = principal(ctx)?;
    let deadline = caller
        .expires_at
        .and_then(|exp| chrono::DateTime::from_timestamp(exp, 0));
    // Counted against the token's quota until the stream is dropped.
    let held = ctx
        .data_unchecked::<Arc<crate::quota::Quotas>>()
        .subscribe(caller.key)
        .gql()?;
    let clock = ctx.data_unchecked::<Store>().clock().clone();
    let state = (Box::pin(stream), false, held);
    Ok(futures::stream::unfold(
        state,
        move |(mut stream, ended, held)| {
            let clock = clock.clone();
            async move {
                if ended {
                    return None;
                }
                let expired = || deadline.is_some_and(|deadline| clock.now() >= deadline);
                let closing = || {
                    Err(ApiError::Unauthenticated(
                        "the token has expired: reconnect with a fresh token and resume from your last cursor"
                            .to_owned(),
                    ))
                    .gql()
                };
                loop {
                    let wait = deadline.map_or(std::time::Duration::from_secs(3600), |deadline| {
                        (deadline - clock.now()).to_std().unwrap_or_default()
                    });
                    tokio::select! {
                        item = stream.next() => {
                            return match item {
                                Some(_) if expired() => Some((closing(), (stream, true, held))),
                                Some(item) => Some((Ok(item), (stream, false, held))),
                                None => None,
                            };
                        }
                        _ = tokio::time::sleep(wait) => {
                            if expired() {
                                return Some((closing(), (stream, true, held)));
                            }
                        }
                    }
                }
            }
        },
    ))
}
