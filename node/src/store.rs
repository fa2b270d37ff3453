//! The node's sled store in its data dir: its own live orders (so a restarted node
//! re-announces what it still offers), the ceiling of the sequence numbers it may sign (a
//! lease, [`Store::next_seq`]), and the addresses of peers it has met (so it can rejoin
//! without bootstrap peers).
//!
//! The job lifecycle keeps its state machines here too ([`JobTree`]): submitted jobs, accepted
//! jobs, the provider's receipt chain, countersigned receipts and output blobs.
//!
//! The identity itself is the key file next to the store ([`crate::DataDir::identity_path`]).
//! Writes that matter (an order posted or cancelled, a sequence number leased) are flushed
//! before the operation is acknowledged to the caller or announced.
//!
//! **Schema versions.** Records are postcard encodings of Rust types, which have no field tags:
//! a field added to a stored type makes every existing record unreadable. So the store records
//! its schema version ([`SCHEMA_VERSION`], in the `meta` tree) and [`Store::open`] brings an
//! older store up to date through [`MIGRATIONS`], one version at a time, before anything reads
//! it; a store written by a newer release is refused, untouched. Changing a stored type means:
//! keep the old definition in a `v<N>` module, bump [`SCHEMA_VERSION`], add a migration that
//! decodes each record with the old type and writes it with the new one, and add a fixture of
//! the previous release's data dirs (`tests/fixtures/`, opened by `tests/tests/store_upgrade.rs`).

use std::path::Path;

use hashgrid_protocol::{Ask, Bid, ContentId};
use libp2p::{Multiaddr, PeerId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Most addresses remembered per peer.
pub const MAX_ADDRS_PER_PEER: usize = 8;

/// Most peers whose addresses are remembered (older entries beyond this are not added).
pub const MAX_KNOWN_PEERS: usize = 1024;

/// A stored order of this node's own (the unsigned body; it is re-signed with a fresh
/// sequence number and expiry at every re-announcement).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OwnOrder {
    /// An ask.
    Ask(Ask),
    /// A bid.
    Bid(Bid),
}

impl OwnOrder {
    /// The owner's order id.
    pub fn order_id(&self) -> u64 {
        match self {
            OwnOrder::Ask(a) => a.order_id,
            OwnOrder::Bid(b) => b.order_id,
        }
    }
}

/// Opening or using the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The node stopped; its store is closed.
    #[error("the node has stopped; its store is closed")]
    Closed,
    /// sled failed (disk full, permissions, or another process holds the store).
    #[error(
        "store {path}: {source} (is another hashgrid-node running with this data dir? pass --data-dir with another directory)"
    )]
    Open {
        /// The store directory.
        path: String,
        /// The underlying error.
        source: sled::Error,
    },
    /// A read or write failed.
    #[error("store: {0}")]
    Io(#[from] sled::Error),
    /// A stored record does not decode (corrupted or written by an incompatible version).
    #[error("store: corrupted record in tree {tree}: {reason}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// What failed.
        reason: String,
    },
    /// The store was written by a newer release, whose records this one cannot read.
    #[error(
        "store {path}: schema version {found} was written by a newer hashgrid; this build reads versions up to {supported} (upgrade hashgrid, or use another --data-dir)"
    )]
    NewerSchema {
        /// The store directory.
        path: String,
        /// The store's schema version.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// Bringing an older store up to date failed; the store is left at version `from`.
    #[error("store: migrating schema version {from} to {}: {reason}", from + 1)]
    Migration {
        /// The version being migrated from.
        from: u32,
        /// What failed.
        reason: String,
    },
}

/// The schema version this build writes: what the records of every tree are.
///
/// - 0: the release before versions (records as in version 1, no version recorded).
/// - 1: the same records, with the version recorded in `meta`.
/// - 2: buyer job records ([`crate::jobs::record::JobRecord`]) end with the countersigned agreement.
/// - 3: buyer job records end with the verification report; reputation records
///   ([`crate::jobs::record::Experience`]) end with spot checks passed, reports and the
///   credit forfeited by lies.
pub const SCHEMA_VERSION: u32 = 3;

