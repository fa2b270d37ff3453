//! WGSL for reading quantised weight blocks, one snippet per [`GgmlType`].
//!
//! Weights stay in the GGUF file's own block layout (the blob is the tensor's exact bytes), bound
//! as `array<u32>` named `w`. Blocks whose size is not a multiple of four bytes (Q8_0: 34, Q4_0:
//! 18, Q6_K: 210) start at odd half-words, so every read goes through `ld`, an unaligned 32-bit
//! load. Each snippet defines:
//! - `BE` (elements per block as the kernels see it) and `BB` (bytes per block);
//! - `blk_dot(bo, xo) -> f32`: the dot product of the block at byte offset `bo` with the
//!   activations `xv` (an `array<vec4<f32>>`) starting at element `xo` (a multiple of 4);
//! - `blk_deq(bo, oo)`: writes the block's values to `out[oo..oo + BE]`.
//!
//! F32 and F16 rows are read as blocks of four. Dequantisation happens in registers and
//! products accumulate in f32; weights are never expanded in memory.

use crate::quant::GgmlType;

/// The unaligned loads over `w: array<u32>` that the file-layout kernels need (with [`HELPERS`]).
pub const LOADS: &str = r#"
// The u32 at byte offset `o` of `w`, wherever it starts.
fn ld(o: u32) -> u32 {
    let i = o >> 2u;
    let s = (o & 3u) * 8u;
    if (s == 0u) {
        return w[i];
    }
    return (w[i] >> s) | (w[i + 1u] << (32u - s));
}
// The f16 at byte offset `o` (2-aligned).
fn f16_at(o: u32) -> f32 {
    return f16(ld(o) & 0xFFFFu);
}
// The signed byte at byte offset `o`.
fn i8_at(o: u32) -> f32 {
    return f32(bitcast<i32>(ld(o) << 24u) >> 24u);
}
// The byte at byte offset `o`.
fn u8_at(o: u32) -> u32 {
    return ld(o) & 255u;
}
// Four unsigned bytes.
fn u8x4(q: u32) -> vec4<f32> {
    return vec4<f32>(f32(q & 255u), f32((q >> 8u) & 255u), f32((q >> 16u) & 255u), f32(q >> 24u));
}
"#;

/// Helpers every weight-reading kernel needs: f16 decoding and nibble/byte unpacking. They do
/// not read `w`, so kernels over packed weights (`w: array<vec4<u32>>`) use them too.
pub const HELPERS: &str = r#"
// IEEE half → f32 in integer arithmetic (WGSL's unpack2x16float needs a capability that not
// every adapter has). Subnormals are exact; inf/NaN (never in weights) read as 65536.
fn f16(h: u32) -> f32 {
    let a = h & 0x7FFFu;
    let normal = bitcast<f32>((a << 13u) + 0x38000000u);
    let v = select(normal, f32(a) * 5.9604644775390625e-8, a < 0x400u);
    return select(v, -v, (h & 0x8000u) != 0u);
}
fn f16x2(q: u32) -> vec2<f32> {
    return vec2<f32>(f16(q & 0xFFFFu), f16(q >> 16u));
}
fn nib_lo(q: u32) -> vec4<f32> {
    return vec4<f32>(f32(q & 15u), f32((q >> 8u) & 15u), f32((q >> 16u) & 15u), f32((q >> 24u) & 15u));
}
fn nib_hi(q: u32) -> vec4<f32> {
    return vec4<f32>(f32((q >> 4u) & 15u), f32((q >> 12u) & 15u), f32((q >> 20u) & 15u), f32(q >> 28u));
}
fn i8x4(q: u32) -> vec4<f32> {
    let v = vec4<i32>(bitcast<i32>(q << 24u), bitcast<i32>(q << 16u), bitcast<i32>(q << 8u), bitcast<i32>(q));
    return vec4<f32>(v >> vec4<u32>(24u));
}
// acc + a·b in fused multiply-adds: llvmpipe keeps a multiply and an add apart (two
// instructions where one does).
fn fdot(a: vec4<f32>, b: vec4<f32>, acc: f32) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))));
}
fn hsum(v: vec4<f32>) -> f32 {
    return v.x + v.y + v.z + v.w;
}
"#;

