//! Bitcoin wallets (BDK): the buyer's spending wallet and the provider's watch-only payout
//! wallet, persisted in the node's sled store, and the chain backends they sync from.
//!
//! `bitcoin`, `secp256k1` and `miniscript` are reached through `bdk_wallet`'s re-exports, so the
//! workspace links one copy of each.
//!
//! Keys: a buyer's wallet descriptor holds its extended private key; it lives in
//! `<data-dir>/wallet.json`, written with mode 0600 and refused if group or others can read it.
//! A provider only needs its payout descriptor's public half (`tr(xpub…/0/*)`), from its config.

pub mod chain;
pub mod esplora_server;
mod persist;
pub mod rpc_server;
mod serve_http;
pub mod testchain;

use std::io::Write;
use std::path::Path;
use std::str::FromStr;

pub use bdk_wallet::bitcoin;
use bdk_wallet::bitcoin::bip32::Xpriv;
use bdk_wallet::bitcoin::{Address, Amount, FeeRate, Network, OutPoint, Script, Transaction};
use bdk_wallet::miniscript::descriptor::{Descriptor, DescriptorPublicKey, KeyMap, KeyMapWrapper};
use bdk_wallet::{KeychainKind, PersistedWallet, SignOptions};
use serde::{Deserialize, Serialize};

pub use chain::{ChainConfig, ChainError, ChainSource};
pub use persist::SledPersister;
pub use testchain::TestChain;

pub(crate) fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The Bitcoin network a node settles on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BtcNetwork {
    /// Local regtest (and the in-process test chain).
    Regtest,
    /// The signet.
    Signet,
    /// testnet3/4.
    Testnet,
    /// Real money; a node only uses it when told so explicitly (`allow_mainnet`).
    Mainnet,
}

impl BtcNetwork {
    /// The `bitcoin` crate's network.
    pub fn to_bitcoin(self) -> Network {
        match self {
            BtcNetwork::Regtest => Network::Regtest,
            BtcNetwork::Signet => Network::Signet,
            BtcNetwork::Testnet => Network::Testnet,
            BtcNetwork::Mainnet => Network::Bitcoin,
        }
    }

    /// Refuses mainnet unless `allow_mainnet`.
    pub fn check_allowed(self, allow_mainnet: bool) -> Result<(), WalletError> {
        if self == BtcNetwork::Mainnet && !allow_mainnet {
            return Err(WalletError::MainnetNotAllowed);
        }
        Ok(())
    }
}

impl FromStr for BtcNetwork {
    type Err = WalletError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "regtest" => Ok(BtcNetwork::Regtest),
            "signet" => Ok(BtcNetwork::Signet),
            "testnet" | "testnet3" | "testnet4" => Ok(BtcNetwork::Testnet),
            "mainnet" | "bitcoin" => Ok(BtcNetwork::Mainnet),
            other => Err(WalletError::Config(format!(
                "unknown bitcoin network {other:?} (regtest, signet, testnet or mainnet)"
            ))),
        }
    }
}

impl std::fmt::Display for BtcNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BtcNetwork::Regtest => "regtest",
            BtcNetwork::Signet => "signet",
            BtcNetwork::Testnet => "testnet",
            BtcNetwork::Mainnet => "mainnet",
        })
    }
}

/// A wallet operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalletError {
    /// Bad configuration (network, descriptor, address).
    #[error("{0}")]
    Config(String),
    /// Mainnet was asked for without the explicit opt-in.
    #[error(
        "refusing to use Bitcoin mainnet without an explicit opt-in (set allow_mainnet = true / pass --allow-mainnet)"
    )]
    MainnetNotAllowed,
    /// The stored wallet was made with other descriptors or another network.
    #[error("the stored wallet does not match the configured descriptor or network: {0}")]
    Mismatch(String),
    /// The store failed.
    #[error("wallet store: {0}")]
    Store(#[from] persist::PersistError),
    /// The key file failed.
    #[error("wallet key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The chain backend failed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Not enough confirmed funds.
    #[error("insufficient funds: {needed} sat needed, {available} sat spendable")]
    InsufficientFunds {
        /// Needed (amount and fee).
        needed: u64,
        /// Spendable.
        available: u64,
    },
    /// Building or signing the transaction failed.
    #[error("cannot build the payment: {0}")]
    Build(String),
    /// An address is for another network or malformed.
    #[error("bad address {address:?}: {reason}")]
    Address {
        /// What was given.
        address: String,
        /// Why it is refused.
        reason: String,
    },
}

