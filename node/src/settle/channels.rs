//! The channels a node keeps open (`[settle] lightning_channels`): a buyer names the site it
//! uses most, or its operator's hub, and the size; each settlement pass opens the channel if
//! there is none with that peer (at start, and again after a close or a force-close), funded
//! from the Lightning node's on-chain wallet.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hashgrid_lightning::{Balances, ChannelInfo, LightningBackend, PeerAddr};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::wallet::WalletError;

/// After a failed open, wait this long before trying that peer again; also the longest an
/// open may wait for its funding transaction before the next one is tried.
pub const OPEN_RETRY: Duration = Duration::from_secs(60);

/// One channel to keep open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPlan {
    /// The peer (`NODE_ID@HOST:PORT`): the site, or the operator's hub.
    pub peer: PeerAddr,
    /// Channel size (sats), from this node's on-chain wallet.
    pub sats: u64,
    /// Given to the peer at opening (msat), e.g. so that a site can pay back refunds.
    pub push_msat: u64,
}

/// `[[settle.lightning_channels]]` as written in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSection {
    /// `NODE_ID@HOST:PORT`.
    pub peer: String,
    /// Channel size (sats).
    pub sats: u64,
    /// Pushed to the peer at opening (msat).
    #[serde(default)]
    pub push_msat: u64,
}

/// The smallest channel worth opening (sats): below it the commitment fees and reserves eat
/// the channel.
pub const MIN_CHANNEL_SAT: u64 = 20_000;

impl ChannelSection {
    /// The plan, checked: a peer that parses, a size of at least [`MIN_CHANNEL_SAT`], and no
    /// more pushed than the channel holds.
    pub fn plan(&self) -> Result<ChannelPlan, WalletError> {
        let peer: PeerAddr = self.peer.parse().map_err(|e| {
            WalletError::Config(format!(
                "[settle] lightning_channels: peer {:?}: {e} (want NODE_ID@HOST:PORT)",
                self.peer
            ))
        })?;
        if self.sats < MIN_CHANNEL_SAT {
            return Err(WalletError::Config(format!(
                "[settle] lightning_channels: {} sats for {} is under the {MIN_CHANNEL_SAT}-sat minimum",
                self.sats, self.peer
            )));
        }
        if self.push_msat > self.sats.saturating_mul(1000) {
            return Err(WalletError::Config(format!(
                "[settle] lightning_channels: push_msat {} is more than the {}-sat channel to {}",
                self.push_msat, self.sats, self.peer
            )));
        }
        Ok(ChannelPlan {
            peer,
            sats: self.sats,
            push_msat: self.push_msat,
        })
    }
}

/// The plans that need a channel opened now: no channel with that peer in any state (opening,
/// open or closing), not this node itself, not in back-off, and while the spendable on-chain
/// balance covers them (in the order written).
pub(crate) fn due<'a>(
    plans: &'a [ChannelPlan],
    own: &str,
    channels: &[ChannelInfo],
    balances: &Balances,
    backoff: &HashMap<String, Instant>,
    now: Instant,
) -> Vec<&'a ChannelPlan> {
    let mut left = balances.onchain_spendable_sat;
    let mut out = Vec::new();
    for plan in plans {
        let id = plan.peer.node_id.to_string();
        if id == own
            || channels.iter().any(|c| c.peer == id)
            || backoff.get(&id).is_some_and(|t| *t > now)
            || out
                .iter()
                .any(|p: &&ChannelPlan| p.peer.node_id == plan.peer.node_id)
        {
            continue;
        }
        // The funding transaction's fee comes out of the wallet too.
        if left <= plan.sats {
            continue;
        }
        left -= plan.sats;
        out.push(plan);
    }
    out
}

/// Opens what [`due`] says, one channel at a time: the next open waits until the previous
/// one's funding transaction was broadcast (its `ChannelPending` event) and the wallet synced,
/// since ldk-node's wallet does not lock the coins of a funding transaction it has built but
/// not yet broadcast (two opens at once spent the same coin and one was refused). Failures
/// are remembered so a peer that is down is retried after [`OPEN_RETRY`], not at every pass.
#[derive(Debug, Default)]
pub(crate) struct ChannelKeeper {
    backoff: Mutex<HashMap<String, Instant>>,
    short_of_funds: Mutex<bool>,
    /// The peer of the open whose funding is not broadcast yet, and when it was asked.
    awaiting: Mutex<Option<(String, Instant)>>,
}

impl ChannelKeeper {
    /// A channel with `peer` was funded (or closed): the next open may go ahead.
    pub(crate) fn funded(&self, peer: &str) {
        let mut a = self.awaiting.lock().unwrap_or_else(|e| e.into_inner());
        if a.as_ref().is_some_and(|(p, _)| p == peer) {
            *a = None;
        }
    }

