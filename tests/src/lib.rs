//! Helpers of the integration tests: the configuration of the local stack started by
//! `scripts/stack up`, and unique names so tests do not see each other's data.

use std::path::PathBuf;

use sluice_core::config::{parse_env_lines, Config};

/// The stack settings file: `SLUICE_STACK_ENV`, or `<repo>/.stack/stack.env`.
pub fn stack_env_path() -> PathBuf {
    std::env::var_os("SLUICE_STACK_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.stack/stack.env"))
        })
}

/// The stack settings (`KEY=VALUE` pairs).
pub fn stack_vars() -> Vec<(String, String)> {
    let path = stack_env_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}. Start the services first: scripts/stack up",
            path.display()
        )
    });
    parse_env_lines(&text)
}

/// One stack setting, e.g. `SLUICE_STACK_PG_URL`.
pub fn stack_var(name: &str) -> String {
    stack_vars()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{name} is not in {}", stack_env_path().display()))
}

/// The configuration pointing at the local stack (no config file, no process env).
pub fn stack_config() -> Config {
    Config::load_with(None, stack_vars()).expect("stack settings make a valid config")
}

/// A short unique suffix for names of topics, groups, schemas and indices.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &id[..10])
}
