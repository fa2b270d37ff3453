//! BTC settlement between real nodes on the in-process test chain: jobs run, receipts accrue,
//! the provider invoices a fresh address of its watch-only payout wallet, the buyer's BDK
//! wallet pays (every spend checked by libbitcoinconsensus), blocks are mined, and the invoice
//! is confirmed and settled, with balances on both sides adding up to the receipts exactly.

#![allow(clippy::unwrap_used)]

use hashgrid_node::jobs::IntoSharedInputs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashgrid_node::jobs::{JobOptions, JobState, Submission};
use hashgrid_node::settle::{ConfirmationPolicy, CreditPolicy, InvoicePolicy, InvoiceState};
use hashgrid_node::wallet::bitcoin::ScriptBuf;
use hashgrid_node::wallet::{BtcNetwork, TestChain, WalletKeys};
use hashgrid_node::{DurableEvent, NodeHandle, Onchain, PayState, SettleMode, SettlementConfig};
use hashgrid_protocol::{InvoicePayment, JobLimits, Msat, load_job_file};
use hashgrid_tests::{addr_of, start_provider_with, test_builder, wait_for_asks};

/// msat per GPU-second: high, so a few small jobs owe some thousands of sats (payments must
/// be above the dust limit).
const PRICE: u64 = 2_000_000_000;
const JOB_LIMIT: Duration = Duration::from_secs(60);

fn job() -> Submission {
    let path = hashgrid_examples::kernels_dir().join("saxpy/job.toml");
    let job = load_job_file(&path, &JobLimits::default()).unwrap();
    Submission {
        spec: job.spec,
        inputs: job.inputs.into_shared(),
        options: JobOptions::default(),
    }
}

fn onchain(
    chain: &Arc<TestChain>,
    payout: Option<String>,
    wallet: Option<WalletKeys>,
    confirmations: u32,
) -> SettlementConfig {
    SettlementConfig {
        mode: SettleMode::Onchain(Onchain {
            network: BtcNetwork::Regtest,
            chain: chain.clone(),
            payout_descriptor: payout,
            wallet,
        }),
        // Invoice whatever has accrued at every pass.
        invoice: InvoicePolicy {
            min_amount: Msat(1),
            max_age_ms: 0,
            ttl_ms: 3_600_000,
            ..InvoicePolicy::default()
        },
        confirmations: ConfirmationPolicy {
            tiers: Vec::new(),
            above: confirmations,
        },
        // Passes are driven by the test.
        interval: Duration::from_secs(3600),
        ..SettlementConfig::default()
    }
}

struct Market {
    chain: Arc<TestChain>,
    provider: NodeHandle,
    provider_cfg: SettlementConfig,
    buyer: NodeHandle,
}

fn burn() -> ScriptBuf {
    ScriptBuf::new_op_return([0u8; 4])
}

async fn market(
    confirmations: u32,
    auto_pay: bool,
    provider_dir: Option<&std::path::Path>,
) -> Market {
    hashgrid_tests::init_tracing();
    let chain = TestChain::new();
    let payout = WalletKeys::generate(BtcNetwork::Regtest)
        .unwrap()
        .public_external()
        .unwrap();
    let pcfg = onchain(&chain, Some(payout), None, confirmations);
    let provider_cfg = pcfg.clone();
    let provider = start_provider_with(&[], PRICE, 8, None, |b| {
        let b = b.settle(pcfg);
        match provider_dir {
            Some(d) => b.data_dir(d),
            None => b,
        }
    })
    .await
    .unwrap();
    let boot = [addr_of(&provider).await.unwrap()];
    let mut bcfg = onchain(
        &chain,
        None,
        Some(WalletKeys::generate(BtcNetwork::Regtest).unwrap()),
        confirmations,
    );
    bcfg.auto_pay = auto_pay;
    let buyer = test_builder(&boot).settle(bcfg).start().await.unwrap();
    // Fund the buyer: one mature 50 BTC coinbase.
    let wallet = buyer.settlement().wallet().unwrap();
    let (_, addr) = wallet.lock().unwrap().reveal_address().unwrap();
    chain.mine(1, &addr.script_pubkey());
    chain.mine(100, &burn());
    wallet.lock().unwrap().sync(&*chain).unwrap();
    assert_eq!(wallet.lock().unwrap().balance().confirmed, 5_000_000_000);
    wait_for_asks(&buyer, 1).await.unwrap();
    Market {
        chain,
        provider,
        provider_cfg,
        buyer,
    }
}

