//! Tensors for a session: random inputs from a seed, built from the model's own input metadata (every
//! element type ONNX Runtime takes, several inputs, symbolic dimensions resolved from the batch size and
//! `--shape`), or real data from .npy/.npz files.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::{NpzReader, ReadNpyExt};

use crate::{Result, RuntimeError};

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

/// The bytes of array data an .npy header declares (shape times item size), and the header's length;
/// None when the header cannot be read this way (ndarray-npy then says what is wrong with it).
fn npy_declared(head: &[u8]) -> Option<(u64, u64)> {
    if head.len() < 10 || &head[..6] != b"\x93NUMPY" {
        return None;
    }
    let (len, start) = match head[6] {
        1 => (u16::from_le_bytes([head[8], head[9]]) as usize, 10),
        _ if head.len() >= 12 => (
            u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize,
            12,
        ),
        _ => return None,
    };
    let text = std::str::from_utf8(head.get(start..start + len)?).ok()?;
    let descr = text.split("'descr':").nth(1)?.split('\'').nth(1)?;
    let item: u64 = descr
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()?;
    let shape = text.split("'shape':").nth(1)?;
    let shape = &shape[shape.find('(')? + 1..shape.find(')')?];
    let mut bytes = item;
    for d in shape.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        bytes = bytes.checked_mul(d.parse().ok()?)?;
    }
    Some((bytes, (start + len) as u64))
}

/// Refuses an .npy whose header declares more data than `available` bytes could hold, before anything
/// is allocated for it: a hostile or damaged header must not make the reader ask for gigabytes.
fn check_npy(head: &[u8], available: u64, what: &str) -> Result<()> {
    if let Some((declared, header)) = npy_declared(head)
        && declared > available.saturating_sub(header)
    {
        return Err(RuntimeError::Data(format!(
            "{what}: its header declares {declared} bytes of data, more than the {} it holds",
            available.saturating_sub(header)
        )));
    }
    Ok(())
}

/// The first bytes of a reader, enough for an .npy header.
fn head_of(mut r: impl Read) -> Vec<u8> {
    let mut head = Vec::with_capacity(4096);
    let _ = r.by_ref().take(65_600).read_to_end(&mut head);
    head
}

/// Reads a .npy file of any numeric dtype.
pub fn read_npy(path: &Path) -> Result<HostArray> {
    let size = std::fs::metadata(path)
        .map_err(|e| RuntimeError::Data(format!("cannot open {}: {e}", path.display())))?
        .len();
    let head = head_of(
        File::open(path)
            .map_err(|e| RuntimeError::Data(format!("cannot open {}: {e}", path.display())))?,
    );
    check_npy(&head, size, &path.display().to_string())?;
    let open = || {
        File::open(path)
            .map(BufReader::new)
            .map_err(|e| RuntimeError::Data(format!("cannot open {}: {e}", path.display())))
    };
    first_readable!(|T| ArrayD::<T>::read_npy(open()?)).ok_or_else(|| {
        RuntimeError::Data(format!(
            "{} is not a .npy file of a numeric type (float, int, uint or bool)",
            path.display()
        ))
    })
}

/// Reads every array of a .npz file (numeric dtypes), keyed by name.
pub fn read_npz(path: &Path) -> Result<HashMap<String, HostArray>> {
    check_npz(path)?;
    let file = File::open(path)
        .map_err(|e| RuntimeError::Data(format!("cannot open {}: {e}", path.display())))?;
    let mut npz = NpzReader::new(file)
        .map_err(|e| RuntimeError::Data(format!("{} is not a .npz file: {e}", path.display())))?;
    let names = npz
        .names()
        .map_err(|e| RuntimeError::Data(format!("{}: {e}", path.display())))?;
    let mut out = HashMap::new();
    for name in names {
        let key = name.trim_end_matches(".npy").to_string();
        let arr = first_readable!(|T| npz.by_name::<ndarray::OwnedRepr<T>, ndarray::IxDyn>(&name))
            .ok_or_else(|| {
                RuntimeError::Data(format!(
                    "{}: array '{key}' has an unsupported dtype",
                    path.display()
                ))
            })?;
        out.insert(key, arr);
    }
    Ok(out)
}

/// Largest expansion deflate can achieve (about 1032:1): an entry that claims more than this over its
/// compressed size lies about its size.
const DEFLATE_MAX_RATIO: u64 = 1032;

/// Checks every entry of an .npz before its arrays are read: each header must declare no more data
/// than the entry holds, and no entry more than its compressed size could expand to.
fn check_npz(path: &Path) -> Result<()> {
    let bad = |e: &dyn std::fmt::Display| {
        RuntimeError::Data(format!("{} is not a .npz file: {e}", path.display()))
    };
    let file = File::open(path)
        .map_err(|e| RuntimeError::Data(format!("cannot open {}: {e}", path.display())))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(&e))?;
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| bad(&e))?;
        let name = format!("{}: array '{}'", path.display(), entry.name());
        let (size, packed) = (entry.size(), entry.compressed_size());
        if size
            > packed
                .saturating_mul(DEFLATE_MAX_RATIO)
                .saturating_add(1 << 20)
        {
            return Err(RuntimeError::Data(format!(
                "{name}: claims {size} bytes from {packed} compressed, more than compression allows"
            )));
        }
        check_npy(&head_of(entry), size, &name)?;
    }
    Ok(())
}

/// Reads a data file: .npz (arrays by input name) or .npy (one array, keyed by `single_name`).
pub fn read_arrays(path: &Path, single_name: &str) -> Result<HashMap<String, HostArray>> {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| RuntimeError::Data(format!("cannot read {}: {e}", path.display())))?;
    if &magic == b"PK\x03\x04" {
        read_npz(path)
    } else {
        Ok(HashMap::from([(single_name.to_string(), read_npy(path)?)]))
    }
}

#[cfg(test)]
mod decoding_outside_bytes {
    use proptest::prelude::*;

    /// A valid .npy of `values`, from ndarray-npy.
    fn npy(values: &[f32]) -> Vec<u8> {
        use ndarray_npy::WriteNpyExt;
        let mut out = Vec::new();
        ndarray::Array1::from(values.to_vec())
            .write_npy(&mut out)
            .unwrap();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes in a file, read as .npy or .npz: an error or arrays, never a panic.
        #[test]
        fn any_file_reads_or_fails_cleanly(
            bytes in proptest::collection::vec(any::<u8>(), 0..1024),
            zip in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("data");
            let mut bytes = bytes;
            if zip {
                // Make it look like an .npz so the zip reader is tried.
                bytes.splice(0..0, b"PK\x03\x04".iter().copied());
            }
            std::fs::write(&path, &bytes).unwrap();
            let _ = super::read_arrays(&path, "x");
        }

        /// A real .npy with bytes changed or cut short: the same.
        #[test]
        fn damaged_npy_reads_or_fails_cleanly(
            values in proptest::collection::vec(any::<f32>(), 0..64),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut bytes = npy(&values);
            for (at, b) in flips {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            let n = bytes.len();
            bytes.truncate(cut % (n + 1));
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.npy");
            std::fs::write(&path, &bytes).unwrap();
            let _ = super::read_arrays(&path, "x");
        }
    }
}

#[cfg(test)]
mod hostile_headers {
    #[test]
    fn a_header_that_declares_more_than_the_file_holds_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.npy");
        let mut header =
            "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000,), }".to_string();
        while !(header.len() + 11).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 16]);
        std::fs::write(&path, bytes).unwrap();
        let e = super::read_npy(&path).unwrap_err().to_string();
        assert!(e.contains("declares 400000000000 bytes"), "{e}");
    }
}
