//! Tests for the GGUF reader and writer.

use std::io::Cursor;

use super::*;

/// xorshift64* PRNG for reproducible test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

const NAME: &str = "test.gguf";

fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
    Gguf::parse_header(bytes, bytes.len() as u64, NAME)
}

fn parse_err(bytes: &[u8]) -> GgufError {
    match parse(bytes) {
        Ok(_) => panic!("parse unexpectedly succeeded"),
        Err(e) => e,
    }
}

/// A hand-assembled GGUF file, for headers the writer refuses to produce.
struct Raw(Vec<u8>);

impl Raw {
    /// Magic, version and counts.
    fn new(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        Raw(b"GGUF".to_vec()).u32(version).u64(n_tensors).u64(n_kv)
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A u32 metadata entry.
    fn kv_u32(self, key: &str, v: u32) -> Self {
        self.str(key).u32(value_type::U32).u32(v)
    }
    /// A tensor info.
    fn tensor(self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(type_id).u64(offset)
    }
    /// Zero padding to a multiple of `align`, then `n` bytes of data.
    fn data(mut self, align: usize, n: usize) -> Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self.0.resize(self.0.len() + n, 0x5a);
        self
    }
}

/// One value of every type, plus nested, empty and string arrays.
fn all_values() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-5)),
        ("t.u16", Value::U16(65000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f32", Value::F32(1.5e-5)),
        ("t.f64", Value::F64(-2.25)),
        ("t.bool", Value::Bool(true)),
        ("t.bool_false", Value::Bool(false)),
        ("t.str", Value::String("héllo \u{1f980} world".into())),
        ("t.empty_str", Value::String(String::new())),
        (
            "t.arr_u32",
            Value::Array(vec![Value::U32(1), Value::U32(2), Value::U32(3)]),
        ),
        (
            "t.arr_str",
            Value::Array(vec![
                Value::String("a".into()),
                Value::String("<|im_end|>".into()),
            ]),
        ),
        (
            "t.arr_f32",
            Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)]),
        ),
        (
            "t.arr_i32",
            Value::Array(vec![Value::I32(-1), Value::I32(7)]),
        ),
        (
            "t.nested",
            Value::Array(vec![
                Value::Array(vec![Value::I8(1)]),
                Value::Array(vec![Value::I8(2), Value::I8(3)]),
            ]),
        ),
        ("t.empty_arr", Value::Array(vec![])),
        ("general.alignment", Value::U32(64)),
    ]
}

/// Tensors of every type: (name, dims, type).
fn all_tensors() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("f32", vec![3], GgmlType::F32),
        ("f16", vec![4, 2], GgmlType::F16),
        ("q4_0", vec![64, 2], GgmlType::Q4_0),
        ("q4_1", vec![32], GgmlType::Q4_1),
        ("q8_0", vec![32, 3], GgmlType::Q8_0),
        ("blk.0.q4_k", vec![256, 2, 1], GgmlType::Q4_K),
        ("blk.0.q6_k", vec![256], GgmlType::Q6_K),
        ("empty", vec![0, 4], GgmlType::F32),
    ]
}

/// A writer holding [`all_values`] and [`all_tensors`] with random values; also returns the
/// f32 values of each tensor.
fn sample_writer() -> (GgufWriter, Vec<Vec<f32>>) {
    let mut w = GgufWriter::new();
    for (k, v) in all_values() {
        w.add_metadata(k, v).expect("add metadata");
    }
    let mut rng = Rng::new(7);
    let mut values = Vec::new();
    for (name, dims, ty) in all_tensors() {
        let n: u64 = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
        w.add_tensor_f32(name, &dims, ty, &v).expect("add tensor");
        values.push(v);
    }
    (w, values)
}

fn sample_bytes() -> Vec<u8> {
    sample_writer().0.to_bytes().expect("write")
}