/// The Q4_K block header: 6-bit scales and mins packed in 12 bytes (shared by dot and deq).
macro_rules! q4k_scales {
    () => {
        r#"
const BE: u32 = 256u;
const BB: u32 = 144u;
fn scale_min_k4(bo: u32, j: u32) -> vec2<f32> {
    let s = bo + 4u;
    if (j < 4u) {
        return vec2<f32>(f32(u8_at(s + j) & 63u), f32(u8_at(s + j + 4u) & 63u));
    }
    let sc = (u8_at(s + j + 4u) & 15u) | ((u8_at(s + j - 4u) >> 6u) << 4u);
    let mn = (u8_at(s + j + 4u) >> 4u) | ((u8_at(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}
"#
    };
}

/// Block dot product for `ty` (needs `xv`).
pub fn dot(ty: GgmlType) -> &'static str {
    match ty {
        // 4 × f32 = 16 bytes.
        GgmlType::F32 => {
            r#"
const BE: u32 = 4u;
const BB: u32 = 16u;
fn blk_dot(bo: u32, xo: u32) -> f32 {
    let i = bo >> 2u;
    let wv = bitcast<vec4<f32>>(vec4<u32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]));
    return dot(wv, xv[xo >> 2u]);
}
"#
        }
        // 4 × f16 = 8 bytes.
        GgmlType::F16 => {
            r#"
const BE: u32 = 4u;
const BB: u32 = 8u;
fn blk_dot(bo: u32, xo: u32) -> f32 {
    let i = bo >> 2u;
    let wv = vec4<f32>(f16x2(w[i]), f16x2(w[i + 1u]));
    return dot(wv, xv[xo >> 2u]);
}
"#
        }
        // block_q4_0 (18 bytes): d: f16, qs: [u8; 16]. Element j < 16 is the low nibble of
        // qs[j], element j + 16 its high nibble; value = d · (nibble − 8).
        GgmlType::Q4_0 => {
            r#"
const BE: u32 = 32u;
const BB: u32 = 18u;
fn blk_dot(bo: u32, xo: u32) -> f32 {
    let d = f16_at(bo);
    let x4 = xo >> 2u;
    var acc = 0.0;
    var sx = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        let q = ld(bo + 2u + 4u * i);
        let x0 = xv[x4 + i];
        let x1 = xv[x4 + 4u + i];
        acc += dot(nib_lo(q), x0) + dot(nib_hi(q), x1);
        sx += x0 + x1;
    }
    return d * (acc - 8.0 * hsum(sx));
}
"#
        }
        // block_q4_1 (20 bytes): d: f16, m: f16, qs: [u8; 16]; nibbles as in Q4_0;
        // value = d · nibble + m.
        GgmlType::Q4_1 => {
            r#"
const BE: u32 = 32u;
const BB: u32 = 20u;
fn blk_dot(bo: u32, xo: u32) -> f32 {
    let b = bo >> 2u;
    let dm = f16x2(w[b]);
    let x4 = xo >> 2u;
    var acc = 0.0;
    var sx = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        let q = w[b + 1u + i];
        let x0 = xv[x4 + i];
        let x1 = xv[x4 + 4u + i];
        acc += dot(nib_lo(q), x0) + dot(nib_hi(q), x1);
        sx += x0 + x1;
    }
    return dm.x * acc + dm.y * hsum(sx);
}
"#
        }
        // block_q8_0 (34 bytes): d: f16, qs: [i8; 32]; value = d · q.
        GgmlType::Q8_0 => {
            r#"
const BE: u32 = 32u;
const BB: u32 = 34u;
fn blk_dot(bo: u32, xo: u32) -> f32 {
    let d = f16_at(bo);
    let x4 = xo >> 2u;
    var acc = 0.0;
    for (var i = 0u; i < 8u; i++) {
        acc += dot(i8x4(ld(bo + 2u + 4u * i)), xv[x4 + i]);
    }
    return d * acc;
}
"#
        }
        // block_q4_K (144 bytes, 256 elements): d: f16, dmin: f16, scales: [u8; 12] (eight
        // 6-bit scales and eight 6-bit mins, packed: for sub-block j < 4, scale = s[j] & 63,
        // min = s[j + 4] & 63; for j ≥ 4, scale = (s[j + 4] & 15) | (s[j − 4] >> 6) << 4, min =
        // (s[j + 4] >> 4) | (s[j] >> 6) << 4), qs: [u8; 128]. Chunk c < 4 of 64 elements reads
        // qs[32c..32c + 32]: element 64c + l is the low nibble of byte l (sub-block 2c),
        // element 64c + 32 + l its high nibble (sub-block 2c + 1); value = d · scale · nibble −
        // dmin · min.
        GgmlType::Q4_K => {
            concat!(
                q4k_scales!(),
                r#"
fn blk_dot(bo: u32, xo: u32) -> f32 {
    let b = bo >> 2u;
    let dm = f16x2(w[b]);
    let x4 = xo >> 2u;
    var total = 0.0;
    for (var c = 0u; c < 4u; c++) {
        let s0 = scale_min_k4(bo, 2u * c);
        let s1 = scale_min_k4(bo, 2u * c + 1u);
        var a0 = 0.0;
        var a1 = 0.0;
        var sx0 = vec4<f32>(0.0);
        var sx1 = vec4<f32>(0.0);
        for (var l = 0u; l < 8u; l++) {
            let q = w[b + 4u + 8u * c + l];
            let x0 = xv[x4 + 16u * c + l];
            let x1 = xv[x4 + 16u * c + 8u + l];
            a0 += dot(nib_lo(q), x0);
            a1 += dot(nib_hi(q), x1);
            sx0 += x0;
            sx1 += x1;
        }
        total += dm.x * (s0.x * a0 + s1.x * a1) - dm.y * (s0.y * hsum(sx0) + s1.y * hsum(sx1));
    }
    return total;
}
"#
            )
        }
        // block_q6_K (210 bytes, 256 elements): ql: [u8; 128] (low 4 bits), qh: [u8; 64]
        // (high 2 bits), scales: [i8; 16], d: f16. Half h < 2 of 128 elements uses ql[64h..],
        // qh[32h..], scales[8h..]; for l < 32 (sub-scale is = l / 16):
        //   e[128h + l]      = (ql[l] & 15)      | ((qh[l] >> 0) & 3) << 4, scale is + 0
        //   e[128h + l + 32] = (ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4, scale is + 2
        //   e[128h + l + 64] = (ql[l] >> 4)      | ((qh[l] >> 4) & 3) << 4, scale is + 4
        //   e[128h + l + 96] = (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4, scale is + 6
        // value = d · scale · (e − 32).
        GgmlType::Q6_K => {
            r#"
const BE: u32 = 256u;
const BB: u32 = 210u;
fn blk_dot(bo: u32, xo: u32) -> f32 {
    let d = f16_at(bo + 208u);
    let x4 = xo >> 2u;
    var acc = 0.0;
    for (var h = 0u; h < 2u; h++) {
        let ql = bo + 64u * h;
        let qh = bo + 128u + 32u * h;
        let sc = bo + 192u + 8u * h;
        for (var l4 = 0u; l4 < 8u; l4++) {
            let is = l4 / 4u;
            let a = ld(ql + 4u * l4);
            let b = ld(ql + 32u + 4u * l4);
            let hb = ld(qh + 4u * l4);
            let q1 = u8x4((a & 0x0F0F0F0Fu) | ((hb & 0x03030303u) << 4u)) - 32.0;
            let q2 = u8x4((b & 0x0F0F0F0Fu) | (((hb >> 2u) & 0x03030303u) << 4u)) - 32.0;
            let q3 = u8x4(((a >> 4u) & 0x0F0F0F0Fu) | (((hb >> 4u) & 0x03030303u) << 4u)) - 32.0;
            let q4 = u8x4(((b >> 4u) & 0x0F0F0F0Fu) | (((hb >> 6u) & 0x03030303u) << 4u)) - 32.0;
            let xb = x4 + 32u * h + l4;
            acc += i8_at(sc + is) * dot(q1, xv[xb])
                + i8_at(sc + is + 2u) * dot(q2, xv[xb + 8u])
                + i8_at(sc + is + 4u) * dot(q3, xv[xb + 16u])
                + i8_at(sc + is + 6u) * dot(q4, xv[xb + 24u]);
        }
    }
    return d * acc;
}
"#
        }
    }
}

