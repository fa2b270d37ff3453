//! An in-process Bitcoin chain for tests and the demo: a UTXO set, blocks with real headers
//! (merkle and witness commitments, proof of work at regtest difficulty), a mempool, mining and
//! reorganisations.
//!
//! Every transaction it accepts is checked the way a node checks it: inputs exist and are
//! unspent (in the chain or the mempool), coinbase outputs are mature, outputs do not exceed
//! inputs, the lock time is reached, and **every input's script is run by Bitcoin Core's
//! interpreter** (libbitcoinconsensus), always given all spent outputs so taproot signatures are
//! checked against the real sighash. What it does not model: relay policy (fee floors, standardness,
//! RBF rules), difficulty adjustment and block size limits.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bdk_wallet::bitcoin::{
    self, Amount, Block, BlockHash, Network, OutPoint, Script, ScriptBuf, Sequence, Transaction,
    TxIn, TxMerkleNode, TxOut, Txid, Witness,
    absolute::LockTime,
    block::{Header, Version},
    consensus::encode::serialize,
    constants::genesis_block,
    hashes::Hash,
    opcodes::all::OP_RETURN,
    script::Builder,
    transaction,
};
use bdk_wallet::chain::BlockId;

use super::chain::{ChainError, ChainSource};

/// Blocks before a coinbase output may be spent.
pub const COINBASE_MATURITY: u32 = 100;

/// Why the chain refused a transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TxReject {
    /// The transaction has no inputs or no outputs.
    #[error("transaction has no inputs or no outputs")]
    Empty,
    /// Coinbase transactions are only made by mining.
    #[error("a coinbase transaction cannot be broadcast")]
    Coinbase,
    /// An input spends an output that does not exist or is spent in the chain.
    #[error("input {0} is missing or already spent")]
    MissingInput(OutPoint),
    /// An input is already spent by a transaction in the mempool.
    #[error("input {outpoint} is already spent by {by} in the mempool")]
    Conflict {
        /// The contested output.
        outpoint: OutPoint,
        /// The mempool transaction spending it.
        by: Txid,
    },
    /// A coinbase output spent before it matured.
    #[error("coinbase output {0} spent before {COINBASE_MATURITY} confirmations")]
    Immature(OutPoint),
    /// Outputs add up to more than inputs.
    #[error("outputs ({out} sat) exceed inputs ({inputs} sat)")]
    ValueOut {
        /// Sum of inputs.
        inputs: u64,
        /// Sum of outputs.
        out: u64,
    },
    /// The lock time is in the future.
    #[error("lock time {0} is not reached")]
    NonFinal(LockTime),
    /// Bitcoin Core's script interpreter refused an input.
    #[error("script verification failed on input {index}: {reason}")]
    Script {
        /// The input.
        index: usize,
        /// libbitcoinconsensus' error.
        reason: String,
    },
}

#[derive(Debug, Clone)]
struct Coin {
    txout: TxOut,
    height: u32,
    coinbase: bool,
}

#[derive(Debug)]
struct State {
    network: Network,
    blocks: Vec<Block>,
    /// Per height: the coins its transactions spent, to restore on disconnect.
    undo: Vec<Vec<(OutPoint, Coin)>>,
    utxos: HashMap<OutPoint, Coin>,
    mempool: Vec<Transaction>,
    /// When each mempool transaction was (last) accepted, as a strictly increasing clock.
    seen: HashMap<Txid, u64>,
    /// Transactions in blocks: txid → height.
    confirmed: HashMap<Txid, u32>,
    clock: u64,
}

/// The in-process chain. Cheap to share: clone the `Arc`.
#[derive(Debug)]
pub struct TestChain {
    state: Mutex<State>,
}

fn subsidy(height: u32) -> u64 {
    // Regtest halves every 150 blocks.
    let halvings = height / 150;
    if halvings >= 64 {
        0
    } else {
        (50 * 100_000_000u64) >> halvings
    }
}

impl State {
    fn height(&self) -> u32 {
        // The genesis block is always there.
        (self.blocks.len() - 1) as u32
    }

    fn tick(&mut self) -> u64 {
        let now = super::unix_secs();
        self.clock = self.clock.saturating_add(1).max(now);
        self.clock
    }

    /// Outputs created by mempool transactions and not spent by another one, and which mempool
    /// transaction spends each contested outpoint.
    fn mempool_view(&self) -> (HashMap<OutPoint, TxOut>, HashMap<OutPoint, Txid>) {
        let mut created = HashMap::new();
        let mut spent = HashMap::new();
        for tx in &self.mempool {
            let txid = tx.compute_txid();
            for input in &tx.input {
                spent.insert(input.previous_output, txid);
            }
            for (vout, out) in tx.output.iter().enumerate() {
                created.insert(OutPoint::new(txid, vout as u32), out.clone());
            }
        }
        (created, spent)
    }

