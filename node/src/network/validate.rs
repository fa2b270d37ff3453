//! Application-level validation of every gossip message, in this order: topic, decode with
//! the size limit, signature for this network, structure and signer, lifetime against now,
//! per-author rate, then sequence (replay). The verdict is reported back to gossipsub.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hashgrid_protocol::validate::ValidationError;
use hashgrid_protocol::{
    GossipError, GossipMessage, Network, OrderRef, PublicKey, ReplayGuard, Timestamp,
    VerifiedGossip,
};

use super::EXPIRED_GRACE_MS;

/// Most `(author, order id)` and provider sequence numbers remembered for replay detection.
/// Beyond this the oldest half is forgotten (the book's replace-by-sequence still refuses
/// stale copies of live orders).
pub const REPLAY_GUARD_CAPACITY: usize = 200_000;

/// Messages one author may have accepted in a burst. A site re-announces its capacity ad and
/// a few dozen asks together; 200 leaves room for large sites.
pub const RATE_BURST: f64 = 200.0;

/// Sustained messages per second one author may have accepted. Re-announcements are minutes
/// apart; 20/s is far above honest use and caps what a flooding author costs every node.
pub const RATE_PER_SEC: f64 = 20.0;

/// Most authors tracked by the rate limiter; full (idle) buckets are dropped beyond this.
pub const MAX_RATE_AUTHORS: usize = 50_000;

/// Which topic a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// `capacity`.
    Capacity,
    /// `orders`.
    Orders,
    /// Any other topic.
    Unknown,
}

/// The validation verdict.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Valid: fold it into the book and forward it.
    Accept(Box<(GossipMessage, VerifiedGossip)>),
    /// Harmless but not useful (duplicate, just expired, author over its rate): drop it
    /// without penalty.
    Ignore(String),
    /// Invalid: drop it and penalise the peer that sent it.
    Reject(String),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The per-node validator state (replay guards and rate buckets).
pub(crate) struct Validator {
    network: Network,
    orders: ReplayGuard<OrderRef>,
    capacity: ReplayGuard<PublicKey>,
    buckets: HashMap<PublicKey, Bucket>,
}

fn order_key(v: &VerifiedGossip) -> Option<(OrderRef, u64)> {
    match v {
        VerifiedGossip::Ask(a) => Some((a.order_ref(), a.seq)),
        VerifiedGossip::Bid(b) => Some((b.order_ref(), b.seq)),
        VerifiedGossip::Cancel(c) => Some((
            OrderRef {
                owner: c.owner,
                order_id: c.order_id,
            },
            c.seq,
        )),
        VerifiedGossip::Capacity(_) | VerifiedGossip::Evidence(_) => None,
    }
}

impl Validator {
    pub(crate) fn new(network: Network) -> Validator {
        Validator {
            network,
            orders: ReplayGuard::new(REPLAY_GUARD_CAPACITY),
            capacity: ReplayGuard::new(REPLAY_GUARD_CAPACITY),
            buckets: HashMap::new(),
        }
    }

    /// Validates raw gossip bytes that arrived on `topic`. `rate_limit` is false for messages
    /// from a sync response (a whole book arrives at once).
    pub(crate) fn check_bytes(
        &mut self,
        topic: TopicKind,
        data: &[u8],
        now: Timestamp,
        rate_limit: bool,
    ) -> Verdict {
        let msg = match GossipMessage::decode(data) {
            Ok(m) => m,
            Err(e) => return Verdict::Reject(format!("undecodable: {e}")),
        };
        let expected = match &msg {
            GossipMessage::Capacity(_) => TopicKind::Capacity,
            _ => TopicKind::Orders,
        };
        if topic != expected {
            return Verdict::Reject(format!("{expected:?} message on the {topic:?} topic"));
        }
        self.check_message(msg, now, rate_limit)
    }

    /// Validates a decoded message (gossip or sync).
    pub(crate) fn check_message(
        &mut self,
        msg: GossipMessage,
        now: Timestamp,
        rate_limit: bool,
    ) -> Verdict {
        let verified = match msg.verify(&self.network, now) {
            Ok(v) => v,
            Err(GossipError::Time {
                kind,
                source: ValidationError::Expired { expires_at, now },
            }) if now.since(expires_at) < EXPIRED_GRACE_MS => {
                return Verdict::Ignore(format!(
                    "{kind}: expired {} ms ago",
                    now.since(expires_at)
                ));
            }
            Err(e) => return Verdict::Reject(e.to_string()),
        };
        if rate_limit && !self.take_token(msg.signer(), Instant::now()) {
            return Verdict::Ignore(format!(
                "author {} is over its rate limit of {RATE_PER_SEC}/s",
                msg.signer().short()
            ));
        }
        let seq_check = match order_key(&verified) {
            Some((key, seq)) => self.orders.check_and_record(key, seq),
            None => match &verified {
                VerifiedGossip::Capacity(ad) => self.capacity.check_and_record(ad.provider, ad.seq),
                _ => Ok(()),
            },
        };
        match seq_check {
            Ok(()) => Verdict::Accept(Box::new((msg, verified))),
            Err(ValidationError::Replayed { seq, latest }) if seq == latest => {
                Verdict::Ignore(format!("duplicate of sequence {seq}"))
            }
            Err(e) => Verdict::Reject(format!("replay: {e}")),
        }
    }

