//! The part of Bitcoin Core's JSON-RPC interface that block-following clients use, served from a
//! [`TestChain`]: lets the wallets' bitcoind backend (`bdk_bitcoind_rpc`) and ldk-node's
//! bitcoind chain source run against the in-process chain, with Bitcoin Core's result shapes
//! and error codes (see its RPC help).
//!
//! Methods: `getblockchaininfo`, `getnetworkinfo`, `getblockcount`, `getbestblockhash`,
//! `getblockhash`, `getblockheader` (verbose or hex), `getblock` (verbosity 0 or 1),
//! `getrawtransaction` (hex or verbose), `sendrawtransaction`, `getrawmempool` (plain or
//! verbose), `getmempoolentry`, `getmempoolinfo`, `estimatesmartfee` (1 sat/vB), `gettxout`.
//! HTTP basic authentication with the user and password it is started with (what a cookie
//! file holds); keep-alive connections.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use bdk_wallet::bitcoin::{
    Amount, Block, BlockHash, OutPoint, Transaction, Txid,
    base64::{Engine, engine::general_purpose::STANDARD as BASE64},
    consensus::encode::{deserialize_hex, serialize_hex},
    pow::Work,
};
use serde_json::{Value, json};

use super::serve_http::{Handler, Listener, Request, Response, json as json_response};
use super::testchain::TestChain;

/// Largest request accepted (a broadcast transaction, hex, in JSON).
const MAX_BODY: usize = 1 << 21;
/// The fee rate it quotes: 1 sat/vB, in BTC/kvB as Bitcoin Core writes it.
const FEE_BTC_PER_KVB: f64 = 0.000_01;

// Bitcoin Core's error codes.
const RPC_METHOD_NOT_FOUND: i64 = -32601;
const RPC_INVALID_PARAMS: i64 = -32602;
const RPC_PARSE_ERROR: i64 = -32700;
const RPC_INVALID_ADDRESS_OR_KEY: i64 = -5;
const RPC_INVALID_PARAMETER: i64 = -8;
const RPC_DESERIALIZATION_ERROR: i64 = -22;
const RPC_VERIFY_REJECTED: i64 = -26;

/// A running server; stops when dropped.
pub struct BitcoindRpcServer {
    listener: Listener,
    rpc: Arc<Rpc>,
    user: String,
    password: String,
}

/// When each mempool transaction was first seen (unix seconds, strictly increasing so that
/// clients polling by time see every one) and the chain height then.
type FirstSeen = Mutex<HashMap<Txid, (u64, u32)>>;

struct Rpc {
    chain: Arc<TestChain>,
    /// `Basic base64(user:password)`.
    auth: String,
    seen: FirstSeen,
    /// Calls answered.
    calls: std::sync::atomic::AtomicU64,
}

type RpcResult = Result<Value, (i64, String)>;

impl BitcoindRpcServer {
    /// Serves `chain` on `127.0.0.1` at a free port to clients that authenticate as `user` with
    /// `password`.
    pub fn start(
        chain: Arc<TestChain>,
        user: &str,
        password: &str,
    ) -> std::io::Result<BitcoindRpcServer> {
        let rpc = Arc::new(Rpc {
            chain,
            auth: format!("Basic {}", BASE64.encode(format!("{user}:{password}"))),
            seen: Mutex::default(),
            calls: Default::default(),
        });
        let serving = rpc.clone();
        let handler: Handler = Arc::new(move |r: &Request| serving.handle(r));
        Ok(BitcoindRpcServer {
            listener: Listener::start("bitcoind-rpc", MAX_BODY, true, handler)?,
            rpc,
            user: user.to_string(),
            password: password.to_string(),
        })
    }

    /// How many calls it has answered (authenticated ones).
    pub fn calls(&self) -> u64 {
        self.rpc.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.listener.addr
    }