#[test]
fn round_trip_every_value_and_tensor_type() {
    let (w, values) = sample_writer();
    let bytes = w.to_bytes().expect("write");
    let g = parse(&bytes).expect("parse");
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.file_len(), bytes.len() as u64);
    assert_eq!(g.data_start() % 64, 0);
    let want: Vec<(String, Value)> = all_values()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(g.metadata, want);
    assert_eq!(g.tensors.len(), all_tensors().len());
    for ((t, (name, dims, ty)), v) in g.tensors.iter().zip(all_tensors()).zip(&values) {
        assert_eq!(t.name, name);
        assert_eq!(t.dims, dims);
        assert_eq!(t.ty, ty);
        assert_eq!(t.n_elements, dims.iter().product::<u64>());
        assert_eq!(t.offset % 64, 0, "{name} aligned");
        assert!(t.offset >= g.data_start());
        let data = g.read_tensor_from(Cursor::new(&bytes), t).expect("read");
        assert_eq!(
            data,
            quant::quantize(ty, v).expect("quantize"),
            "{name} bytes"
        );
        assert_eq!(data.len() as u64, t.n_bytes);
    }
    assert_eq!(g.tensor("q8_0").map(|t| t.n_rows()), Some(3));
    assert_eq!(g.tensor("q8_0").map(|t| t.row_len()), Some(32));
    assert!(g.tensor("nope").is_none());
}

