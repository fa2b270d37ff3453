//! Bad input on the direct job protocols: forged or mismatched bids, unknown asks, invalid
//! WGSL, wrong terms, exhausted capacity, forged dispatches, and requests from strangers.
//! Each gets a clear refusal and changes nothing; the provider keeps serving honest buyers.

#![allow(clippy::unwrap_used)]

use hashgrid_node::jobs::IntoSharedInputs;
use std::time::Duration;

use hashgrid_node::NodeHandle;
use hashgrid_node::jobs::{JobOptions, JobState, Submission};
use hashgrid_protocol::exchange::{
    BlobReply, BlobRequest, Dispatch, JobMessage, JobPhase, JobReply, JobStatus, NegotiateReply,
    Propose, RejectReason,
};
use hashgrid_protocol::{
    Bid, ContentId, JobLimits, Keypair, Msat, Requirements, Signed, Timestamp, load_job_file,
};
use hashgrid_tests::{addr_of, start_provider, test_builder, test_network, wait_for_asks};

fn saxpy() -> Submission {
    let path = hashgrid_examples::kernels_dir().join("saxpy/job.toml");
    let job = load_job_file(&path, &JobLimits::default()).unwrap();
    Submission {
        spec: job.spec,
        inputs: job.inputs.into_shared(),
        options: JobOptions::default(),
    }
}

fn bid_body(buyer: &NodeHandle) -> Bid {
    let now = Timestamp::now();
    Bid {
        buyer: buyer.public_key(),
        order_id: 1,
        seq: 1,
        units: 1,
        requirements: Requirements::default(),
        max_price: Msat(1000),
        max_seconds: 60,
        created_at: now,
        expires_at: now.plus_ms(60_000),
        model: None,
    }
}

struct Setup {
    provider: NodeHandle,
    buyer: NodeHandle,
    propose: Propose,
}

async fn setup() -> Setup {
    let provider = start_provider(&[], 100, 8, None).await.unwrap();
    let boot = [addr_of(&provider).await.unwrap()];
    let buyer = test_builder(&boot).start().await.unwrap();
    wait_for_asks(&buyer, 1).await.unwrap();
    let ask = buyer.market().book().await.unwrap().asks[0].clone();
    let propose = Propose {
        bid: buyer.testing().sign(&bid_body(&buyer)),
        ask: ask.order_ref(),
        units: 1,
        price: ask.price,
        max_seconds: 60,
        spec: saxpy().spec,
        nonce: 7,
    };
    Setup {
        provider,
        buyer,
        propose,
    }
}

async fn propose(s: &Setup, p: Propose) -> NegotiateReply {
    s.buyer
        .testing()
        .raw_propose(s.provider.peer_id(), Vec::new(), p)
        .await
        .unwrap()
}

