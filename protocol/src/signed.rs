//! `Signed<T>`: exact body bytes, the signer, and a signature over a domain tag and the body.
//!
//! The domain tag is `hashgrid/1/<network>/<kind>`; a signature made for one message kind or
//! one network never verifies as another. Verification checks the signature over the bytes
//! as received *before* decoding them, and never re-encodes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::marker::PhantomData;

use crate::codec::{self, DecodeError};
use crate::id::ContentId;
use crate::identity::{Keypair, PublicKey, Signature};
use crate::limits::MAX_NETWORK_LEN;
use crate::validate::ValidationError;

/// The protocol version in every domain tag.
pub const PROTOCOL_VERSION: u32 = 1;

/// A network name: `main`, `test`, or a private testnet's name (1–32 of `a-z`, `0-9`, `-`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Network(String);

/// A network name with characters outside `a-z0-9-` or of the wrong length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid network name {0:?}: use 1-{MAX_NETWORK_LEN} characters from a-z, 0-9 and '-', e.g. `main`, `test` or `lab-1`"
)]
pub struct BadNetwork(pub String);

impl Network {
    /// The public network.
    pub fn main() -> Network {
        Network("main".into())
    }

    /// The public test network.
    pub fn test() -> Network {
        Network("test".into())
    }

    /// A validated network name.
    pub fn new(name: &str) -> Result<Network, BadNetwork> {
        let ok = !name.is_empty()
            && name.len() <= MAX_NETWORK_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Network(name.to_owned()))
        } else {
            Err(BadNetwork(name.chars().take(64).collect()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The domain tag that prefixes the signed bytes of a message of `kind`.
    pub fn domain_tag(&self, kind: &str) -> String {
        format!("hashgrid/{PROTOCOL_VERSION}/{}/{kind}", self.0)
    }

    /// A gossipsub topic name on this network, e.g. `hashgrid/1/main/orders`.
    pub fn topic(&self, name: &str) -> String {
        self.domain_tag(name)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Network::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Network {
    type Err = BadNetwork;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Network::new(s)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message type that travels signed.
pub trait SignedMessage: Serialize + DeserializeOwned {
    /// The message kind in the domain tag, e.g. `receipt`.
    const KIND: &'static str;
    /// The largest encoded body accepted for this kind.
    const MAX_BYTES: usize;
    /// The key that must have signed this message (the provider of an ask, the buyer of a bid).
    fn author(&self) -> PublicKey;
    /// Structural checks that need no clock: string lengths, counts, ranges.
    fn validate(&self) -> Result<(), ValidationError>;
}

/// A message that a second party countersigns (an agreement by the buyer, a receipt by the
/// buyer once it has checked the outputs).
pub trait Countersignable: SignedMessage {
    /// The key that must countersign.
    fn counterparty(&self) -> PublicKey;
}

/// Why a signed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignedError {
    /// The body is over the size limit for its kind; the signature was not even checked.
    #[error("{kind}: body of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The message kind.
        kind: &'static str,
        /// Body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The signature does not verify for this signer, network and message kind.
    #[error(
        "{kind}: bad signature (forged, corrupted, or signed for another network or message type)"
    )]
    BadSignature {
        /// The message kind.
        kind: &'static str,
    },
    /// The signature is good but the body does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The body decodes but breaks a structural rule.
    #[error("{kind}: {source}")]
    Invalid {
        /// The message kind.
        kind: &'static str,
        /// What is wrong.
        source: ValidationError,
    },
    /// The message was signed by someone other than its author.
    #[error("{kind}: signed by {signer} but its author is {author}")]
    WrongSigner {
        /// The message kind.
        kind: &'static str,
        /// Who signed.
        signer: PublicKey,
        /// Who should have.
        author: PublicKey,
    },
    /// The countersignature is missing, forged, or from the wrong party.
    #[error("{kind}: bad countersignature: {reason}")]
    BadCountersignature {
        /// The message kind.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// A signed message: the exact body bytes, the signer, and the signature over
/// `domain_tag || 0x00 || body`.
#[derive(Serialize, Deserialize)]
#[serde(bound = "", deny_unknown_fields)]
pub struct Signed<T> {
    body: Bytes,
    signer: PublicKey,
    signature: Signature,
    #[serde(skip)]
    _kind: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Signed {
            body: self.body.clone(),
            signer: self.signer,
            signature: self.signature,
            _kind: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body && self.signer == other.signer && self.signature == other.signature
    }
}
impl<T> Eq for Signed<T> {}

impl<T: SignedMessage> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Signed<{}>({} bytes by {})",
            T::KIND,
            self.body.0.len(),
            self.signer.short()
        )
    }
}

fn signing_input(network: &Network, kind: &str, body: &[u8]) -> Vec<u8> {
    let tag = network.domain_tag(kind);
    let mut msg = Vec::with_capacity(tag.len() + 1 + body.len());
    msg.extend_from_slice(tag.as_bytes());
    msg.push(0);
    msg.extend_from_slice(body);
    msg
}

impl<T: SignedMessage> Signed<T> {
    /// Encodes `body` canonically and signs it for `network`.
    pub fn sign(key: &Keypair, network: &Network, body: &T) -> Signed<T> {
        let bytes = codec::encode(body);
        let signature = key.sign_raw(&signing_input(network, T::KIND, &bytes));
        Signed {
            body: Bytes(bytes),
            signer: key.public(),
            signature,
            _kind: PhantomData,
        }
    }

    /// Checks size, then the signature over the bytes as received, then decodes, validates
    /// the structure and checks that the signer is the message's author.
    pub fn verify(&self, network: &Network) -> Result<T, SignedError> {
        let len = self.body.0.len();
        if len > T::MAX_BYTES {
            return Err(SignedError::TooLarge {
                kind: T::KIND,
                len,
                max: T::MAX_BYTES,
            });
        }
        if !self.signer.verify_raw(
            &signing_input(network, T::KIND, &self.body.0),
            &self.signature,
        ) {
            return Err(SignedError::BadSignature { kind: T::KIND });
        }
        let body: T = codec::decode(&self.body.0, T::MAX_BYTES, T::KIND)?;
        body.validate().map_err(|source| SignedError::Invalid {
            kind: T::KIND,
            source,
        })?;
        let author = body.author();
        if author != self.signer {
            return Err(SignedError::WrongSigner {
                kind: T::KIND,
                signer: self.signer,
                author,
            });
        }
        Ok(body)
    }

    /// Decodes the body *without* checking the signature. Only for data this node signed
    /// or already verified (e.g. read back from its own store).
    pub fn decode_unverified(&self) -> Result<T, DecodeError> {
        codec::decode(&self.body.0, T::MAX_BYTES, T::KIND)
    }

    /// The exact signed body bytes.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body.0
    }

    /// Who signed.
    pub fn signer(&self) -> PublicKey {
        self.signer
    }

    /// The signature.
    pub fn signature(&self) -> Signature {
        self.signature
    }

    /// The content id of the whole signed envelope (body, signer and signature): the id by
    /// which agreements and receipts are referred to, and what receipt chains link.
    pub fn id(&self) -> ContentId {
        ContentId::of(&codec::encode(self))
    }

    /// Builds an envelope from parts received from outside (nothing is checked until
    /// [`Signed::verify`]).
    pub fn from_parts(body: Vec<u8>, signer: PublicKey, signature: Signature) -> Signed<T> {
        Signed {
            body: Bytes(body),
            signer,
            signature,
            _kind: PhantomData,
        }
    }
}

