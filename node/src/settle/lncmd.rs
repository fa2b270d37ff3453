//! What `hashgrid ln` and `hashgrid-node ln` do: start the data dir's Lightning node, act,
//! stop it cleanly (a clean stop persists its channel state).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashgrid_lightning::{ChannelRef, LdkBackend, LightningBackend, LnEvent, PeerAddr};
use serde_json::{Value, json};

use crate::store::Store;
use crate::wallet::WalletError;

use super::section::{SettleModeName, SettleSection};

/// A Lightning command (`hashgrid ln …`, `hashgrid-node ln …`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum LnCommand {
    /// Node id, listen address, balances and channels.
    ///
    /// Example: hashgrid ln status --json
    Status,
    /// A fresh on-chain address of the Lightning node's wallet, to fund channels from.
    ///
    /// Example: hashgrid ln address
    Address,
    /// Open a channel of SATS to a peer's Lightning node, funded from the on-chain wallet.
    ///
    /// Example: hashgrid ln open 02ab…@site.example:9735 1000000
    Open {
        /// The peer, NODE_ID@HOST:PORT (a site logs its own when it starts).
        peer: String,
        /// Channel size in sats.
        sats: u64,
        /// Msat given to the peer at once (default none).
        #[arg(long, default_value_t = 0)]
        push_msat: u64,
    },
    /// Close a channel cooperatively; the funds return on chain once the close confirms.
    ///
    /// Example: hashgrid ln close 282670767429546922694711310273693479403
    Close {
        /// The channel id, as `ln status` lists it.
        channel: String,
        /// Close without the peer (it is gone for good): broadcast this node's latest
        /// commitment; its own funds return after the channel's delay (144 blocks by default).
        #[arg(long)]
        force: bool,
    },
}

/// How long a command waits for the node to broadcast what it was asked to (a channel's
/// funding or closing transaction) before it stops.
const BROADCAST_WAIT: Duration = Duration::from_secs(30);

fn err(e: impl std::fmt::Display) -> WalletError {
    WalletError::Config(e.to_string())
}

/// Runs `cmd` against the Lightning node of the data dir at `root`, configured by `section`
/// (which must be in lightning mode). The node must not be running: the store is opened first,
/// so a running node (which holds it) makes this fail instead of running a second copy of
/// its Lightning state. Blocks; returns what to print.
pub fn ln_command(
    section: &SettleSection,
    root: &Path,
    cmd: &LnCommand,
) -> Result<Value, WalletError> {
    if section.mode != SettleModeName::Lightning {
        return Err(WalletError::Config(
            "this node does not settle over Lightning: set [settle] mode = \"lightning\"".into(),
        ));
    }
    // Held for the whole command: a running node holds it, and two processes must never run
    // the same Lightning state.
    let _store = Store::open(&root.join("store")).map_err(|e| {
        err(format!(
            "{e} (stop the node using this data dir first: it runs the Lightning node)"
        ))
    })?;
    let node = Arc::new(LdkBackend::start(&section.ldk_config(root)?).map_err(err)?);
    let out = run(&node, cmd);
    let stopped = node.stop();
    let out = out?;
    stopped.map_err(err)?;
    Ok(out)
}

