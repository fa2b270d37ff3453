//! The swarm task does not do the provider's work: proposals whose WGSL takes the provider
//! long to parse and validate (naga) are answered on the provider's own thread, so the swarm
//! task keeps polling (gossip, other peers' requests) while they are checked.

#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hashgrid_protocol::exchange::{NegotiateReply, Propose, RejectReason};
use hashgrid_protocol::{
    BufferInit, BufferSpec, JobSpec, Msat, PassSpec, Requirements, ShaderSource, Timestamp,
};
use hashgrid_tests::{addr_of, start_provider, test_builder, wait_for_asks};

/// A spec whose one shader is ~`bytes` of valid functions followed by an entry point that
/// names an undefined identifier: naga reads all of it before refusing it.
fn slow_spec(bytes: usize) -> JobSpec {
    let mut wgsl = String::with_capacity(bytes + 256);
    let mut i = 0;
    while wgsl.len() < bytes {
        let _ = writeln!(
            wgsl,
            "fn g_{i}(x: f32) -> f32 {{ return x * {i}.0 + 1.0; }}"
        );
        i += 1;
    }
    wgsl.push_str(
        "@group(0) @binding(0) var<storage, read_write> out: array<u32>;\n\
         @compute @workgroup_size(1) fn main() { out[0] = undefined_name; }\n",
    );
    JobSpec {
        name: "slow to check".into(),
        buffers: vec![BufferSpec {
            name: "out".into(),
            size: 4,
            init: BufferInit::Zeroed,
            output: true,
        }],
        shaders: vec![ShaderSource {
            name: "slow.wgsl".into(),
            wgsl,
        }],
        passes: vec![PassSpec {
            shader: 0,
            entry: "main".into(),
            workgroups: [1, 1, 1],
            bindings: vec![hashgrid_protocol::Binding {
                binding: 0,
                buffer: 0,
                range: None,
            }],
        }],
        loops: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_slow_to_check_do_not_stall_the_swarm_task() {
    hashgrid_tests::init_tracing();
    let provider = start_provider(&[], 100, 8, None).await.unwrap();
    let boot = [addr_of(&provider).await.unwrap()];
    let buyer = test_builder(&boot).start().await.unwrap();
    wait_for_asks(&buyer, 1).await.unwrap();
    let ask = buyer.market().book().await.unwrap().asks[0].clone();
    let spec = slow_spec(400 << 10);
    let before = provider.ops().loop_lag();
    let started = Instant::now();
    let mut checks = Vec::new();
    for nonce in 0..6u64 {
        let now = Timestamp::now();
        let bid = hashgrid_protocol::Bid {
            buyer: buyer.public_key(),
            order_id: nonce + 1,
            seq: 1,
            units: 1,
            requirements: Requirements::default(),
            max_price: Msat(1000),
            max_seconds: 60,
            created_at: now,
            expires_at: now.plus_ms(60_000),
            model: None,
        };
        let p = Propose {
            bid: buyer.testing().sign(&bid),
            ask: ask.order_ref(),
            units: 1,
            price: ask.price,
            max_seconds: 60,
            spec: spec.clone(),
            nonce,
        };
        let (b, peer) = (buyer.clone(), provider.peer_id());
        checks.push(tokio::spawn(async move {
            b.testing().raw_propose(peer, Vec::new(), p).await.unwrap()
        }));
    }
    for c in checks {
        match c.await.unwrap() {
            NegotiateReply::Reject(r) => {
                assert_eq!(r.reason, RejectReason::InvalidJob, "{}", r.detail);
                assert!(r.detail.contains("undefined_name"), "{}", r.detail);
            }
            other => panic!("{other:?}"),
        }
    }
    let checking = started.elapsed();
    let lag = provider.ops().loop_lag();
    eprintln!(
        "6 proposals checked in {checking:?}; the swarm task's longest stall {:?} \
         (before them {:?}), p99 {:?}, {} samples",
        lag.max, before.max, lag.p99, lag.samples
    );
    // The checks took the provider a while (each one parses 400 KiB of WGSL)...
    assert!(checking > Duration::from_millis(300), "{checking:?}");
    // ...and none of it happened on the swarm task.
    assert!(
        lag.max < Duration::from_millis(250).max(before.max),
        "the swarm task stalled {:?} while {checking:?} of checks ran",
        lag.max
    );
    buyer.shutdown().await;
    provider.shutdown().await;
}
