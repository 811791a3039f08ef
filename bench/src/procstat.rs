//! What a process used, from `/proc`: CPU seconds and resident memory.

use anyhow::Result;

/// CPU seconds (user + system) process `pid` used so far.
pub fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = procfs::process::Process::new(pid)?.stat()?;
    Ok((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// Resident memory of process `pid` now, and its peak, in bytes.
pub fn rss_bytes(pid: i32) -> Result<(u64, u64)> {
    let status = procfs::process::Process::new(pid)?.status()?;
    let kib = |v: Option<u64>| v.unwrap_or(0) * 1024;
    Ok((kib(status.vmrss), kib(status.vmhwm)))
}

/// CPU seconds this process used so far.
pub fn own_cpu_seconds() -> Result<f64> {
    cpu_seconds(std::process::id() as i32)
}
