// Deterministic integer kernel: 16 rounds of a PCG-style permutation (LCG step, then
// xorshift-multiply output) over each u32, so results must match a CPU bit for bit.
@group(0) @binding(0) var<storage, read> seeds: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

const ROUNDS: u32 = 16u;

fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= arrayLength(&out)) {
        return;
    }
    var h = seeds[i] ^ i;
    for (var r = 0u; r < ROUNDS; r++) {
        h = pcg(h ^ r);
    }
    out[i] = h;
}
