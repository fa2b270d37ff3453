//! Checking a BOLT11 invoice before paying it, and a preimage after.

use std::str::FromStr;
use std::time::Duration;

use hashgrid_protocol::Msat;
use ldk_node::bitcoin::Network;
use ldk_node::bitcoin::hashes::{Hash, sha256};
use ldk_node::lightning_invoice::{Bolt11Invoice, Bolt11InvoiceDescriptionRef};

/// Longest payment request accepted (characters): the protocol's bound on the request in a
/// signed invoice. Real invoices are a few hundred; this bounds what a peer can make a buyer
/// parse.
pub const MAX_INVOICE_CHARS: usize = hashgrid_protocol::limits::MAX_PAYMENT_REQUEST_LEN;

/// A payment hash (SHA-256 of the preimage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PaymentHash(pub [u8; 32]);

/// A payment preimage: the proof that a payment was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preimage(pub [u8; 32]);

impl Preimage {
    /// Whether this preimage hashes to `hash`.
    pub fn matches(&self, hash: &PaymentHash) -> bool {
        sha256::Hash::hash(&self.0).to_byte_array() == hash.0
    }
}

impl std::fmt::Display for PaymentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Display for Preimage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// What a buyer expects of an invoice it is about to pay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The network its channels are on.
    pub network: Network,
    /// The exact amount, in msat.
    pub amount: Msat,
    /// The description hash ([`crate::bind::description_hash`] of the bill).
    pub description_hash: [u8; 32],
}

/// Why an invoice was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvoiceError {
    /// Longer than [`MAX_INVOICE_CHARS`].
    #[error("payment request is {0} characters (at most {MAX_INVOICE_CHARS})")]
    TooLong(usize),
    /// Not a valid BOLT11 payment request (bad bech32, bad signature, missing fields).
    #[error("not a BOLT11 payment request: {0}")]
    Parse(String),
    /// For another network.
    #[error("invoice is for {invoice}, this node pays on {expected}")]
    WrongNetwork {
        /// The invoice's network.
        invoice: Network,
        /// Ours.
        expected: Network,
    },
    /// No amount: the payer would choose it, which settlement never does.
    #[error("invoice has no amount")]
    NoAmount,
    /// Not the amount billed.
    #[error("invoice asks {invoice} msat, the bill is {expected} msat")]
    Amount {
        /// The invoice's amount.
        invoice: u64,
        /// The bill's.
        expected: u64,
    },
    /// The description hash is not the bill's (or the invoice has a plain description).
    #[error("invoice's description does not bind the receipts billed")]
    NotBound,
    /// Past its expiry.
    #[error("invoice expired {0} s ago")]
    Expired(u64),
}

/// Parses a BOLT11 payment request (signature included), bounded in size.
pub fn parse(request: &str) -> Result<Bolt11Invoice, InvoiceError> {
    let request = request.trim();
    if request.len() > MAX_INVOICE_CHARS {
        return Err(InvoiceError::TooLong(request.len()));
    }
    Bolt11Invoice::from_str(request).map_err(|e| InvoiceError::Parse(e.to_string()))
}

/// Checks `invoice` against what the buyer expects at `now` (time since the Unix epoch).
pub fn check(
    invoice: &Bolt11Invoice,
    expected: &Expected,
    now: Duration,
) -> Result<(), InvoiceError> {
    if invoice.network() != expected.network {
        return Err(InvoiceError::WrongNetwork {
            invoice: invoice.network(),
            expected: expected.network,
        });
    }
    let amount = invoice
        .amount_milli_satoshis()
        .ok_or(InvoiceError::NoAmount)?;
    if amount != expected.amount.0 {
        return Err(InvoiceError::Amount {
            invoice: amount,
            expected: expected.amount.0,
        });
    }
    match invoice.description() {
        Bolt11InvoiceDescriptionRef::Hash(h)
            if h.0.to_byte_array() == expected.description_hash => {}
        _ => return Err(InvoiceError::NotBound),
    }
    if let Some(at) = invoice.expires_at()
        && at <= now
    {
        return Err(InvoiceError::Expired((now - at).as_secs()));
    }
    Ok(())
}

