//! TCP whose outbound connections always come from a fresh ephemeral port.
//!
//! libp2p's TCP transport, asked for [`PortUse::Reuse`] (the default of every dial the swarm
//! and its behaviours make), binds the dialling socket to the node's own listen address and
//! port before connecting. That bind fails with `EADDRINUSE` whenever another socket on the
//! host already holds that address and port in a way `SO_REUSEPORT` does not cover (a
//! connection another process made from the same ephemeral port, a `TIME_WAIT` left by one),
//! and the transport does not fall back to a new port for that error: every dial of the node
//! then fails the same way for as long as the other socket lives (up to a minute for a
//! `TIME_WAIT`), and a node started with only its bootstrap peers stays alone. It happened to
//! about one test run in forty on a loaded two-core machine.
//!
//! Port reuse only pays for NAT hole punching (the remote sees the listen port as the source),
//! which hashgrid does not do: sites listen on reachable addresses and announce them through
//! identify. So this wrapper turns every dial into [`PortUse::New`]; listening is unchanged.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::TryFutureExt;
use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportError, TransportEvent};
use libp2p::{Multiaddr, Transport, tcp};

use super::delay::{Delayed, LinkDelays};

/// [`tcp::tokio::Transport`] with [`PortUse::New`] for every dial (see the module docs), and
/// the emulated latency of [`LinkDelays`] on the connections it dials (none by default).
pub struct FreshPortTcp(tcp::tokio::Transport, Arc<LinkDelays>);

impl FreshPortTcp {
    /// Wraps a TCP transport built from `config`.
    pub fn new(config: tcp::Config) -> FreshPortTcp {
        FreshPortTcp::with_delays(config, Arc::default())
    }

    /// [`FreshPortTcp::new`], holding back the bytes of connections it dials to the addresses
    /// `delays` lists.
    pub fn with_delays(config: tcp::Config, delays: Arc<LinkDelays>) -> FreshPortTcp {
        FreshPortTcp(tcp::tokio::Transport::new(config), delays)
    }
}

type Stream = tcp::tokio::TcpStream;

fn undelayed(s: Stream) -> Delayed<Stream> {
    Delayed::new(s, std::time::Duration::ZERO)
}

impl Transport for FreshPortTcp {
    type Output = Delayed<Stream>;
    type Error = <tcp::tokio::Transport as Transport>::Error;
    type ListenerUpgrade = futures::future::MapOk<
        <tcp::tokio::Transport as Transport>::ListenerUpgrade,
        fn(Stream) -> Delayed<Stream>,
    >;
    type Dial = futures::future::BoxFuture<'static, Result<Delayed<Stream>, Self::Error>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.0.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.0.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let delay = self.1.of(&addr);
        let dial = self.0.dial(
            addr,
            DialOpts {
                port_use: PortUse::New,
                ..opts
            },
        )?;
        Ok(Box::pin(dial.map_ok(move |s| Delayed::new(s, delay))))
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|e| e.map_upgrade(|u| u.map_ok(undelayed as fn(Stream) -> Delayed<Stream>)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::Endpoint;
    use libp2p::futures::StreamExt;
    use libp2p::futures::stream::poll_fn;

    /// A dial asked for port reuse (as the swarm asks for every dial) still goes out from a
    /// port other than the listener's: nothing is bound before the connect.
    #[tokio::test]
    async fn a_dial_does_not_bind_to_the_listen_port() {
        let mut a = FreshPortTcp::new(tcp::Config::default());
        a.listen_on(ListenerId::next(), "/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let mut events = poll_fn(|cx| Pin::new(&mut a).poll(cx).map(Some));
        let a_port = match events.next().await {
            Some(TransportEvent::NewAddress { listen_addr, .. }) => port_of(&listen_addr),
            other => panic!("expected a listen address, got {other:?}"),
        };
        drop(events);
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = target.local_addr().unwrap();
        let dial = a
            .dial(
                format!("/ip4/127.0.0.1/tcp/{}", to.port()).parse().unwrap(),
                DialOpts {
                    role: Endpoint::Dialer,
                    port_use: PortUse::Reuse,
                },
            )
            .unwrap();
        let stream = dial.await.unwrap();
        let (accepted, from) = target.accept().unwrap();
        drop(accepted);
        drop(stream);
        assert_ne!(from.port(), a_port, "the dial reused the listen port");
    }

    fn port_of(addr: &Multiaddr) -> u16 {
        addr.iter()
            .find_map(|p| match p {
                libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
                _ => None,
            })
            .unwrap()
    }
}
