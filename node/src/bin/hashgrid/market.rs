//! The commands that talk to the market: `init`, `offers`, `submit` (and `submit_and_wait`,
//! shared with `generate`), with the saving and printing of a finished job. The commands that
//! only read the local store are in `local`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hashgrid_node::client::ClientConfig;
use hashgrid_node::jobs::{
    FailKind, IntoSharedInputs, JobOptions, JobRecord, JobState, Submission,
};
use hashgrid_node::{NodeEvent, NodeHandle, OfferQuery, OfferSort};
use hashgrid_protocol::{
    Ask, ContentId, JobLimits, Msat, ReceiptFile, Requirements, load_job_file,
};

use crate::client::Client;
use crate::{CliError, Global};

/// Longest wait for the book to fill before `offers` prints or `submit` matches.
const BOOK_WAIT: Duration = Duration::from_secs(5);

/// The book counts as filled when no ask arrived for this long after the first peer.
const BOOK_SETTLE: Duration = Duration::from_millis(400);

/// Waits until the book has settled: at least one peer, and no new ask for [`BOOK_SETTLE`];
/// at most [`BOOK_WAIT`].
pub(crate) async fn wait_for_book(node: &NodeHandle) -> Result<usize, CliError> {
    let start = Instant::now();
    let mut last = (0usize, Instant::now());
    let mut connected: Option<Instant> = None;
    loop {
        let n = node
            .market()
            .book()
            .await
            .map_err(CliError::node)?
            .asks
            .len();
        if connected.is_none()
            && !node
                .peers()
                .connected()
                .await
                .map_err(CliError::node)?
                .is_empty()
        {
            connected = Some(Instant::now());
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        let settled = connected.is_some_and(|c| c.elapsed() >= BOOK_SETTLE)
            && last.1.elapsed() >= BOOK_SETTLE;
        if settled || start.elapsed() >= BOOK_WAIT {
            if connected.is_none() {
                return Err(CliError::other(
                    format!("no peer reached in {BOOK_WAIT:?}"),
                    "check the bootstrap addresses and that the peers are running",
                ));
            }
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn init(g: &Global, force: bool) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let root = c.dir.root();
    std::fs::create_dir_all(root).map_err(|e| {
        CliError::other(
            format!("cannot create {}: {e}", root.display()),
            "pass a writable --data-dir",
        )
    })?;
    let path = ClientConfig::path(root);
    let existed = path.exists();
    if existed && !force && (g.network.is_some() || !g.bootstrap.is_empty()) {
        return Err(CliError::bad_input(
            format!("{} exists", path.display()),
            "edit it, or run hashgrid init --force to overwrite it with these flags",
        ));
    }
    if !existed || force {
        std::fs::write(&path, c.config.to_toml()).map_err(|e| {
            CliError::other(
                format!("cannot write {}: {e}", path.display()),
                "pass a writable --data-dir",
            )
        })?;
    }
    let key = c
        .dir
        .load_or_create_identity()
        .map_err(|e| CliError::other(e.to_string(), "check the data dir's permissions"))?;
    if g.json {
        let v = serde_json::json!({
            "peer_id": key.peer_id().to_string(),
            "public_key": key.public().to_string(),
            "data_dir": root,
            "config": path,
            "identity": c.dir.identity_path(),
            "network": c.network.as_str(),
        });
        println!("{v}");
    } else {
        println!("peer id    {}", key.peer_id());
        println!("data dir   {}", root.display());
        println!(
            "config     {}{}",
            path.display(),
            if existed && !force { " (kept)" } else { "" }
        );
        println!("identity   {} (0600)", c.dir.identity_path().display());
        println!("network    {}", c.network);
        if c.config.bootstrap.is_empty() {
            println!(
                "\nno bootstrap peers yet: add one with `hashgrid init --force --bootstrap MULTIADDR` or pass --bootstrap"
            );
        }
    }
    Ok(())
}

/// `offers` filters.
pub(crate) struct OffersArgs {
    pub(crate) region: Option<String>,
    pub(crate) min_memory_gib: Option<f64>,
    pub(crate) min_gflops: Option<f64>,
    pub(crate) max_price: Option<u64>,
    pub(crate) sort: OfferSort,
    pub(crate) limit: usize,
}

fn requirements(
    region: Option<&str>,
    min_memory_gib: Option<f64>,
    min_gflops: Option<f64>,
) -> Result<Requirements, CliError> {
    let non_neg = |v: f64, what: &str| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(CliError::bad_input(
                format!("{what} must be a number >= 0"),
                "fix the flag",
            ))
        }
    };
    Ok(Requirements {
        min_memory_bytes: match min_memory_gib {
            Some(g) => (non_neg(g, "--min-memory")? * (1u64 << 30) as f64) as u64,
            None => 0,
        },
        min_mflops: match min_gflops {
            Some(g) => (non_neg(g, "--min-gflops")? * 1000.0) as u64,
            None => 0,
        },
        regions: region.map(|r| vec![r.to_string()]).unwrap_or_default(),
        backends: Vec::new(),
    })
}

fn gflops(a: &Ask) -> f64 {
    a.gpu.bench.matmul_mflops as f64 / 1000.0
}

/// msat per GPU-second per GFLOP/s (None without a measured throughput).
fn price_per_gflop(a: &Ask) -> Option<f64> {
    let g = gflops(a);
    (g > 0.0).then(|| a.price.0 as f64 / g)
}

pub(crate) async fn offers(g: &Global, args: OffersArgs) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let req = requirements(args.region.as_deref(), args.min_memory_gib, args.min_gflops)?;
    let node = c.start().await?;
    let seen = wait_for_book(&node).await;
    let query = OfferQuery {
        requirements: req,
        max_price: args.max_price.map(Msat),
        sort: args.sort,
        limit: args.limit,
    };
    let result = match seen {
        Ok(_) => match node.market().offers(query).await {
            Ok(o) => node.market().book().await.map(|b| (o, b.capacity)),
            Err(e) => Err(e),
        }
        .map_err(CliError::node),
        Err(e) => Err(e),
    };
    node.shutdown().await;
    let (offers, ads) = result?;
    // The models each provider's capacity ad says it holds (a bid naming one starts there
    // without uploading the weights).
    let models_of = |p: &hashgrid_protocol::PublicKey| -> Vec<String> {
        ads.iter()
            .find(|ad| ad.provider == *p)
            .map(|ad| ad.models.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    };
    if g.json {
        let rows: Vec<_> = offers
            .iter()
            .map(|a| {
                serde_json::json!({
                    "provider": a.provider.to_string(),
                    "peer_id": a.provider.try_to_peer_id().map(|p| p.to_string()).unwrap_or_default(),
                    "order_id": a.order_id,
                    "region": a.region,
                    "gpu": a.gpu.name,
                    "backend": format!("{:?}", a.gpu.backend),
                    "memory_bytes": a.gpu.memory_bytes,
                    "gflops": gflops(a),
                    "units": a.units,
                    "price_msat": a.price.0,
                    "price_per_gflop_msat": price_per_gflop(a),
                    "max_seconds": a.max_seconds,
                    "expires_at": a.expires_at.0,
                    "models": models_of(&a.provider),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if offers.is_empty() {
        println!("no offers match (the book may be empty; relax the filters or try again later)");
        return Ok(());
    }
    println!(
        "{:<10} {:<10} {:<34} {:>8} {:>9} {:>6} {:>12} {:>14}",
        "PROVIDER", "REGION", "GPU", "MEM GiB", "GFLOP/s", "UNITS", "MSAT/GPU-s", "MSAT/GFLOP/s"
    );
    for a in &offers {
        let mut gpu = a.gpu.name.clone();
        if gpu.chars().count() > 34 {
            gpu = gpu.chars().take(33).collect::<String>() + "…";
        }
        println!(
            "{:<10} {:<10} {:<34} {:>8.1} {:>9.2} {:>6} {:>12} {:>14}",
            a.provider.short(),
            a.region,
            gpu,
            a.gpu.memory_bytes as f64 / (1u64 << 30) as f64,
            gflops(a),
            a.units,
            a.price.0,
            price_per_gflop(a).map_or("-".into(), |p| format!("{p:.2}")),
        );
    }
    Ok(())
}

/// `submit` options.
pub(crate) struct SubmitArgs {
    pub(crate) file: PathBuf,
    pub(crate) max_price: Option<u64>,
    pub(crate) max_seconds: u32,
    pub(crate) region: Option<String>,
    pub(crate) min_memory_gib: Option<f64>,
    pub(crate) min_gflops: Option<f64>,
    pub(crate) out: Option<PathBuf>,
    pub(crate) attempts: u32,
    pub(crate) verify: Option<String>,
}

/// The progress display's word for a state: a done job is shown as verified.
fn state_line(s: &JobState) -> &'static str {
    match s {
        JobState::Done => "verified",
        s => s.name(),
    }
}

pub(crate) async fn submit(g: &Global, args: SubmitArgs) -> Result<(), CliError> {
    // Everything local first: a bad file or bad WGSL never reaches the network.
    let mut job = load_job_file(&args.file, &JobLimits::default())
        .map_err(|e| CliError::bad_input(e.to_string(), "fix the job file and submit again"))?;
    hashgrid_node::executor::check_offline(&job.spec, Some(&job.inputs))
        .map_err(|e| CliError::bad_input(e.to_string(), "fix the job and submit again"))?;
    if args.max_seconds == 0 || args.attempts == 0 {
        return Err(CliError::bad_input(
            "--max-seconds and --attempts must be at least 1",
            "fix the flag",
        ));
    }
    let req = requirements(args.region.as_deref(), args.min_memory_gib, args.min_gflops)?;
    let c = Client::resolve(g)?;
    // --verify, else the job file's `verify`, else the config's (all before any network).
    if args.verify.is_some() || job.verify.mode == hashgrid_protocol::VerifyMode::None {
        job.verify.mode = c.verify_mode(args.verify.as_deref())?;
    }
    let node = c.start().await?;
    let outcome = run_submit(g, &c, &node, job, req, &args).await;
    node.shutdown().await;
    outcome
}

async fn run_submit(
    g: &Global,
    c: &Client,
    node: &NodeHandle,
    job: hashgrid_protocol::LoadedJob,
    req: Requirements,
    args: &SubmitArgs,
) -> Result<(), CliError> {
    let options = JobOptions {
        units: 1,
        max_price: args.max_price.map(Msat),
        max_seconds: args.max_seconds,
        requirements: req,
        max_attempts: args.attempts,
        verify: job.verify.clone(),
        ..JobOptions::default()
    };
    let started = Instant::now();
    let (rec, outputs) =
        submit_and_wait(g, node, job.spec, job.inputs.into_shared(), options).await?;
    let saved = save_result(c, &rec, &outputs, args.out.as_deref())?;
    print_done(g, &rec, &outputs, &saved, Some(started.elapsed()));
    Ok(())
}

/// Submits a checked job through `node`, shows its progress on stderr, and waits for its
/// verified outputs (Ctrl-C cancels it). Returns the record (with the countersigned receipt)
/// and the outputs by buffer name; the receipt is also written to the data dir.
pub(crate) async fn submit_and_wait(
    g: &Global,
    node: &NodeHandle,
    spec: hashgrid_protocol::JobSpec,
    inputs: hashgrid_node::jobs::SharedInputs,
    options: JobOptions,
) -> Result<(JobRecord, BTreeMap<String, Vec<u8>>), CliError> {
    let asks = wait_for_book(node).await?;
    if !g.quiet {
        eprintln!("book: {asks} asks from the network");
    }
    submit_in_book(g, node, spec, inputs, options).await
}

/// [`submit_and_wait`] once the book has settled ([`wait_for_book`]).
pub(crate) async fn submit_in_book(
    g: &Global,
    node: &NodeHandle,
    spec: hashgrid_protocol::JobSpec,
    inputs: hashgrid_node::jobs::SharedInputs,
    options: JobOptions,
) -> Result<(JobRecord, BTreeMap<String, Vec<u8>>), CliError> {
    let sub = Submission {
        spec,
        inputs,
        options,
    };
    let mut events = node.events();
    let started = Instant::now();
    let id = node.jobs().submit(sub).await.map_err(|e| match e {
        hashgrid_node::NodeError::InvalidJob(m) => {
            CliError::bad_input(m, "fix the job and submit again")
        }
        e => CliError::node(e),
    })?;
    if !g.quiet {
        eprintln!("job {id}");
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut last = None;
    loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                node.jobs().cancel(&id).map_err(CliError::node)?;
                return Err(CliError::cancelled(id));
            }
            ev = events.recv() => match ev {
                Ok(NodeEvent::Job(u)) if u.job == id => {
                    let line = state_line(&u.state);
                    if !g.quiet && last != Some(line) && !matches!(u.state, JobState::Failed { .. }) {
                        let who = u.provider.map(|p| format!(" {}", p.short())).unwrap_or_default();
                        eprintln!("  {:>9.1} ms  {line}{who}", started.elapsed().as_secs_f64() * 1000.0);
                    }
                    last = Some(line);
                    if u.state.is_terminal() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if node.jobs().get(&id).map_err(CliError::node)?.is_some_and(|r| r.state.is_terminal()) {
                        break;
                    }
                }
                Err(_) => return Err(CliError::other("the node stopped", "run the command again")),
            }
        }
    }
    let rec = node
        .jobs()
        .get(&id)
        .map_err(CliError::node)?
        .ok_or_else(|| CliError::other("the job vanished from the store", "run it again"))?;
    if let JobState::Failed { kind, reason } = &rec.state {
        return Err(CliError::job_failed(*kind, reason, &rec));
    }
    let result = node
        .jobs()
        .result(&id)
        .map_err(CliError::node)?
        .ok_or_else(|| CliError::other("the job's outputs are missing", "hashgrid status JOB"))?;
    Ok((rec, result.outputs))
}

pub(crate) struct Saved {
    pub(crate) receipt: PathBuf,
    outputs: BTreeMap<String, PathBuf>,
}

/// Writes the receipt to `<data-dir>/receipts/<job>.json` (and `DIR/receipt.json`), and the
/// outputs to `DIR/<name>.bin` when `out` is given.
pub(crate) fn save_result(
    c: &Client,
    rec: &JobRecord,
    outputs: &BTreeMap<String, Vec<u8>>,
    out: Option<&Path>,
) -> Result<Saved, CliError> {
    let cs = rec
        .receipt
        .clone()
        .ok_or_else(|| CliError::other("the job has no receipt", "hashgrid status JOB"))?;
    let file = ReceiptFile {
        network: c.network.clone(),
        receipt: cs,
        agreement: rec.agreement.clone(),
    };
    let io = |what: &Path, e: std::io::Error| {
        CliError::other(
            format!("cannot write {}: {e}", what.display()),
            "pass a writable --out DIR",
        )
    };
    let dir = c.dir.root().join("receipts");
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let mut receipt = dir.join(format!("{}.json", rec.id));
    std::fs::write(&receipt, file.to_json()).map_err(|e| io(&receipt, e))?;
    // Every other accepted run of a verified job: its countersigned receipt too.
    for (i, run) in rec.verification.iter().flat_map(|v| &v.runs).enumerate() {
        let Some(cs) = &run.countersigned else {
            continue;
        };
        if Some(cs) == rec.receipt.as_ref() {
            continue;
        }
        let extra = ReceiptFile {
            network: c.network.clone(),
            receipt: cs.clone(),
            agreement: Some(run.agreement.clone()),
        };
        let p = dir.join(format!("{}.run{}.json", rec.id, i + 1));
        std::fs::write(&p, extra.to_json()).map_err(|e| io(&p, e))?;
    }
    let mut paths = BTreeMap::new();
    if let Some(out) = out {
        std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
        for (name, bytes) in outputs {
            let p = out.join(format!("{name}.bin"));
            std::fs::write(&p, bytes).map_err(|e| io(&p, e))?;
            paths.insert(name.clone(), p);
        }
        let p = out.join("receipt.json");
        std::fs::write(&p, file.to_json()).map_err(|e| io(&p, e))?;
        receipt = p;
    }
    Ok(Saved {
        receipt,
        outputs: paths,
    })
}

pub(crate) fn print_done(
    g: &Global,
    rec: &JobRecord,
    outputs: &BTreeMap<String, Vec<u8>>,
    saved: &Saved,
    elapsed: Option<Duration>,
) {
    let r = rec
        .receipt
        .as_ref()
        .and_then(|cs| cs.signed.decode_unverified().ok());
    let Some(r) = r else { return };
    if g.json {
        let outs: BTreeMap<_, _> = r
            .outputs
            .iter()
            .map(|o| {
                (
                    o.name.clone(),
                    serde_json::json!({
                        "blake3": o.id.to_string(),
                        "bytes": o.bytes,
                        "file": saved.outputs.get(&o.name),
                    }),
                )
            })
            .collect();
        let v = serde_json::json!({
            "job": rec.id.to_string(),
            "name": rec.name,
            "state": "done",
            "provider": r.provider.to_string(),
            "charge_msat": r.charge.0,
            "gpu_time_us": r.gpu_time_us,
            "receipt_id": rec.receipt.as_ref().map(|c| c.id().to_string()),
            "receipt_file": saved.receipt,
            "outputs": outs,
            "elapsed_ms": elapsed.map(|e| e.as_secs_f64() * 1000.0),
            "verification": verification_json(rec),
        });
        println!("{v}");
        return;
    }
    println!("job       {}", rec.id);
    println!("provider  {}", r.provider);
    println!(
        "charge    {} msat for {} µs of GPU time",
        r.charge.0, r.gpu_time_us
    );
    for o in &r.outputs {
        let file = saved
            .outputs
            .get(&o.name)
            .map(|p| format!("  → {}", p.display()))
            .unwrap_or_default();
        let ok = if outputs.contains_key(&o.name) {
            "✓"
        } else {
            "?"
        };
        println!(
            "output    {:<12} {:>10} bytes  {} {ok}{file}",
            o.name, o.bytes, o.id
        );
    }
    println!("receipt   {}", saved.receipt.display());
    if let Some(v) = &rec.verification {
        print_verification(v);
    }
}

/// A verified job's report for `--json`: the mode, what the comparison found, what the
/// assurance cost, and every provider that ran the job.
pub(crate) fn verification_json(rec: &JobRecord) -> serde_json::Value {
    let Some(v) = &rec.verification else {
        return serde_json::Value::Null;
    };
    let accused: Vec<String> = match &v.outcome {
        hashgrid_node::jobs::record::VerifyOutcome::Overruled { accused } => {
            accused.iter().map(ToString::to_string).collect()
        }
        _ => Vec::new(),
    };
    let runs: Vec<serde_json::Value> = v
        .runs
        .iter()
        .map(|r| {
            let body = r.receipt.decode_unverified().ok();
            serde_json::json!({
                "provider": r.provider.to_string(),
                "region": r.region,
                "adapter": body.as_ref().map(|b| b.adapter.name.clone()),
                "receipt_id": r.receipt.id().to_string(),
                "charge_msat": r.charge.0,
                "gpu_time_us": body.as_ref().map(|b| b.gpu_time_us),
                "countersigned": r.countersigned.is_some(),
                "mismatch": r.mismatch,
            })
        })
        .collect();
    serde_json::json!({
        "mode": v.mode.to_string(),
        "providers_wanted": v.wanted,
        "outcome": v.outcome.name(),
        "detail": match &v.outcome {
            hashgrid_node::jobs::record::VerifyOutcome::Incomplete { reason } => Some(reason.clone()),
            _ => None,
        },
        "accused": accused,
        "extra_msat": v.extra_msat,
        "evidence": v.evidence.map(|e| e.to_string()),
        "runs": runs,
    })
}

pub(crate) fn print_verification(v: &hashgrid_node::jobs::record::VerificationReport) {
    use hashgrid_node::jobs::record::VerifyOutcome;
    let what = match &v.outcome {
        VerifyOutcome::NotDrawn => "not drawn for this job: one provider, unchecked".to_string(),
        VerifyOutcome::Agreed => format!("{} providers agree", v.runs.len()),
        VerifyOutcome::Overruled { accused } => format!(
            "{} of {} providers agree; disputed and unpaid: {}",
            v.runs.len() - accused.len(),
            v.runs.len(),
            accused
                .iter()
                .map(|p| p.short())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        VerifyOutcome::Incomplete { reason } => {
            format!("only {} provider(s) could run it: {reason}", v.runs.len())
        }
        VerifyOutcome::NoMajority => "the providers disagree and no majority formed".into(),
    };
    println!("verify    {}: {what}", v.mode);
    if v.runs.len() > 1 {
        println!("assurance {} msat beyond the job's receipt", v.extra_msat);
        for r in &v.runs {
            let verdict = match (&r.countersigned, &r.mismatch) {
                (Some(_), _) => "accepted".to_string(),
                (None, Some(m)) => format!("refused: {m}"),
                (None, None) => "not accepted".to_string(),
            };
            println!(
                "  run     {} {:<10} {:>8} msat  {verdict}",
                r.provider.short(),
                r.region,
                r.charge.0
            );
        }
    }
    if let Some(e) = v.evidence {
        println!("evidence {e} gossiped");
    }
}

impl CliError {
    pub(crate) fn job_failed(kind: FailKind, reason: &str, rec: &JobRecord) -> CliError {
        let (code, hint) = match kind {
            FailKind::Invalid => (crate::EXIT_BAD_INPUT, "fix the job and submit again"),
            FailKind::NoMatch => (
                crate::EXIT_NO_MATCH,
                "raise --max-price, relax --region/--min-memory/--min-gflops, or look at hashgrid offers",
            ),
            FailKind::ProviderFailed => (
                crate::EXIT_PROVIDER_FAILED,
                "submit again (failed providers are avoided), or raise --attempts",
            ),
            FailKind::Verification => (
                crate::EXIT_VERIFY_FAILED,
                "nothing was countersigned or owed; submit again (the provider is avoided)",
            ),
            FailKind::Interrupted => (crate::EXIT_OTHER, "submit again"),
        };
        CliError {
            code,
            message: format!("job {} failed: {reason}", rec.id),
            hint: hint.into(),
        }
    }

    fn cancelled(id: ContentId) -> CliError {
        CliError {
            code: crate::EXIT_CANCELLED,
            message: format!("job {id} cancelled"),
            hint: "nothing is owed for it: its receipt, if any, is never countersigned".into(),
        }
    }
}
