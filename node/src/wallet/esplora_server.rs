//! The part of Esplora's HTTP API that wallets use, served from a [`TestChain`]: lets the
//! Esplora backend (and the `hashgrid wallet` commands) run against the in-process chain, with
//! responses in Esplora's own JSON shapes (see Blockstream's `esplora/API.md`).
//!
//! Endpoints: `GET /blocks[/:height]`, `/blocks/tip/height`, `/blocks/tip/hash`,
//! `/block-height/:height`, `/block/:hash/header`, `/block/:hash/status`,
//! `/scripthash/:hash/txs[/chain/:last_txid]`, `/tx/:txid`, `/tx/:txid/raw`, `/tx/:txid/status`,
//! `/tx/:txid/outspend/:vout`, `/tx/:txid/outspends`, `/tx/:txid/merkle-proof`,
//! `/tx/:txid/merkleblock-proof` (what LDK's transaction sync reads), `/fee-estimates`;
//! `POST /tx`. One thread per connection,
//! `Connection: close`; for tests and demos, not the internet.

use std::str::FromStr;
use std::sync::Arc;

use bdk_wallet::bitcoin::{
    BlockHash, MerkleBlock, OutPoint, Transaction, Txid,
    consensus::encode::{deserialize_hex, serialize, serialize_hex},
    hashes::{Hash, sha256, sha256d},
};
use serde_json::{Value, json};

use super::serve_http::{Handler, Listener, Request, Response, json, text};
use super::testchain::{ChainTx, TestChain};

/// Confirmed transactions per page of `/scripthash/:hash/txs` (as Esplora).
const PAGE: usize = 25;
/// Largest request body accepted (a broadcast transaction, hex).
const MAX_BODY: usize = 1 << 20;

/// A running server; stops when dropped.
#[derive(Debug)]
pub struct EsploraServer {
    listener: Listener,
}

impl EsploraServer {
    /// Serves `chain` on `127.0.0.1` at a free port.
    pub fn start(chain: Arc<TestChain>) -> std::io::Result<EsploraServer> {
        let handler: Handler =
            Arc::new(move |r: &Request| route(&chain, &r.method, &r.path, &r.body));
        Ok(EsploraServer {
            listener: Listener::start("esplora-server", MAX_BODY, false, handler)?,
        })
    }

    /// The base URL, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listener.addr)
    }
}

fn json_ok(v: &Value) -> Response {
    json(200, v)
}

fn not_found() -> Response {
    text(404, "Not Found")
}

fn route(chain: &TestChain, method: &str, path: &str, body: &[u8]) -> Response {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        ("POST", ["tx"]) => {
            let hex = String::from_utf8_lossy(body);
            match deserialize_hex::<Transaction>(hex.trim()) {
                Err(e) => text(400, format!("TX decode failed: {e}")),
                Ok(tx) => match chain.submit(&tx) {
                    Ok(txid) => text(200, txid.to_string()),
                    Err(e) => text(400, format!("sendrawtransaction RPC error: {e}")),
                },
            }
        }
        ("GET", ["blocks", "tip", "height"]) => text(200, chain.height().to_string()),
        ("GET", ["blocks", "tip", "hash"]) => text(200, chain.tip().hash.to_string()),
        ("GET", ["blocks"]) => blocks(chain, chain.height()),
        ("GET", ["blocks", h]) => match h.parse() {
            Ok(h) => blocks(chain, h),
            Err(_) => text(400, "bad height"),
        },
        ("GET", ["block-height", h]) => match h.parse().ok().and_then(|h| chain.block(h)) {
            Some(b) => text(200, b.block_hash().to_string()),
            None => text(404, "Block not found"),
        },
        ("GET", ["block", hash, "header"]) => match find_block(chain, hash) {
            Some((_, b)) => text(200, serialize_hex(&b.header)),
            None => text(404, "Block not found"),
        },
        ("GET", ["block", hash, "status"]) => {
            let v = match find_block(chain, hash) {
                Some((h, _)) => json!({
                    "in_best_chain": true,
                    "height": h,
                    "next_best": chain.block(h + 1).map(|b| b.block_hash().to_string()),
                }),
                None => json!({"in_best_chain": false}),
            };
            json_ok(&v)
        }
        ("GET", ["scripthash", hash, "txs"]) => script_txs(chain, hash, None),
        ("GET", ["scripthash", hash, "txs", "chain", last]) => script_txs(chain, hash, Some(last)),
        ("GET", ["tx", txid]) => with_tx(chain, txid, |t| json_ok(&tx_json(chain, t))),
        ("GET", ["tx", txid, "raw"]) => with_tx(chain, txid, |t| Response {
            status: 200,
            content_type: "application/octet-stream",
            body: serialize(&t.tx),
        }),
        ("GET", ["tx", txid, "hex"]) => with_tx(chain, txid, |t| text(200, serialize_hex(&t.tx))),
        ("GET", ["tx", txid, "status"]) => with_tx(chain, txid, |t| json_ok(&status_json(t.block))),
        ("GET", ["tx", txid, "merkleblock-proof"]) => match confirmed_in(chain, txid) {
            Some((_, block, txid)) => {
                let proof = MerkleBlock::from_block_with_predicate(&block, |t| *t == txid);
                text(200, serialize_hex(&proof))
            }
            None => text(404, "Transaction not found or is unconfirmed"),
        },
        ("GET", ["tx", txid, "merkle-proof"]) => match confirmed_in(chain, txid) {
            Some((height, block, txid)) => merkle_proof(height, &block, txid),
            None => text(404, "Transaction not found or is unconfirmed"),
        },
        ("GET", ["tx", txid, "outspends"]) => {
            let Ok(txid) = Txid::from_str(txid) else {
                return text(400, "bad txid");
            };
            let Some(tx) = chain.transaction(&txid) else {
                return text(404, "Transaction not found");
            };
            let list: Vec<Value> = (0..tx.tx.output.len() as u32)
                .map(|vout| outspend_json(chain, OutPoint::new(txid, vout)))
                .collect();
            json_ok(&Value::Array(list))
        }
        ("GET", ["tx", txid, "outspend", vout]) => {
            let (Ok(txid), Ok(vout)) = (Txid::from_str(txid), vout.parse::<u32>()) else {
                return text(400, "bad outpoint");
            };
            json_ok(&outspend_json(chain, OutPoint::new(txid, vout)))
        }
        ("GET", ["fee-estimates"]) => json_ok(&json!({"1": 2.0, "6": 1.0, "144": 1.0})),
        _ => not_found(),
    }
}

