//! Data sets as batches of ONNX Runtime values, and model outputs read back as numbers: what the
//! agent's quality pass and the CLI's calibration both need.

use std::collections::HashMap;

use ort::value::DynValue;

use crate::data::HostArray;
use crate::inputs::{InputSpec, value_from_f64};
use crate::{Result, RuntimeError};

/// Rows per eval batch when the batch axis is symbolic.
const EVAL_BATCH: usize = 128;

/// Checks that a data set holds every input of the model, with the same number of rows and rows of the
/// declared shape; returns the number of rows. `what` names the set in errors.
pub fn check_rows(
    what: &str,
    specs: &[InputSpec],
    inputs: &HashMap<String, HostArray>,
) -> Result<usize> {
    let rows = inputs.values().next().map(HostArray::rows).unwrap_or(0);
    if rows == 0 {
        return Err(RuntimeError::Data(format!("{what}: no inputs")));
    }
    for spec in specs {
        let arr = inputs.get(&spec.name).ok_or_else(|| {
            RuntimeError::Data(format!("{what}: no data for input '{}'", spec.name))
        })?;
        if arr.rows() != rows {
            return Err(RuntimeError::Data(format!(
                "{what}: input '{}' has {} rows, expected {rows}",
                spec.name,
                arr.rows()
            )));
        }
        let fits = arr.shape.len() == spec.dims.len()
            && arr
                .shape
                .iter()
                .zip(&spec.dims)
                .skip(1)
                .all(|(a, d)| *d < 0 || *a as i64 == *d);
        if !fits {
            return Err(RuntimeError::Data(format!(
                "{what}: input '{}' rows have shape {:?}, the model declares {:?}",
                spec.name,
                &arr.shape[1.min(arr.shape.len())..],
                &spec.dims[1.min(spec.dims.len())..]
            )));
        }
    }
    Ok(rows)
}

/// The data set cut into batches of ort values: (first row, rows, values). The batch is the model's
/// fixed batch size, or 128 rows when the batch axis is symbolic; a remainder a fixed batch axis cannot
/// take is left out.
pub fn batches(
    specs: &[InputSpec],
    inputs: &HashMap<String, HostArray>,
    rows: usize,
) -> Result<Vec<(usize, usize, Vec<DynValue>)>> {
    let fixed = specs
        .first()
        .and_then(|s| s.dims.first())
        .filter(|d| **d > 0)
        .map(|d| *d as usize);
    let batch = fixed.unwrap_or(EVAL_BATCH);
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows {
        let n = batch.min(rows - start);
        if fixed.is_some_and(|f| f != n) {
            break;
        }
        let mut values = Vec::with_capacity(specs.len());
        for spec in specs {
            let chunk = inputs[&spec.name].slice_rows(start, n);
            let shape = chunk.shape.iter().map(|d| *d as i64).collect();
            values.push(value_from_f64(&spec.name, spec.ty, shape, &chunk.data)?);
        }
        out.push((start, n, values));
        start += n;
    }
    Ok(out)
}

/// The first output's values as f64 with its shape, and whether it holds integers (labels).
pub fn output_values(output: &DynValue) -> Result<(Vec<usize>, Vec<f64>, bool)> {
    if let Ok(a) = output.try_extract_array::<f32>() {
        return Ok((
            a.shape().to_vec(),
            a.iter().map(|v| *v as f64).collect(),
            false,
        ));
    }
    if let Ok(a) = output.try_extract_array::<f64>() {
        return Ok((a.shape().to_vec(), a.iter().copied().collect(), false));
    }
    if let Ok(a) = output.try_extract_array::<half::f16>() {
        return Ok((
            a.shape().to_vec(),
            a.iter().map(|v| v.to_f64()).collect(),
            false,
        ));
    }
    if let Ok(a) = output.try_extract_array::<i64>() {
        return Ok((
            a.shape().to_vec(),
            a.iter().map(|v| *v as f64).collect(),
            true,
        ));
    }
    if let Ok(a) = output.try_extract_array::<i32>() {
        return Ok((
            a.shape().to_vec(),
            a.iter().map(|v| *v as f64).collect(),
            true,
        ));
    }
    Err(RuntimeError::Data(
        "quality: the first output is not a numeric tensor".into(),
    ))
}