    /// The URL, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listener.addr)
    }

    /// Writes a cookie file (`user:password`, as bitcoind's `.cookie`) at `path`.
    pub fn write_cookie(&self, path: &std::path::Path) -> std::io::Result<()> {
        std::fs::write(path, format!("{}:{}", self.user, self.password))
    }
}

impl std::fmt::Debug for BitcoindRpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitcoindRpcServer")
            .field("addr", &self.listener.addr)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

fn err(code: i64, message: impl Into<String>) -> (i64, String) {
    (code, message.into())
}

impl Rpc {
    fn handle(&self, r: &Request) -> Response {
        if r.method != "POST" {
            return super::serve_http::text(405, "JSONRPC server handles only POST requests");
        }
        if r.authorization.as_deref() != Some(self.auth.as_str()) {
            return super::serve_http::text(401, "");
        }
        let request: Value = match serde_json::from_slice(&r.body) {
            Ok(v) => v,
            Err(e) => {
                return reply(
                    &Value::Null,
                    None,
                    Err(err(RPC_PARSE_ERROR, format!("Parse error: {e}"))),
                );
            }
        };
        match &request {
            Value::Array(batch) => {
                let replies: Vec<Value> = batch.iter().map(|one| self.one(one)).collect();
                json_response(200, &Value::Array(replies))
            }
            one => {
                let v = self.one(one);
                // Bitcoin Core answers errors with a non-200 status; clients read the body.
                let status = match v["error"]["code"].as_i64() {
                    None => 200,
                    Some(RPC_METHOD_NOT_FOUND) => 404,
                    Some(_) => 500,
                };
                json_response(status, &v)
            }
        }
    }

    /// One call's reply object.
    fn one(&self, request: &Value) -> Value {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = request.get("id").cloned().unwrap_or(Value::Null);
        let version = request.get("jsonrpc").and_then(Value::as_str);
        let method = request.get("method").and_then(Value::as_str).unwrap_or("");
        let params = match request.get("params") {
            Some(Value::Array(p)) => p.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(_) => {
                let e = err(RPC_INVALID_PARAMS, "params must be an array");
                return body(&id, version, Err(e));
            }
        };
        body(&id, version, self.call(method, &params))
    }

