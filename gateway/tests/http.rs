//! The gateway's HTTP behaviour on this machine's adapter (lavapipe in CI) with the real
//! models (`HASHGRID_SMOLLM2`, `HASHGRID_MINILM`; skipped without them): streamed text equals
//! the plain response, stop sequences are cut, spending caps answer 402, a backend without
//! providers 503, a full queue 429, and a provider whose stream its verified outputs
//! contradict ends the stream with an error.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::future::BoxFuture;
use hashgrid_executor::{ExecConfig, Executor};
use hashgrid_gateway::{
    Backend, BackendError, BackendJob, BackendOutput, Gateway, GatewayConfig, LocalBackend,
    MarketInfo, ModelEntry, Streamed, models,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower::ServiceExt;

const CHAT: &str = "SmolLM2-135M-Instruct.Q4_1";

fn env_path(var: &str) -> Option<PathBuf> {
    match std::env::var(var) {
        Ok(p) if Path::new(&p).exists() => Some(PathBuf::from(p)),
        _ => {
            eprintln!("note: {var} is not set; skipping (.ci/run sets it)");
            None
        }
    }
}

/// The models, loaded once for all tests (reading SmolLM2's weights takes a moment).
fn loaded() -> Option<&'static BTreeMap<String, ModelEntry>> {
    static M: OnceLock<Option<BTreeMap<String, ModelEntry>>> = OnceLock::new();
    M.get_or_init(|| {
        let smol = env_path("HASHGRID_SMOLLM2")?;
        let minilm = env_path("HASHGRID_MINILM")?;
        Some(
            models::load_all(&[
                smol.display().to_string(),
                format!("minilm={}", minilm.display()),
            ])
            .unwrap(),
        )
    })
    .as_ref()
}

fn executor() -> Executor {
    static E: OnceLock<Executor> = OnceLock::new();
    E.get_or_init(|| Executor::start(ExecConfig::default()).unwrap())
        .clone()
}

/// The local backend, with a charge and a receipt id made up for each job (what the market
/// backend adds), so that spending caps can be exercised without a market.
struct Charging {
    local: LocalBackend,
    msat: u64,
}

impl Backend for Charging {
    fn name(&self) -> &'static str {
        "market"
    }
    fn run(
        &self,
        job: BackendJob,
        stream: Option<mpsc::Sender<Streamed>>,
    ) -> BoxFuture<'static, Result<BackendOutput, BackendError>> {
        let run = self.local.run(job, stream);
        let msat = self.msat;
        Box::pin(async move {
            let mut out = run.await?;
            out.market = Some(MarketInfo {
                job: "job".into(),
                provider: "provider".into(),
                charge_msat: msat,
                receipt_id: "receipt".into(),
            });
            Ok(out)
        })
    }
}

/// Fails every job with `err`.
struct Failing(BackendError);

impl Backend for Failing {
    fn name(&self) -> &'static str {
        "market"
    }
    fn run(
        &self,
        _: BackendJob,
        _: Option<mpsc::Sender<Streamed>>,
    ) -> BoxFuture<'static, Result<BackendOutput, BackendError>> {
        let e = self.0.clone();
        Box::pin(async move { Err(e) })
    }
}

/// Streams a first token the job never generates, then returns the job's real (verified)
/// outputs.
struct Lying {
    local: LocalBackend,
    n_prompt: usize,
}

impl Backend for Lying {
    fn name(&self) -> &'static str {
        "market"
    }
    fn run(
        &self,
        job: BackendJob,
        stream: Option<mpsc::Sender<Streamed>>,
    ) -> BoxFuture<'static, Result<BackendOutput, BackendError>> {
        let run = self.local.run(job, None);
        let at = 4 * self.n_prompt;
        Box::pin(async move {
            let out = run.await?;
            if let Some(tx) = stream {
                let mut tokens = out.outputs["tokens"].clone();
                let real = u32::from_le_bytes(tokens[at..at + 4].try_into().unwrap());
                let lie: u32 = if real == 28 { 29 } else { 28 };
                tokens[at..at + 4].copy_from_slice(&lie.to_le_bytes());
                let status = [0u32.to_le_bytes(), 1u32.to_le_bytes()].concat();
                let _ = tx
                    .send(vec![("tokens".into(), tokens), ("status".into(), status)])
                    .await;
                // Let the gateway show it before the outputs arrive.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Ok(out)
        })
    }
}

