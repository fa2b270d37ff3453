//! [`LightningBackend`] on an embedded [ldk-node](https://docs.rs/ldk-node): channels, payments
//! and the on-chain wallet that funds them, with the seed and all state in one directory of the
//! hashgrid data dir.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hashgrid_protocol::Msat;
use ldk_node::bitcoin::Network;
use ldk_node::bitcoin::hashes::{Hash, sha256};
use ldk_node::bitcoin::secp256k1::PublicKey as NodeId;
use ldk_node::config::{BackgroundSyncConfig, EsploraSyncConfig};
use ldk_node::lightning::ln::channelmanager::PaymentId;
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::lightning::util::logger::Level;
use ldk_node::lightning_invoice::{Bolt11Invoice, Bolt11InvoiceDescription, Sha256};
use ldk_node::payment::{PaymentDetails, PaymentKind};
use ldk_node::{Event, NodeError, UserChannelId};

use crate::backend::{
    Balances, ChannelInfo, ChannelRef, LightningBackend, LnEvent, PaymentDirection, PaymentInfo,
    PaymentStatus, PeerAddr,
};
use crate::error::LnError;
use crate::invoice::{self, Expected, PaymentHash, Preimage};
use crate::store::{ManagerWrites, WatchedStore};

/// The seed's file name inside [`LdkConfig::dir`]: 64 random bytes, mode 0600.
pub const SEED_FILE: &str = "seed";
const SEED_LEN: usize = 64;
/// How long `pay` waits for the channel manager's write after sending.
const MANAGER_WRITE_WAIT: Duration = Duration::from_secs(10);

/// How to run the embedded node.
#[derive(Debug, Clone)]
pub struct LdkConfig {
    /// Its directory (seed, channel state, payments, logs); created if missing.
    pub dir: PathBuf,
    /// The Bitcoin network.
    pub network: Network,
    /// Where it reads the chain and broadcasts (the backend `[settle]` names).
    pub chain: LnChain,
    /// Where it listens for Lightning peers (`None`: it only dials out).
    pub listen: Option<SocketAddr>,
    /// Sync with the chain in the background at this interval (at least 10 s); `None` syncs
    /// only when [`LightningBackend::sync`] is called (tests, which mine on demand).
    pub background_sync: Option<Duration>,
}

/// Where the embedded node reads the chain and broadcasts its transactions.
#[derive(Clone, PartialEq, Eq)]
pub enum LnChain {
    /// An Esplora server (its base URL); synced every [`LdkConfig::background_sync`].
    Esplora(String),
    /// Bitcoin Core's JSON-RPC, polled every 2 s (ldk-node's interval); the node needs no
    /// wallet on the bitcoind side, only the chain (not pruned below the channels' age).
    Bitcoind {
        /// Host name or address.
        host: String,
        /// RPC port.
        port: u16,
        /// RPC user (`__cookie__` with a cookie file).
        user: String,
        /// RPC password.
        password: String,
    },
}

impl std::fmt::Debug for LnChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LnChain::Esplora(url) => f.debug_tuple("Esplora").field(url).finish(),
            LnChain::Bitcoind { host, port, .. } => f
                .debug_struct("Bitcoind")
                .field("host", host)
                .field("port", port)
                .finish_non_exhaustive(),
        }
    }
}

/// An embedded LDK node.
pub struct LdkBackend {
    node: ldk_node::Node,
    manager_writes: Arc<ManagerWrites>,
    network: Network,
    listen: Option<SocketAddr>,
}

impl std::fmt::Debug for LdkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdkBackend")
            .field("node_id", &self.node.node_id())
            .field("network", &self.network)
            .field("listen", &self.listen)
            .finish()
    }
}

