//! hashgrid's own WGSL kernels for decoder models, one small kernel per operation (like ggml),
//! specialised per weight type by pasting in the block reader from [`quant`].
//!
//! Every kernel reads its shape from a `p: array<u32>` parameter slot and, where it depends on
//! the position, the loop counter `step` (a position is `step · stride + offset`, plus the
//! token's index when a dispatch covers several positions: its y dimension). Values that
//! steer a workgroup barrier go through `workgroupUniformLoad` so the kernels pass WGSL's
//! uniformity analysis.
//!
//! | kernel | what it computes |
//! |---|---|
//! | `embed` | `x[t] = dequant(embd[tokens[pos + t]])` |
//! | `rmsnorm` | `out = x / sqrt(mean(x²) + eps) · w` |
//! | `matvec` | `y[yoff + r] = W_seg(r) · x (+ bias)` over up to three weight segments (fused q, k, v) |
//! | `matvec_add` | `y[r] += W · x` (residual connections) |
//! | `matvec_gateup` | `y[r] = silu(G · x) · (U · x)` (SwiGLU) |
//! | `matvec_logits` | `matvec`, skipped during the prompt (no logits needed before its last token) |
//! | `silu_mul` | `y[i] = silu(a[i]) · a[n + i]` (SwiGLU when gate and up differ in type) |
//! | `rope_store` | RoPE on q and k at their positions, k and v written to the layer's KV cache |
//! | `attention` | one workgroup per head and token: scores, softmax, weighted sum of V (grouped-query, causal) |
//! | `sample` | greedy or seeded top-k / top-p / temperature sampling; appends the token, stops on end of generation |

pub mod bert;
pub mod quant;

use crate::quant::GgmlType;

/// Threads per workgroup of the row-parallel kernels.
pub const ROWS_PER_GROUP: u32 = 64;

/// Threads in the single workgroup of `rmsnorm` and `sample`.
pub const REDUCE_THREADS: u32 = 256;

/// Threads in the single workgroup of `rmsnorm_vec4` (fewer threads, fewer of lavapipe's
/// coroutine switches at each barrier).
pub const NORM_THREADS: u32 = 64;

/// Threads per attention workgroup (one workgroup per head) in the CPU shape: one SIMD vector
/// of lavapipe's. A workgroup runs on one core whatever its size, so more invocations only add
/// vectors to switch between at each of the softmax's barriers (lavapipe runs a workgroup's
/// vectors as coroutines). `--profile`, SmolLM2 at a ~100-token context: 54–66 µs a head
/// group's dispatch with 64 threads, 39 with 8; prompt 125 → 136 tokens/s (8 rounds; decode
/// the same within noise).
pub const ATTN_THREADS: u32 = 8;

/// Most end-of-generation token ids `sample` checks.
pub const MAX_EOG: usize = 8;

/// The matvec flavours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Matvec {
    /// `y[yoff + r] = W x`, up to three segments.
    Plain,
    /// `Plain` plus a bias vector.
    Bias,
    /// `y[r] += W x`.
    Add,
    /// `y[r] = silu(G x) · (U x)`.
    GateUp,
    /// `Plain`, skipped while `step + 1 < n_prompt`.
    Logits,
}

impl Matvec {
    /// The kernel's entry point name.
    pub fn entry(self) -> &'static str {
        match self {
            Matvec::Plain => "matvec",
            Matvec::Bias => "matvec_bias",
            Matvec::Add => "matvec_add",
            Matvec::GateUp => "matvec_gateup",
            Matvec::Logits => "matvec_logits",
        }
    }
}

/// Rows each matvec invocation computes (half gate, half up rows for `matvec_gateup`). On
/// lavapipe every storage load costs a few nanoseconds per lane whatever its address, and a
/// block's 32 activations are 8 vector loads against 2–9 loads of weights: an invocation reads
/// the activations once for all its rows. On GPUs these are independent dot products per
/// thread, far from the bottleneck at these sizes.
pub const ROWS_PER_LANE: u32 = 8;

/// Rows each `matvec_gateup` and `matvec_logits` invocation computes: their matrices are wide
/// (SmolLM2's gate-up 2 × 1,536 rows, its logits 49,152), so twice [`ROWS_PER_LANE`] still
/// leaves enough workgroups for a few cores, and each activation load serves twice the rows
/// (lavapipe, `--profile`: gate-up 316 → 261 µs, logits 10.3 → 8.7 ms a token). The narrow
/// ones keep 8: 576 rows in 3 workgroups would leave one of two cores idle a third of the time.
pub const WIDE_ROWS_PER_LANE: u32 = 16;

/// Rows per invocation of the [`matvec`] flavour `kind`.
pub fn rows_per_lane(kind: Matvec) -> u32 {
    match kind {
        Matvec::GateUp | Matvec::Logits => WIDE_ROWS_PER_LANE,
        _ => ROWS_PER_LANE,
    }
}

/// Invocations per matvec workgroup (16 × 8 rows = 128 rows per workgroup: a 576-row matrix
/// is 5 workgroups, enough to spread over a few cores).
pub const MATVEC_LANES: u32 = 16;

/// Output rows per matvec workgroup for `kind` (the dispatch size is rows / this, rounded up).
pub fn matvec_rows_per_group(kind: Matvec) -> u32 {
    match kind {
        Matvec::GateUp => MATVEC_LANES * rows_per_lane(kind) / 2,
        _ => MATVEC_LANES * rows_per_lane(kind),
    }
}

/// Parameter layout of the matvec kernels (u32 slots).
/// `[rows_total, cols, row_bytes, yoff, nseg, r0, o0, r1, o1, r2, o2, n_prompt, y_stride]`:
/// segment `i` has `r_i` rows whose weights start at byte `o_i` of the bound range. The
/// dispatch's y dimension is the token: token `t` reads `x[t · cols..]` and writes
/// `y[t · y_stride..]` (a batch of vectors through the same weights, as an encoder needs).
/// After these (and eps and RoPE's slots where fused) comes one slot that must hold 0
/// ([`matvec_zero_slot`]).
pub fn matvec(ty: GgmlType, kind: Matvec) -> String {
    matvec_x(ty, kind, None)
}

/// [`matvec`] with the activations read as `var<uniform> xv: array<vec4<f32>, n>` when
/// `uniform_x` is `Some(n)` (the bound x must then be exactly `16 · n` bytes, at most the
/// 64 KiB every adapter allows). On lavapipe a uniform load costs about a sixth of a storage
/// load, and the activations are a third of a matvec's loads. Packed weight types
/// ([`quant::is_packed`]) are always read as a `texture_2d<u32>` (the executor presents the
/// bound bytes as `rgba32uint` texels), whose fetches cost lavapipe far less than storage
/// loads; other types read `w: array<u32>`.
pub fn matvec_x(ty: GgmlType, kind: Matvec, uniform_x: Option<u32>) -> String {
    matvec_gen(ty, kind, uniform_x, false, false, false)
}

/// [`matvec_x`] with the RMS norm that precedes every decoder matvec fused in, for one token
/// of a packed type read as a uniform array of `n` vec4s (`cols = 4n`): each invocation
/// computes `scale = 1 / sqrt(mean(x²) + eps)` from the raw `x` (eps as f32 bits in `p[13]`),
/// summing the squares as its loop over blocks loads the activations, takes the dot products
/// with `x · g` (the norm weights, `@binding(5) var<uniform> gn: array<vec4<f32>, n>`) and
/// multiplies each row's sum by `scale` at the end: `W (x · scale · g)` as `scale · W (x · g)`,
/// the same up to rounding. One dispatch fewer per norm, and no pass of its own over the
/// activations.
pub fn matvec_norm(ty: GgmlType, kind: Matvec, n: u32) -> String {
    matvec_gen(ty, kind, Some(n), true, false, false)
}

/// [`matvec_norm`] for one token's q, k and v rows (`Plain` or `Bias`), with [`rope_store`]'s
/// work done as the rows are stored, for RoPE over adjacent pairs (not NeoX): an invocation's
/// 8 rows are 4 whole pairs of one head (q, k and v each a multiple of 8 rows), so it rotates
/// q and k in registers, writes q to `y` and k and v to the caches
/// (`@binding(6) kc`, `@binding(7) vc`, `array<f32>`) at the token's position, with the same
/// arithmetic as `rope_store`. `p` is [`matvec`]'s fourteen slots (eps in `p[13]`) then
/// `[q rows, kv rows, head_dim, rope_dim, base as f32 bits, offset, step_stride]`; the position
/// is `step · step_stride + offset` (`@binding(8) step`). One dispatch a layer fewer where a
/// dispatch costs most (lavapipe: ~60 µs, a sixth of a layer's).
pub fn matvec_norm_rope(ty: GgmlType, kind: Matvec, n: u32) -> String {
    matvec_gen(ty, kind, Some(n), true, true, false)
}

/// [`matvec_norm_rope`] with the K and V caches kept as textures ([`KV_TEXTURE`], `write`
/// access at bindings 6 and 7): an invocation's 8 rows are two whole texels of k or of v.
pub fn matvec_norm_rope_tex(ty: GgmlType, kind: Matvec, n: u32) -> String {
    matvec_gen(ty, kind, Some(n), true, true, true)
}

