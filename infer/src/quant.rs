//! The ggml tensor types hashgrid supports, their exact block layouts, and CPU reference
//! routines to decode ([`dequantize`]) and encode ([`quantize`]) them.
//!
//! Every quantized type stores a row as a sequence of fixed-size *blocks*; each block holds
//! [`GgmlType::block_elems`] values in [`GgmlType::block_bytes`] bytes. All multi-byte fields are
//! little-endian. The layouts and formulas are ggml's (`ggml-common.h`, `ggml-quants.c`); the
//! layout of each block is documented next to the function that reads it.
//!
//! [`dequantize`] reproduces ggml's `dequantize_row_*` arithmetic operation for operation (the same
//! f32 multiplications and additions in the same order, no fused multiply-add), so its output is
//! bit-identical to ggml's scalar code and to the `gguf` Python package.
//!
//! [`quantize`] is a reference encoder for writing test models: Q4_0, Q4_1 and Q8_0 follow ggml's
//! `quantize_row_*_ref` bit for bit; Q4_K and Q6_K use a simple non-iterative min/max scheme
//! (documented on [`quantize`]) that writes ggml's exact layout but not ggml's exact bytes.
//!
//! Nothing here panics: blocks are taken as fixed-size arrays (`as_chunks`), and the only
//! indexing is into those arrays with constant or range-bounded indices.

use std::fmt;

use thiserror::Error;

/// Elements per block of the 32-element formats (ggml's `QK4_0`, `QK4_1`, `QK8_0`).
const QK: usize = 32;
/// Elements per super-block of the k-quants (ggml's `QK_K`).
const QK_K: usize = 256;

/// Bytes of one F32 element.
const F32_BYTES: usize = 4;
/// Bytes of one F16 element.
const F16_BYTES: usize = 2;
/// Bytes of a `block_q4_0`: `d: f16` + 16 bytes of nibbles.
const Q4_0_BYTES: usize = 2 + QK / 2;
/// Bytes of a `block_q4_1`: `d: f16`, `m: f16` + 16 bytes of nibbles.
const Q4_1_BYTES: usize = 4 + QK / 2;
/// Bytes of a `block_q8_0`: `d: f16` + 32 signed bytes.
const Q8_0_BYTES: usize = 2 + QK;
/// Bytes of a `block_q4_K`: `d`, `dmin` (f16), 12 bytes of packed scales, 128 bytes of nibbles.
const Q4_K_BYTES: usize = 4 + 12 + QK_K / 2;
/// Bytes of a `block_q6_K`: `ql[128]`, `qh[64]`, `scales[16]`, `d: f16`.
const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// The supported type names, in the order error messages list them.
pub const SUPPORTED_TYPE_NAMES: &str = "F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K";

/// A ggml tensor type that hashgrid can read, compute with and write.
///
/// Type ids are ggml's `enum ggml_type` values, which GGUF stores per tensor.
#[allow(non_camel_case_types)] // ggml's own names, as every GGUF tool prints them
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    /// 32-bit IEEE float (id 0).
    F32,
    /// 16-bit IEEE half float (id 1).
    F16,
    /// 32 values: 4-bit quants and one f16 scale (id 2).
    Q4_0,
    /// 32 values: 4-bit quants, an f16 scale and an f16 minimum (id 3).
    Q4_1,
    /// 32 values: 8-bit quants and one f16 scale (id 8).
    Q8_0,
    /// 256 values: 4-bit quants, 8 sub-blocks with 6-bit scales and mins (id 12).
    Q4_K,
    /// 256 values: 6-bit quants, 16 sub-blocks with 8-bit scales (id 14).
    Q6_K,
}

impl GgmlType {
    /// Every supported type, in id order.
    pub const ALL: [GgmlType; 7] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    /// The supported type with ggml type id `id`, or `None` for any other id (known or not; see
    /// [`type_name_of_id`] to name it).
    pub fn from_u32(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's type id (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q6_K => 14,
        }
    }

    /// ggml's name for the type ("Q4_K", ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block: 1 for F32/F16, 32 for Q4_0/Q4_1/Q8_0, 256 for the k-quants.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => QK,
            GgmlType::Q4_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block: 4, 2, 18, 20, 34, 144, 210 in [`GgmlType::ALL`] order.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => F32_BYTES,
            GgmlType::F16 => F16_BYTES,
            GgmlType::Q4_0 => Q4_0_BYTES,
            GgmlType::Q4_1 => Q4_1_BYTES,
            GgmlType::Q8_0 => Q8_0_BYTES,
            GgmlType::Q4_K => Q4_K_BYTES,
            GgmlType::Q6_K => Q6_K_BYTES,
        }
    }

    /// Bytes that `n_elems` values of this type occupy.
    ///
    /// Errors if `n_elems` is not a whole number of blocks, or if the size overflows `u64`.
    pub fn row_bytes(self, n_elems: u64) -> Result<u64, QuantError> {
        let block = self.block_elems() as u64;
        if !n_elems.is_multiple_of(block) {
            return Err(QuantError::NotBlockMultiple { ty: self, n_elems });
        }
        (n_elems / block)
            .checked_mul(self.block_bytes() as u64)
            .ok_or(QuantError::SizeOverflow { ty: self, n_elems })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// ggml's name for any type id, supported or not ("Q5_K", "BF16", "IQ2_XXS", ...), so errors can
/// say which type a file uses; ids ggml never assigned give "unknown type id N".
pub fn type_name_of_id(id: u32) -> String {
    let name = match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2",
        5 => "Q4_3",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        31 => "Q4_0_4_4",
        32 => "Q4_0_4_8",
        33 => "Q4_0_8_8",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4",
        37 => "IQ4_NL_4_8",
        38 => "IQ4_NL_8_8",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => return format!("unknown type id {id}"),
    };
    name.to_string()
}

/// Errors from [`dequantize`], [`quantize`] and [`GgmlType::row_bytes`].
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum QuantError {
    /// The element count is not a whole number of blocks.
    #[error("{ty} stores {} values per block, but {n_elems} values is not a whole number of blocks", .ty.block_elems())]
    NotBlockMultiple {
        /// The type.
        ty: GgmlType,
        /// The element count given.
        n_elems: u64,
    },
    /// The byte size of `n_elems` values overflows `u64`.
    #[error("{ty}: the size of {n_elems} values overflows u64")]
    SizeOverflow {
        /// The type.
        ty: GgmlType,
        /// The element count given.
        n_elems: u64,
    },
    /// The input bytes do not match the element count.
    #[error("{ty}: {n_elems} values take {expected} bytes, but {actual} bytes were given")]
    ByteLength {
        /// The type.
        ty: GgmlType,
        /// The element count (the output length).
        n_elems: u64,
        /// `row_bytes(n_elems)`.
        expected: u64,
        /// The length of the byte slice given.
        actual: u64,
    },
    /// A NaN or infinity was given to [`quantize`].
    #[error("{ty}: value {index} is {value}; only finite values can be quantized")]
    NonFinite {
        /// The type.
        ty: GgmlType,
        /// Index of the offending value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A block's scale (or an F16 value) does not fit in an f16.
    #[error(
        "{ty}: the block starting at value {index} needs the f16 field {value}, beyond f16's largest finite value 65504"
    )]
    OutOfRange {
        /// The type.
        ty: GgmlType,
        /// Index of the block's first value.
        index: usize,
        /// The f32 value that overflowed f16.
        value: f32,
    },
}

