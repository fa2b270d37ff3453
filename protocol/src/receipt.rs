//! Receipts that anyone can check offline: the receipt file format, output verification and
//! the per-provider receipt hash chain.
//!
//! A receipt file is JSON: `{ "network": "main", "receipt": <Countersigned<Receipt>> }`.
//! [`verify_receipt_file`] checks the provider's signature, the buyer's countersignature and the
//! receipt's internal consistency; [`check_outputs`] checks output bytes against it; and
//! [`ChainAuditor`] checks that a provider's receipts form one unbroken hash chain.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::id::ContentId;
use crate::identity::PublicKey;
use crate::limits::MAX_MESSAGE_BYTES;
use crate::messages::{Agreement, Receipt};
use crate::money::Msat;
use crate::signed::{Countersigned, Network, Signed, SignedError};

/// Largest receipt file read: a receipt is far smaller than a message, JSON doubles it.
pub const MAX_RECEIPT_FILE_BYTES: usize = 2 * MAX_MESSAGE_BYTES;

/// A countersigned receipt with the network it was signed for, as saved to disk. Unknown keys
/// are refused: a file that says more than its signatures cover is not a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptFile {
    /// The network the signatures are for.
    pub network: Network,
    /// The receipt, signed by the provider and countersigned by the buyer.
    pub receipt: Countersigned<Receipt>,
    /// The agreement it ran under, signed by the provider and countersigned by the buyer, so
    /// that anyone can check the charge offline (absent in files written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<Countersigned<Agreement>>,
}

