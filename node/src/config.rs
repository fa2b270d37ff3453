//! The site daemon's configuration: a TOML file (every key optional, `serde(default)`),
//! overridden by command-line flags. Precedence: **flags > file > defaults**.
//!
//! The pricing policy is declarative: a default price, rules matching GPU profile names, and
//! per-region adjustments in percent. `examples/site.toml` documents every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hashgrid_protocol::{
    Backend, Benchmark, DeviceType, GpuLimits, GpuProfile, Msat, Network, SettlementMethod,
};
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::node::{AskSpec, DEFAULT_ORDER_TTL, NodeBuilder};

/// Largest config file read (a config is a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Default TCP/QUIC port of a site node.
pub const DEFAULT_PORT: u16 = 4001;

/// Loading or checking the config failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is too large.
    #[error("config {path} is over {MAX_CONFIG_BYTES} bytes; is it the right file?")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The TOML does not parse or has unknown keys or wrong types.
    #[error("config {path}: {message}(see examples/site.toml for every key)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is invalid.
    #[error("config: {0}")]
    Invalid(String),
}

/// One pricing rule: GPUs whose adapter name contains `gpu` (case-insensitive) cost `price`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceRule {
    /// Substring of the adapter name, e.g. `H100` or `RTX 4090`.
    pub gpu: String,
    /// Msat per GPU-second.
    pub price: u64,
}

/// The declarative pricing policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pricing {
    /// Msat per GPU-second when no rule matches (default 100).
    pub default_price: u64,
    /// Rules, first match wins.
    pub rules: Vec<PriceRule>,
    /// Percent added to (or, if negative, taken from) the price in a region, e.g.
    /// `{ "eu-north" = -10 }` for cheap hydro power. At least -100.
    pub region_adjust_percent: BTreeMap<String, i32>,
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing {
            default_price: 100,
            rules: Vec::new(),
            region_adjust_percent: BTreeMap::new(),
        }
    }
}

impl Pricing {
    /// The price of `gpu` in `region`, in msat per GPU-second (integer arithmetic, rounded
    /// down, never below 1).
    pub fn price_for(&self, gpu: &GpuProfile, region: &str) -> Msat {
        let name = gpu.name.to_lowercase();
        let base = self
            .rules
            .iter()
            .find(|r| name.contains(&r.gpu.to_lowercase()))
            .map_or(self.default_price, |r| r.price);
        let pct = i128::from(self.region_adjust_percent.get(region).copied().unwrap_or(0));
        let adjusted = i128::from(base) * (100 + pct) / 100;
        Msat(u64::try_from(adjusted.max(1)).unwrap_or(u64::MAX))
    }
}

/// A GPU this site sells, declared in the config; when none are declared the daemon sells the
/// adapter it detects (see [`SiteConfig::detect_gpu`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// Adapter name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Backend (`vulkan`, `metal`, `dx12`, `gl`).
    pub backend: Backend,
    /// Device type (`discrete_gpu`, `integrated_gpu`, `virtual_gpu`, `cpu`).
    pub device_type: DeviceType,
    /// Memory available to jobs, in GiB.
    pub memory_gib: u64,
    /// Measured matmul MFLOP/s (0 if not measured).
    pub matmul_mflops: u64,
    /// Measured copy MB/s (0 if not measured).
    pub copy_mbps: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            name: String::new(),
            backend: Backend::Vulkan,
            device_type: DeviceType::DiscreteGpu,
            memory_gib: 0,
            matmul_mflops: 0,
            copy_mbps: 0,
        }
    }
}

impl GpuConfig {
    /// The advertised profile.
    pub fn profile(&self) -> GpuProfile {
        GpuProfile {
            name: self.name.clone(),
            vendor: 0,
            device: 0,
            backend: self.backend,
            device_type: self.device_type,
            driver: String::new(),
            memory_bytes: self.memory_gib.saturating_mul(1 << 30),
            limits: GpuLimits::default(),
            bench: Benchmark {
                matmul_mflops: self.matmul_mflops,
                copy_mbps: self.copy_mbps,
            },
        }
    }
}

