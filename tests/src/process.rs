//! `sluice` processes of a test's pipeline (to kill with SIGKILL), and a database
//! trigger that slows the sink's writes down so that a kill lands part-way.

use std::process::{Child, Command, Stdio};

use sluice::Config;

use crate::{sluice_bin, unique};

/// A `sluice` process running with a test's configuration, killed on drop.
pub struct SluiceProcess(Child, std::path::PathBuf);

impl SluiceProcess {
    /// Run `sluice <args>` with `config` (written to a file of its own) as static group
    /// member `instance`: restarted with the same id, it takes the killed one's place at
    /// once, without waiting for the session to expire (noida-db never expires one).
    pub fn spawn(config: &Config, args: &[&str], instance: &str) -> Self {
        let mut config = config.clone();
        config.metrics.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        Self::spawn_as_configured(config, args, instance)
    }

    /// [`SluiceProcess::spawn`], serving `/metrics` on an address of its own, returned.
    pub fn spawn_serving(
        config: &Config,
        args: &[&str],
        instance: &str,
    ) -> (Self, std::net::SocketAddr) {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = free.local_addr().expect("its address");
        drop(free);
        let mut config = config.clone();
        config.metrics.listen = Some(addr);
        (Self::spawn_as_configured(config, args, instance), addr)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its peak resident memory so far (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        crate::proc_memory_mib(&self.0.id().to_string(), "VmHWM")
    }

    /// The file its stderr (the log) goes to.
    pub fn log_file(&self) -> &std::path::Path {
        &self.1
    }

    fn spawn_as_configured(mut config: Config, args: &[&str], instance: &str) -> Self {
        for (k, v) in [
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "500"),
            ("group.instance.id", instance),
        ] {
            config.kafka.consumer.insert(k.into(), v.into());
        }
        crate::noida_group_workarounds(&mut config.kafka.consumer);
        let name = unique("proc");
        let file = std::env::temp_dir().join(format!("{name}.toml"));
        std::fs::write(&file, toml::to_string(&config).expect("config as TOML"))
            .expect("writing the config");
        let log_path = std::env::temp_dir().join(format!("{name}-{instance}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(sluice_bin())
            .arg("--config")
            .arg(&file)
            .args(args)
            .env_remove("SLUICE_STACK_ENV")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting sluice");
        Self(child, log_path)
    }

    /// Kill it with SIGKILL and reap it.
    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }

    /// Stop it with SIGTERM; panics unless it exits cleanly.
    pub fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let status = self.0.wait().expect("waiting for sluice");
        assert!(status.success(), "SIGTERM is a clean exit: {status}");
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Make every INSERT into the events table wait 200 ms (a statement trigger), or stop
/// doing so. Turning it on creates the tables first, as the sink's migrations would.
pub async fn slow_inserts(config: &Config, on: bool) {
    let pool = sluice_sinks::timescale::pool(&config.timescale).expect("pool");
    let s = &config.timescale.schema;
    let sql = if on {
        sluice_sinks::timescale::migrate(&pool, &config.timescale)
            .await
            .expect("migrations");
        format!(
            "CREATE OR REPLACE FUNCTION {s}.slow_insert() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.2); RETURN NULL; END $$; \
             CREATE TRIGGER slow_insert BEFORE INSERT ON {s}.events \
             FOR EACH STATEMENT EXECUTE FUNCTION {s}.slow_insert()"
        )
    } else {
        format!("DROP TRIGGER slow_insert ON {s}.events")
    };
    pool.get()
        .await
        .expect("connection")
        .batch_execute(&sql)
        .await
        .expect("trigger");
    pool.close();
}
