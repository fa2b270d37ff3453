//! A market job's kernels are shaped for the device it will most likely run on: the kind of
//! the cheapest ask of another node that meets the job's terms (`likely_device`), which the
//! gateway's market backend asks for every request unless `--kernels` fixed the shape.

use std::time::Duration;

use hashgrid_gateway::Backend;
use hashgrid_infer::Target;
use hashgrid_node::gateway::MarketBackend;
use hashgrid_node::jobs::JobOptions;
use hashgrid_node::{AskSpec, NodeHandle};
use hashgrid_protocol::{DeviceType, GpuProfile, Msat, Requirements};
use hashgrid_tests::{addr_of, ask_spec, gpu, test_builder, wait_for_book, wait_for_peers};

const WAIT: Duration = Duration::from_secs(10);

/// A CPU adapter's profile (what lavapipe reports).
fn cpu(name: &str) -> GpuProfile {
    GpuProfile {
        device_type: DeviceType::Cpu,
        ..gpu(name)
    }
}

/// An ask for one unit of `cpu(name)` at `price`.
fn cpu_ask(name: &str, price: u64) -> AskSpec {
    AskSpec {
        gpu: cpu(name),
        units: 1,
        price: Msat(price),
        max_seconds: 3600,
    }
}

async fn asks_in_book(node: &NodeHandle, n: usize) -> anyhow::Result<()> {
    wait_for_book(node, WAIT, &format!("{n} asks"), |b| b.asks.len() == n).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn market_jobs_take_the_shape_of_the_cheapest_ask() -> anyhow::Result<()> {
    hashgrid_tests::init_tracing();
    let buyer = test_builder(&[])
        .gpu_profiles(vec![cpu("buyer-cpu")])
        .units(1)
        .start()
        .await?;
    let boot = [addr_of(&buyer).await?];
    let gpu_site = test_builder(&boot)
        .gpu_profiles(vec![gpu("h100")])
        .units(1)
        .start()
        .await?;
    let cpu_site = test_builder(&boot)
        .gpu_profiles(vec![cpu("llvmpipe")])
        .units(1)
        .start()
        .await?;
    wait_for_peers(&buyer, 2, WAIT).await?;
    let any = Requirements::default();
    let backend = MarketBackend::new(buyer.clone(), JobOptions::default());

    // An empty book: nothing to go by, CPU-shaped.
    assert_eq!(buyer.market().likely_device(&any, None).await?, None);
    assert_eq!(backend.target().await, Target::Cpu);

    // A GPU at 50 and a CPU adapter at 20: the CPU adapter is the cheapest.
    gpu_site.market().post_ask(ask_spec("h100", 50)).await?;
    let cheap = cpu_site.market().post_ask(cpu_ask("llvmpipe", 20)).await?;
    asks_in_book(&buyer, 2).await?;
    assert_eq!(
        buyer.market().likely_device(&any, None).await?,
        Some(DeviceType::Cpu)
    );
    assert_eq!(backend.target().await, Target::Cpu);
    // Nothing at 10 or less.
    assert_eq!(
        buyer.market().likely_device(&any, Some(Msat(10))).await?,
        None
    );

    // The CPU adapter leaves: the GPU is the cheapest, and jobs are GPU-shaped.
    cpu_site.market().cancel(cheap.order_id).await?;
    asks_in_book(&buyer, 1).await?;
    assert_eq!(
        buyer.market().likely_device(&any, None).await?,
        Some(DeviceType::DiscreteGpu)
    );
    assert_eq!(backend.target().await, Target::Gpu);

    // The buyer's own ask, cheaper still, is not where its jobs go.
    buyer.market().post_ask(cpu_ask("buyer-cpu", 1)).await?;
    asks_in_book(&buyer, 2).await?;
    assert_eq!(backend.target().await, Target::Gpu);

    // A shape set with --kernels stays.
    let fixed = MarketBackend::new(buyer.clone(), JobOptions::default()).kernels(Target::Cpu);
    assert_eq!(fixed.target().await, Target::Cpu);

    for n in [buyer, gpu_site, cpu_site] {
        n.shutdown().await;
    }
    Ok(())
}