/// The site daemon's configuration (see `examples/site.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SiteConfig {
    /// Network name (default `main`).
    pub network: Network,
    /// Data directory (default `$XDG_DATA_HOME/hashgrid`).
    pub data_dir: Option<PathBuf>,
    /// Listen addresses (default TCP and QUIC on port 4001 of every interface).
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers, ideally with `/p2p/<PeerId>` (default none: mDNS and known peers).
    pub bootstrap: Vec<Multiaddr>,
    /// Region of this site (default `unknown`).
    pub region: String,
    /// mDNS discovery on the LAN (default true).
    pub mdns: bool,
    /// Serve the DHT (Kademlia server mode) for the nodes that bootstrap from this one: for
    /// seed nodes (default false: ask the DHT, do not answer it).
    pub dht_server: bool,
    /// GPU units offered per GPU entry (default 1).
    pub units: u32,
    /// Longest job accepted, in seconds (default 3600).
    pub max_job_seconds: u32,
    /// Lifetime of asks and the capacity ad; re-announced every third of it (default 600).
    pub order_ttl_secs: u64,
    /// Settlement methods accepted (default `["ledger"]`).
    pub settlement: Vec<SettlementMethod>,
    /// The GPUs sold, as declared. When empty and `detect_gpu` is on, the daemon sells this
    /// machine's adapter as the executor reports and benchmarks it.
    pub gpus: Vec<GpuConfig>,
    /// With no `[[gpus]]`, detect the local GPU adapter (wgpu), benchmark it once (cached in
    /// the data dir) and sell it; a machine without one is an error that says how to install
    /// lavapipe. `false` (or `--no-gpu`) runs a relay-only node. Default true.
    pub detect_gpu: bool,
    /// GPU profiles detected at start-up (filled in by the daemon, never read from the file).
    #[serde(skip)]
    pub detected: Vec<GpuProfile>,
    /// The pricing policy.
    pub pricing: Pricing,
    /// How this site settles: `[settle]` (default ledger).
    pub settle: crate::settle::SettleSection,
    /// The input cache: `[cache]`.
    pub cache: CacheSection,
    /// Models whose weights this site holds ready: `[models]`.
    pub models: ModelsSection,
    /// How jobs run on this machine: `[executor]`.
    pub executor: ExecutorSection,
    /// Prometheus metrics: `[metrics]`.
    pub metrics: MetricsSection,
    /// The live dashboard: `[dashboard]`.
    pub dashboard: DashboardSection,
}

/// `[metrics]`: where Prometheus scrapes `/metrics` (off unless set).
///
/// ```toml
/// [metrics]
/// listen = "127.0.0.1:9464"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the metrics server. It has no token: bind it where only the scraper
    /// reaches it.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[dashboard]`: the site's live dashboard (off unless set).
///
/// ```toml
/// [dashboard]
/// listen = "127.0.0.1:8484"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardSection {
    /// Address of the dashboard.
    pub listen: Option<std::net::SocketAddr>,
    /// The token a browser must present when `listen` is not a loopback address (default:
    /// `<data dir>/dashboard-token`, created on first use).
    pub token: Option<String>,
}

/// `[cache]`: how much of the jobs' inputs (model weights) the site keeps between jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// GiB on disk under `<data dir>/inputs` (default 8; 0: none on disk).
    pub disk_gib: u64,
    /// GiB in memory (default 1).
    pub memory_gib: u64,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            disk_gib: crate::jobs::cache::DEFAULT_DISK_BYTES >> 30,
            memory_gib: crate::jobs::cache::DEFAULT_MEMORY_BYTES >> 30,
        }
    }
}

