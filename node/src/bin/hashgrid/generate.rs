//! `hashgrid generate` and `hashgrid chat`: a GGUF language model as a job, on this machine's
//! adapter (`--local`) or through the market.
//!
//! The model file is checked, tokenized and compiled before any GPU or network work; a bad
//! file is exit 2 naming the file and what is wrong. Locally, text streams to stdout as the
//! job's token buffer streams back; Ctrl-C ends generation at the next token.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hashgrid_infer::template::ChatMessage;
use hashgrid_infer::tokenizer::StreamDecoder;
use hashgrid_infer::{
    CompiledJob, Sampling, Target, TextError, TextModel, compile::outputs, read_generation,
};
use hashgrid_node::executor::{ExecConfig, Executor, StreamUpdate};
use hashgrid_node::jobs::JobOptions;
use hashgrid_protocol::{Msat, Requirements};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::market::{submit_and_wait, submit_in_book, wait_for_book};
use crate::{CliError, EXIT_CANCELLED, Global};

/// What `generate` was asked.
pub(crate) struct GenerateArgs {
    pub(crate) model: PathBuf,
    pub(crate) prompt: String,
    pub(crate) chat: bool,
    pub(crate) max_tokens: u32,
    pub(crate) sampling: Sampling,
    /// The kernels' shape (`None`: this machine's adapter with --local, else CPU).
    pub(crate) kernels: Option<Target>,
    pub(crate) local: bool,
    pub(crate) max_price: Option<u64>,
    pub(crate) max_seconds: u32,
    pub(crate) verify: Option<String>,
}

fn bad_model(path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::bad_input(
        format!("{e}"),
        format!(
            "{} must be a llama-family GGUF model (llama, mistral, qwen2) in F32, F16, Q8_0, Q4_0, Q4_1, Q4_K or Q6_K",
            path.display()
        ),
    )
}

/// Opens and checks the model, builds its tokenizer and reads its weights.
pub(crate) fn load(path: &Path) -> Result<TextModel, CliError> {
    TextModel::open(path).map_err(|e| bad_model(path, e))
}

/// Prompt tokens: the text as is, or rendered as the conversation through the model's chat
/// template (special tokens in the template are parsed; in plain text they are not).
pub(crate) fn prompt(
    loaded: &TextModel,
    text: &str,
    history: Option<&[ChatMessage]>,
) -> Result<Vec<u32>, CliError> {
    let Some(messages) = history else {
        return Ok(loaded.prompt(text));
    };
    loaded.chat_prompt(messages).map_err(|e| match e {
        TextError::Model(e) => bad_model(loaded.model.path(), e),
        e => CliError::bad_input(e.to_string(), "use a plain prompt without --chat"),
    })
}

fn compile(
    loaded: &TextModel,
    prompt: Vec<u32>,
    max_tokens: u32,
    sampling: Sampling,
    target: Target,
) -> Result<CompiledJob, CliError> {
    loaded
        .compile(prompt, max_tokens, sampling, target)
        .map_err(|e| CliError::bad_input(e.to_string(), "shorten the prompt or lower --max-tokens"))
}

/// A finished generation.
pub(crate) struct Generated {
    tokens: Vec<u32>,
    text: String,
    first_token_ms: Option<f64>,
    prompt_tps: Option<f64>,
    decode_tps: Option<f64>,
    market: Option<serde_json::Value>,
    cancelled: bool,
    finish: &'static str,
}