/// Block dequantisation for `ty` (needs `out`), used for embedding rows.
pub fn deq(ty: GgmlType) -> &'static str {
    match ty {
        GgmlType::F32 => {
            r#"
const BE: u32 = 4u;
const BB: u32 = 16u;
fn blk_deq(bo: u32, oo: u32) {
    let i = bo >> 2u;
    for (var k = 0u; k < 4u; k++) {
        out[oo + k] = bitcast<f32>(w[i + k]);
    }
}
"#
        }
        GgmlType::F16 => {
            r#"
const BE: u32 = 4u;
const BB: u32 = 8u;
fn blk_deq(bo: u32, oo: u32) {
    let i = bo >> 2u;
    let a = f16x2(w[i]);
    let b = f16x2(w[i + 1u]);
    out[oo] = a.x;
    out[oo + 1u] = a.y;
    out[oo + 2u] = b.x;
    out[oo + 3u] = b.y;
}
"#
        }
        GgmlType::Q4_0 => {
            r#"
const BE: u32 = 32u;
const BB: u32 = 18u;
fn blk_deq(bo: u32, oo: u32) {
    let d = f16_at(bo);
    for (var j = 0u; j < 16u; j++) {
        let q = u8_at(bo + 2u + j);
        out[oo + j] = d * (f32(q & 15u) - 8.0);
        out[oo + j + 16u] = d * (f32(q >> 4u) - 8.0);
    }
}
"#
        }
        GgmlType::Q4_1 => {
            r#"
const BE: u32 = 32u;
const BB: u32 = 20u;
fn blk_deq(bo: u32, oo: u32) {
    let dm = f16x2(ld(bo));
    for (var j = 0u; j < 16u; j++) {
        let q = u8_at(bo + 4u + j);
        out[oo + j] = dm.x * f32(q & 15u) + dm.y;
        out[oo + j + 16u] = dm.x * f32(q >> 4u) + dm.y;
    }
}
"#
        }
        GgmlType::Q8_0 => {
            r#"
const BE: u32 = 32u;
const BB: u32 = 34u;
fn blk_deq(bo: u32, oo: u32) {
    let d = f16_at(bo);
    for (var j = 0u; j < 32u; j++) {
        out[oo + j] = d * i8_at(bo + 2u + j);
    }
}
"#
        }
        GgmlType::Q4_K => {
            concat!(
                q4k_scales!(),
                r#"
fn blk_deq(bo: u32, oo: u32) {
    let dm = f16x2(ld(bo));
    for (var c = 0u; c < 4u; c++) {
        let s0 = scale_min_k4(bo, 2u * c);
        let s1 = scale_min_k4(bo, 2u * c + 1u);
        for (var l = 0u; l < 32u; l++) {
            let q = u8_at(bo + 16u + 32u * c + l);
            out[oo + 64u * c + l] = dm.x * s0.x * f32(q & 15u) - dm.y * s0.y;
            out[oo + 64u * c + 32u + l] = dm.x * s1.x * f32(q >> 4u) - dm.y * s1.y;
        }
    }
}
"#
            )
        }
        GgmlType::Q6_K => {
            r#"
const BE: u32 = 256u;
const BB: u32 = 210u;
fn blk_deq(bo: u32, oo: u32) {
    let d = f16_at(bo + 208u);
    for (var h = 0u; h < 2u; h++) {
        let ql = bo + 64u * h;
        let qh = bo + 128u + 32u * h;
        let sc = bo + 192u + 8u * h;
        let o = oo + 128u * h;
        for (var l = 0u; l < 32u; l++) {
            let is = l / 16u;
            let a = u8_at(ql + l);
            let b = u8_at(ql + l + 32u);
            let hb = u8_at(qh + l);
            out[o + l] = d * i8_at(sc + is) * (f32((a & 15u) | ((hb & 3u) << 4u)) - 32.0);
            out[o + l + 32u] = d * i8_at(sc + is + 2u) * (f32((b & 15u) | (((hb >> 2u) & 3u) << 4u)) - 32.0);
            out[o + l + 64u] = d * i8_at(sc + is + 4u) * (f32((a >> 4u) | (((hb >> 4u) & 3u) << 4u)) - 32.0);
            out[o + l + 96u] = d * i8_at(sc + is + 6u) * (f32((b >> 4u) | (((hb >> 6u) & 3u) << 4u)) - 32.0);
        }
    }
}
"#
        }
    }
}