/// Index of the slot after a [`matvec`]'s parameters (thirteen, then eps and RoPE's seven
/// when fused), which must hold 0: the CPU-shaped kernels over packed weights first read one
/// word of every cache line of their rows (a prefetch: those loads are all in flight at once)
/// and add those words to a row's sum masked by this slot, so that the compiler keeps the
/// loads and the sum is unchanged.
pub fn matvec_zero_slot(norm: bool, rope: bool) -> u32 {
    13 + u32::from(norm) + 7 * u32::from(rope)
}

/// Invocations that read their row tiles together in [`tile_prefetch`]: lavapipe's SIMD
/// vector (a workgroup of [`MATVEC_LANES`] is two).
const PREFETCH_LANES: u32 = 8;

/// The start of a CPU-shaped matvec over packed weights: before its loop over blocks, each
/// group of [`PREFETCH_LANES`] consecutive invocations reads one word of every 64-byte line
/// of their rows (`per` rows each, whole tiles of `TR` rows, [`quant::packed_addressing`]: one
/// ascending run of texels from the group's first row), lane `k` taking lines `k`,
/// `k + PREFETCH_LANES`, …, into `tv`. Those loads depend on nothing, so a core keeps dozens
/// of cache misses in flight, where the dot products' loads come a few at a time between
/// hundreds of instructions of arithmetic and each waits for memory in turn; and the group's
/// lines are read in ascending order. In a decode step every matrix comes from memory (a
/// model is larger than the caches). lavapipe, SmolLM2 decode: ~36 → ~43 tokens/s with each
/// invocation reading its own tiles, +9% more read together in order (medians of 5 runs).
/// `gate_up`: two matrices (gate rows at `p[6]`, up rows at `p[8]`).
fn tile_prefetch(per: usize, gate_up: bool) -> String {
    let v = PREFETCH_LANES;
    let handles: &[&str] = if gate_up {
        &["wrow(p[6], vr, rt)", "wrow(p[8], vr, rt)"]
    } else {
        &["seg_row(vr)"]
    };
    let mut s = format!(
        "    var tv = 0u;\n    let rt = p[2] >> 4u;\n    let lane = gid.x % {v}u;\n    let vr = min(r0 - lane * {per}u, last);\n"
    );
    for h in handles {
        s.push_str(&format!(
            "    {{\n        let vo = {h};\n        for (var t = lane * 4u; t < {v}u * {per}u * rt; t += {}u) {{\n            tv ^= wl(vo + t).x;\n        }}\n    }}\n",
            4 * v
        ));
    }
    s
}

fn matvec_gen(
    ty: GgmlType,
    kind: Matvec,
    uniform_x: Option<u32>,
    norm: bool,
    rope: bool,
    tex_kv: bool,
) -> String {
    let norm = norm && uniform_x.is_some() && quant::is_packed(ty);
    let rope = rope && norm && matches!(kind, Matvec::Plain | Matvec::Bias);
    let tex_kv = tex_kv && rope;
    let extra = match kind {
        Matvec::Bias => "@group(0) @binding(4) var<storage, read> bias: array<f32>;\n",
        Matvec::Logits => "@group(0) @binding(4) var<storage, read> step: array<u32>;\n",
        _ => "",
    };
    let r = rows_per_lane(kind) as usize;
    let packed = quant::is_packed(ty);
    // Row offsets o0.. and accumulators a0...
    let mut setup = String::new();
    if kind == Matvec::GateUp {
        let h = r / 2;
        setup.push_str(&format!("let r0 = gid.x * {h}u;\n    if (r0 >= p[0]) {{\n        return;\n    }}\n    let last = p[0] - 1u;\n    let yb = gid.y * p[12];\n"));
        for k in 0..h {
            if packed {
                setup.push_str(&format!(
                    "    let o{k} = wrow(p[6], min(r0 + {k}u, last), p[2] >> 4u);\n    let o{} = wrow(p[8], min(r0 + {k}u, last), p[2] >> 4u);\n",
                    k + h
                ));
            } else {
                setup.push_str(&format!(
                    "    let o{k} = p[6] + min(r0 + {k}u, last) * p[2];\n    let o{} = p[8] + min(r0 + {k}u, last) * p[2];\n",
                    k + h
                ));
            }
        }
    } else {
        if kind == Matvec::Logits {
            setup.push_str("if (step[0] + 1u < p[11]) {\n        return;\n    }\n    ");
        }
        setup.push_str(&format!("let r0 = gid.x * {r}u;\n    if (r0 >= p[0]) {{\n        return;\n    }}\n    let last = p[0] - 1u;\n    let yb = p[3] + gid.y * p[12];\n"));
        let seg = if packed { "seg_row" } else { "seg_off" };
        for k in 0..r {
            setup.push_str(&format!("    let o{k} = {seg}(min(r0 + {k}u, last));\n"));
        }
    }
    if norm {
        // The sum of squares is taken in the loop over blocks from the activations it loads
        // anyway, and the rows' sums are scaled after it (the norm's scale is common to a
        // row's products). A loop of its own over the activations is a gather of every
        // vec4 on lavapipe (its index is a loop counter): for the logits' 384 SIMD vectors
        // of invocations, more than the dot products' own activation loads.
        setup.push_str("    var ss = 0.0;\n");
    }
    setup.push_str("    let xb = gid.y * p[1];\n");
    if packed {
        let gate_up = kind == Matvec::GateUp;
        setup.push_str(&tile_prefetch(if gate_up { r / 2 } else { r }, gate_up));
    }
    for k in 0..r {
        setup.push_str(&format!("    var a{k} = 0.0;\n"));
    }
    // The loop over blocks.
    let mut body = String::from(
        "    let nb = p[1] / BE;\n    for (var b = 0u; b < nb; b++) {\n        let bo = b * BB;\n        let xo = xb + b * BE;\n",
    );
    if packed {
        body.push_str("        let xi = xo >> 2u;\n");
        for k in 0..8 {
            if norm {
                body.push_str(&format!(
                    "        let v{k} = xv[xi + {k}u];\n        ss += dot(v{k}, v{k});\n        let x{k} = v{k} * gn[xi + {k}u];\n"
                ));
            } else {
                body.push_str(&format!("        let x{k} = xv[xi + {k}u];\n"));
            }
        }
        body.push_str("        let sx = hsum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7);\n");
        for k in 0..r {
            body.push_str(&format!(
                "        a{k} += wrowp(o{k}, b, nb, x0, x1, x2, x3, x4, x5, x6, x7, sx);\n"
            ));
        }
    } else {
        for k in 0..r {
            body.push_str(&format!("        a{k} += blk_dot(o{k} + bo, xo);\n"));
        }
    }
    body.push_str("    }\n");
    if norm {
        body.push_str("    let scale = 1.0 / sqrt(ss / f32(p[1]) + bitcast<f32>(p[13]));\n");
        for k in 0..r {
            body.push_str(&format!("    a{k} *= scale;\n"));
        }
    }
    if packed {
        // The prefetched words, times the zero slot: +0.0, and a0 is never -0.0 (a sum that
        // starts at +0.0), so this adds nothing; the compiler cannot know it and keeps the loads.
        body.push_str(&format!(
            "    a0 += bitcast<f32>(tv & p[{}u]);\n",
            matvec_zero_slot(norm, rope)
        ));
    }
    // Stores.
    let mut store = String::new();
    if rope {
        store.push_str(
            "    let pos = step[0] * p[20] + p[19];\n    let qd = p[14];\n    let kvd = p[15];\n    let rscale = pow(bitcast<f32>(p[18]), -2.0 / f32(p[17]));\n    // theta of pair ti, multiplied up from pair 0 as rope_store does (and carried from\n    // one pair to the next: the same products).\n    var theta = f32(pos);\n    var ti = 0u;\n",
        );
        if tex_kv {
            for k in 0..r {
                store.push_str(&format!("    var w{k} = 0.0;\n"));
            }
        }
        for k in (0..r).step_by(2) {
            let add = |j: usize| {
                if kind == Matvec::Bias {
                    format!("a{j} + bias[r0 + {j}u]")
                } else {
                    format!("a{j}")
                }
            };
            store.push_str(&format!(
                r#"    if (r0 + {k1}u <= last) {{
        let rk = r0 + {k}u;
        var v0 = {v0};
        var v1 = {v1};
        if (rk < qd + kvd) {{
            let i = (select(rk, rk - qd, rk >= qd) % p[16]) / 2u;
            if (i < p[17] / 2u) {{
                if (i < ti) {{
                    theta = f32(pos);
                    ti = 0u;
                }}
                for (; ti < i; ti++) {{
                    theta *= rscale;
                }}
                let c = cos(theta);
                let s = sin(theta);
                let y0 = v0 * c - v1 * s;
                let y1 = v0 * s + v1 * c;
                v0 = y0;
                v1 = y1;
            }}
        }}
{kv_store}    }}
"#,
                k1 = k + 1,
                v0 = add(k),
                v1 = add(k + 1),
                kv_store = if tex_kv {
                    format!(
                        "        if (rk < qd) {{\n            y[yb + rk] = v0;\n            y[yb + rk + 1u] = v1;\n        }}\n        w{k} = v0;\n        w{} = v1;\n",
                        k + 1
                    )
                } else {
                    "        if (rk < qd) {\n            y[yb + rk] = v0;\n            y[yb + rk + 1u] = v1;\n        } else if (rk < qd + kvd) {\n            let o = pos * kvd + rk - qd;\n            kc[o] = v0;\n            kc[o + 1u] = v1;\n        } else {\n            let o = pos * kvd + rk - qd - kvd;\n            vc[o] = v0;\n            vc[o + 1u] = v1;\n        }\n".to_string()
                },
            ));
        }
        if tex_kv {
            // The invocation's rows are all q, all k or all v (q and k, v are multiples of 8
            // rows): k and v go out as two whole texels.
            store.push_str(&format!(
                "    if (r0 >= qd && r0 + {r}u <= last + 1u) {{\n        let kv = r0 >= qd + kvd;\n        let t = (pos * kvd + r0 - qd - select(0u, kvd, kv)) / 4u;\n"
            ));
            for (half, (a, b)) in [(0usize, (0usize, 3usize)), (1, (4, 7))] {
                let vals = (a..=b)
                    .map(|j| format!("w{j}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                store.push_str(&format!(
                    "        let t{half} = bitcast<vec4<u32>>(vec4<f32>({vals}));\n        if (kv) {{\n            textureStore(vc, kvt(t + {half}u), t{half});\n        }} else {{\n            textureStore(kc, kvt(t + {half}u), t{half});\n        }}\n"
                ));
            }
            store.push_str("    }\n");
        }
    } else if kind == Matvec::GateUp {
        let h = r / 2;
        for k in 0..h {
            store.push_str(&format!(
                "    if (r0 + {k}u <= last) {{\n        y[yb + r0 + {k}u] = a{k} / (1.0 + exp(-a{k})) * a{};\n    }}\n",
                k + h
            ));
        }
    } else {
        for k in 0..r {
            let e = match kind {
                Matvec::Plain | Matvec::Logits => format!("y[yb + rk] = a{k};"),
                Matvec::Bias => format!("y[yb + rk] = a{k} + bias[rk];"),
                Matvec::Add => format!("y[yb + rk] = y[yb + rk] + a{k};"),
                Matvec::GateUp => String::new(),
            };
            store.push_str(&format!(
                "    if (r0 + {k}u <= last) {{\n        let rk = r0 + {k}u;\n        {e}\n    }}\n"
            ));
        }
    }
    let (w_decl, helpers, blk, seg) = if packed {
        (
            quant::WeightRead::Storage.decl(),
            format!(
                "{}{}{}\nconst BE: u32 = 32u;\nconst BB: u32 = 0u;\n",
                quant::texture_loader(quant::WeightRead::Storage),
                quant::packed_addressing(ty),
                quant::HELPERS
            ),
            quant::packed_row_fn(ty).unwrap_or(""),
            SEG_ROW,
        )
    } else {
        (
            "@group(0) @binding(0) var<storage, read> w: array<u32>;",
            format!("{}{}", quant::LOADS, quant::HELPERS),
            quant::dot(ty),
            SEG_OFF,
        )
    };
    let x_decl = match uniform_x {
        Some(n) => format!("var<uniform> xv: array<vec4<f32>, {n}>"),
        None => "var<storage, read> xv: array<vec4<f32>>".to_string(),
    };
    let mut extra = match (norm, uniform_x) {
        (true, Some(n)) => {
            format!("{extra}@group(0) @binding(5) var<uniform> gn: array<vec4<f32>, {n}>;\n")
        }
        _ => extra.to_string(),
    };
    if rope && tex_kv {
        extra.push_str(&format!(
            "@group(0) @binding(6) var kc: {KV_TEXTURE}, write>;\n@group(0) @binding(7) var vc: {KV_TEXTURE}, write>;\n@group(0) @binding(8) var<storage, read> step: array<u32>;\n{}",
            kv_coord_fn()
        ));
    } else if rope {
        extra.push_str(
            "@group(0) @binding(6) var<storage, read_write> kc: array<f32>;\n@group(0) @binding(7) var<storage, read_write> vc: array<f32>;\n@group(0) @binding(8) var<storage, read> step: array<u32>;\n",
        );
    }
    let fused = match (norm, rope) {
        (true, true) => ", RMS norm and RoPE fused",
        (true, false) => ", RMS norm fused",
        _ => "",
    };
    format!(
        r#"// {entry} over {ty} weights, {r} rows per invocation{fused} (hashgrid-infer).
{w_decl}
@group(0) @binding(1) {x_decl};
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
{extra}{common}{blk}
{seg}@compute @workgroup_size({lanes})
fn {entry}(@builtin(global_invocation_id) gid: vec3<u32>) {{
    {setup}{body}{store}}}
"#,
        entry = kind.entry(),
        ty = ty.name(),
        common = helpers,
        lanes = MATVEC_LANES,
    )
}

