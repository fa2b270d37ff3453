//! Money: integer millisatoshis, never floats.

use serde::{Deserialize, Serialize};

/// An amount in millisatoshis (1 sat = 1000 msat; 1 BTC = 10^11 msat).
///
/// All arithmetic is checked: an operation that would overflow returns `None` instead of
/// wrapping, so a malicious price can never turn into a small charge.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Msat(pub u64);

impl Msat {
    /// Zero msat.
    pub const ZERO: Msat = Msat(0);

    /// `self + other`, or `None` on overflow.
    pub fn checked_add(self, other: Msat) -> Option<Msat> {
        self.0.checked_add(other.0).map(Msat)
    }

    /// `self - other`, or `None` if `other` is larger.
    pub fn checked_sub(self, other: Msat) -> Option<Msat> {
        self.0.checked_sub(other.0).map(Msat)
    }

    /// Whole satoshis, rounded down (the sub-satoshi remainder stays owed; see settlement).
    pub fn to_sat_floor(self) -> u64 {
        self.0 / 1000
    }

    /// Whole satoshis, rounded up (what a payer sends to cover this amount on chain).
    pub fn to_sat_ceil(self) -> u64 {
        self.0 / 1000 + u64::from(!self.0.is_multiple_of(1000))
    }

    /// An amount of whole satoshis, or `None` on overflow.
    pub fn from_sat(sat: u64) -> Option<Msat> {
        sat.checked_mul(1000).map(Msat)
    }
}

impl std::fmt::Display for Msat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} msat", self.0)
    }
}
