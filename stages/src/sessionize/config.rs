//! Settings of the sessionize stage (`[sessionize]`).

use serde::{Deserialize, Serialize};

/// The sessionize stage: event-time session windows per user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionizeConfig {
    /// Consumer group.
    pub group: String,
    /// A gap of inactivity longer than this ends a session, in seconds.
    pub gap_s: u64,
    /// How far behind the newest event time an event may arrive and still count, in
    /// seconds; older ones are dead-lettered as `late`.
    pub allowed_lateness_s: u64,
}

impl Default for SessionizeConfig {
    fn default() -> Self {
        Self {
            group: "sluice-sessionize".into(),
            gap_s: 1800,
            allowed_lateness_s: 300,
        }
    }
}