#[test]
fn write_file_open_and_read_tensor() {
    let (w, values) = sample_writer();
    let path = std::env::temp_dir().join(format!("gguf-test-{}.gguf", std::process::id()));
    w.write_file(&path).expect("write file");
    let g = Gguf::open(&path).expect("open");
    assert_eq!(g.path(), path.as_path());
    for (t, v) in g.tensors.iter().zip(&values) {
        let got = g.read_tensor_f32(t).expect("read f32");
        assert_eq!(got.len(), v.len());
        for (a, b) in got.iter().zip(v) {
            assert!((a - b).abs() < 0.15, "{}: {a} vs {b}", t.name);
        }
    }
    // A file truncated after opening is reported, not read short.
    let full = std::fs::read(&path).expect("read back");
    std::fs::write(&path, &full[..full.len() - 200]).expect("truncate");
    let last = g
        .tensors
        .iter()
        .filter(|t| t.n_bytes > 0)
        .max_by_key(|t| t.offset)
        .expect("tensors");
    let err = g.read_tensor(last).expect_err("must fail");
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    std::fs::remove_file(&path).expect("cleanup");
    let err = Gguf::open(&path).expect_err("gone");
    assert!(matches!(err, GgufError::Io { .. }));
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn header_is_parsed_without_reading_tensor_data() {
    let bytes = sample_bytes();
    let g = parse(&bytes).expect("parse");
    // Only the header bytes are available to the reader; the length is the real one.
    let header = &bytes[..usize::try_from(g.data_start()).expect("fits")];
    let g2 = Gguf::parse_header(header, bytes.len() as u64, NAME).expect("header only");
    assert_eq!(g2.tensors, g.tensors);
}

#[test]
fn getters() {
    let mut w = GgufWriter::new();
    let entries = [
        ("u8", Value::U8(7)),
        ("u64", Value::U64(1 << 40)),
        ("neg", Value::I32(-1)),
        ("f64", Value::F64(0.25)),
        ("f64_big", Value::F64(1e300)),
        ("s", Value::String("llama".into())),
        ("b", Value::Bool(true)),
        (
            "toks",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        ),
        ("ints", Value::Array(vec![Value::U8(1), Value::U8(255)])),
        (
            "big_ints",
            Value::Array(vec![Value::U64(1), Value::U64(1 << 40)]),
        ),
        (
            "floats",
            Value::Array(vec![Value::F64(0.5), Value::F64(2.0)]),
        ),
        ("empty", Value::Array(vec![])),
    ];
    for (k, v) in entries {
        w.add_metadata(k, v).expect("add");
    }
    let bytes = w.to_bytes().expect("write");
    let g = parse(&bytes).expect("parse");

    assert_eq!(g.get_u32("u8").expect("u8"), 7);
    assert_eq!(g.get_u64("u64").expect("u64"), 1 << 40);
    assert_eq!(g.get_f32("f64").expect("f64"), 0.25);
    assert_eq!(g.get_str("s").expect("s"), "llama");
    assert!(g.get_bool("b").expect("b"));
    assert_eq!(g.get_str_array("toks").expect("toks"), ["a", "b"]);
    assert_eq!(g.get_i32_array("ints").expect("ints"), [1, 255]);
    assert_eq!(g.get_f32_array("floats").expect("floats"), [0.5, 2.0]);
    assert!(g.get_str_array("empty").expect("empty").is_empty());
    assert_eq!(g.get("s"), Some(&Value::String("llama".into())));

    assert_eq!(g.opt_u32("absent").expect("opt"), None);
    assert_eq!(g.opt_str("s").expect("opt"), Some("llama"));
    assert_eq!(g.opt_f32("absent").expect("opt"), None);
    assert_eq!(g.opt_bool("absent").expect("opt"), None);
    assert_eq!(g.opt_str_array("absent").expect("opt"), None);
    assert_eq!(g.opt_f32_array("absent").expect("opt"), None);
    assert_eq!(g.opt_i32_array("ints").expect("opt"), Some(vec![1, 255]));
    assert_eq!(g.opt_u64("u8").expect("opt"), Some(7));
    assert!(
        g.opt_u32("s").is_err(),
        "present but wrong type is an error"
    );

    let msg = g.get_u32("absent").expect_err("missing").to_string();
    assert_eq!(msg, "test.gguf: metadata key 'absent' is missing");
    let msg = g.get_u32("s").expect_err("type").to_string();
    assert_eq!(
        msg,
        "test.gguf: metadata key 's': expected an integer fitting u32, found string"
    );
    let msg = g.get_u32("neg").expect_err("range").to_string();
    assert_eq!(
        msg,
        "test.gguf: metadata key 'neg': value -1 does not fit in an integer fitting u32"
    );
    assert!(g.get_u32("u64").is_err());
    assert!(matches!(
        g.get_f32("f64_big"),
        Err(GgufError::OutOfRange { .. })
    ));
    assert!(matches!(g.get_f32("s"), Err(GgufError::WrongType { .. })));
    assert!(matches!(g.get_bool("u8"), Err(GgufError::WrongType { .. })));
    let msg = g.get_str_array("ints").expect_err("elem type").to_string();
    assert!(
        msg.contains("expected array of string, found array of 2 u8 with a u8 at index 0"),
        "{msg}"
    );
    let msg = g.get_str_array("s").expect_err("not array").to_string();
    assert!(
        msg.contains("expected array of string, found string"),
        "{msg}"
    );
    assert!(matches!(
        g.get_i32_array("big_ints"),
        Err(GgufError::OutOfRange { .. })
    ));
    assert!(matches!(
        g.get_f32_array("toks"),
        Err(GgufError::WrongType { .. })
    ));
}

#[test]
fn truncation_at_every_cut_point_is_an_error() {
    let bytes = sample_bytes();
    let g = parse(&bytes).expect("parse");
    let data_end = g
        .tensors
        .iter()
        .map(|t| t.offset + t.n_bytes)
        .max()
        .expect("tensors");
    for cut in 0..bytes.len() {
        let r = parse(&bytes[..cut]);
        if (cut as u64) < data_end {
            let err = r.expect_err("truncated file must fail");
            let msg = err.to_string();
            assert!(msg.starts_with("test.gguf: "), "cut {cut}: {msg}");
        } else {
            // Only the padding after the last tensor is missing.
            assert!(r.is_ok(), "cut {cut}");
        }
    }
    // A cut inside the last tensor names it and the byte range.
    let last = g
        .tensors
        .iter()
        .filter(|t| t.n_bytes > 0)
        .max_by_key(|t| t.offset)
        .expect("tensors");
    let cut = usize::try_from(last.offset + 1).expect("fits");
    let msg = parse_err(&bytes[..cut]).to_string();
    assert_eq!(
        msg,
        format!(
            "test.gguf: truncated: tensor '{}' needs bytes {}..{} but the file is {cut} bytes",
            last.name,
            last.offset,
            last.offset + last.n_bytes
        )
    );
}

#[test]
fn random_corruption_never_panics() {
    let bytes = sample_bytes();
    let mut rng = Rng::new(99);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(b.len());
            // Bias toward the header, where the structure is.
            let i = if rng.below(2) == 0 { i % 600 } else { i };
            b[i] = rng.next_u64() as u8;
        }
        if rng.below(4) == 0 {
            b.truncate(rng.below(b.len()));
        }
        match parse(&b) {
            Ok(g) => {
                ok += 1;
                for t in &g.tensors {
                    if let Ok(data) = g.read_tensor_from(Cursor::new(&b), t) {
                        let _ = g.decode(t, &data);
                    }
                }
            }
            Err(e) => {
                err += 1;
                assert!(e.to_string().starts_with("test.gguf"), "{e}");
            }
        }
    }
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}

