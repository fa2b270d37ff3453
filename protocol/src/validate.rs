//! Validation rules that go beyond the signature: structure, expiry and replay.

use std::collections::HashMap;
use std::hash::Hash;

use crate::limits::{MAX_CLOCK_SKEW_MS, MAX_TTL_MS};
use crate::time::Timestamp;

/// A decoded message breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A string field is too long or empty.
    #[error("field `{field}` must be 1-{max} characters, got {len}")]
    BadString {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A list has too many entries.
    #[error("field `{field}` has {len} entries; at most {max} are allowed")]
    TooMany {
        /// The field.
        field: &'static str,
        /// Entries.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A numeric field is out of range.
    #[error("field `{field}` is out of range: {reason}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The message has expired.
    #[error("expired at {expires_at}, now is {now}")]
    Expired {
        /// When it expired.
        expires_at: Timestamp,
        /// The clock it was checked against.
        now: Timestamp,
    },
    /// The message claims a lifetime longer than [`MAX_TTL_MS`] or was created in the future.
    #[error("bad lifetime: {reason}")]
    BadLifetime {
        /// Why.
        reason: String,
    },
    /// A sequence number that is not newer than one already seen (a replay or a stale copy).
    #[error("stale sequence number {seq}: {latest} already seen from this sender")]
    Replayed {
        /// The sequence number received.
        seq: u64,
        /// The highest seen.
        latest: u64,
    },
}

/// Checks a string field's length (1..=max bytes).
pub fn check_str(field: &'static str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > max {
        return Err(ValidationError::BadString {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// Whether `name` is a plain name: 1 to [`crate::limits::MAX_STRING_LEN`] bytes of ASCII
/// letters, digits, `_`, `-` and `.`, not starting with `.`. Buffer (and so output) names are
/// plain: tools write outputs to `DIR/NAME.bin`, so a name can never be a path (`../escape`,
/// `a/b`, `C:x`, `.hidden`).
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::limits::MAX_STRING_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

/// Checks that a name field is a plain name ([`is_plain_name`]).
pub fn check_name(field: &'static str, name: &str) -> Result<(), ValidationError> {
    if !is_plain_name(name) {
        return Err(ValidationError::OutOfRange {
            field,
            reason: format!(
                "{name:?} is not a plain name (1-{} characters of letters, digits, `_`, `-` and `.`, not starting with `.`)",
                crate::limits::MAX_STRING_LEN
            ),
        });
    }
    Ok(())
}

/// Checks a list's length (0..=max entries).
pub fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), ValidationError> {
    if len > max {
        return Err(ValidationError::TooMany { field, len, max });
    }
    Ok(())
}

/// A message with a creation time and an expiry.
pub trait Expiring {
    /// When it was created, by the author's clock.
    fn created_at(&self) -> Timestamp;
    /// When it stops being valid.
    fn expires_at(&self) -> Timestamp;

    /// Checks the message against `now`: not expired, not created more than
    /// [`MAX_CLOCK_SKEW_MS`] in the future, and no lifetime over [`MAX_TTL_MS`].
    fn check_time(&self, now: Timestamp) -> Result<(), ValidationError> {
        let (created, expires) = (self.created_at(), self.expires_at());
        if expires <= now {
            return Err(ValidationError::Expired {
                expires_at: expires,
                now,
            });
        }
        if created > now.plus_ms(MAX_CLOCK_SKEW_MS) {
            return Err(ValidationError::BadLifetime {
                reason: format!(
                    "created {} ms in the future (clock skew limit {MAX_CLOCK_SKEW_MS} ms)",
                    created.since(now)
                ),
            });
        }
        if expires < created {
            return Err(ValidationError::BadLifetime {
                reason: "expires before it was created".into(),
            });
        }
        if expires.since(created) > MAX_TTL_MS {
            return Err(ValidationError::BadLifetime {
                reason: format!(
                    "lifetime of {} ms is over the limit of {MAX_TTL_MS} ms",
                    expires.since(created)
                ),
            });
        }
        Ok(())
    }
}

/// Remembers the highest sequence number per key and accepts only strictly newer ones.
///
/// Keys are typically `(author, order id)` for orders or `author` for capacity ads. The guard
/// is bounded: once it holds `capacity` keys, the oldest-inserted half is forgotten, so a flood
/// of fresh keys cannot grow it without limit (a forgotten key's next message is accepted as
/// new, and the book's own replace-by-sequence still refuses stale copies of live orders).
#[derive(Debug, Clone)]
pub struct ReplayGuard<K> {
    latest: HashMap<K, (u64, u64)>,
    capacity: usize,
    counter: u64,
}

impl<K: Eq + Hash + Clone> ReplayGuard<K> {
    /// A guard that remembers at most `capacity` keys.
    pub fn new(capacity: usize) -> ReplayGuard<K> {
        ReplayGuard {
            latest: HashMap::new(),
            capacity: capacity.max(2),
            counter: 0,
        }
    }

    /// Accepts `seq` for `key` if it is higher than any seen before, and records it.
    pub fn check_and_record(&mut self, key: K, seq: u64) -> Result<(), ValidationError> {
        if let Some(&(latest, _)) = self.latest.get(&key) {
            if seq <= latest {
                return Err(ValidationError::Replayed { seq, latest });
            }
        } else if self.latest.len() >= self.capacity {
            self.evict_oldest_half();
        }
        self.counter += 1;
        self.latest.insert(key, (seq, self.counter));
        Ok(())
    }

    /// The highest sequence number recorded for `key`.
    pub fn latest(&self, key: &K) -> Option<u64> {
        self.latest.get(key).map(|&(seq, _)| seq)
    }

    /// Number of keys remembered.
    pub fn len(&self) -> usize {
        self.latest.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }

    fn evict_oldest_half(&mut self) {
        let mut ages: Vec<u64> = self.latest.values().map(|&(_, at)| at).collect();
        let mid = ages.len() / 2;
        let (_, cutoff, _) = ages.select_nth_unstable(mid);
        let cutoff = *cutoff;
        self.latest.retain(|_, &mut (_, at)| at > cutoff);
    }
}
