//! Builds a session's input tensors from its own input metadata.

use std::collections::HashMap;

use fleetbench_common::domain::InputShape;
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::HostArray;
use crate::{Result, RuntimeError};

/// One graph input as the session declares it.
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// Name.
    pub name: String,
    /// Element type.
    pub ty: TensorElementType,
    /// Declared dims (-1 when symbolic).
    pub dims: Vec<i64>,
    /// Symbol names of symbolic dims.
    pub symbols: Vec<String>,
}

/// The tensor inputs of a session; non-tensor inputs are refused by name.
pub fn input_specs(session: &Session) -> Result<Vec<InputSpec>> {
    session
        .inputs()
        .iter()
        .map(|o| match o.dtype() {
            ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            } => Ok(InputSpec {
                name: o.name().to_string(),
                ty: *ty,
                dims: shape.iter().copied().collect(),
                symbols: dimension_symbols.iter().map(|s| s.to_string()).collect(),
            }),
            other => Err(RuntimeError::Data(format!(
                "input '{}' is {other}; fleetbench feeds tensor inputs only",
                o.name()
            ))),
        })
        .collect()
}

/// Concrete shape of an input for a batch size and the task's `--shape` overrides. Axis 0, when
/// symbolic, is the batch; any other symbolic axis must be given by `--shape`, or this fails naming it.
pub fn resolve_shape(spec: &InputSpec, shapes: &[InputShape], batch: usize) -> Result<Vec<i64>> {
    if let Some(given) = shapes.iter().find(|s| s.name == spec.name) {
        let fits = given.dims.len() == spec.dims.len()
            && given
                .dims
                .iter()
                .zip(&spec.dims)
                .all(|(g, d)| *d < 0 || g == d);
        if !fits {
            return Err(RuntimeError::Data(format!(
                "shape: --shape {}={} does not fit the declared shape {} of input '{}'",
                spec.name,
                given
                    .dims
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x"),
                render_dims(spec),
                spec.name
            )));
        }
        return Ok(given.dims.clone());
    }
    let mut out = Vec::with_capacity(spec.dims.len());
    for (axis, d) in spec.dims.iter().enumerate() {
        match (axis, *d) {
            (0, d) if d < 0 => out.push(batch as i64),
            (0, d) if batch > 1 && d != batch as i64 => {
                return Err(RuntimeError::Data(format!(
                    "batch_size: input '{}' has a fixed batch dimension of {d}; batch size {batch} is not possible",
                    spec.name
                )));
            }
            (_, d) if d < 0 => {
                let sym = spec
                    .symbols
                    .get(axis)
                    .filter(|s| !s.is_empty())
                    .map(String::as_str)
                    .unwrap_or("?");
                return Err(RuntimeError::Data(format!(
                    "shape: input '{}' has symbolic dimension '{sym}' at axis {axis} (declared {}); set it with --shape {}=...",
                    spec.name,
                    render_dims(spec),
                    spec.name
                )));
            }
            (_, d) => out.push(d),
        }
    }
    Ok(out)
}