#[test]
fn bad_magic() {
    let mut bytes = sample_bytes();
    bytes[0] = b'X';
    let err = parse_err(&bytes);
    assert!(matches!(err, GgufError::BadMagic { found, .. } if found == *b"XGUF"));
    assert!(
        err.to_string()
            .starts_with("test.gguf: not a GGUF file (magic [58, 47, 55, 46]"),
        "{err}"
    );
    assert!(matches!(parse_err(b"GG"), GgufError::Truncated { .. }));
    assert!(matches!(parse_err(b""), GgufError::Truncated { .. }));
}

#[test]
fn versions() {
    let err = parse_err(&Raw::new(1, 0, 0).0);
    assert!(matches!(
        err,
        GgufError::UnsupportedVersion { version: 1, .. }
    ));
    assert!(err.to_string().contains("GGUF v1"), "{err}");
    let err = parse_err(&Raw::new(4, 0, 0).0);
    assert!(matches!(
        err,
        GgufError::UnsupportedVersion { version: 4, .. }
    ));
    let err = parse_err(&Raw::new(0x0300_0000, 0, 0).0);
    assert!(err.to_string().contains("big-endian"), "{err}");
    let g = parse(&Raw::new(2, 0, 0).0).expect("v2 is read");
    assert_eq!(g.version, 2);
    assert!(g.tensors.is_empty() && g.metadata.is_empty());
    assert_eq!(g.alignment, DEFAULT_ALIGNMENT);
}

#[test]
fn forged_counts_fail_fast() {
    // Array of 2^60 u8: must be refused before allocating anything.
    let raw = Raw::new(3, 0, 1)
        .str("tokenizer.ggml.tokens")
        .u32(value_type::ARRAY)
        .u32(value_type::U8)
        .u64(1 << 60)
        .bytes(&[0; 64]);
    let err = parse_err(&raw.0);
    assert!(matches!(err, GgufError::CountTooLarge { count, .. } if count == 1 << 60));
    assert!(
        err.to_string()
            .contains("metadata key 'tokenizer.ggml.tokens'"),
        "{err}"
    );
    // Array of 2^60 arrays, and of 2^60 strings.
    for elem in [value_type::ARRAY, value_type::STRING, value_type::U64] {
        let raw = Raw::new(3, 0, 1)
            .str("k")
            .u32(value_type::ARRAY)
            .u32(elem)
            .u64(1 << 60);
        assert!(matches!(parse_err(&raw.0), GgufError::CountTooLarge { .. }));
    }
    // 9 u64 need 72 bytes; only 71 remain.
    let raw = Raw::new(3, 0, 1)
        .str("k")
        .u32(value_type::ARRAY)
        .u32(value_type::U64)
        .u64(9)
        .bytes(&[0; 71]);
    assert!(matches!(parse_err(&raw.0), GgufError::CountTooLarge { .. }));
    // Tensor and kv counts.
    let err = parse_err(&Raw::new(3, 1 << 60, 0).0);
    assert!(matches!(err, GgufError::CountTooLarge { .. }));
    assert!(err.to_string().contains("tensor_count"), "{err}");
    let err = parse_err(&Raw::new(3, 0, u64::MAX).bytes(&[0; 100]).0);
    assert!(err.to_string().contains("kv_count"), "{err}");
    // The smallest legal kv (empty key, u8) fits exactly.
    let raw = Raw::new(3, 0, 1).str("").u32(value_type::U8).bytes(&[9]);
    assert_eq!(parse(&raw.0).expect("parse").get(""), Some(&Value::U8(9)));
}