/// Runs `job` on this machine's adapter, printing text to stdout as it streams back (unless
/// `quiet_text`), until done or `cancel` is set.
pub(crate) async fn run_local(
    exec: &Executor,
    loaded: &TextModel,
    job: CompiledJob,
    print: bool,
    cancel: Arc<AtomicBool>,
) -> Result<Generated, CliError> {
    let (tx, mut rx) = mpsc::channel::<(Instant, StreamUpdate)>(64);
    let stop = cancel.clone();
    let sink = Box::new(move |u: StreamUpdate| {
        let _ = tx.try_send((Instant::now(), u));
        !stop.load(Ordering::SeqCst)
    });
    let n_prompt = job.n_prompt;
    let started = Instant::now();
    let run = exec.run_streaming("local", job.spec, job.inputs, Some(sink));
    tokio::pin!(run);
    let mut dec = StreamDecoder::new(&loaded.tokenizer, true);
    let mut shown = 0usize;
    let mut first: Option<Instant> = None;
    let mut last: Option<(Instant, usize)> = None;
    let mut out = std::io::stdout();
    let mut show = |tokens: &[u32], dec: &mut StreamDecoder<'_>, shown: &mut usize| {
        for &t in &tokens[*shown..] {
            let piece = dec.push(t);
            if print && !piece.is_empty() {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        }
        *shown = tokens.len();
    };
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            Some((at, u)) = rx.recv() => {
                let get = |n: &str| u.buffers.iter().find(|b| b.name == n).map(|b| b.bytes.as_slice()).unwrap_or(&[]);
                let g = read_generation(n_prompt, get(outputs::TOKENS), get(outputs::STATUS), None);
                if !g.tokens.is_empty() {
                    first.get_or_insert(at);
                    last = Some((at, g.tokens.len()));
                }
                let visible: Vec<u32> = g.tokens.iter().copied().filter(|t| !loaded.eog.contains(t)).collect();
                show(&visible, &mut dec, &mut shown);
            }
        }
    };
    let output = result.map_err(|e| {
        CliError::other(
            format!("the GPU job failed: {e}"),
            "run with -v for details",
        )
    })?;
    let get = |n: &str| {
        output
            .outputs
            .iter()
            .find(|o| o.name == n)
            .map(|o| o.bytes.as_slice())
            .unwrap_or(&[])
    };
    let g = read_generation(n_prompt, get(outputs::TOKENS), get(outputs::STATUS), None);
    let visible: Vec<u32> = g
        .tokens
        .iter()
        .copied()
        .filter(|t| !loaded.eog.contains(t))
        .collect();
    show(&visible, &mut dec, &mut shown);
    let tail = dec.finish();
    if print && !tail.is_empty() {
        let _ = std::io::stdout().write_all(tail.as_bytes());
    }
    let first_token_ms = first.map(|f| (f - started).as_secs_f64() * 1e3);
    let decode_tps = match (first, last) {
        (Some(f), Some((l, n))) if n > 1 && l > f => Some((n - 1) as f64 / (l - f).as_secs_f64()),
        _ => None,
    };
    let cancelled = cancel.load(Ordering::SeqCst);
    let finish = finish_reason(&g.tokens, &loaded.eog, cancelled);
    Ok(Generated {
        text: loaded.tokenizer.decode(&visible, true),
        tokens: g.tokens,
        first_token_ms,
        prompt_tps: first_token_ms.map(|ms| n_prompt as f64 / (ms / 1e3)),
        decode_tps,
        market: None,
        cancelled,
        finish,
    })
}

fn finish_reason(tokens: &[u32], eog: &[u32], cancelled: bool) -> &'static str {
    if cancelled {
        "cancelled"
    } else if tokens.last().is_some_and(|t| eog.contains(t)) {
        "stop"
    } else {
        "length"
    }
}

/// Starts the local executor (blocking: opens the GPU).
pub(crate) fn executor() -> Result<Executor, CliError> {
    Executor::start(ExecConfig::default()).map_err(|e| {
        CliError::other(
            e.to_string(),
            "install a Vulkan driver (apt-get install mesa-vulkan-drivers) or drop --local to use the market",
        )
    })
}

fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            f.store(true, Ordering::SeqCst);
        }
    });
    flag
}