/// The invoice's payment hash.
pub fn payment_hash(invoice: &Bolt11Invoice) -> PaymentHash {
    PaymentHash(invoice.payment_hash().to_byte_array())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldk_node::bitcoin::secp256k1::{Secp256k1, SecretKey};
    use ldk_node::lightning_invoice::{Currency, InvoiceBuilder};
    use ldk_node::lightning_types::payment::PaymentSecret;

    const NOW: Duration = Duration::from_secs(1_800_000_000);

    fn make(currency: Currency, amount: Option<u64>, dh: Option<[u8; 32]>) -> String {
        let secp = Secp256k1::new();
        let key = SecretKey::from_slice(&[0x11; 32]).expect("key");
        let b = InvoiceBuilder::new(currency);
        let b = match dh {
            Some(h) => b.description_hash(sha256::Hash::from_byte_array(h)),
            None => b.description("a plain description".into()),
        };
        let b = b
            .payment_hash(sha256::Hash::from_byte_array([2; 32]))
            .payment_secret(PaymentSecret([3; 32]))
            .duration_since_epoch(NOW)
            .min_final_cltv_expiry_delta(144)
            .expiry_time(Duration::from_secs(600));
        let b = match amount {
            Some(a) => b
                .amount_milli_satoshis(a)
                .build_signed(|m| secp.sign_ecdsa_recoverable(m, &key)),
            None => b.build_signed(|m| secp.sign_ecdsa_recoverable(m, &key)),
        };
        b.expect("signed").to_string()
    }

    fn expected(amount: u64) -> Expected {
        Expected {
            network: Network::Regtest,
            amount: Msat(amount),
            description_hash: [9; 32],
        }
    }

    #[test]
    fn an_invoice_for_the_bill_passes() {
        let inv = parse(&make(Currency::Regtest, Some(1500), Some([9; 32]))).expect("parse");
        check(&inv, &expected(1500), NOW + Duration::from_secs(10)).expect("passes");
        assert_eq!(payment_hash(&inv), PaymentHash([2; 32]));
    }

    #[test]
    fn every_mismatch_is_refused_with_its_reason() {
        let at = NOW + Duration::from_secs(10);
        let inv = parse(&make(Currency::Regtest, Some(1501), Some([9; 32]))).expect("parse");
        assert_eq!(
            check(&inv, &expected(1500), at),
            Err(InvoiceError::Amount {
                invoice: 1501,
                expected: 1500
            })
        );
        let inv = parse(&make(Currency::Regtest, None, Some([9; 32]))).expect("parse");
        assert_eq!(
            check(&inv, &expected(1500), at),
            Err(InvoiceError::NoAmount)
        );
        let inv = parse(&make(Currency::Regtest, Some(1500), Some([8; 32]))).expect("parse");
        assert_eq!(
            check(&inv, &expected(1500), at),
            Err(InvoiceError::NotBound)
        );
        let inv = parse(&make(Currency::Regtest, Some(1500), None)).expect("parse");
        assert_eq!(
            check(&inv, &expected(1500), at),
            Err(InvoiceError::NotBound)
        );
        let inv = parse(&make(Currency::Bitcoin, Some(1500), Some([9; 32]))).expect("parse");
        assert!(matches!(
            check(&inv, &expected(1500), at),
            Err(InvoiceError::WrongNetwork { .. })
        ));
        let inv = parse(&make(Currency::Regtest, Some(1500), Some([9; 32]))).expect("parse");
        assert_eq!(
            check(&inv, &expected(1500), NOW + Duration::from_secs(700)),
            Err(InvoiceError::Expired(100))
        );
    }

    #[test]
    fn garbage_and_oversized_requests_are_errors() {
        assert!(matches!(
            parse("lnbcrt1garbage"),
            Err(InvoiceError::Parse(_))
        ));
        assert!(matches!(parse(""), Err(InvoiceError::Parse(_))));
        let long = "l".repeat(MAX_INVOICE_CHARS + 1);
        assert_eq!(
            parse(&long),
            Err(InvoiceError::TooLong(MAX_INVOICE_CHARS + 1))
        );
        // A valid invoice with one character changed fails its checksum or signature.
        let mut s = make(Currency::Regtest, Some(1500), Some([9; 32]));
        let i = s.len() - 10;
        let c = if &s[i..=i] == "q" { "p" } else { "q" };
        s.replace_range(i..=i, c);
        assert!(matches!(parse(&s), Err(InvoiceError::Parse(_))));
    }

    #[test]
    fn a_preimage_matches_only_its_hash() {
        let pre = Preimage([5; 32]);
        let hash = PaymentHash(sha256::Hash::hash(&[5; 32]).to_byte_array());
        assert!(pre.matches(&hash));
        assert!(!Preimage([6; 32]).matches(&hash));
    }
}
