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
    /// Most open sessions per partition; one more closes the session that ends first
    /// (counted in `sluice_sessionize_evicted_sessions_total`). Each costs a few hundred
    /// bytes plus about 150 per event in it.
    pub max_open_sessions: usize,
    /// Most open sessions of one tenant per partition (one tenant sending many users
    /// cannot crowd out the others); one more closes that tenant's that ends first.
    pub max_open_sessions_per_tenant: usize,
    /// Most events in one session (a bot that never pauses); one more closes it and
    /// starts the user's next session.
    pub max_session_events: usize,
}

impl Default for SessionizeConfig {
    fn default() -> Self {
        Self {
            group: "sluice-sessionize".into(),
            gap_s: 1800,
            allowed_lateness_s: 300,
            max_open_sessions: 100_000,
            max_open_sessions_per_tenant: 100_000,
            max_session_events: 10_000,
        }
    }
}
