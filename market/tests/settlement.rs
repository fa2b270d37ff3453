//! Provider-side settlement bookkeeping: invoicing policy, payment states, credit limits, and
//! the invariant that every msat of every receipt is accounted for exactly once.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use hashgrid_market::settlement::*;
use hashgrid_protocol::{ContentId, Keypair, Msat, PublicKey, Timestamp};
use proptest::prelude::*;

fn buyer(n: u8) -> PublicKey {
    Keypair::from_secret_bytes([n; 32]).public()
}

fn rid(n: u64) -> ContentId {
    ContentId::of(&n.to_le_bytes())
}

fn inv_id(n: u64) -> ContentId {
    ContentId::of(format!("invoice {n}").as_bytes())
}

const T0: Timestamp = Timestamp(1_000_000);

fn policy(min_msat: u64) -> InvoicePolicy {
    InvoicePolicy {
        min_amount: Msat(min_msat),
        max_age_ms: 60_000,
        ttl_ms: 10_000,
        unit: SAT_MSAT,
    }
}

#[test]
fn invoices_bill_whole_sats_and_carry_the_remainder() {
    let mut l = ProviderLedger::new();
    let b = buyer(1);
    l.accrue(rid(1), b, Msat(1_500), T0).unwrap();
    assert!(l.due(T0, &policy(4_000)).is_empty(), "below the minimum");
    l.accrue(rid(2), b, Msat(2_700), T0).unwrap();
    let due = l.due(T0, &policy(4_000));
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].amount, Msat(4_000), "floor to whole sats");
    assert_eq!(due[0].receipts, vec![rid(1), rid(2)]);
    l.issue(inv_id(1), &due[0], T0, &policy(4_000)).unwrap();
    let e = l.earnings(&b);
    assert_eq!(e.accrued, Msat(200), "the sub-sat remainder stays accrued");
    assert_eq!(e.invoiced, Msat(4_000));
    assert_eq!(e.total(), Some(Msat(4_200)));
    assert_eq!(l.invoice(&inv_id(1)).unwrap().amount_sat(), 4);
    // Each receipt counts once.
    assert_eq!(
        l.accrue(rid(1), b, Msat(1), T0),
        Err(SettleError::DuplicateReceipt(rid(1)))
    );
}

#[test]
fn lightning_bills_a_batch_of_sub_sat_charges_to_the_msat() {
    let ln = InvoicePolicy {
        unit: Msat(1),
        ..policy(2_000)
    };
    let mut l = ProviderLedger::new();
    let mut onchain = ProviderLedger::new();
    let b = buyer(1);
    for n in 1..=6 {
        l.accrue(rid(n), b, Msat(333), T0).unwrap();
        onchain.accrue(rid(n), b, Msat(333), T0).unwrap();
    }
    assert!(
        l.due(T0, &ln).is_empty(),
        "1998 msat is below the 2000 msat batch"
    );
    l.accrue(rid(7), b, Msat(333), T0).unwrap();
    onchain.accrue(rid(7), b, Msat(333), T0).unwrap();
    let due = l.due(T0, &ln);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].amount, Msat(2_331), "the exact sum, no rounding");
    assert_eq!(due[0].receipts.len(), 7, "one payment for the whole batch");
    l.issue(inv_id(1), &due[0], T0, &ln).unwrap();
    let e = l.earnings(&b);
    assert_eq!((e.accrued, e.invoiced), (Msat::ZERO, Msat(2_331)));
    // The same receipts on chain: whole sats, the remainder waits.
    let due = onchain.due(T0, &policy(2_000));
    assert_eq!(due[0].amount, Msat(2_000));
    onchain
        .issue(inv_id(1), &due[0], T0, &policy(2_000))
        .unwrap();
    assert_eq!(onchain.earnings(&b).accrued, Msat(331));
}

#[test]
fn small_balances_are_invoiced_by_age() {
    let mut l = ProviderLedger::new();
    let b = buyer(1);
    l.accrue(rid(1), b, Msat(1_999), T0).unwrap();
    assert!(l.due(T0.plus_ms(59_999), &policy(1_000_000)).is_empty());
    let due = l.due(T0.plus_ms(60_000), &policy(1_000_000));
    assert_eq!(due[0].amount, Msat(1_000));
    // Less than one sat owed: nothing to invoice however old.
    let mut l = ProviderLedger::new();
    l.accrue(rid(1), b, Msat(999), T0).unwrap();
    assert!(l.due(T0.plus_ms(10_000_000), &policy(1)).is_empty());
}