impl<T: Countersignable> Signed<T> {
    /// The counterparty's countersignature over this envelope's id, for `network`.
    pub fn countersign(&self, key: &Keypair, network: &Network) -> Countersigned<T> {
        let id = self.id();
        let kind = countersign_kind::<T>();
        let signature = key.sign_raw(&signing_input(network, &kind, id.as_bytes()));
        Countersigned {
            signed: self.clone(),
            countersigner: key.public(),
            countersignature: signature,
        }
    }
}

fn countersign_kind<T: SignedMessage>() -> String {
    format!("{}/countersign", T::KIND)
}

/// A signed message plus the counterparty's signature over its id.
#[derive(Serialize, Deserialize)]
#[serde(bound = "", deny_unknown_fields)]
pub struct Countersigned<T> {
    /// The original signed message.
    pub signed: Signed<T>,
    /// Who countersigned.
    pub countersigner: PublicKey,
    /// The countersignature over `hashgrid/1/<network>/<kind>/countersign || 0x00 || id`.
    pub countersignature: Signature,
}

impl<T> Clone for Countersigned<T> {
    fn clone(&self) -> Self {
        Countersigned {
            signed: self.signed.clone(),
            countersigner: self.countersigner,
            countersignature: self.countersignature,
        }
    }
}

impl<T> PartialEq for Countersigned<T> {
    fn eq(&self, other: &Self) -> bool {
        self.signed == other.signed
            && self.countersigner == other.countersigner
            && self.countersignature == other.countersignature
    }
}
impl<T> Eq for Countersigned<T> {}

impl<T: SignedMessage> fmt::Debug for Countersigned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Countersigned({:?} by {})",
            self.signed,
            self.countersigner.short()
        )
    }
}

impl<T: Countersignable> Countersigned<T> {
    /// Verifies the inner message (as [`Signed::verify`]), then that the countersigner is
    /// the message's counterparty and that the countersignature is valid.
    pub fn verify(&self, network: &Network) -> Result<T, SignedError> {
        let body = self.signed.verify(network)?;
        let expected = body.counterparty();
        if self.countersigner != expected {
            return Err(SignedError::BadCountersignature {
                kind: T::KIND,
                reason: format!(
                    "countersigned by {} but the counterparty is {}",
                    self.countersigner, expected
                ),
            });
        }
        let id = self.signed.id();
        let msg = signing_input(network, &countersign_kind::<T>(), id.as_bytes());
        if !self.countersigner.verify_raw(&msg, &self.countersignature) {
            return Err(SignedError::BadCountersignature {
                kind: T::KIND,
                reason: "signature does not verify".into(),
            });
        }
        Ok(body)
    }

    /// The id of the inner signed message.
    pub fn id(&self) -> ContentId {
        self.signed.id()
    }
}

/// Raw bytes: a length-prefixed byte string in postcard, a hex string in JSON.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            hex::decode(s).map(Bytes).map_err(serde::de::Error::custom)
        } else {
            let b: &[u8] = Deserialize::deserialize(d)?;
            Ok(Bytes(b.to_vec()))
        }
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}
