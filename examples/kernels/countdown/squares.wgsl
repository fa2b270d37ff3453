@group(0) @binding(0) var<storage, read> step: array<u32>;
@group(0) @binding(1) var<storage, read_write> squares: array<u32>;
@group(0) @binding(2) var<storage, read_write> stop: array<u32>;

@compute @workgroup_size(1)
fn main() {
    let s = step[0];
    if (stop[0] != 0u) {
        return;
    }
    squares[s] = s * s;
    if (s == 9u) {
        stop[0] = 1u;
    }
}