fn outspend_json(chain: &TestChain, outpoint: OutPoint) -> Value {
    match chain.spender(&outpoint) {
        Some((by, vin, block)) => json!({
            "spent": true, "txid": by.to_string(), "vin": vin, "status": status_json(block),
        }),
        None => json!({"spent": false}),
    }
}

/// The height and block that confirm `txid`, if a block does.
fn confirmed_in(chain: &TestChain, txid: &str) -> Option<(u32, bdk_wallet::bitcoin::Block, Txid)> {
    let txid = Txid::from_str(txid).ok()?;
    let (height, _, _) = chain.transaction(&txid)?.block?;
    Some((height, chain.block(height)?, txid))
}

/// Esplora's `merkle-proof`: the sibling hashes from the transaction up to the root (electrum's
/// `blockchain.transaction.get_merkle` shape).
fn merkle_proof(height: u32, block: &bdk_wallet::bitcoin::Block, txid: Txid) -> Response {
    let mut level: Vec<_> = block
        .txdata
        .iter()
        .map(|t| t.compute_txid().to_raw_hash())
        .collect();
    let Some(pos) = level.iter().position(|h| *h == txid.to_raw_hash()) else {
        return text(404, "Transaction not found");
    };
    let mut index = pos;
    let mut merkle = Vec::new();
    while level.len() > 1 {
        if level.len() % 2 == 1 {
            level.push(level[level.len() - 1]);
        }
        merkle.push(level[index ^ 1].to_string());
        level = level
            .chunks(2)
            .map(|pair| {
                let mut both = [0u8; 64];
                both[..32].copy_from_slice(pair[0].as_byte_array());
                both[32..].copy_from_slice(pair[1].as_byte_array());
                sha256d::Hash::hash(&both)
            })
            .collect();
        index /= 2;
    }
    json_ok(&json!({"block_height": height, "merkle": merkle, "pos": pos}))
}

fn find_block(chain: &TestChain, hash: &str) -> Option<(u32, bdk_wallet::bitcoin::Block)> {
    let hash = BlockHash::from_str(hash).ok()?;
    (0..=chain.height()).rev().find_map(|h| {
        chain
            .block(h)
            .filter(|b| b.block_hash() == hash)
            .map(|b| (h, b))
    })
}

fn blocks(chain: &TestChain, from: u32) -> Response {
    let from = from.min(chain.height());
    let list: Vec<Value> = (from.saturating_sub(9)..=from)
        .rev()
        .filter_map(|h| chain.block(h).map(|b| (h, b)))
        .map(|(h, b)| {
            json!({
                "id": b.block_hash().to_string(),
                "height": h,
                "version": b.header.version.to_consensus(),
                "timestamp": b.header.time,
                "tx_count": b.txdata.len(),
                "size": b.total_size(),
                "weight": b.weight().to_wu(),
                "merkle_root": b.header.merkle_root.to_string(),
                "previousblockhash": (h > 0).then(|| b.header.prev_blockhash.to_string()),
                "mediantime": b.header.time,
                "nonce": b.header.nonce,
                "bits": b.header.bits.to_consensus(),
                "difficulty": 0.0,
            })
        })
        .collect();
    json_ok(&Value::Array(list))
}

