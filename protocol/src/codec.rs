//! Canonical binary encoding (postcard) with size limits checked before decoding.
//!
//! Signed bytes are always postcard: deterministic, compact, and with no self-describing
//! overhead. JSON (serde_json) is for people: the CLI, the local API, receipt files.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decoding untrusted bytes failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is larger than the limit for this kind of message; nothing was parsed.
    #[error("{what}: {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// What was being decoded.
        what: &'static str,
        /// The input's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a valid encoding of the expected type.
    #[error("{what}: malformed encoding: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's reason.
        reason: String,
    },
    /// The bytes decode, but are not the canonical encoding of what they decode to (a
    /// non-minimal varint, unsorted or repeated map keys): every value has exactly one
    /// encoding, so one signed content has exactly one id.
    #[error("{what}: not the canonical encoding of its value")]
    NonCanonical {
        /// What was being decoded.
        what: &'static str,
    },
    /// A valid value was followed by extra bytes.
    #[error("{what}: {extra} unexpected trailing bytes")]
    TrailingBytes {
        /// What was being decoded.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
}

/// The canonical encoding of `value`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // postcard fails only for sequences of unknown length and for `Serialize` impls that
    // return errors themselves; no protocol type does either.
    postcard::to_stdvec(value).expect("protocol types always have a canonical encoding")
}

/// Decodes `bytes` as a `T`, refusing inputs over `max` bytes before looking at them,
/// trailing garbage, and any encoding but the canonical one (the value is encoded again and
/// compared).
pub fn decode<T: DeserializeOwned + Serialize>(
    bytes: &[u8],
    max: usize,
    what: &'static str,
) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| DecodeError::Malformed {
            what,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    if postcard::to_stdvec(&value).ok().as_deref() != Some(bytes) {
        return Err(DecodeError::NonCanonical { what });
    }
    Ok(value)
}
