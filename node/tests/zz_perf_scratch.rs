#![allow(clippy::unwrap_used, missing_docs)]
use hashgrid_node::executor::{ExecConfig, Executor};
use hashgrid_protocol::*;
use std::collections::BTreeMap;

fn job(
    wgsl: &str,
    bufs: Vec<(u64, Option<Vec<u8>>)>,
    groups: u32,
    iters: u32,
) -> (JobSpec, BTreeMap<ContentId, Vec<u8>>) {
    let mut inputs = BTreeMap::new();
    let mut buffers = Vec::new();
    for (i, (size, data)) in bufs.into_iter().enumerate() {
        let init = match data {
            Some(d) => {
                let id = ContentId::of(&d);
                inputs.insert(id, d);
                BufferInit::Blob(id)
            }
            None => BufferInit::Zeroed,
        };
        buffers.push(BufferSpec {
            name: format!("b{i}"),
            size,
            init,
            output: i == 2,
        });
    }
    buffers.push(BufferSpec {
        name: "step".into(),
        size: 16,
        init: BufferInit::Zeroed,
        output: false,
    });
    let n = buffers.len() as u32;
    let spec = JobSpec {
        name: "x".into(),
        buffers,
        shaders: vec![ShaderSource {
            name: "k.wgsl".into(),
            wgsl: wgsl.into(),
        }],
        passes: vec![PassSpec {
            shader: 0,
            entry: "main".into(),
            workgroups: [groups, 1, 1],
            bindings: (0..n - 1).map(|i| Binding::whole(i, i)).collect(),
        }],
        loops: vec![LoopSpec {
            first: 0,
            len: 1,
            max_iters: iters,
            counter: Some(n - 1),
            stop: None,
            check_every: iters,
            stream: vec![],
        }],
    };
    (spec, inputs)
}

#[test]
#[ignore]
fn perf_variants() {
    let exec = Executor::start(ExecConfig::default()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows = 49152u32;
    let cols = 576u32;
    let run = |name: &str, wgsl: &str, w: Vec<u8>, groups: u32| {
        let x: Vec<u8> = (0..cols)
            .flat_map(|i| (i as f32 * 0.001).to_le_bytes())
            .collect();
        let (s, i) = job(
            wgsl,
            vec![
                (w.len() as u64, Some(w)),
                (x.len() as u64, Some(x)),
                (rows as u64 * 4, None),
                (
                    16,
                    Some(
                        vec![
                            rows.to_le_bytes(),
                            cols.to_le_bytes(),
                            0u32.to_le_bytes(),
                            0u32.to_le_bytes(),
                        ]
                        .concat(),
                    ),
                ),
            ],
            groups,
            8,
        );
        let out = rt.block_on(exec.run("t", s, i)).unwrap();
        eprintln!(
            "{name}: {:.2} ms per dispatch",
            out.passes.last().unwrap().gpu_ms / 8.0
        );
    };
    let wf: Vec<u8> = (0..rows as usize * cols as usize)
        .flat_map(|i| ((i % 7) as f32).to_le_bytes())
        .collect();
    run(
        "E5 x loads only, early return",
        "
@group(0) @binding(0) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> xv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let r = g.x; if (r >= p[0]) { return; }
  let n = p[1] / 4u; var acc = vec4<f32>(0.0);
  for (var i = 0u; i < n; i++) { acc += xv[i]; }
  y[r] = acc.x + acc.y + acc.z + acc.w; }",
        wf.clone(),
        rows / 64,
    );
    run(
        "E5b x loads only, no early return, const trip",
        "
@group(0) @binding(0) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> xv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let r = g.x;
  var acc = vec4<f32>(0.0);
  for (var i = 0u; i < 144u; i++) { acc += xv[i]; }
  if (r < p[0]) { y[r] = acc.x + acc.y + acc.z + acc.w; } }",
        wf.clone(),
        rows / 64,
    );
    run(
        "E5c x loads, no early return, n from p",
        "
@group(0) @binding(0) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> xv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let r = g.x; let n = p[1] / 4u;
  var acc = vec4<f32>(0.0);
  for (var i = 0u; i < n; i++) { acc += xv[i]; }
  if (r < p[0]) { y[r] = acc.x + acc.y + acc.z + acc.w; } }",
        wf.clone(),
        rows / 64,
    );
    run(
        "E1b f32 dot, no early return",
        "
@group(0) @binding(0) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> xv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let r = min(g.x, p[0] - 1u); let n = p[1] / 4u;
  var acc = 0.0;
  for (var i = 0u; i < n; i++) { acc += dot(w[r * n + i], xv[i]); }
  if (g.x < p[0]) { y[r] = acc; } }",
        wf.clone(),
        rows / 64,
    );
    run(
        "E1 f32 dot, early return",
        "
@group(0) @binding(0) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> xv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> p: array<u32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let r = g.x; if (r >= p[0]) { return; } let n = p[1] / 4u;
  var acc = 0.0;
  for (var i = 0u; i < n; i++) { acc += dot(w[r * n + i], xv[i]); }
  y[r] = acc; }",
        wf.clone(),
        rows / 64,
    );
    exec.shutdown();
}