/// `[executor]`: how jobs run on this machine.
///
/// ```toml
/// [executor]
/// cpu_low_wake_latency = false
/// cpu_pin_threads = false
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutorSection {
    /// While a job runs on a CPU adapter (lavapipe), ask Linux for a 0 µs CPU wake-up latency
    /// so that idle cores poll instead of halting between the adapter's dispatches (decode
    /// ~+14% on a 2-core VM; needs root, a no-op without it; released when the job ends).
    /// Default true; `false` lets the cores sleep during jobs (less power, slower jobs).
    pub cpu_low_wake_latency: bool,
    /// On a CPU adapter (lavapipe), pin the driver's compute threads each to a core of its own
    /// (decode ~+8% on a 2-core VM: the scheduler otherwise often stacks two on one core at a
    /// dispatch's wake-up). Default true; `false` leaves them to the scheduler, e.g. where the
    /// node shares its cores with other busy work.
    pub cpu_pin_threads: bool,
}

impl Default for ExecutorSection {
    fn default() -> Self {
        ExecutorSection {
            cpu_low_wake_latency: true,
            cpu_pin_threads: true,
        }
    }
}

impl ExecutorSection {
    /// The executor's configuration for this section.
    pub fn exec_config(&self) -> crate::executor::ExecConfig {
        crate::executor::ExecConfig {
            cpu_low_wake_latency: self.cpu_low_wake_latency,
            cpu_pin_threads: self.cpu_pin_threads,
            ..crate::executor::ExecConfig::default()
        }
    }
}

/// `[models]`: models to hold warm from the start, so the first buyer of each uploads nothing.
///
/// ```toml
/// [models]
/// preload = ["/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf", "/srv/models/all-MiniLM-L6-v2"]
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsSection {
    /// GGUF files and sentence-transformers directories. Their weights are laid out as the
    /// buyers' compiler lays them out, so the blobs' ids match the jobs'.
    pub preload: Vec<PathBuf>,
}

impl Default for SiteConfig {
    fn default() -> Self {
        let any4 = |s: &str| s.parse::<Multiaddr>();
        SiteConfig {
            network: Network::main(),
            data_dir: None,
            listen: [
                format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
                format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
            ]
            .iter()
            .filter_map(|s| any4(s).ok())
            .collect(),
            bootstrap: Vec::new(),
            region: "unknown".into(),
            mdns: true,
            dht_server: false,
            units: 1,
            max_job_seconds: 3600,
            order_ttl_secs: DEFAULT_ORDER_TTL.as_secs(),
            settlement: vec![SettlementMethod::Ledger],
            gpus: Vec::new(),
            detect_gpu: true,
            detected: Vec::new(),
            pricing: Pricing::default(),
            settle: crate::settle::SettleSection::default(),
            cache: CacheSection::default(),
            models: ModelsSection::default(),
            executor: ExecutorSection::default(),
            metrics: MetricsSection::default(),
            dashboard: DashboardSection::default(),
        }
    }
}

/// Command-line overrides (each `Some`/non-empty value replaces the file's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--network`.
    pub network: Option<Network>,
    /// `--listen` (repeatable; replaces the file's list).
    pub listen: Vec<Multiaddr>,
    /// `--bootstrap` (repeatable; replaces the file's list).
    pub bootstrap: Vec<Multiaddr>,
    /// `--region`.
    pub region: Option<String>,
    /// `--price`: one flat price for every GPU (the file's rules and adjustments are dropped).
    pub price: Option<u64>,
    /// `--units`.
    pub units: Option<u32>,
    /// `--no-mdns`.
    pub no_mdns: bool,
    /// `--dht-server`.
    pub dht_server: bool,
    /// `--no-gpu`: do not detect or sell a local GPU (relay-only unless `[[gpus]]` are given).
    pub no_gpu: bool,
    /// `--metrics ADDR`.
    pub metrics: Option<std::net::SocketAddr>,
    /// `--dashboard ADDR`.
    pub dashboard: Option<std::net::SocketAddr>,
}

