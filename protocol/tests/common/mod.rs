//! Proptest strategies for every protocol message (shared by the protocol's test files).
#![allow(dead_code, unreachable_pub, missing_docs)]
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use hashgrid_protocol::*;
use proptest::collection::vec;
use proptest::prelude::*;

/// The 256 test keys, derived once (key derivation is a scalar multiplication).
fn keys() -> &'static [Keypair] {
    static KEYS: std::sync::OnceLock<Vec<Keypair>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        (0..=255u8)
            .map(|s| Keypair::from_secret_bytes([s; 32]))
            .collect()
    })
}

pub fn key(seed: u8) -> Keypair {
    keys()[seed as usize].clone()
}

/// The test key whose public half is `pk`.
pub fn signer_of(pk: PublicKey) -> Keypair {
    keys()
        .iter()
        .find(|k| k.public() == pk)
        .expect("a test key")
        .clone()
}

pub fn arb_pk() -> impl Strategy<Value = PublicKey> {
    any::<u8>().prop_map(|s| key(s).public())
}

pub fn arb_id() -> impl Strategy<Value = ContentId> {
    any::<[u8; 32]>().prop_map(ContentId)
}

pub fn arb_str() -> impl Strategy<Value = String> {
    "[a-z0-9 ()_.-]{1,40}"
}

pub fn arb_backend() -> impl Strategy<Value = Backend> {
    prop_oneof![
        Just(Backend::Vulkan),
        Just(Backend::Metal),
        Just(Backend::Dx12),
        Just(Backend::Gl),
        Just(Backend::BrowserWebGpu),
        Just(Backend::Other),
    ]
}

pub fn arb_device_type() -> impl Strategy<Value = DeviceType> {
    prop_oneof![
        Just(DeviceType::DiscreteGpu),
        Just(DeviceType::IntegratedGpu),
        Just(DeviceType::VirtualGpu),
        Just(DeviceType::Cpu),
        Just(DeviceType::Other),
    ]
}

prop_compose! {
    pub fn arb_limits()(a in any::<u64>(), b in any::<u64>(), c in any::<u64>(), d in any::<u32>(),
                        e in any::<u32>(), f in any::<u32>(), g in any::<u32>()) -> GpuLimits {
        GpuLimits {
            max_buffer_size: a, max_storage_buffer_binding_size: b,
            max_uniform_buffer_binding_size: c, max_compute_workgroups_per_dimension: d,
            max_compute_invocations_per_workgroup: e, max_compute_workgroup_storage_size: f,
            max_storage_buffers_per_shader_stage: g,
        }
    }
}

prop_compose! {
    pub fn arb_gpu()(name in arb_str(), vendor in any::<u32>(), device in any::<u32>(),
                     backend in arb_backend(), device_type in arb_device_type(),
                     driver in "[a-z0-9 .]{0,20}", memory_bytes in any::<u64>(),
                     limits in arb_limits(), mflops in any::<u64>(), mbps in any::<u64>()) -> GpuProfile {
        GpuProfile { name, vendor, device, backend, device_type, driver, memory_bytes, limits,
                     bench: Benchmark { matmul_mflops: mflops, copy_mbps: mbps } }
    }
}

pub fn arb_times() -> impl Strategy<Value = (Timestamp, Timestamp)> {
    (0u64..1 << 45, 1u64..limits::MAX_TTL_MS)
        .prop_map(|(c, ttl)| (Timestamp(c), Timestamp(c + ttl)))
}

prop_compose! {
    pub fn arb_ad()(provider in arb_pk(), region in arb_str(), gpus in vec(arb_gpu(), 0..4),
                    units_free in 0u32..100, extra in 0u32..100,
                    settlement in vec(prop_oneof![Just(SettlementMethod::Ledger), Just(SettlementMethod::Onchain)], 0..3),
                    addrs in vec("/ip4/127\\.0\\.0\\.1/tcp/[0-9]{1,5}", 0..3),
                    seq in any::<u64>(), (created_at, expires_at) in arb_times(),
                    warm in vec(arb_id(), 0..4), models in vec(arb_id(), 0..3)) -> CapacityAd {
        CapacityAd { provider, region, gpus, units_total: units_free + extra, units_free, settlement,
                     addrs, seq, created_at, expires_at, warm, models }
    }
}

prop_compose! {
    pub fn arb_ask()(provider in arb_pk(), order_id in any::<u64>(), seq in any::<u64>(),
                     units in 1u32..1000, price in any::<u64>(), gpu in arb_gpu(), region in arb_str(),
                     max_seconds in 1u32..100_000, (created_at, expires_at) in arb_times()) -> Ask {
        Ask { provider, order_id, seq, units, price: Msat(price), gpu, region, max_seconds,
              created_at, expires_at }
    }
}

