//! `hashgrid-node`: the site daemon. `id` prints the node's PeerId; `run` starts the node from
//! a TOML config (flags > file > defaults; see examples/site.toml) until SIGINT or SIGTERM.

use clap::{Parser, Subcommand};
use hashgrid_node::DataDir;
use hashgrid_node::config::{Overrides, SiteConfig};
use hashgrid_node::{Multiaddr, site};
use hashgrid_protocol::Network;
use std::path::PathBuf;

/// The process allocator: jemalloc, as in every hashgrid binary (docs/PERFORMANCE.md "Market":
/// the order book runs ~1.2× faster on it than on glibc's malloc, for ~20% more memory).
#[cfg(not(hashgrid_system_alloc))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "hashgrid-node",
    version,
    about = "hashgrid site daemon: sell GPU capacity"
)]
struct Cli {
    /// Data directory (default: $XDG_DATA_HOME/hashgrid).
    #[arg(long, global = true, env = "HASHGRID_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log format on stderr: `text` for people, `json` (one object per line, with the job's
    /// and the peer's spans) for log shippers.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "HASHGRID_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print this node's PeerId, creating its identity key if needed.
    ///
    /// Example: hashgrid-node id --data-dir /var/lib/hashgrid
    Id,
    /// Run the site node until SIGINT/SIGTERM.
    ///
    /// Settings: flags override the config file, which overrides the defaults.
    ///
    /// Example: hashgrid-node run --config site.toml --listen /ip4/0.0.0.0/tcp/4001
    Run {
        /// TOML config file (every key optional; see examples/site.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Network to join: main, test, or a private testnet name.
        #[arg(long)]
        network: Option<Network>,
        /// Listen address (repeatable; replaces the config's list).
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<Multiaddr>,
        /// Bootstrap peer, ideally with /p2p/PEER_ID (repeatable; replaces the config's list).
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<Multiaddr>,
        /// Region of this site, e.g. us-east.
        #[arg(long)]
        region: Option<String>,
        /// One flat price in msat per GPU-second (replaces the config's pricing policy).
        #[arg(long)]
        price: Option<u64>,
        /// GPU units offered per GPU.
        #[arg(long)]
        units: Option<u32>,
        /// Disable mDNS discovery on the local network.
        #[arg(long)]
        no_mdns: bool,
        /// Serve the DHT (Kademlia server mode) to the nodes that bootstrap from this one: for
        /// seed nodes. Other nodes only ask it.
        #[arg(long)]
        dht_server: bool,
        /// Do not detect and sell this machine's GPU (relay-only unless [[gpus]] are configured).
        #[arg(long)]
        no_gpu: bool,
        /// Serve Prometheus metrics on this address (`/metrics`), e.g. 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Serve the live dashboard on this address, e.g. 127.0.0.1:8484 (beyond loopback it
        /// wants the token in <data dir>/dashboard-token).
        #[arg(long, value_name = "ADDR")]
        dashboard: Option<std::net::SocketAddr>,
    },
    /// Audit this site's receipt chain (the node must be stopped: it holds the store).
    ///
    /// Checks every receipt's signature and chain link and every countersignature; prints
    /// the chain's length, head and charges. Exit code 5 if the chain is broken.
    ///
    /// Example: hashgrid-node receipts --data-dir /var/lib/hashgrid --network main --json
    Receipts {
        /// The network the receipts were signed for.
        #[arg(long, default_value = "main")]
        network: Network,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// What each buyer owes this site (the node must be stopped: it holds the store): accrued
    /// (countersigned, not invoiced), invoiced, paid (unconfirmed), confirmed and settled, in
    /// msat; and, netted, what this node owes it for its own purchases.
    ///
    /// Example: hashgrid-node earnings --data-dir /var/lib/hashgrid --json
    Earnings {
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The site's Lightning node (`[settle] mode = "lightning"` in the config; the node must
    /// be stopped: it runs the Lightning node itself): status, a funding address, open and
    /// close channels.
    ///
    /// Example: hashgrid-node ln --config site.toml status
    Ln {
        /// TOML config file with the `[settle]` section.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        cmd: hashgrid_node::settle::LnCommand,
    },
    /// The invoices this site issued, with their state and payment address (the node must be
    /// stopped).
    ///
    /// Example: hashgrid-node invoices --unpaid
    Invoices {
        /// Only invoices not yet confirmed.
        #[arg(long)]
        unpaid: bool,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Installs the SIGINT/SIGTERM handlers now (a signal that arrives before the daemon awaits
/// them must not kill it with the default action) and resolves on the first signal.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let (mut term, mut int) = (term, int);
            let t = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let i = async {
                match int.as_mut() {
                    Some(i) => {
                        i.recv().await;
                    }
                    None => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            tokio::select! { _ = t => {}, _ = i => {} }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,libp2p_gossipsub=warn,libp2p_kad=error".into())
    };
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(color())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
    }
    match cli.command {
        Command::Id => {
            let dir = DataDir::new(cli.data_dir.unwrap_or_else(DataDir::default_root));
            let key = dir.load_or_create_identity()?;
            println!("{}", key.peer_id());
        }
        Command::Receipts { network, json } => {
            let dir = DataDir::new(cli.data_dir.unwrap_or_else(DataDir::default_root));
            let key = dir.load_or_create_identity()?;
            let store = hashgrid_node::store::Store::open(&dir.root().join("store"))?;
            match hashgrid_node::jobs::audit_receipts(&store, key.public(), &network) {
                Ok(report) if json => println!("{}", serde_json::to_string_pretty(&report)?),
                Ok(r) => {
                    println!(
                        "{} receipts in an unbroken chain, {} countersigned",
                        r.receipts, r.countersigned
                    );
                    if let Some(h) = r.head {
                        println!("head: {h}");
                    }
                    println!(
                        "charged: {} msat ({} msat countersigned)",
                        r.total_charged_msat, r.countersigned_msat
                    );
                }
                Err(e) => {
                    eprintln!("error: the receipt chain does not verify: {e}");
                    std::process::exit(5);
                }
            }
        }
        Command::Earnings { json } => {
            let dir = DataDir::new(cli.data_dir.unwrap_or_else(DataDir::default_root));
            let store = hashgrid_node::store::Store::open(&dir.root().join("store"))?;
            let all = hashgrid_node::settle::earnings_from_store(&store)?;
            if json {
                let rows: Vec<_> = all
                    .iter()
                    .map(|(k, p)| serde_json::json!({"counterparty": k.to_string(), "as_buyer": p.as_buyer, "owed_to_it_msat": p.owed_to_it.0}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if all.is_empty() {
                println!("no countersigned receipts yet");
            } else {
                println!(
                    "{:<10} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14}",
                    "BUYER", "ACCRUED", "INVOICED", "PAID", "CONFIRMED", "SETTLED", "WE OWE IT"
                );
                for (k, p) in &all {
                    let e = p.as_buyer;
                    println!(
                        "{:<10} {:>14} {:>14} {:>14} {:>14} {:>14} {:>14}",
                        k.short(),
                        e.accrued.0,
                        e.invoiced.0,
                        e.paid.0,
                        e.confirmed.0,
                        e.settled.0,
                        p.owed_to_it.0
                    );
                }
                println!(
                    "(msat; 1 sat = 1000 msat. Invoices bill whole sats; the rest stays accrued.)"
                );
            }
        }
        Command::Ln { config, json, cmd } => {
            let file = SiteConfig::load(&config)?;
            let root = cli
                .data_dir
                .or(file.data_dir.clone())
                .unwrap_or_else(DataDir::default_root);
            let section = file.settle.clone();
            let v = tokio::task::spawn_blocking({
                let cmd = cmd.clone();
                move || hashgrid_node::settle::ln_command(&section, &root, &cmd)
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", hashgrid_node::settle::ln_render(&cmd, &v));
            }
        }
        Command::Invoices { unpaid, json } => {
            let dir = DataDir::new(cli.data_dir.unwrap_or_else(DataDir::default_root));
            let store = hashgrid_node::store::Store::open(&dir.root().join("store"))?;
            let mut rows = Vec::new();
            for (out, rec) in hashgrid_node::settle::issued_from_store(&store)? {
                let Ok(inv) = out.invoice.decode_unverified() else {
                    continue;
                };
                let state = rec.map_or("unknown".to_string(), |r| format!("{:?}", r.state));
                let open = state.starts_with("Issued") || state.starts_with("Paid");
                if unpaid && !open {
                    continue;
                }
                let (address, amount_sat) = match &inv.payment {
                    hashgrid_protocol::InvoicePayment::Onchain {
                        address,
                        amount_sat,
                    } => (address.clone(), *amount_sat),
                    hashgrid_protocol::InvoicePayment::Ledger => {
                        ("ledger".into(), inv.amount.0 / 1000)
                    }
                    hashgrid_protocol::InvoicePayment::Lightning { request } => {
                        (request.clone(), inv.amount.0 / 1000)
                    }
                };
                rows.push(serde_json::json!({
                    "invoice": out.invoice.id().to_string(),
                    "buyer": inv.buyer.to_string(),
                    "amount_sat": amount_sat,
                    "amount_msat": inv.amount.0,
                    "address": address,
                    "state": state,
                    "seen_sat": out.seen_sat,
                    "problem": out.problem,
                    "expires_at_ms": inv.expires_at.0,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no invoices");
            } else {
                for r in &rows {
                    println!(
                        "{}  {:>10} sat  {}  {}",
                        &r["invoice"].as_str().unwrap_or("")[..12],
                        r["amount_sat"],
                        r["address"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Command::Run {
            config,
            network,
            listen,
            bootstrap,
            region,
            price,
            units,
            no_mdns,
            dht_server,
            no_gpu,
            metrics,
            dashboard,
        } => {
            let file = match &config {
                Some(path) => SiteConfig::load(path)?,
                None => SiteConfig::default(),
            };
            let overrides = Overrides {
                data_dir: cli.data_dir,
                network,
                listen,
                bootstrap,
                region,
                price,
                units,
                no_mdns,
                dht_server,
                no_gpu,
                metrics,
                dashboard,
            };
            // SIGHUP re-reads the file, with the same flags on top.
            let reload = config.map(|path| {
                let o = overrides.clone();
                Box::new(move || SiteConfig::load(&path).map(|f| f.apply(o.clone())))
                    as site::Reload
            });
            site::run_site_with(file.apply(overrides), reload, shutdown_signal()).await?;
        }
    }
    Ok(())
}

/// Colours only on a terminal, and never with `NO_COLOR` set.
fn color() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}