/// Elements per block as the kernels read them (F32 and F16 in fours).
pub fn kernel_block_elems(ty: GgmlType) -> u64 {
    match ty {
        GgmlType::F32 | GgmlType::F16 => 4,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
        GgmlType::Q4_K | GgmlType::Q6_K => 256,
    }
}

/// Whether hashgrid repacks `ty`'s matrices for the kernels (see [`pack`]).
pub fn is_packed(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_1)
}

/// Bytes of one row of `cols` weights as the kernels read it: packed for [`is_packed`] types,
/// else the file's own layout.
pub fn kernel_row_bytes(ty: GgmlType, cols: u64) -> u64 {
    let nb = cols / ty.block_elems() as u64;
    match ty {
        GgmlType::Q8_0 => nb * 32 + (nb * 2).next_multiple_of(16),
        GgmlType::Q4_1 => nb * 16 + (nb * 4).next_multiple_of(16),
        _ => nb * ty.block_bytes() as u64,
    }
}

/// Rows of a packed matrix whose texels lie interleaved ([`pack`]).
pub const TILE_ROWS: u64 = 8;
// `wrow` masks row indices with it.
const _: () = assert!(TILE_ROWS.is_power_of_two());

/// Bytes of a packed matrix of `rows` rows of `cols` weights ([`pack`]): whole tiles of
/// [`TILE_ROWS`] rows (the last one padded with zero rows). Other types: the file's bytes.
pub fn packed_bytes(ty: GgmlType, rows: u64, cols: u64) -> u64 {
    if is_packed(ty) {
        rows.next_multiple_of(TILE_ROWS) * kernel_row_bytes(ty, cols)
    } else {
        rows * kernel_row_bytes(ty, cols)
    }
}