/// Invocations that share one output row in [`matvec_split`], each taking every
/// `SPLIT_LANES`-th weight block of the row before their sums are added in workgroup memory.
pub const SPLIT_LANES: u32 = 8;

/// Invocations per [`matvec_split`] workgroup.
pub const SPLIT_THREADS: u32 = 64;

/// Output rows per [`matvec_split`] workgroup (for `GateUp`, rows of each of its halves).
pub const SPLIT_ROWS: u32 = SPLIT_THREADS / SPLIT_LANES;

/// Most vec4s of activations [`matvec_split`] stages in workgroup memory: 12 KiB of the
/// 16 KiB every adapter allows, the rest for the partial sums.
pub const SPLIT_MAX_X: u32 = 768;

/// The matvec for GPUs: [`matvec_x`]'s flavours and parameter layout over packed weights
/// (texels) and activations read as a uniform array of `n` vec4s when `uniform_n` is
/// `Some(n)`, else from a storage buffer (a prefill chunk's activations can pass the 64 KiB
/// of a uniform binding), `cols4` (at most [`SPLIT_MAX_X`]) per token, the dispatch's y dimension being the token, shaped for thousands
/// of threads instead of a few cores. Each workgroup stages its token's activations in
/// workgroup memory once (normalised there when `norm`, as in [`matvec_norm`], the sum of
/// squares shared by the workgroup), then [`SPLIT_LANES`]
/// invocations share each of its [`SPLIT_ROWS`] rows, each summing every `SPLIT_LANES`-th
/// block, and a tree reduction adds their sums. [`matvec_x`]'s invocation computes 8 whole
/// rows: right for lavapipe, where a workgroup is a loop on one core and every load costs,
/// but a 576-row matrix is then 72 threads, a few percent of a GPU (5 workgroups of 16).
/// Here it is 576 threads in 72 workgroups, each reading a row's texels side by side. Over
/// several tokens (a prefill chunk) each token's workgroups read the weights again: from a
/// GPU's cache, and a chunk's dispatch has that many more workgroups to spread.
pub fn matvec_split(
    ty: GgmlType,
    kind: Matvec,
    uniform_n: Option<u32>,
    cols4: u32,
    norm: bool,
) -> String {
    let (s, t, rg) = (SPLIT_LANES, SPLIT_THREADS, SPLIT_ROWS);
    let gate_up = kind == Matvec::GateUp;
    let mut extra = match kind {
        Matvec::Bias => "@group(0) @binding(4) var<storage, read> bias: array<f32>;\n".to_string(),
        Matvec::Logits => {
            "@group(0) @binding(4) var<storage, read> step: array<u32>;\n".to_string()
        }
        _ => String::new(),
    };
    if norm {
        extra.push_str(&format!(
            "@group(0) @binding(5) var<uniform> gn: array<vec4<f32>, {cols4}>;\n"
        ));
    }
    let mut body = String::new();
    if kind == Matvec::Logits {
        // Skipped during the prompt; the flag goes through workgroup memory so that the
        // return is uniform for the barriers after it.
        body.push_str(
            "    if (lid == 0u) {\n        flag = select(0u, 1u, step[0] + 1u < p[11]);\n    }\n    if (workgroupUniformLoad(&flag) != 0u) {\n        return;\n    }\n",
        );
    }
    // This token's activations start at vec4 `xb`.
    body.push_str("    let xb = (wid.y * p[1]) >> 2u;\n");
    let staged = if norm {
        body.push_str(&format!(
            "    var ss = 0.0;\n    for (var i = lid; i < {cols4}u; i += {t}u) {{\n        let v = xv[xb + i];\n        ss += dot(v, v);\n    }}\n    red[lid] = ss;\n    workgroupBarrier();\n    for (var k = {h}u; k > 0u; k >>= 1u) {{\n        if (lid < k) {{\n            red[lid] += red[lid + k];\n        }}\n        workgroupBarrier();\n    }}\n    let scale = 1.0 / sqrt(red[0] / f32(p[1]) + bitcast<f32>(p[13]));\n",
            h = t / 2
        ));
        "xv[xb + i] * scale * gn[i]"
    } else {
        "xv[xb + i]"
    };
    body.push_str(&format!(
        "    for (var i = lid; i < {cols4}u; i += {t}u) {{\n        xs[i] = {staged};\n    }}\n    workgroupBarrier();\n"
    ));
    body.push_str(&format!(
        "    let sub = lid % {s}u;\n    let r = wid.x * {rg}u + lid / {s}u;\n    let last = p[0] - 1u;\n    let rr = min(r, last);\n"
    ));
    if gate_up {
        body.push_str("    let og = wrow(p[6], rr, p[2] >> 4u);\n    let ou = wrow(p[8], rr, p[2] >> 4u);\n    let yb = wid.y * p[12];\n");
    } else {
        body.push_str("    let o = seg_row(rr);\n    let yb = p[3] + wid.y * p[12];\n");
    }
    body.push_str("    let nb = p[1] / BE;\n    var a = 0.0;\n");
    if gate_up {
        body.push_str("    var u = 0.0;\n");
    }
    body.push_str(&format!(
        "    for (var b = sub; b < nb; b += {s}u) {{\n        let xi = b * 8u;\n"
    ));
    for k in 0..8 {
        body.push_str(&format!("        let x{k} = xs[xi + {k}u];\n"));
    }
    body.push_str("        let sx = hsum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7);\n");
    if gate_up {
        body.push_str("        a += wrowp(og, b, nb, x0, x1, x2, x3, x4, x5, x6, x7, sx);\n        u += wrowp(ou, b, nb, x0, x1, x2, x3, x4, x5, x6, x7, sx);\n");
    } else {
        body.push_str("        a += wrowp(o, b, nb, x0, x1, x2, x3, x4, x5, x6, x7, sx);\n");
    }
    body.push_str("    }\n    red[lid] = a;\n");
    if gate_up {
        body.push_str(&format!("    red[lid + {t}u] = u;\n"));
    }
    body.push_str(&format!(
        "    workgroupBarrier();\n    for (var k = {h}u; k > 0u; k >>= 1u) {{\n        if (sub < k) {{\n            red[lid] += red[lid + k];\n",
        h = s / 2
    ));
    if gate_up {
        body.push_str(&format!(
            "            red[lid + {t}u] += red[lid + {t}u + k];\n"
        ));
    }
    body.push_str("        }\n        workgroupBarrier();\n    }\n    if (sub == 0u && r <= last) {\n        let v = red[lid];\n");
    let store = match kind {
        Matvec::Plain | Matvec::Logits => "y[yb + r] = v;".to_string(),
        Matvec::Bias => "y[yb + r] = v + bias[r];".to_string(),
        Matvec::Add => "y[yb + r] = y[yb + r] + v;".to_string(),
        // SwiGLU: silu(gate) · up; `v` is the gate row's sum, `g` the up row's.
        Matvec::GateUp => {
            format!("let g = red[lid + {t}u];\n        y[yb + r] = v / (1.0 + exp(-v)) * g;")
        }
    };
    body.push_str(&format!("        {store}\n    }}\n"));
    let fused = if norm { ", RMS norm fused" } else { "" };
    format!(
        r#"// {entry} over {ty} weights, {s} invocations per row, {rg} rows per workgroup{fused} (hashgrid-infer).
{w_decl}
@group(0) @binding(1) {x_decl};
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
{extra}{loader}{addressing}{helpers}
const BE: u32 = 32u;
{row}
{seg_row}
var<workgroup> xs: array<vec4<f32>, {cols4}>;
var<workgroup> red: array<f32, {red}>;
var<workgroup> flag: u32;

@compute @workgroup_size({t})
fn {entry}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
{body}}}
"#,
        entry = kind.entry(),
        ty = ty.name(),
        w_decl = quant::WeightRead::Sampled.decl(),
        loader = quant::texture_loader(quant::WeightRead::Sampled),
        addressing = quant::packed_addressing(ty),
        helpers = quant::HELPERS,
        row = quant::packed_row_fn(ty).unwrap_or(""),
        seg_row = SEG_ROW,
        red = 2 * t,
        x_decl = match uniform_n {
            Some(n) => format!("var<uniform> xv: array<vec4<f32>, {n}>"),
            None => "var<storage, read> xv: array<vec4<f32>>".to_string(),
        },
    )
}

