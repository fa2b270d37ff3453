//! `hashgrid`: the buyer CLI. Today: inspect job files, run them on this machine's GPU, and
//! verify receipts, all without a network.
//!
//! Exit codes: 0 ok; 1 other errors; 2 bad input (unreadable or malformed files);
//! 5 verification failed (a signature, a countersignature or an output hash is wrong).

use anyhow::Context;
use clap::{Parser, Subcommand};
use hashgrid_protocol::{JobLimits, load_job_file};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for bad input: a file that cannot be read or parsed.
const EXIT_BAD_INPUT: u8 = 2;
/// Exit code for a failed verification.
const EXIT_VERIFY_FAILED: u8 = 5;

#[derive(Parser)]
#[command(
    name = "hashgrid",
    version,
    about = "hashgrid: buy GPU compute on a peer-to-peer market"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Job files.
    #[command(subcommand)]
    Job(JobCommand),
    /// Receipts.
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Run a job file on this machine's GPU adapter, without any network.
    ///
    /// Example: hashgrid run-local examples/kernels/saxpy/job.toml --json
    RunLocal {
        /// The job file (TOML).
        file: PathBuf,
        /// Write each output buffer to `DIR/<name>.bin`.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print one JSON object on stdout (logs go to stderr).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Verify a receipt file offline: the provider's signature, the buyer's countersignature,
    /// and (with --outputs) that each output file hashes to the receipt's id.
    ///
    /// Example: hashgrid receipt verify receipts/3f2a.json --outputs out/
    Verify {
        /// The receipt file (JSON).
        file: PathBuf,
        /// A directory with the outputs as `<name>.bin`, to check against the receipt.
        #[arg(long)]
        outputs: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Parse and check a job file and the files it names; print its spec id and buffers.
    ///
    /// Example: hashgrid job inspect examples/kernels/saxpy/job.toml
    Inspect {
        /// The job file (TOML).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Job(cmd) => job(cmd),
        Command::RunLocal { file, out, json } => run_local(&file, out.as_deref(), json),
        Command::Receipt(ReceiptCommand::Verify {
            file,
            outputs,
            json,
        }) => return receipt_verify(&file, outputs.as_deref(), json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

fn receipt_verify(
    file: &std::path::Path,
    outputs: Option<&std::path::Path>,
    json: bool,
) -> ExitCode {
    use hashgrid_protocol::{ReceiptError, check_outputs, verify_receipt_file};
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let fail = |e: &ReceiptError| {
        let code = match e {
            ReceiptError::Format(_) => EXIT_BAD_INPUT,
            _ => EXIT_VERIFY_FAILED,
        };
        eprintln!("error: {}: {e}", file.display());
        ExitCode::from(code)
    };
    let (rf, receipt) = match verify_receipt_file(&bytes) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    if let Some(dir) = outputs {
        let mut got = std::collections::BTreeMap::new();
        for o in &receipt.outputs {
            let path = dir.join(format!("{}.bin", o.name));
            match std::fs::read(&path) {
                Ok(b) => {
                    got.insert(o.name.clone(), b);
                }
                Err(e) => {
                    eprintln!(
                        "error: output `{}`: cannot read {}: {e}",
                        o.name,
                        path.display()
                    );
                    return ExitCode::from(EXIT_VERIFY_FAILED);
                }
            }
        }
        if let Err(e) = check_outputs(&receipt, &got) {
            return fail(&e);
        }
    }
    if json {
        let out = serde_json::json!({
            "valid": true,
            "network": rf.network.as_str(),
            "receipt_id": rf.receipt.id().to_string(),
            "outputs_checked": outputs.is_some(),
            "receipt": receipt,
        });
        println!("{out}");
    } else {
        println!(
            "valid receipt {} on network {}",
            rf.receipt.id(),
            rf.network
        );
        println!("  job       {}", receipt.job_id);
        println!("  provider  {} (signed)", receipt.provider);
        println!("  buyer     {} (countersigned)", receipt.buyer);
        println!(
            "  adapter   {} ({:?})",
            receipt.adapter.name, receipt.adapter.backend
        );
        println!(
            "  gpu time  {} µs, charge {}",
            receipt.gpu_time_us, receipt.charge
        );
        println!(
            "  chain     #{} after {:?}",
            receipt.chain_seq,
            receipt.prev_receipt.map(|p| p.to_string())
        );
        for o in &receipt.outputs {
            let checked = if outputs.is_some() {
                "  ✓ matches"
            } else {
                ""
            };
            println!(
                "  output    {:<12} {:>10} bytes  {}{checked}",
                o.name, o.bytes, o.id
            );
        }
    }
    ExitCode::SUCCESS
}

fn job(cmd: JobCommand) -> anyhow::Result<()> {
    match cmd {
        JobCommand::Inspect { file, json } => {
            let job = load_job_file(&file, &JobLimits::default())?;
            if json {
                let out = serde_json::json!({
                    "spec_id": job.spec.id().to_string(),
                    "spec": job.spec,
                    "inputs": job.inputs.iter().map(|(id, b)| (id.to_string(), b.len())).collect::<std::collections::BTreeMap<_, _>>(),
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out).context("encoding JSON")?
                );
            } else {
                println!("job      {}", job.spec.name);
                println!("spec id  {}", job.spec.id());
                for b in &job.spec.buffers {
                    let kind = match b.init {
                        hashgrid_protocol::BufferInit::Zeroed => "zeroed".to_string(),
                        hashgrid_protocol::BufferInit::Blob(id) => format!("input {}", id.short()),
                    };
                    let out = if b.output { " output" } else { "" };
                    println!("buffer   {:<12} {:>12} bytes  {kind}{out}", b.name, b.size);
                }
                for (i, p) in job.spec.passes.iter().enumerate() {
                    let shader = &job.spec.shaders[p.shader as usize].name;
                    println!(
                        "pass {}   {shader}:{} workgroups {:?}",
                        i + 1,
                        p.entry,
                        p.workgroups
                    );
                }
            }
        }
    }
    Ok(())
}

fn run_local(
    file: &std::path::Path,
    out: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    use hashgrid_node::executor::{ExecConfig, Executor};
    let config = ExecConfig::default();
    let job = load_job_file(file, &config.limits)?;
    let exec = Executor::start(config)?;
    let adapter = exec.profile().name.clone();
    eprintln!(
        "adapter {adapter} ({:?}, {})",
        exec.profile().backend,
        exec.profile().driver
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(exec.run("local", job.spec, job.inputs))?;
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for o in &result.outputs {
            let path = dir.join(format!("{}.bin", o.name));
            std::fs::write(&path, &o.bytes)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    if json {
        let outputs: std::collections::BTreeMap<_, _> = result
            .outputs
            .iter()
            .map(|o| {
                (
                    o.name.clone(),
                    serde_json::json!({ "blake3": o.id.to_string(), "bytes": o.bytes.len() }),
                )
            })
            .collect();
        let passes: Vec<_> = result
            .passes
            .iter()
            .map(|p| serde_json::json!({ "entry": p.entry, "gpu_ms": p.gpu_ms }))
            .collect();
        let v = serde_json::json!({
            "adapter": adapter,
            "outputs": outputs,
            "passes": passes,
            "gpu_ms": result.gpu_ms,
            "wall_ms": result.wall_ms,
        });
        println!("{}", serde_json::to_string(&v).context("encoding JSON")?);
    } else {
        println!("adapter  {adapter}");
        for (i, p) in result.passes.iter().enumerate() {
            println!("pass {}   {:<16} {:>10.3} ms", i + 1, p.entry, p.gpu_ms);
        }
        println!(
            "gpu      {:.3} ms (wall {:.3} ms)",
            result.gpu_ms, result.wall_ms
        );
        for o in &result.outputs {
            println!(
                "output   {:<12} {:>12} bytes  {}",
                o.name,
                o.bytes.len(),
                o.id
            );
        }
    }
    Ok(())
}