#[test]
fn metadata_value_budget() {
    // Two arrays that each fit in the file but together exceed MAX_METADATA_VALUES.
    let half = MAX_METADATA_VALUES / 2 + 1;
    let n = usize::try_from(half).expect("fits");
    let raw = Raw::new(3, 0, 2)
        .str("a")
        .u32(value_type::ARRAY)
        .u32(value_type::U8)
        .u64(half)
        .bytes(&vec![0; n])
        .str("b")
        .u32(value_type::ARRAY)
        .u32(value_type::U8)
        .u64(half)
        .bytes(&vec![0; n]);
    let err = parse_err(&raw.0);
    assert!(matches!(err, GgufError::TooManyValues { .. }), "{err}");
    assert!(err.to_string().contains("metadata key 'b'"), "{err}");
}

#[test]
fn unsupported_tensor_types_name_the_tensor() {
    let raw = Raw::new(3, 1, 0)
        .tensor("blk.0.attn_q.weight", &[32], 99, 0)
        .data(32, 64);
    let err = parse_err(&raw.0);
    assert!(matches!(
        err,
        GgufError::UnsupportedTensorType { type_id: 99, .. }
    ));
    assert_eq!(
        err.to_string(),
        "test.gguf: tensor 'blk.0.attn_q.weight' has type unknown type id 99, which hashgrid does \
         not support (supported: F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)"
    );
    let raw = Raw::new(3, 1, 0)
        .tensor("blk.3.ffn_up.weight", &[256], 13, 0)
        .data(32, 176);
    assert_eq!(
        parse_err(&raw.0).to_string(),
        "test.gguf: tensor 'blk.3.ffn_up.weight' has type Q5_K, which hashgrid does not support \
         (supported: F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)"
    );
}

#[test]
fn unknown_value_type() {
    let raw = Raw::new(3, 0, 1).str("general.x").u32(13).u64(0);
    let err = parse_err(&raw.0);
    assert!(matches!(
        err,
        GgufError::UnknownValueType { type_id: 13, .. }
    ));
    assert_eq!(
        err.to_string(),
        "test.gguf: metadata key 'general.x': unknown value type 13"
    );
    let raw = Raw::new(3, 0, 1)
        .str("k")
        .u32(value_type::ARRAY)
        .u32(200)
        .u64(0);
    assert!(matches!(
        parse_err(&raw.0),
        GgufError::UnknownValueType { type_id: 200, .. }
    ));
}

#[test]
fn string_bounds_and_utf8() {
    // A forged huge length is refused by the bound, before any allocation.
    let raw = Raw::new(3, 0, 1)
        .str("k")
        .u32(value_type::STRING)
        .u64(1 << 40);
    let err = parse_err(&raw.0);
    assert!(matches!(err, GgufError::StringTooLong { len, .. } if len == 1 << 40));
    // Within the bound but beyond the file.
    let raw = Raw::new(3, 0, 1)
        .str("k")
        .u32(value_type::STRING)
        .u64(1000)
        .bytes(&[b'a'; 10]);
    let err = parse_err(&raw.0);
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    assert!(
        err.to_string().contains("metadata key 'k' needs bytes"),
        "{err}"
    );
    // Key length bound (2^16 - 1).
    let raw = Raw::new(3, 0, 1)
        .str(&"k".repeat(70_000))
        .u32(value_type::U8)
        .bytes(&[0]);
    assert!(matches!(
        parse_err(&raw.0),
        GgufError::StringTooLong {
            limit: MAX_KEY_LEN,
            ..
        }
    ));
    // Tensor name bound (63).
    let raw = Raw::new(3, 1, 0)
        .tensor(&"n".repeat(64), &[1], 0, 0)
        .data(32, 4);
    assert!(matches!(
        parse_err(&raw.0),
        GgufError::StringTooLong { limit: 63, .. }
    ));
    // Invalid UTF-8 in a value, a key and a tensor name.
    let raw = Raw::new(3, 0, 1)
        .str("k")
        .u32(value_type::STRING)
        .u64(2)
        .bytes(&[0xc3, 0x28]);
    let err = parse_err(&raw.0);
    assert_eq!(
        err.to_string(),
        "test.gguf: metadata key 'k': string is not valid UTF-8"
    );
    let raw = Raw::new(3, 0, 1)
        .u64(1)
        .bytes(&[0xff])
        .u32(value_type::U8)
        .bytes(&[0]);
    assert!(matches!(parse_err(&raw.0), GgufError::InvalidUtf8 { .. }));
    let raw = Raw::new(3, 1, 0)
        .u64(1)
        .bytes(&[0x80])
        .u32(1)
        .u64(1)
        .u32(0)
        .u64(0)
        .data(32, 4);
    assert!(matches!(parse_err(&raw.0), GgufError::InvalidUtf8 { .. }));
}