// ---------------------------------------------------------------------------------------------
// f16 <-> f32
// ---------------------------------------------------------------------------------------------

/// Converts IEEE binary16 bits to f32, exactly (every f16 is an f32): zeros and signs, subnormals,
/// infinities, and NaNs with their payload moved to the top of the f32 mantissa.
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let exp = u32::from((bits >> 10) & 0x1f);
    let mant = u32::from(bits & 0x03ff);
    match (exp, mant) {
        (0, 0) => f32::from_bits(sign),
        (0, _) => {
            // Subnormal: mant * 2^-24, exact in f32 (a normal f32 there).
            let magnitude = f32::from(bits & 0x03ff) * (1.0 / 16_777_216.0);
            if sign != 0 { -magnitude } else { magnitude }
        }
        (0x1f, _) => f32::from_bits(sign | 0x7f80_0000 | (mant << 13)),
        _ => f32::from_bits(sign | ((exp + (127 - 15)) << 23) | (mant << 13)),
    }
}

/// Converts f32 to IEEE binary16 bits, rounding to nearest with ties to even (as ggml's
/// `GGML_FP32_TO_FP16`, F16C's `vcvtps2ph` and numpy do). Values beyond the f16 range become
/// infinities; NaNs stay NaN (quiet, with the top payload bits kept).
pub fn f32_to_f16(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let mant = x & 0x007f_ffff;
    if exp == 0xff {
        return if mant == 0 {
            sign | 0x7c00
        } else {
            sign | 0x7e00 | (mant >> 13) as u16
        };
    }
    // The f16 biased exponent this value would have.
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal f16 (or zero): the result counts units of 2^-24.
        if e < -10 {
            return sign; // below half the smallest subnormal, or f32 subnormal: rounds to 0
        }
        let m = mant | 0x0080_0000; // 24-bit significand; e = 0 keeps 10 bits after >> 14
        let shift = (14 - e) as u32; // 14..=24
        let q = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        let q = if rem > half || (rem == half && q & 1 == 1) {
            q + 1
        } else {
            q
        };
        // q <= 0x400: a carry into the exponent gives the smallest normal, as it should.
        return sign | q as u16;
    }
    let q = ((e as u32) << 10) | (mant >> 13);
    let rem = mant & 0x1fff;
    // A carry out of the mantissa bumps the exponent; out of exponent 30 it gives infinity.
    let q = if rem > 0x1000 || (rem == 0x1000 && q & 1 == 1) {
        q + 1
    } else {
        q
    };
    sign | q as u16
}

/// Reads a little-endian f16 as f32.
fn f16_le(lo: u8, hi: u8) -> f32 {
    f16_to_f32(u16::from_le_bytes([lo, hi]))
}

