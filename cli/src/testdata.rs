//! ONNX test_data_set folders (`input_N.pb`, `output_N.pb`, as in the onnx package's backend test
//! data and the model zoo) as eval sets: their inputs become an .npz keyed by the model's input names,
//! and `output_0.pb` becomes the reference outputs the agent compares each variant's outputs with.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use fleetbench_common::proto::onnx::TensorProto;
use ndarray::{ArrayD, Axis, IxDyn};
use prost::Message;

/// The test_data_set folders at `dir`: itself when it holds `input_0.pb`, else its `test_data_set_*`
/// subfolders in order.
pub fn sets(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join("input_0.pb").exists() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("test_data_set_"))
                && p.join("input_0.pb").exists()
        })
        .collect();
    out.sort();
    if out.is_empty() {
        bail!(
            "{}: no input_0.pb and no test_data_set_* folder holding one",
            dir.display()
        );
    }
    Ok(out)
}

/// A tensor's values as f64 with its shape.
fn read_tensor(path: &Path) -> Result<ArrayD<f64>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let t = TensorProto::decode(bytes.as_slice())
        .map_err(|e| anyhow!("{} is not an ONNX TensorProto: {e}", path.display()))?;
    let raw = t.raw_data.as_deref().filter(|r| !r.is_empty());
    let values: Vec<f64> = match (t.data_type.unwrap_or(0), raw) {
        (1, Some(r)) => r
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        (1, None) => t.float_data.iter().map(|v| *v as f64).collect(),
        (11, Some(r)) => r
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        (11, None) => t.double_data.clone(),
        (7, Some(r)) => r
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        (7, None) => t.int64_data.iter().map(|v| *v as f64).collect(),
        (6, Some(r)) => r
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        (6, None) => t.int32_data.iter().map(|v| *v as f64).collect(),
        (other, _) => bail!(
            "{}: element type {other} is not supported (float, double, int32, int64)",
            path.display()
        ),
    };
    let shape: Vec<usize> = t.dims.iter().map(|d| *d as usize).collect();
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| {
        anyhow!(
            "{}: {} values for shape {shape:?}: {e}",
            path.display(),
            t.dims.iter().product::<i64>()
        )
    })
}

/// Reads `file` in every set and joins them along the first axis.
fn joined(sets: &[PathBuf], file: &str) -> Result<ArrayD<f64>> {
    let parts = sets
        .iter()
        .map(|s| read_tensor(&s.join(file)))
        .collect::<Result<Vec<_>>>()?;
    let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
    ndarray::concatenate(Axis(0), &views)
        .map_err(|e| anyhow!("{file}: the test data sets disagree on its shape: {e}"))
}

/// Converts the test data sets at `dir` for a model with `inputs` (name, element type name as
/// fleetbench_common::onnx reports it) into
/// `inputs.npz` and `reference-outputs.npy` under `out`; returns their paths.
pub fn convert(dir: &Path, inputs: &[(String, String)], out: &Path) -> Result<(PathBuf, PathBuf)> {
    let sets = sets(dir)?;
    let npz_path = out.join("inputs.npz");
    let mut npz = ndarray_npy::NpzWriter::new(
        std::fs::File::create(&npz_path)
            .with_context(|| format!("cannot write {}", npz_path.display()))?,
    );
    for (i, (name, ty)) in inputs.iter().enumerate() {
        let file = format!("input_{i}.pb");
        if !sets[0].join(&file).exists() {
            bail!(
                "{}: no {file} for the model's input '{name}'",
                sets[0].display()
            );
        }
        let a = joined(&sets, &file)?;
        let written = match ty.as_str() {
            "int64" => npz.add_array(name.as_str(), &a.mapv(|v| v as i64)),
            "int32" => npz.add_array(name.as_str(), &a.mapv(|v| v as i32)),
            "float64" => npz.add_array(name.as_str(), &a),
            _ => npz.add_array(name.as_str(), &a.mapv(|v| v as f32)),
        };
        written.map_err(|e| anyhow!("cannot write {}: {e}", npz_path.display()))?;
    }
    npz.finish()
        .map_err(|e| anyhow!("cannot write {}: {e}", npz_path.display()))?;
    let reference = joined(&sets, "output_0.pb")?;
    let ref_path = out.join("reference-outputs.npy");
    ndarray_npy::write_npy(&ref_path, &reference.mapv(|v| v as f32))
        .map_err(|e| anyhow!("cannot write {}: {e}", ref_path.display()))?;
    Ok((npz_path, ref_path))
}
