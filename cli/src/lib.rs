//! The `sluice` command's library: wiring of each pipeline process from the
//! configuration, replay, audit, and the end-to-end demo.

pub mod audit;
pub mod demo;
pub mod pipeline;
pub mod replay;