/// `seg_off(r)`: the byte offset of row `r`'s weights across the matvec parameters' up to three
/// segments, for weights in the file's layout (packed ones use [`SEG_ROW`]).
const SEG_OFF: &str = r#"// Byte offset of row r's weights, across the segments.
fn seg_off(r: u32) -> u32 {
    if (r < p[5] || p[4] < 2u) {
        return p[6] + r * p[2];
    }
    if (r < p[5] + p[7] || p[4] < 3u) {
        return p[8] + (r - p[5]) * p[2];
    }
    return p[10] + (r - p[5] - p[7]) * p[2];
}
"#;

/// `seg_row(r)`: the handle ([`quant::packed_addressing`]) of row `r` of packed weights across
/// the matvec parameters' up to three segments, each a packed matrix of its own (shared by
/// [`matvec`], [`matvec_split`] and [`matmul`]).
const SEG_ROW: &str = r#"// Handle of row r of the packed weights, across the segments.
fn seg_row(r: u32) -> u32 {
    let rt = p[2] >> 4u;
    if (r < p[5] || p[4] < 2u) {
        return wrow(p[6], r, rt);
    }
    if (r < p[5] + p[7] || p[4] < 3u) {
        return wrow(p[8], r - p[5], rt);
    }
    return wrow(p[10], r - p[5] - p[7], rt);
}
"#;

/// Rows each invocation of [`matmul`] computes, for all the chunk's tokens.
pub const MATMUL_ROWS: u32 = 8;

/// Output rows per [`matmul`] workgroup for `kind`.
pub fn matmul_rows_per_group(kind: Matvec) -> u32 {
    match kind {
        Matvec::GateUp => MATVEC_LANES * MATMUL_ROWS / 2,
        _ => MATVEC_LANES * MATMUL_ROWS,
    }
}

