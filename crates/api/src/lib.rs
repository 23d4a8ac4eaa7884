//! Tasker's API: the async-graphql schema (queries, mutations, subscriptions), the batch
//! loading nested fields go through, and the axum router that serves GraphQL over HTTP and WebSocket,
//! the playground and health checks. Resolvers stay thin: they parse input and call the view
//! their permission grants (`access.rs`).

mod access;
pub mod auth;
mod batch;
pub mod browser;
mod dashboard;
mod deadline;
mod enums;
mod error;
mod events;
mod graph;
mod health;
mod ids;
pub mod limits;
mod objects;
mod playground;
pub mod quota;
mod schema;
mod server;
mod telemetry;
mod workers;

pub use browser::BrowserPolicy;
pub use error::ApiError;
pub use schema::{TaskerSchema, sdl};
pub use server::{HttpLimits, router, serve};
