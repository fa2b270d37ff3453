// Sum of f32s in two passes: `partial` sums 256 elements per workgroup with a tree in
// workgroup memory; `combine` sums the partial sums the same way in one workgroup.
@group(0) @binding(0) var<storage, read> input: array<f32>;
@group(0) @binding(1) var<storage, read_write> output: array<f32>;

var<workgroup> scratch: array<f32, 256>;

fn tree(lid: u32) {
    for (var s = 128u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            scratch[lid] += scratch[lid + s];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn partial(@builtin(global_invocation_id) gid: vec3<u32>,
           @builtin(local_invocation_id) lid: vec3<u32>,
           @builtin(workgroup_id) wid: vec3<u32>) {
    let i = gid.x;
    scratch[lid.x] = select(0.0, input[i], i < arrayLength(&input));
    tree(lid.x);
    if (lid.x == 0u) {
        output[wid.x] = scratch[0];
    }
}

@compute @workgroup_size(256)
fn combine(@builtin(local_invocation_id) lid: vec3<u32>) {
    var acc = 0.0;
    for (var i = lid.x; i < arrayLength(&input); i += 256u) {
        acc += input[i];
    }
    scratch[lid.x] = acc;
    tree(lid.x);
    if (lid.x == 0u) {
        output[0] = scratch[0];
    }
}