    fn call(&self, method: &str, p: &[Value]) -> RpcResult {
        let chain = &*self.chain;
        match method {
            "getblockchaininfo" => {
                let tip = chain.tip();
                let tip_block = chain.block(tip.height).ok_or_else(no_block)?;
                Ok(json!({
                    "chain": "regtest",
                    "blocks": tip.height,
                    "headers": tip.height,
                    "bestblockhash": tip.hash.to_string(),
                    "difficulty": tip_block.header.target().difficulty_float(),
                    "time": tip_block.header.time,
                    "mediantime": median_time(chain, tip.height),
                    "verificationprogress": 1.0,
                    "initialblockdownload": false,
                    "chainwork": hex(&chainwork(chain, tip.height).to_be_bytes()),
                    "size_on_disk": 0,
                    "pruned": false,
                    "warnings": "",
                }))
            }
            "getnetworkinfo" => Ok(json!({
                "version": 280000,
                "subversion": "/hashgrid-testchain:0.1/",
                "protocolversion": 70016,
                "localservices": "0000000000000409",
                "localrelay": true,
                "timeoffset": 0,
                "networkactive": true,
                "connections": 0,
                "connections_in": 0,
                "connections_out": 0,
                "networks": [],
                "relayfee": FEE_BTC_PER_KVB,
                "incrementalfee": FEE_BTC_PER_KVB,
                "localaddresses": [],
                "warnings": "",
            })),
            "getblockcount" => Ok(json!(chain.height())),
            "getbestblockhash" => Ok(json!(chain.tip().hash.to_string())),
            "getblockhash" => {
                let h = param_u64(p, 0, "height")?;
                let b = u32::try_from(h)
                    .ok()
                    .and_then(|h| chain.block(h))
                    .ok_or_else(|| err(RPC_INVALID_PARAMETER, "Block height out of range"))?;
                Ok(json!(b.block_hash().to_string()))
            }
            "getblockheader" => {
                let (height, block) = find_block(chain, p)?;
                if p.get(1).and_then(Value::as_bool) == Some(false) {
                    return Ok(json!(serialize_hex(&block.header)));
                }
                Ok(header_json(chain, height, &block))
            }
            "getblock" => {
                let (height, block) = find_block(chain, p)?;
                let verbosity = match p.get(1) {
                    None | Some(Value::Null) => 1,
                    Some(Value::Bool(v)) => u64::from(*v),
                    Some(v) => v.as_u64().ok_or_else(|| bad_param("verbosity"))?,
                };
                match verbosity {
                    0 => Ok(json!(serialize_hex(&block))),
                    1 => {
                        let mut v = header_json(chain, height, &block);
                        let txids: Vec<String> = block
                            .txdata
                            .iter()
                            .map(|t| t.compute_txid().to_string())
                            .collect();
                        v["tx"] = json!(txids);
                        v["size"] = json!(block.total_size());
                        v["strippedsize"] = json!(
                            block.txdata.iter().map(|t| t.base_size()).sum::<usize>() + 80 + 9
                        );
                        v["weight"] = json!(block.weight().to_wu());
                        Ok(v)
                    }
                    _ => Err(err(
                        RPC_INVALID_PARAMETER,
                        "verbosity 2 and above are not served by the test chain",
                    )),
                }
            }
            "getrawtransaction" => {
                let txid = param_txid(p, 0)?;
                let t = chain.transaction(&txid).ok_or_else(|| {
                    err(
                        RPC_INVALID_ADDRESS_OR_KEY,
                        "No such mempool or blockchain transaction. Use gettransaction for wallet transactions.",
                    )
                })?;
                let verbose = match p.get(1) {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => v.as_u64().is_some_and(|n| n > 0),
                };
                if !verbose {
                    return Ok(json!(serialize_hex(&t.tx)));
                }
                let mut v = json!({
                    "hex": serialize_hex(&t.tx),
                    "txid": txid.to_string(),
                    "hash": t.tx.compute_wtxid().to_string(),
                    "size": t.tx.total_size(),
                    "vsize": t.tx.vsize(),
                    "weight": t.tx.weight().to_wu(),
                    "version": t.tx.version.0,
                    "locktime": t.tx.lock_time.to_consensus_u32(),
                });
                if let Some((h, hash, time)) = t.block {
                    v["blockhash"] = json!(hash.to_string());
                    v["confirmations"] = json!(chain.height() - h + 1);
                    v["time"] = json!(time);
                    v["blocktime"] = json!(time);
                }
                Ok(v)
            }
            "sendrawtransaction" => {
                let hex = p
                    .first()
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad_param("hexstring"))?;
                let tx: Transaction = deserialize_hex(hex).map_err(|e| {
                    err(
                        RPC_DESERIALIZATION_ERROR,
                        format!("TX decode failed. Make sure the tx has at least one input. ({e})"),
                    )
                })?;
                chain
                    .submit(&tx)
                    .map(|txid| json!(txid.to_string()))
                    .map_err(|e| err(RPC_VERIFY_REJECTED, e.to_string()))
            }
            "getrawmempool" => {
                let verbose = p.first().and_then(Value::as_bool).unwrap_or(false);
                let entries = self.mempool();
                if !verbose {
                    let ids: Vec<String> = entries.iter().map(|(t, ..)| t.to_string()).collect();
                    return Ok(json!(ids));
                }
                let mut m = serde_json::Map::new();
                for (txid, tx, seen) in &entries {
                    m.insert(txid.to_string(), self.entry_json(tx, *seen));
                }
                Ok(Value::Object(m))
            }
            "getmempoolentry" => {
                let txid = param_txid(p, 0)?;
                self.mempool()
                    .into_iter()
                    .find(|(t, ..)| *t == txid)
                    .map(|(_, tx, seen)| self.entry_json(&tx, seen))
                    .ok_or_else(|| err(RPC_INVALID_ADDRESS_OR_KEY, "Transaction not in mempool"))
            }
            "getmempoolinfo" => {
                let entries = self.mempool();
                let bytes: u64 = entries.iter().map(|(_, tx, _)| tx.vsize() as u64).sum();
                Ok(json!({
                    "loaded": true,
                    "size": entries.len(),
                    "bytes": bytes,
                    "usage": bytes,
                    "total_fee": 0.0,
                    "maxmempool": 300_000_000,
                    "mempoolminfee": FEE_BTC_PER_KVB,
                    "minrelaytxfee": FEE_BTC_PER_KVB,
                    "incrementalrelayfee": FEE_BTC_PER_KVB,
                    "unbroadcastcount": 0,
                    "fullrbf": true,
                }))
            }
            "estimatesmartfee" => {
                let blocks = param_u64(p, 0, "conf_target")?.clamp(1, 1008);
                Ok(json!({ "feerate": FEE_BTC_PER_KVB, "blocks": blocks }))
            }
            "gettxout" => {
                let txid = param_txid(p, 0)?;
                let vout = u32::try_from(param_u64(p, 1, "n")?).map_err(|_| bad_param("n"))?;
                let Some(out) = chain.utxo(&OutPoint { txid, vout }) else {
                    return Ok(Value::Null);
                };
                let t = chain.transaction(&txid);
                let confirmations = t
                    .as_ref()
                    .and_then(|t| t.block)
                    .map_or(0, |(h, ..)| chain.height() - h + 1);
                let coinbase = t.is_some_and(|t| t.tx.is_coinbase());
                Ok(json!({
                    "bestblock": chain.tip().hash.to_string(),
                    "confirmations": confirmations,
                    "value": out.value.to_btc(),
                    "scriptPubKey": { "hex": hex(out.script_pubkey.as_bytes()) },
                    "coinbase": coinbase,
                }))
            }
            other => Err(err(
                RPC_METHOD_NOT_FOUND,
                format!("Method not found: {other}"),
            )),
        }
    }

    /// The mempool with each transaction's first-seen time and height.
    fn mempool(&self) -> Vec<(Txid, Transaction, (u64, u32))> {
        let txs = self.chain.mempool();
        let height = self.chain.height();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|txid, _| txs.iter().any(|t| t.compute_txid() == *txid));
        let mut last = seen.values().map(|(t, _)| *t).max().unwrap_or(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        txs.into_iter()
            .map(|tx| {
                let txid = tx.compute_txid();
                let at = *seen.entry(txid).or_insert_with(|| {
                    last = now.max(last + 1);
                    (last, height)
                });
                (txid, tx, at)
            })
            .collect()
    }

    fn entry_json(&self, tx: &Transaction, (time, height): (u64, u32)) -> Value {
        let fee = self.fee(tx).map_or(0.0, Amount::to_btc);
        let vsize = tx.vsize();
        json!({
            "vsize": vsize,
            "weight": tx.weight().to_wu(),
            "time": time,
            "height": height,
            "descendantcount": 1,
            "descendantsize": vsize,
            "ancestorcount": 1,
            "ancestorsize": vsize,
            "wtxid": tx.compute_wtxid().to_string(),
            "fees": { "base": fee, "modified": fee, "ancestor": fee, "descendant": fee },
            "depends": [],
            "spentby": [],
            "bip125-replaceable": true,
            "unbroadcast": false,
        })
    }

    /// What `tx` pays in fees (inputs found on the chain or in the mempool).
    fn fee(&self, tx: &Transaction) -> Option<Amount> {
        let mut input = Amount::ZERO;
        for i in &tx.input {
            let prev = self.chain.transaction(&i.previous_output.txid)?;
            let out = prev.tx.output.get(i.previous_output.vout as usize)?;
            input = input.checked_add(out.value)?;
        }
        let output = tx
            .output
            .iter()
            .try_fold(Amount::ZERO, |a, o| a.checked_add(o.value))?;
        input.checked_sub(output)
    }
}