impl SiteConfig {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<SiteConfig, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Applies command-line overrides (flags > file > defaults).
    pub fn apply(mut self, o: Overrides) -> SiteConfig {
        if let Some(d) = o.data_dir {
            self.data_dir = Some(d);
        }
        if let Some(n) = o.network {
            self.network = n;
        }
        if !o.listen.is_empty() {
            self.listen = o.listen;
        }
        if !o.bootstrap.is_empty() {
            self.bootstrap = o.bootstrap;
        }
        if let Some(r) = o.region {
            self.region = r;
        }
        if let Some(p) = o.price {
            self.pricing = Pricing {
                default_price: p,
                ..Pricing::default()
            };
        }
        if let Some(u) = o.units {
            self.units = u;
        }
        if o.no_mdns {
            self.mdns = false;
        }
        if o.dht_server {
            self.dht_server = true;
        }
        if o.no_gpu {
            self.detect_gpu = false;
        }
        if let Some(a) = o.metrics {
            self.metrics.listen = Some(a);
        }
        if let Some(a) = o.dashboard {
            self.dashboard.listen = Some(a);
        }
        self
    }

    /// What a reload (SIGHUP) cannot change on a running node: the settings in `self` that
    /// differ from `running`'s, other than the pricing policy and `max_job_seconds`.
    pub fn needs_restart(&self, running: &SiteConfig) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                out.push(name);
            }
        };
        check("network", self.network != running.network);
        check("data_dir", self.data_dir != running.data_dir);
        check("listen", self.listen != running.listen);
        check("bootstrap", self.bootstrap != running.bootstrap);
        check("region", self.region != running.region);
        check("mdns", self.mdns != running.mdns);
        check("dht_server", self.dht_server != running.dht_server);
        check("units", self.units != running.units);
        check(
            "order_ttl_secs",
            self.order_ttl_secs != running.order_ttl_secs,
        );
        check("settlement", self.settlement != running.settlement);
        check("gpus", self.gpus != running.gpus);
        check("detect_gpu", self.detect_gpu != running.detect_gpu);
        check("settle", self.settle != running.settle);
        check("cache", self.cache != running.cache);
        check("models", self.models != running.models);
        check("metrics", self.metrics != running.metrics);
        check("dashboard", self.dashboard != running.dashboard);
        out
    }

    /// Checks values that TOML types cannot express.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.units == 0 {
            return bad("units must be at least 1".into());
        }
        if self.max_job_seconds == 0 {
            return bad("max_job_seconds must be at least 1".into());
        }
        if self.listen.is_empty() {
            return bad("no listen address: set `listen` or pass --listen".into());
        }
        for (region, pct) in &self.pricing.region_adjust_percent {
            if *pct < -100 {
                return bad(format!(
                    "pricing.region_adjust_percent.{region} = {pct}: at least -100"
                ));
            }
        }
        for g in &self.gpus {
            if g.name.is_empty() {
                return bad("every [[gpus]] entry needs a name".into());
            }
        }
        Ok(())
    }

    /// The GPUs this site sells: the declared `[[gpus]]`, else the detected adapters.
    pub fn gpu_profiles(&self) -> Vec<GpuProfile> {
        if self.gpus.is_empty() {
            self.detected.clone()
        } else {
            self.gpus.iter().map(GpuConfig::profile).collect()
        }
    }

    /// The asks this site offers: one per GPU, priced by the policy.
    pub fn asks(&self) -> Vec<AskSpec> {
        self.gpu_profiles()
            .into_iter()
            .map(|gpu| AskSpec {
                price: self.pricing.price_for(&gpu, &self.region),
                gpu,
                units: self.units,
                max_seconds: self.max_job_seconds,
            })
            .collect()
    }

    /// A node builder with these settings.
    pub fn builder(&self) -> NodeBuilder {
        let mut b = crate::Node::builder()
            .network(self.network.clone())
            .data_dir(
                self.data_dir
                    .clone()
                    .unwrap_or_else(crate::DataDir::default_root),
            )
            .region(self.region.clone())
            .mdns(self.mdns)
            .dht_server(self.dht_server)
            .units(
                self.units
                    .saturating_mul(u32::try_from(self.gpu_profiles().len()).unwrap_or(u32::MAX)),
            )
            .settlement(match self.settle.mode {
                crate::settle::SettleModeName::Onchain
                    if self.settlement == [SettlementMethod::Ledger] =>
                {
                    vec![SettlementMethod::Onchain]
                }
                crate::settle::SettleModeName::Lightning
                    if self.settlement == [SettlementMethod::Ledger] =>
                {
                    vec![SettlementMethod::Lightning]
                }
                _ => self.settlement.clone(),
            })
            .order_ttl(Duration::from_secs(self.order_ttl_secs))
            .input_cache(
                self.cache.disk_gib.saturating_mul(1 << 30),
                self.cache.memory_gib.saturating_mul(1 << 30),
            )
            .gpu_profiles(self.gpu_profiles());
        for a in &self.listen {
            b = b.listen(a.clone());
        }
        for a in &self.bootstrap {
            b = b.bootstrap(a.clone());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_prices() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/site.toml");
        let cfg = SiteConfig::load(&path).unwrap();
        cfg.check().unwrap();
        assert_eq!(cfg.region, "eu-north");
        let asks = cfg.asks();
        assert_eq!(asks.len(), 2);
        // H100 rule 500, eu-north -10% → 450.
        assert_eq!(asks[0].price, Msat(450));
    }

    #[test]
    fn flags_override_file_and_defaults() {
        let cfg: SiteConfig = toml::from_str("region = \"us-east\"\nunits = 2\n").unwrap();
        assert_eq!(cfg.network, Network::main());
        let cfg = cfg.apply(Overrides {
            region: Some("eu".into()),
            price: Some(7),
            no_mdns: true,
            ..Overrides::default()
        });
        assert_eq!((cfg.region.as_str(), cfg.units, cfg.mdns), ("eu", 2, false));
        assert_eq!(cfg.pricing.default_price, 7);
    }

    #[test]
    fn the_wake_up_latency_request_is_on_unless_the_executor_section_turns_it_off() {
        let cfg: SiteConfig = toml::from_str("region = \"x\"\n").unwrap();
        assert!(cfg.executor.exec_config().cpu_low_wake_latency);
        let cfg: SiteConfig = toml::from_str("[executor]\ncpu_low_wake_latency = false\n").unwrap();
        assert!(!cfg.executor.exec_config().cpu_low_wake_latency);
        assert!(toml::from_str::<SiteConfig>("[executor]\nwake = false\n").is_err());
    }

    #[test]
    fn driver_threads_are_pinned_unless_the_executor_section_says_not_to() {
        let cfg: SiteConfig = toml::from_str("region = \"x\"\n").unwrap();
        assert!(cfg.executor.exec_config().cpu_pin_threads);
        let cfg: SiteConfig = toml::from_str("[executor]\ncpu_pin_threads = false\n").unwrap();
        let exec = cfg.executor.exec_config();
        assert!(!exec.cpu_pin_threads);
        assert!(exec.cpu_low_wake_latency, "the other key keeps its default");
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<SiteConfig>("regoin = \"x\"").is_err());
    }

    #[test]
    fn region_adjustment_rounds_down_and_never_reaches_zero() {
        let mut p = Pricing::default();
        p.region_adjust_percent.insert("x".into(), -100);
        let gpu = GpuConfig {
            name: "a".into(),
            ..GpuConfig::default()
        }
        .profile();
        assert_eq!(p.price_for(&gpu, "x"), Msat(1));
        assert_eq!(p.price_for(&gpu, "y"), Msat(100));
    }
}