    /// Records a message this node itself signed, so copies of it coming back are duplicates.
    pub(crate) fn record_own(&mut self, verified: &VerifiedGossip) {
        let _ = match order_key(verified) {
            Some((key, seq)) => self.orders.check_and_record(key, seq),
            None => match verified {
                VerifiedGossip::Capacity(ad) => self.capacity.check_and_record(ad.provider, ad.seq),
                _ => Ok(()),
            },
        };
    }

    fn take_token(&mut self, author: PublicKey, now: Instant) -> bool {
        if self.buckets.len() >= MAX_RATE_AUTHORS && !self.buckets.contains_key(&author) {
            let full_after = Duration::from_secs_f64(RATE_BURST / RATE_PER_SEC);
            self.buckets
                .retain(|_, b| now.duration_since(b.at) < full_after);
            if self.buckets.len() >= MAX_RATE_AUTHORS {
                return false;
            }
        }
        let b = self.buckets.entry(author).or_insert(Bucket {
            tokens: RATE_BURST,
            at: now,
        });
        let refill = now.duration_since(b.at).as_secs_f64() * RATE_PER_SEC;
        b.tokens = (b.tokens + refill).min(RATE_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashgrid_protocol::{Cancel, Keypair, Signed};

    fn cancel(key: &Keypair, net: &Network, seq: u64, now: Timestamp) -> Vec<u8> {
        let c = Cancel {
            owner: key.public(),
            order_id: 1,
            seq,
            created_at: now,
            expires_at: now.plus_ms(60_000),
        };
        GossipMessage::Cancel(Signed::sign(key, net, &c)).encode()
    }

    #[test]
    fn verdicts() {
        let net = Network::test();
        let key = Keypair::from_secret_bytes([3; 32]);
        let now = Timestamp::now();
        let mut v = Validator::new(net.clone());
        assert!(matches!(
            v.check_bytes(TopicKind::Orders, &cancel(&key, &net, 5, now), now, true),
            Verdict::Accept(..)
        ));
        assert!(matches!(
            v.check_bytes(TopicKind::Orders, &cancel(&key, &net, 5, now), now, true),
            Verdict::Ignore(_)
        ));
        assert!(matches!(
            v.check_bytes(TopicKind::Orders, &cancel(&key, &net, 4, now), now, true),
            Verdict::Reject(_)
        ));
        assert!(matches!(
            v.check_bytes(TopicKind::Capacity, &cancel(&key, &net, 9, now), now, true),
            Verdict::Reject(_)
        ));
        let other = Network::new("other").unwrap();
        assert!(matches!(
            v.check_bytes(TopicKind::Orders, &cancel(&key, &other, 9, now), now, true),
            Verdict::Reject(_)
        ));
        assert!(matches!(
            v.check_bytes(TopicKind::Orders, b"\xff\xff garbage", now, true),
            Verdict::Reject(_)
        ));
        // Just expired: ignored; long expired: rejected.
        let old = Timestamp(now.0 - 61_000);
        assert!(matches!(
            v.check_bytes(TopicKind::Orders, &cancel(&key, &net, 10, old), now, true),
            Verdict::Ignore(_)
        ));
        let older = Timestamp(now.0 - 120_000);
        assert!(matches!(
            v.check_bytes(TopicKind::Orders, &cancel(&key, &net, 11, older), now, true),
            Verdict::Reject(_)
        ));
    }

    #[test]
    fn rate_limit_per_author() {
        let net = Network::test();
        let key = Keypair::from_secret_bytes([4; 32]);
        let now = Timestamp::now();
        let mut v = Validator::new(net.clone());
        let mut ignored = 0;
        for seq in 1..=(RATE_BURST as u64 + 10) {
            if let Verdict::Ignore(_) =
                v.check_bytes(TopicKind::Orders, &cancel(&key, &net, seq, now), now, true)
            {
                ignored += 1;
            }
        }
        assert!(ignored >= 5, "only {ignored} ignored");
    }
}
