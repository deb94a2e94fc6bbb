//! The untimed accuracy pass: a variant runs over its model's eval set and its top-1 accuracy is
//! reported beside its latency.

use std::collections::HashMap;

use ort::session::Session;
use ort::value::DynValue;

use super::data::HostArray;
use super::inputs::{InputSpec, value_from_f64};
use crate::error::{AgentError, Result};

/// Rows per eval batch when the batch axis is symbolic.
const EVAL_BATCH: usize = 128;

/// Predicted class per row of a model output: the output itself when it holds integer labels, else the
/// argmax over its last axis.
pub fn predictions(output: &DynValue) -> Result<Vec<i64>> {
    if let Ok(a) = output.try_extract_array::<i64>() {
        return Ok(a.iter().copied().collect());
    }
    if let Ok(a) = output.try_extract_array::<i32>() {
        return Ok(a.iter().map(|v| *v as i64).collect());
    }
    let (shape, values): (Vec<usize>, Vec<f64>) = if let Ok(a) = output.try_extract_array::<f32>() {
        (a.shape().to_vec(), a.iter().map(|v| *v as f64).collect())
    } else if let Ok(a) = output.try_extract_array::<f64>() {
        (a.shape().to_vec(), a.iter().copied().collect())
    } else if let Ok(a) = output.try_extract_array::<half::f16>() {
        (a.shape().to_vec(), a.iter().map(|v| v.to_f64()).collect())
    } else {
        return Err(AgentError::Task(
            "eval: the first output is neither class scores nor labels".into(),
        ));
    };
    let classes = *shape.last().unwrap_or(&1);
    if shape.len() < 2 || classes == 0 {
        return Err(AgentError::Task(format!(
            "eval: the first output has shape {shape:?}, not [batch, classes]"
        )));
    }
    Ok(values
        .chunks(classes)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0usize, f64::NEG_INFINITY), |best, (i, v)| {
                    if *v > best.1 { (i, *v) } else { best }
                })
                .0 as i64
        })
        .collect())
}

/// Runs the eval set through the session; returns (top-1 accuracy, samples).
pub fn top1_accuracy(
    session: &mut Session,
    specs: &[InputSpec],
    inputs: &HashMap<String, HostArray>,
    labels: &HostArray,
) -> Result<(f64, u64)> {
    let rows = inputs.values().next().map(HostArray::rows).unwrap_or(0);
    if rows == 0 {
        return Err(AgentError::Task("eval set: no inputs".into()));
    }
    if labels.data.len() != rows {
        return Err(AgentError::Task(format!(
            "eval set: {rows} inputs but {} labels",
            labels.data.len()
        )));
    }
    for spec in specs {
        let arr = inputs.get(&spec.name).ok_or_else(|| {
            AgentError::Task(format!("eval set: no data for input '{}'", spec.name))
        })?;
        if arr.rows() != rows {
            return Err(AgentError::Task(format!(
                "eval set: input '{}' has {} rows, expected {rows}",
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
                "eval set: input '{}' rows have shape {:?}, the model declares {:?}",
                spec.name,
                &arr.shape[1.min(arr.shape.len())..],
                &spec.dims[1.min(spec.dims.len())..]
            )));
        }
    }
    let batch = match specs.first().and_then(|s| s.dims.first()) {
        Some(d) if *d > 0 => *d as usize,
        _ => EVAL_BATCH,
    };
    let mut correct = 0u64;
    let mut start = 0;
    while start < rows {
        let n = batch.min(rows - start);
        if specs
            .first()
            .and_then(|s| s.dims.first())
            .is_some_and(|d| *d > 0 && *d as usize != n)
        {
            break; // a fixed batch axis cannot take the remainder
        }
        let mut values = Vec::with_capacity(specs.len());
        for spec in specs {
            let chunk = inputs[&spec.name].slice_rows(start, n);
            let shape = chunk.shape.iter().map(|d| *d as i64).collect();
            values.push(value_from_f64(&spec.name, spec.ty, shape, &chunk.data)?);
        }
        let views: Vec<ort::session::SessionInputValue<'_>> =
            values.iter().map(Into::into).collect();
        let outputs = session.run(views.as_slice())?;
        let predicted = predictions(&outputs[0])?;
        if predicted.len() != n {
            return Err(AgentError::Task(format!(
                "eval: the model gave {} predictions for {n} rows",
                predicted.len()
            )));
        }
        for (i, p) in predicted.iter().enumerate() {
            if *p == labels.data[start + i].round() as i64 {
                correct += 1;
            }
        }
        start += n;
    }
    if start == 0 {
        return Err(AgentError::Task(
            "eval set: no rows could be evaluated".into(),
        ));
    }
    Ok((correct as f64 / start as f64, start as u64))
}