impl LdkBackend {
    /// Builds and starts the node from `config.dir`, creating its seed on first start.
    pub fn start(config: &LdkConfig) -> Result<LdkBackend, LnError> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| LnError::Start(format!("{}: {e}", config.dir.display())))?;
        let seed = load_or_create_seed(&config.dir.join(SEED_FILE))?;
        let mut b = ldk_node::Builder::new();
        b.set_network(config.network);
        let state = config.dir.join("ldk");
        b.set_storage_dir_path(state.to_string_lossy().into_owned());
        b.set_filesystem_logger(
            Some(config.dir.join("ldk.log").to_string_lossy().into_owned()),
            Some(Level::Info),
        );
        let background_sync_config = config.background_sync.map(|every| {
            let secs = every.as_secs().max(10);
            BackgroundSyncConfig {
                onchain_wallet_sync_interval_secs: secs,
                lightning_wallet_sync_interval_secs: secs,
                fee_rate_cache_update_interval_secs: secs.max(60),
            }
        });
        match &config.chain {
            LnChain::Esplora(url) => {
                b.set_chain_source_esplora(
                    url.clone(),
                    Some(EsploraSyncConfig {
                        background_sync_config,
                    }),
                );
            }
            LnChain::Bitcoind {
                host,
                port,
                user,
                password,
            } => {
                b.set_chain_source_bitcoind_rpc(
                    host.clone(),
                    *port,
                    user.clone(),
                    password.clone(),
                );
            }
        }
        if let Some(addr) = config.listen {
            b.set_listening_addresses(vec![SocketAddress::from(addr)])
                .map_err(|e| LnError::Start(format!("listen on {addr}: {e}")))?;
        }
        b.set_entropy_seed_bytes(seed);
        let (store, manager_writes) = WatchedStore::open(&state)
            .map_err(|e| LnError::Start(format!("{}: {e}", state.display())))?;
        let node = b
            .build_with_store(Arc::new(store))
            .map_err(|e| LnError::Start(e.to_string()))?;
        node.start().map_err(|e| LnError::Start(e.to_string()))?;
        Ok(LdkBackend {
            node,
            manager_writes,
            network: config.network,
            listen: config.listen,
        })
    }

    /// The ldk-node underneath, for what the trait does not cover.
    pub fn node(&self) -> &ldk_node::Node {
        &self.node
    }
}

