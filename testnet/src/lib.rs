//! # hashgrid-testnet
//!
//! Launches N real `hashgrid-node run` processes (not threads) across R regions on one
//! machine, each with its own data dir and loopback port; starts B buyers (in-process
//! library nodes, what an integrator embeds) that submit J jobs drawn from the reference
//! kernels; optionally SIGKILLs and restarts sites during the run; then stops everything and
//! writes a report: book convergence, gossip propagation, match and submit → receipt
//! latency, job outcomes, receipts verified against every provider's audited chain,
//! settlement totals per buyer and provider (which must add up), and peak RSS per site.
//!
//! Settlement here is the ledger view: countersigned receipts are the IOUs, summed per
//! counterparty on both sides (BTC settlement is issue 8).

pub mod chat;
pub mod http;
pub mod lightning;
pub mod netns;
pub mod report;
pub mod sites;

use hashgrid_node::jobs::IntoSharedInputs;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_node::jobs::{JobOptions, JobState, Submission};
use hashgrid_node::{Node, NodeEvent, NodeHandle, OrderKind};
use hashgrid_protocol::{JobLimits, LoadedJob, Network, PublicKey, Timestamp, load_job_file};
use tracing::{info, warn};

pub use report::Report;
use sites::{Site, SiteSpec};

/// Region names, assigned round-robin.
pub const REGIONS: [&str; 8] = [
    "us-east",
    "eu-north",
    "asia-east",
    "sa-east",
    "us-west",
    "eu-west",
    "asia-south",
    "af-south",
];

/// The reference kernels the workload draws from.
pub const KERNELS: [&str; 5] = ["saxpy", "matmul", "reduce", "softmax", "mix"];

/// How often sites are killed when `kill_rate` > 0.
pub const KILL_INTERVAL: Duration = Duration::from_secs(5);

/// Share of `duration` over which job submissions are spread (the rest lets the last finish).
pub const SUBMIT_SPREAD: f64 = 0.75;

/// How long after `duration` unfinished jobs are still waited for before they count as failed.
pub const GRACE: Duration = Duration::from_secs(60);

/// How long a killed site stays down before it is restarted.
pub const RESTART_AFTER: Duration = Duration::from_secs(1);

/// Sites each buyer dials besides site 0.
pub const BUYER_DIALS: usize = 5;

/// How long the testnet waits for every book to hold every ask.
pub const CONVERGENCE_LIMIT: Duration = Duration::from_secs(60);

/// The testnet's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Provider sites (processes).
    pub sites: usize,
    /// Regions the sites are spread over.
    pub regions: usize,
    /// Buyers (in-process nodes).
    pub buyers: usize,
    /// Jobs in total, spread over the buyers.
    pub jobs: usize,
    /// Length of the workload: submissions are spread over its first [`SUBMIT_SPREAD`]; jobs
    /// not finished [`GRACE`] after it count as failed.
    pub duration: Duration,
    /// Wait after convergence before the workload and the kills start.
    pub settle: Duration,
    /// Fraction of the sites SIGKILLed (and restarted after [`RESTART_AFTER`]) every
    /// [`KILL_INTERVAL`]; at least one per interval when above zero.
    pub kill_rate: f64,
    /// Requested inter-region latency (see [`latency_support`]).
    pub latency_ms: u64,
    /// The `hashgrid-node` binary.
    pub node_binary: PathBuf,
    /// Where site data dirs go (a temporary dir when `None`).
    pub work_dir: Option<PathBuf>,
    /// When set, every site serves Prometheus metrics and a scrape config for them is
    /// written to this file.
    pub prometheus: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sites: 8,
            regions: 2,
            buyers: 2,
            jobs: 20,
            duration: Duration::from_secs(60),
            settle: Duration::ZERO,
            kill_rate: 0.0,
            latency_ms: 0,
            node_binary: PathBuf::from("hashgrid-node"),
            work_dir: None,
            prometheus: None,
        }
    }
}

/// Whether `--latency-ms` can be honoured here (root and iproute2), and why not.
pub fn latency_support() -> Result<(), String> {
    netns::supported()
}

pub(crate) fn rng_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return Timestamp::now().0 | 1;
    }
    u64::from_le_bytes(b) | 1
}

