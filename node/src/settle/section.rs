//! `[settle]` in config files ([`SettleSection`]).

use std::sync::Arc;
use std::time::Duration;

use hashgrid_market::settlement::{CreditPolicy, InvoicePolicy};
use hashgrid_protocol::Msat;
use serde::{Deserialize, Serialize};

use crate::wallet::{BtcNetwork, ChainSource, WalletError, WalletKeys};

use super::records::{Onchain, SettleMode, SettlementConfig};

/// The `[settle]` section of a site's or a buyer's config file.
///
/// ```toml
/// [settle]
/// mode = "onchain"                  # or "ledger" (default)
/// bitcoin = "signet"                # regtest | signet | testnet | mainnet
/// allow_mainnet = false             # mainnet needs this set explicitly
/// esplora = "https://mempool.space/signet/api"
/// # bitcoind_url = "http://127.0.0.1:38332"
/// # bitcoind_cookie = "/var/lib/bitcoind/signet/.cookie"
/// payout_descriptor = "tr(tpub…/0/*)"   # site: where invoices are paid (public keys only)
/// invoice_min_sat = 10000           # invoice once this much has accrued …
/// invoice_max_age_secs = 86400      # … or once the oldest receipt is this old
/// invoice_ttl_secs = 3600           # time to pay
/// credit_limit_sat = 100000         # most a buyer may owe before new agreements are refused
/// credit_max_unpaid_secs = 7200     # oldest an unpaid invoice may be
/// interval_secs = 30                # time between settlement passes
/// fee_rate_sat_vb = 2               # buyer: fee rate of payments
/// auto_pay = true                   # buyer: pay valid invoices at once
/// ```
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
}

/// Settlement mode as written in config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettleModeName {
    /// Signed IOUs, netted.
    #[default]
    Ledger,
    /// On-chain invoices.
    Onchain,
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

    /// The node's settlement configuration. `wallet` are a buyer's keys (none for a site
    /// that only sells); `chain` overrides the backend the section names (the in-process test
    /// chain).
    pub fn to_config(
        &self,
        wallet: Option<WalletKeys>,
        chain: Option<Arc<dyn ChainSource>>,
    ) -> Result<SettlementConfig, WalletError> {
        let d = SettlementConfig::default();
        let secs =
            |s: Option<u64>, default_ms: u64| s.map_or(default_ms, |s| s.saturating_mul(1000));
        let cfg = SettlementConfig {
            mode: SettleMode::Ledger,
            invoice: InvoicePolicy {
                min_amount: self
                    .invoice_min_sat
                    .map_or(d.invoice.min_amount, |s| Msat(s.saturating_mul(1000))),
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
        if self.mode == SettleModeName::Ledger {
            return Ok(cfg);
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