/// A matrix of `cols`-wide rows in the layout the kernels read. Q8_0 and Q4_1 are repacked so
/// that every load is an aligned 16-byte texel (lavapipe charges per load, whatever its size,
/// and a 34-byte Q8_0 block straddles words), and so that the kernels read memory in order.
/// Each row is split into texels: its blocks' quants (Q8_0: two texels a block, Q4_1: one),
/// then its scales packed into whole texels (Q8_0: `d` as f16, 8 blocks a texel; Q4_1: `d, m`
/// as two f16, 4 blocks a texel). Rows are grouped in tiles of [`TILE_ROWS`], and a tile stores
/// its rows' texels interleaved: texel `j` of the tile's row `s` is at `j · TILE_ROWS + s`
/// from the tile's start. A matvec invocation that computes a tile's rows (or several whole
/// tiles), block after block, then reads one ascending run of memory per tile instead of one
/// per row: on lavapipe, where a workgroup's 128–256 rows were as many interleaved streams,
/// SmolLM2's decode went from ~25 to ~34 tokens/s (tiles of 64 rows measured the same as 8).
/// The last tile is padded with
/// zero rows ([`packed_bytes`]). The values are the file's, bit for bit: a deterministic
/// rearrangement that anyone can redo from the GGUF. Other types are returned as they are.
pub fn pack(ty: GgmlType, bytes: &[u8], cols: u64) -> Vec<u8> {
    let (q, sc) = match ty {
        GgmlType::Q8_0 => (32usize, 2usize),
        GgmlType::Q4_1 => (16, 4),
        _ => return bytes.to_vec(),
    };
    let bb = ty.block_bytes();
    let nb = (cols / ty.block_elems() as u64) as usize;
    let raw_row = nb * bb;
    let stride = kernel_row_bytes(ty, cols) as usize;
    let rows = bytes.len().checked_div(raw_row).unwrap_or(0);
    let tile = TILE_ROWS as usize;
    let mut out = vec![0u8; packed_bytes(ty, rows as u64, cols) as usize];
    let mut row = vec![0u8; stride];
    for (r, src) in bytes.chunks_exact(raw_row).enumerate() {
        // The row as one run of texels (`packed_addressing`): its blocks' quants, then their
        // scales.
        row.fill(0);
        for (b, blk) in src.chunks_exact(bb).enumerate() {
            // Q8_0: [d: f16][qs: 32]; Q4_1: [d: f16][m: f16][qs: 16].
            row[b * q..(b + 1) * q].copy_from_slice(&blk[sc..]);
            row[nb * q + b * sc..nb * q + (b + 1) * sc].copy_from_slice(&blk[..sc]);
        }
        // Its texels into the tile.
        let base = (r / tile) * tile * stride;
        for (j, texel) in row.chunks_exact(16).enumerate() {
            let at = base + (j * tile + r % tile) * 16;
            out[at..at + 16].copy_from_slice(texel);
        }
    }
    out
}

