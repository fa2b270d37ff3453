//! `[settle]` in config files ([`SettleSection`]).

use std::sync::Arc;
use std::time::Duration;

use hashgrid_market::settlement::{CreditPolicy, InvoicePolicy};
use hashgrid_protocol::Msat;
use serde::{Deserialize, Serialize};

use crate::wallet::{BtcNetwork, ChainSource, WalletError, WalletKeys};

use hashgrid_lightning::{LdkConfig, LightningBackend, LnChain};

use super::channels::ChannelSection;
use super::records::{LightningSettle, Onchain, SettleMode, SettlementConfig};

/// The `[settle]` section of a site's or a buyer's config file.
///
/// ```toml
/// [settle]
/// mode = "onchain"                  # or "lightning", or "ledger" (default)
/// bitcoin = "signet"                # regtest | signet | testnet | mainnet
/// allow_mainnet = false             # mainnet needs this set explicitly
/// esplora = "https://mempool.space/signet/api"
/// # bitcoind_url = "http://127.0.0.1:38332"
/// # bitcoind_cookie = "/var/lib/bitcoind/signet/.cookie"
/// payout_descriptor = "tr(tpub…/0/*)"   # site: where invoices are paid (public keys only)
/// invoice_min_sat = 10000           # invoice once this much has accrued …
/// # invoice_min_msat = 10000000     # … the same threshold in msat (Lightning batches)
/// invoice_max_age_secs = 86400      # … or once the oldest receipt is this old
/// invoice_ttl_secs = 3600           # time to pay
/// credit_limit_sat = 100000         # most a buyer may owe before new agreements are refused
/// credit_max_unpaid_secs = 7200     # oldest an unpaid invoice may be
/// interval_secs = 30                # time between settlement passes
/// fee_rate_sat_vb = 2               # buyer: fee rate of payments
/// auto_pay = true                   # buyer: pay valid invoices at once
/// lightning_listen = "0.0.0.0:9735" # lightning mode: where peers reach this node's Lightning node
/// lightning_sync_secs = 30          # lightning mode: how often it syncs with the chain
/// # lightning mode: keep a channel to the site used most (or the operator's hub), this big
/// lightning_channels = [{ peer = "02ab…@site1.example.com:9735", sats = 500000 }]
/// ```
///
/// In `lightning` mode the node runs an embedded Lightning node (ldk-node) in
/// `DATA_DIR/lightning` (seed mode 0600), reading the chain from the same `esplora` or
/// `bitcoind_url` (with `bitcoind_cookie`); invoices are BOLT11 requests for the exact msat
/// owed and are paid over its channels.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SettleSection {
    /// `ledger` or `onchain`.
    pub mode: SettleModeName,
    /// The Bitcoin network (on-chain mode).
    pub bitcoin: Option<BtcNetwork>,
    /// Mainnet opt-in.
    pub allow_mainnet: bool,
    /// Esplora base URL.
    pub esplora: Option<String>,
    /// bitcoind JSON-RPC URL.
    pub bitcoind_url: Option<String>,
    /// bitcoind cookie file.
    pub bitcoind_cookie: Option<std::path::PathBuf>,
    /// A site's payout descriptor.
    pub payout_descriptor: Option<String>,
    /// Invoice threshold, sat.
    pub invoice_min_sat: Option<u64>,
    /// Invoice threshold, msat (over `invoice_min_sat` when both are set).
    pub invoice_min_msat: Option<u64>,
    /// Invoice age threshold, s.
    pub invoice_max_age_secs: Option<u64>,
    /// Time to pay, s.
    pub invoice_ttl_secs: Option<u64>,
    /// Credit limit, sat.
    pub credit_limit_sat: Option<u64>,
    /// Oldest unpaid invoice, s.
    pub credit_max_unpaid_secs: Option<u64>,
    /// Time between passes, s.
    pub interval_secs: Option<u64>,
    /// Buyer's fee rate, sat/vB.
    pub fee_rate_sat_vb: Option<u64>,
    /// Buyer pays valid invoices at once.
    pub auto_pay: Option<bool>,
    /// Lightning mode: where the Lightning node listens for peers.
    pub lightning_listen: Option<std::net::SocketAddr>,
    /// Lightning mode: seconds between the Lightning node's chain syncs (at least 10).
    pub lightning_sync_secs: Option<u64>,
    /// Lightning mode: channels to keep open (opened at start, and again after a close).
    pub lightning_channels: Vec<ChannelSection>,
}

