//! The enrich stage: `ClickEvent` → `EnrichedEvent`, adding browser/OS/device from the
//! user agent (woothee) and a coarse network and country from a CIDR lookup table.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use rdkafka::message::{Header, Message};
use sluice_core::headers;
use std::sync::Arc;

use sluice_schemas::{ClickEvent, Codec, EnrichedEvent, CLICK_EVENTS, ENRICHED_EVENTS};

pub mod config;
pub mod tenants;

use crate::runtime::run_stage;
use crate::transform::{Output, StageError, StageSpec, StageStats, Transform};
use sluice_core::failure::Failure;
use sluice_core::telemetry;
use sluice_core::wiring::{Rewiring, Shared};
use sluice_schemas::setup::{reading_codec, writing_codec};
use tokio_util::sync::CancellationToken;

/// Why the enrich stage could not start.
#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    /// The lookup table could not be read.
    #[error("cannot read IP lookup table {path}: {source}")]
    Csv {
        /// The file.
        path: String,
        /// The CSV error.
        source: csv::Error,
    },
    /// A row of the lookup table is wrong.
    #[error("IP lookup table {path}, line {line}: {reason}")]
    Row {
        /// The file.
        path: String,
        /// The 1-based line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
}

/// One row of the IP lookup table.
#[derive(Debug, Clone)]
struct NetworkRow {
    net: IpNet,
    network: String,
    country: String,
}

/// A CIDR → (network, country) table; the longest matching prefix wins.
#[derive(Debug, Clone, Default)]
pub struct IpTable {
    /// Sorted by prefix length, longest first.
    rows: Vec<NetworkRow>,
}

impl IpTable {
    /// Load `cidr,network,country` rows (with a header line) from a CSV file.
    pub fn load(path: &Path) -> Result<Self, EnrichError> {
        let p = path.display().to_string();
        let mut reader = csv::Reader::from_path(path).map_err(|source| EnrichError::Csv {
            path: p.clone(),
            source,
        })?;
        let mut rows = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|source| EnrichError::Csv {
                path: p.clone(),
                source,
            })?;
            let line = record.position().map_or(0, |pos| pos.line());
            let row_err = |reason: String| EnrichError::Row {
                path: p.clone(),
                line,
                reason,
            };
            let cidr = record
                .get(0)
                .ok_or_else(|| row_err("missing cidr".into()))?;
            let net: IpNet = cidr
                .trim()
                .parse()
                .map_err(|e| row_err(format!("cidr {cidr:?}: {e}")))?;
            rows.push(NetworkRow {
                net,
                network: record.get(1).unwrap_or_default().trim().to_string(),
                country: record.get(2).unwrap_or_default().trim().to_string(),
            });
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.net.prefix_len()));
        Ok(Self { rows })
    }

    /// The network and country of `ip`, if a row covers it.
    pub fn lookup(&self, ip: IpAddr) -> Option<(&str, &str)> {
        self.rows
            .iter()
            .find(|r| r.net.contains(&ip))
            .map(|r| (r.network.as_str(), r.country.as_str()))
    }
}

/// User agents remembered by [`Enricher`].
const UA_CACHE_ENTRIES: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(10_000) {
    Some(n) => n,
    None => panic!("non-zero"),
};

/// Longer user agents are parsed every time, never cached: the cache's memory stays
/// bounded (10,000 × 512 bytes) whatever clients send. Real ones are under 300 bytes.
const UA_CACHE_MAX_BYTES: usize = 512;

/// What a user agent says, as enrich stores it.
#[derive(Debug, Clone, Default)]
struct UserAgent {
    browser: Option<String>,
    browser_version: Option<String>,
    os: Option<String>,
    device: Option<String>,
}

/// The enrich stage.
pub struct Enricher {
    ua: woothee::parser::Parser,
    /// Parsed user agents: real traffic repeats a few thousand of them, and parsing one
    /// costs more than the rest of the enrichment (Logstash's useragent filter caches too).
    ua_cache: std::sync::Mutex<lru::LruCache<String, UserAgent>>,
    ips: IpTable,
    tenants: Option<std::sync::Arc<tenants::TenantDirectory>>,
    input: Arc<Codec<ClickEvent>>,
    output: Arc<Codec<EnrichedEvent>>,
}

