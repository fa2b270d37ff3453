//! `hashgrid wallet address|balance|send` and `hashgrid invoices`: the buyer's Bitcoin wallet
//! (keys in `<data-dir>/wallet.json`, mode 0600; state in the store) and the invoices
//! providers sent it.

use hashgrid_node::settle::{PayState, SettleSection, received_from_store};
use hashgrid_node::store::Store;
use hashgrid_node::wallet::{Wallet, WalletKeys, bip21};
use hashgrid_protocol::InvoicePayment;

use crate::client::{Client, ONCHAIN_HINT};
use crate::{CliError, Global};

fn wallet_err(e: impl std::fmt::Display) -> CliError {
    CliError::other(
        e.to_string(),
        "check the [settle] section and the chain backend",
    )
}

/// Loads (or creates) the keys and opens the wallet in the store.
pub(crate) fn open(c: &Client) -> Result<(Wallet, SettleSection), CliError> {
    let s = c.settle_section()?;
    let network = s
        .btc_network()
        .map_err(|e| CliError::bad_input(e.to_string(), ONCHAIN_HINT))?;
    let keys = WalletKeys::load_or_create(&c.dir.root().join("wallet.json"), network)
        .map_err(|e| CliError::bad_input(e.to_string(), "fix or move the wallet file"))?;
    let store = Store::open(&c.dir.root().join("store")).map_err(|e| {
        CliError::other(
            e.to_string(),
            "close the other hashgrid process using this data dir",
        )
    })?;
    let tree = store.wallet_tree("buyer").map_err(wallet_err)?;
    let w =
        Wallet::open(tree, &keys.external, Some(&keys.internal), network).map_err(wallet_err)?;
    Ok((w, s))
}

/// `hashgrid ln …`: the buyer's Lightning node, started from the data dir for the command.
pub(crate) fn ln(g: &Global, cmd: &hashgrid_node::settle::LnCommand) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let section = c.config.settle.clone().unwrap_or_default();
    let v = hashgrid_node::settle::ln_command(&section, c.dir.root(), cmd).map_err(|e| {
        CliError::bad_input(
            e.to_string(),
            "set [settle] mode = \"lightning\", bitcoin and esplora in the config file",
        )
    })?;
    if g.json {
        println!("{v}");
    } else {
        print!("{}", hashgrid_node::settle::ln_render(cmd, &v));
    }
    Ok(())
}

pub(crate) fn address(g: &Global) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let (mut w, _) = open(&c)?;
    let (index, addr) = w.reveal_address().map_err(wallet_err)?;
    if g.json {
        println!(
            "{}",
            serde_json::json!({"address": addr.to_string(), "index": index, "network": w.network().to_string()})
        );
    } else {
        println!("{addr}");
        eprintln!(
            "({} address #{index}; send BTC here to pay for jobs)",
            w.network()
        );
    }
    Ok(())
}

pub(crate) fn balance(g: &Global) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let (mut w, s) = open(&c)?;
    let chain = s
        .chain_config()
        .and_then(|cc| cc.open().map_err(Into::into))
        .map_err(|e| CliError::bad_input(e.to_string(), ONCHAIN_HINT))?;
    w.sync(&*chain).map_err(|e| {
        CliError::other(
            e.to_string(),
            "is the chain backend reachable? (esplora / bitcoind_url)",
        )
    })?;
    let b = w.balance();
    if g.json {
        println!(
            "{}",
            serde_json::json!({"confirmed_sat": b.confirmed, "unconfirmed_sat": b.unconfirmed, "immature_sat": b.immature, "height": w.tip_height()})
        );
    } else {
        println!("confirmed:   {} sat", b.confirmed);
        println!("unconfirmed: {} sat", b.unconfirmed);
        if b.immature > 0 {
            println!("immature:    {} sat", b.immature);
        }
        println!("(at height {}, via {})", w.tip_height(), chain.describe());
    }
    Ok(())
}