/// The descriptors of a buyer's wallet, as stored in `wallet.json` (mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WalletKeys {
    /// The network the keys are for.
    pub network: BtcNetwork,
    /// Receive descriptor, with the private key.
    pub external: String,
    /// Change descriptor, with the private key.
    pub internal: String,
}

impl WalletKeys {
    /// Fresh BIP86 taproot descriptors from 32 random bytes.
    pub fn generate(network: BtcNetwork) -> Result<WalletKeys, WalletError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| WalletError::Config(e.to_string()))?;
        let xprv = Xpriv::new_master(network.to_bitcoin(), &seed)
            .map_err(|e| WalletError::Config(e.to_string()))?;
        let coin = if network == BtcNetwork::Mainnet { 0 } else { 1 };
        Ok(WalletKeys {
            network,
            external: format!("tr({xprv}/86'/{coin}'/0'/0/*)"),
            internal: format!("tr({xprv}/86'/{coin}'/0'/1/*)"),
        })
    }

    /// The receive descriptor without private keys (`tr(tpub…/0/*)`): what a provider puts in
    /// its config as the payout descriptor of a watch-only wallet.
    pub fn public_external(&self) -> Result<String, WalletError> {
        let secp = bitcoin::secp256k1::Secp256k1::new();
        let (d, _) = Descriptor::<DescriptorPublicKey>::parse_descriptor(&secp, &self.external)
            .map_err(|e| WalletError::Config(format!("bad descriptor: {e}")))?;
        Ok(d.to_string())
    }

    /// Loads `path`, or creates it with fresh keys for `network`. Refuses a file that group or
    /// others can read, and keys for another network.
    pub fn load_or_create(path: &Path, network: BtcNetwork) -> Result<WalletKeys, WalletError> {
        let err = |reason: String| WalletError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(path)
                        .map_err(|e| err(e.to_string()))?
                        .permissions()
                        .mode()
                        & 0o777;
                    if mode & 0o077 != 0 {
                        return Err(err(format!(
                            "mode {mode:o} lets others read the wallet's private key; run chmod 600"
                        )));
                    }
                }
                let keys: WalletKeys =
                    serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
                if keys.network != network {
                    return Err(err(format!(
                        "holds {} keys, the node is configured for {network}",
                        keys.network
                    )));
                }
                Ok(keys)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = WalletKeys::generate(network)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
                let json = serde_json::to_vec_pretty(&keys).map_err(|e| err(e.to_string()))?;
                f.write_all(&json).map_err(|e| err(e.to_string()))?;
                f.sync_all().map_err(|e| err(e.to_string()))?;
                Ok(keys)
            }
            Err(e) => Err(err(e.to_string())),
        }
    }
}

/// An output the wallet owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Where.
    pub outpoint: OutPoint,
    /// How much.
    pub amount_sat: u64,
    /// Confirmations (0 in the mempool).
    pub confirmations: u32,
}

/// Confirmed and unconfirmed funds, in sats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WalletBalance {
    /// Confirmed and spendable.
    pub confirmed: u64,
    /// Unconfirmed, ours (change) or others'.
    pub unconfirmed: u64,
    /// Coinbase outputs not yet mature.
    pub immature: u64,
}

/// A BDK wallet persisted in a sled tree; every change is flushed before a call returns.
pub struct Wallet {
    inner: PersistedWallet<SledPersister>,
    persister: SledPersister,
    network: BtcNetwork,
    /// The descriptors' private keys; `None` for a watch-only wallet.
    signer: Option<KeyMapWrapper>,
}

impl std::fmt::Debug for KeysHidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<keys>")
    }
}
struct KeysHidden;

/// The private keys in `descriptors` (none for public descriptors).
fn keymap_of(descriptors: &[&str]) -> Result<Option<KeyMapWrapper>, WalletError> {
    let secp = bitcoin::secp256k1::Secp256k1::new();
    let mut all = KeyMap::new();
    for d in descriptors {
        let (_, keys) = Descriptor::<DescriptorPublicKey>::parse_descriptor(&secp, d)
            .map_err(|e| WalletError::Config(format!("bad descriptor: {e}")))?;
        all.extend(keys);
    }
    Ok((!all.is_empty()).then(|| KeyMapWrapper::from(all)))
}

