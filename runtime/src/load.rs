//! Loading ONNX Runtime at run time (`load-dynamic`): each agent uses the build installed on its machine
//! (CPU, CUDA, OpenVINO ...) and reports its version, build and execution providers. A runtime older
//! than the API level fleetbench is compiled for is refused with a clear error.

use std::ffi::{CStr, c_char};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{Result, RuntimeError};

/// Oldest ONNX Runtime minor version accepted (ort's `api-17` feature: 1.17).
pub const MIN_ORT_MINOR: u32 = ort::MINOR_VERSION;

/// The loaded runtime.
pub struct Runtime {
    /// ONNX Runtime environment shared by all sessions of this process.
    pub env: ort::environment::Environment,
    /// Version string, e.g. "1.31.1".
    pub version: String,
    /// Build information string.
    pub build_info: String,
    /// Available execution providers, e.g. ["CPUExecutionProvider"].
    pub providers: Vec<String>,
    /// Library path.
    pub path: PathBuf,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Where the library is: the given path, else `ORT_DYLIB_PATH`.
pub fn resolve_path(explicit: Option<&Path>) -> Result<PathBuf> {
    let absolute = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    if let Some(p) = explicit.filter(|p| !p.as_os_str().is_empty()) {
        return Ok(absolute(p.to_path_buf()));
    }
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => Ok(absolute(PathBuf::from(p))),
        _ => Err(RuntimeError::Load(
            "ONNX Runtime library not set: pass --ort-lib PATH or set ORT_DYLIB_PATH to libonnxruntime.so \
             (scripts/dev.sh setup installs one under .venv from the PyPI wheel onnxruntime==1.31.1)"
                .into(),
        )),
    }
}

/// The library of the onnxruntime wheel in `root/.venv` (where `scripts/dev.sh setup` installs the PyPI
/// wheel onnxruntime==1.31.1), if there is one.
pub fn find_in_venv(root: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(root.join(".venv/lib")).ok()?.flatten() {
        let Ok(files) = std::fs::read_dir(e.path().join("site-packages/onnxruntime/capi")) else {
            continue;
        };
        for f in files.flatten() {
            if f.file_name()
                .to_string_lossy()
                .starts_with("libonnxruntime.so.")
            {
                return Some(f.path());
            }
        }
    }
    None
}

/// Reads the version string of an ONNX Runtime library without initialising it.
pub fn library_version(path: &Path) -> Result<String> {
    if !path.exists() {
        return Err(RuntimeError::Load(format!(
            "ONNX Runtime library {} does not exist",
            path.display()
        )));
    }
    // SAFETY: loading a shared library runs its initialisers; this is the library the operator named.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        RuntimeError::Load(format!(
            "cannot load ONNX Runtime from {}: {e}",
            path.display()
        ))
    })?;
    type GetApiBase = unsafe extern "C" fn() -> *const ort::sys::OrtApiBase;
    // SAFETY: OrtGetApiBase has this signature in every ONNX Runtime release.
    let get: libloading::Symbol<GetApiBase> =
        unsafe { lib.get(b"OrtGetApiBase") }.map_err(|_| {
            RuntimeError::Load(format!(
                "{} is not an ONNX Runtime library (no OrtGetApiBase)",
                path.display()
            ))
        })?;
    // SAFETY: the API base is a static table owned by the library, valid while it is loaded.
    let version = unsafe {
        let base = get();
        if base.is_null() {
            return Err(RuntimeError::Load(format!(
                "{}: OrtGetApiBase returned null",
                path.display()
            )));
        }
        let s: *const c_char = ((*base).GetVersionString)();
        CStr::from_ptr(s).to_string_lossy().into_owned()
    };
    Ok(version)
}

/// Checks a version string against the oldest runtime accepted.
pub fn check_version(version: &str, path: &Path) -> Result<()> {
    let minor = version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(m) if version.starts_with("1.") && m >= MIN_ORT_MINOR => Ok(()),
        _ => Err(RuntimeError::Load(format!(
            "ONNX Runtime {version} at {} is too old: fleetbench-agent needs 1.{MIN_ORT_MINOR} or newer",
            path.display()
        ))),
    }
}

fn available_providers() -> Vec<String> {
    let api = ort::api();
    let mut list: *mut *mut c_char = std::ptr::null_mut();
    let mut n: std::ffi::c_int = 0;
    // SAFETY: standard C API call; the list is released below with the matching call.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut n) };
    if !status.0.is_null() || list.is_null() {
        return vec!["CPUExecutionProvider".to_string()];
    }
    let out = (0..n as isize)
        // SAFETY: ONNX Runtime returned `n` valid C strings.
        .map(|i| {
            unsafe { CStr::from_ptr(*list.offset(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // SAFETY: releasing what GetAvailableProviders allocated.
    unsafe {
        let _ = (api.ReleaseAvailableProviders)(list, n);
    }
    out
}

/// Loads ONNX Runtime once per process and returns it; later calls return the same runtime.
pub fn load(explicit: Option<&Path>) -> Result<&'static Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let path = resolve_path(explicit)?;
    let version = library_version(&path)?;
    check_version(&version, &path)?;
    let builder = ort::init_from(&path).map_err(|e| {
        RuntimeError::Load(format!(
            "cannot load ONNX Runtime from {}: {e}",
            path.display()
        ))
    })?;
    let env = builder.with_name("fleetbench-agent").build().map_err(|e| {
        RuntimeError::Load(format!("cannot create the ONNX Runtime environment: {e}"))
    })?;
    let rt = Runtime {
        env,
        version,
        build_info: ort::info().to_string(),
        providers: available_providers(),
        path,
    };
    Ok(RUNTIME.get_or_init(|| rt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_runtimes_are_refused_by_name() {
        let p = Path::new("/opt/ort/libonnxruntime.so");
        assert!(check_version("1.31.1", p).is_ok());
        let err = check_version("1.12.0", p).unwrap_err().to_string();
        assert!(
            err.contains("1.12.0") && err.contains("too old") && err.contains("/opt/ort"),
            "{err}"
        );
        assert!(check_version("garbage", p).is_err());
    }

    #[test]
    fn a_file_that_is_not_the_runtime_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("libonnxruntime.so");
        std::fs::write(&f, b"not a library").unwrap();
        let err = library_version(&f).unwrap_err().to_string();
        assert!(err.contains("cannot load ONNX Runtime"), "{err}");
        let err = library_version(&dir.path().join("missing.so"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