/// The matvec flavours (not `Logits`) for `tokens` vectors at once through packed weights
/// ([`quant::is_packed`]), with the same bindings and parameters as [`matvec_x`] and the
/// activations as `var<uniform> xv: array<vec4<f32>, n>` (`n = tokens · cols / 4`). Each
/// invocation reads a weight block once for all the tokens: it dequantises [`MATMUL_ROWS`]
/// rows' blocks four weights at a time and takes each four into every token's dot product,
/// so weight fetches and dequantisation cost `1 / tokens` of what the one-token matvec pays.
/// The dispatch is one-dimensional ([`matmul_rows_per_group`] rows a workgroup).
pub fn matmul(ty: GgmlType, kind: Matvec, tokens: u32, n: u32) -> String {
    assert!(quant::is_packed(ty) && kind != Matvec::Logits);
    let r = MATMUL_ROWS as usize;
    let t = tokens as usize;
    let mut setup = String::new();
    // Row offsets o0.. (for GateUp: gate rows, then the same rows of up).
    if kind == Matvec::GateUp {
        let h = r / 2;
        setup.push_str(&format!(
            "let r0 = gid.x * {h}u;\n    if (r0 >= p[0]) {{\n        return;\n    }}\n    let last = p[0] - 1u;\n"
        ));
        for k in 0..h {
            setup.push_str(&format!(
                "    let o{k} = wrow(p[6], min(r0 + {k}u, last), p[2] >> 4u);\n    let o{} = wrow(p[8], min(r0 + {k}u, last), p[2] >> 4u);\n",
                k + h
            ));
        }
    } else {
        setup.push_str(&format!(
            "let r0 = gid.x * {r}u;\n    if (r0 >= p[0]) {{\n        return;\n    }}\n    let last = p[0] - 1u;\n"
        ));
        for k in 0..r {
            setup.push_str(&format!("    let o{k} = seg_row(min(r0 + {k}u, last));\n"));
        }
    }
    setup.push_str("    let xs = p[1] >> 2u;\n");
    for k in 0..r {
        for j in 0..t {
            setup.push_str(&format!("    var a{k}_{j} = 0.0;\n"));
        }
    }
    // Per block: each row's texels and scales, then four weights at a time into every token.
    let mut body = String::from(
        "    let nb = p[1] / 32u;\n    for (var b = 0u; b < nb; b++) {\n        let xb = b * 8u;\n",
    );
    for k in 0..r {
        body.push_str(&match ty {
            GgmlType::Q4_1 => format!(
                "        let q{k} = wl(wqt(o{k}, b, nb));\n        let s{k} = f16x2(wl(wst(o{k}, b, nb))[b & 3u]);\n"
            ),
            _ => format!(
                "        let q{k} = wl(wqt(o{k}, b, nb));\n        let c{k} = wl(wqt(o{k}, b, nb) + TR);\n        let s{k} = f16((wl(wst(o{k}, b, nb))[(b >> 1u) & 3u] >> ((b & 1u) * 16u)) & 0xFFFFu);\n"
            ),
        });
    }
    for c in 0..8 {
        let comp = ["x", "y", "z", "w"][c % 4];
        body.push_str("        {\n");
        for k in 0..r {
            body.push_str(&match ty {
                GgmlType::Q4_1 => {
                    let nib = if c < 4 { "nib_lo" } else { "nib_hi" };
                    format!("        let w{k} = {nib}(q{k}.{comp}) * s{k}.x + s{k}.y;\n")
                }
                _ => {
                    let src = if c < 4 { "q" } else { "c" };
                    format!("        let w{k} = i8x4({src}{k}.{comp}) * s{k};\n")
                }
            });
        }
        for j in 0..t {
            body.push_str(&format!("        let x{j} = xv[{j}u * xs + xb + {c}u];\n"));
            for k in 0..r {
                body.push_str(&format!("        a{k}_{j} += dot(w{k}, x{j});\n"));
            }
        }
        body.push_str("        }\n");
    }
    body.push_str("    }\n");
    // Stores, token by token.
    let mut store = String::new();
    for j in 0..t {
        if kind == Matvec::GateUp {
            let h = r / 2;
            for k in 0..h {
                store.push_str(&format!(
                    "    if (r0 + {k}u <= last) {{\n        y[{j}u * p[12] + r0 + {k}u] = a{k}_{j} / (1.0 + exp(-a{k}_{j})) * a{u}_{j};\n    }}\n",
                    u = k + h
                ));
            }
        } else {
            store.push_str(&format!("    let yb{j} = p[3] + {j}u * p[12];\n"));
            for k in 0..r {
                let e = match kind {
                    Matvec::Bias => format!("y[yb{j} + rk] = a{k}_{j} + bias[rk];"),
                    Matvec::Add => format!("y[yb{j} + rk] = y[yb{j} + rk] + a{k}_{j};"),
                    _ => format!("y[yb{j} + rk] = a{k}_{j};"),
                };
                store.push_str(&format!(
                    "    if (r0 + {k}u <= last) {{\n        let rk = r0 + {k}u;\n        {e}\n    }}\n"
                ));
            }
        }
    }
    let extra = match kind {
        Matvec::Bias => "@group(0) @binding(4) var<storage, read> bias: array<f32>;\n",
        _ => "",
    };
    format!(
        r#"// {entry} over {ty} weights for {t} tokens, {r} rows per invocation (hashgrid-infer).
{w_decl}
@group(0) @binding(1) var<uniform> xv: array<vec4<f32>, {n}>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
{extra}{loader}{addressing}{helpers}
{seg_row}@compute @workgroup_size({lanes})
fn {entry}(@builtin(global_invocation_id) gid: vec3<u32>) {{
    {setup}{body}{store}}}
"#,
        entry = kind.entry(),
        ty = ty.name(),
        w_decl = quant::WeightRead::Storage.decl(),
        loader = quant::texture_loader(quant::WeightRead::Storage),
        addressing = quant::packed_addressing(ty),
        helpers = quant::HELPERS,
        seg_row = SEG_ROW,
        lanes = MATVEC_LANES,
    )
}

/// `embed`: `p = [d_model, row_bytes, vocab, offset, stride]` (row bytes as the kernels read
/// them: [`quant::kernel_row_bytes`]). Token `t` of the dispatch (its y index) embeds the
/// token at position `step · stride + offset + t` into `out[t · d_model..]`.
pub fn embed(ty: GgmlType) -> String {
    if quant::is_packed(ty) {
        return format!(
            r#"// embed over packed {ty} rows (hashgrid-infer).
@group(0) @binding(0) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
@group(0) @binding(4) var<storage, read> step: array<u32>;
{addressing}{helpers}{deq}
@compute @workgroup_size({rows})
fn embed(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let b = gid.x;
    let nb = p[0] / 32u;
    if (b >= nb) {{
        return;
    }}
    var tok = tokens[step[0] * p[4] + p[3] + gid.y];
    if (tok >= p[2]) {{
        tok = 0u;
    }}
    wdeqp(wrow(0u, tok, p[1] >> 4u), b, nb, gid.y * p[0] + b * 32u);
}}
"#,
            ty = ty.name(),
            addressing = quant::packed_addressing(ty),
            helpers = quant::HELPERS,
            deq = quant::packed_deq_fn(ty).unwrap_or(""),
            rows = ROWS_PER_GROUP,
        );
    }
    format!(
        r#"// embed over {ty} rows (hashgrid-infer).
@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
@group(0) @binding(4) var<storage, read> step: array<u32>;
{loads}{helpers}{blk}
@compute @workgroup_size({rows})
fn embed(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let b = gid.x;
    if (b >= p[0] / BE) {{
        return;
    }}
    var tok = tokens[step[0] * p[4] + p[3] + gid.y];
    if (tok >= p[2]) {{
        tok = 0u;
    }}
    blk_deq(tok * p[1] + b * BB, gid.y * p[0] + b * BE);
}}
"#,
        ty = ty.name(),
        loads = quant::LOADS,
        helpers = quant::HELPERS,
        blk = quant::deq(ty),
        rows = ROWS_PER_GROUP,
    )
}

/// `rmsnorm`: `p = [n, eps as f32 bits]`; one workgroup per vector (the y index of the
/// dispatch: vector `t` is `x[t · n..]`).
pub fn rmsnorm() -> String {
    rmsnorm_kernel("f32", "n", "v * v", REDUCE_THREADS)
}

/// `rmsnorm` over `vec4<f32>` loads, for `n` a multiple of 4 (same parameters): a quarter of
/// the loads, and one workgroup of [`NORM_THREADS`].
pub fn rmsnorm_vec4() -> String {
    rmsnorm_kernel("vec4<f32>", "n / 4u", "dot(v, v)", NORM_THREADS)
}

/// The rmsnorm kernel over elements of type `elem` (`len` of them, `sq` the square of one,
/// `v`), in one workgroup of `t` threads.
fn rmsnorm_kernel(elem: &str, len: &str, sq: &str, t: u32) -> String {
    format!(
        r#"// rmsnorm over {elem} (hashgrid-infer).
@group(0) @binding(0) var<storage, read> x: array<{elem}>;
@group(0) @binding(1) var<storage, read> wn: array<{elem}>;
@group(0) @binding(2) var<storage, read_write> out: array<{elem}>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
var<workgroup> part: array<f32, {t}>;
@compute @workgroup_size({t})
fn rmsnorm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {{
    let n = p[0];
    let o = wid.y * {len};
    var s = 0.0;
    for (var i = lid; i < {len}; i += {t}u) {{
        let v = x[o + i];
        s += {sq};
    }}
    part[lid] = s;
    workgroupBarrier();
    for (var k = {half}u; k > 0u; k >>= 1u) {{
        if (lid < k) {{
            part[lid] += part[lid + k];
        }}
        workgroupBarrier();
    }}
    let scale = 1.0 / sqrt(part[0] / f32(n) + bitcast<f32>(p[1]));
    for (var i = lid; i < {len}; i += {t}u) {{
        out[o + i] = x[o + i] * scale * wn[i];
    }}
}}
"#,
        half = t / 2,
    )
}

/// `silu_mul`: `p = [n]`, `y[i] = silu(a[i]) · a[n + i]`; token `t` (the y index) reads
/// `a[2n · t..]` and writes `y[n · t..]`.
pub fn silu_mul() -> String {
    format!(
        r#"// silu_mul (hashgrid-infer).
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> p: array<u32>;
@compute @workgroup_size({rows})
fn silu_mul(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let i = gid.x;
    if (i >= p[0]) {{
        return;
    }}
    let ab = gid.y * 2u * p[0];
    let g = a[ab + i];
    y[gid.y * p[0] + i] = g / (1.0 + exp(-g)) * a[ab + p[0] + i];
}}
"#,
        rows = ROWS_PER_GROUP
    )
}