fn render_dims(spec: &InputSpec) -> String {
    let parts: Vec<String> = spec
        .dims
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if *d < 0 {
                spec.symbols
                    .get(i)
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .unwrap_or("?".into())
            } else {
                d.to_string()
            }
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn count(shape: &[i64]) -> usize {
    shape.iter().map(|d| *d as usize).product()
}

fn tensor<T>(shape: Vec<i64>, data: Vec<T>) -> Result<DynValue>
where
    T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
{
    Ok(Tensor::from_array((shape, data))?.into_dyn())
}

/// A tensor of `ty` from f64 values (cast per element).
pub fn value_from_f64(
    name: &str,
    ty: TensorElementType,
    shape: Vec<i64>,
    v: &[f64],
) -> Result<DynValue> {
    use TensorElementType as E;
    match ty {
        E::Float32 => tensor(shape, v.iter().map(|x| *x as f32).collect()),
        E::Float64 => tensor(shape, v.to_vec()),
        E::Float16 => tensor(shape, v.iter().map(|x| half::f16::from_f64(*x)).collect()),
        E::Bfloat16 => tensor(shape, v.iter().map(|x| half::bf16::from_f64(*x)).collect()),
        E::Int8 => tensor(shape, v.iter().map(|x| *x as i8).collect()),
        E::Uint8 => tensor(shape, v.iter().map(|x| *x as u8).collect()),
        E::Int16 => tensor(shape, v.iter().map(|x| *x as i16).collect()),
        E::Uint16 => tensor(shape, v.iter().map(|x| *x as u16).collect()),
        E::Int32 => tensor(shape, v.iter().map(|x| *x as i32).collect()),
        E::Uint32 => tensor(shape, v.iter().map(|x| *x as u32).collect()),
        E::Int64 => tensor(shape, v.iter().map(|x| *x as i64).collect()),
        E::Uint64 => tensor(shape, v.iter().map(|x| *x as u64).collect()),
        E::Bool => tensor(shape, v.iter().map(|x| *x != 0.0).collect()),
        E::String => {
            let strings: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            Ok(Tensor::from_string_array((shape, strings.as_slice()))?.into_dyn())
        }
        other => Err(RuntimeError::Data(format!(
            "input '{name}' has element type {other}, which fleetbench cannot build yet"
        ))),
    }
}

/// Random values for one input: floats uniform in [0, 1), integers in [0, 10), booleans fair,
/// strings of digits. Deterministic for a seed.
fn random_values(ty: TensorElementType, n: usize, rng: &mut StdRng) -> Vec<f64> {
    use TensorElementType as E;
    match ty {
        E::Float32 | E::Float64 | E::Float16 | E::Bfloat16 => {
            (0..n).map(|_| rng.random::<f64>()).collect()
        }
        E::Bool => (0..n).map(|_| rng.random_range(0..2) as f64).collect(),
        _ => (0..n).map(|_| rng.random_range(0..10) as f64).collect(),
    }
}

/// Inputs for one query: from `data` (arrays by input name; the first `batch` rows) when given,
/// else random from `seed`. Returned in the session's input order.
pub fn build_inputs(
    specs: &[InputSpec],
    shapes: &[InputShape],
    batch: usize,
    data: Option<&HashMap<String, HostArray>>,
    seed: u64,
) -> Result<Vec<DynValue>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let value = match data {
            Some(arrays) => {
                let arr = arrays.get(&spec.name).ok_or_else(|| {
                    let mut names: Vec<&String> = arrays.keys().collect();
                    names.sort();
                    RuntimeError::Data(format!(
                        "input_data: no array named '{}' (arrays: {})",
                        spec.name,
                        names
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                let arr = if spec.dims.first().is_some_and(|d| *d < 0) {
                    if arr.rows() < batch {
                        return Err(RuntimeError::Data(format!(
                            "input_data: array '{}' has {} rows; batch size {batch} needs at least {batch}",
                            spec.name,
                            arr.rows()
                        )));
                    }
                    arr.slice_rows(0, batch)
                } else {
                    arr.clone()
                };
                let shape: Vec<i64> = arr.shape.iter().map(|d| *d as i64).collect();
                let fits = shape.len() == spec.dims.len()
                    && shape.iter().zip(&spec.dims).all(|(s, d)| *d < 0 || s == d);
                if !fits {
                    return Err(RuntimeError::Data(format!(
                        "input_data: array '{}' has shape {:?}, which does not fit the declared shape {}",
                        spec.name,
                        arr.shape,
                        render_dims(spec)
                    )));
                }
                value_from_f64(&spec.name, spec.ty, shape, &arr.data)?
            }
            None => {
                let shape = resolve_shape(spec, shapes, batch)?;
                let values = random_values(spec.ty, count(&shape), &mut rng);
                value_from_f64(&spec.name, spec.ty, shape, &values)?
            }
        };
        out.push(value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dims: &[i64], symbols: &[&str]) -> InputSpec {
        InputSpec {
            name: "x".into(),
            ty: TensorElementType::Float32,
            dims: dims.to_vec(),
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn batch_axis_comes_from_the_batch_size() {
        let c: Vec<InputShape> = Vec::new();
        assert_eq!(
            resolve_shape(&spec(&[-1, 64], &["batch", ""]), &c, 8).unwrap(),
            vec![8, 64]
        );
        assert_eq!(
            resolve_shape(&spec(&[1, 64], &["", ""]), &c, 1).unwrap(),
            vec![1, 64]
        );
        let err = resolve_shape(&spec(&[1, 64], &["", ""]), &c, 8)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fixed batch dimension") && err.contains("'x'"),
            "{err}"
        );
    }

    #[test]
    fn other_symbolic_axes_need_a_shape_and_errors_name_the_input() {
        let s = spec(&[-1, -1], &["batch", "seq"]);
        let err = resolve_shape(&s, &[], 1).unwrap_err().to_string();
        assert!(
            err.contains("'x'") && err.contains("'seq'") && err.contains("--shape x="),
            "{err}"
        );
        let c = vec![InputShape {
            name: "x".into(),
            dims: vec![2, 128],
        }];
        assert_eq!(resolve_shape(&s, &c, 1).unwrap(), vec![2, 128]);
        let bad = vec![InputShape {
            name: "x".into(),
            dims: vec![2],
        }];
        assert!(
            resolve_shape(&s, &bad, 1)
                .unwrap_err()
                .to_string()
                .contains("does not fit")
        );
    }
}