    /// Checks `tx` against the chain and the mempool, as a node would before relaying it.
    fn check(&self, tx: &Transaction) -> Result<(), TxReject> {
        if tx.input.is_empty() || tx.output.is_empty() {
            return Err(TxReject::Empty);
        }
        if tx.is_coinbase() {
            return Err(TxReject::Coinbase);
        }
        let next_height = self.height() + 1;
        let (created, spent_in_pool) = self.mempool_view();
        let mut spent_outputs = Vec::with_capacity(tx.input.len());
        let mut seen = HashSet::new();
        for input in &tx.input {
            let op = input.previous_output;
            if !seen.insert(op) {
                return Err(TxReject::MissingInput(op));
            }
            if let Some(by) = spent_in_pool.get(&op) {
                return Err(TxReject::Conflict {
                    outpoint: op,
                    by: *by,
                });
            }
            let txout = if let Some(coin) = self.utxos.get(&op) {
                if coin.coinbase && next_height - coin.height < COINBASE_MATURITY {
                    return Err(TxReject::Immature(op));
                }
                coin.txout.clone()
            } else if let Some(out) = created.get(&op) {
                out.clone()
            } else {
                return Err(TxReject::MissingInput(op));
            };
            spent_outputs.push(txout);
        }
        let inputs: u64 = spent_outputs.iter().map(|o| o.value.to_sat()).sum();
        let out: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
        if out > inputs || out > Amount::MAX_MONEY.to_sat() {
            return Err(TxReject::ValueOut { inputs, out });
        }
        let time = self.blocks[self.blocks.len() - 1].header.time;
        if !tx.is_absolute_timelock_satisfied(
            bitcoin::absolute::Height::from_consensus(next_height)
                .unwrap_or(bitcoin::absolute::Height::MAX),
            bitcoin::absolute::Time::from_consensus(time.max(500_000_000))
                .unwrap_or(bitcoin::absolute::Time::MIN),
        ) {
            return Err(TxReject::NonFinal(tx.lock_time));
        }
        verify_scripts(tx, &spent_outputs)
    }

    fn connect(&mut self, block: Block) {
        let height = self.blocks.len() as u32;
        let mut undo = Vec::new();
        for tx in &block.txdata {
            let txid = tx.compute_txid();
            if !tx.is_coinbase() {
                for input in &tx.input {
                    if let Some(coin) = self.utxos.remove(&input.previous_output) {
                        undo.push((input.previous_output, coin));
                    }
                }
            }
            for (vout, out) in tx.output.iter().enumerate() {
                if out.script_pubkey.is_op_return() {
                    continue;
                }
                self.utxos.insert(
                    OutPoint::new(txid, vout as u32),
                    Coin {
                        txout: out.clone(),
                        height,
                        coinbase: tx.is_coinbase(),
                    },
                );
            }
            self.confirmed.insert(txid, height);
        }
        self.blocks.push(block);
        self.undo.push(undo);
    }

    /// Removes the tip block and returns its non-coinbase transactions.
    fn disconnect(&mut self) -> Vec<Transaction> {
        if self.blocks.len() <= 1 {
            return Vec::new();
        }
        let (Some(block), Some(undo)) = (self.blocks.pop(), self.undo.pop()) else {
            return Vec::new();
        };
        for tx in &block.txdata {
            let txid = tx.compute_txid();
            for vout in 0..tx.output.len() {
                self.utxos.remove(&OutPoint::new(txid, vout as u32));
            }
            self.confirmed.remove(&txid);
        }
        for (op, coin) in undo {
            self.utxos.insert(op, coin);
        }
        block
            .txdata
            .into_iter()
            .filter(|t| !t.is_coinbase())
            .collect()
    }

