//! The untimed quality pass: a variant runs over its model's eval set (and beside its base variant)
//! and its accuracy and fidelity are reported beside its latency.

use std::collections::HashMap;

use ort::session::Session;
use ort::value::DynValue;

use fleetbench_common::domain::RunConfig;
use fleetbench_runtime::batches::{batches, check_rows, output_values};
use fleetbench_runtime::data::HostArray;
use fleetbench_runtime::inputs::{self, InputSpec};

use crate::error::{AgentError, Result};

/// Seeded random batches compared with the base variant when there is no eval set.
const FIDELITY_RANDOM_BATCHES: u64 = 8;

/// The untimed quality pass: the variant (and, when it derives from one, the base variant) over the
/// eval set, or over seeded random inputs when there is none. Classification figures for outputs with
/// a class axis (or integer labels), regression errors for single-value outputs, fidelity to the base.
pub fn quality(
    session: &mut Session,
    mut base: Option<&mut Session>,
    specs: &[InputSpec],
    eval: Option<(&HashMap<String, HostArray>, &HostArray)>,
    config: &RunConfig,
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
                inputs::build_inputs(
                    specs,
                    &config.shapes,
                    config.batch_size.max(1) as usize,
                    None,
                    config.seed.wrapping_add(1000 + i),
                )
            })
            .collect::<std::result::Result<_, _>>()?,
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