/// `rope_store`: `p = [n_heads, n_kv, head_dim, rope_dim, neox, base as f32 bits, offset,
/// qkv_stride, step_stride]`. `qkv` holds q (n_heads · head_dim), then k and v (n_kv ·
/// head_dim each), for each token of the dispatch (its y index `t`) at
/// `qkv[t · qkv_stride..]`; token `t` is at position `step · step_stride + offset + t`. One thread per pair of a head's dimensions, over the q and
/// k heads.
pub fn rope_store() -> String {
    format!(
        r#"// rope_store (hashgrid-infer).
@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> kc: array<f32>;
@group(0) @binding(2) var<storage, read_write> vc: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
@group(0) @binding(4) var<storage, read> step: array<u32>;
@compute @workgroup_size({rows})
fn rope_store(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let nh = p[0];
    let nkv = p[1];
    let hd = p[2];
    let half = hd / 2u;
    let id = gid.x;
    if (id >= (nh + nkv) * half) {{
        return;
    }}
    let head = id / half;
    let i = id % half;
    let pos = step[0] * p[8] + p[6] + gid.y;
    let rd = p[3];
    var a = 2u * i;
    var b = a + 1u;
    var c = 1.0;
    var s = 0.0;
    if (i < rd / 2u) {{
        if (p[4] != 0u) {{
            a = i;
            b = i + rd / 2u;
        }}
        // As ggml: theta_i = pos · scale^i with scale = base^(-2 / rope_dim), multiplied up.
        let scale = pow(bitcast<f32>(p[5]), -2.0 / f32(rd));
        var theta = f32(pos);
        for (var k = 0u; k < i; k++) {{
            theta *= scale;
        }}
        c = cos(theta);
        s = sin(theta);
    }}
    let tb = gid.y * p[7];
    let base = tb + head * hd;
    let x0 = qkv[base + a];
    let x1 = qkv[base + b];
    let y0 = x0 * c - x1 * s;
    let y1 = x0 * s + x1 * c;
    if (head < nh) {{
        qkv[base + a] = y0;
        qkv[base + b] = y1;
        return;
    }}
    let g = head - nh;
    let kvd = nkv * hd;
    let row = pos * kvd + g * hd;
    kc[row + a] = y0;
    kc[row + b] = y1;
    let vb = tb + nh * hd + kvd + g * hd;
    vc[row + 2u * i] = qkv[vb + 2u * i];
    vc[row + 2u * i + 1u] = qkv[vb + 2u * i + 1u];
}}
"#,
        rows = ROWS_PER_GROUP
    )
}

/// [`rope_store`] with the K and V caches kept as textures ([`KV_TEXTURE`], `write` access),
/// the same parameters and arithmetic: a texel store writes 4 floats, so after the
/// `n_heads · head_dim / 2` threads of q's pairs (as `rope_store`), each thread makes one
/// texel: 4 consecutive dimensions of one KV head's k (each rotated with its pair's
/// partner) and the same 4 of its v. Dispatch `n_heads · head_dim / 2 + n_kv · head_dim / 4`
/// threads (`head_dim` a multiple of 4).
pub fn rope_store_tex() -> String {
    format!(
        r#"// rope_store_tex (hashgrid-infer).
@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var kc: {KV_TEXTURE}, write>;
@group(0) @binding(2) var vc: {KV_TEXTURE}, write>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
@group(0) @binding(4) var<storage, read> step: array<u32>;
{coord}// cos and sin of pair i's angle at position pos, as rope_store computes them.
fn rot(i: u32, pos: u32) -> vec2<f32> {{
    let rd = p[3];
    if (i >= rd / 2u) {{
        return vec2<f32>(1.0, 0.0);
    }}
    let scale = pow(bitcast<f32>(p[5]), -2.0 / f32(rd));
    var theta = f32(pos);
    for (var k = 0u; k < i; k++) {{
        theta *= scale;
    }}
    return vec2<f32>(cos(theta), sin(theta));
}}
// Dimension d of the head at `base` after RoPE.
fn rope_dim(base: u32, d: u32, pos: u32) -> f32 {{
    let hd = p[2];
    let rd = p[3];
    var i = d / 2u;
    var a = d & ~1u;
    var b = a + 1u;
    if (p[4] != 0u && d < rd) {{
        i = d % (rd / 2u);
        a = i;
        b = i + rd / 2u;
    }}
    if (i >= rd / 2u) {{
        return qkv[base + d];
    }}
    let cs = rot(i, pos);
    let x0 = qkv[base + a];
    let x1 = qkv[base + b];
    if (d == a) {{
        return x0 * cs.x - x1 * cs.y;
    }}
    return x0 * cs.y + x1 * cs.x;
}}
@compute @workgroup_size({rows})
fn rope_store(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let nh = p[0];
    let nkv = p[1];
    let hd = p[2];
    let half = hd / 2u;
    let pos = step[0] * p[8] + p[6] + gid.y;
    let tb = gid.y * p[7];
    let id = gid.x;
    if (id < nh * half) {{
        let head = id / half;
        let i = id % half;
        let rd = p[3];
        var a = 2u * i;
        var b = a + 1u;
        if (i < rd / 2u && p[4] != 0u) {{
            a = i;
            b = i + rd / 2u;
        }}
        let cs = rot(i, pos);
        let base = tb + head * hd;
        let x0 = qkv[base + a];
        let x1 = qkv[base + b];
        qkv[base + a] = x0 * cs.x - x1 * cs.y;
        qkv[base + b] = x0 * cs.y + x1 * cs.x;
        return;
    }}
    let t = id - nh * half;
    let hd4 = hd / 4u;
    if (t >= nkv * hd4) {{
        return;
    }}
    let g = t / hd4;
    let d = 4u * (t % hd4);
    let kb = tb + nh * hd + g * hd;
    let k = vec4<f32>(rope_dim(kb, d, pos), rope_dim(kb, d + 1u, pos), rope_dim(kb, d + 2u, pos), rope_dim(kb, d + 3u, pos));
    let vb = kb + nkv * hd + d;
    let v = vec4<f32>(qkv[vb], qkv[vb + 1u], qkv[vb + 2u], qkv[vb + 3u]);
    let texel = (pos * nkv * hd + g * hd + d) / 4u;
    textureStore(kc, kvt(texel), bitcast<vec4<u32>>(k));
    textureStore(vc, kvt(texel), bitcast<vec4<u32>>(v));
}}
"#,
        rows = ROWS_PER_GROUP,
        coord = kv_coord_fn(),
    )
}

/// `attention`: `p = [n_heads, n_kv, head_dim, ctx, scale as f32 bits, offset, q_stride,
/// out_stride, step_stride]`; one workgroup per head and token (the y index `t`: its query
/// is `q[t · q_stride..]` in vec4s, its output `out[t · out_stride..]`, its position
/// `step · step_stride + offset + t`, and it attends to the positions up to its own); `sc` is scratch of
/// `n_heads · ctx` floats per token. `head_dim` must be a multiple of 4: q, K and
/// V are read as `vec4<f32>` (on lavapipe a load costs about the same whatever its width).
pub fn attention() -> String {
    attention_q(None)
}

/// [`attention`] with q read as `var<uniform> q: array<vec4<f32>, n>` when `uniform_q` is
/// `Some(n)` (the bound q must then be exactly `16 · n` bytes, at most 64 KiB).
pub fn attention_q(uniform_q: Option<u32>) -> String {
    attention_gen(uniform_q, ATTN_THREADS, false, false)
}

/// [`attention_q`] with the K and V caches read as textures
/// (`texture_storage_2d<rgba32uint, read>`, the floats' bits; vec4 `i` of a cache is texel
/// `i`), as the CPU shape keeps them ([`KV_TEXTURE`]). On lavapipe a storage-buffer load is a
/// bounds check, a scalar load and an insert per lane and component, a texel load ~50
/// instructions for 8 lanes' 4 components: at a ~400-token context each head's positions
/// cost ~300 ns each through buffers.
pub fn attention_q_tex(uniform_q: Option<u32>) -> String {
    attention_gen(uniform_q, ATTN_THREADS, false, true)
}

/// How the CPU-shaped kernels declare and address a K or V cache kept as a texture: vec4 `i`
/// of the cache is texel `(i % TEXTURE_ROW_TEXELS, i / TEXTURE_ROW_TEXELS)` of an
/// `rgba32uint` texture holding the floats' bits (the executor's layout for a buffer bound as
/// a texture).
pub const KV_TEXTURE: &str = "texture_storage_2d<rgba32uint";

/// `kvt(i)`: the texel coordinates of a K/V cache's vec4 `i` ([`KV_TEXTURE`]).
fn kv_coord_fn() -> String {
    let w = hashgrid_protocol::job::TEXTURE_ROW_TEXELS;
    format!(
        "fn kvt(i: u32) -> vec2<u32> {{\n    return vec2<u32>(i & {}u, i >> {}u);\n}}\n",
        w - 1,
        w.trailing_zeros()
    )
}

/// Threads per workgroup of [`attention_split`].
pub const ATTN_SPLIT_THREADS: u32 = 256;

/// [`attention_q`] shaped for GPUs: [`ATTN_SPLIT_THREADS`] threads per head, and the weighted
/// sum of V split over positions as well as over the head's vec4s (thread `i` sums vec4
/// `i % (head_dim / 4)` over every `threads / (head_dim / 4)`-th position; the partial sums
/// are added in workgroup memory). The CPU shape has each of its [`ATTN_THREADS`] threads walk
/// every position for that sum (one vec4 of the head each, in turns): on a GPU, at a long
/// context, the whole decoder would then wait on a handful of threads a head. Needs `head_dim / 4 ≤ ATTN_SPLIT_THREADS`.
pub fn attention_split(uniform_q: Option<u32>) -> String {
    attention_gen(uniform_q, ATTN_SPLIT_THREADS, true, false)
}

/// Largest head (in floats) [`attention_rope`] holds in workgroup memory.
pub const ATTN_ROPE_MAX_HEAD: u32 = 256;

