//! A buyer's Lightning node in its own process, for the crash test in `tests/tests/lightning.rs`:
//! starts the embedded node from `DIR`, waits for a usable channel, pays one invoice after the
//! buyer's checks, and reports each step on stdout (`PAYING <hash>`, then `PAID <preimage>`),
//! so the test can SIGKILL it between the two.
//!
//! With `LN_PAYER_HOLD` set it stops after printing `PAID` and before acknowledging the event.
//!
//! Usage: `ln-payer DIR ESPLORA_URL INVOICE AMOUNT_MSAT DESCRIPTION_HASH_HEX`

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_lightning::bitcoin::Network;
use hashgrid_lightning::{Expected, LdkBackend, LdkConfig, LightningBackend, LnEvent, invoice};
use hashgrid_protocol::Msat;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, url, request, amount, dh] = args.as_slice() else {
        bail!("usage: ln-payer DIR ESPLORA_URL INVOICE AMOUNT_MSAT DESCRIPTION_HASH_HEX");
    };
    let mut description_hash = [0u8; 32];
    hex::decode_to_slice(dh, &mut description_hash).context("description hash")?;
    let expected = Expected {
        network: Network::Regtest,
        amount: Msat(amount.parse().context("amount")?),
        description_hash,
    };
    let inv = invoice::parse(request)?;
    let node = LdkBackend::start(&LdkConfig {
        dir: dir.into(),
        network: Network::Regtest,
        esplora_url: url.clone(),
        listen: None,
        background_sync: None,
    })?;
    let out = |line: String| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    };
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
                if std::env::var_os("LN_PAYER_HOLD").is_some() {
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
