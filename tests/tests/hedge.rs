//! A provider that takes proposals and never answers them (a hung process, a site restarting,
//! a handshake stuck behind a busy CPU) holds a buyer up by one hedge interval, not by the
//! negotiation timeout: the buyer proposes to the next candidate as well and takes the first
//! agreement.

#![allow(clippy::unwrap_used)]

use hashgrid_node::jobs::IntoSharedInputs;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, StreamExt};
use hashgrid_node::jobs::{HEDGE_AFTER, JobOptions, JobState, Submission};
use hashgrid_node::network::{NEGOTIATE_PROTOCOL, NEGOTIATE_TIMEOUT, gossip_config};
use hashgrid_protocol::{Ask, GossipMessage, Keypair, Msat, Signed, Timestamp};
use hashgrid_tests::{
    TEST_HEARTBEAT, addr_of, gpu, start_provider, test_builder, test_network, wait_for_asks,
};
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, StreamProtocol, Swarm};

/// A codec that accepts any request without reading it and is never asked to answer.
#[derive(Clone, Default)]
struct NeverAnswers;

impl request_response::Codec for NeverAnswers {
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
        Ok(())
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        (): (),
    ) -> io::Result<()> {
        Ok(())
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

#[derive(NetworkBehaviour)]
struct Mute {
    gossipsub: gossipsub::Behaviour,
    negotiate: request_response::Behaviour<NeverAnswers>,
}

/// Joins the network through `buyer_addr`, gossips a signed ask for one unit at `price` (its
/// own key, a plausible GPU) and holds every proposal it receives open without an answer.
/// Counts the proposals in `proposals`.
async fn mute_provider(buyer_addr: Multiaddr, price: u64, proposals: Arc<AtomicUsize>) {
    let key = Keypair::generate().unwrap();
    let mut swarm: Swarm<Mute> = libp2p::SwarmBuilder::with_existing_identity(key.to_libp2p())
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| Mute {
            gossipsub: gossipsub::Behaviour::new(
                MessageAuthenticity::Anonymous,
                gossip_config(TEST_HEARTBEAT).unwrap(),
            )
            .unwrap(),
            negotiate: request_response::Behaviour::new(
                [(NEGOTIATE_PROTOCOL, ProtocolSupport::Inbound)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(120)),
            ),
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    let network = test_network();
    let orders = IdentTopic::new(network.topic("orders"));
    swarm.behaviour_mut().gossipsub.subscribe(&orders).unwrap();
    swarm.dial(buyer_addr).unwrap();
    let now = Timestamp::now();
    let ask = Ask {
        provider: key.public(),
        order_id: 1,
        seq: now.0,
        units: 1,
        price: Msat(price),
        gpu: gpu("mute"),
        region: "us-east".into(),
        max_seconds: 600,
        created_at: now,
        expires_at: now.plus_ms(120_000),
    };
    let msg = GossipMessage::Ask(Signed::sign(&key, &network, &ask)).encode();
    let mut published = false;
    let mut held = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            ev = swarm.select_next_some() => {
                if let SwarmEvent::Behaviour(MuteEvent::Negotiate(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. },
                    ..
                })) = ev
                {
                    proposals.fetch_add(1, Ordering::SeqCst);
                    // Never answered, never dropped: the buyer's request stays open.
                    held.push(channel);
                }
            }
            _ = tick.tick(), if !published => {
                // Until the buyer is in the topic's mesh, publishing finds no peer.
                published = swarm.behaviour_mut().gossipsub.publish(orders.clone(), msg.clone()).is_ok();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answers_costs_a_job_one_hedge_interval() {
    hashgrid_tests::init_tracing();
    let honest = start_provider(&[], 100, 8, None).await.unwrap();
    let buyer = test_builder(&[addr_of(&honest).await.unwrap()])
        .region("us-east")
        .start()
        .await
        .unwrap();
    wait_for_asks(&buyer, 1).await.unwrap();
    // The mute provider is cheaper, so the buyer proposes to it first.
    let proposals = Arc::new(AtomicUsize::new(0));
    let mute = tokio::spawn(mute_provider(
        addr_of(&buyer).await.unwrap(),
        50,
        proposals.clone(),
    ));
    wait_for_asks(&buyer, 2).await.unwrap();
    let job = || {
        let (spec, inputs) = hashgrid_node::executor::bench::copy_job(64 << 10);
        Submission {
            spec,
            inputs: inputs.into_shared(),
            options: JobOptions::default(),
        }
    };
    for round in 0..2 {
        let started = Instant::now();
        let id = buyer.jobs().submit(job()).await.unwrap();
        let rec = buyer.jobs().wait(&id).await.unwrap();
        let took = started.elapsed();
        eprintln!(
            "round {round}: done in {took:?}, proposals to the mute provider so far: {proposals:?}"
        );
        assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
        assert_eq!(
            rec.provider,
            Some(honest.public_key()),
            "{:?}",
            rec.attempts
        );
        // Without hedging the job would wait out the negotiation timeout (10 s) first.
        assert!(
            took < NEGOTIATE_TIMEOUT / 2,
            "round {round} took {took:?}; hedge after {HEDGE_AFTER:?}"
        );
    }
    assert!(
        proposals.load(Ordering::SeqCst) >= 2,
        "the mute provider was proposed to first each time"
    );
    mute.abort();
    // Stopped in order, so that the provider's executor has released its device before the
    // process exits (a worker still tearing down a Vulkan device at exit can crash it).
    buyer.shutdown().await;
    honest.shutdown().await;
}