impl Enricher {
    /// An enricher using `ips` for IP lookups.
    pub fn new(ips: IpTable) -> Self {
        Self {
            ua: woothee::parser::Parser::new(),
            ua_cache: std::sync::Mutex::new(lru::LruCache::new(UA_CACHE_ENTRIES)),
            ips,
            tenants: None,
            input: CLICK_EVENTS.clone(),
            output: ENRICHED_EVENTS.clone(),
        }
    }

    /// Read and write with these codecs (e.g. in registry mode) instead of the embedded ones.
    pub fn with_codecs(
        mut self,
        input: Arc<Codec<ClickEvent>>,
        output: Arc<Codec<EnrichedEvent>>,
    ) -> Self {
        self.input = input;
        self.output = output;
        self
    }

    /// Also look tenants up in `directory` (name and plan).
    pub fn with_tenants(mut self, directory: std::sync::Arc<tenants::TenantDirectory>) -> Self {
        self.tenants = Some(directory);
        self
    }

    /// What `ua` says, from the cache or parsed.
    fn user_agent(&self, ua: &str) -> UserAgent {
        let cacheable = ua.len() <= UA_CACHE_MAX_BYTES;
        let cache = || {
            self.ua_cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if cacheable {
            if let Some(hit) = cache().get(ua) {
                return hit.clone();
            }
        }
        let known = |s: &str| (s != woothee::woothee::VALUE_UNKNOWN).then(|| s.to_string());
        let parsed = self
            .ua
            .parse(ua)
            .map(|p| UserAgent {
                browser: known(p.name),
                browser_version: known(p.version),
                os: known(p.os),
                device: known(p.category),
            })
            .unwrap_or_default();
        if cacheable {
            cache().put(ua.to_string(), parsed.clone());
        }
        parsed
    }

    /// Enrich one event.
    pub fn enrich(&self, event: ClickEvent) -> EnrichedEvent {
        let mut out = EnrichedEvent::from_click(event);
        if let Some(ua) = out.user_agent.as_deref().map(|ua| self.user_agent(ua)) {
            out.browser = ua.browser;
            out.browser_version = ua.browser_version;
            out.os = ua.os;
            out.device = ua.device;
        }
        let ip = out
            .ip
            .as_deref()
            .and_then(|ip| ip.trim().parse::<IpAddr>().ok());
        if let Some((network, country)) = ip.and_then(|ip| self.ips.lookup(ip)) {
            out.network = Some(network.to_string()).filter(|s| !s.is_empty());
            out.country = Some(country.to_string()).filter(|s| !s.is_empty());
        }
        out
    }
}

/// Run the enrich stage (parsed → enriched) with `settings` until `shutdown`.
pub async fn run(
    shared: &Shared,
    settings: &config::EnrichConfig,
    rewiring: &Rewiring,
    shutdown: CancellationToken,
) -> Result<StageStats, StageError> {
    let t = &shared.topics;
    let ips = match &settings.geo_csv {
        Some(path) => {
            IpTable::load(path).map_err(|e| StageError::Settings(format!("enrich.geo_csv: {e}")))?
        }
        None => IpTable::default(),
    };
    let mut spec = StageSpec::new(t, &settings.group, &t.parsed, &t.enriched, rewiring);
    spec.max_in_flight = settings.max_in_flight;
    spec.max_in_flight_bytes = settings.max_in_flight_bytes;
    spec.exactly_once = settings.exactly_once;
    spec.transaction_max_records = settings.transaction_max_records;
    spec.transaction_linger = std::time::Duration::from_millis(settings.transaction_ms);
    let mut enricher = Enricher::new(ips).with_codecs(
        reading_codec(&shared.schemas)?,
        writing_codec(&shared.schemas, &t.enriched).await?,
    );
    if let Some(url) = &settings.tenants_url {
        let ttl = std::time::Duration::from_secs(settings.tenants_ttl_s.max(1));
        let directory = Arc::new(tenants::TenantDirectory::new(ttl));
        tenants::load(url, &settings.tenants_query, &directory).await;
        tokio::spawn(tenants::refresh(
            url.clone(),
            settings.tenants_query.clone(),
            directory.clone(),
            shutdown.clone(),
        ));
        enricher = enricher.with_tenants(directory);
    }
    telemetry::process_readiness().set(true);
    run_stage(&shared.kafka, &spec, Arc::new(enricher), shutdown).await
}

impl Transform for Enricher {
    fn name(&self) -> &'static str {
        "enrich"
    }