fn run(node: &Arc<LdkBackend>, cmd: &LnCommand) -> Result<Value, WalletError> {
    // Best effort: a command still answers from the stored state when the chain source is
    // unreachable.
    let synced = node.sync();
    match cmd {
        LnCommand::Status => Ok(json!({
            "node_id": node.node_id().to_string(),
            "listen": node.listen_addr().map(|a| a.to_string()),
            "synced": synced.as_ref().map_or_else(|e| Value::String(e.to_string()), |()| Value::Bool(true)),
            "balances": node.balances(),
            "channels": node.channels(),
        })),
        LnCommand::Address => Ok(json!({ "address": node.new_address().map_err(err)? })),
        LnCommand::Open {
            peer,
            sats,
            push_msat,
        } => {
            synced.map_err(err)?;
            let peer: PeerAddr = peer.parse().map_err(err)?;
            let ch = node.open_channel(&peer, *sats, *push_msat).map_err(err)?;
            let funding = wait_for(node, |e| match e {
                LnEvent::ChannelPending { channel, funding } if channel.id == ch.id => {
                    Some(funding.clone())
                }
                _ => None,
            });
            Ok(json!({
                "channel": ch.id.to_string(),
                "peer": peer.to_string(),
                "sats": sats,
                "funding": funding,
            }))
        }
        LnCommand::Close { channel, force } => {
            let info = node
                .channels()
                .into_iter()
                .find(|c| &c.id == channel)
                .ok_or_else(|| err(format!("no channel {channel}")))?;
            let chan = ChannelRef {
                id: info.id.parse().map_err(err)?,
                peer: info.peer.parse().map_err(err)?,
            };
            node.close_channel(&chan, *force).map_err(err)?;
            let closed = wait_for(node, |e| match e {
                LnEvent::ChannelClosed { channel, reason } if channel.id == chan.id => {
                    Some(reason.clone())
                }
                _ => None,
            });
            Ok(json!({ "channel": channel, "closed": closed, "force": force }))
        }
    }
}

/// Handles events until `want` matches one (or [`BROADCAST_WAIT`] passes).
fn wait_for<T>(node: &LdkBackend, want: impl Fn(&LnEvent) -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < BROADCAST_WAIT {
        match node.next_event() {
            Some(e) => {
                let got = want(&e);
                // Settlement acts on payments; a command that sees one leaves it for the node.
                if matches!(e, LnEvent::Received { .. } | LnEvent::Sent { .. }) {
                    return got;
                }
                let _ = node.event_handled();
                if got.is_some() {
                    return got;
                }
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    None
}

/// The human form of what [`ln_command`] returns.
pub fn ln_render(cmd: &LnCommand, v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    match cmd {
        LnCommand::Status => {
            let b = &v["balances"];
            let mut out = format!(
                "node id   {}\nlisten    {}\non chain  {} sat ({} spendable)\nlightning {} sat; can send {} msat, receive {} msat\n",
                s("node_id"),
                v["listen"].as_str().unwrap_or("(not listening)"),
                b["onchain_sat"],
                b["onchain_spendable_sat"],
                b["lightning_sat"],
                b["outbound_msat"],
                b["inbound_msat"],
            );
            if let Some(e) = v["synced"].as_str() {
                out.push_str(&format!("(not synced with the chain: {e})\n"));
            }
            let channels = v["channels"].as_array().cloned().unwrap_or_default();
            if channels.is_empty() {
                out.push_str("no channels\n");
            }
            for c in channels {
                out.push_str(&format!(
                    "channel {}  peer {}  {} sat  send {} msat  receive {} msat  {}\n",
                    c["id"].as_str().unwrap_or("-"),
                    c["peer"].as_str().unwrap_or("-"),
                    c["capacity_sat"],
                    c["outbound_msat"],
                    c["inbound_msat"],
                    if c["usable"].as_bool() == Some(true) {
                        "usable"
                    } else if c["ready"].as_bool() == Some(true) {
                        "ready (peer offline)"
                    } else {
                        "pending (waiting for confirmations)"
                    },
                ));
            }
            out
        }
        LnCommand::Address => format!("{}\n", s("address")),
        LnCommand::Open { .. } => format!(
            "channel {} to {} for {} sat: {}\n",
            s("channel"),
            s("peer"),
            v["sats"],
            match v["funding"].as_str() {
                Some(f) => format!("funding {f} broadcast; usable once it confirms"),
                None => "funding not broadcast yet; it will be when the node next runs".into(),
            }
        ),
        LnCommand::Close { .. } => format!(
            "channel {}: {}\n",
            s("channel"),
            match v["closed"].as_str() {
                Some(r) if v["force"] == true => format!(
                    "force-closed ({r}); this node's funds return on chain after the channel's delay"
                ),
                Some(r) =>
                    format!("closed ({r}); the funds return on chain once the close confirms"),
                None => "closing; the node finishes it when it next runs".into(),
            }
        ),
    }
}
