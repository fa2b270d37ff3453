// Row softmax of a rows x 64 f32 matrix, one workgroup per row, numerically stable: each
// row's maximum is subtracted before exp.
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;

const COLS: u32 = 64u;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(workgroup_id) wid: vec3<u32>) {
    let i = wid.x * COLS + lid.x;
    let v = x[i];
    red[lid.x] = v;
    for (var s = 32u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid.x < s) {
            red[lid.x] = max(red[lid.x], red[lid.x + s]);
        }
    }
    workgroupBarrier();
    let m = red[0];
    workgroupBarrier();
    let e = exp(v - m);
    red[lid.x] = e;
    for (var s = 32u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid.x < s) {
            red[lid.x] += red[lid.x + s];
        }
    }
    workgroupBarrier();
    y[i] = e / red[0];
}
