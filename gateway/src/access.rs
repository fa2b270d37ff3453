//! Who may use the gateway and how much they may spend: optional API keys (`Authorization:
//! Bearer KEY`) and daily spending caps in msat, per key and in total.
//!
//! Caps are checked when a request starts and charged when its receipt arrives, so requests
//! running at the same time can together pass a cap by their own charges; the next request
//! is then refused. Spending is counted per UTC day; with a spend file ([`Access::open`],
//! `hashgrid serve` keeps one in its data dir) every charge is written through, so a
//! restarted gateway goes on from what it had spent today instead of from zero. A spend file
//! that cannot be read is an error at start-up, never a reset.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use hashgrid_protocol::ContentId;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Largest spend file read (a day's spending of a few thousand keys is far below it).
const MAX_SPEND_FILE_BYTES: u64 = 1 << 20;

/// A spend file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("spend file {path}: {reason} (move it away to start today's spending at zero)")]
pub struct SpendFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// The spend file's contents: one UTC day's spending, in total and per key fingerprint
/// (`anonymous` without keys).
#[derive(Debug, Default, Serialize, Deserialize)]
struct SpendFile {
    day: u64,
    total_msat: u64,
    per_key_msat: BTreeMap<String, u64>,
}

const ANONYMOUS: &str = "anonymous";

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
    /// Where today's spending is written through, if anywhere.
    file: Option<PathBuf>,
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
            file: None,
        }
    }

    /// [`Access::new`] whose spending is kept in `path`: today's spending is read back from
    /// it (a file from an earlier day counts as zero) and every charge is written through.
    pub fn open(
        keys: &[String],
        key_cap_msat: Option<u64>,
        total_cap_msat: Option<u64>,
        path: &Path,
    ) -> Result<Access, SpendFileError> {
        let err = |reason: String| SpendFileError {
            path: path.to_path_buf(),
            reason,
        };
        let mut a = Access::new(keys, key_cap_msat, total_cap_msat);
        a.file = Some(path.to_path_buf());
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(a),
            Err(e) => return Err(err(e.to_string())),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(f, MAX_SPEND_FILE_BYTES + 1),
            &mut text,
        )
        .map_err(|e| err(e.to_string()))?;
        if text.len() as u64 > MAX_SPEND_FILE_BYTES {
            return Err(err(format!("over {MAX_SPEND_FILE_BYTES} bytes")));
        }
        let saved: SpendFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if saved.day == today() {
            let mut per_key = HashMap::new();
            for (k, v) in saved.per_key_msat {
                let who = if k == ANONYMOUS {
                    None
                } else {
                    Some(
                        k.parse::<ContentId>()
                            .map_err(|e| err(format!("key {k:?}: {e}")))?,
                    )
                };
                per_key.insert(who, v);
            }
            a.spent = Mutex::new(Spent {
                day: saved.day,
                total: saved.total_msat,
                per_key,
            });
        }
        Ok(a)
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
            if let Some(path) = &self.file
                && let Err(e) = write_spend(path, s)
            {
                warn!(path = %path.display(), error = %e, "cannot write the spend file; today's spending is only in memory");
            }
        });
    }

    /// msat spent today, by everyone.
    pub fn spent_today(&self) -> u64 {
        self.with_spent(|s| s.total)
    }
}

/// Writes `s` to `path` whole: a temporary file beside it, synced, then renamed over it, so
/// a crash leaves the old or the new day's spending, never a torn file.
fn write_spend(path: &Path, s: &Spent) -> std::io::Result<()> {
    let file = SpendFile {
        day: s.day,
        total_msat: s.total,
        per_key_msat: s
            .per_key
            .iter()
            .map(|(k, v)| {
                (
                    k.map_or_else(|| ANONYMOUS.to_string(), |id| id.to_string()),
                    *v,
                )
            })
            .collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
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
    fn a_spend_file_carries_todays_spending_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("hashgrid-spend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spend.json");
        let _ = std::fs::remove_file(&path);
        let keys: Vec<String> = vec!["k1".into(), "k2".into()];
        {
            let a = Access::open(&keys, Some(100), Some(1_000), &path).unwrap();
            let k1 = a.authorize(Some("Bearer k1")).unwrap();
            a.charge(&k1, 100);
            assert!(matches!(a.check_cap(&k1), Err(Denied::OverCap(_))));
        }
        // A restarted gateway: k1 is still over its cap today, k2 is not.
        let a = Access::open(&keys, Some(100), Some(1_000), &path).unwrap();
        let k1 = a.authorize(Some("Bearer k1")).unwrap();
        let k2 = a.authorize(Some("Bearer k2")).unwrap();
        assert!(matches!(a.check_cap(&k1), Err(Denied::OverCap(_))));
        a.check_cap(&k2).unwrap();
        assert_eq!(a.spent_today(), 100);
        // Yesterday's file counts as zero today.
        let old = SpendFile {
            day: today() - 1,
            total_msat: 5_000,
            per_key_msat: BTreeMap::new(),
        };
        std::fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();
        let a = Access::open(&keys, Some(100), Some(1_000), &path).unwrap();
        assert_eq!(a.spent_today(), 0);
        // A damaged file is an error that names it, not a reset to zero.
        std::fs::write(&path, b"{ not json").unwrap();
        let e = Access::open(&keys, Some(100), Some(1_000), &path)
            .err()
            .unwrap();
        assert!(e.to_string().contains("spend.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
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
