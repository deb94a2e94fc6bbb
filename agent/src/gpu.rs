//! NVIDIA GPUs through NVML, loaded at run time (`libnvidia-ml.so.1`). A machine without an NVIDIA
//! driver simply has no GPUs; that is not an error.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

#[repr(C)]
#[derive(Default)]
struct NvmlUtilization {
    gpu: c_uint,
    memory: c_uint,
}

type Device = *mut c_void;

struct Nvml {
    _lib: libloading::Library,
    device_count: unsafe extern "C" fn(*mut c_uint) -> c_int,
    device_by_index: unsafe extern "C" fn(c_uint, *mut Device) -> c_int,
    device_name: unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int,
    memory_info: unsafe extern "C" fn(Device, *mut NvmlMemory) -> c_int,
    utilization: unsafe extern "C" fn(Device, *mut NvmlUtilization) -> c_int,
}

// SAFETY: NVML is thread-safe; the function pointers stay valid while `_lib` is loaded (for the process).
unsafe impl Send for Nvml {}
// SAFETY: as above.
unsafe impl Sync for Nvml {}

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| {
        // SAFETY: loading the NVIDIA management library and resolving documented symbols.
        unsafe {
            let lib = libloading::Library::new("libnvidia-ml.so.1").ok()?;
            let init: libloading::Symbol<unsafe extern "C" fn() -> c_int> =
                lib.get(b"nvmlInit_v2").ok()?;
            if init() != 0 {
                return None;
            }
            let nvml = Nvml {
                device_count: *lib.get(b"nvmlDeviceGetCount_v2").ok()?,
                device_by_index: *lib.get(b"nvmlDeviceGetHandleByIndex_v2").ok()?,
                device_name: *lib.get(b"nvmlDeviceGetName").ok()?,
                memory_info: *lib.get(b"nvmlDeviceGetMemoryInfo").ok()?,
                utilization: *lib.get(b"nvmlDeviceGetUtilizationRates").ok()?,
                _lib: lib,
            };
            Some(nvml)
        }
    })
    .as_ref()
}

/// One GPU's identity and current use.
#[derive(Debug, Clone, Default)]
pub struct GpuState {
    /// Product name.
    pub name: String,
    /// Total memory, bytes.
    pub memory_total: u64,
    /// Memory in use, bytes.
    pub memory_used: u64,
    /// Utilisation percent over NVML's last sample period.
    pub utilization_pct: f64,
}

/// All NVIDIA GPUs, empty when there is no driver.
pub fn gpus() -> Vec<GpuState> {
    let Some(n) = nvml() else { return Vec::new() };
    let mut count: c_uint = 0;
    // SAFETY: NVML calls with valid out-pointers.
    unsafe {
        if (n.device_count)(&mut count) != 0 {
            return Vec::new();
        }
        (0..count)
            .filter_map(|i| {
                let mut dev: Device = std::ptr::null_mut();
                if (n.device_by_index)(i, &mut dev) != 0 {
                    return None;
                }
                let mut name = [0 as c_char; 96];
                let _ = (n.device_name)(dev, name.as_mut_ptr(), name.len() as c_uint);
                let mut mem = NvmlMemory::default();
                let _ = (n.memory_info)(dev, &mut mem);
                let mut util = NvmlUtilization::default();
                let _ = (n.utilization)(dev, &mut util);
                Some(GpuState {
                    name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                    memory_total: mem.total,
                    memory_used: mem.used,
                    utilization_pct: util.gpu as f64,
                })
            })
            .collect()
    }
}