fn with_tx(chain: &TestChain, txid: &str, f: impl FnOnce(&ChainTx) -> Response) -> Response {
    match Txid::from_str(txid)
        .ok()
        .and_then(|t| chain.transaction(&t))
    {
        Some(t) => f(&t),
        None => text(404, "Transaction not found"),
    }
}

fn status_json(block: Option<super::testchain::BlockPos>) -> Value {
    match block {
        Some((h, hash, time)) => json!({
            "confirmed": true, "block_height": h, "block_hash": hash.to_string(), "block_time": time,
        }),
        None => json!({"confirmed": false}),
    }
}

fn tx_json(chain: &TestChain, t: &ChainTx) -> Value {
    let tx = &t.tx;
    let mut fee = 0i64;
    let vin: Vec<Value> = tx
        .input
        .iter()
        .map(|i| {
            let coinbase = tx.is_coinbase();
            let prevout = if coinbase {
                Value::Null
            } else {
                chain
                    .transaction(&i.previous_output.txid)
                    .and_then(|p| p.tx.output.get(i.previous_output.vout as usize).cloned())
                    .map_or(Value::Null, |o| {
                        fee += o.value.to_sat() as i64;
                        json!({"scriptpubkey": o.script_pubkey.to_hex_string(), "value": o.value.to_sat()})
                    })
            };
            json!({
                "txid": i.previous_output.txid.to_string(),
                "vout": i.previous_output.vout,
                "prevout": prevout,
                "scriptsig": i.script_sig.to_hex_string(),
                "witness": i.witness.iter().map(hex_of).collect::<Vec<_>>(),
                "sequence": i.sequence.0,
                "is_coinbase": coinbase,
            })
        })
        .collect();
    let vout: Vec<Value> = tx
        .output
        .iter()
        .map(|o| {
            fee -= o.value.to_sat() as i64;
            json!({"scriptpubkey": o.script_pubkey.to_hex_string(), "value": o.value.to_sat()})
        })
        .collect();
    json!({
        "txid": tx.compute_txid().to_string(),
        "version": tx.version.0,
        "locktime": tx.lock_time.to_consensus_u32(),
        "vin": vin,
        "vout": vout,
        "size": tx.total_size(),
        "weight": tx.weight().to_wu(),
        "fee": if tx.is_coinbase() { 0 } else { fee.max(0) },
        "status": status_json(t.block),
    })
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn script_txs(chain: &TestChain, scripthash: &str, last: Option<&str>) -> Response {
    // The script is found by hashing every output script the chain has seen; fine for a test
    // chain of a few hundred blocks.
    let Some(script) = find_script(chain, scripthash) else {
        return json_ok(&Value::Array(Vec::new()));
    };
    let history = chain.history(&script);
    let (mempool, confirmed): (Vec<_>, Vec<_>) =
        history.into_iter().partition(|t| t.block.is_none());
    // Esplora: newest first; the first page has the mempool then 25 confirmed.
    let confirmed: Vec<ChainTx> = confirmed.into_iter().rev().collect();
    let page: Vec<&ChainTx> = match last {
        None => mempool.iter().chain(confirmed.iter().take(PAGE)).collect(),
        Some(last) => {
            let Ok(last) = Txid::from_str(last) else {
                return text(400, "bad txid");
            };
            let start = confirmed
                .iter()
                .position(|t| t.tx.compute_txid() == last)
                .map_or(confirmed.len(), |p| p + 1);
            confirmed.iter().skip(start).take(PAGE).collect()
        }
    };
    json_ok(&Value::Array(
        page.into_iter().map(|t| tx_json(chain, t)).collect(),
    ))
}

fn find_script(chain: &TestChain, scripthash: &str) -> Option<bdk_wallet::bitcoin::ScriptBuf> {
    let want = sha256::Hash::from_str(scripthash).ok()?;
    let check = |tx: &Transaction| {
        tx.output
            .iter()
            .find(|o| sha256::Hash::hash(o.script_pubkey.as_bytes()) == want)
            .map(|o| o.script_pubkey.clone())
    };
    chain.mempool().iter().find_map(check).or_else(|| {
        (0..=chain.height())
            .rev()
            .filter_map(|h| chain.block(h))
            .find_map(|b| b.txdata.iter().find_map(check))
    })
}
