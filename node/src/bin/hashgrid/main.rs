//! `hashgrid`: the buyer CLI. It embeds the node library as a client (no GPU needed): find
//! offers, submit jobs through the market and get verified outputs with countersigned
//! receipts; list jobs and receipts from the local store; and, without any network, inspect
//! job files, run them on this machine's GPU, and verify anyone's receipt.
//!
//! This file is the command tree (every command's flags and help text, in clap's derive
//! form), the exit codes and the dispatch; the commands themselves live in `client`,
//! `market`, `generate`, `serve` and `wallet`. It is about 800 lines because the help texts are.
//!
//! Machine output (`--json`) goes to stdout, logs and progress to stderr. Exit codes:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | ok |
//! | 1 | other error (network unreachable, store in use, I/O) |
//! | 2 | bad input: unreadable or malformed file, invalid job (WGSL, bindings, limits), bad flag |
//! | 3 | no match: no provider serves the job within the price and requirements |
//! | 4 | provider failure: providers agreed but failed (disconnected, timed out, errored) |
//! | 5 | verification failed: a signature, countersignature, charge or output hash is wrong |
//! | 130 | cancelled with Ctrl-C |

mod client;
mod generate;
mod local;
mod market;
mod serve;
mod wallet;

use anyhow::Context;
use clap::{ArgAction, Parser, Subcommand, ValueEnum};

/// The process allocator: jemalloc, as in every hashgrid binary (docs/PERFORMANCE.md "Market":
/// the order book runs ~1.2× faster on it than on glibc's malloc, for ~20% more memory).
#[cfg(not(hashgrid_system_alloc))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use hashgrid_node::{Multiaddr, NodeError, OfferSort};
use hashgrid_protocol::{JobLimits, Network, load_job_file};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for other errors.
pub(crate) const EXIT_OTHER: u8 = 1;
/// Exit code for bad input: a file that cannot be read or parsed, an invalid job, a bad flag.
pub(crate) const EXIT_BAD_INPUT: u8 = 2;
/// Exit code when no provider serves the job within the price and requirements.
pub(crate) const EXIT_NO_MATCH: u8 = 3;
/// Exit code when providers agreed but failed.
pub(crate) const EXIT_PROVIDER_FAILED: u8 = 4;
/// Exit code for a failed verification.
pub(crate) const EXIT_VERIFY_FAILED: u8 = 5;
/// Exit code after Ctrl-C.
pub(crate) const EXIT_CANCELLED: u8 = 130;

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 other error, 2 bad input, 3 no match within the price, \
4 provider failure, 5 verification failed, 130 cancelled.";

/// An error with its exit code and what to do next.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) code: u8,
    pub(crate) message: String,
    pub(crate) hint: String,
}

