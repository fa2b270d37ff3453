//! Token generation on this machine's adapter, against llama.cpp on the same machine:
//! `cargo bench -p hashgrid-executor --bench generate -- [--model FILE.gguf] [--prompt-tokens N]
//! [--new-tokens N] [--runs N] [--check-every N] [--target auto|cpu|gpu] [--profile]
//! [--no-pin] [--no-wake-request] [--no-llama-cpp] [--json FILE]`.
//!
//! Reports, as medians of `--runs` runs (after one warm-up that also makes the weights
//! resident): time to first token, prompt tokens/s (prompt tokens over the time to the first
//! token, weights already resident) and decode tokens/s (generated tokens after the first over
//! the time they took, from the streamed updates: after the first token, one every
//! `--check-every` tokens, by default the target's as `hashgrid generate` has it). `--profile`
//! adds where a token's time goes: each kernel of the decoder step run alone in a loop, its
//! time per dispatch and its share of a token. llama.cpp's figures come from
//! `llama-cpp-python` when it is installed (2 threads, the same prompt and token counts).
//!
//! `--no-pin` and `--no-wake-request` turn off the executor's CPU-adapter settings
//! (`ExecConfig::cpu_pin_threads`, `ExecConfig::cpu_low_wake_latency`), for comparisons.
//!
//! The model defaults to `$HASHGRID_SMOLLM2`. `--target` picks the kernels' shape (`auto`: the
//! adapter's, as `hashgrid generate --local` does).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use hashgrid_executor::{ExecConfig, Executor, StreamUpdate};
use hashgrid_infer::{
    GenerateRequest, LlamaModel, ModelWeights, Sampling, Target, compile_generate, read_generation,
};
use hashgrid_protocol::LoopSpec;

