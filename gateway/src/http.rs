//! The routes and what each request does: authenticate, check the caller's cap, validate,
//! compile the job, run it on the backend (streaming tokens as server-sent events when asked),
//! and answer in OpenAI's shapes with the market's side attached.

use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hashgrid_infer::compile::outputs;
use hashgrid_infer::template::ChatMessage;
use hashgrid_infer::{Sampling, TextError, TextModel, read_generation};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::access::{Caller, Denied};
use crate::backend::{BackendError, BackendJob, MarketInfo, Streamed};
use crate::models::{EmbedModel, Model};
use crate::openai::{
    ApiError, ChatRequest, CompletionRequest, EmbedInput, EmbeddingRequest, Knobs, Prompt, base64,
    parse,
};
use crate::text::TextStream;
use crate::{Inner, MAX_BODY_BYTES, MAX_EMBED_INPUTS};

type Gw = Arc<Inner>;

pub(crate) fn router(inner: Gw) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(one_model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("unknown_url"),
                "no such route: this gateway serves /v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            inner.clone(),
            crate::metrics::track,
        ))
        .with_state(inner)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 64 random bits (std's per-process random hasher keys, mixed with a counter).
fn random_u64(g: &Inner) -> u64 {
    let n = g.requests.fetch_add(1, Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.write_u64(now_secs());
    h.finish()
}

fn denied(d: Denied) -> ApiError {
    match d {
        Denied::Unauthorized(m) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            m,
        ),
        Denied::OverCap(m) => ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            Some("insufficient_quota"),
            m,
        ),
    }
}

fn authorize(g: &Inner, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let h = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    g.access.authorize(h).map_err(denied)
}

fn backend_error(e: BackendError) -> ApiError {
    match e {
        BackendError::Invalid(m) => ApiError::bad_request(m, None),
        BackendError::Unavailable(m) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("no_provider"),
            m,
        ),
        BackendError::Busy(m) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            Some("rate_limit_exceeded"),
            m,
        ),
        BackendError::Failed(m) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            Some("job_failed"),
            m,
        ),
    }
}

fn model_entry<'a>(g: &'a Inner, id: &str) -> Result<&'a crate::ModelEntry, ApiError> {
    g.models.get(id).ok_or_else(|| {
        let known: Vec<&str> = g.models.keys().map(String::as_str).collect();
        ApiError::unknown_model(id, &known)
    })
}

fn model_json(m: &crate::ModelEntry) -> Value {
    let kind = match m.model {
        Model::Text(_) => "text",
        Model::Embed(_) => "embedding",
    };
    json!({"id": m.id, "object": "model", "created": m.created, "owned_by": "hashgrid", "hashgrid": {"kind": kind}})
}

async fn list_models(State(g): State<Gw>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&g, &headers)?;
    let data: Vec<Value> = g.models.values().map(model_json).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn one_model(
    State(g): State<Gw>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&g, &headers)?;
    Ok(axum::Json(model_json(model_entry(&g, &id)?)).into_response())
}

fn text_model(g: &Inner, id: &str) -> Result<Arc<TextModel>, ApiError> {
    match &model_entry(g, id)?.model {
        Model::Text(m) => Ok(m.clone()),
        Model::Embed(_) => Err(ApiError::bad_request(
            format!("{id} is an embedding model: use /v1/embeddings"),
            Some("model"),
        )),
    }
}

