//! Compares the tokenizer with llama.cpp on llama.cpp's own test vocabularies
//! (`models/ggml-vocab-*.gguf`: GPT-2, Llama-3, Qwen2, StarCoder, Refact,
//! Command-R, MPT, Aquila, GPT-NeoX, Llama SPM, Phi-3, Baichuan).
//!
//! `make_vocab_cases.py` writes one JSON per vocabulary (spec + llama.cpp's
//! ids and detokenized text for ~1500 texts) into a folder; set
//! `HASHGRID_VOCAB_DIR` to it. Without it the test prints a note and passes.

use hashgrid_infer::tokenizer::{Tokenizer, VocabKind, VocabSpec};
use serde::Deserialize;

#[derive(Deserialize)]
struct Spec {
    name: String,
    general_name: String,
    model: String,
    pre: Option<String>,
    tokens: Vec<String>,
    token_types: Vec<i32>,
    scores: Vec<f32>,
    merges: Vec<String>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: Option<bool>,
}

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
struct VocabCases {
    spec: Spec,
    eog: Vec<u32>,
    cases: Vec<Case>,
}

#[test]
fn llama_cpp_test_vocabularies() {
    let Some(dir) = std::env::var_os("HASHGRID_VOCAB_DIR") else {
        println!("note: HASHGRID_VOCAB_DIR is not set; skipping the llama.cpp test vocabularies");
        return;
    };
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("HASHGRID_VOCAB_DIR readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut failures = Vec::new();
    for path in paths {
        let v: VocabCases =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("readable"))
                .expect("parses");
        let s = v.spec;
        let kind = match s.model.as_str() {
            "gpt2" => VocabKind::Bpe,
            "llama" => VocabKind::Spm,
            other => panic!("{}: unexpected model {other}", s.name),
        };
        let mut tok = Tokenizer::new(VocabSpec {
            kind,
            pre: s.pre.unwrap_or_else(|| "default".into()),
            tokens: s.tokens,
            token_types: s.token_types,
            scores: s.scores,
            merges: s.merges,
            bos: s.bos,
            eos: s.eos,
            eot: s.eot,
            unk: s.unk,
            pad: s.pad,
            add_bos: s.add_bos,
            add_eos: s.add_eos,
            add_space_prefix: s.add_space_prefix.unwrap_or(false),
        })
        .unwrap_or_else(|e| panic!("{}: {e}", s.name));
        tok.apply_model_name_quirks(&s.general_name);
        let eog: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&id| tok.is_eog(id))
            .collect();
        if eog != v.eog {
            failures.push(format!("{}: EOG ours {eog:?} llama {:?}", s.name, v.eog));
        }
        let (mut ok_ids, mut ok_dec) = (0, 0);
        for case in &v.cases {
            let ids = tok.encode(&case.text, case.add_special, case.parse_special);
            if ids == case.ids {
                ok_ids += 1;
            } else if failures.len() < 40 {
                failures.push(format!(
                    "{}: {:?} (add={}, special={})\n  ours  {:?}\n  llama {:?}",
                    s.name, case.text, case.add_special, case.parse_special, ids, case.ids
                ));
            }
            let skip = tok.decode(&case.ids, true);
            let special = tok.decode(&case.ids, false);
            if skip == case.decode_skip && special == case.decode_special {
                ok_dec += 1;
            } else if failures.len() < 40 {
                failures.push(format!(
                    "{}: decode of {:?}\n  ours  {skip:?} / {special:?}\n  llama {:?} / {:?}",
                    s.name, case.text, case.decode_skip, case.decode_special
                ));
            }
        }
        let mut long = String::new();
        for case in v.cases.iter().cycle().take(400) {
            if long.len() >= 4096 {
                break;
            }
            long.push_str(&case.text);
        }
        let start = std::time::Instant::now();
        let n = tok.encode(&long, true, true).len();
        let took = start.elapsed();
        println!(
            "{:>10}: {ok_ids}/{} encodings and {ok_dec}/{} decodings match llama.cpp; {} bytes -> {n} tokens in {took:?}",
            s.name,
            v.cases.len(),
            v.cases.len(),
            long.len()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
