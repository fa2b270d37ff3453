//! Lightning settlement for the chat demo: an in-process test chain served over Esplora's
//! API, every site's and the gateway's embedded Lightning node on it, one channel from the
//! gateway to each site (opened by the gateway from its `[settle] lightning_channels`), and at
//! the end the msat receipted against the msat paid over
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
    /// gateway (keeping a channel of [`CHANNEL_SAT`] to each of `channels`): invoices at every
    /// pass, to the msat.
    pub fn settle_toml(&self, listen: Option<u16>, channels: &[String]) -> String {
        let mut s = format!(
            "[settle]\nmode = \"lightning\"\nbitcoin = \"regtest\"\nesplora = \"{}\"\n\
             interval_secs = {SETTLE_INTERVAL_S}\ninvoice_min_sat = 0\ninvoice_max_age_secs = 0\n\
             lightning_sync_secs = 10\n",
            self.server.url()
        );
        if let Some(p) = listen {
            s.push_str(&format!("lightning_listen = \"127.0.0.1:{p}\"\n"));
        }
        if !channels.is_empty() {
            let list: Vec<String> = channels
                .iter()
                .map(|p| format!("{{ peer = \"{p}\", sats = {CHANNEL_SAT} }}"))
                .collect();
            s.push_str(&format!("lightning_channels = [{}]\n", list.join(", ")));
        }
        s
    }

    /// Funds the gateway's Lightning node before it starts: one mature coinbase per channel
    /// it will open, to the address `hashgrid ln address` gives.
    pub fn fund(&self, cli: &Path, gateway_dir: &Path, channels: usize) -> anyhow::Result<()> {
        let mut c = Command::new(cli);
        c.arg("--data-dir")
            .arg(gateway_dir)
            .arg("--json")
            .args(["ln", "address"]);
        let a = cli_json(&mut c, "hashgrid ln address")?;
        let addr = a["address"].as_str().context("no address")?;
        let script = Address::from_str(addr)?
            .require_network(Network::Regtest)?
            .script_pubkey();
        self.chain
            .mine(u32::try_from(channels).unwrap_or(u32::MAX), &script);
        self.chain.mine(100, &burn());
        Ok(())
    }

    /// Once the running gateway has opened its configured channels (their funding
    /// transactions in the mempool), confirms them and waits until its log says each is ready.
    pub async fn confirm_channels(
        &self,
        gateway_log: &Path,
        channels: usize,
    ) -> anyhow::Result<()> {
        let by = Instant::now() + Duration::from_secs(90);
        while self.chain.mempool().len() < channels {
            if Instant::now() > by {
                bail!(
                    "{} of {channels} funding transactions broadcast after 90 s (see {})",
                    self.chain.mempool().len(),
                    gateway_log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.chain.mine(6, &burn());
        loop {
            let text = std::fs::read_to_string(gateway_log).unwrap_or_default();
            let ready = text.matches("lightning channel ready").count();
            if ready >= channels {
                return Ok(());
            }
            if Instant::now() > by {
                bail!(
                    "{ready} of {channels} channels ready after 90 s (see {})",
                    gateway_log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
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
