//! `hashgrid-testnet`: N real `hashgrid-node` processes in R regions on this machine, B buyers,
//! J jobs from the reference kernels, optional SIGKILLs, and a report (stdout; `--json FILE`
//! also writes `FILE` and an SVG latency chart next to it). Every site process is stopped at
//! the end, on failure and on Ctrl-C.
//!
//! Exit codes: 0 every check passed; 1 the testnet could not run; 3 it ran but a check
//! failed (a job, a receipt, a chain, settlement, or a leftover process).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hashgrid_testnet::{Config, sites};

/// The process allocator: jemalloc, as in every hashgrid binary (docs/PERFORMANCE.md "Market":
/// the order book runs ~1.2× faster on it than on glibc's malloc, for ~20% more memory).
#[cfg(not(hashgrid_system_alloc))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "hashgrid-testnet",
    version,
    about = "Run a local hashgrid testnet of real site processes and report on it",
    after_help = "Examples:\n  . scripts/models.sh && cargo run --release -p hashgrid-testnet -- --sites 3 --workload mixed --json chat.json\n  cargo run --release -p hashgrid-testnet -- --workload jobs --sites 40 --regions 4 --jobs 200 --kill-rate 0.05 --json report.json"
)]
struct Cli {
    /// Provider sites (hashgrid-node processes).
    #[arg(long, default_value_t = 8)]
    sites: usize,
    /// Regions the sites are spread over (at most 8).
    #[arg(long, default_value_t = 2)]
    regions: usize,
    /// Buyers (in-process nodes submitting jobs).
    #[arg(long, default_value_t = 2)]
    buyers: usize,
    /// Jobs in total, drawn from the reference kernels.
    #[arg(long, default_value_t = 20)]
    jobs: usize,
    /// Length of the workload in seconds: submissions are spread over its first 3/4.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Seconds to wait after the books converge before the workload (and the kills) start,
    /// so that it does not run into the sites' own start-up (40 processes starting at once on
    /// a small machine keep its cores busy for a few seconds after their asks are out).
    #[arg(long, default_value_t = 0)]
    settle: u64,
    /// Fraction of sites SIGKILLed (and restarted after 1 s) every 5 s (at least one).
    #[arg(long, default_value_t = 0.0)]
    kill_rate: f64,
    /// Delay between regions, in ms each way: one network namespace per region with netem
    /// (needs root, iproute2 and the netem qdisc); otherwise the nodes hold back the bytes of
    /// the connections they dial to another region's sites (a user-space delay).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Write the report as JSON here, and an SVG chart next to it.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Keep the sites' data dirs and logs here (default: a temporary dir, removed).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Sites serve Prometheus metrics; write a scrape config for all of them to FILE (see
    /// examples/ops/).
    #[arg(long, value_name = "FILE")]
    prometheus: Option<PathBuf>,
    /// The hashgrid-node binary (default: next to this one).
    #[arg(long, value_name = "PATH")]
    node_binary: Option<PathBuf>,
    /// What to drive: `jobs` (the reference kernels through in-process buyers), `chat`
    /// (OpenAI chat requests through a `hashgrid serve` gateway) or `mixed` (chat and
    /// embeddings).
    #[arg(long, value_enum, default_value_t = Workload::Chat)]
    workload: Workload,
    /// chat/mixed: how the gateway pays the sites (`lightning`: channels on an in-process
    /// test chain; `ledger`: IOUs). The jobs workload settles in the ledger.
    #[arg(long, value_enum, default_value_t = Payments::Lightning)]
    payments: Payments,
    /// chat/mixed: the GGUF model (default: $HASHGRID_SMOLLM2).
    #[arg(long, value_name = "FILE.gguf", env = "HASHGRID_SMOLLM2")]
    model: Option<PathBuf>,
    /// mixed: the embedding model directory (default: $HASHGRID_MINILM).
    #[arg(long, value_name = "DIR", env = "HASHGRID_MINILM")]
    embed_model: Option<PathBuf>,
    /// chat/mixed: chat requests in the concurrent phase.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// chat/mixed: requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// chat/mixed: tokens per answer.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
}

/// How the chat demo's buyer pays the sites.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Payments {
    /// Over Lightning, on an in-process test chain: a channel from the gateway to every site,
    /// every receipt invoiced and paid to the msat.
    Lightning,
    /// Countersigned receipts as IOUs (no chain).
    Ledger,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    Jobs,
    Chat,
    Mixed,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "hashgrid_testnet=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let cli = Cli::parse();
    let node_binary = match cli
        .node_binary
        .clone()
        .map_or_else(|| sites::find_binary("hashgrid-node"), Ok)
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    if cli.workload != Workload::Jobs {
        return chat(cli, node_binary).await;
    }
    let cfg = Config {
        sites: cli.sites,
        regions: cli.regions,
        buyers: cli.buyers,
        jobs: cli.jobs,
        duration: Duration::from_secs(cli.duration),
        settle: Duration::from_secs(cli.settle),
        kill_rate: cli.kill_rate,
        latency_ms: cli.latency_ms,
        node_binary,
        work_dir: cli.work_dir,
        prometheus: cli.prometheus,
    };
    // Ctrl-C drops the run: every Site is killed in its Drop.
    let report = tokio::select! {
        r = hashgrid_testnet::run(cfg) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: stopping every site");
            return ExitCode::from(130);
        }
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    println!("{report}");
    if let Some(path) = &cli.json {
        match hashgrid_testnet::write_report(&report, path) {
            Ok(svg) => println!("report: {} and {}", path.display(), svg.display()),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(1);
            }
        }
    }
    if report.all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

/// `--workload chat|mixed`.
async fn chat(cli: Cli, node_binary: PathBuf) -> ExitCode {
    let cli_binary = match sites::find_binary("hashgrid") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let Some(model) = cli.model else {
        eprintln!(
            "error: --workload chat needs --model FILE.gguf (or HASHGRID_SMOLLM2): `. scripts/models.sh` fetches SmolLM2 and sets it; --workload jobs runs the kernel demo"
        );
        return ExitCode::from(1);
    };
    let mixed = cli.workload == Workload::Mixed;
    let cfg = hashgrid_testnet::chat::ChatConfig {
        sites: cli.sites,
        requests: cli.requests,
        concurrency: cli.concurrency,
        warm_requests: 8,
        embed_requests: if mixed { cli.requests } else { 0 },
        max_tokens: cli.max_tokens,
        model,
        embed_model: if mixed { cli.embed_model } else { None },
        node_binary,
        cli_binary,
        work_dir: cli.work_dir,
        prometheus: cli.prometheus,
        lightning: cli.payments == Payments::Lightning,
    };
    let report = tokio::select! {
        r = hashgrid_testnet::chat::run_chat(cfg) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: stopping every site");
            return ExitCode::from(130);
        }
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    println!("{report}");
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("error: writing {}: {e}", path.display());
            return ExitCode::from(1);
        }
        println!("report: {}", path.display());
    }
    let ok = report.settlement.ok
        && report.concurrent.failed == 0
        && report.cache.iter().any(|c| c.hits > 0);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}