impl Wallet {
    /// Opens the wallet stored in `tree`, or creates it. `internal` is the change descriptor
    /// (none for a watch-only payout wallet). A stored wallet made from other descriptors or on
    /// another network is refused.
    pub fn open(
        tree: sled::Tree,
        external: &str,
        internal: Option<&str>,
        network: BtcNetwork,
    ) -> Result<Wallet, WalletError> {
        let mut persister = SledPersister::new(tree);
        let mut descriptors = vec![external];
        descriptors.extend(internal);
        let signer = keymap_of(&descriptors)?;
        let mut load = bdk_wallet::Wallet::load()
            .descriptor(KeychainKind::External, Some(external.to_string()))
            .check_network(network.to_bitcoin());
        if let Some(internal) = internal {
            load = load.descriptor(KeychainKind::Internal, Some(internal.to_string()));
        }
        let loaded = load.load_wallet(&mut persister).map_err(|e| match e {
            bdk_wallet::LoadWithPersistError::Persist(p) => WalletError::Store(p),
            bdk_wallet::LoadWithPersistError::InvalidChangeSet(c) => {
                WalletError::Mismatch(c.to_string())
            }
        })?;
        let inner = match loaded {
            Some(w) => w,
            None => {
                let params = match internal {
                    Some(internal) => {
                        bdk_wallet::Wallet::create(external.to_string(), internal.to_string())
                    }
                    None => bdk_wallet::Wallet::create_single(external.to_string()),
                };
                params
                    .network(network.to_bitcoin())
                    .create_wallet(&mut persister)
                    .map_err(|e| match e {
                        bdk_wallet::CreateWithPersistError::Persist(p) => WalletError::Store(p),
                        other => WalletError::Config(format!("bad descriptor: {other}")),
                    })?
            }
        };
        Ok(Wallet {
            inner,
            persister,
            network,
            signer,
        })
    }

    fn save(&mut self) -> Result<(), WalletError> {
        self.inner.persist(&mut self.persister)?;
        Ok(())
    }

    /// The wallet's network.
    pub fn network(&self) -> BtcNetwork {
        self.network
    }

    /// A fresh receive address (its index is persisted before it is returned, so it is never
    /// handed out twice).
    pub fn reveal_address(&mut self) -> Result<(u32, Address), WalletError> {
        let info = self.inner.reveal_next_address(KeychainKind::External);
        self.save()?;
        Ok((info.index, info.address))
    }

    /// The receive address at `index`.
    pub fn address_at(&self, index: u32) -> Address {
        self.inner
            .peek_address(KeychainKind::External, index)
            .address
    }

    /// Brings the wallet up to `chain`'s tip and persists what changed.
    pub fn sync(&mut self, chain: &dyn ChainSource) -> Result<(), WalletError> {
        chain.sync(&mut self.inner)?;
        self.save()
    }

    /// Height of the last block the wallet knows.
    pub fn tip_height(&self) -> u32 {
        self.inner.latest_checkpoint().height()
    }

    /// The balance, in sats.
    pub fn balance(&self) -> WalletBalance {
        let b = self.inner.balance();
        WalletBalance {
            confirmed: b.confirmed.to_sat(),
            unconfirmed: (b.trusted_pending + b.untrusted_pending).to_sat(),
            immature: b.immature.to_sat(),
        }
    }

    /// Outputs to `script` that are in the best chain or the mempool (as of the last sync),
    /// with their confirmations.
    pub fn received_at(&self, script: &Script) -> Vec<Received> {
        let tip = self.tip_height();
        self.inner
            .list_output()
            .filter(|o| o.txout.script_pubkey.as_script() == script)
            .map(|o| Received {
                outpoint: o.outpoint,
                amount_sat: o.txout.value.to_sat(),
                confirmations: match o.chain_position {
                    bdk_wallet::chain::ChainPosition::Confirmed { anchor, .. } => {
                        tip.saturating_sub(anchor.block_id.height) + 1
                    }
                    bdk_wallet::chain::ChainPosition::Unconfirmed { .. } => 0,
                },
            })
            .collect()
    }

    /// Parses `address` and checks it is for this wallet's network.
    pub fn parse_address(&self, address: &str) -> Result<Address, WalletError> {
        let bad = |reason: String| WalletError::Address {
            address: address.to_string(),
            reason,
        };
        Address::from_str(address)
            .map_err(|e| bad(e.to_string()))?
            .require_network(self.network.to_bitcoin())
            .map_err(|e| bad(e.to_string()))
    }

