//! The job lifecycle between real nodes in one process (loopback, lavapipe in CI): a buyer's
//! job goes to the cheapest provider that meets its requirements, runs, and comes back with a
//! receipt anyone can verify; a provider stopped mid-job is replaced; lying providers are
//! caught and never countersigned.

#![allow(clippy::unwrap_used)]

use hashgrid_node::jobs::IntoSharedInputs;
use std::time::Duration;

use hashgrid_node::jobs::{FailKind, JobOptions, JobState, Lie, ProviderEvent, Submission};
use hashgrid_node::{NodeEvent, NodeHandle};
use hashgrid_protocol::{
    BufferInit, JobLimits, ReceiptFile, Requirements, check_outputs, load_job_file,
    verify_receipt_file,
};
use hashgrid_tests::{addr_of, start_provider, test_builder, test_network, wait_for_asks};

const JOB_LIMIT: Duration = Duration::from_secs(60);

fn saxpy() -> (Submission, Vec<f32>) {
    let path = hashgrid_examples::kernels_dir().join("saxpy/job.toml");
    let job = load_job_file(&path, &JobLimits::default()).unwrap();
    let input = |name: &str| -> Vec<f32> {
        let b = job.spec.buffers.iter().find(|b| b.name == name).unwrap();
        let BufferInit::Blob(id) = b.init else {
            panic!("{name} is an input")
        };
        job.inputs[&id]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (x, y, a) = (input("x"), input("y"), input("params")[0]);
    let cpu = x.iter().zip(&y).map(|(x, y)| a * x + y).collect();
    (
        Submission {
            spec: job.spec,
            inputs: job.inputs.into_shared(),
            options: JobOptions::default(),
        },
        cpu,
    )
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A matmul long enough (hundreds of ms on lavapipe) to stop its provider while it runs.
fn slow_job() -> Submission {
    let (spec, inputs) = hashgrid_node::executor::bench::matmul_job(256);
    Submission {
        spec,
        inputs: inputs.into_shared(),
        options: JobOptions::default(),
    }
}

async fn buyer(boot: &[hashgrid_node::Multiaddr]) -> NodeHandle {
    test_builder(boot).region("us-east").start().await.unwrap()
}

async fn wait(node: &NodeHandle, job: &hashgrid_protocol::ContentId) -> hashgrid_node::JobRecord {
    tokio::time::timeout(JOB_LIMIT, node.jobs().wait(job))
        .await
        .expect("the job finishes in time")
        .unwrap()
}

/// Drains provider events seen so far.
fn provider_events(rx: &mut tokio::sync::broadcast::Receiver<NodeEvent>) -> Vec<ProviderEvent> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let NodeEvent::Provider(p) = ev {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_runs_on_the_cheapest_provider_that_meets_the_requirements() {
    hashgrid_tests::init_tracing();
    // The cheapest provider advertises 1 GiB, under the job's 4 GiB requirement.
    let small = start_provider(&[], 50, 1, None).await.unwrap();
    let boot = [addr_of(&small).await.unwrap()];
    let mid = start_provider(&boot, 100, 8, None).await.unwrap();
    let dear = start_provider(&boot, 200, 8, None).await.unwrap();
    let b = buyer(&boot).await;
    wait_for_asks(&b, 3).await.unwrap();
    let mut mid_events = mid.events();

    let (mut sub, cpu) = saxpy();
    sub.options.requirements = Requirements {
        min_memory_bytes: 4 << 30,
        ..Requirements::default()
    };
    let id = b.jobs().submit(sub.clone()).await.unwrap();
    let rec = wait(&b, &id).await;
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    assert_eq!(rec.provider, Some(mid.public_key()));

    // Outputs equal the CPU reference.
    let result = b.jobs().result(&id).unwrap().unwrap();
    assert_eq!(f32s(&result.outputs["out"]), cpu);

    // The countersigned receipt verifies offline, from its file, with the outputs.
    let cs = rec.receipt.clone().unwrap();
    // The buyer kept the agreement it countersigned: the file carries it, and the charge is
    // checked against it offline.
    assert!(rec.agreement.is_some(), "the record keeps the agreement");
    let file = ReceiptFile {
        network: test_network(),
        receipt: cs,
        agreement: rec.agreement.clone(),
    };
    let (_, receipt) = verify_receipt_file(file.to_json().as_bytes()).unwrap();
    check_outputs(&receipt, &result.outputs).unwrap();
    assert_eq!(receipt.provider, mid.public_key());
    assert_eq!(receipt.buyer, b.public_key());
    assert_eq!(receipt.spec_id, sub.spec.id());
    assert_eq!(receipt.chain_seq, 0);
    // price × units × GPU time, rounded up to the msat.
    assert_eq!(
        u128::from(receipt.charge.0),
        (100u128 * u128::from(receipt.gpu_time_us)).div_ceil(1_000_000)
    );

    // The provider saw the countersignature.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let evs = provider_events(&mut mid_events);
        if evs
            .iter()
            .any(|e| matches!(e, ProviderEvent::Countersigned { .. }))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no countersignature"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in [b, small, mid, dear] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_stopped_mid_job_is_replaced_and_only_one_receipt_is_countersigned() {
    hashgrid_tests::init_tracing();
    let first = start_provider(&[], 50, 8, None).await.unwrap();
    let boot = [addr_of(&first).await.unwrap()];
    let second = start_provider(&boot, 80, 8, None).await.unwrap();
    let b = buyer(&boot).await;
    wait_for_asks(&b, 2).await.unwrap();
    let mut first_events = first.events();
    let mut second_events = second.events();

    let id = b.jobs().submit(slow_job()).await.unwrap();
    // Stop the cheapest provider as soon as the job runs on it.
    let stopper = {
        let first = first.clone();
        tokio::spawn(async move {
            loop {
                match first_events.recv().await {
                    Ok(NodeEvent::Provider(ProviderEvent::Running { .. })) => break,
                    Ok(NodeEvent::Provider(ProviderEvent::Finished { .. })) => {
                        panic!("the job finished before the provider could be stopped")
                    }
                    Ok(_) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            first.shutdown().await;
        })
    };
    let rec = wait(&b, &id).await;
    stopper.await.unwrap();
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    assert_eq!(rec.provider, Some(second.public_key()));
    assert_eq!(rec.attempts.len(), 2, "{:?}", rec.attempts);
    assert_eq!(rec.attempts[0].provider, first.public_key());
    let receipt = rec.receipt.unwrap().verify(&test_network()).unwrap();
    assert_eq!(receipt.provider, second.public_key());

    tokio::time::sleep(Duration::from_millis(300)).await;
    let countersigned = provider_events(&mut second_events)
        .iter()
        .filter(|e| matches!(e, ProviderEvent::Countersigned { .. }))
        .count();
    assert_eq!(countersigned, 1);
    b.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_providers_are_rejected_and_never_countersigned() {
    hashgrid_tests::init_tracing();
    let liars = [Lie::WrongOutput, Lie::ForeignKey, Lie::Overcharge];
    let first = start_provider(&[], 10, 8, Some(liars[0])).await.unwrap();
    let boot = [addr_of(&first).await.unwrap()];
    let mut providers = vec![first];
    for (i, lie) in liars.iter().enumerate().skip(1) {
        providers.push(
            start_provider(&boot, 10 + i as u64, 8, Some(*lie))
                .await
                .unwrap(),
        );
    }
    let mut events: Vec<_> = providers.iter().map(|p| p.events()).collect();
    let b = buyer(&boot).await;
    wait_for_asks(&b, 3).await.unwrap();

    let (sub, _) = saxpy();
    let id = b.jobs().submit(sub).await.unwrap();
    let rec = wait(&b, &id).await;
    let JobState::Failed { kind, reason } = &rec.state else {
        panic!("a job served only by liars must fail: {rec:?}");
    };
    assert_eq!(*kind, FailKind::Verification, "{reason}");
    assert!(rec.receipt.is_none());
    assert_eq!(rec.attempts.len(), 3, "{:?}", rec.attempts);
    let outcomes: Vec<&str> = rec.attempts.iter().map(|a| a.outcome.as_str()).collect();
    // Tried cheapest first: wrong output, foreign key, overcharge.
    assert!(outcomes[0].contains("hashes to"), "{outcomes:?}");
    assert!(outcomes[1].contains("signature"), "{outcomes:?}");
    assert!(
        outcomes[2].contains("over the agreed maximum"),
        "{outcomes:?}"
    );
    assert!(b.jobs().result(&id).unwrap().is_none());

    tokio::time::sleep(Duration::from_millis(300)).await;
    for (p, rx) in providers.iter().zip(&mut events) {
        let evs = provider_events(rx);
        assert!(
            evs.iter()
                .any(|e| matches!(e, ProviderEvent::Disputed { .. })),
            "{evs:?}"
        );
        assert!(
            !evs.iter()
                .any(|e| matches!(e, ProviderEvent::Countersigned { .. })),
            "{evs:?}"
        );
        p.shutdown().await;
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_and_unmatched_prices_fail_clearly() {
    hashgrid_tests::init_tracing();
    let p = start_provider(&[], 100, 8, None).await.unwrap();
    let boot = [addr_of(&p).await.unwrap()];
    let b = buyer(&boot).await;
    wait_for_asks(&b, 1).await.unwrap();

    // Invalid WGSL is refused by submit itself, before any traffic.
    let (mut bad, _) = saxpy();
    bad.spec.shaders[0].wgsl.push_str("\nfn broken( {");
    let err = b.jobs().submit(bad).await.unwrap_err().to_string();
    assert!(err.contains("saxpy.wgsl"), "{err}");

    // Nobody sells under 10 msat/s.
    let (mut cheap, _) = saxpy();
    cheap.options.max_price = Some(hashgrid_protocol::Msat(10));
    let id = b.jobs().submit(cheap).await.unwrap();
    let rec = wait(&b, &id).await;
    assert!(
        matches!(
            &rec.state,
            JobState::Failed {
                kind: FailKind::NoMatch,
                ..
            }
        ),
        "{rec:?}"
    );
    b.shutdown().await;
    p.shutdown().await;
}

/// Inputs and outputs over one message travel over `/hashgrid/blob/1` in chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_inputs_and_outputs_travel_in_verified_chunks() {
    hashgrid_tests::init_tracing();
    let p = start_provider(&[], 100, 8, None).await.unwrap();
    let boot = [addr_of(&p).await.unwrap()];
    let b = buyer(&boot).await;
    wait_for_asks(&b, 1).await.unwrap();
    // 3 MiB in, 3 MiB out: over the 512 KiB inline budget and six chunks each way.
    let (spec, inputs) = hashgrid_node::executor::bench::copy_job(3 << 20);
    let input = inputs.values().next().unwrap().clone();
    let id = b
        .jobs()
        .submit(Submission {
            spec,
            inputs: inputs.into_shared(),
            options: JobOptions::default(),
        })
        .await
        .unwrap();
    let rec = wait(&b, &id).await;
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    let result = b.jobs().result(&id).unwrap().unwrap();
    let out = result.outputs.values().next().unwrap();
    assert_eq!(out.len(), 3 << 20);
    assert_eq!(*out, input, "a copy kernel returns its input");
    b.shutdown().await;
    p.shutdown().await;
}

/// A loop of `iters` steps; step `i` writes `i + 1` to `out[i]`, and `out` streams back at
/// every check.
fn streaming_job(iters: u32) -> Submission {
    use hashgrid_protocol::{Binding, BufferSpec, JobSpec, LoopSpec, PassSpec, ShaderSource};
    let wgsl = "
@group(0) @binding(0) var<storage, read> step: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(1)
fn main() {
    out[step[0]] = step[0] + 1u;
}";
    let spec = JobSpec {
        name: "stream".into(),
        buffers: vec![
            BufferSpec {
                name: "step".into(),
                size: 4,
                init: BufferInit::Zeroed,
                output: false,
            },
            BufferSpec {
                name: "out".into(),
                size: 4 * u64::from(iters),
                init: BufferInit::Zeroed,
                output: true,
            },
        ],
        shaders: vec![ShaderSource {
            name: "stream.wgsl".into(),
            wgsl: wgsl.into(),
        }],
        passes: vec![PassSpec {
            shader: 0,
            entry: "main".into(),
            workgroups: [1, 1, 1],
            bindings: vec![Binding::whole(0, 0), Binding::whole(1, 1)],
        }],
        loops: vec![LoopSpec {
            first: 0,
            len: 1,
            max_iters: iters,
            counter: Some(0),
            stop: None,
            check_every: 1,
            stream: vec![1],
        }],
    };
    Submission {
        spec,
        inputs: Default::default(),
        options: JobOptions::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_buffers_reach_the_buyer_while_the_job_runs() {
    let p = start_provider(&[], 100, 1, None).await.unwrap();
    let boot = [addr_of(&p).await.unwrap()];
    let b = buyer(&boot).await;
    wait_for_asks(&b, 1).await.unwrap();
    // Long enough (a readback per step) that the job is still running when the buyer's
    // first stream poll arrives, also on a loaded machine: with 24 steps the crash check saw
    // a run finish before it, once in 300.
    const ITERS: u32 = 200;
    let mut events = b.events();
    let id = b.jobs().submit(streaming_job(ITERS)).await.unwrap();
    let rec = wait(&b, &id).await;
    assert_eq!(rec.state, JobState::Done, "{rec:?}");
    let result = b.jobs().result(&id).unwrap().unwrap();
    let out = &result.outputs["out"];
    let want: Vec<u8> = (1..=ITERS).flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(out, &want);
    let mut seen = Vec::new();
    loop {
        let ev = match events.try_recv() {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => break,
        };
        if let NodeEvent::JobStream(s) = ev
            && s.job == id
        {
            assert_eq!(Some(s.provider), rec.provider);
            let (name, bytes) = &s.buffers[0];
            assert_eq!(name, "out");
            // What was streamed after `iterations` steps is the final output's prefix, zeros after.
            let n = 4 * s.iterations as usize;
            assert_eq!(&bytes[..n], &want[..n]);
            assert!(bytes[n..].iter().all(|&b| b == 0));
            seen.push(s.iterations);
        }
    }
    assert!(
        seen.len() >= 2,
        "the buyer saw {seen:?}: the job's steps should stream back one by one"
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    b.shutdown().await;
    p.shutdown().await;
}

/// The `InputsReady` events seen so far: (fetched, cached) bytes per job.
fn inputs_ready(rx: &mut tokio::sync::broadcast::Receiver<NodeEvent>) -> Vec<(u64, u64)> {
    provider_events(rx)
        .into_iter()
        .filter_map(|e| match e {
            ProviderEvent::InputsReady {
                fetched_bytes,
                cached_bytes,
                ..
            } => Some((fetched_bytes, cached_bytes)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_inputs_cross_the_network_once_per_provider_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let with_dir = |d: std::path::PathBuf| move |b: hashgrid_node::NodeBuilder| b.data_dir(d);
    let p = hashgrid_tests::start_provider_with(&[], 100, 8, None, with_dir(data.clone()))
        .await
        .unwrap();
    let boot = [addr_of(&p).await.unwrap()];
    let b = buyer(&boot).await;
    wait_for_asks(&b, 1).await.unwrap();
    // 3 MiB of "weights": fetched in chunks the first time.
    let (spec, inputs) = hashgrid_node::executor::bench::copy_job(3 << 20);
    let job = || Submission {
        spec: spec.clone(),
        inputs: inputs.clone().into_shared(),
        options: JobOptions::default(),
    };
    let mut events = p.events();
    for round in 0..2 {
        let id = b.jobs().submit(job()).await.unwrap();
        let rec = wait(&b, &id).await;
        assert_eq!(
            rec.state,
            JobState::Done,
            "round {round}: {:?}",
            rec.attempts
        );
    }
    let seen = inputs_ready(&mut events);
    assert_eq!(
        seen,
        vec![(3 << 20, 0), (0, 3 << 20)],
        "fetched, then cached"
    );
    // The provider restarts with the same data dir: the cache is still there.
    p.shutdown().await;
    let buyer_addr = addr_of(&b).await.unwrap();
    let p = hashgrid_tests::start_provider_with(&[buyer_addr], 100, 8, None, with_dir(data))
        .await
        .unwrap();
    // The buyer can only reach the restarted provider (on a new port) over the connection the
    // provider opens.
    hashgrid_tests::wait_for_peers(&b, 1, Duration::from_secs(10))
        .await
        .unwrap();
    let mut events = p.events();
    let id = b.jobs().submit(job()).await.unwrap();
    let rec = wait(&b, &id).await;
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    assert_eq!(inputs_ready(&mut events), vec![(0, 3 << 20)]);
    b.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_holding_the_inputs_is_chosen_over_a_slightly_cheaper_cold_one() {
    let (spec, inputs) = hashgrid_node::executor::bench::copy_job(1 << 20);
    let blobs: Vec<_> = inputs.iter().map(|(id, b)| (*id, b.clone())).collect();
    let cold = start_provider(&[], 100, 8, None).await.unwrap();
    let boot = [addr_of(&cold).await.unwrap()];
    // 10% dearer, but it holds the job's megabyte: within the 20% warm discount.
    let warm =
        hashgrid_tests::start_provider_with(&boot, 110, 8, None, move |b| b.preload_inputs(blobs))
            .await
            .unwrap();
    assert_eq!(warm.provider().warm_inputs().len(), 1);
    let b = buyer(&boot).await;
    wait_for_asks(&b, 2).await.unwrap();
    let deadline = std::time::Instant::now() + JOB_LIMIT;
    while !b
        .market()
        .book()
        .await
        .unwrap()
        .capacity
        .iter()
        .any(|ad| ad.provider == warm.public_key() && !ad.warm.is_empty())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the warm ad never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut events = warm.events();
    let id = b
        .jobs()
        .submit(Submission {
            spec,
            inputs: inputs.into_shared(),
            options: JobOptions::default(),
        })
        .await
        .unwrap();
    let rec = wait(&b, &id).await;
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    assert_eq!(rec.provider, Some(warm.public_key()));
    assert_eq!(inputs_ready(&mut events), vec![(0, 1 << 20)]);
    b.shutdown().await;
    warm.shutdown().await;
    cold.shutdown().await;
}

/// Waits until `b`'s book holds `provider`'s capacity ad and `pred` holds for it.
async fn wait_for_ad(
    b: &NodeHandle,
    provider: &NodeHandle,
    what: &str,
    pred: impl Fn(&hashgrid_protocol::CapacityAd) -> bool,
) {
    let deadline = std::time::Instant::now() + JOB_LIMIT;
    loop {
        let book = b.market().book().await.unwrap();
        let ad = book
            .capacity
            .iter()
            .find(|ad| ad.provider == provider.public_key());
        if ad.is_some_and(&pred) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the ad is {ad:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bid_naming_a_model_goes_to_the_site_that_lists_it_and_sites_learn_models_from_jobs() {
    let (spec, inputs) = hashgrid_node::executor::bench::copy_job(1 << 20);
    let blobs: Vec<_> = inputs.iter().map(|(id, b)| (*id, b.clone())).collect();
    let model =
        hashgrid_protocol::ModelManifest::new(blobs.iter().map(|(id, b)| (*id, b.len() as u64)));
    let cold = start_provider(&[], 100, 8, None).await.unwrap();
    let boot = [addr_of(&cold).await.unwrap()];
    // 10% dearer, but it preloaded the model: its ad lists the model's id, not its blobs.
    let warm =
        hashgrid_tests::start_provider_with(&boot, 110, 8, None, move |b| b.preload_model(blobs))
            .await
            .unwrap();
    assert_eq!(warm.provider().warm_models(), vec![model.id()]);
    let b = buyer(&boot).await;
    wait_for_asks(&b, 2).await.unwrap();
    wait_for_ad(&b, &warm, "the warm site lists the model", |ad| {
        ad.models == vec![model.id()] && ad.warm.is_empty()
    })
    .await;
    let job = |named: bool| Submission {
        spec: spec.clone(),
        inputs: inputs.clone().into_shared(),
        options: JobOptions {
            model: named.then(|| model.clone()),
            ..JobOptions::default()
        },
    };
    // 1. The bid names the model: the site holding it wins at 110 over 100, uploading nothing.
    let mut warm_events = warm.events();
    let id = b.jobs().submit(job(true)).await.unwrap();
    let rec = wait(&b, &id).await;
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    assert_eq!(rec.provider, Some(warm.public_key()));
    assert_eq!(inputs_ready(&mut warm_events), vec![(0, 1 << 20)]);
    // 2. The same job without the model named: nothing says the warm site holds its blob, so
    //    price alone decides, and the cold site fetches the megabyte.
    let mut cold_events = cold.events();
    let id = b.jobs().submit(job(false)).await.unwrap();
    let rec = wait(&b, &id).await;
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    assert_eq!(rec.provider, Some(cold.public_key()));
    assert_eq!(inputs_ready(&mut cold_events), vec![(1 << 20, 0)]);
    assert!(
        cold.provider().warm_models().is_empty(),
        "nobody named the model to it"
    );
    // 3. Named again, once the cold site's ad lists the blob it now holds (as a blob: it
    //    knows no model): it is cheaper and holds everything; the dispatch's manifest teaches
    //    it the model, and its ad lists the model instead of the blob.
    let blob = model.blobs[0].id;
    wait_for_ad(&b, &cold, "the cold site lists the blob it fetched", |ad| {
        ad.warm.contains(&blob) && ad.models.is_empty()
    })
    .await;
    let id = b.jobs().submit(job(true)).await.unwrap();
    let rec = wait(&b, &id).await;
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    assert_eq!(rec.provider, Some(cold.public_key()));
    assert_eq!(inputs_ready(&mut cold_events), vec![(0, 1 << 20)]);
    wait_for_ad(
        &b,
        &cold,
        "the cold site lists the model it learned",
        |ad| ad.models == vec![model.id()] && ad.warm.is_empty(),
    )
    .await;
    b.shutdown().await;
    warm.shutdown().await;
    cold.shutdown().await;
}