fn rejected(r: &NegotiateReply, reason: RejectReason) -> String {
    match r {
        NegotiateReply::Reject(r) if r.reason == reason => r.detail.clone(),
        other => panic!("expected {reason:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_proposals_are_rejected_with_a_reason() {
    hashgrid_tests::init_tracing();
    let s = setup().await;
    let net = test_network();

    // A bid signed by another key than the requesting peer's.
    let other = Keypair::generate().unwrap();
    let mut p = s.propose.clone();
    let mut body = bid_body(&s.buyer);
    body.buyer = other.public();
    p.bid = Signed::sign(&other, &net, &body);
    rejected(&propose(&s, p).await, RejectReason::BadBid);

    // An ask the provider does not have.
    let mut p = s.propose.clone();
    p.ask.order_id += 1000;
    rejected(&propose(&s, p).await, RejectReason::UnknownAsk);

    // Under the ask's price.
    let mut p = s.propose.clone();
    p.price = Msat(1);
    rejected(&propose(&s, p).await, RejectReason::Terms);

    // Invalid WGSL (the buyer's own check was bypassed): refused before any agreement.
    let mut p = s.propose.clone();
    p.spec.shaders[0].wgsl = "fn main( {".into();
    let detail = rejected(&propose(&s, p).await, RejectReason::InvalidJob);
    assert!(detail.contains("saxpy.wgsl"), "{detail}");

    // A limit breach: more workgroups than the adapter allows.
    let mut p = s.propose.clone();
    p.spec.passes[0].workgroups = [u32::MAX, 1, 1];
    rejected(&propose(&s, p).await, RejectReason::InvalidJob);

    // The honest proposal is agreed; a second one finds no free unit.
    let NegotiateReply::Agreed(agreement) = propose(&s, s.propose.clone()).await else {
        panic!("an honest proposal is agreed")
    };
    let a = agreement.verify(&net).unwrap();
    assert_eq!(a.buyer, s.buyer.public_key());
    assert_eq!(a.price, Msat(100));
    let mut again = s.propose.clone();
    again.nonce += 1;
    rejected(&propose(&s, again).await, RejectReason::NoCapacity);

    // Dispatch without the buyer's countersignature (countersigned by the wrong key).
    let stranger = test_builder(&[addr_of(&s.provider).await.unwrap()])
        .start()
        .await
        .unwrap();
    let forged = stranger.testing().countersign(&agreement);
    let d = |agreement| {
        JobMessage::Dispatch(Box::new(Dispatch {
            job_id: ContentId::of(b"job"),
            agreement,
            spec: s.propose.spec.clone(),
            inputs: Vec::new(),
            model: None,
        }))
    };
    let reply = s
        .buyer
        .testing()
        .raw_job(s.provider.peer_id(), d(forged.clone()))
        .await
        .unwrap();
    assert!(matches!(reply, JobReply::Refused(_)), "{reply:?}");
    // The right countersignature from the wrong peer.
    let genuine = s.buyer.testing().countersign(&agreement);
    let reply = stranger
        .testing()
        .raw_job(s.provider.peer_id(), d(genuine.clone()))
        .await
        .unwrap();
    assert!(matches!(reply, JobReply::Refused(_)), "{reply:?}");
    // A different spec than agreed.
    let mut other_spec = s.propose.spec.clone();
    other_spec.name = "something else".into();
    let reply = s
        .buyer
        .testing()
        .raw_job(
            s.provider.peer_id(),
            JobMessage::Dispatch(Box::new(Dispatch {
                job_id: ContentId::of(b"job"),
                agreement: genuine.clone(),
                spec: other_spec,
                inputs: Vec::new(),
                model: None,
            })),
        )
        .await
        .unwrap();
    assert!(matches!(reply, JobReply::Refused(_)), "{reply:?}");

    // A model manifest naming a blob the job does not use.
    let bogus = hashgrid_protocol::ModelManifest::new([(ContentId::of(b"not an input"), 1 << 20)]);
    let reply = s
        .buyer
        .testing()
        .raw_job(
            s.provider.peer_id(),
            JobMessage::Dispatch(Box::new(Dispatch {
                job_id: ContentId::of(b"job"),
                agreement: genuine.clone(),
                spec: s.propose.spec.clone(),
                inputs: Vec::new(),
                model: Some(bogus),
            })),
        )
        .await
        .unwrap();
    match reply {
        JobReply::Refused(why) => assert!(why.contains("model manifest"), "{why}"),
        other => panic!("{other:?}"),
    }

    // Strangers learn nothing about the job and get none of its blobs.
    let reply = stranger
        .testing()
        .raw_job(
            s.provider.peer_id(),
            JobMessage::Await {
                agreement: agreement.id(),
                seen: JobPhase::Unknown,
            },
        )
        .await
        .unwrap();
    assert_eq!(reply, JobReply::Status(JobStatus::Unknown));
    let reply = stranger
        .testing()
        .raw_blob(
            s.provider.peer_id(),
            BlobRequest {
                id: ContentId::of(b"anything"),
                offset: 0,
                len: 1024,
            },
        )
        .await
        .unwrap();
    assert_eq!(reply, BlobReply::NotFound);

    // The provider still serves an honest job once the reservation lapses or is used: use it.
    let reply = s
        .buyer
        .testing()
        .raw_job(s.provider.peer_id(), d(genuine))
        .await
        .unwrap();
    assert_eq!(reply, JobReply::Status(JobStatus::Queued));
    stranger.shutdown().await;
    s.buyer.shutdown().await;
    s.provider.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_vanishes_before_agreeing_costs_one_attempt() {
    hashgrid_tests::init_tracing();
    let gone = start_provider(&[], 10, 8, None).await.unwrap();
    let boot = [addr_of(&gone).await.unwrap()];
    let good = start_provider(&boot, 20, 8, None).await.unwrap();
    let buyer = test_builder(&boot).start().await.unwrap();
    wait_for_asks(&buyer, 2).await.unwrap();
    gone.shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let id = buyer.jobs().submit(saxpy()).await.unwrap();
    let rec = tokio::time::timeout(Duration::from_secs(60), buyer.jobs().wait(&id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    assert_eq!(rec.provider, Some(good.public_key()));
    buyer.shutdown().await;
    good.shutdown().await;
}
