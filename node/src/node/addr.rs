//! Address helpers shared by the builder, the handle and the swarm task.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, Swarm};
use tracing::{debug, warn};

use crate::network::Behaviour;

pub(super) fn dial_addr(swarm: &mut Swarm<Behaviour>, addr: Multiaddr) {
    if let Some(Protocol::P2p(peer)) = addr.iter().last() {
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
    }
    if let Err(e) = swarm.dial(addr.clone()) {
        warn!(%addr, error = %e, "cannot dial bootstrap peer");
    }
}

/// Dials the peers this node met before (`known`, from the store: at most
/// [`MAX_KNOWN_PEER_DIALS`](super::settings::MAX_KNOWN_PEER_DIALS) of them), except itself,
/// and lets the DHT know their addresses.
pub(super) fn dial_known(
    swarm: &mut Swarm<Behaviour>,
    own: PeerId,
    known: Vec<(PeerId, Vec<Multiaddr>)>,
) {
    for (peer, addrs) in known
        .into_iter()
        .filter(|(p, _)| *p != own)
        .take(super::settings::MAX_KNOWN_PEER_DIALS)
    {
        for a in &addrs {
            swarm.behaviour_mut().kad.add_address(&peer, a.clone());
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = swarm.dial(opts) {
            debug!(%peer, error = %e, "dial of known peer failed");
        }
    }
}

pub(super) fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.clone()
    } else {
        addr.clone().with(Protocol::P2p(peer))
    }
}

pub(super) fn short_peer(p: &PeerId) -> String {
    let s = p.to_string();
    s[s.len().saturating_sub(8)..].to_string()
}
