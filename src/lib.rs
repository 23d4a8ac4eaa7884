//! The `tasker` application: its settings and the one composition root ([`App`]) that `main`,
//! the end-to-end tests and the benchmark start the server through.

mod app;
pub mod config;
mod demo;

pub use app::{App, connect};