/// [`rope_store`] and [`attention_split`] in one dispatch, for one token (decode) on GPUs:
/// `p` is [`attention`]'s nine slots then `[rope_dim, neox, base as f32 bits]`, and binding 0
/// is the raw `qkv` of the token (`var<storage>`, q, then k and v). Each head's workgroup
/// rotates its q and its group's k into workgroup memory (the same arithmetic as
/// `rope_store`), uses that k and the raw v for the current position instead of reading them
/// back from the cache (another workgroup of the same dispatch writes them there), and the
/// first head of each group stores them in the cache for the tokens after. One dispatch a
/// layer fewer. Needs `head_dim ≤ ATTN_ROPE_MAX_HEAD`.
pub fn attention_rope() -> String {
    let t = ATTN_SPLIT_THREADS;
    let h4 = ATTN_ROPE_MAX_HEAD / 4;
    format!(
        r#"// attention_rope (hashgrid-infer).
@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> kc: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> vc: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> sc: array<f32>;
@group(0) @binding(5) var<storage, read> p: array<u32>;
@group(0) @binding(6) var<storage, read> step: array<u32>;
var<workgroup> red: array<f32, {t}>;
var<workgroup> redv: array<vec4<f32>, {t}>;
var<workgroup> qs: array<vec4<f32>, {h4}>;
var<workgroup> kn: array<vec4<f32>, {h4}>;
var<workgroup> vn: array<vec4<f32>, {h4}>;
@compute @workgroup_size({t})
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
    let nh = p[0];
    let nkv = p[1];
    let hd = p[2];
    let hd4 = hd / 4u;
    let ctx = p[3];
    let scale = bitcast<f32>(p[4]);
    let h = min(wid.x, nh - 1u);
    let g = h / (nh / nkv);
    let kvd4 = nkv * hd4;
    let pos = min(step[0] * p[8] + p[5], ctx - 1u);
    let qo = h * hd;
    let ko = nh * hd + g * hd;
    let vo = nh * hd + nkv * hd + g * hd;
    // RoPE of q and k, as rope_store does it, into workgroup memory; v as it is.
    let rd = p[9];
    for (var i = lid; i < hd / 2u; i += {t}u) {{
        var a = 2u * i;
        var b = a + 1u;
        var c = 1.0;
        var s = 0.0;
        if (i < rd / 2u) {{
            if (p[10] != 0u) {{
                a = i;
                b = i + rd / 2u;
            }}
            let sc_r = pow(bitcast<f32>(p[11]), -2.0 / f32(rd));
            var theta = f32(pos);
            for (var k = 0u; k < i; k++) {{
                theta *= sc_r;
            }}
            c = cos(theta);
            s = sin(theta);
        }}
        let q0 = qkv[qo + a];
        let q1 = qkv[qo + b];
        qs[a >> 2u][a & 3u] = q0 * c - q1 * s;
        qs[b >> 2u][b & 3u] = q0 * s + q1 * c;
        let k0 = qkv[ko + a];
        let k1 = qkv[ko + b];
        kn[a >> 2u][a & 3u] = k0 * c - k1 * s;
        kn[b >> 2u][b & 3u] = k0 * s + k1 * c;
    }}
    for (var d = lid; d < hd4; d += {t}u) {{
        let o = vo + 4u * d;
        vn[d] = vec4<f32>(qkv[o], qkv[o + 1u], qkv[o + 2u], qkv[o + 3u]);
    }}
    workgroupBarrier();
    let cur = pos * kvd4 + g * hd4;
    if (h % (nh / nkv) == 0u) {{
        for (var d = lid; d < hd4; d += {t}u) {{
            kc[cur + d] = kn[d];
            vc[cur + d] = vn[d];
        }}
    }}
    let sb = h * ctx;
    var mx = -3.0e38;
    for (var t = lid; t <= pos; t += {t}u) {{
        var s = 0.0;
        if (t == pos) {{
            for (var d = 0u; d < hd4; d++) {{
                s += dot(qs[d], kn[d]);
            }}
        }} else {{
            let kb = t * kvd4 + g * hd4;
            for (var d = 0u; d < hd4; d++) {{
                s += dot(qs[d], kc[kb + d]);
            }}
        }}
        s *= scale;
        sc[sb + t] = s;
        mx = max(mx, s);
    }}
{softmax}    let ns = {t}u / hd4;
    let d = lid % hd4;
    let sl = lid / hd4;
    var acc = vec4<f32>(0.0);
    if (sl < ns) {{
        for (var t = sl; t <= pos; t += ns) {{
            if (t == pos) {{
                acc += sc[sb + t] * vn[d];
            }} else {{
                acc += sc[sb + t] * vc[t * kvd4 + g * hd4 + d];
            }}
        }}
    }}
    redv[lid] = acc;
    workgroupBarrier();
    if (lid < hd4) {{
        var a = redv[lid];
        for (var k = 1u; k < ns; k++) {{
            a += redv[k * hd4 + lid];
        }}
        out[h * hd4 + lid] = a * inv;
    }}
}}
"#,
        softmax = attention_softmax(t),
    )
}

/// The attention kernels' softmax over the scores `sc[sb..=sb + pos]` that each thread
/// wrote (with `mx`, its running maximum): the workgroup's maximum, the exponentials, their
/// sum, and `inv = 1 / sum`, for `threads` threads reducing in `red`.
fn attention_softmax(threads: u32) -> String {
    format!(
        r#"    red[lid] = mx;
    workgroupBarrier();
    for (var k = {half}u; k > 0u; k >>= 1u) {{
        if (lid < k) {{
            red[lid] = max(red[lid], red[lid + k]);
        }}
        workgroupBarrier();
    }}
    let m = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var t = lid; t <= pos; t += {t}u) {{
        let e = exp(sc[sb + t] - m);
        sc[sb + t] = e;
        sum += e;
    }}
    red[lid] = sum;
    storageBarrier();
    workgroupBarrier();
    for (var k = {half}u; k > 0u; k >>= 1u) {{
        if (lid < k) {{
            red[lid] += red[lid + k];
        }}
        workgroupBarrier();
    }}
    let inv = 1.0 / red[0];
"#,
        t = threads,
        half = threads / 2,
    )
}

fn attention_gen(uniform_q: Option<u32>, threads: u32, split_v: bool, tex_kv: bool) -> String {
    let q_decl = match uniform_q {
        Some(n) => format!("var<uniform> q: array<vec4<f32>, {n}>"),
        None => "var<storage, read> q: array<vec4<f32>>".to_string(),
    };
    let kv_decl = if tex_kv {
        format!(
            "@group(0) @binding(1) var kc: {KV_TEXTURE}, read>;\n@group(0) @binding(2) var vc: {KV_TEXTURE}, read>;\n{}fn kl(i: u32) -> vec4<f32> {{\n    return bitcast<vec4<f32>>(textureLoad(kc, kvt(i)));\n}}\nfn vl(i: u32) -> vec4<f32> {{\n    return bitcast<vec4<f32>>(textureLoad(vc, kvt(i)));\n}}\n",
            kv_coord_fn()
        )
    } else {
        "@group(0) @binding(1) var<storage, read> kc: array<vec4<f32>>;\n@group(0) @binding(2) var<storage, read> vc: array<vec4<f32>>;\nfn kl(i: u32) -> vec4<f32> {\n    return kc[i];\n}\nfn vl(i: u32) -> vec4<f32> {\n    return vc[i];\n}\n".to_string()
    };
    format!(
        r#"// attention (hashgrid-infer).
@group(0) @binding(0) {q_decl};
{kv_decl}@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> sc: array<f32>;
@group(0) @binding(5) var<storage, read> p: array<u32>;
@group(0) @binding(6) var<storage, read> step: array<u32>;
var<workgroup> red: array<f32, {t}>;
{redv}@compute @workgroup_size({t})
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
    let nh = p[0];
    let hd4 = p[2] / 4u;
    let ctx = p[3];
    let scale = bitcast<f32>(p[4]);
    let h = min(wid.x, nh - 1u);
    let g = h / (nh / p[1]);
    let kvd4 = p[1] * hd4;
    let pos = min(step[0] * p[8] + p[5] + wid.y, ctx - 1u);
    let qb = wid.y * p[6] + h * hd4;
    let ob = wid.y * p[7] + h * hd4;
    let sb = (wid.y * nh + h) * ctx;
    var mx = -3.0e38;
    for (var t = lid; t <= pos; t += {t}u) {{
        let kb = t * kvd4 + g * hd4;
        var s = 0.0;
        for (var d = 0u; d < hd4; d++) {{
            s += dot(q[qb + d], kl(kb + d));
        }}
        s *= scale;
        sc[sb + t] = s;
        mx = max(mx, s);
    }}
{softmax}{weighted}}}
"#,
        t = threads,
        softmax = attention_softmax(threads),
        redv = if split_v {
            format!("var<workgroup> redv: array<vec4<f32>, {threads}>;\n")
        } else {
            String::new()
        },
        weighted = if split_v {
            format!(
                r#"    let ns = {threads}u / hd4;
    let d = lid % hd4;
    let sl = lid / hd4;
    var acc = vec4<f32>(0.0);
    if (sl < ns) {{
        for (var t = sl; t <= pos; t += ns) {{
            acc += sc[sb + t] * vl(t * kvd4 + g * hd4 + d);
        }}
    }}
    redv[lid] = acc;
    workgroupBarrier();
    if (lid < hd4) {{
        var a = redv[lid];
        for (var k = 1u; k < ns; k++) {{
            a += redv[k * hd4 + lid];
        }}
        out[ob + lid] = a * inv;
    }}
"#
            )
        } else {
            format!(
                r#"    for (var d = lid; d < hd4; d += {threads}u) {{
        var acc = vec4<f32>(0.0);
        for (var t = 0u; t <= pos; t++) {{
            acc += sc[sb + t] * vl(t * kvd4 + g * hd4 + d);
        }}
        out[ob + d] = acc * inv;
    }}
