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

/// Decodes `bytes` as a `T`, refusing inputs over `max` bytes before looking at them and
/// refusing trailing garbage.
pub fn decode<T: DeserializeOwned>(
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
    Ok(value)
}
