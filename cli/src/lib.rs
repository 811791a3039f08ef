//! The `sluice` command's library: wiring of each pipeline process from the
//! configuration, and the end-to-end demo.

pub mod demo;
pub mod pipeline;