/// The directory of a node's Lightning state inside its data dir.
pub const LIGHTNING_DIR: &str = "lightning";

/// Settlement mode as written in config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettleModeName {
    /// Signed IOUs, netted.
    #[default]
    Ledger,
    /// On-chain invoices.
    Onchain,
    /// BOLT11 invoices paid over Lightning.
    Lightning,
}

impl SettleSection {
    /// The chain backend this section names.
    pub fn chain_config(&self) -> Result<crate::wallet::ChainConfig, WalletError> {
        match (&self.esplora, &self.bitcoind_url) {
            (Some(url), None) => Ok(crate::wallet::ChainConfig::Esplora { url: url.clone() }),
            (None, Some(url)) => Ok(crate::wallet::ChainConfig::Bitcoind {
                url: url.clone(),
                cookie: self.bitcoind_cookie.clone(),
                user: None,
                password: None,
            }),
            (Some(_), Some(_)) => Err(WalletError::Config(
                "[settle] names both esplora and bitcoind_url; keep one".into(),
            )),
            (None, None) => Err(WalletError::Config(
                "[settle] mode = \"onchain\" needs esplora = URL or bitcoind_url = URL".into(),
            )),
        }
    }

    /// The Bitcoin network, checked against the mainnet opt-in.
    pub fn btc_network(&self) -> Result<BtcNetwork, WalletError> {
        let n = self.bitcoin.ok_or_else(|| {
            WalletError::Config(
                "[settle] mode = \"onchain\" needs bitcoin = \"regtest|signet|testnet|mainnet\""
                    .into(),
            )
        })?;
        n.check_allowed(self.allow_mainnet)?;
        Ok(n)
    }

    /// How to run the embedded Lightning node for a node whose data dir is `root`.
    pub fn ldk_config(&self, root: &std::path::Path) -> Result<LdkConfig, WalletError> {
        let network = self.btc_network()?;
        let chain = match (&self.esplora, &self.bitcoind_url) {
            (Some(url), None) => LnChain::Esplora(url.clone()),
            (None, Some(url)) => {
                let (host, port) = bitcoind_endpoint(url)?;
                let Some(cookie) = &self.bitcoind_cookie else {
                    return Err(WalletError::Config(
                        "[settle] bitcoind_url in lightning mode needs bitcoind_cookie = PATH (bitcoind's .cookie, or a file holding user:password)".into(),
                    ));
                };
                let (user, password) = read_cookie(cookie)?;
                LnChain::Bitcoind {
                    host,
                    port,
                    user,
                    password,
                }
            }
            (Some(_), Some(_)) => {
                return Err(WalletError::Config(
                    "[settle] names both esplora and bitcoind_url; keep one".into(),
                ));
            }
            (None, None) => {
                return Err(WalletError::Config(
                    "[settle] mode = \"lightning\" needs esplora = URL or bitcoind_url = URL (where the embedded Lightning node reads the chain)".into(),
                ));
            }
        };
        Ok(LdkConfig {
            dir: root.join(LIGHTNING_DIR),
            network: network.to_bitcoin(),
            chain,
            listen: self.lightning_listen,
            background_sync: Some(Duration::from_secs(
                self.lightning_sync_secs.unwrap_or(30).max(10),
            )),
        })
    }

    /// Starts the embedded Lightning node this section asks for (`None` in other modes). It
    /// blocks while ldk-node starts; call it from a blocking context.
    pub fn start_lightning(
        &self,
        root: &std::path::Path,
    ) -> Result<Option<Arc<hashgrid_lightning::LdkBackend>>, WalletError> {
        if self.mode != SettleModeName::Lightning {
            return Ok(None);
        }
        let cfg = self.ldk_config(root)?;
        hashgrid_lightning::LdkBackend::start(&cfg)
            .map(|b| Some(Arc::new(b)))
            .map_err(|e| WalletError::Config(e.to_string()))
    }

    /// The node's settlement configuration. `wallet` are a buyer's keys (none for a site
    /// that only sells); `chain` overrides the backend the section names (the in-process test
    /// chain). Lightning mode needs [`SettleSection::to_config_with_lightning`].
    pub fn to_config(
        &self,
        wallet: Option<WalletKeys>,
        chain: Option<Arc<dyn ChainSource>>,
    ) -> Result<SettlementConfig, WalletError> {
        self.to_config_with_lightning(wallet, chain, None)
    }