"#
            )
        },
    )
}

/// `sample`: `p = [n_prompt, max_total, vocab, n_eog, eog[8], temperature bits, top_k,
/// top_p bits, seed, offset]` (17 slots). At position `s = step + offset ≥ n_prompt − 1` it
/// picks token `s + 1`: the
/// arg-max (lowest id on ties) when the temperature is 0, otherwise a draw from the top-k,
/// then top-p (on the untempered distribution, as llama.cpp orders them), then tempered
/// distribution, with a counter-based random number from (seed, step), so a run is
/// reproducible anywhere. It records top1 − top2 of the raw logits in `margins` (how close the
/// choice was) and sets `status = [done, generated]`.
pub fn sample() -> String {
    format!(
        r#"// sample (hashgrid-infer).
@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> tokens: array<u32>;
@group(0) @binding(2) var<storage, read_write> status: array<u32>;
@group(0) @binding(3) var<storage, read_write> margins: array<f32>;
@group(0) @binding(4) var<storage, read> p: array<u32>;
@group(0) @binding(5) var<storage, read> step: array<u32>;
const T: u32 = {t}u;
var<workgroup> v1: array<f32, {t}>;
var<workgroup> v2: array<f32, {t}>;
var<workgroup> i1: array<u32, {t}>;
var<workgroup> acc: array<f32, {t}>;
var<workgroup> ctl: u32;
var<workgroup> pick: u32;

fn reduce_sum(lid: u32, x: f32) -> f32 {{
    acc[lid] = x;
    workgroupBarrier();
    for (var k = T / 2u; k > 0u; k >>= 1u) {{
        if (lid < k) {{
            acc[lid] += acc[lid + k];
        }}
        workgroupBarrier();
    }}
    let r = acc[0];
    workgroupBarrier();
    return r;
}}

// Mass of the logits at or above t, relative to exp(top - top) = 1.
fn mass_above(lid: u32, t: f32, top: f32, n: u32) -> f32 {{
    var s = 0.0;
    for (var i = lid; i < n; i += T) {{
        let l = logits[i];
        if (l >= t) {{
            s += exp(l - top);
        }}
    }}
    return reduce_sum(lid, s);
}}

fn count_above(lid: u32, t: f32, n: u32) -> f32 {{
    var c = 0.0;
    for (var i = lid; i < n; i += T) {{
        if (logits[i] >= t) {{
            c += 1.0;
        }}
    }}
    return reduce_sum(lid, c);
}}

// x as thread 0 sees it, uniform across the workgroup.
fn uni(lid: u32, x: u32) -> u32 {{
    if (lid == 0u) {{
        ctl = x;
    }}
    return workgroupUniformLoad(&ctl);
}}

// PCG-style hash of (seed, step): a uniform float in [0, 1).
fn rand01(seed: u32, s: u32) -> f32 {{
    var h = seed * 747796405u + 2891336453u;
    h ^= s * 2654435769u;
    h = ((h >> ((h >> 28u) + 4u)) ^ h) * 277803737u;
    h = (h >> 22u) ^ h;
    h = h * 747796405u + 2891336453u;
    h = ((h >> ((h >> 28u) + 4u)) ^ h) * 277803737u;
    h = (h >> 22u) ^ h;
    return f32(h >> 8u) / 16777216.0;
}}

@compute @workgroup_size({t})
fn sample(@builtin(local_invocation_index) lid: u32) {{
    let s = step[0] + p[16];
    if (lid == 0u) {{
        ctl = select(0u, 1u, s + 1u >= p[0] && status[0] == 0u && s + 1u < p[1]);
    }}
    if (workgroupUniformLoad(&ctl) == 0u) {{
        return;
    }}
    let n = p[2];
    // Best, second best and arg-max (lowest id on ties) of this thread's share.
    var b1 = -3.4e38;
    var b2 = -3.4e38;
    var bi = 0u;
    var lo = 3.4e38;
    for (var i = lid; i < n; i += T) {{
        let l = logits[i];
        if (l > b1) {{
            b2 = b1;
            b1 = l;
            bi = i;
        }} else if (l > b2) {{
            b2 = l;
        }}
        lo = min(lo, l);
    }}
    v1[lid] = b1;
    v2[lid] = b2;
    i1[lid] = bi;
    acc[lid] = lo;
    workgroupBarrier();
    for (var k = T / 2u; k > 0u; k >>= 1u) {{
        if (lid < k) {{
            let a1 = v1[lid];
            let c1 = v1[lid + k];
            if (c1 > a1 || (c1 == a1 && i1[lid + k] < i1[lid])) {{
                v2[lid] = max(a1, v2[lid + k]);
                v1[lid] = c1;
                i1[lid] = i1[lid + k];
            }} else {{
                v2[lid] = max(v2[lid], c1);
            }}
            acc[lid] = min(acc[lid], acc[lid + k]);
        }}
        workgroupBarrier();
    }}
    let top = v1[0];
    let second = v2[0];
    let floor_l = acc[0];
    if (lid == 0u) {{
        pick = i1[0];
        ctl = select(0u, 1u, bitcast<f32>(p[12]) > 0.0);
    }}
    if (workgroupUniformLoad(&ctl) != 0u) {{
        let temp = bitcast<f32>(p[12]);
        let top_k = p[13];
        let top_p = bitcast<f32>(p[14]);
        // top-k: the highest threshold that still keeps k logits.
        var thr = floor_l;
        if (uni(lid, select(0u, 1u, top_k > 0u && top_k < n)) != 0u) {{
            var a = floor_l;
            var b = top;
            for (var it = 0u; it < 32u; it++) {{
                let mid = 0.5 * (a + b);
                if (count_above(lid, mid, n) >= f32(top_k)) {{
                    a = mid;
                }} else {{
                    b = mid;
                }}
            }}
            thr = a;
        }}
        // top-p: the highest threshold whose kept mass is still at least p.
        if (uni(lid, select(0u, 1u, top_p > 0.0 && top_p < 1.0)) != 0u) {{
            let z = mass_above(lid, thr, top, n);
            var a = thr;
            var b = top;
            for (var it = 0u; it < 32u; it++) {{
                let mid = 0.5 * (a + b);
                if (mass_above(lid, mid, top, n) >= top_p * z) {{
                    a = mid;
                }} else {{
                    b = mid;
                }}
            }}
            thr = a;
        }}
        // Draw from the tempered distribution over the kept logits, scanning ids in order.
        let chunk = (n + T - 1u) / T;
        let start = min(lid * chunk, n);
        let end = min(start + chunk, n);
        var local = 0.0;
        for (var i = start; i < end; i++) {{
            let l = logits[i];
            if (l >= thr) {{
                local += exp((l - top) / temp);
            }}
        }}
        acc[lid] = local;
        workgroupBarrier();
        // Inclusive prefix sum (Hillis-Steele).
        for (var k = 1u; k < T; k <<= 1u) {{
            var add = 0.0;
            if (lid >= k) {{
                add = acc[lid - k];
            }}
            workgroupBarrier();
            acc[lid] += add;
            workgroupBarrier();
        }}
        let total = acc[T - 1u];
        let u = rand01(p[15], s) * total;
        let before = acc[lid] - local;
        if (u >= before && u < acc[lid] && local > 0.0) {{
            var run = before;
            var chosen = end;
            for (var i = start; i < end; i++) {{
                let l = logits[i];
                if (l >= thr) {{
                    run += exp((l - top) / temp);
                    if (u < run) {{
                        chosen = i;
                        break;
                    }}
                }}
            }}
            if (chosen < end) {{
                pick = chosen;
            }}
        }}
        workgroupBarrier();
    }}
    if (lid == 0u) {{
        let tok = pick;
        tokens[s + 1u] = tok;
        let g = s + 1u - p[0];
        margins[g] = top - second;
        status[1] = g + 1u;
        var done = s + 2u >= p[1];
        for (var e = 0u; e < min(p[3], {max_eog}u); e++) {{
            if (tok == p[4u + e]) {{
                done = true;
            }}
        }}
        if (done) {{
            status[0] = 1u;
        }}
    }}
}}
"#,
        t = REDUCE_THREADS,
        max_eog = MAX_EOG,
    )
}
