//! A Lightning node in its own process, for the crash tests in `tests/tests/lightning.rs`, which
//! SIGKILL it at chosen points and restart its directory in the test.
//!
//! - `ln-proc pay DIR ESPLORA_URL INVOICE AMOUNT_MSAT DESCRIPTION_HASH_HEX`: a buyer. Starts the
//!   embedded node from `DIR`, waits for a usable channel, pays one invoice after the buyer's
//!   checks, and reports each step on stdout (`PAYING <hash>`, then `PAID <preimage>`). With
//!   `LN_PROC_HOLD` set it stops after printing `PAID` and before acknowledging the event.
//! - `ln-proc receive DIR ESPLORA_URL PORT AMOUNT_MSAT DESCRIPTION_HASH_HEX`: a site. Starts the
//!   node from `DIR` listening on `PORT`, prints `INVOICE <request>` for the amount, and runs
//!   until killed. It never acknowledges an event: a payment it received is reported to
//!   whoever opens `DIR` next.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_lightning::bitcoin::Network;
use hashgrid_lightning::{
    Expected, LdkBackend, LdkConfig, LightningBackend, LnChain, LnEvent, invoice,
};
use hashgrid_protocol::Msat;

fn out(line: String) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn start(dir: &str, url: &str, port: Option<u16>) -> anyhow::Result<LdkBackend> {
    Ok(LdkBackend::start(&LdkConfig {
        dir: dir.into(),
        network: Network::Regtest,
        chain: LnChain::Esplora(url.to_string()),
        listen: port.map(|p| ([127, 0, 0, 1], p).into()),
        background_sync: None,
    })?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, [dir, url, target, amount, dh])) = args
        .split_first()
        .and_then(|(m, rest)| Some((m.as_str(), <&[String; 5]>::try_from(rest).ok()?)))
    else {
        bail!(
            "usage: ln-proc pay DIR ESPLORA_URL INVOICE AMOUNT_MSAT DESCRIPTION_HASH_HEX\n       \
             ln-proc receive DIR ESPLORA_URL PORT AMOUNT_MSAT DESCRIPTION_HASH_HEX"
        );
    };
    let mut description_hash = [0u8; 32];
    hex::decode_to_slice(dh, &mut description_hash).context("description hash")?;
    let amount = Msat(amount.parse().context("amount")?);
    match mode {
        "pay" => pay(dir, url, target, amount, description_hash),
        "receive" => {
            let node = start(dir, url, Some(target.parse().context("port")?))?;
            let inv = node.invoice(amount, description_hash, Duration::from_secs(3600))?;
            out(format!("INVOICE {inv}"));
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        other => bail!("unknown mode {other:?} (pay or receive)"),
    }
}

fn pay(
    dir: &str,
    url: &str,
    request: &str,
    amount: Msat,
    description_hash: [u8; 32],
) -> anyhow::Result<()> {
    let expected = Expected {
        network: Network::Regtest,
        amount,
        description_hash,
    };
    let inv = invoice::parse(request)?;
    let node = start(dir, url, None)?;
    let t = Instant::now();
    while !node.channels().iter().any(|c| c.usable) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("no usable channel after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let hash = node.pay(&inv, &expected)?;
    out(format!("PAYING {hash}"));
    loop {
        match node.next_event() {
            Some(LnEvent::Sent { preimage, .. }) => {
                // Reported before it is acknowledged: a kill here must not lose the proof.
                out(format!("PAID {preimage}"));
                if std::env::var_os("LN_PROC_HOLD").is_some() {
                    std::thread::sleep(Duration::from_secs(3600));
                }
                node.event_handled()?;
                break;
            }
            Some(LnEvent::SendFailed { reason, .. }) => bail!("payment failed: {reason}"),
            Some(_) => node.event_handled()?,
            None => std::thread::sleep(Duration::from_millis(10)),
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("no payment outcome after 60 s");
        }
    }
    node.stop()?;
    Ok(())
}