/// A reply object in the caller's JSON-RPC version (1.0's `result` and `error` both present;
/// 2.0's only one of them).
fn body(id: &Value, version: Option<&str>, result: RpcResult) -> Value {
    let two = version == Some("2.0");
    match result {
        Ok(v) if two => json!({ "jsonrpc": "2.0", "result": v, "id": id }),
        Ok(v) => json!({ "result": v, "error": null, "id": id }),
        Err((code, message)) => {
            let e = json!({ "code": code, "message": message });
            if two {
                json!({ "jsonrpc": "2.0", "error": e, "id": id })
            } else {
                json!({ "result": null, "error": e, "id": id })
            }
        }
    }
}

fn reply(id: &Value, version: Option<&str>, result: RpcResult) -> Response {
    json_response(500, &body(id, version, result))
}

fn no_block() -> (i64, String) {
    err(RPC_INVALID_ADDRESS_OR_KEY, "Block not found")
}

fn bad_param(name: &str) -> (i64, String) {
    err(
        RPC_INVALID_PARAMETER,
        format!("bad or missing parameter {name}"),
    )
}

fn param_u64(p: &[Value], i: usize, name: &str) -> Result<u64, (i64, String)> {
    p.get(i)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad_param(name))
}

fn param_txid(p: &[Value], i: usize) -> Result<Txid, (i64, String)> {
    p.get(i)
        .and_then(Value::as_str)
        .and_then(|s| Txid::from_str(s).ok())
        .ok_or_else(|| bad_param("txid"))
}

