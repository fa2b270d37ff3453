//! `hashgrid-testnet --workload chat` (and `mixed`): real site processes, one `hashgrid serve`
//! gateway in front of the market, and OpenAI-style requests over HTTP. Reports time to first
//! token (the first request, which uploads the weights, then with the model warm) against
//! `hashgrid generate --local` on the same machine, throughput with concurrent requests,
//! the sites' input-cache hits, and the settlement totals from both sides.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::info;

use crate::http;
use crate::report::Dist;
use crate::sites::{self, Site, SiteSpec};

/// The chat workload's settings.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Provider sites.
    pub sites: usize,
    /// Chat requests in the concurrent phase.
    pub requests: usize,
    /// Requests in flight at once in the concurrent phase.
    pub concurrency: usize,
    /// Sequential streamed requests with the model warm (time to first token).
    pub warm_requests: usize,
    /// Embedding requests mixed into the concurrent phase (needs `embed_model`).
    pub embed_requests: usize,
    /// Tokens per answer.
    pub max_tokens: u32,
    /// The GGUF language model.
    pub model: PathBuf,
    /// The embedding model directory, for `mixed`.
    pub embed_model: Option<PathBuf>,
    /// The `hashgrid-node` binary.
    pub node_binary: PathBuf,
    /// The `hashgrid` binary.
    pub cli_binary: PathBuf,
    /// Where data dirs go (a temporary dir when `None`).
    pub work_dir: Option<PathBuf>,
    /// When set, every site serves Prometheus metrics and a scrape config for them is
    /// written to this file.
    pub prometheus: Option<PathBuf>,
    /// Settle over Lightning on an in-process test chain (else the ledger).
    pub lightning: bool,
}

/// One streamed request's timings.
#[derive(Debug, Clone, Serialize)]
pub struct Streamed {
    /// Request sent → first content chunk.
    pub first_token_ms: f64,
    /// Request sent → `[DONE]`.
    pub total_ms: f64,
    /// Content chunks received.
    pub chunks: usize,
    /// Completion tokens (from `usage`).
    pub tokens: u64,
    /// Decode rate after the first token.
    pub tokens_per_s: f64,
    /// Who ran it.
    pub provider: String,
    /// What it cost.
    pub charge_msat: u64,
    /// The receipt's id.
    pub receipt_id: String,
    /// The answer.
    pub text: String,
}

/// What the chat workload measured.
#[derive(Debug, Clone, Serialize)]
pub struct ChatReport {
    /// Sites.
    pub sites: usize,
    /// `hashgrid generate --local`: first token (ms) and decode tokens/s, same prompt.
    pub local_first_token_ms: f64,
    /// Same.
    pub local_tokens_per_s: f64,
    /// `hashgrid serve --local`, warm (after one request): streamed requests' first token
    /// p50, the same prompt over the same HTTP path as the market's gateway, each request
    /// alternating with one of the market's warm requests.
    pub local_warm_first_token_p50_ms: f64,
    /// Its decode tokens/s, p50.
    pub local_warm_tokens_per_s: f64,
    /// The first request through the gateway (weights uploaded to a provider).
    pub cold: Streamed,
    /// Sequential requests with the model warm.
    pub warm: Vec<Streamed>,
    /// Median first token with the model warm.
    pub warm_first_token_p50_ms: f64,
    /// The local gateway's warm requests (each sent just before one of `warm`).
    pub local_warm: Vec<Streamed>,
    /// Market overhead on the first token: the median over pairs of (market − local) first
    /// token, each pair sent back to back.
    pub overhead_p50_ms: f64,
    /// Concurrent phase: requests, concurrency, wall time, tokens, throughput.
    pub concurrent: Concurrent,
    /// Per site: jobs, bytes fetched from buyers, bytes from the input cache.
    pub cache: Vec<SiteCache>,
    /// Receipts the gateway's node holds, and the charges on both sides.
    pub settlement: Settlement,
}

