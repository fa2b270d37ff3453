//! Where wallets learn about the chain: one [`ChainSource`] trait and its backends: Esplora
//! (`bdk_esplora`), Bitcoin Core's RPC (`bdk_bitcoind_rpc`), and the in-process
//! [`TestChain`](super::testchain::TestChain).
//!
//! The calls block (HTTP or RPC round trips); the node runs them on tokio's blocking pool.

use std::path::PathBuf;

use bdk_bitcoind_rpc::bitcoincore_rpc::{self, RpcApi};
use bdk_esplora::EsploraExt;
use bdk_esplora::esplora_client;
use bdk_wallet::bitcoin::{Transaction, Txid};
use serde::{Deserialize, Serialize};

/// How many addresses past the last used one a full scan looks at.
pub const STOP_GAP: usize = 20;
/// Concurrent requests to an Esplora server during a sync.
pub const ESPLORA_PARALLEL_REQUESTS: usize = 4;

/// A chain backend failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The backend could not be reached or answered badly.
    #[error("chain backend unreachable: {0}")]
    Unreachable(String),
    /// The backend refused a transaction.
    #[error("transaction rejected: {0}")]
    Rejected(String),
    /// The backend's chain does not connect to what the wallet knows.
    #[error("chain data does not connect: {0}")]
    Inconsistent(String),
    /// The wallet and the backend are on different networks.
    #[error("wallet is on {wallet}, the chain backend on {chain}")]
    WrongNetwork {
        /// The wallet's network.
        wallet: String,
        /// The backend's network.
        chain: String,
    },
}

/// A view of the Bitcoin chain that can bring a BDK wallet up to date and broadcast.
pub trait ChainSource: Send + Sync + std::fmt::Debug {
    /// One line for logs: the backend and where it is.
    fn describe(&self) -> String;
    /// Brings `wallet` up to the backend's tip: new blocks (and reorganisations), the wallet's
    /// unconfirmed transactions, and those that left the mempool (evicted or double-spent).
    fn sync(&self, wallet: &mut bdk_wallet::Wallet) -> Result<(), ChainError>;
    /// Sends a signed transaction to the network.
    fn broadcast(&self, tx: &Transaction) -> Result<(), ChainError>;
    /// A transaction by id, confirmed or in the mempool.
    fn transaction(&self, txid: &Txid) -> Result<Option<Transaction>, ChainError>;
}

/// Where a node reaches the chain, as written in its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ChainConfig {
    /// An Esplora HTTP API, e.g. `https://mempool.space/signet/api`.
    Esplora {
        /// Base URL.
        url: String,
    },
    /// Bitcoin Core's JSON-RPC.
    Bitcoind {
        /// e.g. `http://127.0.0.1:18443`.
        url: String,
        /// Cookie file (`.cookie` in bitcoind's data dir); or user and password.
        #[serde(default)]
        cookie: Option<PathBuf>,
        /// RPC user.
        #[serde(default)]
        user: Option<String>,
        /// RPC password.
        #[serde(default)]
        password: Option<String>,
    },
}

impl ChainConfig {
    /// Opens the backend.
    pub fn open(&self) -> Result<Box<dyn ChainSource>, ChainError> {
        match self {
            ChainConfig::Esplora { url } => Ok(Box::new(Esplora::new(url)?)),
            ChainConfig::Bitcoind {
                url,
                cookie,
                user,
                password,
            } => {
                let auth = match (cookie, user, password) {
                    (Some(c), _, _) => bitcoincore_rpc::Auth::CookieFile(c.clone()),
                    (None, Some(u), Some(p)) => {
                        bitcoincore_rpc::Auth::UserPass(u.clone(), p.clone())
                    }
                    _ => bitcoincore_rpc::Auth::None,
                };
                Ok(Box::new(BitcoindRpc::new(url, auth)?))
            }
        }
    }
}

/// An Esplora server (Blockstream's esplora, mempool.space, or electrs with its HTTP API).
#[derive(Debug)]
pub struct Esplora {
    url: String,
    client: esplora_client::BlockingClient,
}

impl Esplora {
    /// A client for the server at `url` (no request is made yet).
    pub fn new(url: &str) -> Result<Esplora, ChainError> {
        let url = url.trim_end_matches('/').to_string();
        let client = esplora_client::Builder::new(&url)
            .timeout(30)
            .build_blocking();
        Ok(Esplora { url, client })
    }
}

