//! Verification by re-execution: what assurance a buyer asks for ([`VerifyMode`]), how two
//! providers' outputs of the same job are compared ([`compare_outputs`]), and the signed
//! [`FraudEvidence`] a buyer gossips when a majority of independent providers contradicts one.
//!
//! A job is deterministic WGSL over inputs its receipt binds by hash, so running it again on
//! another provider and comparing is a complete check of the computation, not a sample of it.
//! Integer and bit-exact outputs compare by hash; float outputs may differ in the last bits
//! between adapters (fused multiply-add, reduction order) and compare within a tolerance the
//! job declares per output.
//!
//! Evidence is only a claim about signatures: the accused provider signed a receipt whose
//! outputs differ from the outputs that two or more other providers signed for the same job
//! spec, inputs and buyer. Anyone checks it offline ([`FraudEvidence::check`]); evidence that
//! does not check costs its sender peer score. What evidence cannot rule out is a buyer who
//! runs the witnesses itself (sybil providers that agree on a wrong answer): it pays for those
//! runs, and a receiving node counts one report per reporter and job (docs/VERIFICATION.md).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::id::ContentId;
use crate::identity::PublicKey;
use crate::limits::MAX_GOSSIP_BYTES;
use crate::messages::Receipt;
use crate::signed::{Network, Signed, SignedError, SignedMessage};
use crate::time::Timestamp;
use crate::validate::{Expiring, ValidationError, check_len};

/// Most providers a job may be replicated on (`replicate:K`).
pub const MAX_REPLICAS: u8 = 5;

/// Most witness receipts in one piece of evidence.
pub const MAX_WITNESSES: usize = 4;

/// How much assurance a buyer buys for one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum VerifyMode {
    /// Trust the provider's receipt (signatures, hashes and charge are still checked).
    #[default]
    None,
    /// With probability `permille / 1000`, run the job again on a second, independent
    /// provider and compare.
    Spot {
        /// The probability in thousandths (1..=1000).
        permille: u16,
    },
    /// Always run the job on `k` independent providers and compare (2..=[`MAX_REPLICAS`]).
    Replicate {
        /// Providers.
        k: u8,
    },
}

/// A `--verify` or `verify =` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{given}` is not a verification mode: {reason} (use none, spot:P with 0 < P <= 1, or replicate:K with 2 <= K <= {MAX_REPLICAS})"
)]
pub struct BadVerifyMode {
    /// The text given.
    pub given: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for VerifyMode {
    type Err = BadVerifyMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| BadVerifyMode {
            given: s.chars().take(40).collect(),
            reason: reason.into(),
        };
        let t = s.trim();
        if t == "none" {
            return Ok(VerifyMode::None);
        }
        if let Some(p) = t.strip_prefix("spot:") {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| bad("the probability is not a number"))?;
            if !(p > 0.0 && p <= 1.0) {
                return Err(bad("the probability must be above 0 and at most 1"));
            }
            let permille = (p * 1000.0).round() as u16;
            if permille == 0 {
                return Err(bad("the probability is below 0.001"));
            }
            return Ok(VerifyMode::Spot { permille });
        }
        if let Some(k) = t.strip_prefix("replicate:") {
            let k: u8 = k
                .trim()
                .parse()
                .map_err(|_| bad("the provider count is not a small whole number"))?;
            if !(2..=MAX_REPLICAS).contains(&k) {
                return Err(bad("the provider count is out of range"));
            }
            return Ok(VerifyMode::Replicate { k });
        }
        Err(bad("unknown mode"))
    }
}

impl fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyMode::None => f.write_str("none"),
            VerifyMode::Spot { permille } => {
                let p = format!("{:.3}", f64::from(*permille) / 1000.0);
                let p = p.trim_end_matches('0').trim_end_matches('.');
                write!(f, "spot:{p}")
            }
            VerifyMode::Replicate { k } => write!(f, "replicate:{k}"),
        }
    }
}

impl VerifyMode {
    /// Checks the ranges (for values that did not come through [`FromStr`]).
    pub fn validate(&self) -> Result<(), BadVerifyMode> {
        let ok = match self {
            VerifyMode::None => true,
            VerifyMode::Spot { permille } => (1..=1000).contains(permille),
            VerifyMode::Replicate { k } => (2..=MAX_REPLICAS).contains(k),
        };
        if ok {
            Ok(())
        } else {
            Err(BadVerifyMode {
                given: self.to_string(),
                reason: "out of range".into(),
            })
        }
    }

