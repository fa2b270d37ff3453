//! Oversized or lying input is rejected before any large allocation: a counting global
//! allocator records the largest allocation made while decoding hostile bytes.
#![allow(unsafe_code)] // a GlobalAlloc impl needs it; this file is the only place.

use hashgrid_protocol::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;
static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns (largest allocation, number of allocations) made meanwhile.
fn measure<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    COUNT.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    let r = f();
    ARMED.store(false, Ordering::SeqCst);
    (
        r,
        LARGEST.load(Ordering::SeqCst),
        COUNT.load(Ordering::SeqCst),
    )
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// One test, so no other test thread allocates while the counter is armed.
#[test]
fn hostile_inputs_allocate_little() {
    // 1. Over the size limit: refused without a single allocation.
    let big = vec![0u8; limits::MAX_GOSSIP_BYTES + 1];
    let (r, largest, count) = measure(|| GossipMessage::decode(&big));
    assert!(matches!(r, Err(DecodeError::TooLarge { .. })));
    assert_eq!((largest, count), (0, 0), "TooLarge must not allocate");

    let big = vec![0u8; limits::MAX_MESSAGE_BYTES + 1];
    let (r, _, count) = measure(|| JobSpec::decode(&big));
    assert!(matches!(r, Err(DecodeError::TooLarge { .. })));
    assert_eq!(count, 0);

    // 2. A gossip message (variant 1 = Ask) whose body claims 2^40 bytes in a 20-byte input.
    let mut lying = vec![1u8];
    varint(1 << 40, &mut lying);
    lying.extend_from_slice(&[0u8; 12]);
    let (r, largest, _) = measure(|| GossipMessage::decode(&lying));
    assert!(matches!(r, Err(DecodeError::Malformed { .. })), "{r:?}");
    assert!(
        largest < 4096,
        "largest allocation {largest} bytes for a 20-byte input"
    );

    // 3. A job spec claiming 2^32 buffers: serde preallocates at most 1 MiB however large the
    //    claim, and the decoder fails at the first missing byte.
    let mut lying = Vec::new();
    varint(3, &mut lying);
    lying.extend_from_slice(b"abc");
    varint(u32::MAX as u64, &mut lying);
    let (r, largest, _) = measure(|| JobSpec::decode(&lying));
    assert!(matches!(r, Err(DecodeError::Malformed { .. })), "{r:?}");
    assert!(
        largest <= 1024 * 1024 + 4096,
        "largest allocation {largest} bytes for a {}-byte input",
        lying.len()
    );

    // 4. Within the limit, a valid message decodes with allocations bounded by its size.
    let k = Keypair::from_secret_bytes([1; 32]);
    let c = Cancel {
        owner: k.public(),
        order_id: 1,
        seq: 1,
        created_at: Timestamp(0),
        expires_at: Timestamp(1),
    };
    let wire = GossipMessage::Cancel(Signed::sign(&k, &Network::test(), &c)).encode();
    let (r, largest, _) = measure(|| GossipMessage::decode(&wire));
    assert!(r.is_ok());
    assert!(largest <= wire.len() * 2);
}
