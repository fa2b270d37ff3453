//! A misbehaving peer publishes forged, wrong-network, expired, oversized, replayed and
//! garbage messages, and fraud evidence that proves nothing: every one is rejected by every
//! honest node, none enters a book or changes a reputation, and the sender's gossipsub score
//! falls below zero.

use std::time::{Duration, Instant};

use hashgrid_node::{NodeEvent, NodeHandle, RawTopic};
use hashgrid_protocol::{Ask, GossipMessage, Keypair, Msat, Network, Signature, Signed, Timestamp};
use hashgrid_tests::{
    addr_of, ask_spec, gpu, test_builder, test_network, wait_for_book, wait_for_peers,
};

/// How long an honest node may take to see and reject one bad message.
const REJECT_TIMEOUT: Duration = Duration::from_secs(5);

fn ask_by(key: &Keypair, order_id: u64, seq: u64, created_at: Timestamp, ttl_ms: u64) -> Ask {
    Ask {
        provider: key.public(),
        order_id,
        seq,
        units: 1,
        price: Msat(1),
        gpu: gpu("evil"),
        region: "nowhere".into(),
        max_seconds: 60,
        created_at,
        expires_at: created_at.plus_ms(ttl_ms),
    }
}

/// A receipt for one job of `buyer`'s, signed by `provider` for `net`, whose one output
/// hashes `out`.
fn receipt(
    provider: &Keypair,
    buyer: &Keypair,
    net: &Network,
    out: &[u8],
) -> Signed<hashgrid_protocol::Receipt> {
    let now = Timestamp::now();
    let r = hashgrid_protocol::Receipt {
        job_id: hashgrid_protocol::ContentId::of(b"job"),
        agreement_id: hashgrid_protocol::ContentId::of(&provider.public().0),
        buyer: buyer.public(),
        provider: provider.public(),
        spec_id: hashgrid_protocol::ContentId::of(b"spec"),
        inputs: vec![],
        outputs: vec![hashgrid_protocol::OutputRecord {
            name: "out".into(),
            id: hashgrid_protocol::ContentId::of(out),
            bytes: out.len() as u64,
        }],
        adapter: gpu("any"),
        started_at: now,
        finished_at: now,
        gpu_time_us: 1,
        charge: Msat(1),
        chain_seq: 0,
        prev_receipt: None,
    };
    Signed::sign(provider, net, &r)
}

/// Fraud evidence by `reporter` against `accused`'s receipt, witnessed by `witnesses`.
fn evidence(
    reporter: &Keypair,
    net: &Network,
    accused: Signed<hashgrid_protocol::Receipt>,
    witnesses: Vec<Signed<hashgrid_protocol::Receipt>>,
) -> Vec<u8> {
    let now = Timestamp::now();
    let ev = hashgrid_protocol::FraudEvidence {
        reporter: reporter.public(),
        accused,
        witnesses,
        created_at: now,
        expires_at: now.plus_ms(60_000),
    };
    GossipMessage::Evidence(Signed::sign(reporter, net, &ev)).encode()
}

/// Waits for the next `MessageRejected` from `from`; returns its reason.
async fn next_rejection(
    events: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
    from: hashgrid_node::PeerId,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + REJECT_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(NodeEvent::MessageRejected { from: f, reason })) if f == from => {
                return Ok(reason);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("event stream: {e}"),
            Err(_) => anyhow::bail!("no rejection within {REJECT_TIMEOUT:?}"),
        }
    }
}