prop_compose! {
    pub fn arb_bid()(buyer in arb_pk(), order_id in any::<u64>(), seq in any::<u64>(),
                     units in 1u32..1000, min_memory_bytes in any::<u64>(), min_mflops in any::<u64>(),
                     regions in vec(arb_str(), 0..4), backends in vec(arb_backend(), 0..3),
                     max_price in any::<u64>(), max_seconds in 1u32..100_000,
                     (created_at, expires_at) in arb_times(),
                     model in proptest::option::of(arb_id())) -> Bid {
        Bid { buyer, order_id, seq, units,
              requirements: Requirements { min_memory_bytes, min_mflops, regions, backends },
              max_price: Msat(max_price), max_seconds, created_at, expires_at, model }
    }
}

prop_compose! {
    pub fn arb_cancel()(owner in arb_pk(), order_id in any::<u64>(), seq in any::<u64>(),
                        (created_at, expires_at) in arb_times()) -> Cancel {
        Cancel { owner, order_id, seq, created_at, expires_at }
    }
}

prop_compose! {
    pub fn arb_order_ref()(owner in arb_pk(), order_id in any::<u64>()) -> OrderRef {
        OrderRef { owner, order_id }
    }
}

prop_compose! {
    pub fn arb_agreement()(b in 0u8..128, p in 128u8..=255, bid in arb_order_ref(), ask in arb_order_ref(),
                           units in 1u32..100, price in any::<u64>(), max_seconds in 1u32..100_000,
                           max_charge in any::<u64>(), spec_id in arb_id(), nonce in any::<u64>(),
                           (created_at, expires_at) in arb_times()) -> Agreement {
        Agreement { buyer: key(b).public(), provider: key(p).public(), bid, ask, units,
                    price: Msat(price), max_seconds, max_charge: Msat(max_charge), spec_id, nonce,
                    created_at, expires_at }
    }
}

prop_compose! {
    pub fn arb_receipt()(job_id in arb_id(), agreement_id in arb_id(), b in 0u8..128, p in 128u8..=255,
                         spec_id in arb_id(), inputs in vec(arb_id(), 0..4),
                         outputs in vec(("[a-z0-9_][a-z0-9_.-]{0,39}", arb_id(), any::<u64>()), 0..4),
                         adapter in arb_gpu(), start in 0u64..1 << 45, dur in 0u64..1 << 20,
                         gpu_time_us in any::<u64>(), charge in any::<u64>(), chain_seq in any::<u64>(),
                         prev in arb_id()) -> Receipt {
        Receipt { job_id, agreement_id, buyer: key(b).public(), provider: key(p).public(), spec_id, inputs,
                  outputs: outputs.into_iter().map(|(name, id, bytes)| OutputRecord { name, id, bytes }).collect(),
                  adapter, started_at: Timestamp(start), finished_at: Timestamp(start + dur), gpu_time_us,
                  charge: Msat(charge), chain_seq, prev_receipt: (chain_seq != 0).then_some(prev) }
    }
}

prop_compose! {
    pub fn arb_invoice()(provider in arb_pk(), buyer in arb_pk(), seq in any::<u64>(),
                         receipts in vec(arb_id(), 0..5), amount in any::<u64>(), onchain in any::<bool>(),
                         address in "bc1q[a-z0-9]{20,40}", amount_sat in any::<u64>(),
                         (created_at, expires_at) in arb_times()) -> Invoice {
        let payment = if onchain { InvoicePayment::Onchain { address, amount_sat } } else { InvoicePayment::Ledger };
        Invoice { provider, buyer, seq, receipts, amount: Msat(amount), payment, created_at, expires_at }
    }
}

prop_compose! {
    pub fn arb_payment()(invoice_id in arb_id(), buyer in arb_pk(), provider in arb_pk(),
                         txid in "[0-9a-f]{64}", vout in any::<u32>(), amount_sat in any::<u64>(),
                         created in any::<u64>()) -> PaymentProof {
        PaymentProof { invoice_id, buyer, provider, txid, vout, amount_sat, created_at: Timestamp(created) }
    }
}

prop_compose! {
    pub fn arb_job_spec()(name in arb_str(),
                          bufs in vec((any::<u64>(), any::<bool>(), proptest::option::of(arb_id())), 1..5),
                          shaders in vec(("[a-z]{1,8}\\.wgsl", "[ -~]{0,60}"), 1..3),
                          passes in vec(("[a-z_]{1,10}", any::<[u32; 3]>(), vec((0u32..8, 0u32..5), 0..4)), 1..4)) -> JobSpec {
        JobSpec {
            name,
            buffers: bufs.into_iter().enumerate().map(|(i, (size, output, blob))| BufferSpec {
                name: format!("b{i}"), size, output,
                init: blob.map_or(BufferInit::Zeroed, BufferInit::Blob),
            }).collect(),
            shaders: shaders.into_iter().map(|(name, wgsl)| ShaderSource { name, wgsl }).collect(),
            passes: passes.into_iter().map(|(entry, workgroups, b)| PassSpec {
                shader: 0, entry, workgroups,
                bindings: b.into_iter().map(|(binding, buffer)| Binding::whole(binding, buffer)).collect(),
            }).collect(),
            loops: Vec::new(),
        }
    }
}