fn find_block(chain: &TestChain, p: &[Value]) -> Result<(u32, Block), (i64, String)> {
    let hash = p
        .first()
        .and_then(Value::as_str)
        .and_then(|s| BlockHash::from_str(s).ok())
        .ok_or_else(|| bad_param("blockhash"))?;
    (0..=chain.height())
        .rev()
        .find_map(|h| {
            chain
                .block(h)
                .filter(|b| b.block_hash() == hash)
                .map(|b| (h, b))
        })
        .ok_or_else(no_block)
}

fn header_json(chain: &TestChain, height: u32, block: &Block) -> Value {
    let h = &block.header;
    let mut v = json!({
        "hash": block.block_hash().to_string(),
        "confirmations": chain.height() - height + 1,
        "height": height,
        "version": h.version.to_consensus(),
        "versionHex": format!("{:08x}", h.version.to_consensus()),
        "merkleroot": h.merkle_root.to_string(),
        "time": h.time,
        "mediantime": median_time(chain, height),
        "nonce": h.nonce,
        "bits": format!("{:08x}", h.bits.to_consensus()),
        "difficulty": h.target().difficulty_float(),
        "chainwork": hex(&chainwork(chain, height).to_be_bytes()),
        "nTx": block.txdata.len(),
    });
    if height > 0 {
        v["previousblockhash"] = json!(h.prev_blockhash.to_string());
    }
    if let Some(next) = chain.block(height + 1) {
        v["nextblockhash"] = json!(next.block_hash().to_string());
    }
    v
}

/// The work of the chain up to and including `height`.
fn chainwork(chain: &TestChain, height: u32) -> Work {
    (0..=height)
        .filter_map(|h| chain.block(h))
        .map(|b| b.header.work())
        .fold(Work::from_be_bytes([0; 32]), |a, w| a + w)
}

