//! The testnet's report: JSON for machines, a summary for people, an SVG latency chart.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use hashgrid_protocol::PublicKey;
use serde::Serialize;

use crate::{Config, JobOutcome, sum_by};

/// p50/p95/p99 of a sample, in ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Dist {
    /// The distribution of `v`.
    pub fn of(mut v: Vec<f64>) -> Dist {
        v.sort_by(f64::total_cmp);
        Dist {
            n: v.len(),
            p50: pct(&v, 0.5),
            p95: pct(&v, 0.95),
            p99: pct(&v, 0.99),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// One site at the end of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SiteReport {
    /// Index.
    pub index: usize,
    /// Its provider key.
    pub provider: String,
    /// Region.
    pub region: String,
    /// Price, msat per GPU-second.
    pub price_msat: u64,
    /// Units offered.
    pub units: u32,
    /// Times it was SIGKILLed (and restarted).
    pub kills: u32,
    /// Peak RSS (VmHWM) of its last incarnation seen, KiB.
    pub peak_rss_kib: u64,
    /// Whether it exited cleanly on SIGTERM at the end.
    pub clean_exit: bool,
    /// Its swarm task's longest stall and p99 lag in ms over its last incarnation, from the
    /// line the node logs when it stops (`None` if it did not log one).
    pub swarm_stall_ms: Option<(u64, u64)>,
    /// `hashgrid-node receipts --json` on its store (its audited receipt chain), or why not.
    pub chain: Result<serde_json::Value, String>,
}

/// Ledger settlement: countersigned receipts summed per counterparty on both sides.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Settlement {
    /// msat each buyer owes (its countersigned receipts).
    pub buyers: BTreeMap<String, u64>,
    /// msat each provider is owed by buyers' countersigned receipts.
    pub providers: BTreeMap<String, u64>,
    /// Sum over buyers.
    pub buyers_total_msat: u64,
    /// Sum over providers.
    pub providers_total_msat: u64,
    /// Both sums are equal and every buyer-held receipt is in its provider's audited chain.
    pub balanced: bool,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The private network's name.
    pub network: String,
    /// Sites.
    pub sites: usize,
    /// Regions.
    pub regions: usize,
    /// Buyers.
    pub buyers: usize,
    /// Jobs requested.
    pub jobs_requested: usize,
    /// Kill rate.
    pub kill_rate: f64,
    /// Seconds the sites were left to settle between convergence and the workload.
    pub settle_s: u64,
    /// Requested inter-region latency, and why it was not applied.
    pub latency_ms: u64,
    /// Why network namespaces with netem could not apply `latency_ms`, if it was requested.
    pub latency_note: Option<String>,
    /// `latency_ms` was applied in user space instead (the nodes' transport holds back the
    /// bytes of connections they dial to another region).
    pub latency_user_space: bool,
    /// From the first site's spawn until every buyer's book held every site's ask, ms.
    pub convergence_ms: f64,
    /// The same, counted from the last site's spawn, ms.
    pub convergence_after_launch_ms: f64,
    /// The same, counted from when the last site signed its first ask (propagation only), ms.
    pub convergence_after_last_ask_ms: f64,
    /// Ask signed → in a buyer's book, ms (every ask at every buyer).
    pub gossip_propagation_ms: Dist,
    /// Submit → agreement signed, ms.
    pub match_ms: Dist,
    /// The five jobs slowest to match, slowest first: where their time went.
    pub slowest_matches: Vec<SlowMatch>,
    /// Submit → verified, countersigned receipt, ms.
    pub submit_to_receipt_ms: Dist,
    /// The same minus the provider's GPU time from the receipt, ms.
    pub overhead_ms: Dist,
    /// Jobs that succeeded.
    pub jobs_ok: usize,
    /// Jobs that failed.
    pub jobs_failed: usize,
    /// Jobs that needed another provider.
    pub jobs_retried: usize,
    /// Why jobs failed (kernel: reason).
    pub failures: Vec<String>,
    /// Receipts the buyers hold.
    pub receipts_held: usize,
    /// Of those, verified offline (signatures and outputs).
    pub receipts_verified: usize,
    /// Of those, found in their provider's audited chain after the run (none lost).
    pub receipts_in_provider_chains: usize,
    /// Sites whose receipt chain audits clean.
    pub chains_intact: usize,
    /// SIGKILLs during the run (each followed by a restart).
    pub kills: u32,
    /// Settlement totals.
    pub settlement: Settlement,
    /// Per-site figures.
    pub site_reports: Vec<SiteReport>,
    /// Largest peak RSS of any site, KiB.
    pub max_peak_rss_kib: u64,
    /// The longest swarm-task stall of any site, ms, and the largest p99 lag (from the sites'
    /// logs at exit).
    pub max_swarm_stall_ms: Option<(u64, u64)>,
    /// Each in-process buyer's swarm-task stalls: (longest, p99 lag), ms.
    pub buyer_swarm_stall_ms: Vec<(u64, u64)>,
    /// No site process is left running.
    pub no_processes_left: bool,
    /// Every job succeeded, every receipt verified and is in its chain, every chain is intact,
    /// settlement balances and no process is left.
    pub all_ok: bool,
    /// Where the sites' data dirs and logs are (kept only with --work-dir).
    pub work_dir: Option<PathBuf>,
    /// Submit → receipt of each successful job, ms (for the chart).
    pub latencies_ms: Vec<f64>,
}