    /// How many providers run the job, given a uniform draw `roll` in `0..1000` for a spot
    /// check (the buyer's secret randomness: a provider cannot tell a checked job from
    /// another).
    pub fn providers(&self, roll: u16) -> usize {
        match self {
            VerifyMode::None => 1,
            VerifyMode::Spot { permille } => {
                if roll < *permille {
                    2
                } else {
                    1
                }
            }
            VerifyMode::Replicate { k } => usize::from(*k),
        }
    }
}

/// What a buyer asks of verification for one job: the mode, and how each output is compared
/// (outputs not named compare exactly).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Verification {
    /// How many providers run the job.
    pub mode: VerifyMode,
    /// Tolerances of float outputs, by output name.
    pub tolerances: BTreeMap<String, Tolerance>,
    /// Generated token sequences, compared up to the first near-tie.
    pub tokens: Option<TokenCompare>,
}

/// How two runs of a generation job compare: their token sequences must be equal up to the
/// first position where they differ, and there both runs must report a near-tie (a top-1
/// minus top-2 logit margin below `max_tie`): a choice that another adapter's rounding could
/// have flipped, after which the sequences legitimately go their own ways. A divergence where
/// either run was sure of its choice is a mismatch. The three outputs named are compared this
/// way and no other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCompare {
    /// `u32` per position: `n_prompt` prompt tokens, then the generated ones.
    pub tokens: String,
    /// `[done, generated]` as `u32`s.
    pub status: String,
    /// `f32` per generated token: the top-1 minus top-2 logit at that step.
    pub margins: String,
    /// Prompt tokens at the start of `tokens`.
    pub n_prompt: u32,
    /// Largest margin that counts as a near-tie.
    pub max_tie: f32,
}

impl PartialEq for TokenCompare {
    fn eq(&self, o: &Self) -> bool {
        (&self.tokens, &self.status, &self.margins, self.n_prompt)
            == (&o.tokens, &o.status, &o.margins, o.n_prompt)
            && self.max_tie.to_bits() == o.max_tie.to_bits()
    }
}

impl Eq for TokenCompare {}

impl TokenCompare {
    fn names(&self) -> [&str; 3] {
        [&self.tokens, &self.status, &self.margins]
    }

    /// Compares two runs' sequences (see the type's docs).
    fn compare(
        &self,
        a: &BTreeMap<String, Vec<u8>>,
        b: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), Mismatch> {
        let mismatch = |detail: String| Mismatch {
            output: self.tokens.clone(),
            detail,
            exact: false,
        };
        let u32s = |m: &BTreeMap<String, Vec<u8>>, name: &str| -> Vec<u32> {
            m.get(name)
                .map(|b| {
                    b.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                })
                .unwrap_or_default()
        };
        let seq = |m: &BTreeMap<String, Vec<u8>>| -> (Vec<u32>, Vec<f32>) {
            let generated = u32s(m, &self.status).get(1).copied().unwrap_or(0) as usize;
            let toks = u32s(m, &self.tokens);
            let end = (self.n_prompt as usize)
                .saturating_add(generated)
                .min(toks.len());
            // Margins only of the steps run (the rest of the buffer is zeros, not ties).
            let margins = u32s(m, &self.margins)
                .into_iter()
                .take(generated)
                .map(f32::from_bits)
                .collect();
            (toks[..end].to_vec(), margins)
        };
        let ((ta, ma), (tb, mb)) = (seq(a), seq(b));
        let Some(i) = (0..ta.len().max(tb.len())).find(|&i| ta.get(i) != tb.get(i)) else {
            return Ok(());
        };
        let n_prompt = self.n_prompt as usize;
        if i < n_prompt {
            return Err(mismatch(format!("the prompt differs at position {i}")));
        }
        let step = i - n_prompt;
        let near = |m: &Vec<f32>| {
            m.get(step)
                .is_some_and(|x| x.is_finite() && *x < self.max_tie)
        };
        if near(&ma) && near(&mb) {
            return Ok(());
        }
        let shown = |m: &Vec<f32>| {
            m.get(step)
                .map_or_else(|| "none".into(), |x| format!("{x:.4}"))
        };
        Err(mismatch(format!(
            "generated token {step} differs ({:?} against {:?}) with margins {} and {} (a near-tie is below {})",
            ta.get(i),
            tb.get(i),
            shown(&ma),
            shown(&mb),
            self.max_tie
        )))
    }
}

