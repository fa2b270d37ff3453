//! The marketplace in one process: three sites in two regions advertise GPU capacity at
//! different prices, a buyer submits the reference matmul with requirements and a price limit,
//! the job is matched, agreed, run on the chosen site's GPU (this machine's adapter; lavapipe
//! without a GPU) and returned with a receipt that the buyer verifies, countersigns and writes
//! to a file anyone can verify offline.
//!
//! `cargo run -p hashgrid-examples --example market [-- OUT_DIR]`

use hashgrid_node::jobs::IntoSharedInputs;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_node::jobs::{JobOptions, JobState, Submission};
use hashgrid_node::{AskSpec, ExecConfig, Executor, Node, NodeEvent, NodeHandle};
use hashgrid_protocol::{
    JobLimits, Msat, Network, ReceiptFile, Requirements, check_outputs, load_job_file,
    verify_receipt_file,
};

/// The sites' executors, shut down before the process exits.
static EXECUTORS: std::sync::Mutex<Vec<Executor>> = std::sync::Mutex::new(Vec::new());

struct Site {
    name: &'static str,
    region: &'static str,
    memory_gib: u64,
    price: u64,
}

const SITES: [Site; 3] = [
    // The cheapest site's GPU is too small for the job's requirement.
    Site {
        name: "site-a",
        region: "us-east",
        memory_gib: 2,
        price: 80,
    },
    Site {
        name: "site-b",
        region: "us-east",
        memory_gib: 16,
        price: 120,
    },
    Site {
        name: "site-c",
        region: "eu-north",
        memory_gib: 16,
        price: 150,
    },
];

async fn start_site(
    net: &Network,
    site: &Site,
    boot: Option<&hashgrid_node::Multiaddr>,
) -> anyhow::Result<NodeHandle> {
    let mem = site.memory_gib << 30;
    let exec = tokio::task::spawn_blocking(move || {
        Executor::start(ExecConfig {
            memory_bytes: Some(mem),
            max_concurrent: 1,
            ..ExecConfig::default()
        })
    })
    .await?
    .context("no GPU adapter: install Mesa's lavapipe (apt-get install -y mesa-vulkan-drivers)")?;
    let gpu = exec.profile();
    EXECUTORS
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .push(exec.clone());
    let mut b = Node::builder()
        .network(net.clone())
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .mdns(false)
        .region(site.region)
        .gpu_profiles(vec![gpu.clone()])
        .units(1)
        .executor(exec);
    if let Some(a) = boot {
        b = b.bootstrap(a.clone());
    }
    let node = b.start().await?;
    node.market()
        .post_ask(AskSpec {
            gpu: gpu.clone(),
            units: 1,
            price: Msat(site.price),
            max_seconds: 600,
        })
        .await?;
    println!(
        "{}  {:<8}  {}  {:>3} GiB  {:>5} msat/GPU-s  peer {}",
        site.name,
        site.region,
        gpu.name,
        site.memory_gib,
        site.price,
        node.peer_id()
    );
    Ok(node)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let out_dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("hashgrid-demo"));
    let net = Network::new("demo")?;

    println!("sites advertise:");
    let first = start_site(&net, &SITES[0], None).await?;
    let boot = first.peers().listen_addrs().await?[0].clone();
    let mut sites = vec![first];
    for s in &SITES[1..] {
        sites.push(start_site(&net, s, Some(&boot)).await?);
    }

    let buyer = Node::builder()
        .network(net.clone())
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .mdns(false)
        .bootstrap(boot)
        .start()
        .await?;
    let t = Instant::now();
    while buyer.market().book().await?.asks.len() < SITES.len() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the buyer's book did not fill in 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "buyer's book holds {} asks after {:?}",
        SITES.len(),
        t.elapsed()
    );

    let path = hashgrid_examples::kernels_dir().join("matmul/job.toml");
    let job = load_job_file(&path, &JobLimits::default())?;
    let sub = Submission {
        spec: job.spec,
        inputs: job.inputs.into_shared(),
        options: JobOptions {
            max_price: Some(Msat(140)),
            max_seconds: 60,
            requirements: Requirements {
                min_memory_bytes: 8 << 30,
                ..Requirements::default()
            },
            ..JobOptions::default()
        },
    };
    println!(
        "\nbuyer submits examples/kernels/matmul/job.toml (needs >= 8 GiB, pays <= 140 msat/GPU-s):"
    );
    let mut events = buyer.events();
    let t = Instant::now();
    let id = buyer.jobs().submit(sub).await?;
    let name_of = |p: &hashgrid_protocol::PublicKey| {
        sites
            .iter()
            .zip(&SITES)
            .find(|(n, _)| n.public_key() == *p)
            .map_or("?", |(_, s)| s.name)
    };
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), events.recv()).await??;
        let NodeEvent::Job(u) = ev else { continue };
        if u.job != id {
            continue;
        }
        let who = u.provider.as_ref().map(name_of).unwrap_or("");
        println!(
            "  {:>8.1} ms  {:?} {who}",
            t.elapsed().as_secs_f64() * 1000.0,
            u.state
        );
        if u.state.is_terminal() {
            break;
        }
    }
    let rec = buyer.jobs().wait(&id).await?;
    if rec.state != JobState::Done {
        bail!("the job failed: {:?}", rec.state);
    }
    let result = buyer
        .jobs()
        .result(&id)?
        .context("a done job has outputs")?;
    let file = ReceiptFile {
        network: net.clone(),
        receipt: rec.receipt.context("a done job has a receipt")?,
        agreement: rec.agreement,
    };
    std::fs::create_dir_all(&out_dir)?;
    let receipt_path = out_dir.join("receipt.json");
    std::fs::write(&receipt_path, file.to_json())?;
    for (name, bytes) in &result.outputs {
        std::fs::write(out_dir.join(format!("{name}.bin")), bytes)?;
    }

    // What anyone can check offline, from the file alone.
    let (_, r) = verify_receipt_file(&std::fs::read(&receipt_path)?)?;
    check_outputs(&r, &result.outputs)?;
    println!(
        "\nreceipt (signed by {}, countersigned by the buyer):",
        name_of(&r.provider)
    );
    println!("  job        {}", r.job_id);
    println!(
        "  chain seq  {}  prev {:?}",
        r.chain_seq,
        r.prev_receipt.map(|p| p.to_string())
    );
    println!("  GPU time   {} µs on {}", r.gpu_time_us, r.adapter.name);
    println!("  charge     {} msat", r.charge.0);
    for o in &r.outputs {
        println!("  output     {} {} bytes {}", o.name, o.bytes, o.id);
    }
    println!(
        "\nverified offline: signatures, outputs. Files in {}",
        out_dir.display()
    );
    println!(
        "check it yourself: cargo run -p hashgrid-node --bin hashgrid -- receipt verify {} --outputs {}",
        receipt_path.display(),
        out_dir.display()
    );
    println!("(settlement in BTC is not built yet: issue 8)");
    for n in sites.iter().chain([&buyer]) {
        n.shutdown().await;
    }
    // Release the GPU before the process exits.
    let execs = std::mem::take(&mut *EXECUTORS.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    tokio::task::spawn_blocking(move || execs.iter().for_each(Executor::shutdown)).await?;
    Ok(())
}