/// The validated sampling and length of a generation request.
struct Gen {
    max_tokens: u32,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn knobs(g: &Inner, k: Knobs) -> Result<Gen, ApiError> {
    if k.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "n: only 1 choice per request",
            Some("n"),
        ));
    }
    let temperature = k.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "temperature must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let top_p = k.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(
            "top_p must be above 0 and at most 1",
            Some("top_p"),
        ));
    }
    let max_tokens = k
        .max_completion_tokens
        .or(k.max_tokens)
        .unwrap_or(g.config.default_max_tokens);
    if max_tokens == 0 {
        return Err(ApiError::bad_request(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    let seed = match k.seed {
        Some(s) => (s as u64 ^ ((s as u64) >> 32)) as u32,
        None => random_u64(g) as u32,
    };
    Ok(Gen {
        max_tokens,
        sampling: Sampling {
            temperature,
            top_k: k.top_k.unwrap_or(0),
            top_p,
            seed,
        },
        stop: k
            .stop
            .map(|s| s.sequences())
            .transpose()?
            .unwrap_or_default(),
        stream: k.stream,
        include_usage: k.stream_options.unwrap_or_default().include_usage,
    })
}

/// Runs CPU-heavy work (compiling a job copies a model's weights) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn text_error(e: TextError) -> ApiError {
    match e {
        TextError::Context { .. } => ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: e.to_string(),
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some("messages"),
        },
        e => ApiError::bad_request(e.to_string(), None),
    }
}

/// Chat or plain completion: the two response shapes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Chat,
    Completion,
}

/// What a generation task reports.
enum GenEvent {
    /// More text.
    Delta(String),
    /// The end.
    Done(Box<Finished>),
    /// It failed.
    Error(ApiError),
}

struct Finished {
    text: String,
    finish: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    market: Option<MarketInfo>,
}

fn hashgrid_json(backend: &str, m: Option<&MarketInfo>) -> Value {
    match m {
        Some(m) => json!({
            "backend": backend,
            "provider": m.provider,
            "charge_msat": m.charge_msat,
            "receipt_id": m.receipt_id,
            "job": m.job,
        }),
        None => json!({"backend": backend}),
    }
}

fn hashgrid_headers(
    backend: &'static str,
    m: Option<&MarketInfo>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut h = vec![(
        HeaderName::from_static("x-hashgrid-backend"),
        HeaderValue::from_static(backend),
    )];
    if let Some(m) = m {
        for (name, v) in [
            ("x-hashgrid-provider", m.provider.clone()),
            ("x-hashgrid-charge-msat", m.charge_msat.to_string()),
            ("x-hashgrid-receipt", m.receipt_id.clone()),
            ("x-hashgrid-job", m.job.clone()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.push((HeaderName::from_static(name), v));
            }
        }
    }
    h
}

/// Runs one generation job and reports its text as it streams (when `stream`: otherwise
/// only the verified outputs count), then its end. Ends early, dropping (and so cancelling)
/// the job, when nobody listens any more.
async fn run_generation(
    g: Gw,
    model: Arc<TextModel>,
    job: hashgrid_infer::CompiledJob,
    (stop, stream): (Vec<String>, bool),
    caller: Caller,
    tx: mpsc::Sender<GenEvent>,
) {
    let n_prompt = job.n_prompt;
    let started = std::time::Instant::now();
    let mut first_text = true;
    let mut first = |g: &Inner| {
        if std::mem::take(&mut first_text) {
            g.metrics.first_token(started.elapsed().as_secs_f64());
        }
    };
    let (stx, mut srx) = mpsc::channel::<Streamed>(64);
    let run = g.backend.run(
        BackendJob {
            spec: job.spec,
            inputs: job.inputs,
            max_seconds: g.config.max_seconds,
            model: job.model,
            compare: job.compare,
        },
        stream.then_some(stx),
    );
    tokio::pin!(run);
    let mut text = TextStream::new(&model, stop);
    let tokens_of = |bufs: &[(String, Vec<u8>)]| {
        let get = |n: &str| {
            bufs.iter()
                .find(|(name, _)| name == n)
                .map(|(_, b)| b.as_slice())
                .unwrap_or(&[])
        };
        read_generation(n_prompt, get(outputs::TOKENS), get(outputs::STATUS), None).tokens
    };
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            Some(update) = srx.recv() => {
                // A stream that does not continue itself is ignored; the receipt decides.
                if let Some(piece) = text.push(&tokens_of(&update))
                    && !piece.is_empty()
                {
                    first(&g);
                    if tx.send(GenEvent::Delta(piece)).await.is_err() {
                        return;
                    }
                }
            }
            () = tx.closed() => {
                debug!("client went away; cancelling its job");
                return;
            }
        }
    };
    let out = match result {
        Ok(o) => o,
        Err(e) => {
            let _ = tx.send(GenEvent::Error(backend_error(e))).await;
            return;
        }
    };
    if let Some(m) = &out.market {
        g.access.charge(&caller, m.charge_msat);
        g.metrics.spent(m.charge_msat);
    }
    let bufs: Vec<(String, Vec<u8>)> = out.outputs.into_iter().collect();
    let tokens = tokens_of(&bufs);
    let Some(piece) = text.push(&tokens) else {
        let _ = tx
            .send(GenEvent::Error(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                Some("stream_mismatch"),
                "the provider streamed tokens that its verified outputs do not contain",
            )))
            .await;
        return;
    };
    let tail = text.finish();
    let rest = piece + &tail;
    if !rest.is_empty() {
        first(&g);
        if tx.send(GenEvent::Delta(rest)).await.is_err() {
            return;
        }
    }
    g.metrics.tokens(n_prompt as u64, tokens.len() as u64);
    let finish = if text.hit_stop() || model.stopped(text.tokens()) {
        "stop"
    } else {
        "length"
    };
    info!(
        caller = %caller.label(),
        prompt_tokens = n_prompt,
        completion_tokens = tokens.len(),
        provider = out.market.as_ref().map(|m| m.provider.as_str()).unwrap_or("local"),
        "generation done"
    );
    let _ = tx
        .send(GenEvent::Done(Box::new(Finished {
            text: text.text().to_string(),
            finish,
            prompt_tokens: n_prompt,
            completion_tokens: tokens.len(),
            market: out.market,
        })))
        .await;
}