/// Compares two runs' outputs of one job as `v` says: token sequences up to a near-tie
/// ([`TokenCompare`]), then every other output with [`compare_outputs`].
pub fn compare_runs(
    a: &BTreeMap<String, Vec<u8>>,
    b: &BTreeMap<String, Vec<u8>>,
    v: &Verification,
) -> Result<(), Mismatch> {
    let Some(t) = &v.tokens else {
        return compare_outputs(a, b, &v.tolerances);
    };
    t.compare(a, b)?;
    let rest = |m: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        m.iter()
            .filter(|(k, _)| !t.names().contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    compare_outputs(&rest(a), &rest(b), &v.tolerances)
}

/// How far two float outputs may differ and still agree: for every f32 element,
/// `|a − b| ≤ atol + rtol · max(|a|, |b|)` (NaN agrees only with NaN, infinities only with
/// themselves).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerance {
    /// Relative tolerance.
    #[serde(default)]
    pub rtol: f32,
    /// Absolute tolerance.
    #[serde(default)]
    pub atol: f32,
}

impl PartialEq for Tolerance {
    fn eq(&self, other: &Self) -> bool {
        self.rtol.to_bits() == other.rtol.to_bits() && self.atol.to_bits() == other.atol.to_bits()
    }
}

impl Eq for Tolerance {}

impl Tolerance {
    /// Both finite and not negative.
    pub fn validate(&self) -> Result<(), BadTolerance> {
        for (name, v) in [("rtol", self.rtol), ("atol", self.atol)] {
            if !v.is_finite() || v < 0.0 {
                return Err(BadTolerance { name, value: v });
            }
        }
        Ok(())
    }

    fn agree(&self, a: f32, b: f32) -> bool {
        if a.is_nan() || b.is_nan() {
            return a.is_nan() && b.is_nan();
        }
        if a.is_infinite() || b.is_infinite() {
            return a == b;
        }
        let diff = (f64::from(a) - f64::from(b)).abs();
        let scale = f64::from(a.abs().max(b.abs()));
        diff <= f64::from(self.atol) + f64::from(self.rtol) * scale
    }
}

/// A tolerance that is negative, infinite or NaN.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("`{name}` must be a finite number ≥ 0, not {value}")]
pub struct BadTolerance {
    /// `rtol` or `atol`.
    pub name: &'static str,
    /// The value given.
    pub value: f32,
}

/// Where two runs' outputs disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The output buffer.
    pub output: String,
    /// What differs.
    pub detail: String,
    /// Whether the output is compared exactly (only exact mismatches make fraud evidence).
    pub exact: bool,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "output `{}`: {}", self.output, self.detail)
    }
}