/// The median time of the 11 blocks ending at `height`.
fn median_time(chain: &TestChain, height: u32) -> u32 {
    let mut times: Vec<u32> = (height.saturating_sub(10)..=height)
        .filter_map(|h| chain.block(h))
        .map(|b| b.header.time)
        .collect();
    times.sort_unstable();
    times.get(times.len() / 2).copied().unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};

    use super::*;

    /// One POST on a fresh connection: the status and the JSON body.
    fn post(server: &BitcoindRpcServer, auth: Option<&str>, body: &str) -> (u16, Value) {
        let mut conn = std::net::TcpStream::connect(server.addr()).expect("connect");
        let auth = auth.map_or(String::new(), |a| {
            format!("Authorization: Basic {}\r\n", BASE64.encode(a))
        });
        write!(
            conn,
            "POST / HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut r = BufReader::new(conn);
        let mut status = String::new();
        r.read_line(&mut status).expect("status");
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok());
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("header");
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).expect("body");
        (
            code.expect("a status"),
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        )
    }

    #[test]
    fn answers_like_bitcoind_and_refuses_what_it_should() {
        let chain = TestChain::new();
        chain.mine(3, &bdk_wallet::bitcoin::ScriptBuf::new_op_return([]));
        let server = BitcoindRpcServer::start(chain.clone(), "u", "p").expect("server");
        let call = |method: &str, params: Value| {
            post(
                &server,
                Some("u:p"),
                &json!({"jsonrpc": "1.0", "id": "t", "method": method, "params": params})
                    .to_string(),
            )
        };
        let (status, v) = call("getblockcount", json!([]));
        assert_eq!(
            (status, v["result"].clone(), v["id"].clone()),
            (200, json!(3), json!("t"))
        );
        let (_, v) = call("getblockhash", json!([2]));
        let hash = v["result"].as_str().expect("hash").to_string();
        assert_eq!(
            hash,
            chain.block(2).expect("block").block_hash().to_string()
        );
        let (_, v) = call("getblockheader", json!([hash]));
        assert_eq!(v["result"]["height"], json!(2));
        assert_eq!(v["result"]["confirmations"], json!(2));
        assert_eq!(v["result"]["chainwork"].as_str().map(str::len), Some(64));
        // Errors carry Bitcoin Core's codes.
        let (status, v) = call("getblockhash", json!([9]));
        assert_eq!(
            (status, v["error"]["code"].clone()),
            (500, json!(RPC_INVALID_PARAMETER))
        );
        let (status, v) = call("getblockheader", json!(["00".repeat(32)]));
        assert_eq!(
            (status, v["error"]["code"].clone()),
            (500, json!(RPC_INVALID_ADDRESS_OR_KEY))
        );
        let (status, v) = call("sendrawtransaction", json!(["zz"]));
        assert_eq!(
            (status, v["error"]["code"].clone()),
            (500, json!(RPC_DESERIALIZATION_ERROR))
        );
        let (status, v) = call("stop", json!([]));
        assert_eq!(
            (status, v["error"]["code"].clone()),
            (404, json!(RPC_METHOD_NOT_FOUND))
        );
        let (status, v) = call("getblockhash", json!(["two"]));
        assert_eq!(
            (status, v["error"]["code"].clone()),
            (500, json!(RPC_INVALID_PARAMETER))
        );
        let (status, v) = post(&server, Some("u:p"), "{not json");
        assert_eq!(
            (status, v["error"]["code"].clone()),
            (500, json!(RPC_PARSE_ERROR))
        );
        // Wrong or missing credentials: 401, nothing answered.
        let before = server.calls();
        assert_eq!(post(&server, Some("u:wrong"), "{}").0, 401);
        assert_eq!(post(&server, None, "{}").0, 401);
        assert_eq!(server.calls(), before);
        // A body over the limit is refused before it is read.
        let mut conn = std::net::TcpStream::connect(server.addr()).expect("connect");
        write!(
            conn,
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        )
        .expect("send");
        let mut status = String::new();
        BufReader::new(conn).read_line(&mut status).expect("status");
        assert!(status.contains("413"), "{status}");
    }
}