fn gateway(backend: Arc<dyn Backend>, config: GatewayConfig) -> Option<Gateway> {
    Some(Gateway::new(backend, loaded()?.clone(), config).expect("no spend file to read"))
}

fn local(config: GatewayConfig) -> Option<Gateway> {
    loaded()?;
    gateway(Arc::new(LocalBackend::new(executor())), config)
}

/// POSTs `body` to `path`; the status and the body (JSON, or the SSE `data:` payloads).
async fn post(
    gw: &Gateway,
    path: &str,
    body: Value,
    key: Option<&str>,
) -> (StatusCode, Vec<Value>) {
    let mut req = Request::post(path).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = gw
        .router()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let sse = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    if !sse {
        return (status, vec![serde_json::from_str(&text).unwrap()]);
    }
    let events = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            if d == "[DONE]" {
                Value::String("[DONE]".into())
            } else {
                serde_json::from_str(d).unwrap()
            }
        })
        .collect();
    (status, events)
}

fn chat_body(question: &str, stream: bool) -> Value {
    json!({"model": CHAT, "messages": [{"role": "user", "content": question}],
           "temperature": 0, "max_tokens": 20, "stream": stream})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_equals_the_plain_answer_and_stop_sequences_are_cut() {
    let Some(gw) = local(GatewayConfig::default()) else {
        return;
    };
    let (s, plain) = post(
        &gw,
        "/v1/chat/completions",
        chat_body("What is 2+2?", false),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{plain:?}");
    let text = plain[0]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    let (s, events) = post(
        &gw,
        "/v1/chat/completions",
        chat_body("What is 2+2?", true),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let pieces: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(pieces.len() > 1, "{events:?}");
    assert_eq!(pieces.concat(), text);
    let finish = events
        .iter()
        .rev()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, plain[0]["choices"][0]["finish_reason"].as_str());

    // A stop sequence taken from the middle of the answer: the text ends before it, streamed
    // or not, and the finish reason is "stop".
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(3).collect();
    let want = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut body = chat_body("What is 2+2?", stream);
        body["stop"] = json!([stop]);
        let (s, events) = post(&gw, "/v1/chat/completions", body, None).await;
        assert_eq!(s, StatusCode::OK);
        let (got, finish) = if stream {
            let got: String = events
                .iter()
                .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
                .collect();
            let f = events
                .iter()
                .rev()
                .find_map(|e| e["choices"][0]["finish_reason"].as_str());
            (got, f.map(str::to_string))
        } else {
            let c = &events[0]["choices"][0];
            (
                c["message"]["content"].as_str().unwrap().to_string(),
                c["finish_reason"].as_str().map(str::to_string),
            )
        };
        assert_eq!(got, want, "stop {stop:?} streamed={stream}");
        assert_eq!(finish.as_deref(), Some("stop"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_unknown_models_and_contexts_get_openai_errors() {
    let Some(gw) = local(GatewayConfig::default()) else {
        return;
    };
    let cases = [
        (json!({"model": CHAT}), StatusCode::BAD_REQUEST),
        (
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"model": CHAT, "messages": [], "max_tokens": 4}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "n": 2}),
            StatusCode::BAD_REQUEST,
        ),
        // Far over the 8192-token context.
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "word ".repeat(9000)}]}),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (body, want) in cases {
        let (s, v) = post(&gw, "/v1/chat/completions", body.clone(), None).await;
        assert_eq!(s, want, "{body}: {v:?}");
        assert!(
            v[0]["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v:?}"
        );
        assert!(v[0]["error"]["type"].is_string(), "{v:?}");
    }
    let (s, v) = post(
        &gw,
        "/v1/embeddings",
        json!({"model": "minilm", "input": [[1, 2, 3]]}),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v:?}");
    let (s, v) = post(
        &gw,
        "/v1/embeddings",
        json!({"model": "minilm", "input": "hi", "dimensions": 3}),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_caps_and_backend_failures_map_to_status_codes() {
    if loaded().is_none() {
        return;
    }
    let config = GatewayConfig {
        api_keys: vec!["k1".into(), "k2".into()],
        key_cap_msat_per_day: Some(1_500),
        max_seconds: 60,
        ..GatewayConfig::default()
    };
    let gw = gateway(
        Arc::new(Charging {
            local: LocalBackend::new(executor()),
            msat: 1_000,
        }),
        config.clone(),
    )
    .unwrap();
    let mut body = chat_body("Hi", false);
    body["max_tokens"] = json!(2);
    let (s, _) = post(&gw, "/v1/chat/completions", body.clone(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = post(&gw, "/v1/chat/completions", body.clone(), Some("k3")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // k1 spends 1000, then 2000 (checked before each request), then is refused.
    for _ in 0..2 {
        let (s, v) = post(&gw, "/v1/chat/completions", body.clone(), Some("k1")).await;
        assert_eq!(s, StatusCode::OK, "{v:?}");
        assert_eq!(v[0]["hashgrid"]["charge_msat"], 1_000);
    }
    let (s, v) = post(&gw, "/v1/chat/completions", body.clone(), Some("k1")).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{v:?}");
    assert_eq!(v[0]["error"]["code"], "insufficient_quota");
    // k2 has its own cap.
    let (s, _) = post(&gw, "/v1/chat/completions", body.clone(), Some("k2")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(gw.spent_today(), 3_000);

    for (err, want) in [
        (
            BackendError::Unavailable("no ask".into()),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            BackendError::Busy("queue full".into()),
            StatusCode::TOO_MANY_REQUESTS,
        ),
        (
            BackendError::Failed("provider vanished".into()),
            StatusCode::BAD_GATEWAY,
        ),
    ] {
        let gw = gateway(Arc::new(Failing(err)), GatewayConfig::default()).unwrap();
        for stream in [false, true] {
            let mut b = body.clone();
            b["stream"] = json!(stream);
            let (s, v) = post(&gw, "/v1/chat/completions", b, None).await;
            assert_eq!(s, want, "stream={stream}: {v:?}");
        }
        let (s, _) = post(
            &gw,
            "/v1/embeddings",
            json!({"model": "minilm", "input": "hi"}),
            None,
        )
        .await;
        assert_eq!(s, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_verified_outputs_contradict_ends_in_an_error() {
    if loaded().is_none() {
        return;
    }
    let Some(hashgrid_gateway::Model::Text(m)) = loaded().map(|l| l[CHAT].model.clone()) else {
        panic!("{CHAT} is a text model")
    };
    let n_prompt = m
        .chat_prompt(&[hashgrid_infer::template::ChatMessage::new("user", "Hi")])
        .unwrap()
        .len();
    let lying = Lying {
        local: LocalBackend::new(executor()),
        n_prompt,
    };
    let gw = gateway(Arc::new(lying), GatewayConfig::default()).unwrap();
    let (s, events) = post(&gw, "/v1/chat/completions", chat_body("Hi", true), None).await;
    assert_eq!(s, StatusCode::OK);
    let err = events
        .iter()
        .find(|e| e.get("error").is_some())
        .expect("an error event");
    assert_eq!(err["error"]["code"], "stream_mismatch", "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    // Not streamed, the lie is never shown: the answer is the verified one.
    let (s, v) = post(&gw, "/v1/chat/completions", chat_body("Hi", false), None).await;
    assert_eq!(s, StatusCode::OK, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_come_as_floats_or_base64_with_usage() {
    let Some(gw) = local(GatewayConfig::default()) else {
        return;
    };
    let body = json!({"model": "minilm", "input": ["A man is eating food.", "A man is eating a piece of bread."]});
    let (s, v) = post(&gw, "/v1/embeddings", body.clone(), None).await;
    assert_eq!(s, StatusCode::OK, "{v:?}");
    let emb: Vec<Vec<f64>> = v[0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    let cos: f64 = emb[0].iter().zip(&emb[1]).map(|(a, b)| a * b).sum();
    assert!((cos - 0.7553).abs() < 5e-4, "{cos}");
    assert!(v[0]["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let mut b64 = body;
    b64["encoding_format"] = json!("base64");
    let (s, v) = post(&gw, "/v1/embeddings", b64, None).await;
    assert_eq!(s, StatusCode::OK);
    for (i, e) in emb.iter().enumerate() {
        let le: Vec<u8> = e.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
        let want = hashgrid_gateway::openai::base64(&le);
        assert_eq!(
            want.len(),
            2048,
            "384 f32s are 1536 bytes, 2048 base64 characters"
        );
        assert_eq!(v[0]["data"][i]["embedding"].as_str().unwrap(), want);
    }
}