/// One step of the migration path: rewrites a store of schema `from` as `from + 1`. A step
/// must be safe to run again (the new version is recorded only after it completes, so a crash
/// during a step repeats it at the next open).
pub struct Migration {
    /// The version it migrates from.
    pub from: u32,
    /// What it changes, for the log.
    pub what: &'static str,
    run: fn(&Store) -> Result<(), StoreError>,
}

/// Every migration, in order: `MIGRATIONS[i].from == i`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        from: 0,
        what: "record the schema version (records unchanged)",
        run: |_| Ok(()),
    },
    Migration {
        from: 1,
        what: "buyer job records gain the countersigned agreement (none for stored jobs)",
        run: migrate_1_to_2,
    },
    Migration {
        from: 2,
        what: "buyer job records gain the verification report, reputations gain spot checks passed and reports (none for stored ones)",
        run: migrate_2_to_3,
    },
];

/// Stored types as schema 2 wrote them.
mod v2 {
    use hashgrid_protocol::{Agreement, ContentId, Countersigned, PublicKey, Receipt, Timestamp};
    use serde::{Deserialize, Serialize};

    use crate::jobs::record::{Attempt, JobState};

    /// [`crate::jobs::record::JobRecord`] of schema 2.
    #[derive(Serialize, Deserialize)]
    pub(super) struct JobRecord {
        pub(super) id: ContentId,
        pub(super) name: String,
        pub(super) spec_id: ContentId,
        pub(super) submitted_at: Timestamp,
        pub(super) state: JobState,
        pub(super) provider: Option<PublicKey>,
        pub(super) attempts: Vec<Attempt>,
        pub(super) receipt: Option<Countersigned<Receipt>>,
        pub(super) finished_at: Option<Timestamp>,
        pub(super) agreement: Option<Countersigned<Agreement>>,
    }

    /// [`crate::jobs::record::Experience`] of schemas 0 to 2.
    #[derive(Deserialize)]
    pub(super) struct Experience {
        pub(super) completed: u64,
        pub(super) failed: u64,
        pub(super) lied: u64,
        pub(super) completed_ms: u64,
    }
}

/// Stored types as earlier schemas wrote them, for migrations.
mod v1 {
    use hashgrid_protocol::{ContentId, Countersigned, PublicKey, Receipt, Timestamp};
    use serde::Deserialize;

    use crate::jobs::record::{Attempt, JobState};

    /// [`crate::jobs::record::JobRecord`] of schemas 0 and 1.
    #[derive(Deserialize)]
    pub(super) struct JobRecord {
        pub(super) id: ContentId,
        pub(super) name: String,
        pub(super) spec_id: ContentId,
        pub(super) submitted_at: Timestamp,
        pub(super) state: JobState,
        pub(super) provider: Option<PublicKey>,
        pub(super) attempts: Vec<Attempt>,
        pub(super) receipt: Option<Countersigned<Receipt>>,
        pub(super) finished_at: Option<Timestamp>,
    }
}

/// Rewrites every buyer job record with `agreement: None`. Records that already read as
/// schema 2 (a step interrupted and run again) are left as they are.
fn migrate_1_to_2(store: &Store) -> Result<(), StoreError> {
    let tree = store.tree(JobTree::BuyerJobs);
    let corrupt = |reason: String| StoreError::Corrupt {
        tree: JobTree::BuyerJobs.name(),
        reason,
    };
    for item in tree.iter() {
        let (key, bytes) = item?;
        // A record of schema 2 or later (trailing fields of later schemas are not read).
        if postcard::from_bytes::<v2::JobRecord>(&bytes).is_ok() {
            continue;
        }
        let old: v1::JobRecord =
            postcard::from_bytes(&bytes).map_err(|e| corrupt(format!("schema 1 job: {e}")))?;
        let new = v2::JobRecord {
            id: old.id,
            name: old.name,
            spec_id: old.spec_id,
            submitted_at: old.submitted_at,
            state: old.state,
            provider: old.provider,
            attempts: old.attempts,
            receipt: old.receipt,
            finished_at: old.finished_at,
            agreement: None,
        };
        let encoded = postcard::to_stdvec(&new).map_err(|e| corrupt(e.to_string()))?;
        tree.insert(key, encoded)?;
    }
    Ok(())
}