pub(crate) struct Inputs<'a> {
    pub(crate) cfg: &'a Config,
    pub(crate) network: String,
    pub(crate) convergence: Duration,
    pub(crate) convergence_after_launch: Duration,
    pub(crate) convergence_after_last_ask: Duration,
    pub(crate) arrivals: Vec<f64>,
    pub(crate) outcomes: Vec<JobOutcome>,
    pub(crate) sites: Vec<SiteReport>,
    pub(crate) buyer_stalls: Vec<(u64, u64)>,
    pub(crate) keys: HashMap<usize, PublicKey>,
    pub(crate) kills: u32,
    pub(crate) leftover: usize,
    pub(crate) latency_note: Option<String>,
    pub(crate) latency_user_space: bool,
    pub(crate) work_dir: Option<PathBuf>,
}

pub(crate) fn build(i: Inputs<'_>) -> Report {
    let mut sites = i.sites;
    for s in &mut sites {
        s.provider = i
            .keys
            .get(&s.index)
            .map(|k| k.to_string())
            .unwrap_or_default();
    }
    let ok: Vec<&JobOutcome> = i.outcomes.iter().filter(|o| o.ok).collect();
    let chain_ids: HashMap<String, Vec<String>> = sites
        .iter()
        .filter_map(|s| {
            let c = s.chain.as_ref().ok()?;
            let ids = c["receipt_ids"]
                .as_array()?
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            Some((s.provider.clone(), ids))
        })
        .collect();
    let receipts: Vec<_> = i
        .outcomes
        .iter()
        .filter_map(|o| o.receipt.map(|r| (o, r)))
        .collect();
    let in_chain = receipts
        .iter()
        .filter(|(_, (id, p, _))| {
            chain_ids
                .get(&p.to_string())
                .is_some_and(|ids| ids.contains(&id.to_string()))
        })
        .count();
    let buyers = sum_by(
        receipts
            .iter()
            .map(|(o, (_, _, c))| (o.buyer.to_string(), *c)),
    );
    let providers = sum_by(receipts.iter().map(|(_, (_, p, c))| (p.to_string(), *c)));
    let bt: u64 = buyers.values().sum();
    let pt: u64 = providers.values().sum();
    let settlement = Settlement {
        balanced: bt == pt && in_chain == receipts.len(),
        buyers,
        providers,
        buyers_total_msat: bt,
        providers_total_msat: pt,
    };
    let chains_intact = sites.iter().filter(|s| s.chain.is_ok()).count();
    let verified = i.outcomes.iter().filter(|o| o.verified).count();
    let latencies: Vec<f64> = ok.iter().map(|o| o.total_ms).collect();
    let failures: Vec<String> = i
        .outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| format!("{}: {}", o.kernel, o.error.clone().unwrap_or_default()))
        .collect();
    let jobs_ok = ok.len();
    let all_ok = jobs_ok == i.cfg.jobs
        && verified == receipts.len()
        && in_chain == receipts.len()
        && chains_intact == sites.len()
        && settlement.balanced
        && i.leftover == 0;
    Report {
        network: i.network,
        sites: i.cfg.sites,
        regions: i.cfg.regions,
        buyers: i.cfg.buyers,
        jobs_requested: i.cfg.jobs,
        kill_rate: i.cfg.kill_rate,
        settle_s: i.cfg.settle.as_secs(),
        latency_ms: i.cfg.latency_ms,
        latency_note: i.latency_note,
        latency_user_space: i.latency_user_space,
        convergence_ms: i.convergence.as_secs_f64() * 1000.0,
        convergence_after_launch_ms: i.convergence_after_launch.as_secs_f64() * 1000.0,
        convergence_after_last_ask_ms: i.convergence_after_last_ask.as_secs_f64() * 1000.0,
        gossip_propagation_ms: Dist::of(i.arrivals),
        match_ms: Dist::of(ok.iter().filter_map(|o| o.match_ms).collect()),
        slowest_matches: slowest_matches(&i.outcomes, 5),
        submit_to_receipt_ms: Dist::of(latencies.clone()),
        overhead_ms: Dist::of(ok.iter().map(|o| o.total_ms - o.gpu_ms).collect()),
        jobs_ok,
        jobs_failed: i.outcomes.len() - jobs_ok + i.cfg.jobs.saturating_sub(i.outcomes.len()),
        jobs_retried: i.outcomes.iter().filter(|o| o.retries > 0).count(),
        failures,
        receipts_held: receipts.len(),
        receipts_verified: verified,
        receipts_in_provider_chains: in_chain,
        chains_intact,
        kills: i.kills,
        max_peak_rss_kib: sites.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0),
        max_swarm_stall_ms: sites
            .iter()
            .filter_map(|s| s.swarm_stall_ms)
            .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1))),
        settlement,
        buyer_swarm_stall_ms: i.buyer_stalls,
        site_reports: sites,
        no_processes_left: i.leftover == 0,
        all_ok,
        work_dir: i.work_dir,
        latencies_ms: latencies,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |d: &Dist| format!("p50 {:.1} ms, p99 {:.1} ms (n={})", d.p50, d.p99, d.n);
        writeln!(
            f,
            "hashgrid testnet {}: {} sites in {} regions, {} buyers, {} jobs, kill rate {}{}",
            self.network,
            self.sites,
            self.regions,
            self.buyers,
            self.jobs_requested,
            self.kill_rate,
            if self.settle_s > 0 {
                format!(", workload {} s after convergence", self.settle_s)
            } else {
                String::new()
            }
        )?;
        if self.latency_user_space {
            writeln!(
                f,
                "  latency              {} ms each way between regions (user-space delay on dialled connections; netem: {})",
                self.latency_ms,
                self.latency_note.as_deref().unwrap_or("not tried")
            )?;
        } else if let Some(n) = &self.latency_note {
            writeln!(f, "  latency: not applied: {n}")?;
        } else if self.latency_ms > 0 {
            writeln!(
                f,
                "  latency              {} ms between regions (a network namespace per region, netem)",
                self.latency_ms
            )?;
        }
        writeln!(
            f,
            "  book convergence     {:.0} ms after the last site signed its ask ({:.0} ms from the first spawn, on {} sites starting at once)",
            self.convergence_after_last_ask_ms, self.convergence_ms, self.sites
        )?;
        writeln!(
            f,
            "  gossip propagation   p50 {:.1} ms, p95 {:.1} ms (n={})",
            self.gossip_propagation_ms.p50,
            self.gossip_propagation_ms.p95,
            self.gossip_propagation_ms.n
        )?;
        writeln!(f, "  match                {}", d(&self.match_ms))?;
        for s in self.slowest_matches.iter().filter(|s| s.match_ms >= 1000.0) {
            writeln!(
                f,
                "    slow: {:.0} ms (matching from {:.0} ms); {}",
                s.match_ms,
                s.matching_ms.unwrap_or(f64::NAN),
                if s.attempts.is_empty() {
                    "no refusal before the agreement".to_string()
                } else {
                    s.attempts.join("; ")
                }
            )?;
        }
        writeln!(
            f,
            "  submit → receipt     {}",
            d(&self.submit_to_receipt_ms)
        )?;
        writeln!(f, "  minus GPU time       {}", d(&self.overhead_ms))?;
        writeln!(
            f,
            "  jobs                 {} ok, {} failed, {} retried on another provider",
            self.jobs_ok, self.jobs_failed, self.jobs_retried
        )?;
        for x in self.failures.iter().take(10) {
            writeln!(f, "    failed: {x}")?;
        }
        writeln!(
            f,
            "  receipts             {} held, {} verified offline, {} found in their provider's chain; {}/{} chains intact",
            self.receipts_held,
            self.receipts_verified,
            self.receipts_in_provider_chains,
            self.chains_intact,
            self.sites
        )?;
        writeln!(
            f,
            "  kills                {} SIGKILLs, each restarted",
            self.kills
        )?;
        writeln!(
            f,
            "  settlement (ledger)  buyers owe {} msat, providers are owed {} msat: {}",
            self.settlement.buyers_total_msat,
            self.settlement.providers_total_msat,
            if self.settlement.balanced {
                "balanced"
            } else {
                "NOT BALANCED"
            }
        )?;
        for (b, m) in &self.settlement.buyers {
            writeln!(f, "    buyer    {}  {m} msat", &b[..8])?;
        }
        for (p, m) in &self.settlement.providers {
            writeln!(f, "    provider {}  {m} msat", &p[..8])?;
        }
        writeln!(
            f,
            "  peak RSS             max {:.1} MiB per site",
            self.max_peak_rss_kib as f64 / 1024.0
        )?;
        if let Some((longest, p99)) = self.max_swarm_stall_ms {
            writeln!(
                f,
                "  swarm task stalls    longest {longest} ms, p99 lag ≤ {p99} ms (worst site of {})",
                self.site_reports
                    .iter()
                    .filter(|s| s.swarm_stall_ms.is_some())
                    .count()
            )?;
        }
        for (k, (longest, p99)) in self.buyer_swarm_stall_ms.iter().enumerate() {
            writeln!(
                f,
                "  buyer {k} swarm task  longest stall {longest} ms, p99 lag ≤ {p99} ms (in the testnet process)"
            )?;
        }
        writeln!(
            f,
            "  processes left       {}",
            if self.no_processes_left {
                "none"
            } else {
                "SOME"
            }
        )?;
        write!(
            f,
            "  result               {}",
            if self.all_ok {
                "ALL OK"
            } else {
                "PROBLEMS (see above)"
            }
        )
    }
}

