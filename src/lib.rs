//! The `tasker` application: its settings and the one composition root ([`App`]) that `main`,
//! the end-to-end tests and the benchmark start the server through.

/// A template file bundled into the binary (`bundled!("examples/x.yaml")`), its path written
/// once.
macro_rules! bundled {
    ($file:literal) => {
        tasker_engine::BundledTemplate {
            file: $file,
            source: include_str!(concat!("../", $file)),
        }
    };
}

mod app;
pub mod cli;
pub mod config;
mod demo;

pub use app::{App, connect};