/// Rewrites every buyer job record with `verification: None` and every reputation record
/// with no spot checks and no reports. Records that already read as schema 3 (a step
/// interrupted and run again) are left as they are.
fn migrate_2_to_3(store: &Store) -> Result<(), StoreError> {
    use crate::jobs::record::Experience;
    use crate::jobs::record::JobRecord;
    let tree = store.tree(JobTree::BuyerJobs);
    let corrupt = |tree: &'static str, reason: String| StoreError::Corrupt { tree, reason };
    for item in tree.iter() {
        let (key, bytes) = item?;
        if postcard::from_bytes::<JobRecord>(&bytes).is_ok() {
            continue;
        }
        let old: v2::JobRecord = postcard::from_bytes(&bytes)
            .map_err(|e| corrupt(JobTree::BuyerJobs.name(), format!("schema 2 job: {e}")))?;
        let new = JobRecord {
            id: old.id,
            name: old.name,
            spec_id: old.spec_id,
            submitted_at: old.submitted_at,
            state: old.state,
            provider: old.provider,
            attempts: old.attempts,
            receipt: old.receipt,
            finished_at: old.finished_at,
            agreement: old.agreement,
            verification: None,
        };
        let encoded = postcard::to_stdvec(&new)
            .map_err(|e| corrupt(JobTree::BuyerJobs.name(), e.to_string()))?;
        tree.insert(key, encoded)?;
    }
    for item in store.reputation.iter() {
        let (key, bytes) = item?;
        if postcard::from_bytes::<Experience>(&bytes).is_ok() {
            continue;
        }
        let old: v2::Experience = postcard::from_bytes(&bytes)
            .map_err(|e| corrupt(TREE_REPUTATION, format!("schema 2 reputation: {e}")))?;
        let new = Experience {
            completed: old.completed,
            failed: old.failed,
            lied: old.lied,
            completed_ms: old.completed_ms,
            checks_passed: 0,
            reported: 0,
            forfeited: 0,
        };
        let encoded =
            postcard::to_stdvec(&new).map_err(|e| corrupt(TREE_REPUTATION, e.to_string()))?;
        store.reputation.insert(key, encoded)?;
    }
    Ok(())
}

/// The sled store (cheap to clone: sled handles are reference counted).
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    own_orders: sled::Tree,
    peers: sled::Tree,
    meta: sled::Tree,
    trees: JobTrees,
    /// Durable events not yet acknowledged, by a sled-generated monotonic id.
    events: sled::Tree,
    /// The buyer's experience of each provider, by its key.
    reputation: sled::Tree,
    /// Woken when an event is pushed.
    events_pushed: std::sync::Arc<tokio::sync::Notify>,
    /// Sequence numbers handed out from the leased range (see [`Store::next_seq`]): the last
    /// one and the persisted ceiling, read at first use; shared by every clone.
    seq: std::sync::Arc<std::sync::Mutex<Option<SeqLease>>>,
}

/// What [`Store::next_seq`] keeps in memory.
#[derive(Debug, Clone, Copy)]
struct SeqLease {
    /// The last number handed out.
    last: u64,
    /// The ceiling known to be on disk.
    ceiling: u64,
    /// The highest ceiling written to the tree (on disk after the next flush).
    written: u64,
}

/// How far above the number it hands out [`Store::next_seq`] persists its ceiling: one hour of
/// the clock's milliseconds, so re-announcements (every few minutes) flush once an hour.
pub const SEQ_LEASE: u64 = 3_600_000;

/// The trees of the job lifecycle.
#[derive(Clone, Debug)]
struct JobTrees {
    buyer_jobs: sled::Tree,
    provider_jobs: sled::Tree,
    receipts: sled::Tree,
    countersigned: sled::Tree,
    blobs: sled::Tree,
    settle_log: sled::Tree,
    invoices_out: sled::Tree,
    invoices_in: sled::Tree,
}

/// A tree of the job lifecycle (see [`Store`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobTree {
    /// Buyer side: jobs this node submitted, by job id.
    BuyerJobs,
    /// Provider side: jobs this node accepted, by agreement id.
    ProviderJobs,
    /// Provider side: the receipts this node signed, by chain position (its receipt chain).
    Receipts,
    /// Provider side: receipts the buyer countersigned, by chain position.
    Countersigned,
    /// Blobs: a buyer's received outputs; a provider's outputs until the buyer has them.
    Blobs,
    /// Provider side: the settlement ledger's event log, by sequence.
    SettleLog,
    /// Provider side: invoices issued, by id.
    InvoicesOut,
    /// Buyer side: invoices received, by id.
    InvoicesIn,
}