    /// Builds and signs a payment of `amount_sat` to `to` (change back to the wallet). The
    /// change index is persisted; nothing is broadcast.
    pub fn pay(
        &mut self,
        to: &Address,
        amount_sat: u64,
        fee_rate_sat_vb: u64,
    ) -> Result<Transaction, WalletError> {
        let fee_rate = FeeRate::from_sat_per_vb(fee_rate_sat_vb)
            .ok_or_else(|| WalletError::Build(format!("fee rate {fee_rate_sat_vb} sat/vB")))?;
        let available = self.balance().confirmed + self.balance().unconfirmed;
        let mut builder = self.inner.build_tx();
        builder
            .add_recipient(to.script_pubkey(), Amount::from_sat(amount_sat))
            .fee_rate(fee_rate);
        let mut psbt = builder.finish().map_err(|e| match e {
            bdk_wallet::error::CreateTxError::CoinSelection(c) => WalletError::InsufficientFunds {
                needed: c.needed.to_sat(),
                available,
            },
            other => WalletError::Build(other.to_string()),
        })?;
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| WalletError::Build("a watch-only wallet cannot pay".into()))?;
        psbt.sign(signer, self.inner.secp_ctx())
            .map_err(|(_, errors)| WalletError::Build(format!("signing failed: {errors:?}")))?;
        let finalized = self
            .inner
            .finalize_psbt(&mut psbt, SignOptions::default())
            .map_err(|e| WalletError::Build(e.to_string()))?;
        if !finalized {
            return Err(WalletError::Build(
                "the wallet could not sign every input (watch-only?)".into(),
            ));
        }
        let tx = psbt
            .extract_tx()
            .map_err(|e| WalletError::Build(e.to_string()))?;
        // Remember the transaction as ours and unconfirmed, so its inputs are not spent twice
        // before the next sync.
        self.inner
            .apply_unconfirmed_txs([(tx.clone(), unix_secs())]);
        self.save()?;
        Ok(tx)
    }

    /// The underlying BDK wallet, for reads the methods above do not cover.
    pub fn bdk(&self) -> &bdk_wallet::Wallet {
        &self.inner
    }
}

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wallet")
            .field("network", &self.network)
            .field("tip", &self.tip_height())
            .field("signer", &self.signer.as_ref().map(|_| KeysHidden))
            .finish()
    }
}

/// A BIP21 payment URI: `bitcoin:ADDRESS?amount=BTC&label=…`.
pub fn bip21(address: &str, amount_sat: u64, label: &str) -> String {
    let btc = format!(
        "{}.{:08}",
        amount_sat / 100_000_000,
        amount_sat % 100_000_000
    );
    let btc = btc.trim_end_matches('0').trim_end_matches('.');
    let label: String = label
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    format!("bitcoin:{address}?amount={btc}&label={label}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bip21_amounts_are_exact_btc_decimals() {
        assert_eq!(
            bip21("bcrt1qxyz", 150_000_000, "hashgrid invoice 1"),
            "bitcoin:bcrt1qxyz?amount=1.5&label=hashgrid%20invoice%201"
        );
        assert_eq!(bip21("a", 1, "x"), "bitcoin:a?amount=0.00000001&label=x");
        assert_eq!(bip21("a", 100_000_000, "x"), "bitcoin:a?amount=1&label=x");
    }

    #[test]
    fn mainnet_needs_the_flag() {
        assert!(matches!(
            BtcNetwork::Mainnet.check_allowed(false),
            Err(WalletError::MainnetNotAllowed)
        ));
        BtcNetwork::Mainnet.check_allowed(true).unwrap();
        BtcNetwork::Signet.check_allowed(false).unwrap();
        assert!("bogus".parse::<BtcNetwork>().is_err());
    }

    #[test]
    fn key_file_is_private_and_network_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wallet.json");
        let k = WalletKeys::load_or_create(&path, BtcNetwork::Regtest).unwrap();
        let again = WalletKeys::load_or_create(&path, BtcNetwork::Regtest).unwrap();
        assert_eq!(k.external, again.external);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = WalletKeys::load_or_create(&path, BtcNetwork::Regtest).unwrap_err();
            assert!(e.to_string().contains("chmod 600"), "{e}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let e = WalletKeys::load_or_create(&path, BtcNetwork::Signet).unwrap_err();
        assert!(e.to_string().contains("regtest"), "{e}");
    }
}
