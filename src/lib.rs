//! databricks-shield: brings a Databricks workspace's AI agents and everything they did into Akto.
//!
//! The crate is a one-way pipeline; see ARCHITECTURE.md for the map and its invariants:
//! `config` -> `databricks` -> `discovery` -> `collect` -> `traffic` -> `sink`, with `state`
//! acknowledged only after delivery and `run` on top.

pub mod app;
pub mod check;
pub mod cli;
pub mod collect;
pub mod config;
pub mod databricks;
pub mod demo;
pub mod discovery;
pub mod inventory;
pub mod json;
pub mod ops;
pub mod run;
pub mod secret_file;
pub mod sink;
pub mod state;
pub mod traces;
pub mod traffic;
