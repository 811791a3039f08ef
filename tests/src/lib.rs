//! Helpers of the integration tests: the configuration of the local stack started by
//! `scripts/stack up`, and unique names so tests do not see each other's data.

// Test support: a failed set-up step should stop the test with its message.
#![allow(clippy::unwrap_used)]

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

/// A Kafka broker of a test's own (noida-db on a free port), for tests that stop and
/// restart the broker without disturbing the shared one. Killed on drop.
pub struct PrivateBroker {
    child: Option<std::process::Child>,
    port: u16,
    dir: PathBuf,
}

impl PrivateBroker {
    /// Start a broker with an empty data dir.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("sluice-broker-"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = Self {
            child: None,
            port,
            dir,
        };
        b.restart();
        b
    }

    /// `bootstrap.servers` of this broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop the broker (SIGTERM; it saves its data) and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg(child.id().to_string())
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start (again) on the same port and data dir, and wait until it listens.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.join("broker.log")).unwrap();
        let child = std::process::Command::new(stack_var("SLUICE_STACK_NOIDA_BIN"))
            .args([
                "start",
                "--only",
                "kafka",
                "--host",
                "127.0.0.1",
                "--kafka-port",
            ])
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting noida-db");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private broker did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