/// Reads the seed, or writes a fresh one (mode 0600, never overwriting). Refuses a seed that
/// group or others can read, or one of the wrong length.
fn load_or_create_seed(path: &Path) -> Result<[u8; SEED_LEN], LnError> {
    let err = |reason: String| LnError::Seed {
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
                        "mode {mode:o} lets others read the Lightning node's keys; run chmod 600"
                    )));
                }
            }
            bytes
                .try_into()
                .map_err(|b: Vec<u8>| err(format!("{} bytes, expected {SEED_LEN}", b.len())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; SEED_LEN];
            getrandom::fill(&mut seed).map_err(|e| err(e.to_string()))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
            f.write_all(&seed)
                .and_then(|()| f.sync_all())
                .map_err(|e| err(e.to_string()))?;
            Ok(seed)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

fn channel_ref(id: UserChannelId, peer: NodeId) -> ChannelRef {
    ChannelRef { id: id.0, peer }
}

fn payment_info(p: &PaymentDetails) -> Option<PaymentInfo> {
    let (hash, preimage) = match &p.kind {
        PaymentKind::Bolt11 { hash, preimage, .. } => (*hash, *preimage),
        _ => return None,
    };
    let status = match p.status {
        ldk_node::payment::PaymentStatus::Pending => PaymentStatus::Pending,
        ldk_node::payment::PaymentStatus::Succeeded => match preimage {
            Some(pre) => PaymentStatus::Succeeded(Preimage(pre.0)),
            None => PaymentStatus::Pending,
        },
        ldk_node::payment::PaymentStatus::Failed => PaymentStatus::Failed,
    };
    Some(PaymentInfo {
        hash: PaymentHash(hash.0),
        direction: match p.direction {
            ldk_node::payment::PaymentDirection::Outbound => PaymentDirection::Outbound,
            ldk_node::payment::PaymentDirection::Inbound => PaymentDirection::Inbound,
        },
        amount: p.amount_msat.map(Msat),
        fee_msat: p.fee_paid_msat,
        status,
    })
}

impl LightningBackend for LdkBackend {
    fn node_id(&self) -> NodeId {
        self.node.node_id()
    }

    fn listen_addr(&self) -> Option<PeerAddr> {
        self.listen.map(|addr| PeerAddr {
            node_id: self.node.node_id(),
            addr,
        })
    }

    fn new_address(&self) -> Result<String, LnError> {
        self.node
            .onchain_payment()
            .new_address()
            .map(|a| a.to_string())
            .map_err(|e| LnError::node("new address", e))
    }

    fn sync(&self) -> Result<(), LnError> {
        self.node
            .sync_wallets()
            .map_err(|e| LnError::node("sync", e))
    }

    fn invoice(
        &self,
        amount: Msat,
        description_hash: [u8; 32],
        expiry: Duration,
    ) -> Result<Bolt11Invoice, LnError> {
        let hash = Sha256(sha256::Hash::from_byte_array(description_hash));
        let expiry = u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX);
        self.node
            .bolt11_payment()
            .receive(amount.0, &Bolt11InvoiceDescription::Hash(hash), expiry)
            .map_err(|e| LnError::node("invoice", e))
    }

    fn pay(&self, inv: &Bolt11Invoice, expected: &Expected) -> Result<PaymentHash, LnError> {
        invoice::check(inv, expected, now())?;
        let hash = invoice::payment_hash(inv);
        match self.node.bolt11_payment().send(inv, None) {
            Ok(_) => {
                // Return once the channel manager that knows of this payment is on disk: a
                // caller that records the payment as made and is then killed restarts with a
                // manager no older than the channel monitors (else LDK force-closes). The
                // monitor was written inside `send`; a manager write that completes after it
                // may have been serialised before it, but the one after that was serialised
                // once that write ended, so two completed writes prove it. (Counting from
                // before `send` force-closed the channel in 2 of 6 kills.)
                let seen = self.manager_writes.count();
                if !self.manager_writes.wait_past(seen + 1, MANAGER_WRITE_WAIT)
                    && self.manager_writes.count() == seen
                {
                    return Err(LnError::node(
                        "pay",
                        "sent, but the channel state was not persisted in time",
                    ));
                }
                Ok(hash)
            }
            Err(NodeError::DuplicatePayment) => Ok(hash),
            Err(e) => Err(LnError::node("pay", e)),
        }
    }

    fn payment(&self, hash: &PaymentHash) -> Option<PaymentInfo> {
        self.node
            .payment(&PaymentId(hash.0))
            .as_ref()
            .and_then(payment_info)
    }

    fn balances(&self) -> Balances {
        let b = self.node.list_balances();
        let channels = self.node.list_channels();
        let usable = channels.iter().filter(|c| c.is_usable);
        Balances {
            onchain_sat: b.total_onchain_balance_sats,
            onchain_spendable_sat: b.spendable_onchain_balance_sats,
            outbound_msat: usable.clone().map(|c| c.outbound_capacity_msat).sum(),
            inbound_msat: usable.map(|c| c.inbound_capacity_msat).sum(),
            lightning_sat: b.total_lightning_balance_sats,
        }
    }

    fn channels(&self) -> Vec<ChannelInfo> {
        self.node
            .list_channels()
            .into_iter()
            .map(|c| ChannelInfo {
                id: c.user_channel_id.0.to_string(),
                peer: c.counterparty_node_id.to_string(),
                funding: c.funding_txo.map(|o| o.to_string()),
                capacity_sat: c.channel_value_sats,
                outbound_msat: c.outbound_capacity_msat,
                inbound_msat: c.inbound_capacity_msat,
                ready: c.is_channel_ready,
                usable: c.is_usable,
                opened_here: c.is_outbound,
            })
            .collect()
    }

    fn open_channel(
        &self,
        peer: &PeerAddr,
        amount_sat: u64,
        push_msat: u64,
    ) -> Result<ChannelRef, LnError> {
        let id = self
            .node
            .open_channel(
                peer.node_id,
                SocketAddress::from(peer.addr),
                amount_sat,
                (push_msat > 0).then_some(push_msat),
                None,
            )
            .map_err(|e| LnError::node("open channel", e))?;
        Ok(channel_ref(id, peer.node_id))
    }

    fn close_channel(&self, channel: &ChannelRef, force: bool) -> Result<(), LnError> {
        let known =
            self.node.list_channels().iter().any(|c| {
                c.user_channel_id.0 == channel.id && c.counterparty_node_id == channel.peer
            });
        if !known {
            return Err(LnError::UnknownChannel(channel.id.to_string()));
        }
        let id = UserChannelId(channel.id);
        if force {
            self.node
                .force_close_channel(&id, channel.peer, Some("closed by its operator".into()))
                .map_err(|e| LnError::node("force-close channel", e))
        } else {
            self.node
                .close_channel(&id, channel.peer)
                .map_err(|e| LnError::node("close channel", e))
        }
    }

    fn next_event(&self) -> Option<LnEvent> {
        let e = self.node.next_event()?;
        Some(match e {
            Event::PaymentReceived {
                payment_hash,
                amount_msat,
                ..
            } => LnEvent::Received {
                hash: PaymentHash(payment_hash.0),
                amount: Msat(amount_msat),
            },
            Event::PaymentSuccessful {
                payment_hash,
                payment_preimage: Some(pre),
                fee_paid_msat,
                ..
            } => LnEvent::Sent {
                hash: PaymentHash(payment_hash.0),
                preimage: Preimage(pre.0),
                fee_msat: fee_paid_msat.unwrap_or(0),
            },
            Event::PaymentFailed {
                payment_hash,
                reason,
                ..
            } => LnEvent::SendFailed {
                hash: payment_hash.map(|h| PaymentHash(h.0)),
                reason: reason.map_or_else(|| "unknown".to_string(), |r| format!("{r:?}")),
            },
            Event::ChannelPending {
                user_channel_id,
                counterparty_node_id,
                funding_txo,
                ..
            } => LnEvent::ChannelPending {
                channel: channel_ref(user_channel_id, counterparty_node_id),
                funding: funding_txo.to_string(),
            },
            Event::ChannelReady {
                user_channel_id,
                counterparty_node_id: Some(peer),
                ..
            } => LnEvent::ChannelReady {
                channel: channel_ref(user_channel_id, peer),
            },
            Event::ChannelClosed {
                user_channel_id,
                counterparty_node_id: Some(peer),
                reason,
                ..
            } => LnEvent::ChannelClosed {
                channel: channel_ref(user_channel_id, peer),
                reason: reason.map_or_else(|| "unknown".to_string(), |r| r.to_string()),
            },
            other => LnEvent::Other(format!("{other:?}")),
        })
    }

    fn event_handled(&self) -> Result<(), LnError> {
        self.node
            .event_handled()
            .map_err(|e| LnError::node("event handled", e))
    }

    fn stop(&self) -> Result<(), LnError> {
        match self.node.stop() {
            Ok(()) | Err(NodeError::NotRunning) => Ok(()),
            Err(e) => Err(LnError::node("stop", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SEED_FILE);
        let seed = load_or_create_seed(&path).expect("create");
        assert_eq!(load_or_create_seed(&path).expect("read"), seed);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let e = load_or_create_seed(&path).expect_err("readable by others");
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
    }

    #[test]
    fn a_seed_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SEED_FILE);
        std::fs::write(&path, [7u8; 32]).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let e = load_or_create_seed(&path).expect_err("short seed");
        assert!(e.to_string().contains("32 bytes, expected 64"), "{e}");
    }
}