    fn mine_one(&mut self, to: &Script) -> BlockHash {
        let height = self.height() + 1;
        let prev = &self.blocks[self.blocks.len() - 1];
        let prev_hash = prev.block_hash();
        let time = prev.header.time + 600;
        let txs = std::mem::take(&mut self.mempool);
        let mut fees = 0u64;
        {
            let created = created_by(&txs);
            for tx in &txs {
                let inputs: u64 = tx
                    .input
                    .iter()
                    .filter_map(|i| {
                        self.utxos
                            .get(&i.previous_output)
                            .map(|c| c.txout.value.to_sat())
                            .or_else(|| created.get(&i.previous_output).map(|o| o.value.to_sat()))
                    })
                    .sum();
                let out: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
                fees += inputs.saturating_sub(out);
            }
        }
        for tx in &txs {
            self.seen.remove(&tx.compute_txid());
        }
        let mut coinbase = Transaction {
            version: transaction::Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: Builder::new()
                    .push_int(i64::from(height))
                    .push_int(0)
                    .into_script(),
                sequence: Sequence::MAX,
                witness: Witness::from_slice(&[[0u8; 32]]),
            }],
            output: vec![TxOut {
                value: Amount::from_sat(subsidy(height) + fees),
                script_pubkey: to.to_owned(),
            }],
        };
        let mut txdata = vec![coinbase.clone()];
        txdata.extend(txs);
        let mut block = Block {
            header: Header {
                version: Version::TWO,
                prev_blockhash: prev_hash,
                merkle_root: TxMerkleNode::all_zeros(),
                time,
                bits: prev.header.bits,
                nonce: 0,
            },
            txdata,
        };
        // BIP141 witness commitment in the coinbase.
        if let Some(root) = block.witness_root() {
            let commitment = Block::compute_witness_commitment(&root, &[0u8; 32]);
            let mut script = vec![OP_RETURN.to_u8(), 0x24, 0xaa, 0x21, 0xa9, 0xed];
            script.extend_from_slice(commitment.as_byte_array());
            coinbase.output.push(TxOut {
                value: Amount::ZERO,
                script_pubkey: ScriptBuf::from_bytes(script),
            });
            block.txdata[0] = coinbase;
        }
        if let Some(root) = block.compute_merkle_root() {
            block.header.merkle_root = root;
        }
        // Proof of work at the chain's (regtest) target: about two tries.
        let target = block.header.target();
        while block.header.validate_pow(target).is_err() {
            block.header.nonce = block.header.nonce.wrapping_add(1);
        }
        let hash = block.block_hash();
        self.connect(block);
        hash
    }

    fn accept(&mut self, tx: &Transaction) -> Result<Txid, TxReject> {
        let txid = tx.compute_txid();
        if self.confirmed.contains_key(&txid)
            || self.mempool.iter().any(|t| t.compute_txid() == txid)
        {
            return Ok(txid);
        }
        self.check(tx)?;
        let at = self.tick();
        self.mempool.push(tx.clone());
        self.seen.insert(txid, at);
        Ok(txid)
    }
}

/// The outputs `txs` create.
fn created_by(txs: &[Transaction]) -> HashMap<OutPoint, TxOut> {
    let mut created = HashMap::new();
    for tx in txs {
        let txid = tx.compute_txid();
        for (vout, out) in tx.output.iter().enumerate() {
            created.insert(OutPoint::new(txid, vout as u32), out.clone());
        }
    }
    created
}

/// Runs every input through libbitcoinconsensus with all spent outputs (required for taproot).
fn verify_scripts(tx: &Transaction, spent: &[TxOut]) -> Result<(), TxReject> {
    let bytes = serialize(tx);
    let utxos: Vec<bitcoinconsensus::Utxo> = spent
        .iter()
        .map(|o| bitcoinconsensus::Utxo {
            script_pubkey: o.script_pubkey.as_bytes().as_ptr(),
            script_pubkey_len: o.script_pubkey.len() as u32,
            value: o.value.to_sat() as i64,
        })
        .collect();
    let flags = bitcoinconsensus::VERIFY_ALL_PRE_TAPROOT | bitcoinconsensus::VERIFY_TAPROOT;
    for (index, out) in spent.iter().enumerate() {
        bitcoinconsensus::verify_with_flags(
            out.script_pubkey.as_bytes(),
            out.value.to_sat(),
            &bytes,
            Some(&utxos),
            index,
            flags,
        )
        .map_err(|e| TxReject::Script {
            index,
            reason: format!("{e:?}"),
        })?;
    }
    Ok(())
}

/// Height, hash and time of a block.
pub type BlockPos = (u32, BlockHash, u32);

/// The transaction spending an output: its id, the input's index, and its block (`None` in
/// the mempool).
pub type Spender = (Txid, u32, Option<BlockPos>);

/// A transaction as the chain knows it.
#[derive(Debug, Clone)]
pub struct ChainTx {
    /// The transaction.
    pub tx: Transaction,
    /// Height and hash of the block holding it, and the block's time; `None` in the mempool.
    pub block: Option<BlockPos>,
}

