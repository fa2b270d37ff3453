//! Address helpers shared by the builder, the handle and the swarm task.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, Swarm};
use tracing::warn;

use crate::network::Behaviour;

pub(super) fn dial_addr(swarm: &mut Swarm<Behaviour>, addr: Multiaddr) {
    if let Some(Protocol::P2p(peer)) = addr.iter().last() {
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
    }
    if let Err(e) = swarm.dial(addr.clone()) {
        warn!(%addr, error = %e, "cannot dial bootstrap peer");
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