    fn process<M: Message>(&self, msg: &M) -> Result<Vec<Output>, Failure> {
        let event = self
            .input
            .decode(msg.payload().unwrap_or_default())
            .map_err(Failure::from)?;
        let tenant = match &self.tenants {
            Some(directory) => directory.lookup(&event.tenant)?,
            None => None,
        };
        let mut enriched = self.enrich(event);
        if let Some(t) = tenant {
            enriched.tenant_name = t.name;
            enriched.tenant_plan = t.plan;
        }
        let payload = self
            .output
            .encode(&enriched)
            .map_err(|e| Failure::new("encode", e.to_string()))?;
        let out_headers = headers::forward(msg.headers(), &[headers::ENCODING]).insert(Header {
            key: headers::ENCODING,
            value: Some(self.output.encoding().as_str()),
        });
        Ok(vec![Output {
            key: msg.key().map(<[u8]>::to_vec),
            payload,
            headers: out_headers,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> IpTable {
        let dir = std::env::temp_dir().join(format!("sluice-ip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.csv");
        std::fs::write(
            &f,
            "cidr,network,country\n10.0.0.0/8,corp,DE\n10.1.0.0/16,lab,FR\n2001:db8::/32,doc,NL\n",
        )
        .unwrap();
        IpTable::load(&f).unwrap()
    }

    #[test]
    fn only_user_agents_of_a_sane_length_are_cached() {
        let e = Enricher::new(table());
        let real = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36";
        assert_eq!(e.user_agent(real).browser.as_deref(), Some("Chrome"));
        for i in 0..3 {
            let huge = format!("{real} {}", "x".repeat(100_000 + i));
            assert_eq!(e.user_agent(&huge).browser.as_deref(), Some("Chrome"));
        }
        let cache = e.ua_cache.lock().unwrap();
        assert_eq!(cache.len(), 1, "the 100 KB agents were parsed, not kept");
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table();
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(("lab", "FR")));
        assert_eq!(t.lookup("10.2.2.3".parse().unwrap()), Some(("corp", "DE")));
        assert_eq!(
            t.lookup("2001:db8::1".parse().unwrap()),
            Some(("doc", "NL"))
        );
        assert_eq!(t.lookup("192.168.0.1".parse().unwrap()), None);
    }

    #[test]
    fn bad_row_names_line() {
        let dir = std::env::temp_dir().join(format!("sluice-ipbad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.csv");
        std::fs::write(&f, "cidr,network,country\n10.0.0.0/8,a,b\nnot-a-net,x,y\n").unwrap();
        let err = IpTable::load(&f).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("not-a-net"), "{err}");
    }

    #[test]
    fn enriches_user_agent_and_ip() {
        let e = Enricher::new(table()).enrich(ClickEvent {
            event_id: "e".into(),
            tenant: "t".into(),
            user_id: "u".into(),
            session_id: None,
            event_type: "click".into(),
            url: None,
            referrer: None,
            event_time: 1,
            received_at: 1,
            user_agent: Some(
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:120.0) Gecko/20100101 Firefox/120.0"
                    .into(),
            ),
            ip: Some("10.1.0.9".into()),
            extra: Default::default(),
        });
        assert_eq!(e.browser.as_deref(), Some("Firefox"));
        assert_eq!(e.browser_version.as_deref(), Some("120.0"));
        assert_eq!(e.os.as_deref(), Some("Windows 10"));
        assert_eq!(e.device.as_deref(), Some("pc"));
        assert_eq!(e.network.as_deref(), Some("lab"));
        assert_eq!(e.country.as_deref(), Some("FR"));
    }
}