/// A receipt that failed a check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    /// The file is too large or not a receipt file.
    #[error("not a receipt file: {0}")]
    Format(String),
    /// A signature or countersignature does not verify.
    #[error(transparent)]
    Signature(#[from] SignedError),
    /// An output is missing, extra, or does not hash to the id in the receipt.
    #[error("output `{name}`: {reason}")]
    Output {
        /// The output buffer.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The receipt does not match the agreement it claims to run under.
    #[error("receipt does not match its agreement: {0}")]
    Agreement(String),
    /// The provider's receipt chain is broken.
    #[error("receipt chain of provider {provider}: {reason}")]
    Chain {
        /// The provider.
        provider: PublicKey,
        /// What is wrong.
        reason: String,
    },
}

impl ReceiptFile {
    /// Pretty JSON for people and tools.
    pub fn to_json(&self) -> String {
        // Serializing these types to JSON cannot fail: no maps with non-string keys.
        serde_json::to_string_pretty(self).expect("receipt files always serialize")
    }
}

/// Parses and fully verifies a receipt file (signature, countersignature, structure) and,
/// when it carries its agreement, the agreement (signed by the receipt's provider,
/// countersigned by its buyer, the one the receipt names) and the charge against it.
pub fn verify_receipt_file(bytes: &[u8]) -> Result<(ReceiptFile, Receipt), ReceiptError> {
    if bytes.len() > MAX_RECEIPT_FILE_BYTES {
        return Err(ReceiptError::Format(format!(
            "{} bytes is over the limit of {MAX_RECEIPT_FILE_BYTES}",
            bytes.len()
        )));
    }
    let file: ReceiptFile =
        serde_json::from_slice(bytes).map_err(|e| ReceiptError::Format(e.to_string()))?;
    let receipt = file.receipt.verify(&file.network)?;
    if let Some(agreement) = &file.agreement {
        let terms = agreement.verify(&file.network)?;
        check_against_agreement(&receipt, agreement.signed.id(), &terms)?;
    }
    Ok((file, receipt))
}

/// Checks that `outputs` (name → bytes) are exactly the receipt's outputs, each hashing to the
/// id and length the receipt records.
pub fn check_outputs(
    receipt: &Receipt,
    outputs: &BTreeMap<String, Vec<u8>>,
) -> Result<(), ReceiptError> {
    for rec in &receipt.outputs {
        let Some(bytes) = outputs.get(&rec.name) else {
            return Err(ReceiptError::Output {
                name: rec.name.clone(),
                reason: "in the receipt but not received".into(),
            });
        };
        if bytes.len() as u64 != rec.bytes {
            return Err(ReceiptError::Output {
                name: rec.name.clone(),
                reason: format!(
                    "received {} bytes, the receipt says {}",
                    bytes.len(),
                    rec.bytes
                ),
            });
        }
        let id = ContentId::of(bytes);
        if id != rec.id {
            return Err(ReceiptError::Output {
                name: rec.name.clone(),
                reason: format!("hashes to {id}, the receipt says {}", rec.id),
            });
        }
    }
    if let Some(extra) = outputs
        .keys()
        .find(|k| !receipt.outputs.iter().any(|o| &o.name == *k))
    {
        return Err(ReceiptError::Output {
            name: extra.clone(),
            reason: "received but not in the receipt".into(),
        });
    }
    Ok(())
}

/// Checks a receipt against the agreement it claims: same parties, same spec, charge within
/// the agreement's maximum and price × time.
pub fn check_against_agreement(
    receipt: &Receipt,
    agreement_id: ContentId,
    agreement: &Agreement,
) -> Result<(), ReceiptError> {
    let fail = |s: String| Err(ReceiptError::Agreement(s));
    if receipt.agreement_id != agreement_id {
        return fail(format!(
            "names agreement {}, expected {agreement_id}",
            receipt.agreement_id
        ));
    }
    if receipt.buyer != agreement.buyer || receipt.provider != agreement.provider {
        return fail("buyer or provider differ".into());
    }
    if receipt.spec_id != agreement.spec_id {
        return fail(format!(
            "spec {} differs from the agreed spec {}",
            receipt.spec_id, agreement.spec_id
        ));
    }
    if receipt.charge > agreement.max_charge {
        return fail(format!(
            "charge {} is over the agreed maximum {}",
            receipt.charge, agreement.max_charge
        ));
    }
    // price is per GPU-second per unit; time is in µs. Round up, as the market does.
    let ceiling = u128::from(agreement.price.0)
        .saturating_mul(u128::from(agreement.units))
        .saturating_mul(u128::from(receipt.gpu_time_us))
        .div_ceil(1_000_000);
    if u128::from(receipt.charge.0) > ceiling {
        return fail(format!(
            "charge {} is more than price × units × GPU time ({} msat)",
            receipt.charge, ceiling
        ));
    }
    if receipt.gpu_time_us > u64::from(agreement.max_seconds).saturating_mul(1_000_000) {
        return fail(format!(
            "GPU time {} µs is over the agreed {} s",
            receipt.gpu_time_us, agreement.max_seconds
        ));
    }
    Ok(())
}

/// Checks, one receipt at a time and in chain order, that a provider's receipts form one
/// unbroken hash chain: `chain_seq` 0, 1, 2, … and each `prev_receipt` naming the previous
/// receipt's id.
#[derive(Debug, Clone)]
pub struct ChainAuditor {
    provider: PublicKey,
    network: Network,
    next_seq: u64,
    prev: Option<ContentId>,
    total: Msat,
}

impl ChainAuditor {
    /// An auditor for `provider`'s chain on `network`, starting at the first receipt.
    pub fn new(provider: PublicKey, network: Network) -> ChainAuditor {
        ChainAuditor {
            provider,
            network,
            next_seq: 0,
            prev: None,
            total: Msat::ZERO,
        }
    }

    /// Verifies the next receipt of the chain and links it.
    pub fn push(&mut self, signed: &Signed<Receipt>) -> Result<Receipt, ReceiptError> {
        let r = signed.verify(&self.network)?;
        let fail = |reason: String| ReceiptError::Chain {
            provider: self.provider,
            reason,
        };
        if r.provider != self.provider {
            return Err(fail(format!(
                "receipt {} is by {}",
                signed.id(),
                r.provider
            )));
        }
        if r.chain_seq != self.next_seq {
            return Err(fail(format!(
                "expected chain_seq {}, got {} (a receipt is missing or repeated)",
                self.next_seq, r.chain_seq
            )));
        }
        if r.prev_receipt != self.prev {
            return Err(fail(format!(
                "receipt {} links to {:?}, expected {:?}",
                r.chain_seq, r.prev_receipt, self.prev
            )));
        }
        self.total = self
            .total
            .checked_add(r.charge)
            .ok_or_else(|| fail("total charge overflows".into()))?;
        self.next_seq += 1;
        self.prev = Some(signed.id());
        Ok(r)
    }

    /// Receipts verified so far.
    pub fn len(&self) -> u64 {
        self.next_seq
    }

    /// Whether none has been verified.
    pub fn is_empty(&self) -> bool {
        self.next_seq == 0
    }

    /// Id of the last receipt verified (the chain head).
    pub fn head(&self) -> Option<ContentId> {
        self.prev
    }

    /// Sum of the charges verified.
    pub fn total_charged(&self) -> Msat {
        self.total
    }
}
