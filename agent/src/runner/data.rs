//! Tensors for a session: random inputs from a seed, built from the model's own input metadata (every
//! element type ONNX Runtime takes, several inputs, symbolic dimensions resolved from the batch size and
//! `--shape`), or real data from .npy/.npz files.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::{NpzReader, ReadNpyExt};

use crate::error::{AgentError, Result};

/// A host-side array of numbers (any numeric dtype, held as f64) with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostArray {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f64>,
}

impl HostArray {
    /// Number of rows (first axis; 1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Rows `[start, start + n)` along the first axis.
    pub fn slice_rows(&self, start: usize, n: usize) -> HostArray {
        let row: usize = self.shape.iter().skip(1).product();
        let mut shape = self.shape.clone();
        if shape.is_empty() {
            return self.clone();
        }
        shape[0] = n;
        HostArray {
            shape,
            data: self.data[start * row..(start + n) * row].to_vec(),
        }
    }
}

/// Numbers that convert to f64 (ints up to 2^53 exactly).
trait ToF64: Copy {
    fn to_f64(self) -> f64;
}
macro_rules! to_f64 {
    ($($t:ty),+) => { $(impl ToF64 for $t { fn to_f64(self) -> f64 { self as f64 } })+ };
}
to_f64!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);
impl ToF64 for bool {
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
}

fn host<T: ToF64>(a: ArrayD<T>) -> HostArray {
    HostArray {
        shape: a.shape().to_vec(),
        data: a.iter().map(|v| v.to_f64()).collect(),
    }
}

/// Tries `$read` with `$t` bound to each numeric element type in turn; the first that parses wins.
macro_rules! first_readable {
    (|$t:ident| $read:expr) => {
        first_readable!(@each $t, $read, f32, f64, i64, i32, i16, i8, u8, u16, u32, u64, bool)
    };
    (@each $t:ident, $read:expr, $($ty:ty),+) => {{
        let mut out: Option<HostArray> = None;
        $(
            if out.is_none() {
                #[allow(dead_code)]
                type $t = $ty;
                if let Ok(a) = $read {
                    out = Some(host::<$ty>(a));
                }
            }
        )+
        out
    }};
}

/// Reads a .npy file of any numeric dtype.
pub fn read_npy(path: &Path) -> Result<HostArray> {
    let open = || {
        File::open(path)
            .map(BufReader::new)
            .map_err(|e| AgentError::Task(format!("cannot open {}: {e}", path.display())))
    };
    first_readable!(|T| ArrayD::<T>::read_npy(open()?)).ok_or_else(|| {
        AgentError::Task(format!(
            "{} is not a .npy file of a numeric type (float, int, uint or bool)",
            path.display()
        ))
    })
}

/// Reads every array of a .npz file (numeric dtypes), keyed by name.
pub fn read_npz(path: &Path) -> Result<HashMap<String, HostArray>> {
    let file = File::open(path)
        .map_err(|e| AgentError::Task(format!("cannot open {}: {e}", path.display())))?;
    let mut npz = NpzReader::new(file)
        .map_err(|e| AgentError::Task(format!("{} is not a .npz file: {e}", path.display())))?;
    let names = npz
        .names()
        .map_err(|e| AgentError::Task(format!("{}: {e}", path.display())))?;
    let mut out = HashMap::new();
    for name in names {
        let key = name.trim_end_matches(".npy").to_string();
        let arr = first_readable!(|T| npz.by_name::<ndarray::OwnedRepr<T>, ndarray::IxDyn>(&name))
            .ok_or_else(|| {
                AgentError::Task(format!(
                    "{}: array '{key}' has an unsupported dtype",
                    path.display()
                ))
            })?;
        out.insert(key, arr);
    }
    Ok(out)
}

/// Reads a data file: .npz (arrays by input name) or .npy (one array, keyed by `single_name`).
pub fn read_arrays(path: &Path, single_name: &str) -> Result<HashMap<String, HostArray>> {
    let mut magic = [0u8; 4];
    use std::io::Read;
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| AgentError::Task(format!("cannot read {}: {e}", path.display())))?;
    if &magic == b"PK\x03\x04" {
        read_npz(path)
    } else {
        Ok(HashMap::from([(single_name.to_string(), read_npy(path)?)]))
    }
}
