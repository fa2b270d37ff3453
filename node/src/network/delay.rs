//! Emulated link latency, in user space: a connection this node dials to an address listed in
//! its [`LinkDelays`] has every byte it sends and every byte it receives held back by that
//! delay, so the round trip grows by twice the delay (the dialling side alone does it: every
//! connection has one dialler, so each is delayed once). For measuring a grid across regions
//! on one machine whose kernel has no `netem` (`hashgrid-testnet --link-delay-ms`); a node
//! never sets it on its own. Set by [`crate::NodeBuilder::link_delays`] or, for
//! `hashgrid-node`, the environment variable `HASHGRID_LINK_DELAYS`
//! (`HOST:PORT=MS,HOST:PORT=MS,…`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use std::future::Future;

use futures::{AsyncRead, AsyncWrite};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tokio::time::{Instant, Sleep};

/// The environment variable `hashgrid-node` reads its link delays from.
pub const LINK_DELAYS_ENV: &str = "HASHGRID_LINK_DELAYS";

/// Most bytes a delayed connection holds in each direction before it pushes back.
const MAX_HELD: usize = 4 << 20;

/// The longest delay one link may be given: 10 s.
pub const MAX_LINK_DELAY_MS: u64 = 10_000;

/// An entry of a delay list that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{item:?}: {what}")]
pub struct LinkDelayError {
    /// The entry, as written.
    pub item: String,
    /// What is wrong with it.
    pub what: String,
}

/// Delays by the address dialled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkDelays(HashMap<SocketAddr, Duration>);

impl LinkDelays {
    /// From `(address, delay)` pairs.
    pub fn new(pairs: impl IntoIterator<Item = (SocketAddr, Duration)>) -> LinkDelays {
        LinkDelays(pairs.into_iter().filter(|(_, d)| !d.is_zero()).collect())
    }

    /// Parses `HOST:PORT=MS,HOST:PORT=MS,…` (empty: none).
    pub fn parse(text: &str) -> Result<LinkDelays, LinkDelayError> {
        let mut pairs = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = |what| LinkDelayError {
                item: item.to_string(),
                what,
            };
            let (addr, ms) = item
                .split_once('=')
                .ok_or_else(|| bad("want HOST:PORT=MS".into()))?;
            let addr: SocketAddr = addr
                .trim()
                .parse()
                .map_err(|e| bad(format!("address: {e}")))?;
            let ms: u64 = ms
                .trim()
                .parse()
                .map_err(|e| bad(format!("milliseconds: {e}")))?;
            if ms > MAX_LINK_DELAY_MS {
                return Err(bad(format!("over {MAX_LINK_DELAY_MS} ms")));
            }
            pairs.push((addr, Duration::from_millis(ms)));
        }
        Ok(LinkDelays::new(pairs))
    }

    /// Whether any delay is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The delay of a dial to `addr` (zero when it names no listed address).
    pub fn of(&self, addr: &Multiaddr) -> Duration {
        let mut ip = None;
        let mut port = None;
        for p in addr.iter() {
            match p {
                Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
                Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
                Protocol::Tcp(p) => port = Some(p),
                _ => {}
            }
        }
        match (ip, port) {
            (Some(ip), Some(port)) => self
                .0
                .get(&SocketAddr::new(ip, port))
                .copied()
                .unwrap_or_default(),
            _ => Duration::ZERO,
        }
    }
}