/// A small xorshift generator (workload choices, kill victims; not for keys).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One job's outcome, as the buyer saw it.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// The kernel.
    pub kernel: String,
    /// Whether it finished with verified outputs and a countersigned receipt.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Providers tried beyond the first.
    pub retries: usize,
    /// Submit → agreement, ms.
    pub match_ms: Option<f64>,
    /// Submit → the buyer's task started matching, ms.
    pub matching_ms: Option<f64>,
    /// The job's attempts: each provider proposed to or tried, and what came of it.
    pub attempts: Vec<String>,
    /// Submit → countersigned receipt, ms.
    pub total_ms: f64,
    /// GPU time from the receipt, ms.
    pub gpu_ms: f64,
    /// The receipt's id, provider and charge.
    pub receipt: Option<(hashgrid_protocol::ContentId, PublicKey, u64)>,
    /// Whether the receipt verified offline (signatures and stored outputs).
    pub verified: bool,
    /// The buyer.
    pub buyer: PublicKey,
}

fn load_kernels() -> anyhow::Result<Vec<(String, LoadedJob)>> {
    KERNELS
        .iter()
        .map(|k| {
            let p = hashgrid_examples::kernels_dir().join(k).join("job.toml");
            load_job_file(&p, &JobLimits::default())
                .map(|j| (k.to_string(), j))
                .with_context(|| format!("loading {}", p.display()))
        })
        .collect()
}

