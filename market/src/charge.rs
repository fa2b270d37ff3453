//! Charges: integer msat, never floats.
//!
//! Rounding rule: `charge = ceil(price × units × gpu_time_us / 1_000_000)`, then capped by the
//! agreement's maximum. Rounding up means a provider is never paid less than the price it
//! asked for the time it measured (at most 1 msat more per job); the cap means a buyer never
//! pays more than it agreed to. All intermediate arithmetic is checked u128, so no price, unit count
//! or duration can overflow; a result beyond u64 (or u128) saturates to the cap.

use hashgrid_protocol::Msat;

/// Microseconds in a second.
const US_PER_S: u128 = 1_000_000;

/// The charge for `units` GPUs at `price` msat per GPU-second for `gpu_time_us` microseconds,
/// rounded up to the next msat and capped at `cap`.
pub fn charge_us(price: Msat, units: u32, gpu_time_us: u64, cap: Msat) -> Msat {
    // price × units fits in u128 (2^96); × time can exceed it, which only happens far above
    // any cap, so overflow means "the cap".
    let Some(exact) =
        (u128::from(price.0) * u128::from(units)).checked_mul(u128::from(gpu_time_us))
    else {
        return cap;
    };
    match u64::try_from(exact.div_ceil(US_PER_S)) {
        Ok(v) => Msat(v.min(cap.0)),
        Err(_) => cap,
    }
}

/// [`charge_us`] for a duration in milliseconds, one unit.
pub fn charge(price: Msat, gpu_ms: u64, cap: Msat) -> Msat {
    charge_us(price, 1, gpu_ms.saturating_mul(1000), cap)
}

/// The most a job of `units` GPUs for `max_seconds` at `price` can cost: the cap to put in an
/// agreement. `None` if it does not fit in u64 msat.
pub fn max_charge(price: Msat, units: u32, max_seconds: u32) -> Option<Msat> {
    let v = u128::from(price.0) * u128::from(units) * u128::from(max_seconds);
    u64::try_from(v).ok().map(Msat)
}