/// The concurrent phase.
#[derive(Debug, Clone, Serialize)]
pub struct Concurrent {
    /// Chat requests.
    pub requests: usize,
    /// Embedding requests.
    pub embed_requests: usize,
    /// In flight at once.
    pub concurrency: usize,
    /// Wall time.
    pub wall_s: f64,
    /// Completion tokens in all.
    pub tokens: u64,
    /// Tokens per second over the phase.
    pub tokens_per_s: f64,
    /// First-token percentiles.
    pub first_token_p50_ms: f64,
    /// Same.
    pub first_token_p95_ms: f64,
    /// Requests per provider.
    pub by_provider: BTreeMap<String, usize>,
    /// Requests that failed.
    pub failed: usize,
}

/// A site's input cache, from its log.
#[derive(Debug, Clone, Serialize)]
pub struct SiteCache {
    /// The site.
    pub site: usize,
    /// Jobs whose inputs were readied.
    pub jobs: usize,
    /// Jobs that fetched nothing and took bytes from the cache.
    pub hits: usize,
    /// Bytes fetched from the buyer.
    pub fetched_bytes: u64,
    /// Bytes read from the cache.
    pub cached_bytes: u64,
}

/// Both sides' view of what is owed.
#[derive(Debug, Clone, Serialize)]
pub struct Settlement {
    /// Receipts the gateway's node holds (countersigned).
    pub receipts: usize,
    /// Their charges, msat.
    pub buyer_total_msat: u64,
    /// The countersigned receipts' charges in the sites' own stores, msat.
    pub providers_total_msat: u64,
    /// Over Lightning: channels, and msat receipted against msat paid per buyer and site.
    pub lightning: Option<crate::lightning::LnSettlement>,
    /// Whether both agree (and, over Lightning, every receipted msat was paid).
    pub ok: bool,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const QUESTION: &str = "Name three uses of a GPU, in one sentence.";

/// Starts the sites and the gateway, runs the phases, stops everything, and reports.
pub async fn run_chat(cfg: ChatConfig) -> anyhow::Result<ChatReport> {
    if cfg.sites == 0 || cfg.concurrency == 0 {
        bail!("--sites and --concurrency must be at least 1");
    }
    if cfg.embed_requests > 0 && cfg.embed_model.is_none() {
        bail!("mixed workload: pass --embed-model DIR (all-MiniLM-L6-v2)");
    }
    let tmp;
    let work: PathBuf = match &cfg.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("hashgrid-chat").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let network = format!("chatnet-{:x}", crate::rng_seed() % 0xffff_ffff);

    // Baseline first, on an idle machine: the same prompt on this machine's adapter.
    let local = Command::new(&cfg.cli_binary)
        .arg("--data-dir")
        .arg(work.join("local"))
        .args(["--json", "generate", "--local", "--chat", "--model"])
        .arg(&cfg.model)
        .args([
            "--prompt",
            QUESTION,
            "--max-tokens",
            &cfg.max_tokens.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .context("running hashgrid generate --local")?;
    if !local.status.success() {
        bail!("hashgrid generate --local failed");
    }
    let local: serde_json::Value = serde_json::from_slice(&local.stdout)?;
    let local_first_token_ms = local["timings"]["first_token_ms"].as_f64().unwrap_or(0.0);
    let local_tokens_per_s = local["timings"]["decode_tokens_per_s"]
        .as_f64()
        .unwrap_or(0.0);
    info!(local_first_token_ms, local_tokens_per_s, "local baseline");
    // The local gateway stays up, warm, so its requests can alternate with the market's:
    // this VM's speed drifts by more than the difference being measured.
    let (local_gw, local_addr) =
        start_gateway(&cfg, &work, "local-gateway", (&[], &["--local"])).await?;
    chat(&local_addr, cfg.max_tokens).await?;

    // Lightning: the chain every site's and the gateway's Lightning node use.
    let ln = match cfg.lightning {
        true => Some(crate::lightning::LnGrid::start()?),
        false => None,
    };
    // Sites: site 0 benchmarks the adapter, the others reuse its result.
    let mut specs = Vec::new();
    for i in 0..cfg.sites {
        let data_dir = work.join(format!("site-{i:02}"));
        std::fs::create_dir_all(&data_dir)?;
        let peer_id = sites::create_identity(&cfg.node_binary, &data_dir)?;
        let config = match &ln {
            Some(ln) => {
                let path = data_dir.join("site.toml");
                std::fs::write(&path, ln.settle_toml(Some(sites::free_port()?), &[]))?;
                Some(path)
            }
            None => None,
        };
        specs.push(SiteSpec {
            index: i,
            region: crate::REGIONS[i % 2].to_string(),
            price: 100 + 10 * i as u64,
            units: 2,
            data_dir,
            ip: "127.0.0.1".into(),
            ns: None,
            port: sites::free_port()?,
            peer_id,
            metrics_port: match &cfg.prometheus {
                Some(_) => Some(sites::free_port()?),
                None => None,
            },
            config,
            env: Vec::new(),
        });
    }
    if let Some(path) = &cfg.prometheus {
        std::fs::write(path, sites::prometheus_config(&specs, &network))?;
        eprintln!("prometheus scrape config for the sites: {}", path.display());
    }
    let seed = specs[0].addr();
    let mut running = vec![Site::start(
        &cfg.node_binary,
        specs[0].clone(),
        &network,
        Vec::new(),
    )?];
    let bench = specs[0].data_dir.join("bench-cache.json");
    let t = Instant::now();
    while !bench.exists() {
        if t.elapsed() > Duration::from_secs(120) || !running[0].running() {
            bail!(
                "site 0 did not start (see {})",
                specs[0].data_dir.join("node.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in specs.iter().skip(1) {
        std::fs::copy(&bench, s.data_dir.join("bench-cache.json"))?;
        running.push(Site::start(
            &cfg.node_binary,
            s.clone(),
            &network,
            vec![seed.clone()],
        )?);
    }
    for s in &specs {
        let by = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", s.port)).is_err() {
            if Instant::now() > by {
                bail!("site {} did not listen", s.index);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The gateway; over Lightning its config names a channel to every site, which its node
    // opens at its first settlement pass from the coins mined to it here.
    let gw_dir = work.join("gateway");
    if let Some(ln) = &ln {
        let mut peers = Vec::new();
        for s in &specs {
            peers.push(crate::lightning::site_peer(&s.data_dir.join("node.log")).await?);
        }
        std::fs::create_dir_all(&gw_dir)?;
        std::fs::write(gw_dir.join("config.toml"), ln.settle_toml(None, &peers))?;
        ln.fund(&cfg.cli_binary, &gw_dir, peers.len())?;
    }
    let (gateway, addr) = start_gateway(
        &cfg,
        &work,
        "gateway",
        (&["--network", &network, "--bootstrap", &seed], &[]),
    )
    .await?;
    info!(%addr, "gateway up");
    if let Some(ln) = &ln {
        ln.confirm_channels(&work.join("gateway.log"), specs.len())
            .await?;
        info!(
            channels = specs.len(),
            "lightning channels open (from the gateway's config)"
        );
    }

    // The first request uploads the weights to one provider; then the model is warm there.
    let cold = chat(&addr, cfg.max_tokens).await?;
    info!(first_token_ms = cold.first_token_ms, "cold request");
    // The provider re-announces its warm list within a few seconds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut warm = Vec::new();
    let mut local_warm = Vec::new();
    for _ in 0..cfg.warm_requests {
        local_warm.push(chat(&local_addr, cfg.max_tokens).await?);
        warm.push(chat(&addr, cfg.max_tokens).await?);
    }
    stop_gateway(local_gw).await?;
    let warm_first_token_p50_ms = Dist::of(warm.iter().map(|s| s.first_token_ms).collect()).p50;
    let local_warm_first_token_p50_ms =
        Dist::of(local_warm.iter().map(|s| s.first_token_ms).collect()).p50;
    let local_warm_tokens_per_s = Dist::of(local_warm.iter().map(|s| s.tokens_per_s).collect()).p50;
    info!(
        warm_first_token_p50_ms,
        local_warm_first_token_p50_ms, "warm requests, alternating"
    );

    // Concurrent phase.
    let sem = Arc::new(Semaphore::new(cfg.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..cfg.requests + cfg.embed_requests {
        let sem = sem.clone();
        let addr = addr.clone();
        let embed = i >= cfg.requests;
        let max_tokens = cfg.max_tokens;
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            if embed {
                embedding(&addr).await.map(|_| None)
            } else {
                chat(&addr, max_tokens).await.map(Some)
            }
        }));
    }
    let mut done = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await? {
            Ok(Some(s)) => done.push(s),
            Ok(None) => {}
            Err(e) => {
                failed += 1;
                tracing::warn!(error = %e, "request failed");
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let tokens: u64 = done.iter().map(|s| s.tokens).sum();
    let firsts = Dist::of(done.iter().map(|s| s.first_token_ms).collect());
    let mut by_provider = BTreeMap::new();
    for s in &done {
        *by_provider.entry(short(&s.provider)).or_insert(0) += 1;
    }
    let concurrent = Concurrent {
        requests: cfg.requests,
        embed_requests: cfg.embed_requests,
        concurrency: cfg.concurrency,
        wall_s: wall,
        tokens,
        tokens_per_s: tokens as f64 / wall.max(1e-9),
        first_token_p50_ms: firsts.p50,
        first_token_p95_ms: firsts.p95,
        by_provider,
        failed,
    };

    // Over Lightning, the last receipts are invoiced and paid within a few settlement passes.
    if ln.is_some() {
        tokio::time::sleep(Duration::from_secs(
            4 * crate::lightning::SETTLE_INTERVAL_S + 6,
        ))
        .await;
    }
    // Stop the gateway (Ctrl-C), read its receipts; stop the sites, read theirs.
    stop_gateway(gateway).await?;
    let receipts = Command::new(&cfg.cli_binary)
        .arg("--data-dir")
        .arg(&gw_dir)
        .args(["--network", &network, "--json", "receipts"])
        .output()?;
    let receipts: serde_json::Value =
        serde_json::from_slice(&receipts.stdout).context("hashgrid receipts --json")?;
    let list = receipts.as_array().cloned().unwrap_or_default();
    let buyer_total_msat: u64 = list.iter().filter_map(|r| r["charge_msat"].as_u64()).sum();
    let mut providers_total_msat = 0;
    let mut cache = Vec::new();
    let mut site_paid = Vec::new();
    for s in &mut running {
        s.stop()?;
        let chain = crate::audit_site(&cfg.node_binary, &s.spec.data_dir, &network)
            .map_err(anyhow::Error::msg)?;
        let receipted = chain["countersigned_msat"].as_u64().unwrap_or(0);
        providers_total_msat += receipted;
        cache.push(site_cache(s.spec.index, &s.spec.data_dir.join("node.log")));
        if ln.is_some() {
            site_paid.push(crate::lightning::SitePaid {
                site: s.spec.index,
                receipted_msat: receipted,
                paid_msat: crate::lightning::site_paid_msat(&cfg.node_binary, &s.spec.data_dir)?,
            });
        }
    }
    drop(running);
    let lightning = match &ln {
        Some(_) => {
            let buyer_paid_msat = crate::lightning::buyer_paid_msat(&cfg.cli_binary, &gw_dir)?;
            let ok = buyer_paid_msat == buyer_total_msat
                && site_paid.iter().all(|s| s.paid_msat == s.receipted_msat);
            Some(crate::lightning::LnSettlement {
                channels: specs.len(),
                buyer_receipted_msat: buyer_total_msat,
                buyer_paid_msat,
                sites: site_paid,
                ok,
            })
        }
        None => None,
    };
    Ok(ChatReport {
        sites: cfg.sites,
        local_first_token_ms,
        local_tokens_per_s,
        cold,
        overhead_p50_ms: Dist::of(
            warm.iter()
                .zip(&local_warm)
                .map(|(m, l)| m.first_token_ms - l.first_token_ms)
                .collect(),
        )
        .p50,
        local_warm,
        local_warm_first_token_p50_ms,
        local_warm_tokens_per_s,
        warm,
        warm_first_token_p50_ms,
        concurrent,
        cache,
        settlement: Settlement {
            receipts: list.len(),
            buyer_total_msat,
            providers_total_msat,
            ok: buyer_total_msat == providers_total_msat
                && buyer_total_msat > 0
                && lightning.as_ref().is_none_or(|l| l.ok),
            lightning,
        },
    })
}

/// Starts `hashgrid GLOBAL… serve --listen ADDR SERVE…` and waits for its banner.
async fn start_gateway(
    cfg: &ChatConfig,
    work: &Path,
    name: &str,
    (global, serve): (&[&str], &[&str]),
) -> anyhow::Result<(Proc, String)> {
    let port = sites::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let log_path = work.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(&cfg.cli_binary);
    cmd.arg("--data-dir")
        .arg(work.join(name))
        .args(global)
        .args(["serve", "--listen", &addr])
        .args(serve)
        .arg("--model")
        .arg(format!("chat={}", cfg.model.display()));
    if let Some(e) = &cfg.embed_model {
        cmd.arg("--model").arg(format!("embed={}", e.display()));
    }
    if std::env::var_os("RUST_LOG").is_none() {
        // Settlement's progress (channels opened and ready) in the gateway's log.
        cmd.env("RUST_LOG", "warn,hashgrid_node::settle=info");
    }
    let child = Proc(
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting hashgrid serve")?,
    );
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("hashgrid serve: http://") {
            return Ok((child, addr));
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{name} did not start:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops a gateway with SIGINT (as Ctrl-C) and waits for it.
async fn stop_gateway(mut p: Proc) -> anyhow::Result<()> {
    let _ = Command::new("kill")
        .args(["-INT", &p.0.id().to_string()])
        .status();
    let by = Instant::now() + Duration::from_secs(30);
    while p.0.try_wait()?.is_none() {
        if Instant::now() > by {
            bail!("the gateway did not stop on SIGINT");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn short(key: &str) -> String {
    key.chars().take(12).collect()
}

/// One streamed chat request, greedy.
async fn chat(addr: &str, max_tokens: u32) -> anyhow::Result<Streamed> {
    let body = serde_json::json!({
        "model": "chat", "stream": true, "temperature": 0, "max_tokens": max_tokens,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": QUESTION}],
    });
    let sent = Instant::now();
    let r = http::post(addr, "/v1/chat/completions", &body).await?;
    if r.status != 200 {
        bail!("status {}: {}", r.status, String::from_utf8_lossy(&r.body));
    }
    let mut first = None;
    let mut chunks = 0;
    let mut tokens = 0;
    let mut provider = String::new();
    let mut charge_msat = 0;
    let mut receipt_id = String::new();
    let mut text = String::new();
    let mut last = sent;
    for (at, data) in &r.events {
        if data == "[DONE]" {
            last = *at;
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        if let Some(e) = v.get("error") {
            bail!("stream error: {e}");
        }
        if let Some(t) = v["choices"][0]["delta"]["content"]
            .as_str()
            .filter(|t| !t.is_empty())
        {
            chunks += 1;
            text.push_str(t);
            first.get_or_insert(*at);
        }
        if let Some(h) = v.get("hashgrid") {
            provider = h["provider"].as_str().unwrap_or("").to_string();
            charge_msat = h["charge_msat"].as_u64().unwrap_or(0);
            receipt_id = h["receipt_id"].as_str().unwrap_or("").to_string();
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    let first = first.context("no content in the stream")?;
    let decode = (last - first).as_secs_f64();
    Ok(Streamed {
        first_token_ms: (first - sent).as_secs_f64() * 1e3,
        total_ms: (last - sent).as_secs_f64() * 1e3,
        chunks,
        tokens,
        tokens_per_s: if decode > 0.0 && tokens > 1 {
            (tokens - 1) as f64 / decode
        } else {
            0.0
        },
        provider,
        charge_msat,
        receipt_id,
        text,
    })
}

async fn embedding(addr: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({"model": "embed", "input": ["A man is eating food.", "A man is eating a piece of bread."]});
    let r = http::post(addr, "/v1/embeddings", &body).await?;
    if r.status != 200 {
        bail!("status {}: {}", r.status, String::from_utf8_lossy(&r.body));
    }
    let v = r.json()?;
    if v["data"].as_array().map_or(0, Vec::len) != 2 {
        bail!("embeddings response without two embeddings");
    }
    Ok(())
}

/// Sums the site's `inputs ready` log lines.
fn site_cache(site: usize, log: &Path) -> SiteCache {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut c = SiteCache {
        site,
        jobs: 0,
        hits: 0,
        fetched_bytes: 0,
        cached_bytes: 0,
    };
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for line in text.lines().filter(|l| l.contains("inputs ready")) {
        let (f, k) = (field(line, "fetched_bytes"), field(line, "cached_bytes"));
        c.jobs += 1;
        c.fetched_bytes += f;
        c.cached_bytes += k;
        if f == 0 && k > 0 {
            c.hits += 1;
        }
    }
    c
}

impl fmt::Display for ChatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "hashgrid chat workload: {} sites, one gateway (hashgrid serve)",
            self.sites
        )?;
        writeln!(f, "  question             {QUESTION:?}")?;
        writeln!(f, "  answer               {:?}", self.cold.text.trim())?;
        writeln!(
            f,
            "                       by provider {}…, receipt {}…, {} msat (verified and countersigned by the gateway's node)",
            short(&self.cold.provider),
            short(&self.cold.receipt_id),
            self.cold.charge_msat
        )?;
        writeln!(
            f,
            "  local baseline       first token {:.0} ms, {:.1} tokens/s (hashgrid generate --local, a fresh process)",
            self.local_first_token_ms, self.local_tokens_per_s
        )?;
        writeln!(
            f,
            "                       first token p50 {:.0} ms, {:.1} tokens/s (hashgrid serve --local, warm, n={})",
            self.local_warm_first_token_p50_ms,
            self.local_warm_tokens_per_s,
            self.warm.len()
        )?;
        writeln!(
            f,
            "  first request        first token {:.0} ms (weights uploaded), {:.1} tokens/s",
            self.cold.first_token_ms, self.cold.tokens_per_s
        )?;
        let tps = Dist::of(self.warm.iter().map(|s| s.tokens_per_s).collect()).p50;
        writeln!(
            f,
            "  model warm           first token p50 {:.0} ms (market overhead {:+.0} ms, median of paired differences), {:.1} tokens/s (n={})",
            self.warm_first_token_p50_ms,
            self.overhead_p50_ms,
            tps,
            self.warm.len()
        )?;
        let c = &self.concurrent;
        writeln!(
            f,
            "  concurrent           {} chat + {} embedding requests, {} at once: {:.1} s, {} tokens, {:.1} tokens/s, first token p50 {:.0} ms p95 {:.0} ms, {} failed",
            c.requests,
            c.embed_requests,
            c.concurrency,
            c.wall_s,
            c.tokens,
            c.tokens_per_s,
            c.first_token_p50_ms,
            c.first_token_p95_ms,
            c.failed
        )?;
        let spread: Vec<String> = c
            .by_provider
            .iter()
            .map(|(p, n)| format!("{p}…:{n}"))
            .collect();
        writeln!(f, "  providers            {}", spread.join(" "))?;
        let (jobs, hits, fetched, cached) = self.cache.iter().fold((0, 0, 0, 0), |a, s| {
            (
                a.0 + s.jobs,
                a.1 + s.hits,
                a.2 + s.fetched_bytes,
                a.3 + s.cached_bytes,
            )
        });
        writeln!(
            f,
            "  input cache          {hits}/{jobs} jobs started from the cache; {:.1} MB fetched, {:.1} MB from the cache",
            fetched as f64 / 1e6,
            cached as f64 / 1e6
        )?;
        let s = &self.settlement;
        write!(
            f,
            "  settlement           {} receipts, buyer {} msat, providers {} msat: {}",
            s.receipts,
            s.buyer_total_msat,
            s.providers_total_msat,
            if s.ok { "adds up" } else { "MISMATCH" }
        )?;
        if let Some(l) = &s.lightning {
            write!(
                f,
                "\n  lightning            {} channels; buyer receipted {} msat, paid {} msat",
                l.channels, l.buyer_receipted_msat, l.buyer_paid_msat
            )?;
            for site in &l.sites {
                write!(
                    f,
                    "\n    site {:<2}            receipted {} msat, paid {} msat",
                    site.site, site.receipted_msat, site.paid_msat
                )?;
            }
            write!(
                f,
                "\n                       {}",
                if l.ok {
                    "every receipted msat was paid over Lightning"
                } else {
                    "MISMATCH: receipted and paid differ"
                }
            )?;
        }
        Ok(())
    }
}
