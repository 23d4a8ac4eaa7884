//! End-to-end tests: the real server on port 0, spoken to with real HTTP and WebSocket clients,
//! on SQLite and (with `TASKER_TEST_DATABASE_URL`) PostgreSQL. One test binary for the crate.

// A test crate: a failed assumption is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod auth;
mod bad_input;
mod binary;
mod browser;
mod cdp;
mod chromium;
mod cli;
mod dashboard;
mod execution;
mod faults;
mod isolation;
mod operating;
mod sdk;
mod support;
mod tour;
mod websocket;