/// `hashgrid generate`.
pub(crate) async fn generate(g: &Global, a: GenerateArgs) -> Result<(), CliError> {
    let loaded = load(&a.model)?;
    let history = a
        .chat
        .then(|| vec![ChatMessage::new("user", a.prompt.clone())]);
    let prompt = prompt(&loaded, &a.prompt, history.as_deref())?;
    // Compiled (and so checked) before any GPU or network work; with --local and no
    // --kernels, again for the adapter's kind once it is known (a compile takes milliseconds
    // and copies no weight).
    let job = compile(
        &loaded,
        prompt.clone(),
        a.max_tokens,
        a.sampling,
        a.kernels.unwrap_or_default(),
    )?;
    let print = !g.json;
    let out = if a.local {
        let exec = tokio::task::block_in_place(executor)?;
        let job = match a.kernels {
            None => compile(
                &loaded,
                prompt.clone(),
                a.max_tokens,
                a.sampling,
                Target::for_device(exec.profile().device_type),
            )?,
            Some(_) => job,
        };
        let cancel = ctrl_c_flag();
        let r = run_local(&exec, &loaded, job, print, cancel).await;
        exec.shutdown();
        r?
    } else {
        let recompile = |t| compile(&loaded, prompt.clone(), a.max_tokens, a.sampling, t);
        run_market(g, &loaded, job, &a, print, recompile).await?
    };
    if print {
        println!();
    }
    if g.json {
        let mut v = serde_json::json!({
            "model": loaded.model.name,
            "prompt_tokens": prompt,
            "tokens": out.tokens,
            "text": out.text,
            "finish_reason": out.finish,
            "timings": {
                "first_token_ms": out.first_token_ms,
                "prompt_tokens_per_s": out.prompt_tps,
                "decode_tokens_per_s": out.decode_tps,
            },
        });
        if let (Some(m), Some(obj)) = (out.market, v.as_object_mut()) {
            obj.insert("market".into(), m);
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if !g.quiet {
        let mut line = format!(
            "[{} prompt + {} generated tokens",
            prompt.len(),
            out.tokens.len()
        );
        if let Some(t) = out.decode_tps {
            line.push_str(&format!(", {t:.1} tokens/s"));
        }
        if let Some(ms) = out.first_token_ms {
            line.push_str(&format!(", first token after {ms:.0} ms"));
        }
        eprintln!("{line}]");
    }
    if out.cancelled {
        return Err(CliError {
            code: EXIT_CANCELLED,
            message: "cancelled".into(),
            hint: String::new(),
        });
    }
    Ok(())
}

/// Through the market: the compiled job is an ordinary job; its outputs come back verified
/// with a countersigned receipt. (Text is printed when the job is done: streaming tokens over
/// the network is the gateway's work.)
///
/// Without `--kernels`, `job` (compiled CPU-shaped) is compiled again with the shape of the
/// device of the cheapest ask in the book once it has settled, where the job most likely
/// runs (`MarketHandle::likely_device`).
async fn run_market(
    g: &Global,
    loaded: &TextModel,
    job: CompiledJob,
    a: &GenerateArgs,
    print: bool,
    recompile: impl Fn(Target) -> Result<CompiledJob, CliError>,
) -> Result<Generated, CliError> {
    let c = Client::resolve(g)?;
    let mode = c.verify_mode(a.verify.as_deref())?;
    let node = c.start().await?;
    let n_prompt = job.n_prompt;
    let started = Instant::now();
    let requirements = Requirements::default();
    let max_price = a.max_price.map(Msat);
    let outcome = async {
        let asks = wait_for_book(&node).await?;
        let (job, target) = match a.kernels {
            Some(t) => (job, t),
            None => {
                let device = node
                    .market()
                    .likely_device(&requirements, max_price)
                    .await
                    .map_err(CliError::node)?;
                match device.map_or(Target::Cpu, Target::for_device) {
                    Target::Cpu => (job, Target::Cpu),
                    t => (recompile(t)?, t),
                }
            }
        };
        if !g.quiet {
            eprintln!(
                "book: {asks} asks from the network; kernels shaped for {}",
                match target {
                    Target::Cpu => "a CPU adapter",
                    Target::Gpu => "a GPU",
                }
            );
        }
        let options = JobOptions {
            units: 1,
            max_price,
            max_seconds: a.max_seconds,
            requirements,
            max_attempts: 3,
            wait_for_capacity: Duration::from_secs(30),
            model: Some(job.model),
            verify: hashgrid_protocol::Verification {
                mode,
                ..job.compare
            },
        };
        submit_in_book(g, &node, job.spec, job.inputs, options).await
    }
    .await;
    node.shutdown().await;
    let (rec, outputs) = outcome?;
    let saved = crate::market::save_result(&c, &rec, &outputs, None)?;
    let get = |n: &str| outputs.get(n).map(Vec::as_slice).unwrap_or(&[]);
    let generation = read_generation(n_prompt, get(outputs::TOKENS), get(outputs::STATUS), None);
    let visible: Vec<u32> = generation
        .tokens
        .iter()
        .copied()
        .filter(|t| !loaded.eog.contains(t))
        .collect();
    let text = loaded.tokenizer.decode(&visible, true);
    if print {
        print!("{text}");
    }
    let elapsed = started.elapsed();
    let receipt = rec.receipt.as_ref();
    let market = serde_json::json!({
        "job": rec.id.to_string(),
        "provider": rec.provider.map(|p| p.to_string()),
        "charge_msat": receipt
            .and_then(|c| c.signed.decode_unverified().ok())
            .map(|r| r.charge.0),
        "receipt_id": receipt.map(|r| r.id().to_string()),
        "receipt_file": saved.receipt,
        "wall_ms": elapsed.as_secs_f64() * 1e3,
        "verification": crate::market::verification_json(&rec),
    });
    Ok(Generated {
        finish: finish_reason(&generation.tokens, &loaded.eog, false),
        tokens: generation.tokens,
        text,
        first_token_ms: None,
        prompt_tps: None,
        decode_tps: Some(
            visible.len() as f64 / elapsed.max(Duration::from_millis(1)).as_secs_f64(),
        ),
        market: Some(market),
        cancelled: false,
    })
}

/// `hashgrid chat`: a conversation on this machine's adapter; each line is a user turn, the
/// whole history goes through the chat template, Ctrl-C stops a reply (twice quits), an empty
/// line or end of input quits.
pub(crate) async fn chat(
    g: &Global,
    model: &Path,
    max_tokens: u32,
    sampling: Sampling,
    kernels: Option<Target>,
) -> Result<(), CliError> {
    let loaded = load(model)?;
    let exec = tokio::task::block_in_place(executor)?;
    let target = kernels.unwrap_or_else(|| Target::for_device(exec.profile().device_type));
    let mut history: Vec<ChatMessage> = Vec::new();
    let stdin = std::io::stdin();
    if !g.quiet {
        eprintln!(
            "chatting with {} (an empty line or Ctrl-D quits; Ctrl-C stops a reply)",
            loaded.model.name
        );
    }
    let result = loop {
        eprint!("> ");
        let mut line = String::new();
        match tokio::task::block_in_place(|| stdin.read_line(&mut line)) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(CliError::other(format!("reading stdin: {e}"), "")),
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            break Ok(());
        }
        history.push(ChatMessage::new("user", line));
        let prompt = match prompt(&loaded, line, Some(&history)) {
            Ok(p) => p,
            Err(e) => break Err(e),
        };
        let job = match compile(&loaded, prompt, max_tokens, sampling, target) {
            Ok(j) => j,
            Err(e) => break Err(e),
        };
        let cancel = ctrl_c_flag();
        match run_local(&exec, &loaded, job, true, cancel).await {
            Ok(r) => {
                println!();
                history.push(ChatMessage::new("assistant", r.text));
            }
            Err(e) => break Err(e),
        }
    };
    exec.shutdown();
    result
}

/// `hashgrid embed`: sentence embeddings (a BERT sentence-transformers directory), one job per
/// text, on this machine's adapter (`--local`) or through the market; `--json` prints OpenAI's
/// embeddings response.
pub(crate) async fn embed(
    g: &Global,
    dir: &Path,
    texts: &[String],
    local: bool,
    max_price: Option<u64>,
) -> Result<(), CliError> {
    use hashgrid_infer::bert::{BertModel, BertWeights, EMBEDDING, compile_embed};
    if texts.is_empty() {
        return Err(CliError::bad_input(
            "no text to embed",
            "pass the texts after --: hashgrid embed --model DIR -- \"first\" \"second\"",
        ));
    }
    let bad = |e: hashgrid_infer::bert::BertError| {
        CliError::bad_input(
            e.to_string(),
            format!(
                "{} must be a sentence-transformers BERT directory (config.json, model.safetensors, tokenizer.json)",
                dir.display()
            ),
        )
    };
    let model = BertModel::open(dir).map_err(bad)?;
    let weights = BertWeights::load(&model).map_err(bad)?;
    let mut jobs = Vec::with_capacity(texts.len());
    let mut prompt_tokens = 0usize;
    for t in texts {
        let ids = model.encode(t).map_err(bad)?;
        prompt_tokens += ids.len();
        jobs.push(compile_embed(&model, &weights, &ids).map_err(bad)?);
    }
    let mut embeddings: Vec<Vec<f32>> = Vec::with_capacity(jobs.len());
    let mut receipts = Vec::new();
    let to_f32 = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    if local {
        let exec = tokio::task::block_in_place(executor)?;
        for job in jobs {
            let out = exec
                .run("local", job.spec, job.inputs)
                .await
                .map_err(|e| CliError::other(format!("the GPU job failed: {e}"), ""));
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    exec.shutdown();
                    return Err(e);
                }
            };
            let bytes = out
                .outputs
                .iter()
                .find(|o| o.name == EMBEDDING)
                .map(|o| o.bytes.as_slice())
                .unwrap_or(&[]);
            embeddings.push(to_f32(bytes));
        }
        exec.shutdown();
    } else {
        let c = Client::resolve(g)?;
        let node = c.start().await?;
        let mut outcome = Ok(());
        for job in jobs {
            let options = JobOptions {
                units: 1,
                max_price: max_price.map(Msat),
                max_seconds: 60,
                requirements: Requirements::default(),
                max_attempts: 3,
                wait_for_capacity: Duration::from_secs(30),
                model: Some(job.model),
                verify: Default::default(),
            };
            match submit_and_wait(g, &node, job.spec, job.inputs, options).await {
                Ok((rec, outputs)) => {
                    let saved = crate::market::save_result(&c, &rec, &outputs, None)?;
                    embeddings.push(to_f32(
                        outputs.get(EMBEDDING).map(Vec::as_slice).unwrap_or(&[]),
                    ));
                    receipts.push(serde_json::json!({
                        "job": rec.id.to_string(),
                        "provider": rec.provider.map(|p| p.to_string()),
                        "receipt_id": rec.receipt.as_ref().map(|r| r.id().to_string()),
                        "receipt_file": saved.receipt,
                    }));
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        node.shutdown().await;
        outcome?;
    }
    if g.json {
        let data: Vec<serde_json::Value> = embeddings
            .iter()
            .enumerate()
            .map(|(i, e)| serde_json::json!({"object": "embedding", "index": i, "embedding": e}))
            .collect();
        let mut v = serde_json::json!({
            "object": "list",
            "data": data,
            "model": model.name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        });
        if let (false, Some(obj)) = (receipts.is_empty(), v.as_object_mut()) {
            obj.insert("market".into(), serde_json::Value::from(receipts));
        }
        println!("{}", serde_json::to_string(&v).unwrap_or_default());
    } else {
        for (t, e) in texts.iter().zip(&embeddings) {
            let head: Vec<String> = e.iter().take(6).map(|v| format!("{v:.4}")).collect();
            println!("{t:?}: [{}, … {} dims]", head.join(", "), e.len());
        }
        if embeddings.len() > 1 {
            let cos = |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
            eprintln!("cosine similarity (embeddings are L2-normalised):");
            for i in 0..embeddings.len() {
                for j in i + 1..embeddings.len() {
                    eprintln!("  {i}–{j}: {:.4}", cos(&embeddings[i], &embeddings[j]));
                }
            }
        }
    }
    Ok(())
}
