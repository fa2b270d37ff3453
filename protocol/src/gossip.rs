//! What travels on the gossip topics: [`GossipMessage`], an enum of the signed envelopes of
//! [`crate::messages`] (and fraud evidence, [`crate::verify`]), decoded with its size limit
//! and verified (signature, structure, lifetime, evidence) into [`VerifiedGossip`].

use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::identity::PublicKey;
use crate::limits::MAX_GOSSIP_BYTES;
use crate::messages::{Ask, Bid, Cancel, CapacityAd};
use crate::signed::{Network, Signed, SignedError, SignedMessage};
use crate::time::Timestamp;
use crate::validate::{Expiring, ValidationError};

/// A message on one of the gossip topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GossipMessage {
    /// A provider's capacity ad.
    Capacity(Signed<CapacityAd>),
    /// A provider's ask.
    Ask(Signed<Ask>),
    /// A buyer's bid.
    Bid(Signed<Bid>),
    /// An order's cancellation.
    Cancel(Signed<Cancel>),
    /// A buyer's evidence that a provider's receipt contradicts other providers' (topic
    /// `orders`; it changes how nodes rank the accused, see [`crate::verify`]).
    Evidence(Signed<crate::verify::FraudEvidence>),
}

/// A gossip message whose signature, structure and lifetime have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifiedGossip {
    /// A capacity ad.
    Capacity(CapacityAd),
    /// An ask.
    Ask(Ask),
    /// A bid.
    Bid(Bid),
    /// A cancel.
    Cancel(Cancel),
    /// Fraud evidence that checked, with what it proves.
    Evidence(Box<(crate::verify::FraudEvidence, crate::verify::EvidenceFacts)>),
}

/// Why a gossip message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GossipError {
    /// Undecodable or oversized.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Bad signature, structure or signer.
    #[error(transparent)]
    Signed(#[from] SignedError),
    /// Fraud evidence whose receipts do not prove what it claims.
    #[error("evidence: {0}")]
    Evidence(#[from] crate::verify::EvidenceError),
    /// Expired, or a bad lifetime.
    #[error("{kind}: {source}")]
    Time {
        /// The message kind.
        kind: &'static str,
        /// What is wrong.
        source: ValidationError,
    },
}

impl GossipMessage {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decodes untrusted gossip bytes (at most [`MAX_GOSSIP_BYTES`]).
    pub fn decode(bytes: &[u8]) -> Result<GossipMessage, DecodeError> {
        codec::decode(bytes, MAX_GOSSIP_BYTES, "gossip message")
    }

    /// Verifies the signature for `network`, the structure, and the lifetime against `now`.
    pub fn verify(&self, network: &Network, now: Timestamp) -> Result<VerifiedGossip, GossipError> {
        fn timed<T: SignedMessage + Expiring>(
            s: &Signed<T>,
            network: &Network,
            now: Timestamp,
        ) -> Result<T, GossipError> {
            let body = s.verify(network)?;
            body.check_time(now).map_err(|source| GossipError::Time {
                kind: T::KIND,
                source,
            })?;
            Ok(body)
        }
        Ok(match self {
            GossipMessage::Capacity(s) => VerifiedGossip::Capacity(timed(s, network, now)?),
            GossipMessage::Ask(s) => VerifiedGossip::Ask(timed(s, network, now)?),
            GossipMessage::Bid(s) => VerifiedGossip::Bid(timed(s, network, now)?),
            GossipMessage::Cancel(s) => VerifiedGossip::Cancel(timed(s, network, now)?),
            GossipMessage::Evidence(s) => {
                let ev = timed(s, network, now)?;
                let facts = ev.check(network)?;
                VerifiedGossip::Evidence(Box::new((ev, facts)))
            }
        })
    }

    /// Who signed it (unverified until [`GossipMessage::verify`]).
    pub fn signer(&self) -> PublicKey {
        match self {
            GossipMessage::Capacity(s) => s.signer(),
            GossipMessage::Ask(s) => s.signer(),
            GossipMessage::Bid(s) => s.signer(),
            GossipMessage::Cancel(s) => s.signer(),
            GossipMessage::Evidence(s) => s.signer(),
        }
    }
}