/// A histogram of submit → receipt latency as a small SVG, with logarithmic bins (the
/// distribution is a tall peak of fast jobs and a long tail of retried ones).
pub fn svg(r: &Report) -> String {
    let (w, h, left, bottom, top) = (640.0, 320.0, 50.0, 40.0, 30.0);
    let v: Vec<f64> = r.latencies_ms.iter().map(|x| x.max(0.1)).collect();
    let lo = v
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(1.0)
        .log10();
    let hi = v.iter().copied().fold(1.0f64, f64::max).log10() + 1e-9;
    let bins = 24usize;
    let step = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for x in &v {
        let i = (((x.log10() - lo) / step) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let edge = |i: usize| 10f64.powf(lo + step * i as f64);
    let peak = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let plot_w = w - left - 10.0;
    let plot_h = h - bottom - top;
    let bw = plot_w / bins as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{left}" y="18" font-size="13">submit → verified receipt, {} jobs on {} sites (p50 {:.1} ms, p99 {:.1} ms)</text>
"##,
        v.len(),
        r.sites,
        r.submit_to_receipt_ms.p50,
        r.submit_to_receipt_ms.p99
    );
    for (i, c) in counts.iter().enumerate() {
        let bh = plot_h * (*c as f64) / peak;
        let x = left + i as f64 * bw;
        let y = top + plot_h - bh;
        let _ = writeln!(
            s,
            r##"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="#3b7dd8"><title>{:.1}–{:.1} ms: {c}</title></rect>"##,
            (bw - 1.0).max(1.0),
            edge(i),
            edge(i + 1)
        );
    }
    let base = top + plot_h;
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{base}" x2="{}" y2="{base}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="black"/>
<text x="{left}" y="{}">{:.1} ms</text>
<text x="{}" y="{}" text-anchor="end">{:.0} ms</text>
<text x="{}" y="{}" text-anchor="middle">latency (log scale)</text>
<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">jobs ({} max per bin)</text>
</svg>"##,
        left + plot_w,
        base + 14.0,
        edge(0),
        left + plot_w,
        base + 14.0,
        edge(bins),
        left + plot_w / 2.0,
        base + 30.0,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        peak as usize
    );
    s
}

/// A job that was slow to match, and what its buyer went through.
#[derive(Debug, Clone, Serialize)]
pub struct SlowMatch {
    /// Submit → agreement, ms.
    pub match_ms: f64,
    /// Submit → the buyer's task started matching, ms.
    pub matching_ms: Option<f64>,
    /// Its attempts (provider: outcome).
    pub attempts: Vec<String>,
}

/// The `n` jobs slowest to reach an agreement, slowest first.
fn slowest_matches(outcomes: &[JobOutcome], n: usize) -> Vec<SlowMatch> {
    let mut v: Vec<SlowMatch> = outcomes
        .iter()
        .filter_map(|o| {
            Some(SlowMatch {
                match_ms: o.match_ms?,
                matching_ms: o.matching_ms,
                attempts: o.attempts.clone(),
            })
        })
        .collect();
    v.sort_by(|a, b| b.match_ms.total_cmp(&a.match_ms));
    v.truncate(n);
    v
}