/// The WGSL that finds texels in a packed matrix of `ty` (the layout [`pack`] writes, in one
/// place for every kernel):
/// - `TR` ([`TILE_ROWS`]) and `wrow(o, r, rt) -> u32`: the handle of row `r` of the packed
///   matrix that starts at byte `o` (a multiple of `16 · TILE_ROWS`) with `rt` texels a row:
///   its first texel, texel `j` of the row being at handle `+ j · TR`;
/// - for packed types, given a row's handle `ro` and its `nb` blocks: `wqt(ro, b, nb)`, the
///   texel of block `b`'s quants (Q8_0: the first of two, the second at `+ TR`), and
///   `wst(ro, b, nb)`, the texel of its scales (Q4_1: `d, m` as two f16 in component `b % 4`;
///   Q8_0: `d` as f16 in half `b % 2` of component `(b / 2) % 4`).
pub fn packed_addressing(ty: GgmlType) -> String {
    let blocks = match ty {
        GgmlType::Q8_0 => Q8_0_TEXELS,
        GgmlType::Q4_1 => Q4_1_TEXELS,
        _ => "",
    };
    format!(
        "const TR: u32 = {t}u;\nfn wrow(o: u32, r: u32, rt: u32) -> u32 {{\n    return (o >> 4u) + (r & ~{m}u) * rt + (r & {m}u);\n}}\n{blocks}",
        t = TILE_ROWS,
        m = TILE_ROWS - 1
    )
}

/// How a kernel reads the packed weights' texels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightRead {
    /// `texture_2d<u32>`: a sampled texture's texel fetch (the GPU-shaped kernels).
    Sampled,
    /// `texture_storage_2d<rgba32uint, read>`: the same texels as a read-only storage
    /// texture. lavapipe compiles a sampled fetch into a call of ~170 instructions that
    /// handles mip levels per lane, a storage-texture load into ~50 inline: the prefill ran
    /// ~20% faster (the CPU-shaped kernels).
    Storage,
}

impl WeightRead {
    /// The declaration of `w` at `@group(0) @binding(0)`.
    pub fn decl(self) -> &'static str {
        match self {
            WeightRead::Sampled => "@group(0) @binding(0) var w: texture_2d<u32>;",
            WeightRead::Storage => {
                "@group(0) @binding(0) var w: texture_storage_2d<rgba32uint, read>;"
            }
        }
    }
}

