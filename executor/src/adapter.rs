//! Adapter discovery: enumerate adapters on all backends, choose one, describe it as a
//! [`GpuProfile`].

use hashgrid_protocol::{Backend, Benchmark, DeviceType, GpuLimits, GpuProfile};

use super::ExecError;

/// Which adapter to use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The best one: discrete > integrated > virtual > CPU, ties broken by enumeration order.
    #[default]
    Best,
    /// The adapter at this index in [`list_adapters`].
    Index(usize),
    /// The first adapter whose name contains this text (case-insensitive).
    Name(String),
}

/// Blocks the current thread on a future. wgpu's adapter, device and error-scope futures are
/// ready at once on native backends, so this polls without a runtime: it works from any thread,
/// a tokio worker included (a nested tokio runtime would panic there).
pub(crate) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, ExecError> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Ok(v);
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// The adapters on the primary backends (Vulkan, Metal, DX12), or, only when there are none,
/// on OpenGL. Probing GL means probing EGL and a display, which is slow and noisy on headless
/// machines that have a perfectly good Vulkan driver (lavapipe included).
fn enumerate() -> Result<Vec<wgpu::Adapter>, ExecError> {
    let primary =
        block_on(instance(wgpu::Backends::PRIMARY).enumerate_adapters(wgpu::Backends::PRIMARY))?;
    if !primary.is_empty() {
        return Ok(primary);
    }
    block_on(instance(wgpu::Backends::GL).enumerate_adapters(wgpu::Backends::GL))
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// Every adapter on the primary backends (Vulkan, Metal, DX12), in enumeration order; the
/// OpenGL adapters when there are none.
pub fn list_adapters() -> Result<Vec<wgpu::AdapterInfo>, ExecError> {
    Ok(enumerate()?.iter().map(|a| a.get_info()).collect())
}

/// Opens the adapter `choice` names.
pub(crate) fn select_adapter(choice: &AdapterChoice) -> Result<wgpu::Adapter, ExecError> {
    let mut adapters = enumerate()?;
    if adapters.is_empty() {
        return Err(ExecError::NoAdapter(String::new()));
    }
    let i = match choice {
        AdapterChoice::Best => adapters
            .iter()
            .enumerate()
            .min_by_key(|(i, a)| (rank(a.get_info().device_type), *i))
            .map_or(0, |(i, _)| i),
        AdapterChoice::Index(i) => {
            if *i >= adapters.len() {
                return Err(ExecError::NoAdapter(format!(
                    " at index {i} (there are {}; see `list_adapters`)",
                    adapters.len()
                )));
            }
            *i
        }
        AdapterChoice::Name(n) => {
            let n = n.to_lowercase();
            adapters
                .iter()
                .position(|a| a.get_info().name.to_lowercase().contains(&n))
                .ok_or_else(|| ExecError::NoAdapter(format!(" whose name contains {n:?}")))?
        }
    };
    Ok(adapters.swap_remove(i))
}

/// The limits of `adapter` that jobs care about.
pub(crate) fn gpu_limits(l: &wgpu::Limits) -> GpuLimits {
    GpuLimits {
        max_buffer_size: l.max_buffer_size,
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_uniform_buffer_binding_size: l.max_uniform_buffer_binding_size,
        max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
        max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
        max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
    }
}

/// Describes `adapter`. wgpu reports no VRAM size, so `memory_bytes` is `memory_override` when
/// the site configures one, else the adapter's `max_buffer_size` (a lower bound on what one job
/// can use).
pub(crate) fn profile(
    adapter: &wgpu::Adapter,
    memory_override: Option<u64>,
    bench: Benchmark,
) -> GpuProfile {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let backend = match info.backend {
        wgpu::Backend::Vulkan => Backend::Vulkan,
        wgpu::Backend::Metal => Backend::Metal,
        wgpu::Backend::Dx12 => Backend::Dx12,
        wgpu::Backend::Gl => Backend::Gl,
        wgpu::Backend::BrowserWebGpu => Backend::BrowserWebGpu,
        _ => Backend::Other,
    };
    let device_type = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => DeviceType::DiscreteGpu,
        wgpu::DeviceType::IntegratedGpu => DeviceType::IntegratedGpu,
        wgpu::DeviceType::VirtualGpu => DeviceType::VirtualGpu,
        wgpu::DeviceType::Cpu => DeviceType::Cpu,
        wgpu::DeviceType::Other => DeviceType::Other,
    };
    GpuProfile {
        name: info.name.clone(),
        vendor: info.vendor,
        device: info.device,
        backend,
        device_type,
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        memory_bytes: memory_override.unwrap_or(limits.max_buffer_size),
        limits: gpu_limits(&limits),
        bench,
    }
}