/// Compares two runs' outputs of one job, by name: exactly, or element by element as f32
/// within the output's [`Tolerance`] in `tolerances`. Returns the first mismatch.
pub fn compare_outputs(
    a: &BTreeMap<String, Vec<u8>>,
    b: &BTreeMap<String, Vec<u8>>,
    tolerances: &BTreeMap<String, Tolerance>,
) -> Result<(), Mismatch> {
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    if names(a) != names(b) {
        return Err(Mismatch {
            output: names(a).join(","),
            detail: format!("the runs name different outputs: {:?}", names(b)),
            exact: true,
        });
    }
    for (name, x) in a {
        let y = &b[name];
        let tol = tolerances.get(name);
        let mismatch = |detail: String| Mismatch {
            output: name.clone(),
            detail,
            exact: tol.is_none(),
        };
        if x.len() != y.len() {
            return Err(mismatch(format!("{} bytes against {}", x.len(), y.len())));
        }
        match tol {
            None => {
                if let Some(i) = x.iter().zip(y).position(|(p, q)| p != q) {
                    return Err(mismatch(format!(
                        "byte {i} differs ({:#04x} against {:#04x})",
                        x[i], y[i]
                    )));
                }
            }
            Some(t) => {
                if x.len() % 4 != 0 {
                    return Err(mismatch(format!(
                        "{} bytes is not a whole number of f32 elements",
                        x.len()
                    )));
                }
                let f = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                for (i, (p, q)) in x.chunks_exact(4).zip(y.chunks_exact(4)).enumerate() {
                    let (p, q) = (f(p), f(q));
                    if !t.agree(p, q) {
                        return Err(mismatch(format!(
                            "element {i}: {p:e} against {q:e}, beyond rtol {} atol {}",
                            t.rtol, t.atol
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// A buyer's signed claim that one provider's receipt contradicts the receipts of two or
/// more other providers for the same job: same spec, same inputs, same buyer, same output
/// names and sizes, and at least one output whose hash differs from what every witness
/// agrees on. Gossiped on the orders topic; checked offline by [`FraudEvidence::check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FraudEvidence {
    /// The buyer that ran the job on every provider named (it signs the evidence).
    pub reporter: PublicKey,
    /// The contradicted receipt, as its provider signed it.
    pub accused: Signed<Receipt>,
    /// The receipts that agree with each other, each signed by another provider.
    pub witnesses: Vec<Signed<Receipt>>,
    /// Creation time.
    pub created_at: Timestamp,
    /// After this the evidence need not be relayed (its effect on reputation stays).
    pub expires_at: Timestamp,
}

/// What checked evidence proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidenceFacts {
    /// The provider whose receipt is contradicted.
    pub accused: PublicKey,
    /// The job.
    pub job_id: ContentId,
    /// The spec every receipt names.
    pub spec_id: ContentId,
    /// The witnesses' providers.
    pub witnesses: Vec<PublicKey>,
    /// The outputs whose hashes differ.
    pub outputs: Vec<String>,
}

/// Evidence that does not prove what it claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// A receipt's signature does not verify.
    #[error("a receipt does not verify: {0}")]
    Receipt(#[from] SignedError),
    /// The receipts are not about one job of the reporter's.
    #[error("the receipts are not one job's: {0}")]
    NotOneJob(&'static str),
    /// The providers are not distinct.
    #[error("the providers are not distinct")]
    SameProvider,
    /// The witnesses do not agree with each other.
    #[error("the witnesses disagree with each other")]
    WitnessesDisagree,
    /// The accused receipt does not differ from the witnesses in any output hash.
    #[error("the accused receipt does not contradict the witnesses: {0}")]
    NoContradiction(&'static str),
}

impl FraudEvidence {
    /// Checks every signature and that the receipts prove the contradiction claimed. Pure
    /// and offline: `1 + witnesses` signature checks.
    pub fn check(&self, network: &Network) -> Result<EvidenceFacts, EvidenceError> {
        let accused = self.accused.verify(network)?;
        if !(2..=MAX_WITNESSES).contains(&self.witnesses.len()) {
            return Err(EvidenceError::NotOneJob("2 to 4 witnesses are needed"));
        }
        let mut witnesses: Vec<Receipt> = Vec::with_capacity(self.witnesses.len());
        for w in &self.witnesses {
            witnesses.push(w.verify(network)?);
        }
        let mut providers = vec![accused.provider];
        for w in &witnesses {
            if w.buyer != self.reporter || accused.buyer != self.reporter {
                return Err(EvidenceError::NotOneJob("a receipt is for another buyer"));
            }
            if w.job_id != accused.job_id || w.spec_id != accused.spec_id {
                return Err(EvidenceError::NotOneJob(
                    "a receipt names another job or spec",
                ));
            }
            if w.inputs != accused.inputs {
                return Err(EvidenceError::NotOneJob("a receipt names other inputs"));
            }
            if providers.contains(&w.provider) {
                return Err(EvidenceError::SameProvider);
            }
            providers.push(w.provider);
        }
        let first = &witnesses[0];
        if witnesses.iter().any(|w| w.outputs != first.outputs) {
            return Err(EvidenceError::WitnessesDisagree);
        }
        let shape = |r: &Receipt| {
            r.outputs
                .iter()
                .map(|o| (o.name.clone(), o.bytes))
                .collect::<Vec<_>>()
        };
        if shape(&accused) != shape(first) {
            return Err(EvidenceError::NoContradiction(
                "its outputs are not the job's outputs (a receipt the buyer's own checks refuse)",
            ));
        }
        let outputs: Vec<String> = accused
            .outputs
            .iter()
            .zip(&first.outputs)
            .filter(|(a, w)| a.id != w.id)
            .map(|(a, _)| a.name.clone())
            .collect();
        if outputs.is_empty() {
            return Err(EvidenceError::NoContradiction(
                "every output hash is the same",
            ));
        }
        Ok(EvidenceFacts {
            accused: accused.provider,
            job_id: accused.job_id,
            spec_id: accused.spec_id,
            witnesses: providers[1..].to_vec(),
            outputs,
        })
    }
}

impl Expiring for FraudEvidence {
    fn created_at(&self) -> Timestamp {
        self.created_at
    }
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
}

impl SignedMessage for FraudEvidence {
    const KIND: &'static str = "evidence";
    const MAX_BYTES: usize = MAX_GOSSIP_BYTES;
    fn author(&self) -> PublicKey {
        self.reporter
    }
    fn validate(&self) -> Result<(), ValidationError> {
        check_len("witnesses", self.witnesses.len(), MAX_WITNESSES)?;
        if self.witnesses.len() < 2 {
            return Err(ValidationError::OutOfRange {
                field: "witnesses",
                reason: "at least 2 are needed".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::Keypair;
    use crate::messages::{Backend, Benchmark, DeviceType, GpuLimits, GpuProfile, OutputRecord};
    use crate::money::Msat;

    #[test]
    fn modes_parse_print_and_refuse_nonsense() {
        for (s, m) in [
            ("none", VerifyMode::None),
            ("spot:0.2", VerifyMode::Spot { permille: 200 }),
            ("spot:1", VerifyMode::Spot { permille: 1000 }),
            ("spot:0.001", VerifyMode::Spot { permille: 1 }),
            ("replicate:2", VerifyMode::Replicate { k: 2 }),
        ] {
            assert_eq!(s.parse::<VerifyMode>().unwrap(), m);
            assert_eq!(m.to_string(), s);
        }
        for bad in [
            "spot:0",
            "spot:1.5",
            "spot:-0.1",
            "spot:NaN",
            "spot:",
            "spot:0.0001",
            "replicate:1",
            "replicate:6",
            "replicate:300",
            "replicate:x",
            "always",
            "",
        ] {
            let e = bad.parse::<VerifyMode>().unwrap_err();
            assert!(e.to_string().contains("replicate:K"), "{e}");
        }
        assert!(VerifyMode::Replicate { k: 9 }.validate().is_err());
        assert!(VerifyMode::Spot { permille: 0 }.validate().is_err());
        let spot = VerifyMode::Spot { permille: 200 };
        assert_eq!((spot.providers(199), spot.providers(200)), (2, 1));
        assert_eq!(VerifyMode::Replicate { k: 3 }.providers(999), 3);
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn outputs_compare_exactly_or_within_a_tolerance() {
        let one = |name: &str, b: Vec<u8>| BTreeMap::from([(name.to_string(), b)]);
        let none = BTreeMap::new();
        let a = one("y", floats(&[1.0, 2.0, f32::NAN, f32::INFINITY]));
        let next_ulp = f32::from_bits(2.0f32.to_bits() + 1);
        let b = one("y", floats(&[1.0, next_ulp, f32::NAN, f32::INFINITY]));
        let e = compare_outputs(&a, &b, &none).unwrap_err();
        assert!(e.exact && e.detail.starts_with("byte 4"), "{e}");
        let tol = BTreeMap::from([(
            "y".to_string(),
            Tolerance {
                rtol: 1e-6,
                atol: 0.0,
            },
        )]);
        compare_outputs(&a, &b, &tol).unwrap();
        assert!(compare_outputs(&a, &a, &none).is_ok());
        let far = one("y", floats(&[1.0, 2.1, f32::NAN, f32::INFINITY]));
        let e = compare_outputs(&a, &far, &tol).unwrap_err();
        assert!(!e.exact && e.detail.contains("element 1"), "{e}");
        let nan = one("y", floats(&[1.0, 2.0, 0.0, f32::INFINITY]));
        assert!(compare_outputs(&a, &nan, &tol).is_err());
        let neg_inf = one("y", floats(&[1.0, 2.0, f32::NAN, f32::NEG_INFINITY]));
        assert!(compare_outputs(&a, &neg_inf, &tol).is_err());
        assert!(compare_outputs(&a, &one("y", floats(&[1.0])), &tol).is_err());
        assert!(compare_outputs(&a, &one("z", floats(&[1.0])), &none).is_err());
        let odd = one("y", vec![1, 2, 3]);
        assert!(compare_outputs(&odd, &odd.clone(), &tol).is_err());
        assert!(
            Tolerance {
                rtol: -1.0,
                atol: 0.0
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn token_sequences_agree_up_to_a_near_tie_on_both_sides() {
        let t = TokenCompare {
            tokens: "tokens".into(),
            status: "status".into(),
            margins: "margins".into(),
            n_prompt: 2,
            max_tie: 0.1,
        };
        let v = Verification {
            tokens: Some(t),
            ..Verification::default()
        };
        let run = |toks: &[u32], generated: u32, margins: &[f32]| {
            let mut tokens: Vec<u8> = toks.iter().flat_map(|x| x.to_le_bytes()).collect();
            tokens.resize(8 * 4, 0);
            let mut m: Vec<u8> = margins.iter().flat_map(|x| x.to_le_bytes()).collect();
            m.resize(6 * 4, 0);
            BTreeMap::from([
                ("tokens".to_string(), tokens),
                (
                    "status".to_string(),
                    [1u32, generated]
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                ),
                ("margins".to_string(), m),
                ("other".to_string(), vec![7]),
            ])
        };
        let a = run(&[1, 2, 10, 11, 12], 3, &[3.0, 0.05, 2.0]);
        // Identical: agree, whatever the margins' last bits.
        let same = run(&[1, 2, 10, 11, 12], 3, &[3.0001, 0.0501, 2.0]);
        compare_runs(&a, &same, &v).unwrap();
        // Diverging at step 1, a near-tie in both runs: agree.
        let tie = run(&[1, 2, 10, 20, 21, 22], 4, &[3.0, 0.02, 1.0, 1.0]);
        compare_runs(&a, &tie, &v).unwrap();
        // Diverging at step 0, where both were sure: a mismatch.
        let sure = run(&[1, 2, 30, 11, 12], 3, &[3.0, 0.05, 2.0]);
        let e = compare_runs(&a, &sure, &v).unwrap_err();
        assert!(!e.exact && e.detail.contains("generated token 0"), "{e}");
        // A run that claims a tie the other did not see: a mismatch.
        let claims = run(&[1, 2, 40, 11, 12], 3, &[0.0, 0.05, 2.0]);
        assert!(compare_runs(&a, &claims, &v).is_err());
        // A different prompt: a mismatch.
        let prompt = run(&[1, 3, 10, 11, 12], 3, &[3.0, 0.05, 2.0]);
        assert!(
            compare_runs(&a, &prompt, &v)
                .unwrap_err()
                .detail
                .contains("prompt")
        );
        // One run stops early (no margin recorded for the step the other ran): a mismatch,
        // though the unwritten margins are zeros.
        let short = run(&[1, 2, 10, 11], 2, &[3.0, 0.05]);
        let longer = run(&[1, 2, 10, 11, 12], 3, &[3.0, 0.05, 0.01]);
        assert!(compare_runs(&short, &longer, &v).is_err());
        // Outputs outside the sequence still compare exactly.
        let mut other = same.clone();
        other.insert("other".into(), vec![8]);
        assert_eq!(compare_runs(&a, &other, &v).unwrap_err().output, "other");
    }

    fn receipt(provider: &Keypair, buyer: &Keypair, out: &[u8]) -> Signed<Receipt> {
        let now = Timestamp(1_700_000_000_000);
        let r = Receipt {
            job_id: ContentId::of(b"job"),
            agreement_id: ContentId::of(&provider.public().0),
            buyer: buyer.public(),
            provider: provider.public(),
            spec_id: ContentId::of(b"spec"),
            inputs: vec![ContentId::of(b"input")],
            outputs: vec![OutputRecord {
                name: "out".into(),
                id: ContentId::of(out),
                bytes: out.len() as u64,
            }],
            adapter: GpuProfile {
                name: "test GPU".into(),
                vendor: 0,
                device: 0,
                backend: Backend::Vulkan,
                device_type: DeviceType::Cpu,
                driver: String::new(),
                memory_bytes: 1 << 30,
                limits: GpuLimits::default(),
                bench: Benchmark {
                    matmul_mflops: 1,
                    copy_mbps: 1,
                },
            },
            started_at: now,
            finished_at: now,
            gpu_time_us: 10,
            charge: Msat(5),
            chain_seq: 0,
            prev_receipt: None,
        };
        Signed::sign(provider, &Network::test(), &r)
    }

    #[test]
    fn evidence_proves_a_contradiction_and_nothing_else() {
        let net = Network::test();
        let buyer = Keypair::from_secret_bytes([1; 32]);
        let keys: Vec<Keypair> = (2..6)
            .map(|i| Keypair::from_secret_bytes([i; 32]))
            .collect();
        let now = Timestamp(1_700_000_000_000);
        let ev = |accused: Signed<Receipt>, witnesses: Vec<Signed<Receipt>>| FraudEvidence {
            reporter: buyer.public(),
            accused,
            witnesses,
            created_at: now,
            expires_at: now.plus_ms(60_000),
        };
        let good = ev(
            receipt(&keys[0], &buyer, b"wrong"),
            vec![
                receipt(&keys[1], &buyer, b"right"),
                receipt(&keys[2], &buyer, b"right"),
            ],
        );
        let facts = good.check(&net).unwrap();
        assert_eq!(facts.accused, keys[0].public());
        assert_eq!(facts.outputs, vec!["out".to_string()]);
        // Signed, encoded and decoded by another node, it still checks.
        let signed = Signed::sign(&buyer, &net, &good);
        assert_eq!(signed.verify(&net).unwrap().check(&net).unwrap(), facts);

        // Forgeries and non-contradictions.
        let one_witness = ev(
            receipt(&keys[0], &buyer, b"wrong"),
            vec![receipt(&keys[1], &buyer, b"right")],
        );
        assert!(one_witness.check(&net).is_err());
        assert!(
            Signed::sign(&buyer, &net, &one_witness)
                .verify(&net)
                .is_err()
        );
        let agree = ev(
            receipt(&keys[0], &buyer, b"right"),
            vec![
                receipt(&keys[1], &buyer, b"right"),
                receipt(&keys[2], &buyer, b"right"),
            ],
        );
        assert!(matches!(
            agree.check(&net),
            Err(EvidenceError::NoContradiction(_))
        ));
        let split = ev(
            receipt(&keys[0], &buyer, b"wrong"),
            vec![
                receipt(&keys[1], &buyer, b"right"),
                receipt(&keys[2], &buyer, b"other"),
            ],
        );
        assert_eq!(split.check(&net), Err(EvidenceError::WitnessesDisagree));
        let sybil = ev(
            receipt(&keys[0], &buyer, b"wrong"),
            vec![
                receipt(&keys[1], &buyer, b"right"),
                receipt(&keys[1], &buyer, b"right"),
            ],
        );
        assert_eq!(sybil.check(&net), Err(EvidenceError::SameProvider));
        let self_witness = ev(
            receipt(&keys[0], &buyer, b"wrong"),
            vec![
                receipt(&keys[0], &buyer, b"right"),
                receipt(&keys[1], &buyer, b"right"),
            ],
        );
        assert_eq!(self_witness.check(&net), Err(EvidenceError::SameProvider));
        let other_buyer = Keypair::from_secret_bytes([9; 32]);
        let foreign = ev(
            receipt(&keys[0], &other_buyer, b"wrong"),
            vec![
                receipt(&keys[1], &buyer, b"right"),
                receipt(&keys[2], &buyer, b"right"),
            ],
        );
        assert!(matches!(
            foreign.check(&net),
            Err(EvidenceError::NotOneJob(_))
        ));
        // A receipt signed for another network does not verify here.
        let other_net = Signed::sign(
            &keys[1],
            &Network::main(),
            &receipt(&keys[1], &buyer, b"right").verify(&net).unwrap(),
        );
        let bad = ev(
            receipt(&keys[0], &buyer, b"wrong"),
            vec![other_net, receipt(&keys[3], &buyer, b"right")],
        );
        assert!(matches!(bad.check(&net), Err(EvidenceError::Receipt(_))));
    }
}