pub(crate) fn send(
    g: &Global,
    to: &str,
    amount_sat: u64,
    fee_rate: Option<u64>,
) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let (mut w, s) = open(&c)?;
    let to = w.parse_address(to).map_err(|e| {
        CliError::bad_input(e.to_string(), "pass an address of the wallet's network")
    })?;
    let chain = s
        .chain_config()
        .and_then(|cc| cc.open().map_err(Into::into))
        .map_err(|e| CliError::bad_input(e.to_string(), ONCHAIN_HINT))?;
    w.sync(&*chain).map_err(wallet_err)?;
    let fee = fee_rate.or(s.fee_rate_sat_vb).unwrap_or(2);
    let tx = w.pay(&to, amount_sat, fee).map_err(|e| {
        CliError::other(
            e.to_string(),
            "fund the wallet (hashgrid wallet address) or send less",
        )
    })?;
    chain.broadcast(&tx).map_err(wallet_err)?;
    let txid = tx.compute_txid();
    if g.json {
        println!(
            "{}",
            serde_json::json!({"txid": txid.to_string(), "amount_sat": amount_sat})
        );
    } else {
        println!("{txid}");
    }
    Ok(())
}

pub(crate) fn invoices(g: &Global, unpaid: bool) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let store = Store::open(&c.dir.root().join("store")).map_err(|e| {
        CliError::other(
            e.to_string(),
            "close the other hashgrid process using this data dir",
        )
    })?;
    let all = received_from_store(&store).map_err(wallet_err)?;
    let mut rows = Vec::new();
    for inv in all {
        if unpaid && !inv.state.is_unpaid() {
            continue;
        }
        let Some(b) = inv.body() else { continue };
        let id = inv.invoice.id();
        let (address, sat) = match &b.payment {
            InvoicePayment::Onchain {
                address,
                amount_sat,
            } => (address.clone(), *amount_sat),
            InvoicePayment::Ledger => ("ledger".to_string(), b.amount.0 / 1000),
            InvoicePayment::Lightning { request } => (request.clone(), b.amount.0 / 1000),
        };
        let lightning = matches!(b.payment, InvoicePayment::Lightning { .. });
        let detail = match &inv.state {
            PayState::Refused(r) => r.clone(),
            PayState::Paying { txid, .. } => txid.clone(),
            PayState::Paid { outpoint } | PayState::Settled { outpoint } => outpoint.clone(),
            PayState::LnPaying { hash } => format!("lightning {hash}"),
            PayState::LnPaid { preimage, .. } | PayState::LnSettled { preimage, .. } => {
                format!("preimage {preimage}")
            }
            _ => String::new(),
        };
        rows.push(serde_json::json!({
            "invoice": id.to_string(),
            "provider": b.provider.to_string(),
            "amount_sat": sat,
            "amount_msat": b.amount.0,
            "receipts": b.receipts.len(),
            "state": inv.state.name(),
            "detail": detail,
            "address": address,
            "uri": if lightning {
                format!("lightning:{address}")
            } else {
                bip21(&address, sat, &format!("hashgrid invoice {}", id.short()))
            },
            "expires_at_ms": b.expires_at.0,
        }));
    }
    if g.json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "{}",
            if unpaid {
                "no unpaid invoices"
            } else {
                "no invoices yet"
            }
        );
        return Ok(());
    }
    println!(
        "{:<14} {:<10} {:>12} {:<9} DETAIL",
        "INVOICE", "PROVIDER", "SAT", "STATE"
    );
    for r in &rows {
        println!(
            "{:<14} {:<10} {:>12} {:<9} {}",
            &r["invoice"].as_str().unwrap_or("")[..12],
            &r["provider"].as_str().unwrap_or("")
                [..8.min(r["provider"].as_str().unwrap_or("").len())],
            r["amount_sat"],
            r["state"].as_str().unwrap_or(""),
            r["detail"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