#[test]
fn nesting_and_bools() {
    // MAX_ARRAY_DEPTH nested arrays are fine; one more is refused.
    let nested = |depth: u32| {
        let mut raw = Raw::new(3, 0, 1).str("deep").u32(value_type::ARRAY);
        for _ in 1..depth {
            raw = raw.u32(value_type::ARRAY).u64(1);
        }
        raw.u32(value_type::U8).u64(1).bytes(&[42])
    };
    let g = parse(&nested(MAX_ARRAY_DEPTH).0).expect("max depth");
    let mut v = g.get("deep").expect("deep");
    for _ in 1..MAX_ARRAY_DEPTH {
        let Value::Array(items) = v else {
            panic!("not an array")
        };
        v = &items[0];
    }
    assert_eq!(v, &Value::Array(vec![Value::U8(42)]));
    let err = parse_err(&nested(MAX_ARRAY_DEPTH + 1).0);
    assert!(matches!(err, GgufError::TooDeep { .. }), "{err}");

    let raw = Raw::new(3, 0, 1).str("b").u32(value_type::BOOL).bytes(&[2]);
    assert!(matches!(
        parse_err(&raw.0),
        GgufError::InvalidBool { byte: 2, .. }
    ));
}

#[test]
fn tensor_shape_errors() {
    let err = parse_err(
        &Raw::new(3, 1, 0)
            .tensor("t", &[1, 1, 1, 1, 1], 0, 0)
            .data(32, 4)
            .0,
    );
    assert_eq!(
        err.to_string(),
        "test.gguf: tensor 't': 5 dimensions (at most 4)"
    );
    let err = parse_err(
        &Raw::new(3, 1, 0)
            .tensor("t", &[1 << 32, 1 << 32, 2], 0, 0)
            .0,
    );
    assert!(err.to_string().contains("overflow"), "{err}");
    let err = parse_err(&Raw::new(3, 1, 0).tensor("t", &[1 << 62, 4], 0, 0).0);
    assert!(err.to_string().contains("overflow"), "{err}");
    let err = parse_err(&Raw::new(3, 1, 0).tensor("t", &[33, 2], 2, 0).data(32, 64).0);
    assert_eq!(
        err.to_string(),
        "test.gguf: tensor 't': row length 33 is not a multiple of Q4_0's block size 32"
    );
    // No dims: a scalar.
    let g = parse(&Raw::new(3, 1, 0).tensor("s", &[], 0, 0).data(32, 4).0).expect("scalar");
    assert_eq!((g.tensors[0].n_elements, g.tensors[0].n_bytes), (1, 4));
}

#[test]
fn duplicates() {
    let raw = Raw::new(3, 2, 0)
        .tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .data(32, 64);
    assert_eq!(
        parse_err(&raw.0).to_string(),
        "test.gguf: duplicate tensor name 'w'"
    );
    let raw = Raw::new(3, 0, 2).kv_u32("a", 1).kv_u32("a", 2);
    assert_eq!(
        parse_err(&raw.0).to_string(),
        "test.gguf: duplicate metadata key 'a'"
    );
}