    /// [`SettleSection::to_config`], with the Lightning node (started by
    /// [`SettleSection::start_lightning`]) that lightning mode settles through; the node stops
    /// it when it stops.
    pub fn to_config_with_lightning(
        &self,
        wallet: Option<WalletKeys>,
        chain: Option<Arc<dyn ChainSource>>,
        lightning: Option<Arc<dyn LightningBackend>>,
    ) -> Result<SettlementConfig, WalletError> {
        let d = SettlementConfig::default();
        let secs =
            |s: Option<u64>, default_ms: u64| s.map_or(default_ms, |s| s.saturating_mul(1000));
        let cfg = SettlementConfig {
            mode: SettleMode::Ledger,
            invoice: InvoicePolicy {
                min_amount: match (self.invoice_min_msat, self.invoice_min_sat) {
                    (Some(m), _) => Msat(m),
                    (None, Some(s)) => Msat(s.saturating_mul(1000)),
                    (None, None) => d.invoice.min_amount,
                },
                max_age_ms: secs(self.invoice_max_age_secs, d.invoice.max_age_ms),
                ttl_ms: secs(self.invoice_ttl_secs, d.invoice.ttl_ms),
                unit: d.invoice.unit,
            },
            confirmations: d.confirmations,
            credit: CreditPolicy {
                limit: self
                    .credit_limit_sat
                    .map_or(d.credit.limit, |s| Msat(s.saturating_mul(1000))),
                max_unpaid_age_ms: secs(self.credit_max_unpaid_secs, d.credit.max_unpaid_age_ms),
            },
            interval: self
                .interval_secs
                .map_or(d.interval, |s| Duration::from_secs(s.max(1))),
            auto_pay: self.auto_pay.unwrap_or(d.auto_pay),
            fee_rate_sat_vb: self.fee_rate_sat_vb.unwrap_or(d.fee_rate_sat_vb),
        };
        match self.mode {
            SettleModeName::Ledger => return Ok(cfg),
            SettleModeName::Lightning => {
                let network = self.btc_network()?;
                let backend = lightning.ok_or_else(|| {
                    WalletError::Config(
                        "[settle] mode = \"lightning\": no Lightning node was started".into(),
                    )
                })?;
                let channels = self
                    .lightning_channels
                    .iter()
                    .map(ChannelSection::plan)
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(SettlementConfig {
                    mode: SettleMode::Lightning(LightningSettle {
                        network,
                        backend,
                        stop_with_node: true,
                        channels,
                    }),
                    ..cfg
                });
            }
            SettleModeName::Onchain => {}
        }
        let network = self.btc_network()?;
        let chain: Arc<dyn ChainSource> = match chain {
            Some(c) => c,
            None => Arc::from(self.chain_config()?.open()?),
        };
        Ok(SettlementConfig {
            mode: SettleMode::Onchain(Onchain {
                network,
                chain,
                payout_descriptor: self.payout_descriptor.clone(),
                wallet,
            }),
            ..cfg
        })
    }
}

