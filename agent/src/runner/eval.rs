//! The untimed quality pass: a variant runs over its model's eval set (and beside its base variant)
//! and its accuracy and fidelity are reported beside its latency.

use std::collections::HashMap;

use ort::session::Session;
use ort::value::DynValue;

use super::data::HostArray;
use super::inputs::{InputSpec, value_from_f64};
use crate::error::{AgentError, Result};

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
        return Err(AgentError::Task(format!("{what}: no inputs")));
    }
    for spec in specs {
        let arr = inputs.get(&spec.name).ok_or_else(|| {
            AgentError::Task(format!("{what}: no data for input '{}'", spec.name))
        })?;
        if arr.rows() != rows {
            return Err(AgentError::Task(format!(
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
            return Err(AgentError::Task(format!(
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

/// Seeded random batches compared with the base variant when there is no eval set.
const FIDELITY_RANDOM_BATCHES: u64 = 8;

/// The first output's values as f64 with its shape, and whether it holds integers (labels).
fn output_values(output: &DynValue) -> Result<(Vec<usize>, Vec<f64>, bool)> {
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
    Err(AgentError::Task(
        "quality: the first output is not a numeric tensor".into(),
    ))
}

/// The untimed quality pass: the variant (and, when it derives from one, the base variant) over the
/// eval set, or over seeded random inputs when there is none. Classification figures for outputs with
/// a class axis (or integer labels), regression errors for single-value outputs, fidelity to the base.
pub fn quality(
    session: &mut Session,
    mut base: Option<&mut Session>,
    specs: &[InputSpec],
    eval: Option<(&HashMap<String, HostArray>, &HostArray)>,
    config: &fleetbench_proto::v1::RunConfig,
) -> Result<Option<fleetbench_common::quality::Quality>> {
    use fleetbench_common::quality;
    if eval.is_none() && base.is_none() {
        return Ok(None);
    }
    let sets: Vec<Vec<DynValue>> = match eval {
        Some((inputs, labels)) => {
            let rows = check_rows("eval set", specs, inputs)?;
            if labels.rows() != rows {
                return Err(AgentError::Task(format!(
                    "eval set: {rows} inputs but {} labels",
                    labels.rows()
                )));
            }
            batches(specs, inputs, rows)?
                .into_iter()
                .map(|(_, _, v)| v)
                .collect()
        }
        None => (0..FIDELITY_RANDOM_BATCHES)
            .map(|i| {
                super::inputs::build_inputs(
                    specs,
                    config,
                    config.batch_size.max(1) as usize,
                    None,
                    config.seed.wrapping_add(1000 + i),
                )
            })
            .collect::<Result<_>>()?,
    };
    let (mut outs, mut base_outs) = (Vec::new(), Vec::new());
    let (mut width, mut integer) = (1usize, false);
    for values in &sets {
        let views: Vec<ort::session::SessionInputValue<'_>> =
            values.iter().map(Into::into).collect();
        let outputs = session.run(views.as_slice())?;
        let (shape, v, int) = output_values(&outputs[0])?;
        width = if shape.len() >= 2 {
            *shape.last().unwrap_or(&1)
        } else {
            1
        };
        integer = int;
        outs.extend(v);
        if let Some(b) = base.as_deref_mut() {
            let bo = b.run(views.as_slice())?;
            let (bshape, bv, _) = output_values(&bo[0])?;
            if bshape != shape {
                return Err(AgentError::Task(format!(
                    "quality: the variant's first output has shape {shape:?}, the base variant's {bshape:?}"
                )));
            }
            base_outs.extend(bv);
        }
    }
    let mut q = quality::Quality::default();
    if base.is_some() {
        q.fidelity = Some(quality::fidelity(&outs, &base_outs, width, eval.is_some()));
    }
    if let Some((_, labels)) = eval {
        let rows = outs.len() / width.max(1);
        if labels.shape.len() >= 2 {
            // Reference outputs of the output's own shape, row for row.
            if labels.data.len() != outs.len() {
                return Err(AgentError::Task(format!(
                    "eval set: the reference outputs hold {} values, the model gave {}",
                    labels.data.len(),
                    outs.len()
                )));
            }
            q.reference = Some(quality::fidelity(&outs, &labels.data, width, true));
        } else {
            let truth = &labels.data[..rows.min(labels.data.len())];
            if width > 1 || integer {
                let y: Vec<i64> = truth.iter().map(|v| v.round() as i64).collect();
                q.classification = Some(quality::classification(&outs, width, &y, 5));
            } else {
                q.regression = Some(quality::regression(&outs, truth));
            }
        }
    }
    Ok(Some(q))
}