/// A stream whose bytes, both ways, are held back by a fixed delay (none: it passes through).
pub struct Delayed<S> {
    inner: S,
    delay: Duration,
    /// Written by us, to send at the instant given.
    out: VecDeque<(Instant, Vec<u8>)>,
    out_bytes: usize,
    /// Received, to hand over at the instant given; `None` marks the end of the stream.
    input: VecDeque<(Instant, Option<Vec<u8>>)>,
    in_bytes: usize,
    input_done: bool,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Delayed<S> {
    /// `inner` delayed by `delay`.
    pub fn new(inner: S, delay: Duration) -> Delayed<S> {
        Delayed {
            inner,
            delay,
            out: VecDeque::new(),
            out_bytes: 0,
            input: VecDeque::new(),
            in_bytes: 0,
            input_done: false,
            timer: None,
        }
    }

    /// Wakes `cx` at `at`.
    fn wake_at(&mut self, at: Instant, cx: &mut Context<'_>) {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        // Registers the waker; if already due, the caller loops.
        let _ = timer.as_mut().poll(cx);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Delayed<S> {
    /// Sends what is due; `Ready(Ok)` once nothing due is left unsent.
    fn drive_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let now = Instant::now();
            let Some((at, _)) = self.out.front() else {
                return Poll::Ready(Ok(()));
            };
            if *at > now {
                let at = *at;
                self.wake_at(at, cx);
                return Poll::Ready(Ok(()));
            }
            let (_, buf) = self.out.front_mut().expect("front");
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_bytes -= n;
            if n == buf.len() {
                self.out.pop_front();
            } else {
                buf.drain(..n);
            }
        }
    }

    /// Reads what has arrived into the held queue.
    fn fill_in(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        while !self.input_done && self.in_bytes < MAX_HELD {
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Ready(Ok(0)) => {
                    self.input_done = true;
                    self.input.push_back((Instant::now() + self.delay, None));
                }
                Poll::Ready(Ok(n)) => {
                    self.in_bytes += n;
                    self.input
                        .push_back((Instant::now() + self.delay, Some(buf[..n].to_vec())));
                }
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Delayed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.delay.is_zero() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // Reads are polled all the time: they also move held writes along.
        if let Poll::Ready(Err(e)) = this.drive_out(cx) {
            return Poll::Ready(Err(e));
        }
        this.fill_in(cx)?;
        loop {
            let Some((at, _)) = this.input.front() else {
                return Poll::Pending;
            };
            let at = *at;
            if at > Instant::now() {
                this.wake_at(at, cx);
                if at > Instant::now() {
                    return Poll::Pending;
                }
                continue;
            }
            let (_, chunk) = this.input.front_mut().expect("front");
            let Some(data) = chunk else {
                return Poll::Ready(Ok(0));
            };
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            this.in_bytes -= n;
            if n == data.len() {
                this.input.pop_front();
            } else {
                data.drain(..n);
            }
            return Poll::Ready(Ok(n));
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Delayed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.delay.is_zero() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        ready!(this.drive_out(cx))?;
        if this.out_bytes >= MAX_HELD {
            // Full: wait for the front to go out (drive_out set the timer or the socket's
            // waker).
            return Poll::Pending;
        }
        this.out_bytes += buf.len();
        this.out
            .push_back((Instant::now() + this.delay, buf.to_vec()));
        let at = Instant::now() + this.delay;
        this.wake_at(at, cx);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.delay.is_zero() {
            ready!(this.drive_out(cx))?;
            if !this.out.is_empty() {
                // Held until due: the timer wakes the flush.
                return Poll::Pending;
            }
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.delay.is_zero() {
            ready!(this.drive_out(cx))?;
            if !this.out.is_empty() {
                return Poll::Pending;
            }
        }
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn parses_what_the_testnet_writes_and_refuses_the_rest() {
        let d = LinkDelays::parse("127.0.0.1:4100=40, 127.0.0.1:4101=0,10.0.0.2:9=150")
            .expect("parses");
        let m = |s: &str| s.parse::<Multiaddr>().expect("multiaddr");
        assert_eq!(
            d.of(&m("/ip4/127.0.0.1/tcp/4100")),
            Duration::from_millis(40)
        );
        assert_eq!(d.of(&m("/ip4/127.0.0.1/tcp/4101")), Duration::ZERO);
        assert_eq!(
            d.of(&m(
                "/ip4/10.0.0.2/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
            )),
            Duration::from_millis(150)
        );
        assert_eq!(d.of(&m("/ip4/127.0.0.1/udp/4100/quic-v1")), Duration::ZERO);
        assert!(LinkDelays::parse("").expect("empty").is_empty());
        for bad in [
            "127.0.0.1:1",
            "x:1=5",
            "127.0.0.1:1=ms",
            "127.0.0.1:1=20000",
        ] {
            assert!(LinkDelays::parse(bad).is_err(), "{bad}");
        }
    }

    /// A round trip over a delayed stream takes twice the delay, and every byte arrives in
    /// order.
    #[tokio::test]
    async fn a_round_trip_takes_twice_the_delay_and_keeps_the_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let echo = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.expect("echo");
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let delay = Duration::from_millis(60);
        let mut s = Delayed::new(libp2p::tcp::tokio::TcpStream(tcp), delay);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let t = std::time::Instant::now();
        s.write_all(&data).await.expect("write");
        s.flush().await.expect("flush");
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).await.expect("read");
        let took = t.elapsed();
        assert_eq!(back, data);
        assert!(took >= delay * 2, "{took:?}");
        assert!(took < delay * 2 + Duration::from_millis(500), "{took:?}");
        s.close().await.expect("close");
        drop(s);
        echo.await.expect("echo task");
    }
}