/// Runs `n` jobs; returns the sum of their charges in msat.
async fn run_jobs(m: &Market, n: usize) -> u64 {
    let mut total = 0;
    for _ in 0..n {
        let id = m.buyer.jobs().submit(job()).await.unwrap();
        let rec = tokio::time::timeout(JOB_LIMIT, m.buyer.jobs().wait(&id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
        total += rec
            .receipt
            .unwrap()
            .signed
            .decode_unverified()
            .unwrap()
            .charge
            .0;
    }
    total
}

/// A node's durable invoice and payment events so far, each acknowledged as it is read.
fn invoice_events(node: &NodeHandle) -> Vec<DurableEvent> {
    let mut out = Vec::new();
    while let Some((id, ev)) = node.durable().next().unwrap() {
        node.durable().handled(id).unwrap();
        if matches!(
            ev,
            DurableEvent::InvoiceIssued { .. }
                | DurableEvent::InvoicePaymentSeen { .. }
                | DurableEvent::InvoiceSettled { .. }
                | DurableEvent::InvoicePaymentVanished { .. }
                | DurableEvent::PaymentSent { .. }
                | DurableEvent::PaymentSettled { .. }
        ) {
            out.push(ev);
        }
    }
    out
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn issued_state(p: &NodeHandle) -> Vec<InvoiceState> {
    p.settlement()
        .invoices_issued()
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.unwrap().state)
        .collect()
}

fn buyer_state(b: &NodeHandle) -> Vec<PayState> {
    b.settlement()
        .invoices_received()
        .unwrap()
        .into_iter()
        .map(|i| i.state)
        .collect()
}

/// The invoice's on-chain terms.
fn terms(p: &NodeHandle) -> (String, u64) {
    let (out, _) = p.settlement().invoices_issued().unwrap().remove(0);
    match out.invoice.decode_unverified().unwrap().payment {
        InvoicePayment::Onchain {
            address,
            amount_sat,
        } => (address, amount_sat),
        other => panic!("not an on-chain invoice: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_invoiced_paid_confirmed_and_settled_on_chain() {
    let m = market(2, true, None).await;
    let total = run_jobs(&m, 3).await;
    assert!(total >= 1000, "the jobs owe at least a sat: {total} msat");
    let b_key = m.buyer.public_key();
    let p_key = m.provider.public_key();
    // Countersigned receipts accrued on the provider's side, owed on the buyer's.
    assert_eq!(
        m.provider.settlement().positions()[&b_key].as_buyer.accrued,
        Msat(total)
    );
    assert_eq!(
        m.buyer.settlement().positions()[&p_key].owed_to_it,
        Msat(total)
    );

    // One pass: the provider invoices (whole sats) and delivers; the buyer pays at once.
    m.provider.settlement().pass_now().await;
    let (address, amount_sat) = terms(&m.provider);
    assert_eq!(
        amount_sat,
        total / 1000,
        "invoices round down to whole sats"
    );
    assert!(
        address.starts_with("bcrt1p"),
        "a taproot payout address: {address}"
    );
    until("the buyer's payment", || {
        matches!(buyer_state(&m.buyer)[..], [PayState::Paid { .. }]).then_some(())
    })
    .await;

    // In the mempool: seen, not confirmed.
    m.provider.settlement().pass_now().await;
    assert!(matches!(
        issued_state(&m.provider)[..],
        [InvoiceState::Paid {
            confirmations: 0,
            ..
        }]
    ));
    let e = m.provider.settlement().positions()[&b_key].as_buyer;
    assert_eq!(e.paid, Msat(amount_sat * 1000));

    m.chain.mine(1, &burn());
    m.provider.settlement().pass_now().await;
    assert!(matches!(
        issued_state(&m.provider)[..],
        [InvoiceState::Paid {
            confirmations: 1,
            ..
        }]
    ));
    m.chain.mine(1, &burn());
    m.provider.settlement().pass_now().await;
    assert!(matches!(
        issued_state(&m.provider)[..],
        [InvoiceState::Settled { .. }]
    ));
    assert!(matches!(
        buyer_state(&m.buyer)[..],
        [PayState::Settled { .. }]
    ));

    // The provider's application heard it as durable events: issued, paid, settled.
    let provider_events = invoice_events(&m.provider);
    match &provider_events[..] {
        [
            DurableEvent::InvoiceIssued {
                invoice,
                buyer,
                amount,
            },
            DurableEvent::InvoicePaymentSeen {
                invoice: seen,
                paid_sat,
                confirmations: 0,
                ..
            },
            DurableEvent::InvoiceSettled { invoice: settled },
        ] => {
            assert_eq!((*buyer, *amount), (b_key, Msat(amount_sat * 1000)));
            assert_eq!((seen, settled, *paid_sat), (invoice, invoice, amount_sat));
        }
        other => panic!("{other:?}"),
    }

    // And the buyer's: paid (before the broadcast), then settled.
    let buyer_events = invoice_events(&m.buyer);
    match &buyer_events[..] {
        [
            DurableEvent::PaymentSent {
                provider,
                amount_sat: sent,
                ..
            },
            DurableEvent::PaymentSettled { .. },
        ] => assert_eq!((*provider, *sent), (p_key, amount_sat)),
        other => panic!("{other:?}"),
    }

    // Balances add up to the receipts exactly: the whole sats settled, the sub-sat remainder
    // still accrued for the next invoice.
    let e = m.provider.settlement().positions()[&b_key].as_buyer;
    assert_eq!(e.settled, Msat(amount_sat * 1000));
    assert_eq!(e.accrued, Msat(total % 1000));
    assert_eq!(e.settled.0 + e.accrued.0, total);
    assert_eq!(
        (e.invoiced, e.paid, e.confirmed),
        (Msat::ZERO, Msat::ZERO, Msat::ZERO)
    );

    // On chain: the invoice address holds exactly the amount; the buyer paid amount + fee.
    let script = m
        .buyer
        .settlement()
        .wallet()
        .unwrap()
        .lock()
        .unwrap()
        .parse_address(&address)
        .unwrap()
        .script_pubkey();
    let history = m.chain.history(&script);
    assert_eq!(history.len(), 1);
    let paid: u64 = history[0]
        .tx
        .output
        .iter()
        .filter(|o| o.script_pubkey == script)
        .map(|o| o.value.to_sat())
        .sum();
    assert_eq!(paid, amount_sat);
    let tx = &history[0].tx;
    let spent: u64 = tx
        .input
        .iter()
        .map(|i| {
            m.chain
                .transaction(&i.previous_output.txid)
                .unwrap()
                .tx
                .output[i.previous_output.vout as usize]
                .value
                .to_sat()
        })
        .sum();
    let fee = spent - tx.output.iter().map(|o| o.value.to_sat()).sum::<u64>();
    let wallet = m.buyer.settlement().wallet().unwrap();
    wallet.lock().unwrap().sync(&*m.chain).unwrap();
    let b = wallet.lock().unwrap().balance();
    assert_eq!(
        b.confirmed + b.unconfirmed,
        5_000_000_000 - amount_sat - fee
    );

    // Nothing more is invoiced until a whole sat has accrued again.
    m.provider.settlement().pass_now().await;
    assert_eq!(m.provider.settlement().invoices_issued().unwrap().len(), 1);
    // Stopped in order: the provider's executor releases its device before the process exits.
    m.provider.shutdown().await;
    m.buyer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_underpaid_invoice_stays_unpaid_until_the_rest_arrives() {
    let m = market(1, false, None).await;
    run_jobs(&m, 2).await;
    m.provider.settlement().pass_now().await;
    let (address, amount_sat) = terms(&m.provider);
    assert!(matches!(buyer_state(&m.buyer)[..], [PayState::Unpaid]));
    assert!(amount_sat >= 2, "{amount_sat}");

    let wallet = m.buyer.settlement().wallet().unwrap();
    let pay = |sat: u64| {
        let mut w = wallet.lock().unwrap();
        let to = w.parse_address(&address).unwrap();
        let tx = w.pay(&to, sat, 2).unwrap();
        m.chain.submit(&tx).unwrap();
    };
    // Paying a sat less than due, confirmed: still issued, the shortfall recorded.
    pay(amount_sat - 1);
    m.chain.mine(1, &burn());
    m.provider.settlement().pass_now().await;
    assert_eq!(issued_state(&m.provider), vec![InvoiceState::Issued]);
    let (out, _) = m.provider.settlement().invoices_issued().unwrap().remove(0);
    assert_eq!(out.seen_sat, amount_sat - 1);
    let e = m.provider.settlement().positions()[&m.buyer.public_key()].as_buyer;
    assert_eq!(e.invoiced, Msat(amount_sat * 1000));

    // The rest arrives in a second payment (more than the missing sat: an output below the
    // dust limit would not relay): the two together pay the invoice.
    pay(1_000);
    m.chain.mine(1, &burn());
    m.provider.settlement().pass_now().await;
    assert!(
        matches!(
            issued_state(&m.provider)[..],
            [InvoiceState::Settled { .. }]
        ),
        "{:?}",
        issued_state(&m.provider)
    );
    m.provider.shutdown().await;
    m.buyer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_that_removes_the_payment_reopens_the_invoice() {
    let m = market(3, true, None).await;
    run_jobs(&m, 2).await;
    m.provider.settlement().pass_now().await;
    until("the buyer's payment", || {
        matches!(buyer_state(&m.buyer)[..], [PayState::Paid { .. }]).then_some(())
    })
    .await;
    let payment = m.chain.mempool().remove(0).compute_txid();
    m.chain.mine(2, &burn());
    m.provider.settlement().pass_now().await;
    assert!(matches!(
        issued_state(&m.provider)[..],
        [InvoiceState::Paid {
            confirmations: 2,
            ..
        }]
    ));
    // A three-block reorganisation by a miner that never saw the payment.
    m.chain.reorg(2, &[payment], &[], &burn()).unwrap();
    assert!(m.chain.transaction(&payment).is_none());
    m.provider.settlement().pass_now().await;
    assert_eq!(issued_state(&m.provider), vec![InvoiceState::Issued]);
    let events = invoice_events(&m.provider);
    assert!(
        matches!(
            events.last(),
            Some(DurableEvent::InvoicePaymentVanished { .. })
        ),
        "{events:?}"
    );
    let e = m.provider.settlement().positions()[&m.buyer.public_key()].as_buyer;
    assert_eq!(e.paid, Msat::ZERO);
    assert!(e.invoiced > Msat::ZERO);
    m.provider.shutdown().await;
    m.buyer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_over_its_credit_limit_is_rejected() {
    hashgrid_tests::init_tracing();
    // Ledger mode: the buyer may owe at most 1 msat, net of what the provider owes it.
    let cfg = SettlementConfig {
        credit: CreditPolicy {
            limit: Msat(1),
            max_unpaid_age_ms: 3_600_000,
        },
        ..SettlementConfig::default()
    };
    let provider = start_provider_with(&[], PRICE, 8, None, |b| b.settle(cfg))
        .await
        .unwrap();
    let boot = [addr_of(&provider).await.unwrap()];
    let buyer = test_builder(&boot).start().await.unwrap();
    wait_for_asks(&buyer, 1).await.unwrap();
    // The first job is within credit (nothing owed yet).
    let id = buyer.jobs().submit(job()).await.unwrap();
    let rec = tokio::time::timeout(JOB_LIMIT, buyer.jobs().wait(&id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, JobState::Done);
    // Now it owes more than the limit: the next proposal is rejected for credit.
    let id = buyer.jobs().submit(job()).await.unwrap();
    let rec = tokio::time::timeout(JOB_LIMIT, buyer.jobs().wait(&id))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(rec.state, JobState::Failed { .. }),
        "{:?}",
        rec.state
    );
    let why: Vec<&str> = rec.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert!(
        why.iter().any(|o| o.contains("credit limit")),
        "attempts: {why:?}"
    );
    provider.shutdown().await;
    buyer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_settlement_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = market(1, true, Some(dir.path())).await;
    let total = run_jobs(&m, 2).await;
    m.provider.settlement().pass_now().await;
    until("the buyer's payment", || {
        matches!(buyer_state(&m.buyer)[..], [PayState::Paid { .. }]).then_some(())
    })
    .await;
    m.provider.settlement().pass_now().await;
    let b_key = m.buyer.public_key();
    let before = m.provider.settlement().positions()[&b_key];
    let issued_before = m.provider.settlement().invoices_issued().unwrap();
    assert!(matches!(
        issued_state(&m.provider)[..],
        [InvoiceState::Paid { .. }]
    ));

    // Stop the provider mid-settlement (paid, unconfirmed) and start it again on its data dir.
    m.provider.shutdown().await;
    let pcfg = m.provider_cfg.clone();
    let restarted =
        start_provider_with(&[], PRICE, 8, None, |b| b.settle(pcfg).data_dir(dir.path()))
            .await
            .unwrap();
    m.buyer
        .peers()
        .dial(addr_of(&restarted).await.unwrap())
        .await
        .unwrap();
    assert_eq!(restarted.settlement().positions()[&b_key], before);
    assert_eq!(
        restarted.settlement().invoices_issued().unwrap(),
        issued_before
    );

    m.chain.mine(1, &burn());
    restarted.settlement().pass_now().await;
    assert!(matches!(
        issued_state(&restarted)[..],
        [InvoiceState::Settled { .. }]
    ));
    assert!(matches!(
        buyer_state(&m.buyer)[..],
        [PayState::Settled { .. }]
    ));
    let e = restarted.settlement().positions()[&b_key].as_buyer;
    assert_eq!(e.settled.0 + e.accrued.0, total);
    restarted.shutdown().await;
    m.buyer.shutdown().await;
}