impl JobTree {
    /// Every job tree.
    pub const ALL: [JobTree; 8] = [
        JobTree::BuyerJobs,
        JobTree::ProviderJobs,
        JobTree::Receipts,
        JobTree::Countersigned,
        JobTree::Blobs,
        JobTree::SettleLog,
        JobTree::InvoicesOut,
        JobTree::InvoicesIn,
    ];

    fn name(self) -> &'static str {
        match self {
            JobTree::BuyerJobs => "buyer_jobs",
            JobTree::ProviderJobs => "provider_jobs",
            JobTree::Receipts => "receipts",
            JobTree::Countersigned => "countersigned",
            JobTree::Blobs => "blobs",
            JobTree::SettleLog => "settle_log",
            JobTree::InvoicesOut => "invoices_out",
            JobTree::InvoicesIn => "invoices_in",
        }
    }
}

/// How long [`Store::open`] waits for a lock that a just-closed store may still hold.
const STORE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

const TREE_OWN_ORDERS: &str = "own_orders";
const TREE_PEERS: &str = "peers";
const TREE_META: &str = "meta";
const TREE_EVENTS: &str = "events";
const TREE_REPUTATION: &str = "reputation";

mod outbox;
pub use outbox::MAX_UNHANDLED_EVENTS;

const KEY_LAST_SEQ: &[u8] = b"last_seq";
const KEY_SCHEMA: &[u8] = b"schema_version";
const KEY_LAST_ORDER_ID: &[u8] = b"last_order_id";

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        // sled's background flusher can hold the file lock for a moment after the last handle
        // of a closed store is dropped (a node restarted in the same process, a CLI command
        // right after a daemon stopped): retry briefly before reporting the store as in use.
        let deadline = std::time::Instant::now() + STORE_LOCK_WAIT;
        loop {
            let opened = sled::Config::new()
                .path(path)
                // Small cache: the store holds a few own orders and peer addresses.
                .cache_capacity(4 * 1024 * 1024)
                .open();
            match opened {
                Ok(db) => {
                    let store = Store::with_db(db)?;
                    store.upgrade(&path.display().to_string())?;
                    return Ok(store);
                }
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        }
    }

    fn with_db(db: sled::Db) -> Result<Store, StoreError> {
        let tree = |t: JobTree| db.open_tree(t.name());
        Ok(Store {
            own_orders: db.open_tree(TREE_OWN_ORDERS)?,
            peers: db.open_tree(TREE_PEERS)?,
            meta: db.open_tree(TREE_META)?,
            events: db.open_tree(TREE_EVENTS)?,
            reputation: db.open_tree(TREE_REPUTATION)?,
            events_pushed: Default::default(),
            seq: Default::default(),
            trees: JobTrees {
                buyer_jobs: tree(JobTree::BuyerJobs)?,
                provider_jobs: tree(JobTree::ProviderJobs)?,
                receipts: tree(JobTree::Receipts)?,
                countersigned: tree(JobTree::Countersigned)?,
                blobs: tree(JobTree::Blobs)?,
                settle_log: tree(JobTree::SettleLog)?,
                invoices_out: tree(JobTree::InvoicesOut)?,
                invoices_in: tree(JobTree::InvoicesIn)?,
            },
            db,
        })
    }

    /// A store in memory only (for nodes without a data dir); nothing survives a restart.
    pub fn temporary() -> Result<Store, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        let store = Store::with_db(db)?;
        store.upgrade("(in memory)")?;
        Ok(store)
    }

    /// The store's schema version: recorded, else 0 for a store that holds records (written
    /// before versions were recorded), else (a new store) [`SCHEMA_VERSION`].
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        if let Some(v) = self.meta.get(KEY_SCHEMA)? {
            let b: [u8; 4] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                tree: TREE_META,
                reason: format!("schema version is {} bytes, not 4", v.len()),
            })?;
            return Ok(u32::from_be_bytes(b));
        }
        let trees = [&self.own_orders, &self.peers, &self.meta];
        let empty = trees.iter().all(|t| t.is_empty())
            && JobTree::ALL.iter().all(|t| self.tree(*t).is_empty());
        Ok(if empty { SCHEMA_VERSION } else { 0 })
    }

    /// Brings the store to [`SCHEMA_VERSION`] through [`MIGRATIONS`], or refuses a newer one.
    fn upgrade(&self, path: &str) -> Result<(), StoreError> {
        let mut v = self.schema_version()?;
        if v > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.to_string(),
                found: v,
                supported: SCHEMA_VERSION,
            });
        }
        while v < SCHEMA_VERSION {
            let step = MIGRATIONS
                .get(v as usize)
                .filter(|m| m.from == v)
                .ok_or_else(|| StoreError::Migration {
                    from: v,
                    reason: "no migration from this version in this build".into(),
                })?;
            tracing::info!(
                from = v,
                to = v + 1,
                what = step.what,
                "migrating the store"
            );
            (step.run)(self)?;
            v += 1;
            self.meta.insert(KEY_SCHEMA, &v.to_be_bytes())?;
            self.db.flush()?;
        }
        if self.meta.get(KEY_SCHEMA)?.is_none() {
            self.meta
                .insert(KEY_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
            self.db.flush()?;
        }
        Ok(())
    }

    fn tree(&self, t: JobTree) -> &sled::Tree {
        match t {
            JobTree::BuyerJobs => &self.trees.buyer_jobs,
            JobTree::ProviderJobs => &self.trees.provider_jobs,
            JobTree::Receipts => &self.trees.receipts,
            JobTree::Countersigned => &self.trees.countersigned,
            JobTree::Blobs => &self.trees.blobs,
            JobTree::SettleLog => &self.trees.settle_log,
            JobTree::InvoicesOut => &self.trees.invoices_out,
            JobTree::InvoicesIn => &self.trees.invoices_in,
        }
    }

    /// Every record of a tree keyed by big-endian `u64`, with its key, in order.
    pub fn entries<T: DeserializeOwned>(&self, t: JobTree) -> Result<Vec<(u64, T)>, StoreError> {
        self.tree(t)
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let key = k.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| {
                    StoreError::Corrupt {
                        tree: t.name(),
                        reason: "key is not 8 bytes".into(),
                    }
                })?;
                Ok((key, decode(t, &v)?))
            })
            .collect()
    }

    /// The sled tree holding the BDK wallet `name` (its change-set log).
    pub fn wallet_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(format!("wallet_{name}"))?)
    }

    /// Writes a postcard record into a job tree. Not flushed: callers flush (with
    /// [`Store::flush`]) before they acknowledge anything that depends on it.
    pub fn put<T: Serialize>(&self, t: JobTree, key: &[u8], value: &T) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(value).map_err(|e| StoreError::Corrupt {
            tree: t.name(),
            reason: e.to_string(),
        })?;
        self.tree(t).insert(key, bytes)?;
        Ok(())
    }

    /// Reads a postcard record from a job tree.
    pub fn get<T: DeserializeOwned>(
        &self,
        t: JobTree,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        self.tree(t).get(key)?.map(|v| decode(t, &v)).transpose()
    }

    /// Every record of a job tree, in key order.
    pub fn all<T: DeserializeOwned>(&self, t: JobTree) -> Result<Vec<T>, StoreError> {
        self.tree(t)
            .iter()
            .values()
            .map(|v| decode(t, &v?))
            .collect()
    }

    /// The last record of a job tree (in key order).
    pub fn last<T: DeserializeOwned>(&self, t: JobTree) -> Result<Option<T>, StoreError> {
        self.tree(t).last()?.map(|(_, v)| decode(t, &v)).transpose()
    }

    /// Stores raw blob bytes under their id (not flushed).
    pub fn put_blob(&self, id: &ContentId, bytes: &[u8]) -> Result<(), StoreError> {
        self.trees.blobs.insert(id.as_bytes(), bytes)?;
        Ok(())
    }

    /// Raw blob bytes by id.
    pub fn blob(&self, id: &ContentId) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.trees.blobs.get(id.as_bytes())?)
    }

    /// Forgets a blob (not flushed).
    pub fn remove_blob(&self, id: &ContentId) -> Result<(), StoreError> {
        self.trees.blobs.remove(id.as_bytes())?;
        Ok(())
    }

    fn counter(&self, key: &[u8]) -> Result<u64, StoreError> {
        Ok(match self.meta.get(key)? {
            Some(v) => {
                u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    tree: TREE_META,
                    reason: "counter is not 8 bytes".into(),
                })?)
            }
            None => 0,
        })
    }

    /// The next sequence number: higher than any this node signed before (also before a
    /// crash) and at least `floor` (the caller passes the clock in ms, so a lost store still
    /// yields fresh numbers).
    ///
    /// Numbers are leased: the store persists (flushed) a ceiling [`SEQ_LEASE`] above the
    /// number it hands out and hands out numbers up to it from memory, so signing an order
    /// or ad needs no fsync (the swarm task signs re-announcements); the node extends the
    /// lease off that task once half of it is used ([`Store::extend_seq_lease`]), and only a
    /// number past the ceiling (a clock jump) flushes here. After a restart numbering resumes
    /// above the persisted ceiling: what was leased and not used is skipped, never reused.
    /// Safe to call from several threads.
    pub fn next_seq(&self, floor: u64) -> Result<u64, StoreError> {
        let mut lease = self.lease()?;
        let mut held = self.held_lease(&lease)?;
        let seq = held.last.saturating_add(1).max(floor);
        if seq > held.ceiling {
            // Past the lease (the clock jumped, or nobody extended it in time): extend it here.
            let ceiling = seq.saturating_add(SEQ_LEASE).max(held.written);
            self.meta.insert(KEY_LAST_SEQ, &ceiling.to_be_bytes())?;
            self.db.flush()?;
            held.ceiling = ceiling;
            held.written = ceiling;
        }
        held.last = seq;
        *lease = Some(held);
        Ok(seq)
    }

    /// Whether the sequence lease is less than half left (at the clock `now_ms`): time to
    /// [`extend_seq_lease`](Self::extend_seq_lease), off the swarm task.
    pub fn seq_lease_low(&self, now_ms: u64) -> bool {
        self.lease()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|l| l.ceiling.saturating_sub(l.last.max(now_ms)) < SEQ_LEASE / 2)
    }

    /// Moves the sequence lease's ceiling a whole lease above the last number handed out (or
    /// the clock, if later) and flushes it, so that [`next_seq`](Self::next_seq) need not
    /// flush; numbers below the old ceiling stay usable meanwhile. The flush runs without the
    /// lease's lock held. Returns whether it extended the lease.
    pub fn extend_seq_lease(&self, now_ms: u64) -> Result<bool, StoreError> {
        let target = {
            let mut lease = self.lease()?;
            let mut held = self.held_lease(&lease)?;
            let base = held.last.max(now_ms);
            if held.ceiling.saturating_sub(base) >= SEQ_LEASE / 2 {
                *lease = Some(held);
                return Ok(false);
            }
            let target = base.saturating_add(SEQ_LEASE).max(held.written);
            // Written under the lock, so the ceilings in the tree only ever rise.
            self.meta.insert(KEY_LAST_SEQ, &target.to_be_bytes())?;
            held.written = target;
            *lease = Some(held);
            target
        };
        self.db.flush()?;
        let mut lease = self.lease()?;
        if let Some(l) = lease.as_mut() {
            l.ceiling = l.ceiling.max(target);
        }
        Ok(true)
    }

    fn lease(&self) -> Result<std::sync::MutexGuard<'_, Option<SeqLease>>, StoreError> {
        self.seq.lock().map_err(|_| StoreError::Corrupt {
            tree: TREE_META,
            reason: "the sequence lease's lock was poisoned".into(),
        })
    }

    /// The lease in memory, read from the tree at first use.
    fn held_lease(&self, lease: &Option<SeqLease>) -> Result<SeqLease, StoreError> {
        Ok(match *lease {
            Some(l) => l,
            None => {
                let ceiling = self.counter(KEY_LAST_SEQ)?;
                SeqLease {
                    last: ceiling,
                    ceiling,
                    written: ceiling,
                }
            }
        })
    }

    /// A fresh order id. Not flushed on its own: the caller stores the order with
    /// [`Store::put_own_order`] and flushes both before announcing it; an id lost in a crash
    /// before that was never announced, so reusing it is harmless.
    pub fn next_order_id(&self) -> Result<u64, StoreError> {
        let id = self.counter(KEY_LAST_ORDER_ID)?.saturating_add(1);
        self.meta.insert(KEY_LAST_ORDER_ID, &id.to_be_bytes())?;
        Ok(id)
    }

    /// Records (or replaces) one of this node's orders. Not flushed: the node flushes
    /// ([`Store::flush`], off its swarm task) before it announces the order or acknowledges it.
    pub fn put_own_order(&self, order: &OwnOrder) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(order).map_err(|e| StoreError::Corrupt {
            tree: TREE_OWN_ORDERS,
            reason: e.to_string(),
        })?;
        self.own_orders
            .insert(order.order_id().to_be_bytes(), bytes)?;
        Ok(())
    }

    /// Forgets one of this node's orders (cancelled or expired). Returns it. Not flushed:
    /// the node flushes before it publishes the cancel or acknowledges it.
    pub fn remove_own_order(&self, order_id: u64) -> Result<Option<OwnOrder>, StoreError> {
        let old = self.own_orders.remove(order_id.to_be_bytes())?;
        old.map(|v| decode_order(&v)).transpose()
    }

    /// This node's stored orders.
    pub fn own_orders(&self) -> Result<Vec<OwnOrder>, StoreError> {
        self.own_orders
            .iter()
            .values()
            .map(|v| decode_order(&v?))
            .collect()
    }

    /// Remembers `addrs` for `peer` (at most [`MAX_ADDRS_PER_PEER`]). Not flushed: losing
    /// a peer address on a crash costs nothing but a slower rejoin.
    pub fn put_peer_addrs(&self, peer: &PeerId, addrs: &[Multiaddr]) -> Result<(), StoreError> {
        let key = peer.to_bytes();
        if !self.peers.contains_key(&key)? && self.peers.len() >= MAX_KNOWN_PEERS {
            return Ok(());
        }
        let addrs: Vec<String> = addrs
            .iter()
            .take(MAX_ADDRS_PER_PEER)
            .map(|a| a.to_string())
            .collect();
        let bytes = postcard::to_stdvec(&addrs).map_err(|e| StoreError::Corrupt {
            tree: TREE_PEERS,
            reason: e.to_string(),
        })?;
        self.peers.insert(key, bytes)?;
        Ok(())
    }

    /// Adds `addr` to what is remembered of `peer` (an address this node reached it at: the
    /// peer's identify info may never arrive if the connection is short), unless it is there
    /// or the peer already has [`MAX_ADDRS_PER_PEER`]. Not flushed, as
    /// [`put_peer_addrs`](Self::put_peer_addrs).
    pub fn add_peer_addr(&self, peer: &PeerId, addr: &Multiaddr) -> Result<(), StoreError> {
        let mut addrs = self
            .peers
            .get(peer.to_bytes())?
            .and_then(|v| postcard::from_bytes::<Vec<String>>(&v).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .collect::<Vec<_>>();
        if addrs.contains(addr) || addrs.len() >= MAX_ADDRS_PER_PEER {
            return Ok(());
        }
        addrs.push(addr.clone());
        self.put_peer_addrs(peer, &addrs)
    }

    /// Peers met before, with their addresses (undecodable entries are skipped).
    pub fn known_peers(&self) -> Result<Vec<(PeerId, Vec<Multiaddr>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.peers.iter() {
            let (k, v) = item?;
            let Ok(peer) = PeerId::from_bytes(&k) else {
                continue;
            };
            let Ok(addrs) = postcard::from_bytes::<Vec<String>>(&v) else {
                continue;
            };
            let addrs = addrs.iter().filter_map(|a| a.parse().ok()).collect();
            out.push((peer, addrs));
        }
        Ok(out)
    }

    /// Bytes the store's files take on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(t: JobTree, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        tree: t.name(),
        reason: e.to_string(),
    })
}

fn decode_order(bytes: &[u8]) -> Result<OwnOrder, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        tree: TREE_OWN_ORDERS,
        reason: e.to_string(),
    })
}

mod slot;
pub(crate) use slot::StoreSlot;

#[cfg(test)]
mod tests;