#[test]
fn payment_lifecycle_with_underpayment_confirmations_and_reorg() {
    let conf = ConfirmationPolicy::default();
    let mut l = ProviderLedger::new();
    let b = buyer(1);
    l.accrue(rid(1), b, Msat(150_000_000), T0).unwrap(); // 150,000 sat: needs 3 confirmations
    let d = l.due(T0, &policy(1)).remove(0);
    l.issue(inv_id(1), &d, T0, &policy(1)).unwrap();

    // Underpaid by one sat: refused, still issued.
    let e = l
        .payment_seen(inv_id(1), "aa:0".into(), 149_999, 0, &conf)
        .unwrap_err();
    assert_eq!(
        e,
        SettleError::Underpaid {
            id: inv_id(1),
            paid_sat: 149_999,
            amount_sat: 150_000
        }
    );
    assert_eq!(l.invoice(&inv_id(1)).unwrap().state, InvoiceState::Issued);

    let s = l
        .payment_seen(inv_id(1), "bb:1".into(), 150_000, 0, &conf)
        .unwrap();
    assert!(matches!(
        s,
        InvoiceState::Paid {
            confirmations: 0,
            ..
        }
    ));
    assert_eq!(l.earnings(&b).paid, Msat(150_000_000));
    let s = l.confirmations(inv_id(1), 2, &conf).unwrap();
    assert!(matches!(
        s,
        InvoiceState::Paid {
            confirmations: 2,
            ..
        }
    ));
    let s = l.confirmations(inv_id(1), 3, &conf).unwrap();
    assert_eq!(
        s,
        &InvoiceState::Confirmed {
            outpoint: "bb:1".into()
        }
    );

    // A reorg that leaves the payment in a shallower block: confirmed → paid, then confirmed
    // again once it is deep enough.
    let s = l.confirmations(inv_id(1), 1, &conf).unwrap();
    assert!(matches!(
        s,
        InvoiceState::Paid {
            confirmations: 1,
            ..
        }
    ));
    assert_eq!(l.earnings(&b).paid, Msat(150_000_000));
    let s = l.confirmations(inv_id(1), 3, &conf).unwrap();
    assert!(matches!(s, InvoiceState::Confirmed { .. }));

    // A reorg removes the payment: back to issued, payable again.
    l.payment_vanished(inv_id(1)).unwrap();
    assert_eq!(l.invoice(&inv_id(1)).unwrap().state, InvoiceState::Issued);
    assert_eq!(l.earnings(&b).invoiced, Msat(150_000_000));
    assert_eq!(l.earnings(&b).confirmed, Msat::ZERO);

    l.payment_seen(inv_id(1), "cc:0".into(), 150_000, 6, &conf)
        .unwrap();
    l.settle(inv_id(1)).unwrap();
    let e = l.earnings(&b);
    assert_eq!(e.settled, Msat(150_000_000));
    assert_eq!(e.total(), Some(Msat(150_000_000)));
    assert!(matches!(
        l.settle(inv_id(1)),
        Err(SettleError::BadTransition {
            state: "settled",
            ..
        })
    ));
    assert!(matches!(
        l.settle(inv_id(9)),
        Err(SettleError::UnknownInvoice(_))
    ));
}

#[test]
fn confirmation_policy_tiers() {
    let p = ConfirmationPolicy::default();
    assert_eq!(p.required(1), 1);
    assert_eq!(p.required(100_000), 1);
    assert_eq!(p.required(100_001), 3);
    assert_eq!(p.required(1_000_000), 3);
    assert_eq!(p.required(1_000_001), 6);
    assert_eq!(p.required(u64::MAX), 6);
}

#[test]
fn expired_invoices_return_to_accrued_and_late_payments_count() {
    let conf = ConfirmationPolicy::default();
    let mut l = ProviderLedger::new();
    let b = buyer(1);
    l.accrue(rid(1), b, Msat(5_000), T0).unwrap();
    let d = l.due(T0, &policy(1)).remove(0);
    l.issue(inv_id(1), &d, T0, &policy(1)).unwrap();
    assert!(l.expire(T0.plus_ms(9_999)).is_empty());
    assert_eq!(l.expire(T0.plus_ms(10_000)), vec![inv_id(1)]);
    assert_eq!(l.earnings(&b).accrued, Msat(5_000));
    assert_eq!(l.earnings(&b).total(), Some(Msat(5_000)));
    // A late payment for the expired invoice still counts, and is not billed again.
    l.payment_seen(inv_id(1), "dd:0".into(), 5, 1, &conf)
        .unwrap();
    let e = l.earnings(&b);
    assert_eq!((e.accrued, e.confirmed), (Msat::ZERO, Msat(5_000)));
    assert!(l.due(T0.plus_ms(1_000_000), &policy(1)).is_empty());
}

#[test]
fn a_late_payment_after_rebilling_is_not_double_counted() {
    let conf = ConfirmationPolicy::default();
    let mut l = ProviderLedger::new();
    let b = buyer(1);
    l.accrue(rid(1), b, Msat(5_000), T0).unwrap();
    let d = l.due(T0, &policy(1)).remove(0);
    l.issue(inv_id(1), &d, T0, &policy(1)).unwrap();
    l.expire(T0.plus_ms(10_000));
    let d = l.due(T0.plus_ms(10_000), &policy(1)).remove(0);
    assert_eq!(d.receipts, vec![rid(1)]);
    l.issue(inv_id(2), &d, T0.plus_ms(10_000), &policy(1))
        .unwrap();
    let e = l
        .payment_seen(inv_id(1), "ee:0".into(), 5, 1, &conf)
        .unwrap_err();
    assert!(matches!(e, SettleError::BadTransition { .. }), "{e}");
    assert_eq!(l.earnings(&b).total(), Some(Msat(5_000)));
}

