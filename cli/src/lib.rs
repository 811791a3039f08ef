//! The `sluice` command's library: the registry of stages and sinks and the
//! configuration they make up, process plumbing, replay, audit, and the end-to-end demo.

pub mod audit;
pub mod check;
pub mod components;
pub mod demo;
pub mod pipeline;
pub mod replay;
pub mod status;

pub use components::Config;