/// Encodes `v` as f16 bits, or `Err(v)` if a finite `v` overflows to infinity.
fn f16_checked(v: f32) -> Result<u16, f32> {
    let h = f32_to_f16(v);
    if h & 0x7fff == 0x7c00 && v.is_finite() {
        Err(v)
    } else {
        Ok(h)
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

/// Decodes `out.len()` values of type `ty` from `bytes` into `out`.
///
/// `bytes.len()` must equal `ty.row_bytes(out.len())`. The arithmetic is ggml's reference
/// arithmetic, so the output is bit-identical to ggml's scalar `dequantize_row_*`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let n_elems = out.len() as u64;
    let expected = ty.row_bytes(n_elems)?;
    let actual = bytes.len() as u64;
    if expected != actual {
        return Err(QuantError::ByteLength {
            ty,
            n_elems,
            expected,
            actual,
        });
    }
    match ty {
        GgmlType::F32 => each_block(bytes, out, dequantize_f32),
        GgmlType::F16 => each_block(bytes, out, dequantize_f16),
        GgmlType::Q4_0 => each_block(bytes, out, dequantize_q4_0),
        GgmlType::Q4_1 => each_block(bytes, out, dequantize_q4_1),
        GgmlType::Q8_0 => each_block(bytes, out, dequantize_q8_0),
        GgmlType::Q4_K => each_block(bytes, out, dequantize_q4_k),
        GgmlType::Q6_K => each_block(bytes, out, dequantize_q6_k),
    }
    Ok(())
}

/// Applies `f` to each `B`-byte block and its `E` output values (lengths already checked).
fn each_block<const B: usize, const E: usize>(
    bytes: &[u8],
    out: &mut [f32],
    f: fn(&[u8; B], &mut [f32; E]),
) {
    let (blocks, _) = bytes.as_chunks::<B>();
    let (outs, _) = out.as_chunks_mut::<E>();
    for (block, y) in blocks.iter().zip(outs.iter_mut()) {
        f(block, y);
    }
}

/// F32: one little-endian IEEE binary32 per element.
fn dequantize_f32(b: &[u8; F32_BYTES], y: &mut [f32; 1]) {
    let [y] = y;
    *y = f32::from_le_bytes(*b);
}

/// F16: one little-endian IEEE binary16 per element.
fn dequantize_f16(b: &[u8; F16_BYTES], y: &mut [f32; 1]) {
    let [y] = y;
    *y = f16_le(b[0], b[1]);
}

/// The 4-bit quant of element `e` (0..32) in a Q4_0/Q4_1 `qs`: element `j` in 0..16 is the low
/// nibble of `qs[j]`, element `j + 16` the high nibble of `qs[j]`.
fn nibble_q4(qs: &[u8; QK / 2], e: usize) -> u8 {
    let byte = qs[e % (QK / 2)];
    if e < QK / 2 { byte & 0x0f } else { byte >> 4 }
}

/// `block_q4_0`, 18 bytes, 32 elements:
///
/// | bytes | field | meaning |
/// |-------|-------|---------|
/// | 0..2  | `d: f16` | scale |
/// | 2..18 | `qs: [u8; 16]` | element `j` (0..16) = low nibble of `qs[j]`, element `j+16` = high nibble |
///
/// `value = (q - 8) * d`.
fn dequantize_q4_0(b: &[u8; Q4_0_BYTES], y: &mut [f32; QK]) {
    let [d0, d1, qs @ ..] = b;
    let d = f16_le(*d0, *d1);
    for (e, y) in y.iter_mut().enumerate() {
        *y = f32::from(i16::from(nibble_q4(qs, e)) - 8) * d;
    }
}

/// `block_q4_1`, 20 bytes, 32 elements:
///
/// | bytes | field | meaning |
/// |-------|-------|---------|
/// | 0..2  | `d: f16` | scale |
/// | 2..4  | `m: f16` | minimum (offset) |
/// | 4..20 | `qs: [u8; 16]` | element `j` (0..16) = low nibble of `qs[j]`, element `j+16` = high nibble |
///
/// `value = q * d + m`.
fn dequantize_q4_1(b: &[u8; Q4_1_BYTES], y: &mut [f32; QK]) {
    let [d0, d1, m0, m1, qs @ ..] = b;
    let d = f16_le(*d0, *d1);
    let m = f16_le(*m0, *m1);
    for (e, y) in y.iter_mut().enumerate() {
        *y = f32::from(nibble_q4(qs, e)) * d + m;
    }
}

/// `block_q8_0`, 34 bytes, 32 elements:
///
/// | bytes | field | meaning |
/// |-------|-------|---------|
/// | 0..2  | `d: f16` | scale |
/// | 2..34 | `qs: [i8; 32]` | element `j` = `qs[j]` |
///
/// `value = q * d`.
fn dequantize_q8_0(b: &[u8; Q8_0_BYTES], y: &mut [f32; QK]) {
    let [d0, d1, qs @ ..] = b;
    let d = f16_le(*d0, *d1);
    for (y, q) in y.iter_mut().zip(qs) {
        *y = f32::from(q.cast_signed()) * d;
    }
}

/// Unpacks the 6-bit scale and min of sub-block `j` (0..8) from a Q4_K `scales[12]`
/// (ggml's `get_scale_min_k4`):
///
/// ```text
/// byte  0..4 : sc[j]   in bits 0..6 (j < 4);  bits 6..8 = sc[j+4] >> 4
/// byte  4..8 : m[j-4]  in bits 0..6 (j < 4);  bits 6..8 = m[j+4]  >> 4   (byte 4+j holds m[j])
/// byte 8..12 : sc[j+4] & 0xF in bits 0..4,    m[j+4] & 0xF in bits 4..8  (byte 8+j, j < 4)
/// ```
///
/// that is, for `j < 4`: `sc = s[j] & 63`, `m = s[j+4] & 63`; for `j >= 4`:
/// `sc = (s[j+4] & 0xF) | ((s[j-4] >> 6) << 4)`, `m = (s[j+4] >> 4) | ((s[j] >> 6) << 4)`.
fn scale_min_k4(s: &[u8; 12], j: usize) -> (u8, u8) {
    let j = j % 8; // indices below stay within 0..12
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Packs the 6-bit `sc` and `m` (both < 64) of sub-block `j` into a Q4_K `scales[12]`, the inverse
/// of [`scale_min_k4`] (as ggml's `quantize_row_q4_K_ref` packs them). `s` must start zeroed.
fn pack_scale_min_k4(s: &mut [u8; 12], j: usize, sc: u8, m: u8) {
    let j = j % 8;
    let (sc, m) = (sc & 63, m & 63);
    if j < 4 {
        s[j] |= sc;
        s[j + 4] |= m;
    } else {
        s[j + 4] = (sc & 0x0f) | ((m & 0x0f) << 4);
        s[j - 4] |= (sc >> 4) << 6;
        s[j] |= (m >> 4) << 6;
    }
}

/// Byte offset of the packed scales in a `block_q4_K`.
const Q4_K_SCALES: usize = 4;
/// Byte offset of the quants in a `block_q4_K`.
const Q4_K_QS: usize = 16;

/// Index into a `block_q4_K` of the byte holding element `e`'s quant, and whether it is the high
/// nibble: `qs[32*(e/64) + e%32]`, low nibble when `(e/32)` is even.
fn q4_k_quant_pos(e: usize) -> (usize, bool) {
    let e = e % QK_K; // keeps the index below Q4_K_BYTES
    (Q4_K_QS + 32 * (e / 64) + e % 32, (e / 32) % 2 == 1)
}

/// `block_q4_K`, 144 bytes, 256 elements in 8 sub-blocks of 32:
///
/// | bytes   | field | meaning |
/// |---------|-------|---------|
/// | 0..2    | `d: f16`    | super-block scale of the sub-block scales |
/// | 2..4    | `dmin: f16` | super-block scale of the sub-block mins |
/// | 4..16   | `scales: [u8; 12]` | 8 scales `sc[j]` and 8 mins `m[j]`, 6 bits each ([`scale_min_k4`]) |
/// | 16..144 | `qs: [u8; 128]` | element `e` = nibble of `qs[32*(e/64) + e%32]`: low if `e/32` is even, else high |
///
/// `value(e) = (d * sc[j]) * q - dmin * m[j]` with `j = e / 32`.
fn dequantize_q4_k(b: &[u8; Q4_K_BYTES], y: &mut [f32; QK_K]) {
    let d = f16_le(b[0], b[1]);
    let dmin = f16_le(b[2], b[3]);
    let scales: [u8; 12] = std::array::from_fn(|k| b[Q4_K_SCALES + k]);
    let sub: [(f32, f32); 8] = std::array::from_fn(|j| {
        let (sc, m) = scale_min_k4(&scales, j);
        (d * f32::from(sc), dmin * f32::from(m))
    });
    for (e, y) in y.iter_mut().enumerate() {
        let (d1, m1) = sub[(e / 32) % 8];
        let (pos, high) = q4_k_quant_pos(e);
        let q = if high { b[pos] >> 4 } else { b[pos] & 0x0f };
        *y = d1 * f32::from(q) - m1;
    }
}

/// Byte offset of `qh` in a `block_q6_K`.
const Q6_K_QH: usize = QK_K / 2;
/// Byte offset of `scales` in a `block_q6_K`.
const Q6_K_SCALES: usize = Q6_K_QH + QK_K / 4;
/// Byte offset of `d` in a `block_q6_K`.
const Q6_K_D: usize = Q6_K_SCALES + QK_K / 16;

/// Where element `e`'s bits live in a `block_q6_K`: `(ql index, ql shift, qh index, qh shift)`.
///
/// With `h = e/128`, `g = (e%128)/32`, `l = e%32`: the low 4 bits are
/// `(ql[64*h + 32*(g%2) + l] >> 4*(g/2)) & 0xF` and the high 2 bits are
/// `(qh[32*h + l] >> 2*g) & 3`.
fn q6_k_quant_pos(e: usize) -> (usize, u32, usize, u32) {
    let e = e % QK_K; // keeps every index below Q6_K_BYTES
    let (h, g, l) = (e / 128, (e % 128) / 32, e % 32);
    (
        64 * h + 32 * (g % 2) + l,
        4 * (g / 2) as u32,
        Q6_K_QH + 32 * h + l,
        2 * g as u32,
    )
}

/// `block_q6_K`, 210 bytes, 256 elements in 16 sub-blocks of 16:
///
/// | bytes    | field | meaning |
/// |----------|-------|---------|
/// | 0..128   | `ql: [u8; 128]` | low 4 bits of each quant ([`q6_k_quant_pos`]) |
/// | 128..192 | `qh: [u8; 64]`  | high 2 bits of each quant |
/// | 192..208 | `scales: [i8; 16]` | signed scale of sub-block `e/16` |
/// | 208..210 | `d: f16` | super-block scale |
///
/// Within each half of 128 elements, `ql[l]` holds elements `l` (low nibble) and `l+64` (high),
/// `ql[l+32]` holds `l+32` and `l+96`, and `qh[l]` holds the high bits of `l`, `l+32`, `l+64`,
/// `l+96` in bit pairs 0-1, 2-3, 4-5, 6-7. `q = (low | high << 4) - 32` in -32..32 and
/// `value(e) = (d * scales[e/16]) * q`.
fn dequantize_q6_k(b: &[u8; Q6_K_BYTES], y: &mut [f32; QK_K]) {
    let d = f16_le(b[Q6_K_D], b[Q6_K_D + 1]);
    for (e, y) in y.iter_mut().enumerate() {
        let (ql, ql_shift, qh, qh_shift) = q6_k_quant_pos(e);
        let q = ((b[ql] >> ql_shift) & 0x0f) | (((b[qh] >> qh_shift) & 3) << 4);
        let q = i16::from(q) - 32;
        let sc = b[Q6_K_SCALES + (e / 16) % 16].cast_signed();
        *y = d * f32::from(sc) * f32::from(q);
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------

/// Encodes `values` as type `ty`; `values.len()` must be a whole number of blocks and every value
/// finite.
///
/// Q4_0, Q4_1, Q8_0 and F16 produce exactly ggml's `quantize_row_*_ref` bytes (F16 rounds to
/// nearest even). Q4_K and Q6_K use a simple, non-iterative scheme in ggml's exact layout:
///
/// - Q4_K, per sub-block of 32: offset `mn = min(0, min(x))`; the 6-bit mins share
///   `dmin = max(-mn) / 63` and are rounded *up*, then the scales `(max(x) + dmin*m) / 15` share
///   `d = max(scale) / 63` and are rounded up too, so the 16 levels always cover the sub-block.
/// - Q6_K, per sub-block of 16: scale `max|x| / 31`; the 8-bit scales share
///   `d = max(scale) / 127`, rounded up, and `q = round(x / (d*scale))` in -31..=31.
///
/// Either way each value decodes within half a quantization step (`d*sc/2`) of the input. Errors
/// if a value is NaN or infinite, or a scale overflows f16.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, QuantError> {
    let n_elems = values.len() as u64;
    let n_bytes = ty.row_bytes(n_elems)?;
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(QuantError::NonFinite { ty, index, value });
    }
    let capacity =
        usize::try_from(n_bytes).map_err(|_| QuantError::SizeOverflow { ty, n_elems })?;
    let mut out = Vec::with_capacity(capacity);
    match ty {
        GgmlType::F32 => {
            quantize_blocks(ty, values, &mut out, |[v]: &[f32; 1]| Ok(v.to_le_bytes()))
        }
        GgmlType::F16 => quantize_blocks(ty, values, &mut out, |[v]: &[f32; 1]| {
            f16_checked(*v).map(u16::to_le_bytes)
        }),
        GgmlType::Q4_0 => quantize_blocks(ty, values, &mut out, quantize_q4_0_block),
        GgmlType::Q4_1 => quantize_blocks(ty, values, &mut out, quantize_q4_1_block),
        GgmlType::Q8_0 => quantize_blocks(ty, values, &mut out, quantize_q8_0_block),
        GgmlType::Q4_K => quantize_blocks(ty, values, &mut out, quantize_q4_k_block),
        GgmlType::Q6_K => quantize_blocks(ty, values, &mut out, quantize_q6_k_block),
    }?;
    Ok(out)
}

/// Encodes each `E`-value block with `f` and appends its bytes; `f` returns `Err(v)` when an f16
/// field would overflow with value `v`.
fn quantize_blocks<const B: usize, const E: usize>(
    ty: GgmlType,
    values: &[f32],
    out: &mut Vec<u8>,
    f: impl Fn(&[f32; E]) -> Result<[u8; B], f32>,
) -> Result<(), QuantError> {
    let (blocks, _) = values.as_chunks::<E>();
    for (i, block) in blocks.iter().enumerate() {
        let bytes = f(block).map_err(|value| QuantError::OutOfRange {
            ty,
            index: i.saturating_mul(E),
            value,
        })?;
        out.extend_from_slice(&bytes);
    }
    Ok(())
}

/// ggml's `quantize_row_q4_0_ref` for one block: `d = max / -8` where `max` is the value of
/// largest magnitude (the first such), `q = min(15, trunc(x / d + 8.5))`.
fn quantize_q4_0_block(x: &[f32; QK]) -> Result<[u8; Q4_0_BYTES], f32> {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = [0u8; Q4_0_BYTES];
    let [d0, d1, qs @ ..] = &mut out;
    [*d0, *d1] = f16_checked(d)?.to_le_bytes();
    for (j, q) in qs.iter_mut().enumerate() {
        let lo = ((x[j] * id + 8.5) as i8).clamp(0, 15).cast_unsigned();
        let hi = ((x[j + QK / 2] * id + 8.5) as i8)
            .clamp(0, 15)
            .cast_unsigned();
        *q = lo | (hi << 4);
    }
    Ok(out)
}

/// ggml's `quantize_row_q4_1_ref` for one block: `d = (max - min) / 15`, `m = min`,
/// `q = min(15, trunc((x - min) / d + 0.5))`.
fn quantize_q4_1_block(x: &[f32; QK]) -> Result<[u8; Q4_1_BYTES], f32> {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = [0u8; Q4_1_BYTES];
    let [d0, d1, m0, m1, qs @ ..] = &mut out;
    [*d0, *d1] = f16_checked(d)?.to_le_bytes();
    [*m0, *m1] = f16_checked(min)?.to_le_bytes();
    for (j, q) in qs.iter_mut().enumerate() {
        let lo = (((x[j] - min) * id + 0.5) as i8)
            .clamp(0, 15)
            .cast_unsigned();
        let hi = (((x[j + QK / 2] - min) * id + 0.5) as i8)
            .clamp(0, 15)
            .cast_unsigned();
        *q = lo | (hi << 4);
    }
    Ok(out)
}

/// ggml's `quantize_row_q8_0_ref` for one block: `d = amax / 127`, `q = round(x / d)` (half away
/// from zero, as C's `roundf`).
fn quantize_q8_0_block(x: &[f32; QK]) -> Result<[u8; Q8_0_BYTES], f32> {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = [0u8; Q8_0_BYTES];
    let [d0, d1, qs @ ..] = &mut out;
    [*d0, *d1] = f16_checked(d)?.to_le_bytes();
    for (q, v) in qs.iter_mut().zip(x) {
        *q = ((v * id).round() as i8).cast_unsigned();
    }
    Ok(out)
}

/// Smallest `n` in `0..=max` with `n * unit >= v` (for `v >= 0`), or 0 when `unit` is 0.
fn ceil_steps(v: f32, unit: f32, max: u8) -> u8 {
    if unit > 0.0 {
        (v / unit).ceil().clamp(0.0, f32::from(max)) as u8
    } else {
        0
    }
}

/// Q4_K encoder (not ggml's iterative search, same layout). Per sub-block `j` of 32 values:
/// its offset is `mn = min(0, min(x))`; the mins `-mn` share `dmin = max(-mn) / 63` and get
/// `m[j] = ceil(-mn / dmin)`, so `dmin * m[j] >= -mn`; the scales `s = (max(x) + dmin*m[j]) / 15`
/// share `d = max(s) / 63` and get `sc[j] = ceil(s / d)`, so the 16 levels cover the sub-block;
/// then `q = round((x + dmin*m[j]) / (d*sc[j]))` in 0..16. The error is at most half a step,
/// `(d*sc[j]) / 2`.
fn quantize_q4_k_block(x: &[f32; QK_K]) -> Result<[u8; Q4_K_BYTES], f32> {
    let (subs, _) = x.as_chunks::<32>();
    let ranges: [(f32, f32); 8] = std::array::from_fn(|j| {
        subs.get(j).map_or((0.0, 0.0), |s| {
            let mn = s.iter().fold(0.0f32, |a, &v| a.min(v));
            let mx = s.iter().fold(f32::MIN, |a, &v| a.max(v));
            (-mn, mx)
        })
    });
    let max_min = ranges.iter().fold(0.0f32, |a, r| a.max(r.0));
    let dmin_h = f16_checked(max_min / 63.0)?;
    let dmin = f16_to_f32(dmin_h);
    let m: [u8; 8] = std::array::from_fn(|j| ceil_steps(ranges[j].0, dmin, 63));
    let s: [f32; 8] = std::array::from_fn(|j| (ranges[j].1 + dmin * f32::from(m[j])) / 15.0);
    let max_scale = s.iter().fold(0.0f32, |a, &v| a.max(v));
    let d_h = f16_checked(max_scale / 63.0)?;
    let d = f16_to_f32(d_h);
    let sc: [u8; 8] = std::array::from_fn(|j| ceil_steps(s[j], d, 63));

    let mut out = [0u8; Q4_K_BYTES];
    [out[0], out[1]] = d_h.to_le_bytes();
    [out[2], out[3]] = dmin_h.to_le_bytes();
    let mut scales = [0u8; 12];
    for j in 0..8 {
        pack_scale_min_k4(&mut scales, j, sc[j], m[j]);
    }
    out[Q4_K_SCALES..Q4_K_QS].copy_from_slice(&scales);
    for (e, &v) in x.iter().enumerate() {
        let j = (e / 32) % 8;
        // The dequantizer's own products, so the rounding sees exactly what it will decode.
        let d1 = d * f32::from(sc[j]);
        let m1 = dmin * f32::from(m[j]);
        let q = if d1 != 0.0 {
            ((v + m1) / d1).round_ties_even().clamp(0.0, 15.0) as u8
        } else {
            0
        };
        let (pos, high) = q4_k_quant_pos(e);
        out[pos] |= if high { q << 4 } else { q };
    }
    Ok(out)
}

/// Q6_K encoder (not ggml's iterative search, same layout). Per sub-block `j` of 16 values:
/// `s = max|x| / 31`; the scales share `d = max(s) / 127` and get `scales[j] = ceil(s / d)`
/// (positive, at most 127); then `q = round(x / (d*scales[j]))` in -31..=31, stored as `q + 32`.
/// The error is at most half a step, `(d*scales[j]) / 2`.
fn quantize_q6_k_block(x: &[f32; QK_K]) -> Result<[u8; Q6_K_BYTES], f32> {
    let (subs, _) = x.as_chunks::<16>();
    let s: [f32; 16] = std::array::from_fn(|j| {
        subs.get(j)
            .map_or(0.0, |s| s.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 31.0)
    });
    let max_scale = s.iter().fold(0.0f32, |a, &v| a.max(v));
    let d_h = f16_checked(max_scale / 127.0)?;
    let d = f16_to_f32(d_h);
    let sc: [u8; 16] = std::array::from_fn(|j| ceil_steps(s[j], d, 127));

    let mut out = [0u8; Q6_K_BYTES];
    out[Q6_K_SCALES..Q6_K_D].copy_from_slice(&sc);
    [out[Q6_K_D], out[Q6_K_D + 1]] = d_h.to_le_bytes();
    for (e, &v) in x.iter().enumerate() {
        let d1 = d * f32::from(sc[(e / 16) % 16]);
        let q = if d1 != 0.0 {
            (v / d1).round_ties_even().clamp(-32.0, 31.0) as i8
        } else {
            0
        };
        let stored = (q + 32).cast_unsigned(); // 0..64
        let (ql, ql_shift, qh, qh_shift) = q6_k_quant_pos(e);
        out[ql] |= (stored & 0x0f) << ql_shift;
        out[qh] |= (stored >> 4) << qh_shift;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
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
        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn deq(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n];
        dequantize(ty, bytes, &mut out).expect("dequantize");
        out
    }

    #[test]
    fn type_table() {
        let expect = [
            (GgmlType::F32, 0, "F32", 1, 4),
            (GgmlType::F16, 1, "F16", 1, 2),
            (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
            (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
            (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
            (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
            (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
        ];
        for (ty, id, name, elems, bytes) in expect {
            assert_eq!(ty.id(), id);
            assert_eq!(GgmlType::from_u32(id), Some(ty));
            assert_eq!(ty.name(), name);
            assert_eq!(ty.to_string(), name);
            assert_eq!(type_name_of_id(id), name);
            assert_eq!(ty.block_elems(), elems);
            assert_eq!(ty.block_bytes(), bytes);
        }
        for id in [4, 5, 6, 7, 9, 10, 11, 13, 15, 16, 30, 99, u32::MAX] {
            assert_eq!(GgmlType::from_u32(id), None, "id {id}");
        }
        assert_eq!(type_name_of_id(13), "Q5_K");
        assert_eq!(type_name_of_id(30), "BF16");
        assert_eq!(type_name_of_id(6), "Q5_0");
        assert_eq!(type_name_of_id(16), "IQ2_XXS");
        assert_eq!(type_name_of_id(99), "unknown type id 99");
        assert_eq!(
            SUPPORTED_TYPE_NAMES.split(", ").count(),
            GgmlType::ALL.len()
        );
    }

    #[test]
    fn row_bytes() {
        assert_eq!(GgmlType::Q4_K.row_bytes(512), Ok(288));
        assert_eq!(GgmlType::Q8_0.row_bytes(576), Ok(18 * 34));
        assert_eq!(GgmlType::F32.row_bytes(3), Ok(12));
        assert_eq!(GgmlType::Q4_0.row_bytes(0), Ok(0));
        assert_eq!(
            GgmlType::Q4_0.row_bytes(33),
            Err(QuantError::NotBlockMultiple {
                ty: GgmlType::Q4_0,
                n_elems: 33
            })
        );
        assert!(matches!(
            GgmlType::F32.row_bytes(u64::MAX),
            Err(QuantError::SizeOverflow { .. })
        ));
        let msg = GgmlType::Q6_K
            .row_bytes(100)
            .expect_err("partial block")
            .to_string();
        assert!(msg.contains("Q6_K stores 256 values per block"), "{msg}");
    }

    #[test]
    fn f16_known_values() {
        let cases: [(u16, f32); 12] = [
            (0x0000, 0.0),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x7bff, 65504.0),
            (0x0400, 6.103_515_6e-5), // smallest normal 2^-14
            (0x0001, 5.960_464_5e-8), // smallest subnormal 2^-24
            (0x03ff, 6.097_555e-5),   // largest subnormal 1023 * 2^-24
            (0x8001, -5.960_464_5e-8),
            (0x7c00, f32::INFINITY),
            (0xfc00, f32::NEG_INFINITY),
            (0x3800, 0.5),
        ];
        for (bits, v) in cases {
            assert_eq!(f16_to_f32(bits), v, "{bits:#06x}");
            assert_eq!(f32_to_f16(v), bits, "{v}");
        }
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000); // -0.0 keeps its sign
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert!(f16_to_f32(0xfc01).is_nan());
        assert_eq!(f16_to_f32(0x7e01).to_bits(), 0x7fc0_2000); // payload moves up
        assert_eq!(f32_to_f16(f32::NAN) & 0x7e00, 0x7e00);
    }

    #[test]
    fn f16_round_trips_every_value() {
        for bits in 0..=u16::MAX {
            let v = f16_to_f32(bits);
            if v.is_nan() {
                assert!(f16_to_f32(f32_to_f16(v)).is_nan());
            } else {
                assert_eq!(f32_to_f16(v), bits, "{bits:#06x} -> {v}");
            }
        }
    }

    #[test]
    fn f32_to_f16_rounds_to_nearest_even() {
        let p = |e: i32| 2f32.powi(e);
        // Ties between 1.0 (even) and 1.0 + 2^-10 go to 1.0; between odd and even go to even.
        assert_eq!(f32_to_f16(1.0 + p(-11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * p(-11)), 0x3c02);
        assert_eq!(f32_to_f16(1.0 + p(-11) + p(-20)), 0x3c01);
        // Overflow: 65504 + half a step (65520) rounds to infinity, just below stays finite.
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(-1e10), 0xfc00);
        // Subnormals and underflow.
        assert_eq!(f32_to_f16(p(-25)), 0x0000); // tie to even zero
        assert_eq!(f32_to_f16(p(-25) * 1.0001), 0x0001);
        assert_eq!(f32_to_f16(3.0 * p(-25)), 0x0002); // tie between 1 and 2 -> 2
        assert_eq!(f32_to_f16(p(-14) - p(-25)), 0x0400); // tie 0x3ff/0x400 -> even 0x400
        assert_eq!(f32_to_f16(1e-30), 0x0000);
        assert_eq!(f32_to_f16(-1e-30), 0x8000);
        assert_eq!(f32_to_f16(f32::from_bits(1)), 0x0000);
    }

    #[test]
    fn f32_and_f16_blocks() {
        let mut b = Vec::new();
        for v in [1.5f32, -2.25, f32::INFINITY] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(deq(GgmlType::F32, &b, 3), [1.5, -2.25, f32::INFINITY]);
        let out = deq(GgmlType::F16, &[0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00], 3);
        assert_eq!(out, [1.0, -2.0, 5.960_464_5e-8]);
    }

    #[test]
    fn q4_0_known_block() {
        // d = 0.5; qs[j] = j | (15 - j) << 4: element j = (j - 8) * 0.5, element j + 16 =
        // (15 - j - 8) * 0.5.
        let mut b = vec![0x00, 0x38];
        b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let out = deq(GgmlType::Q4_0, &b, 32);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[8], 0.0);
        assert_eq!(out[15], 3.5);
        assert_eq!(out[16], 3.5);
        assert_eq!(out[31], -4.0);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(out[j + 16], (7.0 - j as f32) * 0.5);
        }
    }

    #[test]
    fn q4_1_known_block() {
        // d = 0.5, m = -1: element j = q * 0.5 - 1.
        let mut b = vec![0x00, 0x38, 0x00, 0xbc];
        b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let out = deq(GgmlType::Q4_1, &b, 32);
        assert_eq!(out[0], -1.0);
        assert_eq!(out[3], 0.5);
        assert_eq!(out[15], 6.5);
        assert_eq!(out[16], 6.5);
        assert_eq!(out[20], 4.5); // q = 15 - 4 = 11
        assert_eq!(out[31], -1.0);
    }

    #[test]
    fn q8_0_known_block() {
        // d = 0.25; qs[k] = k * 8 - 128 as i8.
        let mut b = vec![0x00, 0x34];
        b.extend((0..32).map(|k: i32| ((k * 8 - 128) as i8).cast_unsigned()));
        let out = deq(GgmlType::Q8_0, &b, 32);
        assert_eq!(out[0], -32.0);
        assert_eq!(out[16], 0.0);
        assert_eq!(out[17], 2.0);
        assert_eq!(out[31], 30.0);
    }

    /// sc = [1, 2, 3, 63, 17, 33, 48, 63], m = [0, 1, 2, 3, 20, 40, 5, 63], packed by hand.
    const K4_SCALES: [u8; 12] = [
        0x41, 0x82, 0xc3, 0xff, // sc[0..4] | (sc[4..8] >> 4) << 6
        0x40, 0x81, 0x02, 0xc3, // m[0..4]  | (m[4..8]  >> 4) << 6
        0x41, 0x81, 0x50, 0xff, // (sc[j] & 15) | (m[j] & 15) << 4, j = 4..8
    ];
    const K4_SC: [u8; 8] = [1, 2, 3, 63, 17, 33, 48, 63];
    const K4_M: [u8; 8] = [0, 1, 2, 3, 20, 40, 5, 63];

    #[test]
    fn q4_k_scale_packing() {
        for j in 0..8 {
            assert_eq!(scale_min_k4(&K4_SCALES, j), (K4_SC[j], K4_M[j]), "j = {j}");
        }
        let mut packed = [0u8; 12];
        for j in 0..8 {
            pack_scale_min_k4(&mut packed, j, K4_SC[j], K4_M[j]);
        }
        assert_eq!(packed, K4_SCALES);
        // Every 6-bit pair survives packing in every slot.
        for j in 0..8 {
            for sc in 0..64 {
                for m in (0..64).step_by(7) {
                    let mut s = [0u8; 12];
                    pack_scale_min_k4(&mut s, j, sc, m);
                    assert_eq!(scale_min_k4(&s, j), (sc, m));
                }
            }
        }
    }

    #[test]
    fn q4_k_known_block() {
        // d = 1, dmin = 0.5, scales above, qs[k] = (k % 16) | (15 - k % 16) << 4.
        let mut b = vec![0x00, 0x3c, 0x00, 0x38];
        b.extend_from_slice(&K4_SCALES);
        b.extend((0u8..128).map(|k| (k % 16) | ((15 - k % 16) << 4)));
        let out = deq(GgmlType::Q4_K, &b, 256);
        // e = 0: sub 0, qs[0] low = 0 -> 1*0 - 0.5*0.
        assert_eq!(out[0], 0.0);
        // e = 33: sub 1, qs[1] high = 14 -> 2*14 - 0.5*1.
        assert_eq!(out[33], 27.5);
        // e = 100: sub 3, qs[36] high = 15 - 4 = 11 -> 63*11 - 0.5*3.
        assert_eq!(out[100], 691.5);
        // e = 130: sub 4 (sc, m from the j >= 4 packing), qs[66] low = 2 -> 17*2 - 0.5*20.
        assert_eq!(out[130], 24.0);
        // e = 200: sub 6, qs[104] low = 8 -> 48*8 - 0.5*5.
        assert_eq!(out[200], 381.5);
        // e = 255: sub 7, qs[127] high = 0 -> 0 - 0.5*63.
        assert_eq!(out[255], -31.5);
        // e = 191: sub 5, qs[95] high = 15 - 15 = 0 -> -0.5*40.
        assert_eq!(out[191], -20.0);
    }

    #[test]
    fn q6_k_known_block() {
        // ql[k] = k, qh[k] = k * 37 mod 256, scales[s] = s - 8, d = 0.5.
        let mut b: Vec<u8> = (0u8..128).collect();
        b.extend((0u32..64).map(|k| (k * 37 % 256) as u8));
        b.extend((0i8..16).map(|s| (s - 8).cast_unsigned()));
        b.extend_from_slice(&[0x00, 0x38]);
        assert_eq!(b.len(), 210);
        let out = deq(GgmlType::Q6_K, &b, 256);
        // e = 0: ql[0] low 0, qh[0] bits 0-1 = 0 -> q = -32, scale -8: 0.5*-8*-32.
        assert_eq!(out[0], 128.0);
        // e = 1: ql[1] low 1, qh[1] = 37 bits 0-1 = 1 -> q = 17 - 32 = -15: 0.5*-8*-15.
        assert_eq!(out[1], 60.0);
        // e = 2: qh[2] = 74 bits 0-1 = 2 -> q = 2 + 32 - 32 = 2.
        assert_eq!(out[2], -8.0);
        // e = 3: qh[3] = 111 bits 0-1 = 3 -> q = 3 + 48 - 32 = 19.
        assert_eq!(out[3], -76.0);
        // e = 45: ql[45] = 0x2d low 13, qh[13] = 225 bits 2-3 = 0 -> q = -19, scale[2] = -6.
        assert_eq!(out[45], 57.0);
        // e = 70: ql[6] high 0, qh[6] = 222 bits 4-5 = 1 -> q = -16, scale[4] = -4.
        assert_eq!(out[70], 32.0);
        // e = 127: ql[63] = 0x3f high 3, qh[31] = 123 bits 6-7 = 1 -> q = -13, scale[7] = -1.
        assert_eq!(out[127], 6.5);
        // e = 160: second half, ql[96] low 0, qh[32] = 160 bits 2-3 = 0 -> -32, scale[10] = 2.
        assert_eq!(out[160], -32.0);
        // e = 200: ql[72] = 0x48 high 4, qh[40] = 200 bits 4-5 = 0 -> -28, scale[12] = 4.
        assert_eq!(out[200], -56.0);
        // e = 255: ql[127] high 7, qh[63] = 27 bits 6-7 = 0 -> -25, scale[15] = 7.
        assert_eq!(out[255], -87.5);
    }

    #[test]
    fn dequantize_rejects_bad_lengths() {
        let mut out = vec![0.0; 32];
        let err = dequantize(GgmlType::Q4_0, &[0; 17], &mut out).expect_err("short");
        assert_eq!(
            err,
            QuantError::ByteLength {
                ty: GgmlType::Q4_0,
                n_elems: 32,
                expected: 18,
                actual: 17
            }
        );
        assert!(
            err.to_string()
                .contains("32 values take 18 bytes, but 17 bytes")
        );
        assert!(dequantize(GgmlType::Q4_0, &[0; 19], &mut out).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0; 36], &mut out).is_err());
        let mut out = vec![0.0; 33];
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0; 34], &mut out),
            Err(QuantError::NotBlockMultiple { .. })
        ));
        let mut out = vec![0.0; 100];
        assert!(dequantize(GgmlType::Q6_K, &[0; 210], &mut out).is_err());
        let mut empty: [f32; 0] = [];
        assert!(dequantize(GgmlType::Q4_K, &[], &mut empty).is_ok());
    }

    #[test]
    fn quantize_rejects_bad_input() {
        assert!(matches!(
            quantize(GgmlType::Q4_K, &[0.0; 255]),
            Err(QuantError::NotBlockMultiple { .. })
        ));
        let mut v = vec![0.5f32; 64];
        v[40] = f32::NAN;
        assert!(matches!(
            quantize(GgmlType::Q8_0, &v),
            Err(QuantError::NonFinite { index: 40, .. })
        ));
        v[40] = f32::NEG_INFINITY;
        assert!(quantize(GgmlType::F32, &v).is_err());
        v[40] = 1e10; // scale 1e10 / 127 overflows f16
        let err = quantize(GgmlType::Q8_0, &v).expect_err("overflow");
        assert!(
            matches!(err, QuantError::OutOfRange { index: 32, .. }),
            "{err}"
        );
        assert!(matches!(
            quantize(GgmlType::F16, &[1.0, 70000.0]),
            Err(QuantError::OutOfRange { index: 1, .. })
        ));
        assert_eq!(quantize(GgmlType::Q6_K, &[]), Ok(vec![]));
    }

    /// Quantizes random data of several magnitudes and checks every value decodes within `tol`
    /// times the largest magnitude of its block.
    fn round_trip(ty: GgmlType, tol: f32) {
        let mut rng = Rng::new(0x5eed ^ u64::from(ty.id()));
        // 0.01 keeps the scales of random blocks normal f16; the constant block below goes
        // subnormal, which the absolute slack allows for.
        for scale in [1.0f32, 1000.0, 0.01] {
            let n = 4 * 256;
            let mut values: Vec<f32> = (0..n).map(|_| rng.unit() * scale).collect();
            // Edge blocks: all zero, all equal and positive, all negative, one spike.
            values[..256].fill(0.0);
            values[256..512].fill(0.3 * scale);
            for v in &mut values[512..768] {
                *v = -v.abs() - 0.1 * scale;
            }
            values[800] = 4.0 * scale;
            let bytes = quantize(ty, &values).expect("quantize");
            assert_eq!(
                bytes.len() as u64,
                ty.row_bytes(n as u64).expect("row bytes")
            );
            let out = deq(ty, &bytes, n);
            let block = ty.block_elems().max(32);
            for (b, (xs, ys)) in values.chunks(block).zip(out.chunks(block)).enumerate() {
                let amax = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                for (i, (x, y)) in xs.iter().zip(ys).enumerate() {
                    assert!(
                        (x - y).abs() <= tol * amax + 4e-6,
                        "{ty} scale {scale} block {b} value {i}: {x} -> {y} (amax {amax})"
                    );
                }
            }
        }
    }

    #[test]
    fn round_trip_all_types() {
        round_trip(GgmlType::F32, 0.0);
        round_trip(GgmlType::F16, 1.0 / 2048.0);
        round_trip(GgmlType::Q8_0, 0.5 / 127.0 + 0.001);
        // Q4_0 maps the largest magnitude to -8 and clamps +8 to 7: a full step, 1/8.
        round_trip(GgmlType::Q4_0, 0.126);
        // Q4_1: half of (max - min) / 15 <= 2 * amax / 30.
        round_trip(GgmlType::Q4_1, 0.07);
        // Q4_K: half of (d * sc) ~ (range / 15) / 2 plus a 6-bit scale step.
        round_trip(GgmlType::Q4_K, 0.075);
        // Q6_K: half of (amax / 31) plus a 7-bit scale step.
        round_trip(GgmlType::Q6_K, 0.5 / 31.0 + 0.002);
    }

    #[test]
    fn q4_k_and_q6_k_with_unequal_sub_blocks() {
        // Sub-block e/32 spans [-3k, 3k] with k = 1 + e/32, so the 6-bit scales range from small
        // to 63 and use their packed top bits.
        let values: Vec<f32> = (0..256)
            .map(|e| ((e % 7) as f32 - 3.0) * (1 + e / 32) as f32)
            .collect();
        let q = quantize(GgmlType::Q4_K, &values).expect("quantize");
        let scales: [u8; 12] = std::array::from_fn(|k| q[Q4_K_SCALES + k]);
        let sc: Vec<u8> = (0..8).map(|j| scale_min_k4(&scales, j).0).collect();
        assert!(
            sc.iter().any(|&s| s < 16) && sc.iter().any(|&s| s >= 32),
            "{sc:?}"
        );
        for (ty, tol) in [
            (GgmlType::Q4_K, 0.075),
            (GgmlType::Q6_K, 0.5 / 31.0 + 0.002),
        ] {
            let out = deq(ty, &quantize(ty, &values).expect("quantize"), 256);
            for (e, (x, y)) in values.iter().zip(&out).enumerate() {
                let amax = 3.0 * (1 + e / 32) as f32;
                assert!((x - y).abs() <= tol * amax, "{ty} value {e}: {x} -> {y}");
            }
        }
    }

    /// Parses a hex string into bytes.
    fn unhex(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2), "odd hex length");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Parses concatenated 8-digit hex f32 bit patterns.
    fn unhex_f32(s: &str) -> Vec<f32> {
        assert!(s.len().is_multiple_of(8), "bad f32 hex length");
        (0..s.len())
            .step_by(8)
            .map(|i| f32::from_bits(u32::from_str_radix(&s[i..i + 8], 16).expect("hex")))
            .collect()
    }

    fn type_named(name: &str) -> GgmlType {
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .expect("fixture type")
    }

    /// Cross-check against the `gguf` Python package (see `tests/fixtures/make_quant_blocks.py`):
    /// `deq` lines must decode bit-identically (NaN matching NaN), `q` lines must encode to the
    /// same bytes.
    #[test]
    fn python_gguf_fixture() {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/quant_blocks.txt"
        ));
        let (mut n_deq, mut n_q) = (0, 0);
        let mut seen = std::collections::BTreeSet::new();
        for (lineno, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split(' ').collect();
            let [kind, ty, n, a, b] = f[..] else {
                panic!("line {}: expected 5 fields", lineno + 1);
            };
            let ty = type_named(ty);
            let n: usize = n.parse().expect("count");
            match kind {
                "deq" => {
                    let bytes = unhex(a);
                    let want = unhex_f32(b);
                    assert_eq!(want.len(), n);
                    let got = deq(ty, &bytes, n);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                            "line {}: {ty} value {i}: got {g} ({:#010x}), python {w} ({:#010x})",
                            lineno + 1,
                            g.to_bits(),
                            w.to_bits()
                        );
                    }
                    seen.insert(ty);
                    n_deq += 1;
                }
                "q" => {
                    let values = unhex_f32(a);
                    assert_eq!(values.len(), n);
                    let got = quantize(ty, &values).expect("quantize");
                    assert_eq!(got, unhex(b), "line {}: {ty} quantize differs", lineno + 1);
                    n_q += 1;
                }
                other => panic!("line {}: unknown kind {other}", lineno + 1),
            }
        }
        assert_eq!(seen.len(), GgmlType::ALL.len(), "every type is covered");
        assert!(
            n_deq >= 7 && n_q >= 4,
            "fixture too small: {n_deq} deq, {n_q} q"
        );
    }
}