#[test]
fn alignment_and_placement() {
    // Offset 16 is not a multiple of the default 32.
    let raw = Raw::new(3, 1, 0).tensor("w", &[4], 0, 16).data(32, 64);
    let err = parse_err(&raw.0);
    assert!(matches!(
        err,
        GgufError::MisalignedTensor {
            offset: 16,
            alignment: 32,
            ..
        }
    ));
    // ... but is with general.alignment = 16.
    let raw = Raw::new(3, 1, 1)
        .kv_u32(ALIGNMENT_KEY, 16)
        .tensor("w", &[4], 0, 16)
        .data(16, 32);
    let g = parse(&raw.0).expect("aligned to 16");
    assert_eq!(g.alignment, 16);
    assert_eq!(g.tensors[0].offset, g.data_start() + 16);
    // Invalid alignments.
    for a in [0, 48, 3, 1 << 21] {
        let raw = Raw::new(3, 0, 1).kv_u32(ALIGNMENT_KEY, a);
        let err = parse_err(&raw.0);
        assert!(matches!(err, GgufError::BadAlignment { .. }), "{a}: {err}");
    }
    let raw = Raw::new(3, 0, 1)
        .str(ALIGNMENT_KEY)
        .u32(value_type::STRING)
        .str("32");
    assert!(
        parse_err(&raw.0)
            .to_string()
            .contains("general.alignment is a string")
    );
    // Overlapping tensors: 64 bytes at 0 and at 32.
    let raw = Raw::new(3, 2, 0)
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[16], 0, 32)
        .data(32, 96);
    assert_eq!(
        parse_err(&raw.0).to_string(),
        "test.gguf: the data of tensors 'a' and 'b' overlap"
    );
    // Data beyond the end of the file, and offsets that overflow.
    let raw = Raw::new(3, 1, 0)
        .tensor("blk.3.ffn_up.weight", &[16], 0, 0)
        .data(32, 63);
    let len = raw.0.len();
    assert_eq!(
        parse_err(&raw.0).to_string(),
        format!(
            "test.gguf: truncated: tensor 'blk.3.ffn_up.weight' needs bytes {}..{} but the file is {len} bytes",
            len - 63,
            len + 1
        )
    );
    let raw = Raw::new(3, 1, 0)
        .tensor("w", &[16], 0, u64::MAX - 31)
        .data(32, 64);
    assert!(matches!(parse_err(&raw.0), GgufError::Truncated { .. }));
}

#[test]
fn writer_refuses_invalid_input() {
    let mut w = GgufWriter::new();
    w.add_metadata("a", Value::U8(1)).expect("first");
    assert!(w.add_metadata("a", Value::U8(2)).is_err());
    assert!(
        w.add_metadata("mixed", Value::Array(vec![Value::U8(1), Value::I8(1)]))
            .is_err()
    );
    assert!(w.add_metadata(ALIGNMENT_KEY, Value::U32(48)).is_err());
    assert!(
        w.add_metadata(ALIGNMENT_KEY, Value::String("x".into()))
            .is_err()
    );
    let mut deep = Value::U8(0);
    for _ in 0..=MAX_ARRAY_DEPTH {
        deep = Value::Array(vec![deep]);
    }
    assert!(w.add_metadata("deep", deep).is_err());
    assert!(
        w.add_tensor("t", &[32], GgmlType::Q8_0, vec![0; 33])
            .is_err()
    );
    assert!(
        w.add_tensor("t", &[31], GgmlType::Q8_0, vec![0; 34])
            .is_err()
    );
    assert!(
        w.add_tensor("t", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4])
            .is_err()
    );
    assert!(
        w.add_tensor("n".repeat(64), &[1], GgmlType::F32, vec![0; 4])
            .is_err()
    );
    w.add_tensor("t", &[32], GgmlType::Q8_0, vec![0; 34])
        .expect("ok");
    assert!(
        w.add_tensor("t", &[32], GgmlType::Q8_0, vec![0; 34])
            .is_err()
    );
    assert!(
        w.add_tensor_f32("u", &[32], GgmlType::Q8_0, &[0.0; 31])
            .is_err()
    );
    assert!(
        w.add_tensor_f32("u", &[32], GgmlType::Q8_0, &[f32::NAN; 32])
            .is_err()
    );
    let g = parse(&w.to_bytes().expect("write")).expect("parse");
    assert_eq!(g.tensors.len(), 1);
    assert_eq!(g.metadata.len(), 1);
}