async fn chat(State(g): State<Gw>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let caller = authorize(&g, &headers)?;
    let req: ChatRequest = parse(&body)?;
    let model = text_model(&g, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        messages.push(ChatMessage::new(m.role.clone(), m.content.text()?));
    }
    let gen_ = knobs(&g, req.knobs)?;
    let prompt = model.chat_prompt(&messages).map_err(text_error)?;
    generate(g, caller, req.model, model, prompt, gen_, Shape::Chat).await
}

async fn completions(
    State(g): State<Gw>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = authorize(&g, &headers)?;
    let req: CompletionRequest = parse(&body)?;
    let model = text_model(&g, &req.model)?;
    let text = match req.prompt {
        Prompt::One(t) => t,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::bad_request(
                "prompt: one prompt per request",
                Some("prompt"),
            ));
        }
    };
    let gen_ = knobs(&g, req.knobs)?;
    let prompt = model.prompt(&text);
    generate(g, caller, req.model, model, prompt, gen_, Shape::Completion).await
}

fn chunk_json(
    shape: Shape,
    id: &str,
    created: u64,
    model: &str,
    delta: Option<&str>,
    finish: Option<&str>,
) -> Value {
    match shape {
        Shape::Chat => {
            let d = match delta {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}]})
        }
        Shape::Completion => {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish}]})
        }
    }
}