fn esplora_err(e: impl std::fmt::Display) -> ChainError {
    ChainError::Unreachable(e.to_string())
}

impl ChainSource for Esplora {
    fn describe(&self) -> String {
        format!("esplora at {}", self.url)
    }

    fn sync(&self, wallet: &mut bdk_wallet::Wallet) -> Result<(), ChainError> {
        if wallet.latest_checkpoint().height() == 0 {
            // First contact: discover every used address up to the stop gap.
            let request = wallet.start_full_scan().build();
            let update = self
                .client
                .full_scan(request, STOP_GAP, ESPLORA_PARALLEL_REQUESTS)
                .map_err(esplora_err)?;
            wallet
                .apply_update(update)
                .map_err(|e| ChainError::Inconsistent(e.to_string()))
        } else {
            // Revealed addresses, with the transactions the wallet expects (so ones that left
            // the chain and the mempool are marked evicted).
            let request = wallet.start_sync_with_revealed_spks().build();
            let update = self
                .client
                .sync(request, ESPLORA_PARALLEL_REQUESTS)
                .map_err(esplora_err)?;
            wallet
                .apply_update(update)
                .map_err(|e| ChainError::Inconsistent(e.to_string()))
        }
    }

    fn broadcast(&self, tx: &Transaction) -> Result<(), ChainError> {
        self.client.broadcast(tx).map_err(|e| match e {
            esplora_client::Error::HttpResponse { status, message } if status < 500 => {
                ChainError::Rejected(message)
            }
            other => esplora_err(other),
        })
    }

    fn transaction(&self, txid: &Txid) -> Result<Option<Transaction>, ChainError> {
        self.client.get_tx(txid).map_err(esplora_err)
    }
}

/// Bitcoin Core over JSON-RPC (no wallet needed on the bitcoind side).
pub struct BitcoindRpc {
    url: String,
    client: bitcoincore_rpc::Client,
}

impl std::fmt::Debug for BitcoindRpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitcoindRpc")
            .field("url", &self.url)
            .finish()
    }
}

impl BitcoindRpc {
    /// A client for bitcoind at `url` (no request is made yet).
    pub fn new(url: &str, auth: bitcoincore_rpc::Auth) -> Result<BitcoindRpc, ChainError> {
        let client = bitcoincore_rpc::Client::new(url, auth).map_err(esplora_err)?;
        Ok(BitcoindRpc {
            url: url.to_string(),
            client,
        })
    }
}

impl ChainSource for BitcoindRpc {
    fn describe(&self) -> String {
        format!("bitcoind at {}", self.url)
    }

    fn sync(&self, wallet: &mut bdk_wallet::Wallet) -> Result<(), ChainError> {
        let expected: Vec<_> = wallet
            .transactions()
            .filter(|t| !t.chain_position.is_confirmed())
            .map(|t| t.tx_node.tx.clone())
            .collect();
        let tip = wallet.latest_checkpoint();
        let start = tip.height();
        let mut emitter = bdk_bitcoind_rpc::Emitter::new(&self.client, tip, start, expected);
        while let Some(block) = emitter.next_block().map_err(esplora_err)? {
            let height = block.block_height();
            let connected_to = block.connected_to();
            wallet
                .apply_block_connected_to(&block.block, height, connected_to)
                .map_err(|e| ChainError::Inconsistent(e.to_string()))?;
        }
        let mempool = emitter.mempool().map_err(esplora_err)?;
        wallet.apply_evicted_txs(mempool.evicted);
        wallet.apply_unconfirmed_txs(mempool.update);
        Ok(())
    }

    fn broadcast(&self, tx: &Transaction) -> Result<(), ChainError> {
        self.client
            .send_raw_transaction(tx)
            .map(|_| ())
            .map_err(|e| match e {
                bitcoincore_rpc::Error::JsonRpc(j) => ChainError::Rejected(j.to_string()),
                other => esplora_err(other),
            })
    }

    fn transaction(&self, txid: &Txid) -> Result<Option<Transaction>, ChainError> {
        match self.client.get_raw_transaction(txid, None) {
            Ok(tx) => Ok(Some(tx)),
            // -5: no such transaction (needs -txindex for confirmed ones not in the wallet).
            Err(bitcoincore_rpc::Error::JsonRpc(bitcoincore_rpc::jsonrpc::Error::Rpc(e)))
                if e.code == -5 =>
            {
                Ok(None)
            }
            Err(e) => Err(esplora_err(e)),
        }
    }
}