/// Publishes until gossipsub has a subscribed peer to send to.
async fn publish(bad: &NodeHandle, topic: RawTopic, data: Vec<u8>) -> anyhow::Result<()> {
    let deadline = Instant::now() + REJECT_TIMEOUT;
    loop {
        match bad.testing().publish_raw(topic, data.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_rejected_and_cost_score() -> anyhow::Result<()> {
    hashgrid_tests::init_tracing();
    let net = test_network();
    // Two honest nodes (one a provider whose key the attacker replays) and the attacker.
    let provider_key = Keypair::from_secret_bytes([42; 32]);
    let honest_a = test_builder(&[]).start().await?;
    let a_addr = addr_of(&honest_a).await?;
    let provider = test_builder(std::slice::from_ref(&a_addr))
        .keypair(provider_key.clone())
        .gpu_profiles(vec![gpu("real")])
        .start()
        .await?;
    let real = provider.market().post_ask(ask_spec("real", 50)).await?;
    let honest = [honest_a.clone(), provider.clone()];
    for n in &honest {
        wait_for_book(n, REJECT_TIMEOUT, "the real ask", |b| b.has_ask(&real)).await?;
    }

    let bad = test_builder(&[a_addr, addr_of(&provider).await?])
        .start()
        .await?;
    wait_for_peers(&bad, 2, REJECT_TIMEOUT).await?;
    // Publish only once the attacker knows both honest nodes subscribe to the orders topic, so
    // each bad message reaches both directly.
    let deadline = Instant::now() + REJECT_TIMEOUT;
    while bad.peers().gossip().await?.len() < 2 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "attacker never saw both subscriptions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bad_id = bad.peer_id();
    let mut events_a = honest_a.events();
    let mut events_p = provider.events();

    let evil = Keypair::from_secret_bytes([66; 32]);
    let now = Timestamp::now();
    let forged = {
        let good = Signed::sign(&evil, &net, &ask_by(&evil, 1, 1, now, 60_000));
        let mut sig = good.signature().0;
        sig[0] ^= 1;
        GossipMessage::Ask(Signed::from_parts(
            good.body_bytes().to_vec(),
            good.signer(),
            Signature(sig),
        ))
        .encode()
    };
    let other_net = Network::new("other").expect("valid");
    let wrong_network = GossipMessage::Ask(Signed::sign(
        &evil,
        &other_net,
        &ask_by(&evil, 2, 1, now, 60_000),
    ))
    .encode();
    let expired = {
        let created = Timestamp(now.0 - 120_000);
        GossipMessage::Ask(Signed::sign(
            &evil,
            &net,
            &ask_by(&evil, 3, 1, created, 60_000),
        ))
        .encode()
    };
    let oversized = {
        let mut a = ask_by(&evil, 4, 1, now, 60_000);
        a.gpu.driver = "x".repeat(hashgrid_protocol::limits::MAX_GOSSIP_BYTES + 100);
        GossipMessage::Ask(Signed::sign(&evil, &net, &a)).encode()
    };
    // An old sequence number of the real provider's order, signed with its key (as if the
    // attacker had recorded it): the book holds a newer one.
    let replayed = GossipMessage::Ask(Signed::sign(
        &provider_key,
        &net,
        &ask_by(&provider_key, real.order_id, 1, now, 60_000),
    ))
    .encode();
    let garbage = b"\x03\xff\xfe not a hashgrid message at all".to_vec();
    // Slander: evidence against the real provider that does not prove anything.
    let w1 = Keypair::from_secret_bytes([67; 32]);
    let w2 = Keypair::from_secret_bytes([68; 32]);
    let no_contradiction = evidence(
        &evil,
        &net,
        receipt(&provider_key, &evil, &net, b"same"),
        vec![
            receipt(&w1, &evil, &net, b"same"),
            receipt(&w2, &evil, &net, b"same"),
        ],
    );
    // An accused receipt that does not verify here (signed for another network).
    let forged_receipt = evidence(
        &evil,
        &net,
        receipt(&provider_key, &evil, &other_net, b"wrong"),
        vec![
            receipt(&w1, &evil, &net, b"right"),
            receipt(&w2, &evil, &net, b"right"),
        ],
    );
    let one_witness = evidence(
        &evil,
        &net,
        receipt(&provider_key, &evil, &net, b"wrong"),
        vec![receipt(&w1, &evil, &net, b"right")],
    );

    let cases: [(&str, Vec<u8>, &str); 9] = [
        ("forged signature", forged, "bad signature"),
        ("wrong network", wrong_network, "bad signature"),
        ("expired", expired, "expired"),
        ("oversized", oversized, "undecodable"),
        ("replayed old sequence", replayed, "stale"),
        ("garbage", garbage, "undecodable"),
        (
            "evidence of nothing",
            no_contradiction,
            "does not contradict",
        ),
        (
            "evidence with a forged receipt",
            forged_receipt,
            "a receipt does not verify",
        ),
        ("evidence with one witness", one_witness, "witnesses"),
    ];
    for (name, data, expect) in cases {
        publish(&bad, RawTopic::Orders, data).await?;
        for events in [&mut events_a, &mut events_p] {
            let reason = next_rejection(events, bad_id).await?;
            assert!(
                reason.contains(expect),
                "{name}: rejected for {reason:?}, expected {expect:?}"
            );
        }
    }

    // Nothing of it entered any book: each honest book holds exactly the real ask, at the
    // provider's current sequence number.
    for n in &honest {
        let book = n.market().book().await?;
        assert_eq!(book.asks.len(), 1, "book: {:?}", book.asks);
        assert_eq!(book.asks[0].order_ref(), real);
        assert!(book.asks[0].seq > 1);
        assert!(book.asks.iter().all(|a| a.provider != evil.public()));
    }
    // The slandered provider's standing is untouched.
    for n in &honest {
        assert!(
            n.jobs()
                .experience()
                .iter()
                .all(|(p, e)| *p != provider_key.public() || e.reported == 0)
        );
    }
    // The attacker's score fell below zero on both honest nodes.
    for n in &honest {
        let score = n.peers().score(bad_id).await?.unwrap_or(0.0);
        assert!(score < 0.0, "attacker score is {score}");
    }
    // An honest peer keeps a non-negative score.
    let honest_score = honest_a
        .peers()
        .score(provider.peer_id())
        .await?
        .unwrap_or(0.0);
    assert!(honest_score >= 0.0, "honest score is {honest_score}");

    for n in [bad, honest_a, provider] {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_sync_responses_are_rejected_and_cost_score() -> anyhow::Result<()> {
    let net = test_network();
    let evil = Keypair::from_secret_bytes([77; 32]);
    let now = Timestamp::now();
    let bad = test_builder(&[]).start().await?;
    let good_ask = Signed::sign(&evil, &net, &ask_by(&evil, 1, 1, now, 60_000));
    let mut sig = good_ask.signature().0;
    sig[5] ^= 0x40;
    let forged = GossipMessage::Ask(Signed::from_parts(
        good_ask.body_bytes().to_vec(),
        good_ask.signer(),
        Signature(sig),
    ));
    let other_net = Network::new("other").expect("valid");
    let wrong_network = GossipMessage::Ask(Signed::sign(
        &evil,
        &other_net,
        &ask_by(&evil, 2, 1, now, 60_000),
    ));
    bad.testing()
        .serve_in_sync(vec![forged, wrong_network])
        .await?;

    // An honest node connecting to the bad node syncs from it first thing.
    let honest = test_builder(&[]).start().await?;
    let mut events = honest.events();
    honest.peers().dial(addr_of(&bad).await?).await?;
    for _ in 0..2 {
        let reason = next_rejection(&mut events, bad.peer_id()).await?;
        assert!(reason.starts_with("sync response: "), "{reason}");
        assert!(reason.contains("bad signature"), "{reason}");
    }
    assert!(honest.market().book().await?.asks.is_empty());
    let score = honest.peers().score(bad.peer_id()).await?.unwrap_or(0.0);
    assert!(
        score < 0.0,
        "a peer serving forged orders has score {score}"
    );
    honest.shutdown().await;
    bad.shutdown().await;
    Ok(())
}
