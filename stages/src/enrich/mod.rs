//! The enrich stage: `ClickEvent` → `EnrichedEvent`, adding browser/OS/device from the
//! user agent (woothee) and a coarse network and country from a CIDR lookup table.

use std::net::IpAddr;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
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

/// What the IP lookup table says of one network.
#[derive(Debug, Clone)]
struct NetworkRow {
    network: String,
    country: String,
}

/// A CIDR → (network, country) table; the longest matching prefix wins.
///
/// Prefix tries, not a list: real geo tables have hundreds of thousands of rows, and a
/// scan of them cost 1.5 ms an event at 250,000 rows.
#[derive(Debug, Clone, Default)]
pub struct IpTable {
    v4: PrefixMap<Ipv4Net, NetworkRow>,
    v6: PrefixMap<Ipv6Net, NetworkRow>,
}

impl IpTable {
    /// Load `cidr,network,country` rows (with a header line) from a CSV file.
    pub fn load(path: &Path) -> Result<Self, EnrichError> {
        let p = path.display().to_string();
        let mut reader = csv::Reader::from_path(path).map_err(|source| EnrichError::Csv {
            path: p.clone(),
            source,
        })?;
        let mut table = Self::default();
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
            table.insert(
                net,
                NetworkRow {
                    network: record.get(1).unwrap_or_default().trim().to_string(),
                    country: record.get(2).unwrap_or_default().trim().to_string(),
                },
            );
        }
        Ok(table)
    }

    /// Add `net` (host bits dropped: `10.1.2.3/8` is `10.0.0.0/8`); a network already in
    /// the table keeps its earlier row, so the first of duplicate rows wins.
    fn insert(&mut self, net: IpNet, row: NetworkRow) {
        match net.trunc() {
            IpNet::V4(n) => {
                self.v4.entry(n).or_insert(row);
            }
            IpNet::V6(n) => {
                self.v6.entry(n).or_insert(row);
            }
        }
    }

    /// The network and country of `ip`, if a row covers it.
    pub fn lookup(&self, ip: IpAddr) -> Option<(&str, &str)> {
        let row = match ip {
            IpAddr::V4(a) => self.v4.get_lpm(&Ipv4Net::from(a)).map(|(_, r)| r),
            IpAddr::V6(a) => self.v6.get_lpm(&Ipv6Net::from(a)).map(|(_, r)| r),
        }?;
        Some((row.network.as_str(), row.country.as_str()))
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
        table_of(
            &[
                ("10.0.0.0/8", "corp", "DE"),
                ("10.1.0.0/16", "lab", "FR"),
                ("2001:db8::/32", "doc", "NL"),
            ]
            .map(|(cidr, network, country)| (cidr.into(), network.into(), country.into())),
        )
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

    /// A table of `rows` (cidr, network, country) written to a CSV file and loaded.
    fn table_of(rows: &[(String, String, String)]) -> IpTable {
        static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = std::env::temp_dir().join(format!("sluice-ipt-{}-{n}.csv", std::process::id()));
        let mut text = String::from("cidr,network,country\n");
        for (cidr, network, country) in rows {
            text.push_str(&format!("{cidr},{network},{country}\n"));
        }
        std::fs::write(&f, text).unwrap();
        let table = IpTable::load(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        table
    }

    proptest::proptest! {
        /// The trie answers as the definition does: of the rows whose network holds the
        /// address, the longest prefix, and of equal networks the first row in the file.
        /// Host bits, duplicate networks, /0 and both families included.
        #[test]
        fn lookup_is_the_longest_matching_row(
            v4 in proptest::collection::vec((proptest::prelude::any::<u32>(), 0u8..=32), 0..40),
            v6 in proptest::collection::vec((proptest::prelude::any::<u128>(), 0u8..=128), 0..40),
            probes in proptest::collection::vec(proptest::prelude::any::<(bool, u32, u128, u8)>(), 1..40),
        ) {
            // Addresses near the networks' own, so that most probes hit something.
            let mut nets: Vec<IpNet> = Vec::new();
            for (a, len) in &v4 {
                // Short prefixes of few distinct values make duplicates and nesting likely.
                let a = a & 0xff0f_0f00;
                nets.push(IpNet::V4(Ipv4Net::new(a.into(), *len).unwrap()));
            }
            for (a, len) in &v6 {
                let a = a & (0xff0f_u128 << 112 | 0xff);
                nets.push(IpNet::V6(Ipv6Net::new(a.into(), *len).unwrap()));
            }
            let rows: Vec<(String, String, String)> = nets
                .iter()
                .enumerate()
                .map(|(i, n)| (n.to_string(), format!("n{i}"), format!("c{i}")))
                .collect();
            let table = table_of(&rows);
            for (v4_probe, a4, a6, pick) in probes {
                let ip: IpAddr = match (v4_probe, nets.get(pick as usize % nets.len().max(1))) {
                    // Sometimes an address inside a row's network, sometimes anywhere.
                    (_, Some(IpNet::V4(n))) if pick % 2 == 0 => {
                        IpAddr::V4((u32::from(n.network()) | (a4 & !u32::from(n.netmask()))).into())
                    }
                    (_, Some(IpNet::V6(n))) if pick % 2 == 0 => {
                        IpAddr::V6((u128::from(n.network()) | (a6 & !u128::from(n.netmask()))).into())
                    }
                    (true, _) => IpAddr::V4((a4 & 0xff0f_0fff).into()),
                    (false, _) => IpAddr::V6((a6 & (0xff0f_u128 << 112 | 0xffff)).into()),
                };
                let mut best: Option<(u8, usize)> = None;
                for (i, n) in nets.iter().enumerate() {
                    if n.contains(&ip) && best.is_none_or(|(len, _)| n.prefix_len() > len) {
                        best = Some((n.prefix_len(), i));
                    }
                }
                let want = best.map(|(_, i)| (rows[i].1.as_str(), rows[i].2.as_str()));
                proptest::prop_assert_eq!(table.lookup(ip), want, "ip {}", ip);
            }
        }
    }

    /// A lookup's cost does not grow with the table. It grew linearly (a scan of every
    /// row): at 100,000 rows one took thousands of times as long as at one row. Both are
    /// timed here, best of several, so the ratio is of this machine at this moment.
    #[test]
    fn lookups_do_not_scan_the_table() {
        let big: Vec<(String, String, String)> = (0..100_000u32)
            .map(|i| {
                // Distinct /24s spread over the space, none holding the probes below.
                let net = Ipv4Net::new(
                    (i.wrapping_mul(2_654_435_761) & !0xff | 0x0100_0000).into(),
                    24,
                )
                .unwrap()
                .trunc();
                (net.to_string(), format!("n{i}"), "XX".to_string())
            })
            .chain([("0.0.0.0/0".to_string(), "any".to_string(), "ZZ".to_string())])
            .collect();
        let small = [("0.0.0.0/0".to_string(), "any".to_string(), "ZZ".to_string())];
        let (big, small) = (table_of(&big), table_of(&small));
        // Addresses in 0.0.0.0/8, which no /24 above covers: every one answers "any".
        let probes: Vec<IpAddr> = (0..2_000u32).map(|i| IpAddr::V4(i.into())).collect();
        let time = |table: &IpTable| {
            sluice_core::timing::fastest(
                5,
                || (),
                |_| {
                    for ip in &probes {
                        assert_eq!(table.lookup(*ip), Some(("any", "ZZ")));
                    }
                },
            )
        };
        let (big_t, small_t) = (time(&big), time(&small));
        let ratio = sluice_core::timing::slowdown(big_t, small_t);
        assert!(
            ratio < 100.0,
            "a lookup in 100,000 rows took {ratio:.0}x one in a single row ({big_t:?} vs {small_t:?})"
        );
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