/// `wl(i)`: texel `i` of the packed weights bound as `w` (declared by [`WeightRead::decl`]),
/// laid out as the executor presents a buffer
/// ([`hashgrid_protocol::job::TEXTURE_ROW_TEXELS`] texels a row).
pub fn texture_loader(read: WeightRead) -> String {
    let w = hashgrid_protocol::job::TEXTURE_ROW_TEXELS;
    let level = match read {
        WeightRead::Sampled => ", 0",
        WeightRead::Storage => "",
    };
    format!(
        "fn wl(i: u32) -> vec4<u32> {{\n    return textureLoad(w, vec2<u32>(i & {}u, i >> {}u){level});\n}}\n",
        w - 1,
        w.trailing_zeros()
    )
}

/// Q8_0's `wqt`, `wst` ([`packed_addressing`]).
const Q8_0_TEXELS: &str = r#"fn wqt(ro: u32, b: u32, nb: u32) -> u32 {
    return ro + TR * 2u * b;
}
fn wst(ro: u32, b: u32, nb: u32) -> u32 {
    return ro + TR * (2u * nb + (b >> 3u));
}
"#;

/// Q4_1's `wqt`, `wst` ([`packed_addressing`]).
const Q4_1_TEXELS: &str = r#"fn wqt(ro: u32, b: u32, nb: u32) -> u32 {
    return ro + TR * b;
}
fn wst(ro: u32, b: u32, nb: u32) -> u32 {
    return ro + TR * (nb + (b >> 2u));
}
"#;

/// For packed types: `wrowp(ro, b, nb, x0..x7, sx)`, one row's dot product with block `b`'s
/// activations, `ro` being the row's handle ([`packed_addressing`]; its texel `j` is at
/// `ro + TR · j`), read with `wl` (see [`texture_loader`]).
pub fn packed_row_fn(ty: GgmlType) -> Option<&'static str> {
    match ty {
        GgmlType::Q8_0 => Some(
            r#"
fn wrowp(ro: u32, b: u32, nb: u32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>, x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>, sx: f32) -> f32 {
    let a = wl(wqt(ro, b, nb));
    let c = wl(wqt(ro, b, nb) + TR);
    let dw = wl(wst(ro, b, nb))[(b >> 1u) & 3u];
    let d = f16((dw >> ((b & 1u) * 16u)) & 0xFFFFu);
    var acc = fdot(i8x4(a.x), x0, 0.0);
    acc = fdot(i8x4(a.y), x1, acc);
    acc = fdot(i8x4(a.z), x2, acc);
    acc = fdot(i8x4(a.w), x3, acc);
    acc = fdot(i8x4(c.x), x4, acc);
    acc = fdot(i8x4(c.y), x5, acc);
    acc = fdot(i8x4(c.z), x6, acc);
    acc = fdot(i8x4(c.w), x7, acc);
    return d * acc;
}
"#,
        ),
        GgmlType::Q4_1 => Some(
            r#"
fn wrowp(ro: u32, b: u32, nb: u32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>, x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>, sx: f32) -> f32 {
    let q = wl(wqt(ro, b, nb));
    let dm = f16x2(wl(wst(ro, b, nb))[b & 3u]);
    var acc = fdot(nib_lo(q.x), x0, 0.0);
    acc = fdot(nib_lo(q.y), x1, acc);
    acc = fdot(nib_lo(q.z), x2, acc);
    acc = fdot(nib_lo(q.w), x3, acc);
    acc = fdot(nib_hi(q.x), x4, acc);
    acc = fdot(nib_hi(q.y), x5, acc);
    acc = fdot(nib_hi(q.z), x6, acc);
    acc = fdot(nib_hi(q.w), x7, acc);
    return fma(dm.x, acc, dm.y * sx);
}
"#,
        ),
        _ => None,
    }
}

