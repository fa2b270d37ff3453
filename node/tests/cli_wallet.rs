//! The real `hashgrid wallet` and `hashgrid invoices` commands and `hashgrid-node earnings`,
//! against the in-process test chain served over Esplora's HTTP API.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use hashgrid_node::wallet::TestChain;
use hashgrid_node::wallet::bitcoin::ScriptBuf;
use hashgrid_node::wallet::esplora_server::EsploraServer;

mod support;
use support::{hashgrid, json, regtest_script, run};

fn config(data: &Path, extra: &str) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(
        data.join("config.toml"),
        format!("network = \"test\"\nmdns = false\n\n[settle]\n{extra}\n"),
    )
    .unwrap();
}

#[test]
fn wallet_address_balance_send_against_esplora() {
    let chain = TestChain::new();
    let server = EsploraServer::start(chain.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("buyer");
    config(
        &data,
        &format!(
            "mode = \"onchain\"\nbitcoin = \"regtest\"\nesplora = \"{}\"",
            server.url()
        ),
    );

    let a = json(&hashgrid(&data, &["--json", "wallet", "address"]));
    let addr = a["address"].as_str().unwrap().to_string();
    assert!(addr.starts_with("bcrt1p"), "{addr}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("wallet.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A second call hands out the next address.
    let b = json(&hashgrid(&data, &["--json", "wallet", "address"]));
    assert_ne!(b["address"], a["address"]);

    // Mine a coinbase to the first address and let it mature.
    let spk = regtest_script(&addr);
    chain.mine(1, &spk);
    chain.mine(100, &ScriptBuf::new_op_return([0u8; 4]));
    let bal = json(&hashgrid(&data, &["--json", "wallet", "balance"]));
    assert_eq!(bal["confirmed_sat"], 5_000_000_000u64);
    assert_eq!(bal["height"], 101);

    // Send to the second address: broadcast through Esplora, checked by the chain's script
    // interpreter.
    let to = b["address"].as_str().unwrap();
    let sent = json(&hashgrid(&data, &["--json", "wallet", "send", to, "25000"]));
    let txid = sent["txid"].as_str().unwrap();
    assert!(
        chain
            .mempool()
            .iter()
            .any(|t| t.compute_txid().to_string() == txid)
    );

    // Bad input: an address of another network.
    let o = hashgrid(
        &data,
        &[
            "wallet",
            "send",
            "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq",
            "1000",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("hint:"));

    // No invoices yet.
    let inv = json(&hashgrid(&data, &["--json", "invoices"]));
    assert_eq!(inv, serde_json::json!([]));
}

#[test]
fn mainnet_needs_the_explicit_flag_and_ledger_mode_has_no_wallet() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("buyer");
    config(
        &data,
        "mode = \"onchain\"\nbitcoin = \"mainnet\"\nesplora = \"http://127.0.0.1:9\"",
    );
    let o = hashgrid(&data, &["wallet", "address"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("mainnet"), "{err}");
    assert!(
        !data.join("wallet.json").exists(),
        "no keys are made for a refused network"
    );

    let ledger = dir.path().join("ledger");
    config(&ledger, "mode = \"ledger\"");
    let o = hashgrid(&ledger, &["wallet", "balance"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("ledger mode"));
}

#[test]
fn site_earnings_on_a_fresh_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        env!("CARGO_BIN_EXE_hashgrid-node"),
        dir.path(),
        &["earnings", "--json"],
    );
    assert_eq!(json(&o), serde_json::json!([]));
    let o = run(
        env!("CARGO_BIN_EXE_hashgrid-node"),
        dir.path(),
        &["invoices"],
    );
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("no invoices"));
}
