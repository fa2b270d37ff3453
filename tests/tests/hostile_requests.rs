//! Peers that open many direct-protocol requests, write most of a maximal message into each
//! and never finish cannot make a site buffer them: the bytes of requests being read are
//! bounded per connection and per node, and a buyer is still served meanwhile.

#![allow(clippy::unwrap_used)]

use hashgrid_node::jobs::IntoSharedInputs;
use std::io;
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use hashgrid_node::jobs::{JobOptions, JobState, Submission};
use hashgrid_node::network::JOB_PROTOCOL;
use hashgrid_node::network::exchange::MAX_INBOUND_BYTES_PER_CONNECTION;
use hashgrid_protocol::exchange::MAX_JOB_REQUEST;
use hashgrid_tests::{addr_of, start_provider, test_builder, wait_for_asks};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};

/// Requests each hostile peer opens.
const REQUESTS: usize = 48;

/// A codec whose requests are `len` zero bytes that never end (the stream is never closed).
#[derive(Clone)]
struct Unfinished {
    len: usize,
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl request_response::Codec for Unfinished {
    type Protocol = StreamProtocol;
    type Request = ();
    type Response = ();

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> io::Result<()> {
        Ok(())
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> io::Result<()> {
        futures::future::pending().await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        (): (),
    ) -> io::Result<()> {
        let mut left = self.len;
        while left > 0 {
            let n = left.min(ZEROS.len());
            io.write_all(&ZEROS[..n]).await?;
            left -= n;
        }
        io.flush().await?;
        // Hold the stream open, unfinished, until the site gives up on it.
        futures::future::pending().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        (): (),
    ) -> io::Result<()> {
        Ok(())
    }
}

type Hostile = Swarm<request_response::Behaviour<Unfinished>>;

fn hostile() -> Hostile {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                // Just under the job protocol's message limit.
                Unfinished {
                    len: MAX_JOB_REQUEST - 1024,
                },
                [(JOB_PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(120))
                    .with_max_concurrent_streams(REQUESTS * 2),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build()
}

/// Connects `swarm` to `site`, opens [`REQUESTS`] unfinished requests and keeps driving it.
async fn attack(mut swarm: Hostile, site: PeerId, addr: Multiaddr) {
    swarm.dial(addr).unwrap();
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == site => break,
            SwarmEvent::OutgoingConnectionError { error, .. } => panic!("dial: {error}"),
            _ => {}
        }
    }
    for _ in 0..REQUESTS {
        swarm.behaviour_mut().send_request(&site, ());
    }
    loop {
        swarm.select_next_some().await;
    }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_requests_do_not_hold_memory_and_buyers_are_still_served() {
    hashgrid_tests::init_tracing();
    let site = start_provider(&[], 100, 8, None).await.unwrap();
    let addr = addr_of(&site).await.unwrap();
    let buyer = test_builder(std::slice::from_ref(&addr))
        .region("us-east")
        .start()
        .await
        .unwrap();
    wait_for_asks(&buyer, 1).await.unwrap();
    // One job first, so that the executor, shaders and buffers are warm before measuring.
    let job = |n: u64| {
        let (spec, inputs) = hashgrid_node::executor::bench::copy_job(n);
        Submission {
            spec,
            inputs: inputs.into_shared(),
            options: JobOptions::default(),
        }
    };
    let id = buyer.jobs().submit(job(256 << 10)).await.unwrap();
    assert_eq!(buyer.jobs().wait(&id).await.unwrap().state, JobState::Done);

    let before = rss();
    // Two hostile peers (each its own key and connection), 48 requests each of almost a full
    // job message: ~96 MiB if the site buffered them all.
    let attackers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(attack(hostile(), site.peer_id(), addr.clone())))
        .collect();
    let started = Instant::now();
    let mut peak = before;
    while started.elapsed() < Duration::from_secs(3) {
        peak = peak.max(rss());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attack_growth = peak.saturating_sub(before);
    // A buyer is served meanwhile, inputs inline and over the blob protocol.
    let id = buyer.jobs().submit(job(2 << 20)).await.unwrap();
    let rec = buyer.jobs().wait(&id).await.unwrap();
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    peak = peak.max(rss());
    let budget = site.ops().inbound_budget();
    let growth = peak.saturating_sub(before);
    let lag = site.ops().loop_lag();
    eprintln!(
        "rss growth {} MiB ({} MiB before the second job), budget peak {} KiB, refused {}, \
         swarm task: longest stall {:?}, p99 {:?} over {} samples",
        growth >> 20,
        attack_growth >> 20,
        budget.peak() >> 10,
        budget.refused(),
        lag.max,
        lag.p99,
        lag.samples
    );
    // The site's swarm task kept polling: no stall near a request timeout.
    assert!(lag.samples > 20, "{lag:?}");
    assert!(lag.max < Duration::from_secs(2), "{lag:?}");
    // The attackers could hold at most their connections' budgets; the rest was refused.
    assert!(
        budget.peak() <= 3 * MAX_INBOUND_BYTES_PER_CONNECTION,
        "{}",
        budget.peak()
    );
    assert!(
        budget.refused() >= (2 * REQUESTS - 16) as u64,
        "{}",
        budget.refused()
    );
    // Buffered in full, the requests grow the site by over 120 MiB; refused, by a few dozen
    // (the budgets, buffers' growth, yamux windows, the allocator's arenas).
    assert!(
        attack_growth < 64 << 20,
        "memory grew by {} MiB under attack",
        attack_growth >> 20
    );
    assert!(growth < 100 << 20, "memory grew by {} MiB", growth >> 20);
    for a in attackers {
        a.abort();
    }
    buyer.shutdown().await;
    site.shutdown().await;
}