async fn generate(
    g: Gw,
    caller: Caller,
    model_id: String,
    model: Arc<TextModel>,
    prompt: Vec<u32>,
    gen_: Gen,
    shape: Shape,
) -> Result<Response, ApiError> {
    g.access.check_cap(&caller).map_err(denied)?;
    let (max_tokens, sampling) = (gen_.max_tokens, gen_.sampling);
    let m = model.clone();
    let target = g.backend.target().await;
    let job = blocking(move || m.compile(prompt, max_tokens, sampling, target))
        .await?
        .map_err(text_error)?;
    let (tx, mut rx) = mpsc::channel::<GenEvent>(256);
    tokio::spawn(run_generation(
        g.clone(),
        model,
        job,
        (gen_.stop, gen_.stream),
        caller,
        tx,
    ));
    let prefix = match shape {
        Shape::Chat => "chatcmpl",
        Shape::Completion => "cmpl",
    };
    let id = format!("{prefix}-{:016x}", random_u64(&g));
    let created = now_secs();
    let backend = g.backend.name();
    if !gen_.stream {
        let done = loop {
            match rx.recv().await {
                Some(GenEvent::Delta(_)) => {}
                Some(GenEvent::Done(d)) => break d,
                Some(GenEvent::Error(e)) => return Err(e),
                None => {
                    return Err(ApiError::internal(
                        "the generation stopped without an answer",
                    ));
                }
            }
        };
        let usage = json!({"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                           "total_tokens": done.prompt_tokens + done.completion_tokens});
        let choice = match shape {
            Shape::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": done.text},
                                  "logprobs": null, "finish_reason": done.finish})
            }
            Shape::Completion => {
                json!({"index": 0, "text": done.text, "logprobs": null, "finish_reason": done.finish})
            }
        };
        let object = match shape {
            Shape::Chat => "chat.completion",
            Shape::Completion => "text_completion",
        };
        let body = json!({"id": id, "object": object, "created": created, "model": model_id,
                          "choices": [choice], "usage": usage,
                          "hashgrid": hashgrid_json(backend, done.market.as_ref())});
        let mut resp = axum::Json(body).into_response();
        for (k, v) in hashgrid_headers(backend, done.market.as_ref()) {
            resp.headers_mut().insert(k, v);
        }
        return Ok(resp);
    }
    // Streamed: the first event decides between an error status and a 200 event stream.
    let first = match rx.recv().await {
        Some(GenEvent::Error(e)) => return Err(e),
        Some(ev) => ev,
        None => {
            return Err(ApiError::internal(
                "the generation stopped without an answer",
            ));
        }
    };
    let include_usage = gen_.include_usage;
    let mut opening = Vec::new();
    if shape == Shape::Chat {
        opening.push(json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]}));
    }
    struct St {
        rx: mpsc::Receiver<GenEvent>,
        pending: std::collections::VecDeque<String>,
        first: Option<GenEvent>,
        ended: bool,
    }
    let to_events = move |ev: GenEvent| -> (Vec<String>, bool) {
        match ev {
            GenEvent::Delta(t) => (
                vec![chunk_json(shape, &id, created, &model_id, Some(&t), None).to_string()],
                false,
            ),
            GenEvent::Done(d) => {
                let mut last = chunk_json(shape, &id, created, &model_id, None, Some(d.finish));
                if let Some(o) = last.as_object_mut() {
                    o.insert("hashgrid".into(), hashgrid_json(backend, d.market.as_ref()));
                }
                let mut out = vec![last.to_string()];
                if include_usage {
                    out.push(
                        json!({"id": id, "object": match shape { Shape::Chat => "chat.completion.chunk", Shape::Completion => "text_completion" },
                               "created": created, "model": model_id, "choices": [],
                               "usage": {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
                                         "total_tokens": d.prompt_tokens + d.completion_tokens}})
                        .to_string(),
                    );
                }
                out.push("[DONE]".into());
                (out, true)
            }
            GenEvent::Error(e) => (vec![e.body().to_string(), "[DONE]".into()], true),
        }
    };
    let st = St {
        rx,
        pending: opening.iter().map(Value::to_string).collect(),
        first: Some(first),
        ended: false,
    };
    let stream = futures::stream::unfold((st, to_events), |(mut st, f)| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(data)), (st, f)));
            }
            if st.ended {
                return None;
            }
            let ev = match st.first.take() {
                Some(ev) => ev,
                None => match st.rx.recv().await {
                    Some(ev) => ev,
                    None => return None,
                },
            };
            let (datas, end) = f(ev);
            st.pending.extend(datas);
            st.ended = end;
        }
    });
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    resp.headers_mut().insert(
        HeaderName::from_static("x-hashgrid-backend"),
        HeaderValue::from_static(backend),
    );
    Ok(resp)
}

