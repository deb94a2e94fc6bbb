//! Calibration for int8-static: the model with every tensor to calibrate exposed as an extra output
//! (the caller runs it over its calibration set with ONNX Runtime), and the ranges read from what it
//! saw, by min-max or by percentile.

use std::collections::HashMap;

use fleetbench_common::proto::onnx::{ModelProto, ValueInfoProto};
use serde::{Deserialize, Serialize};

use crate::graph::{self, Names, node};
use crate::{Calibration, OptError};

/// How a range is read from observed values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum CalibrationMethod {
    /// Smallest and largest value seen.
    MinMax,
    /// The given percentile at each end (e.g. 99.99: the 0.01th and 99.99th percentiles), which
    /// ignores rare outliers.
    Percentile {
        /// In (50, 100].
        percentile: f64,
    },
}

impl CalibrationMethod {
    /// From the command line.
    pub fn parse(name: &str, percentile: Option<f64>) -> Result<Self, OptError> {
        match name {
            "minmax" => {
                if percentile.is_some() {
                    return Err(OptError::Param {
                        field: "--percentile",
                        reason: "applies to --calibration-method percentile only".into(),
                    });
                }
                Ok(CalibrationMethod::MinMax)
            }
            "percentile" => {
                let p = percentile.unwrap_or(99.99);
                if !(p > 50.0 && p <= 100.0) {
                    return Err(OptError::Param {
                        field: "--percentile",
                        reason: format!("{p} is outside (50, 100]"),
                    });
                }
                Ok(CalibrationMethod::Percentile { percentile: p })
            }
            other => Err(OptError::Param {
                field: "--calibration-method",
                reason: format!("unknown method '{other}' (expected minmax or percentile)"),
            }),
        }
    }
}

/// The model with each tensor to calibrate copied to an extra graph output; returns it and the
/// (tensor, output) pairs.
pub fn calibration_model(
    original: &ModelProto,
) -> Result<(ModelProto, Vec<(String, String)>), OptError> {
    let mut model = original.clone();
    let tensors = crate::quant::calibration_tensors(&model);
    if tensors.is_empty() {
        return Err(OptError::Model(
            "int8-static found nothing to calibrate (no MatMul, Gemm or Conv with constant float weights)"
                .into(),
        ));
    }
    let g = graph::graph_mut(&mut model)?;
    let mut names = Names::of(g);
    let mut pairs = Vec::new();
    for t in tensors {
        let out = names.fresh(&format!("{}_calibration", t.replace(['/', ':'], "_")));
        g.node.push(node(
            "Identity",
            names.fresh(&format!("{out}_node")),
            &[&t],
            &[&out],
        ));
        g.output.push(ValueInfoProto {
            name: Some(out.clone()),
            ..Default::default()
        });
        pairs.push((t, out));
    }
    Ok((model, pairs))
}

/// Values kept per tensor for percentiles.
const KEEP_PER_BATCH: usize = 65_536;

/// Accumulates what calibration batches show.
#[derive(Debug)]
pub struct RangeCollector {
    method: CalibrationMethod,
    minmax: HashMap<String, (f32, f32)>,
    kept: HashMap<String, Vec<f32>>,
    samples: u64,
}

impl RangeCollector {
    /// An empty collector.
    pub fn new(method: CalibrationMethod) -> Self {
        RangeCollector {
            method,
            minmax: HashMap::new(),
            kept: HashMap::new(),
            samples: 0,
        }
    }

    /// Counts calibration samples (rows).
    pub fn add_samples(&mut self, n: u64) {
        self.samples += n;
    }

    /// Takes in one batch's values of a tensor.
    pub fn observe(&mut self, tensor: &str, values: &[f32]) {
        let e = self
            .minmax
            .entry(tensor.to_string())
            .or_insert((f32::INFINITY, f32::NEG_INFINITY));
        for v in values.iter().filter(|v| v.is_finite()) {
            e.0 = e.0.min(*v);
            e.1 = e.1.max(*v);
        }
        if let CalibrationMethod::Percentile { .. } = self.method {
            let step = values.len().div_ceil(KEEP_PER_BATCH).max(1);
            self.kept
                .entry(tensor.to_string())
                .or_default()
                .extend(values.iter().step_by(step).filter(|v| v.is_finite()));
        }
    }

    /// The ranges.
    pub fn finish(mut self) -> Result<Calibration, OptError> {
        if self.samples == 0 {
            return Err(OptError::Calibration("the calibration set is empty".into()));
        }
        let mut ranges = HashMap::new();
        for (t, (lo, hi)) in self.minmax {
            if lo > hi {
                continue; // nothing finite seen
            }
            let r = match self.method {
                CalibrationMethod::MinMax => (lo, hi),
                CalibrationMethod::Percentile { percentile } => {
                    let v = self.kept.get_mut(&t).expect("kept with minmax");
                    v.sort_by(|a, b| a.total_cmp(b));
                    let at = |q: f64| v[((q / 100.0) * (v.len() - 1) as f64).round() as usize];
                    (at(100.0 - percentile), at(percentile))
                }
            };
            ranges.insert(t, r);
        }
        Ok(Calibration {
            ranges,
            samples: self.samples,
        })
    }
}
