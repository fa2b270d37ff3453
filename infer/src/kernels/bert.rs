//! The encoder kernels of BERT sentence embeddings (all-MiniLM-L6-v2 and its family): the
//! embedding sum, layer norm with a residual, bidirectional attention over the sentence, GELU,
//! and mean pooling with L2 normalisation. Linear layers are the decoder's `matvec` kernels
//! with a token dimension.

/// Threads per workgroup of the row-wise kernels (layer norm, attention: one workgroup per
/// token or per head and token).
pub const THREADS: u32 = 64;

/// `bert_embed`: `x[t] = word[ids[t]] + position[t] + token_type[0]`;
/// `p = [d_model, n_tokens, vocab]`; dispatch `(ceil(d / 64), n_tokens)`.
pub fn embed() -> String {
    format!(
        r#"// bert_embed (hashgrid-infer).
@group(0) @binding(0) var<storage, read> word: array<f32>;
@group(0) @binding(1) var<storage, read> pos: array<f32>;
@group(0) @binding(2) var<storage, read> ttype: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;
@group(0) @binding(5) var<storage, read> p: array<u32>;
@compute @workgroup_size({t})
fn bert_embed(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let d = p[0];
    let j = gid.x;
    let t = gid.y;
    if (j >= d || t >= p[1]) {{
        return;
    }}
    let id = min(ids[t], p[2] - 1u);
    x[t * d + j] = word[id * d + j] + pos[t * d + j] + ttype[j];
}}
"#,
        t = THREADS
    )
}

/// `layernorm`: `x[t] = LN(x[t] + r[t]) · g + b`, in place, one workgroup per token;
/// `p = [d, eps as f32 bits]`.
pub fn layernorm() -> String {
    format!(
        r#"// layernorm with residual (hashgrid-infer).
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> r: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> p: array<u32>;
var<workgroup> red: array<f32, {t}>;
fn reduce(lid: u32, v: f32) -> f32 {{
    red[lid] = v;
    workgroupBarrier();
    for (var k = {half}u; k > 0u; k >>= 1u) {{
        if (lid < k) {{
            red[lid] += red[lid + k];
        }}
        workgroupBarrier();
    }}
    let s = red[0];
    workgroupBarrier();
    return s;
}}
@compute @workgroup_size({t})
fn layernorm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
    let d = p[0];
    let base = wid.x * d;
    var s = 0.0;
    for (var j = lid; j < d; j += {t}u) {{
        s += x[base + j] + r[base + j];
    }}
    let mean = reduce(lid, s) / f32(d);
    var v = 0.0;
    for (var j = lid; j < d; j += {t}u) {{
        let a = x[base + j] + r[base + j] - mean;
        v += a * a;
    }}
    let inv = 1.0 / sqrt(reduce(lid, v) / f32(d) + bitcast<f32>(p[1]));
    for (var j = lid; j < d; j += {t}u) {{
        x[base + j] = (x[base + j] + r[base + j] - mean) * inv * g[j] + b[j];
    }}
}}
"#,
        t = THREADS,
        half = THREADS / 2
    )
}

/// `bert_attention`: one workgroup per (head, query token); every token sees every token of
/// the sentence. `qkv` holds per token `[q | k | v]` (`3 · d` floats); `p = [n_heads,
/// head_dim, n_tokens, scale as f32 bits]`; `sc` is scratch of `n_heads · n · n` floats.
pub fn attention() -> String {
    format!(
        r#"// bert_attention (hashgrid-infer).
@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read_write> sc: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
var<workgroup> red: array<f32, {t}>;
@compute @workgroup_size({t})
fn bert_attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
    let nh = p[0];
    let hd = p[1];
    let n = p[2];
    let scale = bitcast<f32>(p[3]);
    let d = nh * hd;
    let h = min(wid.x, nh - 1u);
    let t = min(wid.y, n - 1u);
    let q = t * 3u * d + h * hd;
    let sb = (h * n + t) * n;
    var mx = -3.0e38;
    for (var s = lid; s < n; s += {t}u) {{
        let k = s * 3u * d + d + h * hd;
        var acc = 0.0;
        for (var i = 0u; i < hd; i++) {{
            acc += qkv[q + i] * qkv[k + i];
        }}
        acc *= scale;
        sc[sb + s] = acc;
        mx = max(mx, acc);
    }}
    red[lid] = mx;
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
    for (var s = lid; s < n; s += {t}u) {{
        let e = exp(sc[sb + s] - m);
        sc[sb + s] = e;
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
    for (var i = lid; i < hd; i += {t}u) {{
        var acc = 0.0;
        for (var s = 0u; s < n; s++) {{
            acc += sc[sb + s] * qkv[s * 3u * d + 2u * d + h * hd + i];
        }}
        out[t * d + h * hd + i] = acc * inv;
    }}
}}
"#,
        t = THREADS,
        half = THREADS / 2
    )
}

/// `gelu`: the exact (erf) GELU in place, `p = [n]`. WGSL has no `erf`: Abramowitz and Stegun
/// 7.1.26 (absolute error under 1.5e-7) stands in.
pub fn gelu() -> String {
    format!(
        r#"// gelu (hashgrid-infer).
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> p: array<u32>;
fn erf(v: f32) -> f32 {{
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-a * a);
    return select(-y, y, v >= 0.0);
}}
@compute @workgroup_size({t})
fn gelu(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let i = gid.y * 65535u * {t}u + gid.x;
    if (i >= p[0]) {{
        return;
    }}
    let v = x[i];
    x[i] = 0.5 * v * (1.0 + erf(v * 0.70710678118654752));
}}
"#,
        t = THREADS
    )
}

/// `mean_pool`: `out = normalize(mean_t x[t])` (L2, with sentence-transformers' 1e-12 floor);
/// `p = [d, n_tokens]`; one workgroup.
pub fn mean_pool() -> String {
    format!(
        r#"// mean_pool (hashgrid-infer).
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> p: array<u32>;
var<workgroup> red: array<f32, {t}>;
@compute @workgroup_size({t})
fn mean_pool(@builtin(local_invocation_index) lid: u32) {{
    let d = p[0];
    let n = p[1];
    var ss = 0.0;
    for (var j = lid; j < d; j += {t}u) {{
        var s = 0.0;
        for (var t = 0u; t < n; t++) {{
            s += x[t * d + j];
        }}
        let m = s / f32(n);
        out[j] = m;
        ss += m * m;
    }}
    red[lid] = ss;
    storageBarrier();
    workgroupBarrier();
    for (var k = {half}u; k > 0u; k >>= 1u) {{
        if (lid < k) {{
            red[lid] += red[lid + k];
        }}
        workgroupBarrier();
    }}
    let inv = 1.0 / max(sqrt(red[0]), 1e-12);
    for (var j = lid; j < d; j += {t}u) {{
        out[j] = out[j] * inv;
    }}
}}
"#,
        t = THREADS,
        half = THREADS / 2
    )
}
