//! The buyer's data dir and config, resolved from flags and the config file, and the node the
//! commands start from them.

use std::path::PathBuf;

use hashgrid_node::client::ClientConfig;
use hashgrid_node::settle::{SettleModeName, SettleSection};
use hashgrid_node::store::Store;
use hashgrid_node::wallet::WalletKeys;
use hashgrid_node::{DataDir, NodeHandle};
use hashgrid_protocol::Network;

use crate::{CliError, Global};

/// What to add to the config to settle on chain.
pub(crate) const ONCHAIN_HINT: &str = "add to the config file: [settle] mode = \"onchain\", bitcoin = \"signet\", esplora = \"https://mempool.space/signet/api\"";

/// Everything about the buyer's data dir and config, resolved from flags and the file.
impl Client {
    /// The verification mode: `flag` when given, else the config's `verify`.
    pub(crate) fn verify_mode(
        &self,
        flag: Option<&str>,
    ) -> Result<hashgrid_protocol::VerifyMode, CliError> {
        match flag {
            Some(v) => v
                .parse()
                .map_err(|e: hashgrid_protocol::verify::BadVerifyMode| {
                    CliError::bad_input(e.to_string(), "fix --verify")
                }),
            None => self
                .config
                .verify_mode()
                .map_err(|e| CliError::bad_input(e.to_string(), "fix the config file")),
        }
    }
}

pub(crate) struct Client {
    pub(crate) dir: DataDir,
    pub(crate) config: ClientConfig,
    pub(crate) network: Network,
}

impl Client {
    pub(crate) fn resolve(g: &Global) -> Result<Client, CliError> {
        let root = g
            .data_dir
            .clone()
            .unwrap_or_else(|| DataDir::default_root().join("buyer"));
        let mut config = ClientConfig::load_or_default(&root)
            .map_err(|e| CliError::bad_input(e.to_string(), "fix the config file or pass flags"))?;
        if let Some(n) = &g.network {
            config.network = n.as_str().to_string();
        }
        for b in &g.bootstrap {
            config.bootstrap.push(b.to_string());
        }
        let network = config
            .network()
            .map_err(|e| CliError::bad_input(e.to_string(), "pass --network main|test|NAME"))?;
        Ok(Client {
            dir: DataDir::new(root),
            config,
            network,
        })
    }

    pub(crate) fn store_path(&self) -> PathBuf {
        self.dir.root().join("store")
    }

    /// Opens the store without starting the network (for the offline commands).
    pub(crate) fn open_store(&self) -> Result<Store, CliError> {
        if !self.store_path().exists() {
            return Err(CliError::bad_input(
                format!("no jobs in {}", self.dir.root().display()),
                "submit a job first (hashgrid submit JOB.toml), or pass the --data-dir you used",
            ));
        }
        Store::open(&self.store_path()).map_err(|e| {
            CliError::other(
                e.to_string(),
                "close the other hashgrid process using this data dir",
            )
        })
    }

    /// Starts the buyer's node.
    pub(crate) async fn start(&self) -> Result<NodeHandle, CliError> {
        if self.config.bootstrap.is_empty() && !self.config.mdns {
            return Err(CliError::bad_input(
                "no way to find peers: no bootstrap peers and mDNS is off",
                "pass --bootstrap MULTIADDR or add bootstrap = [...] to the config (hashgrid init --bootstrap ...)",
            ));
        }
        let mut b = self
            .config
            .builder(self.dir.root())
            .map_err(|e| CliError::bad_input(e.to_string(), "fix the config file"))?;
        // Settlement: in on-chain mode the node pays valid invoices that arrive while it runs.
        if let Some(section) = &self.config.settle {
            let keys = self.wallet_keys()?;
            // Lightning mode: the buyer's Lightning node runs while its node does, and stops
            // with it.
            let (s, root) = (section.clone(), self.dir.root().to_path_buf());
            let ln = tokio::task::spawn_blocking(move || s.start_lightning(&root))
                .await
                .map_err(|e| CliError::other(e.to_string(), "try again"))?
                .map_err(|e| {
                    CliError::bad_input(
                        e.to_string(),
                        "fix the [settle] section of the config file",
                    )
                })?
                .map(|l| l as std::sync::Arc<dyn hashgrid_node::settle::LightningBackend>);
            let cfg = section
                .to_config_with_lightning(keys, None, ln)
                .map_err(|e| {
                    CliError::bad_input(
                        e.to_string(),
                        "fix the [settle] section of the config file",
                    )
                })?;
            b = b.settle(cfg);
        }
        b.start().await.map_err(|e| {
            CliError::other(
                e.to_string(),
                "check --data-dir (another hashgrid running?) and the network settings",
            )
        })
    }
}

impl Client {
    /// The `[settle]` section, if this buyer settles on chain.
    pub(crate) fn settle_section(&self) -> Result<SettleSection, CliError> {
        match &self.config.settle {
            Some(s) if s.mode == SettleModeName::Onchain => Ok(s.clone()),
            _ => Err(CliError::bad_input(
                "this buyer settles in ledger mode: it has no Bitcoin wallet",
                ONCHAIN_HINT,
            )),
        }
    }

    /// The keys for a node this CLI starts (on-chain mode only).
    pub(crate) fn wallet_keys(&self) -> Result<Option<WalletKeys>, CliError> {
        let Ok(s) = self.settle_section() else {
            return Ok(None);
        };
        let network = s
            .btc_network()
            .map_err(|e| CliError::bad_input(e.to_string(), ONCHAIN_HINT))?;
        WalletKeys::load_or_create(&self.dir.root().join("wallet.json"), network)
            .map(Some)
            .map_err(|e| CliError::bad_input(e.to_string(), "fix or move the wallet file"))
    }
}