async fn embeddings(
    State(g): State<Gw>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = authorize(&g, &headers)?;
    let req: EmbeddingRequest = parse(&body)?;
    let model: Arc<EmbedModel> = match &model_entry(&g, &req.model)?.model {
        Model::Embed(m) => m.clone(),
        Model::Text(_) => {
            return Err(ApiError::bad_request(
                format!(
                    "{} is a language model: embeddings need an embedding model",
                    req.model
                ),
                Some("model"),
            ));
        }
    };
    let texts = match req.input {
        EmbedInput::One(t) => vec![t],
        EmbedInput::Many(v) => v,
        EmbedInput::Tokens(_) => {
            return Err(ApiError::bad_request(
                "input must be a string or a list of strings (token ids are not accepted)",
                Some("input"),
            ));
        }
    };
    if texts.is_empty() || texts.len() > MAX_EMBED_INPUTS {
        return Err(ApiError::bad_request(
            format!("input: 1 to {MAX_EMBED_INPUTS} texts"),
            Some("input"),
        ));
    }
    let b64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("encoding_format {other:?}: use float or base64"),
                Some("encoding_format"),
            ));
        }
    };
    let dims = model.model.config.hidden_size;
    if let Some(d) = req.dimensions
        && d as usize != dims
    {
        return Err(ApiError::bad_request(
            format!("dimensions: this model's embeddings have {dims}"),
            Some("dimensions"),
        ));
    }
    g.access.check_cap(&caller).map_err(denied)?;
    let mut prompt_tokens = 0usize;
    let mut jobs = Vec::with_capacity(texts.len());
    for t in &texts {
        let ids = model
            .model
            .encode(t)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("input")))?;
        prompt_tokens += ids.len();
        let m = model.clone();
        let job = blocking(move || hashgrid_infer::bert::compile_embed(&m.model, &m.weights, &ids))
            .await?
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("input")))?;
        jobs.push(job);
    }
    let runs = jobs.into_iter().map(|job| {
        g.backend.run(
            BackendJob {
                spec: job.spec,
                inputs: job.inputs,
                max_seconds: g.config.max_seconds,
                model: job.model,
                compare: job.compare,
            },
            None,
        )
    });
    let outs = futures::future::try_join_all(runs)
        .await
        .map_err(backend_error)?;
    let mut data = Vec::with_capacity(outs.len());
    let mut receipts = Vec::new();
    let mut charge = 0u64;
    for (i, out) in outs.iter().enumerate() {
        let bytes = out
            .outputs
            .get(hashgrid_infer::bert::EMBEDDING)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if bytes.len() != dims * 4 {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                Some("bad_output"),
                format!(
                    "the job returned {} bytes of embedding, not {}",
                    bytes.len(),
                    dims * 4
                ),
            ));
        }
        let embedding = if b64 {
            Value::from(base64(bytes))
        } else {
            Value::from(
                bytes
                    .chunks_exact(4)
                    .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect::<Vec<f64>>(),
            )
        };
        data.push(json!({"object": "embedding", "index": i, "embedding": embedding}));
        if let Some(m) = &out.market {
            g.access.charge(&caller, m.charge_msat);
            g.metrics.spent(m.charge_msat);
            charge += m.charge_msat;
            receipts.push(hashgrid_json(g.backend.name(), Some(m)));
        }
    }
    g.metrics.tokens(prompt_tokens as u64, 0);
    let mut hashgrid = json!({"backend": g.backend.name()});
    if let Some(o) = hashgrid.as_object_mut()
        && !receipts.is_empty()
    {
        o.insert("charge_msat".into(), Value::from(charge));
        o.insert("jobs".into(), Value::from(receipts));
    }
    let body = json!({"object": "list", "data": data, "model": req.model,
                      "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                      "hashgrid": hashgrid});
    let mut resp = axum::Json(body).into_response();
    resp.headers_mut().insert(
        HeaderName::from_static("x-hashgrid-backend"),
        HeaderValue::from_static(g.backend.name()),
    );
    if charge > 0
        && let Ok(v) = HeaderValue::from_str(&charge.to_string())
    {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-hashgrid-charge-msat"), v);
    }
    Ok(resp)
}