#[test]
fn credit_limits_stop_new_agreements() {
    let credit = CreditPolicy {
        limit: Msat(10_000),
        max_unpaid_age_ms: 5_000,
    };
    let mut l = ProviderLedger::new();
    let b = buyer(1);
    assert!(l.check_credit(&b, T0, &credit).is_ok());
    l.accrue(rid(1), b, Msat(10_000), T0).unwrap();
    assert!(
        l.check_credit(&b, T0, &credit).is_ok(),
        "at the limit is fine"
    );
    l.accrue(rid(2), b, Msat(1), T0).unwrap();
    assert_eq!(
        l.check_credit(&b, T0, &credit),
        Err(CreditDenied::OverLimit {
            owed: Msat(10_001),
            limit: Msat(10_000)
        })
    );
    // Other buyers are unaffected.
    assert!(l.check_credit(&buyer(2), T0, &credit).is_ok());

    // An invoice unpaid for too long blocks the buyer even under the limit.
    let mut l = ProviderLedger::new();
    l.accrue(rid(1), b, Msat(2_000), T0).unwrap();
    let d = l.due(T0, &policy(1)).remove(0);
    l.issue(inv_id(1), &d, T0, &policy(1)).unwrap();
    assert!(l.check_credit(&b, T0.plus_ms(5_000), &credit).is_ok());
    assert!(matches!(
        l.check_credit(&b, T0.plus_ms(5_001), &credit),
        Err(CreditDenied::Overdue { .. })
    ));
    // Paying it lifts the block.
    l.payment_seen(
        inv_id(1),
        "ff:0".into(),
        2,
        1,
        &ConfirmationPolicy::default(),
    )
    .unwrap();
    assert!(l.check_credit(&b, T0.plus_ms(5_001), &credit).is_ok());
}

#[derive(Debug, Clone)]
enum Op {
    Accrue(u8, u64),
    Invoice(u64),
    Pay(usize, bool, u32),
    Confirm(usize, u32),
    Vanish(usize),
    Settle(usize),
    Expire(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u64..5_000_000).prop_map(|(b, m)| Op::Accrue(b, m)),
        2 => (0u64..100_000).prop_map(Op::Invoice),
        2 => (0usize..8, any::<bool>(), 0u32..8).prop_map(|(i, full, c)| Op::Pay(i, full, c)),
        1 => (0usize..8, 0u32..8).prop_map(|(i, c)| Op::Confirm(i, c)),
        1 => (0usize..8).prop_map(Op::Vanish),
        1 => (0usize..8).prop_map(Op::Settle),
        1 => (0u64..20_000).prop_map(Op::Expire),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever happens, each buyer's totals add up to its receipts exactly, in msat; no
    /// on-chain invoice bills a fraction of a sat, and a Lightning invoice bills exactly what
    /// has accrued.
    #[test]
    fn every_msat_is_accounted_for(
        ops in proptest::collection::vec(op(), 1..60),
        unit in prop_oneof![Just(1u64), Just(1000u64)],
    ) {
        let conf = ConfirmationPolicy::default();
        let pol = InvoicePolicy { unit: Msat(unit), ..policy(3_000_000) };
        let mut l = ProviderLedger::new();
        let mut receipts = [0u64; 3];
        let mut now = T0;
        let mut next = 0u64;
        let mut issued: Vec<ContentId> = Vec::new();
        for op in ops {
            match op {
                Op::Accrue(b, m) => {
                    next += 1;
                    l.accrue(rid(next), buyer(b), Msat(m), now).unwrap();
                    receipts[b as usize] += m;
                }
                Op::Invoice(dt) => {
                    now = now.plus_ms(dt);
                    for d in l.due(now, &pol) {
                        prop_assert_eq!(d.amount.0 % unit, 0);
                        if unit == 1 {
                            prop_assert_eq!(d.amount, l.earnings(&d.buyer).accrued, "billed to the msat");
                        }
                        next += 1;
                        l.issue(inv_id(next), &d, now, &pol).unwrap();
                        issued.push(inv_id(next));
                    }
                }
                Op::Pay(i, full, c) => if let Some(id) = issued.get(i) {
                    let amt = l.invoice(id).unwrap().amount_sat();
                    let paid = if full { amt } else { amt.saturating_sub(1) };
                    let _ = l.payment_seen(*id, format!("{i}:0"), paid, c, &conf);
                },
                Op::Confirm(i, c) => if let Some(id) = issued.get(i) {
                    let _ = l.confirmations(*id, c, &conf);
                },
                Op::Vanish(i) => if let Some(id) = issued.get(i) { let _ = l.payment_vanished(*id); },
                Op::Settle(i) => if let Some(id) = issued.get(i) { let _ = l.settle(*id); },
                Op::Expire(dt) => { now = now.plus_ms(dt); l.expire(now); }
            }
            for (b, total) in receipts.iter().enumerate() {
                prop_assert_eq!(l.earnings(&buyer(b as u8)).total(), Some(Msat(*total)));
            }
        }
    }
}