impl CliError {
    pub(crate) fn bad_input(message: impl Into<String>, hint: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_BAD_INPUT,
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub(crate) fn other(message: impl Into<String>, hint: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_OTHER,
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub(crate) fn verify(message: impl Into<String>, hint: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_VERIFY_FAILED,
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub(crate) fn node(e: NodeError) -> CliError {
        CliError::other(
            e.to_string(),
            "run the command again; -v shows the node's logs",
        )
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> CliError {
        CliError::bad_input(format!("{e:#}"), "fix the file and run again")
    }
}

/// Flags every command takes.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Global {
    /// Data directory: keys, config, jobs and receipts (default: $XDG_DATA_HOME/hashgrid/buyer).
    #[arg(long, global = true, env = "HASHGRID_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Network: main, test, or a private testnet's name (default: the config's, else main).
    #[arg(long, global = true)]
    pub(crate) network: Option<Network>,
    /// A peer to join through, ideally ending in /p2p/PEER_ID (repeatable; adds to the config's).
    #[arg(long, global = true, value_name = "MULTIADDR")]
    pub(crate) bootstrap: Vec<Multiaddr>,
    /// Machine output: JSON on stdout; logs and progress on stderr.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// More logs on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub(crate) verbose: u8,
    /// No progress, only errors, on stderr.
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
}

#[derive(Parser)]
#[command(
    name = "hashgrid",
    version,
    about = "hashgrid: buy GPU compute on a peer-to-peer market",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum SortArg {
    /// Lowest msat per GPU-second first.
    Price,
    /// Lowest msat per GPU-second per GFLOP/s of measured throughput first.
    PricePerGflop,
}

#[derive(Subcommand)]
enum Command {
    /// Create this buyer's key and config file; print the PeerId and where things are.
    ///
    /// Example: hashgrid init --network test --bootstrap /ip4/203.0.113.7/tcp/4001/p2p/12D3KooW...
    Init {
        /// Overwrite an existing config file with these flags.
        #[arg(long)]
        force: bool,
    },
    /// The live book: offers that meet the filters, after waiting briefly for the book to fill.
    ///
    /// Example: hashgrid offers --region us-east --min-memory 24 --sort price-per-gflop --limit 10
    #[command(after_help = EXIT_CODES)]
    Offers {
        /// Only this region.
        #[arg(long)]
        region: Option<String>,
        /// At least this much GPU memory, in GiB.
        #[arg(long, value_name = "GiB")]
        min_memory: Option<f64>,
        /// At least this measured matmul throughput, in GFLOP/s.
        #[arg(long, value_name = "X")]
        min_gflops: Option<f64>,
        /// At most this price, in msat per GPU-second.
        #[arg(long, value_name = "MSAT")]
        max_price: Option<u64>,
        /// Sort order.
        #[arg(long, value_enum, default_value = "price")]
        sort: SortArg,
        /// Most offers shown (0: all).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Run a job through the market: validate it locally, match, agree, upload, run, download,
    /// verify; write the outputs and the countersigned receipt. Ctrl-C cancels.
    ///
    /// Example: hashgrid submit examples/kernels/matmul/job.toml --max-price 200 --out out/
    #[command(after_help = EXIT_CODES)]
    Submit {
        /// The job file (TOML).
        file: PathBuf,
        /// Highest price, in msat per GPU-second (default: any).
        #[arg(long, value_name = "MSAT")]
        max_price: Option<u64>,
        /// Longest run, in seconds (also caps the charge).
        #[arg(long, value_name = "S", default_value_t = 60)]
        max_seconds: u32,
        /// Only providers in this region.
        #[arg(long)]
        region: Option<String>,
        /// At least this much GPU memory, in GiB.
        #[arg(long, value_name = "GiB")]
        min_memory: Option<f64>,
        /// At least this measured matmul throughput, in GFLOP/s.
        #[arg(long, value_name = "X")]
        min_gflops: Option<f64>,
        /// Write the outputs (`<name>.bin`) and `receipt.json` here.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Most providers tried if one fails.
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        /// Re-execution on independent providers: none, spot:P (a second provider with
        /// probability P) or replicate:K (always K providers). Overrides the job file's
        /// `verify`; float outputs compare within the file's `compare = { rtol, atol }`.
        #[arg(long, value_name = "MODE")]
        verify: Option<String>,
    },
    /// Jobs submitted from this data dir, oldest first (from the local store).
    ///
    /// Example: hashgrid jobs --json
    Jobs,
    /// One job's state, provider, charge and attempts (id or unique prefix).
    ///
    /// Example: hashgrid status 5e702a81
    Status {
        /// Job id or a unique prefix.
        job: String,
    },
    /// Write a done job's outputs and receipt to a directory (from the local store).
    ///
    /// Example: hashgrid result 5e702a81 --out out/
    Result {
        /// Job id or a unique prefix.
        job: String,
        /// Where to write `<name>.bin` and `receipt.json`.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// What this buyer has seen of each provider it ran jobs with: jobs completed, failed and
    /// disputed (receipt or outputs did not verify, or a majority of re-executions
    /// contradicted them), spot checks passed, fraud reports from other buyers, mean time to a
    /// verified receipt, msat spent, and the reputation score matching ranks by (from the
    /// local store).
    ///
    /// Example: hashgrid providers --json
    Providers,
    /// The countersigned receipts of this data dir's jobs; --verify checks every signature
    /// and stored output again (exit 5 if any fails).
    ///
    /// Example: hashgrid receipts --verify
    Receipts {
        /// Verify signatures, countersignatures and stored outputs.
        #[arg(long)]
        verify: bool,
    },
    /// The buyer's Bitcoin wallet (on-chain settlement: `[settle] mode = "onchain"`).
    #[command(subcommand)]
    Wallet(WalletCommand),
    /// The buyer's Lightning node (`[settle] mode = "lightning"`): status, a funding
    /// address, open and close channels.
    #[command(subcommand)]
    Ln(hashgrid_node::settle::LnCommand),
    /// Invoices providers sent this buyer, with their state (from the local store).
    ///
    /// Example: hashgrid invoices --unpaid
    Invoices {
        /// Only invoices not yet paid.
        #[arg(long)]
        unpaid: bool,
    },
    /// Job files.
    #[command(subcommand)]
    Job(JobCommand),
    /// Receipts (anyone's, offline).
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Generate text with a GGUF language model, compiled to a job: on this machine's adapter
    /// with --local (text streams as it is generated), else through the market.
    ///
    /// Example: hashgrid generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is Bitcoin?" --chat --local
    #[command(after_help = EXIT_CODES)]
    Generate {
        /// The model (GGUF: llama, mistral or qwen2 architecture).
        #[arg(long, value_name = "FILE.gguf")]
        model: PathBuf,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Render the prompt as one user message through the model's chat template.
        #[arg(long)]
        chat: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Run on this machine's GPU adapter, without the market.
        #[arg(long)]
        local: bool,
        /// Through the market: highest price, in msat per GPU-second (default: any).
        #[arg(long, value_name = "MSAT")]
        max_price: Option<u64>,
        /// Through the market: longest run, in seconds (also caps the charge).
        #[arg(long, value_name = "S", default_value_t = 60)]
        max_seconds: u32,
        /// Through the market: re-execution on independent providers (none, spot:P,
        /// replicate:K); the tokens compare up to the first near-tie. Default: the config's
        /// `verify`.
        #[arg(long, value_name = "MODE")]
        verify: Option<String>,
    },
    /// Chat with a GGUF language model on this machine's adapter: each line is a user turn,
    /// the history is kept; Ctrl-C stops a reply, an empty line or Ctrl-D quits.
    ///
    /// Example: hashgrid chat --model SmolLM2-135M-Instruct.Q4_1.gguf
    Chat {
        /// The model (GGUF).
        #[arg(long, value_name = "FILE.gguf")]
        model: PathBuf,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Sentence embeddings with a BERT sentence-transformers model (e.g. all-MiniLM-L6-v2),
    /// one job per text: on this machine's adapter with --local, else through the market.
    /// --json prints OpenAI's embeddings response.
    ///
    /// Example: hashgrid embed --model all-MiniLM-L6-v2/ --local --json -- "A man is eating food." "A man is eating bread."
    #[command(after_help = EXIT_CODES)]
    Embed {
        /// The model directory (config.json, model.safetensors, tokenizer.json).
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Run on this machine's GPU adapter, without the market.
        #[arg(long)]
        local: bool,
        /// Through the market: highest price, in msat per GPU-second (default: any).
        #[arg(long, value_name = "MSAT")]
        max_price: Option<u64>,
        /// The texts.
        #[arg(last = true, required = true)]
        texts: Vec<String>,
    },
    /// Serve the OpenAI API (chat, completions, embeddings) on HTTP; every request runs as a
    /// job through the market (or on this machine's adapter with --local). Models and keys
    /// come from the flags or the config's [serve] section.
    ///
    /// Example: hashgrid serve --model SmolLM2-135M-Instruct.Q4_1.gguf --model minilm=all-MiniLM-L6-v2/
    Serve {
        /// A model to serve: PATH or ID=PATH (GGUF file, or embedding model directory);
        /// repeat for more. The id defaults to the file name without .gguf.
        #[arg(long = "model", value_name = "[ID=]PATH")]
        models: Vec<String>,
        /// Address to listen on (default 127.0.0.1:8080; port 0 picks a free one).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Run requests on this machine's GPU adapter, without the market.
        #[arg(long)]
        local: bool,
        /// Through the market: highest price, in msat per GPU-second (default: any).
        #[arg(long, value_name = "MSAT")]
        max_price: Option<u64>,
        /// A file of API keys, one per line; requests must send one as a Bearer token.
        #[arg(long, value_name = "FILE")]
        api_keys_file: Option<PathBuf>,
        /// Serve Prometheus metrics (the gateway's, and its node's) on this address.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Serve the live dashboard (requests, spend, the node) on this address (loopback
        /// only; not with --local).
        #[arg(long, value_name = "ADDR")]
        dashboard: Option<std::net::SocketAddr>,
        /// Re-execute every request on independent providers (none, spot:P, replicate:K):
        /// tokens compare up to the first near-tie, embeddings within a tolerance. Default:
        /// the config's `verify`.
        #[arg(long, value_name = "MODE")]
        verify: Option<String>,
        /// Shape language models' kernels for a GPU or for a CPU adapter such as lavapipe.
        /// auto: this machine's adapter with --local; through the market, per request, the
        /// device of the cheapest ask that meets the terms.
        #[arg(long, value_enum, default_value_t = Kernels::Auto)]
        kernels: Kernels,
    },
    /// Run a job file on this machine's GPU adapter, without any network.
    ///
    /// Example: hashgrid run-local examples/kernels/saxpy/job.toml --json
    RunLocal {
        /// The job file (TOML).
        file: PathBuf,
        /// Write each output buffer to `DIR/<name>.bin`.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// Decoding settings shared by `generate` and `chat`.
#[derive(clap::Args, Debug, Clone)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 is greedy (the most likely token every step); above 0 samples.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: u32,
    /// Sample only among the most likely tokens whose probability reaches P.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    seed: u32,
    /// Shape the model's kernels for a GPU or for a CPU adapter such as lavapipe (each runs
    /// anywhere, several times slower on the other kind). auto: this machine's adapter with
    /// --local; through the market, whose provider is chosen after the job is compiled, the
    /// device of the cheapest ask in the book that meets the terms.
    #[arg(long, value_enum, default_value_t = Kernels::Auto)]
    kernels: Kernels,
}

/// `--kernels`: the adapter kind a language model job's kernels are shaped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kernels {
    /// The adapter's own kind where it is known (this machine's, with --local), else the
    /// kind of the cheapest ask in the book.
    Auto,
    /// CPU adapters (lavapipe): several rows per invocation.
    Cpu,
    /// GPUs: several invocations per row.
    Gpu,
}

impl Kernels {
    /// `None` for auto.
    fn target(self) -> Option<hashgrid_infer::Target> {
        match self {
            Kernels::Auto => None,
            Kernels::Cpu => Some(hashgrid_infer::Target::Cpu),
            Kernels::Gpu => Some(hashgrid_infer::Target::Gpu),
        }
    }
}

impl SamplingArgs {
    fn sampling(&self) -> hashgrid_infer::Sampling {
        hashgrid_infer::Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Subcommand)]
enum WalletCommand {
    /// A fresh receive address (keys are created on first use, in DATA_DIR/wallet.json, 0600).
    ///
    /// Example: hashgrid wallet address
    Address,
    /// Sync with the chain backend and print the balance.
    ///
    /// Example: hashgrid wallet balance --json
    Balance,
    /// Pay AMOUNT sats to ADDRESS: build, sign and broadcast; prints the txid.
    ///
    /// Example: hashgrid wallet send tb1p... 25000 --fee-rate 3
    Send {
        /// Destination address (of the wallet's network).
        address: String,
        /// Amount in sats.
        amount: u64,
        /// Fee rate in sat/vB (default from the config, else 2).
        #[arg(long)]
        fee_rate: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Verify a receipt file offline: the provider's signature, the buyer's countersignature,
    /// and (with --outputs) that each output file hashes to the receipt's id.
    ///
    /// Example: hashgrid receipt verify receipts/3f2a.json --outputs out/
    #[command(after_help = EXIT_CODES)]
    Verify {
        /// The receipt file (JSON).
        file: PathBuf,
        /// A directory with the outputs as `<name>.bin`, to check against the receipt.
        #[arg(long)]
        outputs: Option<PathBuf>,
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
    },
}

fn init_logs(g: &Global) {
    let level = if g.quiet {
        "error"
    } else {
        match g.verbose {
            0 => "warn",
            1 => "info,libp2p=warn",
            _ => "debug",
        }
    };
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(color())
        .try_init();
}

fn rt() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::other(format!("cannot start the runtime: {e}"), ""))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let g = cli.global;
    init_logs(&g);
    let result: Result<(), CliError> = match cli.command {
        Command::Init { force } => market::init(&g, force),
        Command::Offers {
            region,
            min_memory,
            min_gflops,
            max_price,
            sort,
            limit,
        } => rt().and_then(|rt| {
            rt.block_on(market::offers(
                &g,
                market::OffersArgs {
                    region,
                    min_memory_gib: min_memory,
                    min_gflops,
                    max_price,
                    sort: match sort {
                        SortArg::Price => OfferSort::Price,
                        SortArg::PricePerGflop => OfferSort::PricePerGflop,
                    },
                    limit,
                },
            ))
        }),
        Command::Submit {
            file,
            max_price,
            max_seconds,
            region,
            min_memory,
            min_gflops,
            out,
            attempts,
            verify,
        } => rt().and_then(|rt| {
            rt.block_on(market::submit(
                &g,
                market::SubmitArgs {
                    file,
                    max_price,
                    max_seconds,
                    region,
                    min_memory_gib: min_memory,
                    min_gflops,
                    out,
                    attempts,
                    verify,
                },
            ))
        }),
        Command::Jobs => local::jobs(&g),
        Command::Status { job } => local::status(&g, &job),
        Command::Result { job, out } => local::result(&g, &job, &out),
        Command::Receipts { verify } => local::receipts(&g, verify),
        Command::Providers => local::providers(&g),
        Command::Wallet(WalletCommand::Address) => wallet::address(&g),
        Command::Wallet(WalletCommand::Balance) => wallet::balance(&g),
        Command::Wallet(WalletCommand::Send {
            address,
            amount,
            fee_rate,
        }) => wallet::send(&g, &address, amount, fee_rate),
        Command::Invoices { unpaid } => wallet::invoices(&g, unpaid),
        Command::Ln(cmd) => wallet::ln(&g, &cmd),
        Command::Job(cmd) => job(cmd, g.json).map_err(CliError::from),
        Command::Generate {
            model,
            prompt,
            chat,
            sampling,
            local,
            max_price,
            max_seconds,
            verify,
        } => rt().and_then(|rt| {
            rt.block_on(generate::generate(
                &g,
                generate::GenerateArgs {
                    model,
                    prompt,
                    chat,
                    max_tokens: sampling.max_tokens,
                    sampling: sampling.sampling(),
                    kernels: sampling.kernels.target(),
                    local,
                    max_price,
                    max_seconds,
                    verify,
                },
            ))
        }),
        Command::Chat { model, sampling } => rt().and_then(|rt| {
            rt.block_on(generate::chat(
                &g,
                &model,
                sampling.max_tokens,
                sampling.sampling(),
                sampling.kernels.target(),
            ))
        }),
        Command::Serve {
            models,
            listen,
            local,
            max_price,
            api_keys_file,
            metrics,
            dashboard,
            verify,
            kernels,
        } => rt().and_then(|rt| {
            rt.block_on(serve::serve(
                &g,
                serve::ServeArgs {
                    models,
                    listen,
                    local,
                    max_price,
                    api_keys_file,
                    metrics,
                    dashboard,
                    verify,
                    kernels: kernels.target(),
                },
            ))
        }),
        Command::Embed {
            model,
            local,
            max_price,
            texts,
        } => rt().and_then(|rt| rt.block_on(generate::embed(&g, &model, &texts, local, max_price))),
        Command::RunLocal { file, out } => {
            run_local(&file, out.as_deref(), g.json).map_err(CliError::from)
        }
        Command::Receipt(ReceiptCommand::Verify { file, outputs }) => {
            return receipt_verify(&file, outputs.as_deref(), g.json);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            if !e.hint.is_empty() {
                eprintln!("hint: {}", e.hint);
            }
            ExitCode::from(e.code)
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
            "agreement_checked": rf.agreement.is_some(),
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
        match &rf.agreement {
            Some(a) => println!(
                "  agreement {} (countersigned; the charge is within its terms)",
                a.signed.id()
            ),
            None => println!(
                "  agreement not in the file (written before files carried it): charge unchecked"
            ),
        }
        match receipt.prev_receipt {
            Some(prev) => println!("  chain     #{} after receipt {prev}", receipt.chain_seq),
            None => println!("  chain     #{} (the provider's first)", receipt.chain_seq),
        }
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

fn job(cmd: JobCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        JobCommand::Inspect { file } => {
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
    let result = rt.block_on(exec.run("local", job.spec, job.inputs));
    // Release the GPU before the process exits (see `Executor::shutdown`).
    exec.shutdown();
    let result = result?;
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

/// Colours only on a terminal, and never with `NO_COLOR` set.
fn color() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}
