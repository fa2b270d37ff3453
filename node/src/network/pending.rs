//! At most [`MAX_PENDING_PER_IP`] inbound connections still in their handshake from any one
//! IP address. Without it, one host that opens sockets and never speaks fills every pending
//! slot of a site ([`super::MAX_PENDING_CONNECTIONS`]) until the handshake timeout, and no
//! buyer can reach the site meanwhile.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::behaviour::ListenFailure;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};

/// Most inbound connections in their handshake from one IP address. An honest peer opens one
/// or two at a time; a NAT in front of many peers is the case this must leave room for.
pub const MAX_PENDING_PER_IP: usize = 8;

/// Refuses inbound connections from an address that already has [`MAX_PENDING_PER_IP`] in
/// their handshake.
#[derive(Default)]
pub(crate) struct PendingPerIp {
    /// Pending inbound connections by remote IP.
    by_ip: HashMap<IpAddr, Vec<ConnectionId>>,
    /// The IP of each pending inbound connection.
    ip_of: HashMap<ConnectionId, IpAddr>,
}

/// The refusal, as the swarm reports it (`ListenError::Denied`).
#[derive(Debug, thiserror::Error)]
#[error("{ip} already has {MAX_PENDING_PER_IP} connections in their handshake")]
pub(crate) struct TooManyPending {
    ip: IpAddr,
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl PendingPerIp {
    fn done(&mut self, id: ConnectionId) {
        if let Some(ip) = self.ip_of.remove(&id)
            && let Some(ids) = self.by_ip.get_mut(&ip)
        {
            ids.retain(|c| *c != id);
            if ids.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }

    /// Pending inbound connections from `ip` (for tests and metrics).
    #[cfg(test)]
    fn pending(&self, ip: IpAddr) -> usize {
        self.by_ip.get(&ip).map_or(0, Vec::len)
    }
}

impl NetworkBehaviour for PendingPerIp {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        let ids = self.by_ip.entry(ip).or_default();
        if ids.len() >= MAX_PENDING_PER_IP {
            return Err(ConnectionDenied::new(TooManyPending { ip }));
        }
        ids.push(id);
        self.ip_of.insert(id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.done(id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) = event {
            self.done(connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_allowance_and_gets_it_back() {
        let mut b = PendingPerIp::default();
        let local: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let hostile: Multiaddr = "/ip4/10.0.0.9/tcp/5000".parse().unwrap();
        let honest: Multiaddr = "/ip4/10.0.0.1/tcp/6000".parse().unwrap();
        let ids: Vec<ConnectionId> = (0..MAX_PENDING_PER_IP + 2)
            .map(|_| ConnectionId::new_unchecked(rand_id()))
            .collect();
        for id in &ids[..MAX_PENDING_PER_IP] {
            assert!(
                b.handle_pending_inbound_connection(*id, &local, &hostile)
                    .is_ok()
            );
        }
        let extra = ids[MAX_PENDING_PER_IP];
        assert!(
            b.handle_pending_inbound_connection(extra, &local, &hostile)
                .is_err()
        );
        // Another address is unaffected.
        let other = ids[MAX_PENDING_PER_IP + 1];
        assert!(
            b.handle_pending_inbound_connection(other, &local, &honest)
                .is_ok()
        );
        // A handshake that fails (timeout) or completes frees its slot.
        b.done(ids[0]);
        let _ = b.handle_established_inbound_connection(ids[1], PeerId::random(), &local, &hostile);
        assert_eq!(
            b.pending("10.0.0.9".parse().unwrap()),
            MAX_PENDING_PER_IP - 2
        );
        assert!(
            b.handle_pending_inbound_connection(extra, &local, &hostile)
                .is_ok()
        );
    }

    fn rand_id() -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(1_000_000);
        NEXT.fetch_add(1, Ordering::SeqCst)
    }
}
