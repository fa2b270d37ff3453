//! Who may use the gateway and how much they may spend: optional API keys (`Authorization:
//! Bearer KEY`) and daily spending caps in msat, per key and in total.
//!
//! Caps are checked when a request starts and charged when its receipt arrives, so requests
//! running at the same time can together pass a cap by their own charges; the next request
//! is then refused. Spending is counted per UTC day in memory: a restarted gateway starts the
//! day at zero (the receipts themselves are kept by the node).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use hashgrid_protocol::ContentId;

/// Who a request is from: the key's fingerprint (blake3, never the key), or anonymous when
/// the gateway has no keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller(pub Option<ContentId>);

impl Caller {
    /// A short name for logs.
    pub fn label(&self) -> String {
        match &self.0 {
            Some(id) => format!("key {}", id.short()),
            None => "anonymous".into(),
        }
    }
}

/// Why a request may not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// Keys are configured and the request has none, or a wrong one.
    Unauthorized(&'static str),
    /// This key, or the gateway, has spent its cap for today.
    OverCap(String),
}

#[derive(Default)]
struct Spent {
    day: u64,
    total: u64,
    per_key: HashMap<Option<ContentId>, u64>,
}

/// Keys and caps.
pub struct Access {
    keys: Vec<ContentId>,
    key_cap_msat: Option<u64>,
    total_cap_msat: Option<u64>,
    spent: Mutex<Spent>,
}

fn today() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

impl Access {
    /// `keys` empty: no authentication. Caps in msat per UTC day.
    pub fn new(keys: &[String], key_cap_msat: Option<u64>, total_cap_msat: Option<u64>) -> Access {
        Access {
            keys: keys.iter().map(|k| ContentId::of(k.as_bytes())).collect(),
            key_cap_msat,
            total_cap_msat,
            spent: Mutex::new(Spent::default()),
        }
    }

    /// Whether requests need a key.
    pub fn keys_required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks the `Authorization` header's value.
    pub fn authorize(&self, header: Option<&str>) -> Result<Caller, Denied> {
        if self.keys.is_empty() {
            return Ok(Caller(None));
        }
        let Some(h) = header else {
            return Err(Denied::Unauthorized(
                "this gateway needs an API key: send Authorization: Bearer KEY",
            ));
        };
        let key = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .unwrap_or("")
            .trim();
        // Compared as blake3 fingerprints: equal-length values, no early exit on the key's bytes.
        let fp = ContentId::of(key.as_bytes());
        if !key.is_empty() && self.keys.contains(&fp) {
            Ok(Caller(Some(fp)))
        } else {
            Err(Denied::Unauthorized(
                "the API key is not one of this gateway's keys",
            ))
        }
    }

    fn with_spent<T>(&self, f: impl FnOnce(&mut Spent) -> T) -> T {
        let mut s = match self.spent.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let d = today();
        if s.day != d {
            *s = Spent {
                day: d,
                ..Spent::default()
            };
        }
        f(&mut s)
    }

    /// Refuses a request whose caller, or the gateway, has reached its cap today.
    pub fn check_cap(&self, caller: &Caller) -> Result<(), Denied> {
        self.with_spent(|s| {
            if let Some(cap) = self.total_cap_msat
                && s.total >= cap
            {
                return Err(Denied::OverCap(format!(
                    "the gateway has spent its {cap} msat for today ({} msat)",
                    s.total
                )));
            }
            if let (Some(cap), Some(_)) = (self.key_cap_msat, &caller.0) {
                let mine = s.per_key.get(&caller.0).copied().unwrap_or(0);
                if mine >= cap {
                    return Err(Denied::OverCap(format!(
                        "this API key has spent its {cap} msat for today ({mine} msat)"
                    )));
                }
            }
            Ok(())
        })
    }

    /// Adds a receipt's charge to the caller's and the gateway's spending today.
    pub fn charge(&self, caller: &Caller, msat: u64) {
        self.with_spent(|s| {
            s.total = s.total.saturating_add(msat);
            let e = s.per_key.entry(caller.0).or_default();
            *e = e.saturating_add(msat);
        });
    }

    /// msat spent today, by everyone.
    pub fn spent_today(&self) -> u64 {
        self.with_spent(|s| s.total)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_checked_and_caps_hold() {
        let a = Access::new(&["k1".into(), "k2".into()], Some(100), Some(150));
        assert!(matches!(a.authorize(None), Err(Denied::Unauthorized(_))));
        assert!(matches!(
            a.authorize(Some("Bearer nope")),
            Err(Denied::Unauthorized(_))
        ));
        assert!(matches!(
            a.authorize(Some("Bearer ")),
            Err(Denied::Unauthorized(_))
        ));
        let k1 = a.authorize(Some("Bearer k1")).unwrap();
        let k2 = a.authorize(Some("Bearer k2")).unwrap();
        assert_ne!(k1, k2);
        a.check_cap(&k1).unwrap();
        a.charge(&k1, 100);
        assert!(matches!(a.check_cap(&k1), Err(Denied::OverCap(_))));
        a.check_cap(&k2).unwrap();
        a.charge(&k2, 60);
        // The gateway's total (160) is over its cap of 150: everyone waits for tomorrow.
        assert!(matches!(a.check_cap(&k2), Err(Denied::OverCap(_))));
        assert_eq!(a.spent_today(), 160);
    }

    #[test]
    fn without_keys_everyone_is_anonymous() {
        let a = Access::new(&[], Some(1), None);
        let c = a.authorize(None).unwrap();
        assert_eq!(c, Caller(None));
        a.charge(&c, 10);
        // The per-key cap applies to keys only; no total cap is set.
        a.check_cap(&c).unwrap();
    }
}
