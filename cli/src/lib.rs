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

/// jemalloc for the whole process, librdkafka's C allocations included (on Linux its
/// `malloc` and `free` replace the C library's). Each record is allocated on a
/// librdkafka thread and freed on another (headers, messages, delivery reports); glibc's
/// arenas made that about a quarter of a stage's CPU, and jemalloc about halved a
/// stage's CPU per record in `bench stages`. Set here, in the library, so the `sluice`
/// binary, the benchmarks and the tests all run the allocator that ships.
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
