//! The real `hashgrid ln` and `hashgrid-node ln` commands against the in-process test chain
//! served over Esplora's HTTP API: a buyer's Lightning node is created in its data dir (seed
//! 0600), funded, opens a channel to a site's Lightning node, and closes it.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use hashgrid_lightning::{LdkBackend, LightningBackend};
use hashgrid_node::settle::SettleSection;
use hashgrid_node::wallet::TestChain;
use hashgrid_node::wallet::bitcoin::ScriptBuf;
use hashgrid_node::wallet::esplora_server::EsploraServer;

mod support;
use support::{hashgrid, json, regtest_script};

fn settle(url: &str, listen: Option<u16>) -> String {
    let mut s = format!("mode = \"lightning\"\nbitcoin = \"regtest\"\nesplora = \"{url}\"\n");
    if let Some(p) = listen {
        s.push_str(&format!("lightning_listen = \"127.0.0.1:{p}\"\n"));
    }
    s
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn ln_status_address_open_and_close_from_the_command_line() {
    let chain = TestChain::new();
    let server = EsploraServer::start(chain.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buyer = dir.path().join("buyer");
    std::fs::create_dir_all(&buyer).unwrap();
    std::fs::write(
        buyer.join("config.toml"),
        format!(
            "network = \"test\"\nmdns = false\n\n[settle]\n{}",
            settle(&server.url(), None)
        ),
    )
    .unwrap();

    // A fresh data dir: the Lightning node is created, with its seed private.
    let s = json(&hashgrid(&buyer, &["--json", "ln", "status"]));
    let node_id = s["node_id"].as_str().unwrap().to_string();
    assert_eq!(node_id.len(), 66, "{s}");
    assert_eq!(s["balances"]["onchain_sat"], 0);
    assert_eq!(s["channels"], serde_json::json!([]));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let seed = buyer.join("lightning").join(hashgrid_lightning::SEED_FILE);
        assert_eq!(
            std::fs::metadata(seed).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // The same node next time.
    let again = json(&hashgrid(&buyer, &["--json", "ln", "status"]));
    assert_eq!(again["node_id"], s["node_id"]);

    // Fund it: a coinbase to its address, matured.
    let a = json(&hashgrid(&buyer, &["--json", "ln", "address"]));
    let addr = a["address"].as_str().unwrap();
    assert!(addr.starts_with("bcrt1"), "{addr}");
    chain.mine(1, &regtest_script(addr));
    chain.mine(100, &ScriptBuf::new_op_return([0u8; 4]));
    let s = json(&hashgrid(&buyer, &["--json", "ln", "status"]));
    assert_eq!(s["balances"]["onchain_sat"], 5_000_000_000u64);

    // A site's Lightning node, as `hashgrid-node run` keeps it, running from its data dir.
    let site_dir = dir.path().join("site");
    let port = free_port();
    let section: SettleSection =
        toml::from_str(&settle(&server.url(), Some(port))).expect("settle section");
    let site = LdkBackend::start(&section.ldk_config(&site_dir).unwrap()).unwrap();
    let peer = site.listen_addr().unwrap().to_string();

    // Open a channel to it from the command line; the funding is broadcast before it returns.
    let o = json(&hashgrid(
        &buyer,
        &["--json", "ln", "open", &peer, "1000000"],
    ));
    assert!(o["funding"].is_string(), "{o}");
    assert_eq!(chain.mempool().len(), 1, "the funding transaction");
    chain.mine(6, &ScriptBuf::new_op_return([0u8; 4]));
    let start = Instant::now();
    let channel = loop {
        let _ = site.sync();
        let s = json(&hashgrid(&buyer, &["--json", "ln", "status"]));
        let ch = s["channels"][0].clone();
        if ch["ready"] == true {
            break ch;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "channel never ready: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(channel["capacity_sat"], 1_000_000);
    assert_eq!(channel["peer"], site.node_id().to_string());
    assert!(site.channels().iter().any(|c| c.capacity_sat == 1_000_000));

    // And close it: the closing transaction is broadcast.
    let id = channel["id"].as_str().unwrap();
    let c = json(&hashgrid(&buyer, &["--json", "ln", "close", id]));
    assert!(c["closed"].is_string(), "{c}");
    assert_eq!(chain.mempool().len(), 1, "the closing transaction");
    site.stop().unwrap();
}

#[test]
fn ln_commands_refuse_a_node_that_does_not_settle_over_lightning() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("buyer");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("config.toml"),
        "network = \"test\"\nmdns = false\n",
    )
    .unwrap();
    let o = hashgrid(&data, &["ln", "status"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not settle over Lightning"), "{err}");
    assert!(
        !data.join("lightning").exists(),
        "no Lightning state created"
    );
}

#[test]
fn a_lightning_site_runs_its_lightning_node_and_stops_it_cleanly() {
    let chain = TestChain::new();
    let server = EsploraServer::start(chain.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("site");
    let port = free_port();
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        format!("[settle]\n{}", settle(&server.url(), Some(port))),
    )
    .unwrap();
    let (mut daemon, log) = support::spawn(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--network",
        "ln-test",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--no-gpu",
    ]);
    let started = support::wait_line(&log, |l| l.contains("lightning node started"));
    assert!(started.contains(&format!("127.0.0.1:{port}")), "{started}");
    support::wait_line(&log, |l| {
        l.contains("node started") && !l.contains("lightning")
    });
    // Its Lightning node takes peers on the configured port.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let pid = daemon.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(daemon.0.wait().unwrap().success());

    // Stopped cleanly: the same node answers from the data dir, and nothing holds the store.
    let o = Command::new(env!("CARGO_BIN_EXE_hashgrid-node"))
        .args(["--data-dir", data.to_str().unwrap(), "ln", "--config"])
        .arg(&config)
        .args(["--json", "status"])
        .output()
        .unwrap();
    let s = json(&o);
    assert!(
        started.contains(s["node_id"].as_str().unwrap()),
        "{started} vs {s}"
    );
    assert_eq!(
        s["listen"],
        format!("{}@127.0.0.1:{port}", s["node_id"].as_str().unwrap())
    );
}
