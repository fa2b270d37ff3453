//! Lightning settlement for the chat demo: an in-process test chain served over Esplora's
//! API, every site's and the gateway's embedded Lightning node on it, one channel from the
//! gateway to each site, and at the end the msat receipted against the msat paid over
//! Lightning, per buyer and per site.

use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_node::wallet::bitcoin::{Address, Network, ScriptBuf};
use hashgrid_node::wallet::{TestChain, esplora_server::EsploraServer};
use serde::Serialize;

/// Seconds between the sites' and the gateway's settlement passes in the demo.
pub const SETTLE_INTERVAL_S: u64 = 2;
/// Each channel from the gateway to a site, sats.
pub const CHANNEL_SAT: u64 = 1_000_000;

/// The demo's chain and its Esplora server.
pub struct LnGrid {
    chain: Arc<TestChain>,
    server: EsploraServer,
}

/// One site's receipts against what it was paid over Lightning.
#[derive(Debug, Clone, Serialize)]
pub struct SitePaid {
    /// Site index.
    pub site: usize,
    /// Countersigned receipts in its audited chain, msat.
    pub receipted_msat: u64,
    /// Paid to it over Lightning (paid, confirmed or settled invoices in its ledger), msat.
    pub paid_msat: u64,
}

/// The Lightning side of the demo's settlement.
#[derive(Debug, Clone, Serialize)]
pub struct LnSettlement {
    /// Channels the gateway opened (one per site).
    pub channels: usize,
    /// The gateway's receipts, msat.
    pub buyer_receipted_msat: u64,
    /// What the gateway paid over Lightning (invoices paid or settled), msat.
    pub buyer_paid_msat: u64,
    /// Per site.
    pub sites: Vec<SitePaid>,
    /// Every msat receipted was paid, for the buyer and for every site.
    pub ok: bool,
}

fn burn() -> ScriptBuf {
    ScriptBuf::new_op_return([0u8; 4])
}

fn cli_json(cmd: &mut Command, what: &str) -> anyhow::Result<serde_json::Value> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{what}: not JSON"))
}

impl LnGrid {
    /// A fresh chain at height 0, served on a free port.
    pub fn start() -> anyhow::Result<LnGrid> {
        let chain = TestChain::new();
        let server = EsploraServer::start(chain.clone()).context("starting the Esplora server")?;
        Ok(LnGrid { chain, server })
    }

    /// The `[settle]` section of a site (listening for Lightning peers on `listen`) or of the
    /// gateway: invoices at every pass, to the msat.
    pub fn settle_toml(&self, listen: Option<u16>) -> String {
        let mut s = format!(
            "[settle]\nmode = \"lightning\"\nbitcoin = \"regtest\"\nesplora = \"{}\"\n\
             interval_secs = {SETTLE_INTERVAL_S}\ninvoice_min_sat = 0\ninvoice_max_age_secs = 0\n\
             lightning_sync_secs = 10\n",
            self.server.url()
        );
        if let Some(p) = listen {
            s.push_str(&format!("lightning_listen = \"127.0.0.1:{p}\"\n"));
        }
        s
    }

    /// Funds the gateway's Lightning node (one mature coinbase per channel), opens a channel
    /// to every site's, confirms them, and waits until the gateway sees them all ready.
    pub async fn open_channels(
        &self,
        cli: &Path,
        gateway_dir: &Path,
        peers: &[String],
    ) -> anyhow::Result<()> {
        let ln = |args: &[&str]| {
            let mut c = Command::new(cli);
            c.arg("--data-dir")
                .arg(gateway_dir)
                .arg("--json")
                .arg("ln")
                .args(args);
            c
        };
        let a = cli_json(&mut ln(&["address"]), "hashgrid ln address")?;
        let addr = a["address"].as_str().context("no address")?;
        let script = Address::from_str(addr)?
            .require_network(Network::Regtest)?
            .script_pubkey();
        self.chain
            .mine(u32::try_from(peers.len()).unwrap_or(u32::MAX), &script);
        self.chain.mine(100, &burn());
        for p in peers {
            let o = cli_json(
                &mut ln(&["open", p, &CHANNEL_SAT.to_string()]),
                "hashgrid ln open",
            )?;
            if !o["funding"].is_string() {
                bail!("the channel to {p} was not funded: {o}");
            }
        }
        self.chain.mine(6, &burn());
        let by = Instant::now() + Duration::from_secs(90);
        loop {
            let s = cli_json(&mut ln(&["status"]), "hashgrid ln status")?;
            let ready = s["channels"]
                .as_array()
                .map_or(0, |c| c.iter().filter(|c| c["ready"] == true).count());
            if ready == peers.len() {
                return Ok(());
            }
            if Instant::now() > by {
                bail!("{ready} of {} channels ready after 90 s: {s}", peers.len());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The Lightning peer address a site logged when its Lightning node started.
pub async fn site_peer(log: &Path) -> anyhow::Result<String> {
    let by = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("lightning node started"))
            && let Some(listen) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("listen="))
        {
            return Ok(listen.to_string());
        }
        if Instant::now() > by {
            bail!("no Lightning node in {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the gateway paid over Lightning, from its store (the gateway must be stopped).
pub fn buyer_paid_msat(cli: &Path, gateway_dir: &Path) -> anyhow::Result<u64> {
    let v = cli_json(
        Command::new(cli)
            .arg("--data-dir")
            .arg(gateway_dir)
            .args(["--json", "invoices"]),
        "hashgrid invoices",
    )?;
    Ok(v.as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| matches!(r["state"].as_str(), Some("paid" | "settled")))
                .filter_map(|r| r["amount_msat"].as_u64())
                .sum()
        })
        .unwrap_or(0))
}

/// What a site was paid over Lightning, from its store (the site must be stopped).
pub fn site_paid_msat(node: &Path, data_dir: &Path) -> anyhow::Result<u64> {
    let v = cli_json(
        Command::new(node)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["earnings", "--json"]),
        "hashgrid-node earnings",
    )?;
    let field = |e: &serde_json::Value, k: &str| e[k].as_u64().unwrap_or(0);
    Ok(v.as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    let e = &r["as_buyer"];
                    field(e, "paid") + field(e, "confirmed") + field(e, "settled")
                })
                .sum()
        })
        .unwrap_or(0))
}