/// Facts of the published `SmolLM2-135M-Instruct.Q4_1.gguf`, read by the `gguf` Python package.
#[test]
fn smollm2_real_model() {
    let Ok(path) = std::env::var("HASHGRID_SMOLLM2") else {
        eprintln!("note: skipping smollm2_real_model; set HASHGRID_SMOLLM2 to the Q4_1 GGUF file");
        return;
    };
    let g = Gguf::open(&path).expect("open");
    assert_eq!(g.version, 3);
    assert_eq!(g.tensors.len(), 272);
    assert_eq!(g.metadata.len(), 33);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.data_start(), 1_785_664);
    assert_eq!(g.get_str("general.architecture").expect("arch"), "llama");
    assert_eq!(g.get_u32("llama.block_count").expect("blocks"), 30);
    assert_eq!(g.get_u32("llama.embedding_length").expect("embd"), 576);
    assert_eq!(g.get_u32("llama.attention.head_count_kv").expect("kv"), 3);
    assert_eq!(g.get_f32("llama.rope.freq_base").expect("rope"), 100_000.0);
    assert!(!g.get_bool("tokenizer.ggml.add_bos_token").expect("bos"));
    let tokens = g.get_str_array("tokenizer.ggml.tokens").expect("tokens");
    assert_eq!(tokens.len(), 49_152);
    assert_eq!(tokens[0], "<|endoftext|>");
    assert_eq!(
        g.get_i32_array("tokenizer.ggml.token_type")
            .expect("types")
            .len(),
        49_152
    );

    let embd = g.tensor("token_embd.weight").expect("token_embd");
    assert_eq!(embd.ty, GgmlType::Q8_0);
    assert_eq!(embd.dims, [576, 49_152]);
    assert_eq!(embd.offset, 1_785_664);
    assert_eq!(embd.n_bytes, 30_081_024);
    let e = g.read_tensor_f32(embd).expect("embd values");
    // Exact f32 values, written as f64 literals and compared in f64.
    for (i, want) in [
        (0, -0.106_544_494_628_906_25f64),
        (579, 0.015_869_140_625),
        (28_311_551, -0.041_702_270_507_812_5),
    ] {
        assert!(
            (f64::from(e[i]) - want).abs() < 1e-6,
            "token_embd[{i}] = {}, python {want}",
            e[i]
        );
    }

    let q = g.tensor("blk.0.attn_q.weight").expect("attn_q");
    assert_eq!(q.ty, GgmlType::Q4_1);
    assert_eq!(q.dims, [576, 576]);
    let v = g.read_tensor_f32(q).expect("attn_q values");
    let python = [
        (0, -0.096_313_476_562_5f64),
        (1, 0.157_348_632_812_5),
        (16, -0.223_144_531_25),
        (31, -0.096_313_476_562_5),
        (32, -0.346_191_406_25),
        (575, 0.123_535_156_25),
        (576, -0.117_309_570_312_5),
        (12_345, 0.121_093_75),
        (200_000, -0.001_953_125),
        (331_775, -0.255_859_375),
    ];
    for (i, want) in python {
        assert!(
            (f64::from(v[i]) - want).abs() < 1e-6,
            "attn_q[{i}] = {}, python {want}",
            v[i]
        );
    }
    let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
    assert!((sum - 59.223_220_825_195_31).abs() < 1e-6, "sum {sum}");

    let norm = g.tensor("output_norm.weight").expect("norm");
    assert_eq!(
        g.read_tensor_f32(norm).expect("norm values")[0],
        1.757_812_5
    );
}
