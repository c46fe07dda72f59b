//! flotilla keeps fleets of AI agents working when parts of them fail.
//!
//! The daemon (`flotilla up`) starts the agents of `flotilla.toml`, feeds
//! them tasks from a durable queue, watches them and restarts them; every
//! task ends completed or dead-lettered with its reason, or is still queued.
//! See `DESIGN.md`-level docs in `docs/` and the README.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod breaker;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod clock;
pub mod command;
pub mod config;
pub mod daemon;
pub mod degrade;
pub mod delegate;
pub mod demo;
pub mod dispatch;
pub mod example_agent;
pub mod experiment;
pub mod fault_proxy;
pub mod health;
pub mod lines;
pub mod lint;
pub mod metrics;
pub mod notify;
pub mod protocol;
pub mod queue;
pub mod readiness;
pub mod retry;
pub mod rollback;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod template;
pub mod top;
pub mod validate;
pub mod watch;
pub mod watchdog;
