//! Compares the tokenizer with llama.cpp on SmolLM2-135M-Instruct.
//!
//! The fixture `tests/fixtures/smollm2_tokens.json` holds llama.cpp's ids
//! (made by `make_tokens_fixture.py`); the vocabulary comes from the model file
//! named by `HASHGRID_SMOLLM2` (`.ci/run` fetches it). Without it the tests
//! print a note and pass.

use std::time::Instant;

use hashgrid_infer::LlamaModel;
use hashgrid_infer::template::{ChatMessage, render_chat};
use hashgrid_infer::tokenizer::{StreamDecoder, Tokenizer, VocabKind};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    add_special: bool,
    parse_special: bool,
    ids: Vec<u32>,
    decode_skip: String,
    decode_special: String,
}

#[derive(Deserialize)]
struct Fixture {
    n_vocab: usize,
    eog: Vec<u32>,
    pieces_fnv1a64_special: u64,
    pieces_fnv1a64_plain: u64,
    chat_messages: Vec<Message>,
    chat_prompt: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_tokens.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture parses")
}

/// The SmolLM2 vocabulary read from the GGUF named by `HASHGRID_SMOLLM2`, or `None` (with a
/// note) when it is not available.
fn vocab() -> Option<(Tokenizer, Option<String>)> {
    let Some(path) = std::env::var_os("HASHGRID_SMOLLM2") else {
        println!(
            "note: HASHGRID_SMOLLM2 is not set; skipping the SmolLM2 comparison (.ci/run sets it)"
        );
        return None;
    };
    let model = LlamaModel::open(std::path::Path::new(&path)).expect("SmolLM2 opens");
    let spec = model.vocab_spec().expect("vocabulary fields");
    assert_eq!(spec.kind, VocabKind::Bpe);
    let template = model.chat_template().expect("template").map(str::to_string);
    Some((
        Tokenizer::new(spec).expect("SmolLM2 vocabulary is valid"),
        template,
    ))
}

fn fnv1a64(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x100000001B3);
    }
}

#[test]
fn encode_matches_llama_cpp() {
    let Some((tok, _)) = vocab() else { return };
    let fx = fixture();
    let mut mismatches = Vec::new();
    for case in &fx.cases {
        let ids = tok.encode(&case.text, case.add_special, case.parse_special);
        if ids != case.ids {
            mismatches.push(format!(
                "{:?} (special={}):\n  ours  {:?}\n  llama {:?}",
                case.text, case.parse_special, ids, case.ids
            ));
        }
    }
    println!(
        "{} of {} fixture texts match llama.cpp",
        fx.cases.len() - mismatches.len(),
        fx.cases.len()
    );
    assert!(
        mismatches.is_empty(),
        "mismatches:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn decode_matches_llama_cpp_and_round_trips() {
    let Some((tok, _)) = vocab() else { return };
    let fx = fixture();
    for case in &fx.cases {
        assert_eq!(
            tok.decode(&case.ids, true),
            case.decode_skip,
            "decode(skip) of {:?}",
            case.text
        );
        assert_eq!(
            tok.decode(&case.ids, false),
            case.decode_special,
            "decode(special) of {:?}",
            case.text
        );
        if !case.parse_special {
            assert_eq!(
                tok.decode(&case.ids, true),
                case.text,
                "round trip of {:?}",
                case.text
            );
        }
        // Streaming yields the same text, whatever the token boundaries.
        let mut stream = StreamDecoder::new(&tok, false);
        let mut streamed = String::new();
        for &id in &case.ids {
            let part = stream.push(id);
            assert!(!part.contains('\u{FFFD}') || case.decode_special.contains('\u{FFFD}'));
            streamed.push_str(&part);
        }
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, case.decode_special, "stream of {:?}", case.text);
    }
}

#[test]
fn specials_and_pieces_match_llama_cpp() {
    let Some((tok, _)) = vocab() else { return };
    let fx = fixture();
    assert_eq!(tok.vocab_size(), fx.n_vocab);
    let eog: Vec<u32> = (0..tok.vocab_size() as u32)
        .filter(|&id| tok.is_eog(id))
        .collect();
    assert_eq!(eog, fx.eog);
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert_eq!(tok.token_text(1), Some("<|im_start|>"));
    for (special, want) in [
        (true, fx.pieces_fnv1a64_special),
        (false, fx.pieces_fnv1a64_plain),
    ] {
        let mut h = 0xCBF29CE484222325u64;
        for id in 0..tok.vocab_size() as u32 {
            let piece = tok.token_piece(id, special);
            fnv1a64(&mut h, &(piece.len() as u32).to_le_bytes());
            fnv1a64(&mut h, piece);
        }
        assert_eq!(
            h, want,
            "token_to_piece(special={special}) differs from llama.cpp"
        );
    }
}

#[test]
fn smollm2_chat_template_renders_like_jinja2() {
    let Some((_, template)) = vocab() else { return };
    let fx = fixture();
    let template = template.expect("SmolLM2 has a chat template");
    let messages: Vec<ChatMessage> = fx
        .chat_messages
        .iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect();
    let prompt =
        render_chat(&template, &messages, true, "<|im_start|>", "<|im_end|>").expect("renders");
    assert_eq!(prompt, fx.chat_prompt);
}

#[test]
fn encoding_4kb_is_fast() {
    let Some((tok, _)) = vocab() else { return };
    let fx = fixture();
    let mut text = String::new();
    let mut i = 0;
    while text.len() < 4096 {
        text.push_str(&fx.cases[i % fx.cases.len()].text);
        i += 1;
    }
    let start = Instant::now();
    let runs = 20;
    let mut n = 0;
    for _ in 0..runs {
        n += tok.encode(&text, true, true).len();
    }
    let per = start.elapsed() / runs;
    println!(
        "encode of {} bytes: {:?} per call ({} tokens)",
        text.len(),
        per,
        n / runs as usize
    );
    // Generous for unoptimised test builds; release builds are far below 10 ms.
    assert!(per.as_millis() < 100, "encode took {per:?}");
}

#[derive(Deserialize)]
struct FuzzCase {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
}

/// Random texts from `make_fuzz_cases.py`, when `HASHGRID_SMOLLM2_FUZZ` names them.
#[test]
fn fuzz_cases_match_llama_cpp() {
    let Some((tok, _)) = vocab() else { return };
    let Some(path) = std::env::var_os("HASHGRID_SMOLLM2_FUZZ") else {
        println!("note: HASHGRID_SMOLLM2_FUZZ is not set; skipping the random-text comparison");
        return;
    };
    let text = std::fs::read_to_string(path).expect("fuzz cases readable");
    let cases: Vec<FuzzCase> = serde_json::from_str(&text).expect("fuzz cases parse");
    let mut bad = Vec::new();
    for case in &cases {
        let ids = tok.encode(&case.text, false, case.parse_special);
        if ids != case.ids {
            bad.push(format!(
                "{:?} (special={}):\n  ours  {:?}\n  llama {:?}",
                case.text, case.parse_special, ids, case.ids
            ));
        }
    }
    println!(
        "{} of {} random texts match llama.cpp",
        cases.len() - bad.len(),
        cases.len()
    );
    assert!(
        bad.is_empty(),
        "{} mismatches, first ones:\n{}",
        bad.len(),
        bad.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}