/// Stops every site on Ctrl-C as on any other exit: sites are dropped (killed) with the
/// returned value or the error.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    if cfg.sites == 0 || cfg.regions == 0 || cfg.buyers == 0 {
        bail!("--sites, --regions and --buyers must be at least 1");
    }
    if cfg.regions > REGIONS.len() {
        bail!("at most {} regions", REGIONS.len());
    }
    if !(0.0..=1.0).contains(&cfg.kill_rate) {
        bail!("--kill-rate is a fraction of the sites, between 0 and 1");
    }
    let tag = format!("{:04x}", rng_seed() % 0xffff);
    let (regions, latency_note) = if cfg.latency_ms > 0 {
        match netns::Regions::setup(&tag, cfg.regions, cfg.latency_ms) {
            Ok(r) => {
                info!(
                    latency_ms = cfg.latency_ms,
                    "one network namespace per region, netem delay between them"
                );
                (Some(r), None)
            }
            Err(why) => {
                warn!(
                    "--latency-ms {}: no network namespaces with netem ({why}); delaying in user space instead",
                    cfg.latency_ms
                );
                (None, Some(why))
            }
        }
    } else {
        (None, None)
    };
    let kernels = load_kernels()?;
    let tmp;
    let work: PathBuf = match &cfg.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("hashgrid-testnet")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let network_name = format!("testnet-{:x}", rng_seed() % 0xffff_ffff);
    let network = Network::new(&network_name)?;
    let mut rng = Rng(rng_seed());

    // Identities, ports, prices.
    let mut specs = Vec::new();
    for i in 0..cfg.sites {
        let data_dir = work.join(format!("site-{i:02}"));
        std::fs::create_dir_all(&data_dir)?;
        let peer_id = sites::create_identity(&cfg.node_binary, &data_dir)?;
        let region = i % cfg.regions;
        let (ip, ns, port) = match &regions {
            Some(r) => (
                r.add_site(region, i).map_err(anyhow::Error::msg)?,
                Some(r.ns(region)),
                4001,
            ),
            None => ("127.0.0.1".to_string(), None, sites::free_port()?),
        };
        specs.push(SiteSpec {
            index: i,
            region: REGIONS[region].to_string(),
            price: 50 + (i as u64 * 37) % 100,
            units: 1 + (i % 3) as u32,
            data_dir,
            ip,
            ns,
            port,
            peer_id,
            metrics_port: match &cfg.prometheus {
                Some(_) => Some(sites::free_port()?),
                None => None,
            },
            config: None,
            env: Vec::new(),
        });
    }
    // Without network namespaces (no root or no netem), the latency between regions is
    // emulated in the nodes' transport: each holds back the bytes of the connections it dials
    // to a site of another region by `latency_ms` each way.
    let link_delay =
        (regions.is_none() && cfg.latency_ms > 0).then(|| Duration::from_millis(cfg.latency_ms));
    // The buyers listen on ports chosen now, so that a site dialling a buyer of another
    // region is delayed too (buyer j is in region j mod R).
    let buyer_ports: Vec<u16> = (0..cfg.buyers)
        .map(|_| sites::free_port())
        .collect::<anyhow::Result<_>>()?;
    let buyer_region = |j: usize| REGIONS[j % cfg.regions].to_string();
    if let Some(d) = link_delay {
        let mut all: Vec<(String, std::net::SocketAddr)> = specs
            .iter()
            .map(|s| Ok((s.region.clone(), format!("{}:{}", s.ip, s.port).parse()?)))
            .collect::<anyhow::Result<_>>()?;
        for (j, p) in buyer_ports.iter().enumerate() {
            all.push((buyer_region(j), ([127, 0, 0, 1], *p).into()));
        }
        for s in &mut specs {
            let list: Vec<String> = all
                .iter()
                .filter(|(region, _)| *region != s.region)
                .map(|(_, a)| format!("{a}={}", d.as_millis()))
                .collect();
            s.env.push((
                hashgrid_node::network::delay::LINK_DELAYS_ENV.to_string(),
                list.join(","),
            ));
        }
        info!(
            latency_ms = cfg.latency_ms,
            "user-space link delay between regions (dialled connections held back each way)"
        );
    }
    let buyer_delays = |j: usize| {
        let region = buyer_region(j);
        hashgrid_node::network::delay::LinkDelays::new(
            specs
                .iter()
                .filter(|s| link_delay.is_some() && s.region != region)
                .filter_map(|s| {
                    let a = format!("{}:{}", s.ip, s.port).parse().ok()?;
                    Some((a, link_delay.unwrap_or_default()))
                }),
        )
    };
    if let Some(path) = &cfg.prometheus {
        std::fs::write(path, sites::prometheus_config(&specs, &network_name))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("prometheus scrape config for the sites: {}", path.display());
    }

    // Site 0 first: it benchmarks this machine's adapter once; the others reuse its cache
    // (same machine, same adapter) instead of benchmarking 40 times.
    let started = Instant::now();
    let seed_addr = specs[0].addr();
    let mut running: Vec<Site> = Vec::new();
    running.push(Site::start(
        &cfg.node_binary,
        specs[0].clone(),
        &network_name,
        Vec::new(),
    )?);
    let cache = specs[0].data_dir.join("bench-cache.json");
    let t = Instant::now();
    while !cache.exists() {
        if !running[0].running() {
            // Quote the log: a temporary work dir is gone once we return.
            let log =
                std::fs::read_to_string(specs[0].data_dir.join("node.log")).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("XDG_RUNTIME_DIR"))
                .collect();
            bail!(
                "site 0 (hashgrid-node run) exited at start:\n{}",
                tail[tail.len().saturating_sub(10)..].join("\n")
            );
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("site 0 did not benchmark its GPU within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Buyers join through site 0 and watch their books fill.
    let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let mut buyers = Vec::new();
    for (j, port) in buyer_ports.iter().enumerate() {
        let b = Node::builder()
            .network(network.clone())
            .listen(format!("/ip4/127.0.0.1/tcp/{port}").parse()?)
            .link_delays(buyer_delays(j))
            .mdns(false)
            .bootstrap(seed_addr.parse()?)
            .provider_down_for(Duration::from_secs(5))
            .start()
            .await?;
        spawn_arrival_watch(&b, arrivals.clone());
        buyers.push(b);
    }

    for spec in specs.iter().skip(1) {
        std::fs::copy(&cache, spec.data_dir.join("bench-cache.json"))?;
        // Up to three earlier sites, chosen at random: a mesh-friendly random graph rather
        // than a star around site 0 (a real site lists a few bootstrap peers).
        let mut boot: Vec<String> = Vec::new();
        for _ in 0..3 {
            let a = specs[rng.below(spec.index)].addr();
            if !boot.contains(&a) {
                boot.push(a);
            }
        }
        running.push(Site::start(
            &cfg.node_binary,
            spec.clone(),
            &network_name,
            boot,
        )?);
    }
    // Each buyer also dials a few sites, as a real buyer configures several bootstrap peers.
    for b in &buyers {
        for _ in 0..BUYER_DIALS.min(cfg.sites) {
            let _ = b
                .peers()
                .dial(specs[rng.below(cfg.sites)].addr().parse()?)
                .await;
        }
    }
    let launched = started.elapsed();
    info!(sites = cfg.sites, ?launched, "sites launched");

    // Convergence: every buyer's book holds one ask per site.
    let t = Instant::now();
    let convergence = loop {
        let mut all = true;
        for b in &buyers {
            let book = b.market().book().await?;
            let owners: std::collections::HashSet<PublicKey> =
                book.asks.iter().map(|a| a.provider).collect();
            if owners.len() < cfg.sites {
                all = false;
                break;
            }
        }
        if all {
            break started.elapsed();
        }
        if t.elapsed() > CONVERGENCE_LIMIT {
            bail!("books did not converge within {CONVERGENCE_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let convergence_after_launch = convergence.saturating_sub(launched);
    let converged_at = Timestamp::now().0;
    // When each site's first ask was signed (the earliest version any buyer saw), and so the
    // last of them: convergence counted from there is propagation only, without start-up.
    let last_signed = {
        let a = arrivals.lock().map(|a| a.clone()).unwrap_or_default();
        let mut first: HashMap<PublicKey, u64> = HashMap::new();
        for x in &a {
            let e = first.entry(x.provider).or_insert(x.created_at);
            *e = (*e).min(x.created_at);
        }
        first.values().copied().max().unwrap_or(converged_at)
    };
    let convergence_after_last_ask =
        Duration::from_millis(converged_at.saturating_sub(last_signed));
    info!(?convergence, "every book holds every ask");
    if !cfg.settle.is_zero() {
        info!(settle = ?cfg.settle, "letting the sites settle before the workload");
        tokio::time::sleep(cfg.settle).await;
    }

    // The workload, with the killer alongside.
    let stop_killing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sites = Arc::new(tokio::sync::Mutex::new(running));
    let killer = (cfg.kill_rate > 0.0).then(|| {
        tokio::spawn(kill_loop(
            sites.clone(),
            cfg.kill_rate,
            stop_killing.clone(),
            Rng(rng_seed()),
        ))
    });
    let workload_start = Instant::now();
    let deadline = workload_start + cfg.duration + GRACE;
    let spacing = cfg.duration.mul_f64(SUBMIT_SPREAD) / u32::try_from(cfg.jobs.max(1))?;
    let mut tasks = Vec::new();
    for j in 0..cfg.jobs {
        let b = buyers[j % cfg.buyers].clone();
        let (name, job) = kernels[rng.below(kernels.len())].clone();
        // Half the jobs want a particular region (buyers care where their data goes).
        let region = (rng.below(2) == 0).then(|| REGIONS[rng.below(cfg.regions)].to_string());
        let at = workload_start + spacing * u32::try_from(j)?;
        let network = network.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            run_one(&b, name, job, region, &network, deadline).await
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await?);
    }
    stop_killing.store(true, std::sync::atomic::Ordering::SeqCst);
    let kills = match killer {
        Some(k) => k.await??,
        None => 0,
    };

    // Stop everything; then audit every provider's chain from its store.
    let buyer_stalls: Vec<(u64, u64)> = buyers
        .iter()
        .map(|b| {
            let lag = b.ops().loop_lag();
            (lag.max.as_millis() as u64, lag.p99.as_millis() as u64)
        })
        .collect();
    for b in &buyers {
        b.shutdown().await;
    }
    let mut sites = Arc::try_unwrap(sites)
        .map_err(|_| anyhow::anyhow!("the kill task still holds the sites"))?
        .into_inner();
    let mut site_reports = Vec::new();
    for s in &mut sites {
        let clean = s.stop()?;
        let chain = audit_site(&cfg.node_binary, &s.spec.data_dir, &network_name);
        site_reports.push(report::SiteReport {
            index: s.spec.index,
            region: s.spec.region.clone(),
            price_msat: s.spec.price,
            units: s.spec.units,
            kills: s.kills,
            peak_rss_kib: s.peak_rss_kib,
            clean_exit: clean,
            swarm_stall_ms: swarm_stalls(&s.spec.data_dir.join("node.log")),
            chain,
            provider: String::new(),
        });
    }
    let leftover = sites.iter_mut().map(|s| s.running()).filter(|r| *r).count();
    let arrivals: Vec<f64> = arrivals
        .lock()
        .map(|a| a.iter().map(|x| x.delay_ms).collect())
        .unwrap_or_default();
    let keys = site_keys(&sites);
    drop(sites);
    Ok(report::build(report::Inputs {
        cfg: &cfg,
        network: network_name,
        convergence,
        convergence_after_launch,
        convergence_after_last_ask,
        arrivals,
        outcomes,
        sites: site_reports,
        buyer_stalls,
        keys,
        kills,
        leftover,
        latency_note,
        latency_user_space: link_delay.is_some(),
        work_dir: cfg.work_dir.clone(),
    }))
}

/// The provider key of each site (from its identity file), by index.
fn site_keys(sites: &[Site]) -> HashMap<usize, PublicKey> {
    sites
        .iter()
        .filter_map(|s| {
            let dir = hashgrid_node::DataDir::new(&s.spec.data_dir);
            Some((s.spec.index, dir.load_or_create_identity().ok()?.public()))
        })
        .collect()
}

/// `hashgrid-node receipts --json` on a stopped site.
pub(crate) fn audit_site(
    binary: &Path,
    dir: &Path,
    network: &str,
) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(binary)
        .arg("--data-dir")
        .arg(dir)
        .args(["receipts", "--network", network, "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// An ask arriving in a buyer's book for the first time.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    provider: PublicKey,
    created_at: u64,
    delay_ms: f64,
}

/// Records, for each ask a buyer learns of, how long after its signing it arrived.
fn spawn_arrival_watch(node: &NodeHandle, into: Arc<Mutex<Vec<Arrival>>>) {
    let mut events = node.events();
    let node = node.clone();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(NodeEvent::OrderAdded {
                    kind: OrderKind::Ask,
                    order,
                }) => {
                    let now = Timestamp::now().0;
                    let Ok(book) = node.market().book().await else {
                        return;
                    };
                    if let Some(a) = book.asks.iter().find(|a| a.order_ref() == order)
                        && let Ok(mut v) = into.lock()
                    {
                        v.push(Arrival {
                            provider: a.provider,
                            created_at: a.created_at.0,
                            delay_ms: now.saturating_sub(a.created_at.0) as f64,
                        });
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    });
}

async fn kill_loop(
    sites: Arc<tokio::sync::Mutex<Vec<Site>>>,
    rate: f64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    mut rng: Rng,
) -> anyhow::Result<u32> {
    let mut kills = 0u32;
    loop {
        let t = Instant::now();
        while t.elapsed() < KILL_INTERVAL {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(kills);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut guard = sites.lock().await;
        let n = guard.len();
        let victims = ((rate * n as f64).round() as usize).clamp(1, n);
        let mut chosen = Vec::new();
        while chosen.len() < victims {
            let i = rng.below(n);
            if !chosen.contains(&i) {
                chosen.push(i);
            }
        }
        for &i in &chosen {
            info!(site = i, "SIGKILL");
            guard[i].kill()?;
            kills += 1;
        }
        drop(guard);
        tokio::time::sleep(RESTART_AFTER).await;
        let mut guard = sites.lock().await;
        for &i in &chosen {
            guard[i].restart()?;
        }
    }
}

async fn run_one(
    node: &NodeHandle,
    kernel: String,
    job: LoadedJob,
    region: Option<String>,
    network: &Network,
    deadline: Instant,
) -> JobOutcome {
    let mut o = JobOutcome {
        kernel,
        ok: false,
        error: None,
        retries: 0,
        match_ms: None,
        matching_ms: None,
        attempts: Vec::new(),
        total_ms: 0.0,
        gpu_ms: 0.0,
        receipt: None,
        verified: false,
        buyer: node.public_key(),
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        o.error = Some("the run's deadline passed before it started".into());
        return o;
    }
    let mut events = node.events();
    let t = Instant::now();
    let sub = Submission {
        spec: job.spec,
        inputs: job.inputs.into_shared(),
        options: JobOptions {
            max_attempts: 8,
            requirements: hashgrid_protocol::Requirements {
                regions: region.into_iter().collect(),
                ..Default::default()
            },
            ..JobOptions::default()
        },
    };
    let id = match node.jobs().submit(sub).await {
        Ok(id) => id,
        Err(e) => {
            o.error = Some(e.to_string());
            return o;
        }
    };
    let wait = async {
        loop {
            match events.recv().await {
                Ok(NodeEvent::Job(u)) if u.job == id => {
                    if u.state == JobState::Matching && o.matching_ms.is_none() {
                        o.matching_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    if u.state == JobState::Agreed && o.match_ms.is_none() {
                        o.match_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    if u.state.is_terminal() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if node
                        .jobs()
                        .get(&id)
                        .ok()
                        .flatten()
                        .is_some_and(|r| r.state.is_terminal())
                    {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    };
    if tokio::time::timeout(left, wait).await.is_err() {
        let _ = node.jobs().cancel(&id);
        o.error = Some("not finished within --duration plus the grace period".into());
        return o;
    }
    o.total_ms = t.elapsed().as_secs_f64() * 1000.0;
    let rec = match node.jobs().get(&id) {
        Ok(Some(r)) => r,
        other => {
            o.error = Some(format!("record: {other:?}"));
            return o;
        }
    };
    o.attempts = rec
        .attempts
        .iter()
        .map(|a| format!("{}: {}", a.provider.short(), a.outcome))
        .collect();
    o.retries = rec
        .attempts
        .iter()
        .filter(|a| a.agreement.is_some())
        .count()
        .saturating_sub(1);
    if let JobState::Failed { reason, .. } = &rec.state {
        o.error = Some(reason.clone());
        return o;
    }
    let Some(cs) = rec.receipt.clone() else {
        o.error = Some("done without a receipt".into());
        return o;
    };
    // Offline verification: signatures, then the stored outputs against the receipt.
    let verified = cs.verify(network).ok().and_then(|r| {
        let res = node.jobs().result(&id).ok().flatten()?;
        hashgrid_protocol::check_outputs(&r, &res.outputs)
            .ok()
            .map(|()| r)
    });
    if let Some(r) = verified {
        o.gpu_ms = r.gpu_time_us as f64 / 1000.0;
        o.receipt = Some((cs.id(), r.provider, r.charge.0));
        o.verified = true;
        o.ok = true;
    } else {
        o.error = Some("the receipt did not verify offline".into());
    }
    o
}

/// Writes the JSON report and the SVG chart next to it (`FILE` and `FILE` with `.svg`).
pub fn write_report(report: &Report, json: &Path) -> anyhow::Result<PathBuf> {
    if let Some(dir) = json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let svg = json.with_extension("svg");
    std::fs::write(&svg, report::svg(report))
        .with_context(|| format!("writing {}", svg.display()))?;
    Ok(svg)
}

/// Sums per key.
pub(crate) fn sum_by<K: Ord + Clone>(items: impl Iterator<Item = (K, u64)>) -> BTreeMap<K, u64> {
    let mut m = BTreeMap::new();
    for (k, v) in items {
        *m.entry(k).or_insert(0u64) += v;
    }
    m
}

/// The swarm task's longest stall and p99 lag (ms) from the line a node logs when it stops
/// (`node stopped (swarm task stalls)` with `longest_ms=` and `p99_ms=` fields).
fn swarm_stalls(log: &std::path::Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("swarm task stalls"))?;
    let field = |name: &str| -> Option<u64> {
        let rest = &line[line.find(name)? + name.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    Some((field("longest_ms=")?, field("p99_ms=")?))
}

#[cfg(test)]
mod stall_tests {
    #[test]
    fn the_stall_line_of_a_site_log_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node.log");
        std::fs::write(
            &log,
            "2026-12-02T21:00:00Z  INFO node{peer=abc}: hashgrid_node::node::run: listening\n\
             2026-12-02T21:01:00Z  INFO node{peer=abc}: hashgrid_node::node::run: node stopped \
             (swarm task stalls) samples=1200 longest_ms=84 p99_ms=5\n",
        )
        .unwrap();
        assert_eq!(super::swarm_stalls(&log), Some((84, 5)));
        std::fs::write(&log, "killed before it could log\n").unwrap();
        assert_eq!(super::swarm_stalls(&log), None);
    }
}
