// C = A (M x K) * B (K x N), row-major f32, 16x16 tiles staged in workgroup memory.
// dims = (M, N, K, unused).
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<uniform> dims: vec4<u32>;

const TILE: u32 = 16u;
var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) gid: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let m = dims.x;
    let n = dims.y;
    let k = dims.z;
    let row = gid.y;
    let col = gid.x;
    var acc = 0.0;
    let tiles = (k + TILE - 1u) / TILE;
    for (var t = 0u; t < tiles; t++) {
        let ak = t * TILE + lid.x;
        let bk = t * TILE + lid.y;
        ta[lid.y][lid.x] = select(0.0, a[row * k + ak], row < m && ak < k);
        tb[lid.y][lid.x] = select(0.0, b[bk * n + col], bk < k && col < n);
        workgroupBarrier();
        for (var i = 0u; i < TILE; i++) {
            acc = fma(ta[lid.y][i], tb[i][lid.x], acc);
        }
        workgroupBarrier();
    }
    if (row < m && col < n) {
        c[row * n + col] = acc;
    }
}