struct Args {
    model: PathBuf,
    prompt_tokens: usize,
    new_tokens: u32,
    runs: usize,
    profile: bool,
    /// `None`: the target's ([`Target::check_every`]), as `hashgrid generate` does.
    check_every: Option<u32>,
    /// `None`: the adapter's.
    target: Option<Target>,
    llama_cpp: bool,
    json: Option<PathBuf>,
    pin: bool,
    wake_request: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        model: std::env::var("HASHGRID_SMOLLM2").unwrap_or_default().into(),
        prompt_tokens: 32,
        new_tokens: 64,
        runs: 3,
        profile: false,
        check_every: None,
        target: None,
        llama_cpp: true,
        json: None,
        pin: true,
        wake_request: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().context("missing value");
        match k.as_str() {
            "--model" => a.model = val()?.into(),
            "--prompt-tokens" => a.prompt_tokens = val()?.parse()?,
            "--new-tokens" => a.new_tokens = val()?.parse()?,
            "--runs" => a.runs = val()?.parse()?,
            "--profile" => a.profile = true,
            "--check-every" => a.check_every = Some(val()?.parse()?),
            "--target" => {
                a.target = match val()?.as_str() {
                    "auto" => None,
                    "cpu" => Some(Target::Cpu),
                    "gpu" => Some(Target::Gpu),
                    other => bail!("--target is auto, cpu or gpu, not {other}"),
                }
            }
            "--no-llama-cpp" => a.llama_cpp = false,
            "--no-pin" => a.pin = false,
            "--no-wake-request" => a.wake_request = false,
            "--json" => a.json = Some(val()?.into()),
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    if a.model.as_os_str().is_empty() {
        bail!("pass --model FILE.gguf or set HASHGRID_SMOLLM2");
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A fixed prompt of `n` ordinary tokens (ids from the middle of the vocabulary, cycling), the
/// same for us and llama.cpp.
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (1000 + (i * 37) % (vocab - 2000)) as u32)
        .collect()
}

struct Run {
    ttft_ms: f64,
    prompt_tps: f64,
    decode_tps: f64,
    generated: usize,
    /// The generated token ids (greedy: the same in every run, and across kernel shapes up to
    /// a near-tie).
    tokens: Vec<u32>,
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let model = LlamaModel::open(&a.model)?;
    let weights = ModelWeights::load(&model)?;
    let exec = Executor::start(ExecConfig {
        cpu_pin_threads: a.pin,
        cpu_low_wake_latency: a.wake_request,
        ..ExecConfig::default()
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let prompt = prompt(a.prompt_tokens, model.config.vocab);
    let target = a
        .target
        .unwrap_or(Target::for_device(exec.profile().device_type));
    let req = GenerateRequest {
        prompt: prompt.clone(),
        max_new_tokens: a.new_tokens,
        sampling: Sampling::default(),
        // No end-of-generation token: always generate the full count.
        eog: Vec::new(),
        check_every: a.check_every.unwrap_or(target.check_every()),
        target,
    };
    let job = compile_generate(&model, &weights, &req)?;
    // The generation loop is the job's last: its passes run once per token.
    let passes_per_token = job.spec.loops.last().map_or(0, |l| l.len);

    let mut runs = Vec::new();
    for i in 0..=a.runs {
        let updates: Arc<Mutex<Vec<(Instant, u32)>>> = Arc::default();
        let sink = updates.clone();
        let n_prompt = job.n_prompt as u32;
        let t0 = Instant::now();
        let out = rt.block_on(exec.run_streaming(
            "bench",
            job.spec.clone(),
            job.inputs.clone(),
            Some(Box::new(move |u: StreamUpdate| {
                let generated = u
                    .buffers
                    .iter()
                    .find(|b| b.name == "status")
                    .and_then(|b| b.bytes.get(4..8))
                    .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
                let _ = n_prompt;
                if let Ok(mut v) = sink.lock() {
                    v.push((Instant::now(), generated));
                }
                true
            })),
        ))?;
        let get = |n: &str| {
            out.outputs
                .iter()
                .find(|o| o.name == n)
                .map_or(&[][..], |o| o.bytes.as_slice())
        };
        let tokens = read_generation(job.n_prompt, get("tokens"), get("status"), None).tokens;
        let ups = updates.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
        let first = ups
            .iter()
            .find(|(_, g)| *g >= 1)
            .context("no token was generated")?;
        let last = ups.last().context("no updates")?;
        let ttft = first.0 - t0;
        let decode_s = (last.0 - first.0).as_secs_f64();
        let run = Run {
            ttft_ms: ttft.as_secs_f64() * 1e3,
            prompt_tps: prompt.len() as f64 / ttft.as_secs_f64(),
            decode_tps: f64::from(last.1.saturating_sub(1)) / decode_s,
            generated: last.1 as usize,
            tokens,
        };
        eprintln!(
            "run {i}{}: ttft {:.0} ms, prompt {:.1} tok/s, decode {:.1} tok/s ({} tokens, {} MB uploaded, {} resident)",
            if i == 0 { " (warm-up)" } else { "" },
            run.ttft_ms,
            run.prompt_tps,
            run.decode_tps,
            run.generated,
            out.uploaded_bytes / 1_000_000,
            out.resident_hits
        );
        if i > 0 {
            runs.push(run);
        }
    }
    let ours = serde_json::json!({
        "ttft_ms": median(runs.iter().map(|r| r.ttft_ms).collect()),
        "prompt_tokens_per_s": median(runs.iter().map(|r| r.prompt_tps).collect()),
        "decode_tokens_per_s": median(runs.iter().map(|r| r.decode_tps).collect()),
        "generated": runs.first().map_or(0, |r| r.generated),
        "tokens": runs.last().map(|r| r.tokens.clone()).unwrap_or_default(),
        "dispatches_per_token": passes_per_token,
    });

    let mut report = serde_json::Map::new();
    report.insert("model".into(), model.name.clone().into());
    report.insert("adapter".into(), exec.profile().name.into());
    report.insert(
        "target".into(),
        format!("{:?}", req.target).to_lowercase().into(),
    );
    report.insert("check_every".into(), req.check_every.into());
    report.insert("cpu_pin_threads".into(), a.pin.into());
    report.insert("cpu_low_wake_latency".into(), a.wake_request.into());
    report.insert("prompt_tokens".into(), a.prompt_tokens.into());
    report.insert("new_tokens".into(), a.new_tokens.into());
    report.insert("runs".into(), a.runs.into());
    report.insert("hashgrid".into(), ours);

    if a.profile {
        // A one-token prompt, so no kernel skips its work (the logits and sampling passes
        // return at once during a prompt); positions 0..32 as in a short decode.
        let pj = compile_generate(
            &model,
            &weights,
            &GenerateRequest {
                prompt: prompt[..1].to_vec(),
                max_new_tokens: 40,
                ..req.clone()
            },
        )?;
        report.insert("profile".into(), profile(&exec, &rt, &pj.spec, &pj.inputs)?);
    }
    if a.llama_cpp {
        match llama_cpp(&a, &prompt) {
            Ok(v) => {
                report.insert("llama_cpp".into(), v);
            }
            Err(e) => eprintln!("llama.cpp baseline skipped: {e}"),
        }
    }
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(p) = a.json {
        std::fs::write(&p, text)?;
    }
    exec.shutdown();
    Ok(())
}

/// Each distinct kernel of the decoder step (the generation loop, the job's last; by shader and
/// workgroups), run alone in a loop of 32 iterations; its time per dispatch times how often a
/// token runs it.
fn profile(
    exec: &Executor,
    rt: &tokio::runtime::Runtime,
    spec: &hashgrid_protocol::JobSpec,
    inputs: &hashgrid_infer::Inputs,
) -> anyhow::Result<serde_json::Value> {
    const ITERS: u32 = 32;
    let decode = spec
        .loops
        .last()
        .context("the job has no generation loop")?;
    let body = decode.first as usize..(decode.first + decode.len) as usize;
    let mut kinds: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, p) in spec
        .passes
        .iter()
        .enumerate()
        .filter(|(i, _)| body.contains(i))
    {
        let key = format!(
            "{} [{}]",
            spec.shaders[p.shader as usize].name, p.workgroups[0]
        );
        kinds.entry(key).or_insert((i, 0)).1 += 1;
    }
    let mut rows = Vec::new();
    let mut total = 0.0;
    for (key, (pass, count)) in &kinds {
        let mut s = spec.clone();
        s.passes = vec![s.passes[*pass].clone()];
        let step = decode.counter;
        s.loops = vec![LoopSpec {
            first: 0,
            len: 1,
            max_iters: ITERS,
            counter: step,
            stop: None,
            check_every: ITERS,
            stream: Vec::new(),
        }];
        // The generation loop's own positions: from the prompt's last on, 32 of them.
        let out = rt.block_on(exec.run("profile", s, inputs.clone()))?;
        let per = out.passes.last().map_or(0.0, |p| p.gpu_ms) / f64::from(ITERS);
        let per_token = per * *count as f64;
        total += per_token;
        rows.push((key.clone(), *count, per, per_token));
    }
    rows.sort_by(|a, b| b.3.total_cmp(&a.3));
    eprintln!("where a token's time goes (each kernel alone, {ITERS} iterations):");
    let mut v = Vec::new();
    for (key, count, per, per_token) in rows {
        eprintln!(
            "  {key:<40} ×{count:<3} {:>8.3} ms each {:>8.2} ms/token {:>5.1}%",
            per,
            per_token,
            100.0 * per_token / total
        );
        v.push(serde_json::json!({
            "kernel": key, "per_token": count, "ms_each": per, "ms_per_token": per_token,
        }));
    }
    eprintln!("  sum {total:.1} ms/token");
    Ok(serde_json::json!({ "kernels": v, "sum_ms_per_token": total }))
}

/// llama.cpp through llama-cpp-python, when installed: the same prompt ids and token counts.
fn llama_cpp(a: &Args, prompt: &[u32]) -> anyhow::Result<serde_json::Value> {
    let script = r#"
import json, sys, time
import numpy as np
import llama_cpp
path, prompt, n_new, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + n_new + 8, n_threads=2, n_batch=512, verbose=False)
def once():
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    return {"ttft_ms": (t1 - t0) * 1e3, "prompt_tokens_per_s": len(prompt) / (t1 - t0),
            "decode_tokens_per_s": (n_new - 1) / (t2 - t1)}
once()
rs = [once() for _ in range(runs)]
med = lambda k: sorted(r[k] for r in rs)[len(rs) // 2]
print(json.dumps({"version": llama_cpp.__version__, "threads": 2,
                  "ttft_ms": med("ttft_ms"), "prompt_tokens_per_s": med("prompt_tokens_per_s"),
                  "decode_tokens_per_s": med("decode_tokens_per_s")}))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&a.model)
        .arg(serde_json::to_string(prompt)?)
        .arg(a.new_tokens.to_string())
        .arg(a.runs.to_string())
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    eprintln!("llama.cpp: {v}");
    Ok(v)
}