/// For packed types: `wdeqp(ro, b, nb, oo)` writes block `b` of the row whose handle
/// ([`packed_addressing`]) is `ro`, read from `w: array<vec4<u32>>`, to `out[oo..oo + 32]`
/// (embedding lookups).
pub fn packed_deq_fn(ty: GgmlType) -> Option<&'static str> {
    match ty {
        GgmlType::Q8_0 => Some(
            r#"
fn wdeqp(ro: u32, b: u32, nb: u32, oo: u32) {
    let dw = w[wst(ro, b, nb)][(b >> 1u) & 3u];
    let d = f16((dw >> ((b & 1u) * 16u)) & 0xFFFFu);
    for (var h = 0u; h < 2u; h++) {
        let q = w[wqt(ro, b, nb) + TR * h];
        for (var k = 0u; k < 4u; k++) {
            let v = i8x4(q[k]) * d;
            let o = oo + 16u * h + 4u * k;
            out[o] = v.x;
            out[o + 1u] = v.y;
            out[o + 2u] = v.z;
            out[o + 3u] = v.w;
        }
    }
}
"#,
        ),
        GgmlType::Q4_1 => Some(
            r#"
fn wdeqp(ro: u32, b: u32, nb: u32, oo: u32) {
    let q = w[wqt(ro, b, nb)];
    let dm = f16x2(w[wst(ro, b, nb)][b & 3u]);
    for (var k = 0u; k < 4u; k++) {
        let lo = nib_lo(q[k]) * dm.x + dm.y;
        let hi = nib_hi(q[k]) * dm.x + dm.y;
        let o = oo + 4u * k;
        out[o] = lo.x;
        out[o + 1u] = lo.y;
        out[o + 2u] = lo.z;
        out[o + 3u] = lo.w;
        out[o + 16u] = hi.x;
        out[o + 17u] = hi.y;
        out[o + 18u] = hi.z;
        out[o + 19u] = hi.w;
    }
}
"#,
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads block `b` of row `r` back out of a packed matrix by the layout [`pack`] documents.
    fn block_at(ty: GgmlType, packed: &[u8], cols: u64, r: usize, b: usize) -> Vec<u8> {
        let nb = (cols / 32) as usize;
        let rt = (kernel_row_bytes(ty, cols) / 16) as usize;
        let tile = TILE_ROWS as usize;
        let texel = |j: usize| {
            let at = ((r / tile) * tile * rt + j * tile + r % tile) * 16;
            &packed[at..at + 16]
        };
        let (quants, scales) = match ty {
            // Two texels of quants a block, then every block's f16 `d`, 8 a texel.
            GgmlType::Q8_0 => {
                let d = &texel(2 * nb + b / 8)[2 * (b % 8)..2 * (b % 8) + 2];
                ([texel(2 * b), texel(2 * b + 1)].concat(), d.to_vec())
            }
            // A texel of quants a block, then every block's `d, m`, 4 a texel.
            _ => {
                let dm = &texel(nb + b / 4)[4 * (b % 4)..4 * (b % 4) + 4];
                (texel(b).to_vec(), dm.to_vec())
            }
        };
        [scales, quants].concat()
    }

    #[test]
    fn packed_rows_interleave_in_tiles_and_keep_every_byte() {
        let cols = 5 * 32;
        for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
            // One whole tile and one padded with 3 zero rows.
            let tile = TILE_ROWS as usize;
            let rows = 2 * tile - 3;
            let bb = ty.block_bytes();
            let file: Vec<u8> = (0..rows * 5 * bb).map(|i| (i * 7 + 3) as u8).collect();
            let packed = pack(ty, &file, cols);
            assert_eq!(packed.len() as u64, packed_bytes(ty, rows as u64, cols));
            assert_eq!(
                packed.len() as u64,
                2 * TILE_ROWS * kernel_row_bytes(ty, cols)
            );
            for r in 0..rows {
                for b in 0..5 {
                    let at = (r * 5 + b) * bb;
                    assert_eq!(
                        block_at(ty, &packed, cols, r, b),
                        &file[at..at + bb],
                        "{ty:?} row {r} block {b}"
                    );
                }
            }
            for r in rows..2 * tile {
                for b in 0..5 {
                    assert!(block_at(ty, &packed, cols, r, b).iter().all(|&v| v == 0));
                }
            }
        }
        // Other types keep the file's bytes.
        let f32s: Vec<u8> = (0..64u8).collect();
        assert_eq!(pack(GgmlType::F32, &f32s, 4), f32s);
    }
}
