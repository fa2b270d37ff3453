//! How a BOLT11 invoice is bound to the receipts it bills.
//!
//! A provider's hashgrid invoice (signed with its ed25519 key) lists receipt ids and their
//! exact total; its Lightning payment request must be for that total and nothing else. BOLT11
//! carries a 32-byte description hash (`h`, the SHA-256 of a description too long to include);
//! hashgrid puts there the SHA-256 of [`description`], a canonical text that names the provider,
//! the buyer, the invoice's sequence number, the amount in msat and every receipt id in order.
//! The buyer recomputes it from receipts it countersigned and refuses an invoice whose hash
//! differs ([`crate::invoice::check`]), so a payment request cannot be replayed for another
//! bill, another buyer or another amount, and the preimage it gets back proves payment of
//! exactly these receipts.

use hashgrid_protocol::{ContentId, Msat, PublicKey};
use ldk_node::bitcoin::hashes::{Hash, sha256};

/// What one Lightning payment settles.
#[derive(Debug, Clone, Copy)]
pub struct Bill<'a> {
    /// The provider (payee).
    pub provider: &'a PublicKey,
    /// The buyer (payer).
    pub buyer: &'a PublicKey,
    /// The hashgrid invoice's sequence number for this provider–buyer pair.
    pub seq: u64,
    /// The exact total, in msat.
    pub amount: Msat,
    /// The receipts billed, in the hashgrid invoice's order.
    pub receipts: &'a [ContentId],
}

/// The canonical description of `bill` (version 1): one `key value` line each, receipts
/// comma-separated in order, all ids in lowercase hex.
pub fn description(bill: &Bill<'_>) -> String {
    let mut s = String::with_capacity(160 + 65 * bill.receipts.len());
    s.push_str("hashgrid-invoice v1\n");
    s.push_str(&format!("provider {}\n", bill.provider));
    s.push_str(&format!("buyer {}\n", bill.buyer));
    s.push_str(&format!("seq {}\n", bill.seq));
    s.push_str(&format!("amount_msat {}\n", bill.amount.0));
    s.push_str("receipts ");
    for (i, r) in bill.receipts.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&r.to_string());
    }
    s
}

/// The BOLT11 description hash for `bill`: SHA-256 of [`description`].
pub fn description_hash(bill: &Bill<'_>) -> [u8; 32] {
    sha256::Hash::hash(description(bill).as_bytes()).to_byte_array()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bill<'a>(p: &'a PublicKey, b: &'a PublicKey, r: &'a [ContentId], amount: u64) -> Bill<'a> {
        Bill {
            provider: p,
            buyer: b,
            seq: 7,
            amount: Msat(amount),
            receipts: r,
        }
    }

    #[test]
    fn every_field_of_the_bill_changes_the_hash() {
        let (p, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let r = [ContentId([3; 32]), ContentId([4; 32])];
        let base = description_hash(&bill(&p, &b, &r, 1500));
        assert_eq!(base, description_hash(&bill(&p, &b, &r, 1500)));
        assert_ne!(
            base,
            description_hash(&bill(&b, &p, &r, 1500)),
            "roles swapped"
        );
        assert_ne!(base, description_hash(&bill(&p, &b, &r, 1501)), "amount");
        assert_ne!(
            base,
            description_hash(&bill(&p, &b, &r[..1], 1500)),
            "receipts"
        );
        let swapped = [r[1], r[0]];
        assert_ne!(
            base,
            description_hash(&bill(&p, &b, &swapped, 1500)),
            "order"
        );
        let mut other_seq = bill(&p, &b, &r, 1500);
        other_seq.seq = 8;
        assert_ne!(base, description_hash(&other_seq), "seq");
    }

    #[test]
    fn the_description_is_the_documented_text() {
        let (p, b) = (PublicKey([0xaa; 32]), PublicKey([0xbb; 32]));
        let r = [ContentId([0x01; 32]), ContentId([0x02; 32])];
        let text = description(&bill(&p, &b, &r, 42));
        let want = format!(
            "hashgrid-invoice v1\nprovider {}\nbuyer {}\nseq 7\namount_msat 42\nreceipts {},{}",
            "aa".repeat(32),
            "bb".repeat(32),
            "01".repeat(32),
            "02".repeat(32)
        );
        assert_eq!(text, want);
    }
}