    /// One pass (blocking: it connects to peers).
    pub(crate) fn keep(&self, ln: &dyn LightningBackend, plans: &[ChannelPlan]) {
        if plans.is_empty() {
            return;
        }
        {
            let mut a = self.awaiting.lock().unwrap_or_else(|e| e.into_inner());
            match a.as_ref() {
                Some((_, at)) if at.elapsed() < OPEN_RETRY => return,
                Some((peer, _)) => {
                    warn!(%peer, "lightning: the configured channel was not funded in time; trying the next");
                    self.backoff
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(peer.clone(), Instant::now() + OPEN_RETRY);
                    *a = None;
                }
                None => {}
            }
        }
        let own = ln.node_id().to_string();
        let channels = ln.channels();
        let balances = ln.balances();
        let now = Instant::now();
        let due = {
            let backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
            due(plans, &own, &channels, &balances, &backoff, now)
        };
        let missing = plans
            .iter()
            .filter(|p| {
                let id = p.peer.node_id.to_string();
                id != own && !channels.iter().any(|c| c.peer == id)
            })
            .count();
        {
            // Say once (not every pass) that the wallet cannot fund what the config asks for.
            let mut short = self
                .short_of_funds
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let now_short = missing > due.len() && due.is_empty();
            if now_short && !*short {
                warn!(
                    spendable_sat = balances.onchain_spendable_sat,
                    missing,
                    "lightning: not enough on-chain funds to open the configured channels (fund the address `hashgrid ln address` shows)"
                );
            }
            *short = now_short;
        }
        if let Some(plan) = due.first() {
            // The wallet must know of the coins earlier funding transactions spent.
            if let Err(e) = ln.sync() {
                warn!(error = %e, "lightning: wallet sync before opening a channel failed");
                return;
            }
            match ln.open_channel(&plan.peer, plan.sats, plan.push_msat) {
                Ok(c) => {
                    info!(peer = %plan.peer, sats = plan.sats, channel = c.id, "lightning: opening the configured channel");
                    *self.awaiting.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((plan.peer.node_id.to_string(), now));
                }
                Err(e) => {
                    warn!(peer = %plan.peer, sats = plan.sats, error = %e, retry_secs = OPEN_RETRY.as_secs(), "lightning: could not open the configured channel");
                    self.backoff
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(plan.peer.node_id.to_string(), now + OPEN_RETRY);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "02eec7245d6b7d2ccb30380bfbe2a3648cd7a942653f5aa340edcea1f283686619";
    const B: &str = "0324653eac434488002cc06bbfb7f10fe18991e35f9fe4302dbea6d2353dc0ab1c";
    const ME: &str = "027f31ebc5462c1fdce1b737ecff52d37d75dea43ce11c74d25aa297165faa2007";

    fn plan(id: &str, sats: u64) -> ChannelPlan {
        ChannelSection {
            peer: format!("{id}@127.0.0.1:9735"),
            sats,
            push_msat: 0,
        }
        .plan()
        .expect("plan")
    }

    fn channel(id: &str) -> ChannelInfo {
        ChannelInfo {
            id: "1".into(),
            peer: id.into(),
            funding: None,
            capacity_sat: 100_000,
            outbound_msat: 0,
            inbound_msat: 0,
            ready: false,
            usable: false,
            opened_here: true,
        }
    }

    fn funds(sat: u64) -> Balances {
        Balances {
            onchain_spendable_sat: sat,
            ..Balances::default()
        }
    }

    #[test]
    fn opens_what_is_missing_while_funds_last_and_never_twice() {
        let plans = [plan(A, 100_000), plan(B, 200_000), plan(ME, 50_000)];
        let none = HashMap::new();
        let now = Instant::now();
        let ids = |v: Vec<&ChannelPlan>| v.iter().map(|p| p.sats).collect::<Vec<_>>();
        // Both peers, not ourselves.
        assert_eq!(
            ids(due(&plans, ME, &[], &funds(1_000_000), &none, now)),
            [100_000, 200_000]
        );
        // A channel with A in any state (here still opening) means A is kept.
        assert_eq!(
            ids(due(
                &plans,
                ME,
                &[channel(A)],
                &funds(1_000_000),
                &none,
                now
            )),
            [200_000]
        );
        // The wallet covers A (plus its fee) but not both.
        assert_eq!(
            ids(due(&plans, ME, &[], &funds(250_000), &none, now)),
            [100_000]
        );
        assert!(due(&plans, ME, &[], &funds(100_000), &none, now).is_empty());
        // A peer in back-off waits; after it, it is tried again.
        let mut backoff = HashMap::new();
        backoff.insert(A.to_string(), now + OPEN_RETRY);
        assert_eq!(
            ids(due(&plans, ME, &[], &funds(1_000_000), &backoff, now)),
            [200_000]
        );
        assert_eq!(
            ids(due(
                &plans,
                ME,
                &[],
                &funds(1_000_000),
                &backoff,
                now + OPEN_RETRY * 2
            )),
            [100_000, 200_000]
        );
        // The same peer twice in the config opens one channel.
        let twice = [plan(A, 100_000), plan(A, 300_000)];
        assert_eq!(
            ids(due(&twice, ME, &[], &funds(1_000_000), &none, now)),
            [100_000]
        );
    }

    #[test]
    fn bad_entries_are_refused_with_what_is_wrong() {
        let bad = |peer: &str, sats: u64, push_msat: u64| {
            ChannelSection {
                peer: peer.into(),
                sats,
                push_msat,
            }
            .plan()
            .expect_err("refused")
        };
        let e = bad("nobody", 100_000, 0).to_string();
        assert!(e.contains("NODE_ID@HOST:PORT"), "{e}");
        let e = bad(&format!("{A}@127.0.0.1:9735"), 1_000, 0).to_string();
        assert!(e.contains("minimum"), "{e}");
        let e = bad(&format!("{A}@127.0.0.1:9735"), 100_000, 100_000_001).to_string();
        assert!(e.contains("push_msat"), "{e}");
    }
}