/// `http://HOST:PORT[/]` → host and port (ldk-node's bitcoind client takes them apart).
fn bitcoind_endpoint(url: &str) -> Result<(String, u16), WalletError> {
    let bad = |why: &str| {
        WalletError::Config(format!(
            "[settle] bitcoind_url {url:?}: {why} (want http://HOST:PORT)"
        ))
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// is spoken by bitcoind"))?;
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') || rest.contains('/') {
        return Err(bad("put credentials in bitcoind_cookie, and no path"));
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port = port.parse().map_err(|_| bad("bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((host.to_string(), port))
}

/// A cookie file's `user:password` (bitcoind writes `__cookie__:HEX` to `.cookie`).
fn read_cookie(path: &std::path::Path) -> Result<(String, String), WalletError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| WalletError::Config(format!("bitcoind_cookie {}: {e}", path.display())))?;
    let (user, password) = text.trim().split_once(':').ok_or_else(|| {
        WalletError::Config(format!(
            "bitcoind_cookie {}: not user:password",
            path.display()
        ))
    })?;
    Ok((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> SettleSection {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn lightning_mode_reads_its_keys_and_needs_a_node_and_a_chain_source() {
        let s = section(
            "mode = \"lightning\"\nbitcoin = \"regtest\"\nesplora = \"http://127.0.0.1:3002\"\n\
             lightning_listen = \"0.0.0.0:9735\"\ninvoice_min_sat = 5\ninvoice_min_msat = 1234\n",
        );
        assert_eq!(s.mode, SettleModeName::Lightning);
        let ldk = s
            .ldk_config(std::path::Path::new("/data"))
            .expect("ldk config");
        assert_eq!(ldk.dir, std::path::Path::new("/data").join(LIGHTNING_DIR));
        assert_eq!(ldk.listen, Some("0.0.0.0:9735".parse().expect("addr")));
        assert_eq!(ldk.background_sync, Some(Duration::from_secs(30)));
        // Without a started Lightning node there is nothing to settle through.
        let e = s.to_config(None, None).expect_err("no node");
        assert!(e.to_string().contains("no Lightning node"), "{e}");
        // The msat threshold wins over the sat one.
        let mut ledger = s.clone();
        ledger.mode = SettleModeName::Ledger;
        let cfg = ledger.to_config(None, None).expect("ledger");
        assert_eq!(cfg.invoice.min_amount, Msat(1234));
        // A chain source is required: Esplora, or bitcoind with its cookie.
        let no_chain = section("mode = \"lightning\"\nbitcoin = \"regtest\"\n");
        let e = no_chain
            .ldk_config(std::path::Path::new("/d"))
            .expect_err("no chain source");
        assert!(e.to_string().contains("bitcoind_url"), "{e}");
        let dir = tempfile::tempdir().expect("dir");
        let cookie = dir.path().join(".cookie");
        std::fs::write(&cookie, "__cookie__:abc123\n").expect("cookie");
        let rpc = |url: &str, cookie: &std::path::Path| {
            section(&format!(
                "mode = \"lightning\"\nbitcoin = \"regtest\"\nbitcoind_url = \"{url}\"\n\
                 bitcoind_cookie = \"{}\"\n",
                cookie.display()
            ))
            .ldk_config(std::path::Path::new("/d"))
        };
        let cfg = rpc("http://127.0.0.1:18443/", &cookie).expect("bitcoind");
        assert_eq!(
            cfg.chain,
            LnChain::Bitcoind {
                host: "127.0.0.1".into(),
                port: 18443,
                user: "__cookie__".into(),
                password: "abc123".into(),
            }
        );
        assert!(
            !format!("{:?}", cfg.chain).contains("abc123"),
            "no password in logs"
        );
        for (url, why) in [
            ("https://x:1", "http://"),
            ("http://u:p@x:1", "credentials"),
            ("http://x", "no port"),
            ("http://x:port", "bad port"),
        ] {
            let e = rpc(url, &cookie).expect_err(url);
            assert!(e.to_string().contains(why), "{url}: {e}");
        }
        let e = rpc("http://127.0.0.1:18443", &dir.path().join("missing")).expect_err("no cookie");
        assert!(e.to_string().contains("missing"), "{e}");
        std::fs::write(&cookie, "nocolon").expect("cookie");
        let e = rpc("http://127.0.0.1:18443", &cookie).expect_err("bad cookie");
        assert!(e.to_string().contains("user:password"), "{e}");
        // Channels to keep, checked when the config is read.
        let peer =
            "02eec7245d6b7d2ccb30380bfbe2a3648cd7a942653f5aa340edcea1f283686619@127.0.0.1:9735";
        let with = section(&format!(
            "mode = \"lightning\"\nbitcoin = \"regtest\"\nesplora = \"http://x\"\n\
             lightning_channels = [{{ peer = \"{peer}\", sats = 500000, push_msat = 1000 }}]\n"
        ));
        assert_eq!(with.lightning_channels.len(), 1);
        let plan = with.lightning_channels[0].plan().expect("plan");
        assert_eq!(
            (plan.peer.to_string().as_str(), plan.sats, plan.push_msat),
            (peer, 500_000, 1000)
        );
        let typo = format!(
            "mode = \"lightning\"\nlightning_channels = [{{ peer = \"{peer}\", sat = 5 }}]\n"
        );
        assert!(
            toml::from_str::<SettleSection>(&typo).is_err(),
            "unknown keys are refused"
        );
        // Mainnet still needs the explicit opt-in.
        let main = section("mode = \"lightning\"\nbitcoin = \"mainnet\"\nesplora = \"http://x\"\n");
        assert!(main.ldk_config(std::path::Path::new("/d")).is_err());
    }
}