impl TestChain {
    /// A fresh regtest chain holding only the genesis block.
    pub fn new() -> Arc<TestChain> {
        let genesis = genesis_block(Network::Regtest);
        let mut confirmed = HashMap::new();
        confirmed.insert(genesis.txdata[0].compute_txid(), 0);
        Arc::new(TestChain {
            state: Mutex::new(State {
                network: Network::Regtest,
                blocks: vec![genesis],
                undo: vec![Vec::new()],
                utxos: HashMap::new(),
                mempool: Vec::new(),
                seen: HashMap::new(),
                confirmed,
                clock: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state behind (every mutation is
        // completed before the next one starts), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chain's network (regtest).
    pub fn network(&self) -> Network {
        self.lock().network
    }

    /// Height of the tip.
    pub fn height(&self) -> u32 {
        self.lock().height()
    }

    /// The tip's height and hash.
    pub fn tip(&self) -> BlockId {
        let s = self.lock();
        BlockId {
            height: s.height(),
            hash: s.blocks[s.blocks.len() - 1].block_hash(),
        }
    }

    /// The block at `height`, if the chain is that long.
    pub fn block(&self, height: u32) -> Option<Block> {
        self.lock().blocks.get(height as usize).cloned()
    }

    /// Accepts `tx` into the mempool after the full check (see the module docs). A transaction
    /// already in the mempool or the chain is accepted again without effect.
    pub fn submit(&self, tx: &Transaction) -> Result<Txid, TxReject> {
        self.lock().accept(tx)
    }

    /// Mines `n` blocks paying their coinbase to `to`; the first takes the whole mempool.
    pub fn mine(&self, n: u32, to: &Script) -> Vec<BlockHash> {
        let mut s = self.lock();
        (0..n).map(|_| s.mine_one(to)).collect()
    }

    /// The mempool, in acceptance order.
    pub fn mempool(&self) -> Vec<Transaction> {
        self.lock().mempool.clone()
    }

    /// A chain reorganisation: the top `depth` blocks are replaced by `depth + 1` new ones
    /// paying `to`. Their transactions go back to the mempool, except those in `drop` (a miner
    /// that never saw them); `replace_with` are then submitted (e.g. double spends of the dropped
    /// ones), and what the mempool holds is mined into the new blocks. Transactions that no
    /// longer fit the chain (children of dropped ones, conflicts) are evicted, as a node would.
    pub fn reorg(
        &self,
        depth: u32,
        drop: &[Txid],
        replace_with: &[Transaction],
        to: &Script,
    ) -> Result<Vec<BlockHash>, TxReject> {
        let mut s = self.lock();
        let mut returned = Vec::new();
        for _ in 0..depth.min(s.height()) {
            let mut txs = s.disconnect();
            txs.append(&mut returned);
            returned = txs;
        }
        let mut candidates = returned;
        candidates.append(&mut s.mempool);
        s.seen.clear();
        for tx in candidates {
            if drop.contains(&tx.compute_txid()) {
                continue;
            }
            // Conflicts and orphans of dropped transactions are evicted.
            let _ = s.accept(&tx);
        }
        for tx in replace_with {
            // A replacement wins over what it conflicts with in the mempool; their descendants
            // go with them.
            let spends: HashSet<OutPoint> = tx.input.iter().map(|i| i.previous_output).collect();
            s.mempool
                .retain(|t| !t.input.iter().any(|i| spends.contains(&i.previous_output)));
            let pool = std::mem::take(&mut s.mempool);
            s.seen.clear();
            for t in pool {
                let _ = s.accept(&t);
            }
            s.accept(tx)?;
        }
        Ok((0..=depth).map(|_| s.mine_one(to)).collect())
    }

    /// A transaction in the chain or the mempool.
    pub fn transaction(&self, txid: &Txid) -> Option<ChainTx> {
        let s = self.lock();
        if let Some(&h) = s.confirmed.get(txid) {
            let block = &s.blocks[h as usize];
            let tx = block
                .txdata
                .iter()
                .find(|t| t.compute_txid() == *txid)?
                .clone();
            return Some(ChainTx {
                tx,
                block: Some((h, block.block_hash(), block.header.time)),
            });
        }
        s.mempool
            .iter()
            .find(|t| t.compute_txid() == *txid)
            .map(|tx| ChainTx {
                tx: tx.clone(),
                block: None,
            })
    }

    /// Every transaction paying to or spending from `script`: confirmed ones oldest first,
    /// then the mempool's. (What an Esplora server indexes by script hash.)
    pub fn history(&self, script: &Script) -> Vec<ChainTx> {
        let s = self.lock();
        let mut ours: HashSet<OutPoint> = HashSet::new();
        let mut out = Vec::new();
        let mut consider = |tx: &Transaction, block: Option<BlockPos>| {
            let txid = tx.compute_txid();
            let mut hit = false;
            for (vout, o) in tx.output.iter().enumerate() {
                if o.script_pubkey.as_script() == script {
                    ours.insert(OutPoint::new(txid, vout as u32));
                    hit = true;
                }
            }
            if tx.input.iter().any(|i| ours.contains(&i.previous_output)) {
                hit = true;
            }
            if hit {
                out.push(ChainTx {
                    tx: tx.clone(),
                    block,
                });
            }
        };
        for (h, block) in s.blocks.iter().enumerate() {
            for tx in &block.txdata {
                consider(tx, Some((h as u32, block.block_hash(), block.header.time)));
            }
        }
        for tx in &s.mempool {
            consider(tx, None);
        }
        out
    }

    /// The output at `outpoint` and, if spent, the transaction spending it (in the chain or
    /// the mempool).
    pub fn spender(&self, outpoint: &OutPoint) -> Option<Spender> {
        let s = self.lock();
        for (h, block) in s.blocks.iter().enumerate() {
            for tx in &block.txdata {
                if let Some(vin) = tx.input.iter().position(|i| i.previous_output == *outpoint) {
                    return Some((
                        tx.compute_txid(),
                        vin as u32,
                        Some((h as u32, block.block_hash(), block.header.time)),
                    ));
                }
            }
        }
        s.mempool.iter().find_map(|tx| {
            tx.input
                .iter()
                .position(|i| i.previous_output == *outpoint)
                .map(|vin| (tx.compute_txid(), vin as u32, None))
        })
    }

    /// The value of an unspent output, if it is one.
    pub fn utxo(&self, outpoint: &OutPoint) -> Option<TxOut> {
        self.lock().utxos.get(outpoint).map(|c| c.txout.clone())
    }
}

impl ChainSource for TestChain {
    fn describe(&self) -> String {
        format!("in-process test chain (height {})", self.height())
    }

    fn sync(&self, wallet: &mut bdk_wallet::Wallet) -> Result<(), ChainError> {
        let mut s = self.lock();
        if wallet.network() != s.network {
            return Err(ChainError::WrongNetwork {
                wallet: wallet.network().to_string(),
                chain: s.network.to_string(),
            });
        }
        // The last block both agree on.
        let agree = wallet
            .latest_checkpoint()
            .iter()
            .find(|cp| {
                s.blocks
                    .get(cp.height() as usize)
                    .is_some_and(|b| b.block_hash() == cp.hash())
            })
            .map(|cp| cp.height())
            .ok_or_else(|| {
                ChainError::Inconsistent("the wallet shares no block with this chain".into())
            })?;
        let wallet_tip = wallet.latest_checkpoint().height();
        // Replay from the agreement point; when the chain is shorter than a stale wallet tip,
        // re-apply the tip block so the stale blocks are displaced.
        let from = if agree >= s.height() && wallet_tip > agree {
            s.height().max(1)
        } else {
            agree + 1
        };
        for h in from..=s.height() {
            let block = &s.blocks[h as usize];
            let connected_to = BlockId {
                height: h - 1,
                hash: block.header.prev_blockhash,
            };
            wallet
                .apply_block_connected_to(block, h, connected_to)
                .map_err(|e| ChainError::Inconsistent(e.to_string()))?;
        }
        let now = s.tick();
        let pool: HashSet<Txid> = s.mempool.iter().map(|t| t.compute_txid()).collect();
        wallet.apply_unconfirmed_txs(s.mempool.iter().map(|t| (t.clone(), now)));
        let evicted: Vec<(Txid, u64)> = wallet
            .transactions()
            .filter(|t| !t.chain_position.is_confirmed())
            .map(|t| t.tx_node.txid)
            .filter(|txid| !pool.contains(txid))
            .map(|txid| (txid, now))
            .collect();
        wallet.apply_evicted_txs(evicted);
        Ok(())
    }

    fn broadcast(&self, tx: &Transaction) -> Result<(), ChainError> {
        self.submit(tx)
            .map(|_| ())
            .map_err(|e| ChainError::Rejected(e.to_string()))
    }

    fn transaction(&self, txid: &Txid) -> Result<Option<Transaction>, ChainError> {
        Ok(TestChain::transaction(self, txid).map(|t| t.tx))
    }
}
