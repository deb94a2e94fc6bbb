//! Decoder-only language models: detecting their inputs and outputs, and generating tokens.
//!
//! The convention is the one Hugging Face Optimum and onnxruntime-genai export: `input_ids`, optional
//! `attention_mask` and `position_ids`, and `past_key_values.{i}.key` / `.value` of shape
//! `[batch, heads, past, head_dim]` in; `logits` `[batch, seq, vocab]` and `present.{i}.key` / `.value`
//! out. A model without `past_key_values` inputs recomputes the whole sequence at every step.
//!
//! Generation runs the prompt in one call (prefill), then one call per new token, handing each call's
//! present tensors to the next call as its past without copying them: the output values are moved
//! into the next call's inputs.

use std::time::Instant;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use crate::{Result, RuntimeError};

/// A graph input or output as the model declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct IoSpec {
    /// Name.
    pub name: String,
    /// Element type; None for a non-tensor value.
    pub ty: Option<TensorElementType>,
    /// Declared dims (-1 when symbolic).
    pub dims: Vec<i64>,
}

/// What each of the session's inputs is, in the session's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    InputIds,
    AttentionMask,
    PositionIds,
    PastKey(usize),
    PastValue(usize),
}

/// A decoder's inputs and outputs, as detected.
#[derive(Debug, Clone)]
pub struct DecoderIo {
    slots: Vec<Slot>,
    /// Output positions of `logits`, and of each layer's present key and value.
    logits: usize,
    present: Vec<(usize, usize)>,
    /// Element type of the KV cache.
    pub kv_type: TensorElementType,
    /// Heads in the KV cache (key-value heads, fewer than query heads under grouped-query attention).
    pub kv_heads: i64,
    /// Size of one head.
    pub head_dim: i64,
    /// Vocabulary size when the model states it (the last dim of `logits`).
    pub vocab: Option<i64>,
    /// Longest sequence the model takes, from its `max_position_embeddings` metadata when present.
    pub max_positions: Option<i64>,
}

/// `past_key_values.{i}.key` → (i, true); `.value` → (i, false).
fn kv_name(name: &str, prefix: &str) -> Option<(usize, bool)> {
    let rest = name.strip_prefix(prefix)?;
    let (i, kind) = rest.split_once('.')?;
    let i = i.parse().ok()?;
    match kind {
        "key" => Some((i, true)),
        "value" => Some((i, false)),
        _ => None,
    }
}

impl DecoderIo {
    /// Detects the convention in a model's declared inputs and outputs. The error lists everything
    /// that did not match, by name.
    pub fn from_specs(inputs: &[IoSpec], outputs: &[IoSpec]) -> Result<Self> {
        let mut problems = Vec::new();
        let mut slots = Vec::with_capacity(inputs.len());
        let mut kv: Vec<&IoSpec> = Vec::new();
        let mut layers = 0usize;
        for i in inputs {
            let slot = match i.name.as_str() {
                "input_ids" => Slot::InputIds,
                "attention_mask" => Slot::AttentionMask,
                "position_ids" => Slot::PositionIds,
                n => match kv_name(n, "past_key_values.") {
                    Some((l, key)) => {
                        layers = layers.max(l + 1);
                        kv.push(i);
                        if key {
                            Slot::PastKey(l)
                        } else {
                            Slot::PastValue(l)
                        }
                    }
                    None => {
                        problems.push(format!(
                            "input '{n}' is none of input_ids, attention_mask, position_ids, \
                             past_key_values.N.key/value"
                        ));
                        continue;
                    }
                },
            };
            slots.push(slot);
        }
        for (name, int) in [
            ("input_ids", true),
            ("attention_mask", true),
            ("position_ids", true),
        ] {
            if let Some(i) = inputs.iter().find(|i| i.name == name)
                && int
                && !matches!(
                    i.ty,
                    Some(TensorElementType::Int64 | TensorElementType::Int32)
                )
            {
                problems.push(format!("input '{name}' is {:?}, not int64 or int32", i.ty));
            }
        }
        if !slots.contains(&Slot::InputIds) {
            problems.push("there is no 'input_ids' input".into());
        }
        let find_out = |name: &str| outputs.iter().position(|o| o.name == name);
        let logits = find_out("logits");
        if logits.is_none() {
            let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
            problems.push(format!(
                "there is no 'logits' output (outputs: {})",
                names.join(", ")
            ));
        }
        let vocab = logits
            .and_then(|l| outputs[l].dims.last().copied())
            .filter(|d| *d > 0);
        // Every layer needs a past key and value, each paired with a present of the same shape.
        let mut present = Vec::with_capacity(layers);
        let (mut kv_heads, mut head_dim, mut kv_type) = (0, 0, None);
        for l in 0..layers {
            let mut pair = [0usize; 2];
            for (j, kind) in ["key", "value"].iter().enumerate() {
                let past = format!("past_key_values.{l}.{kind}");
                let name = format!("present.{l}.{kind}");
                let Some(spec) = inputs.iter().find(|i| i.name == past) else {
                    problems.push(format!(
                        "input '{past}' is missing (layer {l} has only one of key and value)"
                    ));
                    continue;
                };
                match find_out(&name) {
                    Some(o) => {
                        pair[j] = o;
                        let out = &outputs[o];
                        let fits = out.dims.len() == 4
                            && spec.dims.len() == 4
                            && out.dims[1] == spec.dims[1]
                            && out.dims[3] == spec.dims[3]
                            && out.ty == spec.ty;
                        if !fits {
                            problems.push(format!(
                                "output '{name}' {:?} {:?} does not pair with input '{past}' {:?} {:?} \
                                 (both [batch, heads, sequence, head_dim] of one element type)",
                                out.ty, out.dims, spec.ty, spec.dims
                            ));
                        }
                    }
                    None => {
                        problems.push(format!("input '{past}' has no output '{name}' to feed it"))
                    }
                }
                if spec.dims.len() != 4 || spec.dims[1] <= 0 || spec.dims[3] <= 0 {
                    problems.push(format!(
                        "input '{past}' has shape {:?}; expected [batch, heads, past, head_dim] with \
                         heads and head_dim fixed",
                        spec.dims
                    ));
                } else if kv_heads == 0 {
                    (kv_heads, head_dim, kv_type) = (spec.dims[1], spec.dims[3], spec.ty);
                } else if (spec.dims[1], spec.dims[3], spec.ty) != (kv_heads, head_dim, kv_type) {
                    problems.push(format!(
                        "input '{past}' has shape {:?} {:?}, unlike layer 0's [_, {kv_heads}, _, {head_dim}] {kv_type:?}",
                        spec.ty, spec.dims
                    ));
                }
            }
            present.push((pair[0], pair[1]));
        }
        let kv_type = kv_type.unwrap_or(TensorElementType::Float32);
        if layers > 0
            && !matches!(
                kv_type,
                TensorElementType::Float32 | TensorElementType::Float16
            )
        {
            problems.push(format!(
                "the KV cache is {kv_type}; fleetbench feeds float32 and float16 caches"
            ));
        }
        if !problems.is_empty() {
            return Err(RuntimeError::Data(format!(
                "not a decoder in the Optimum/onnxruntime-genai convention: {}",
                problems.join("; ")
            )));
        }
        Ok(DecoderIo {
            slots,
            logits: logits.unwrap_or_default(),
            present,
            kv_type,
            kv_heads,
            head_dim,
            vocab,
            max_positions: None,
        })
    }

    /// Detects the convention in a session's model.
    pub fn detect(session: &Session) -> Result<Self> {
        let spec = |name: &str, dtype: &ValueType| match dtype {
            ValueType::Tensor { ty, shape, .. } => IoSpec {
                name: name.to_string(),
                ty: Some(*ty),
                dims: shape.iter().copied().collect(),
            },
            _ => IoSpec {
                name: name.to_string(),
                ty: None,
                dims: vec![],
            },
        };
        let inputs: Vec<IoSpec> = session
            .inputs()
            .iter()
            .map(|i| spec(i.name(), i.dtype()))
            .collect();
        let outputs: Vec<IoSpec> = session
            .outputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect();
        let mut io = Self::from_specs(&inputs, &outputs)?;
        io.max_positions = session
            .metadata()
            .ok()
            .and_then(|m| m.custom("max_position_embeddings"))
            .and_then(|v| v.trim().parse().ok())
            .filter(|v: &i64| *v > 0);
        Ok(io)
    }

    /// Layers with a KV cache (0: the model recomputes the whole sequence each step).
    pub fn layers(&self) -> usize {
        self.present.len()
    }

    /// Bytes of KV cache one token takes (key and value, every layer).
    pub fn kv_bytes_per_token(&self) -> u64 {
        let elem = if self.kv_type == TensorElementType::Float16 {
            2
        } else {
            4
        };
        2 * self.layers() as u64 * (self.kv_heads * self.head_dim) as u64 * elem
    }
}

/// One request's tokens and when each was ready.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// The new tokens, as many as asked (end-of-sequence tokens are not special).
    pub tokens: Vec<i64>,
    /// Nanoseconds from the start of the prefill call to each new token (the first is TTFT).
    pub token_ready_ns: Vec<u64>,
    /// Nanoseconds spent inside ONNX Runtime's Run calls of the decode steps (every call after the
    /// prefill), shared by every row of a batch: the rest of each step is the loop's own overhead.
    pub decode_run_ns: u64,
}

fn ints(ty: TensorElementType, shape: Vec<i64>, v: Vec<i64>) -> Result<DynValue> {
    Ok(match ty {
        TensorElementType::Int32 => {
            Tensor::from_array((shape, v.into_iter().map(|x| x as i32).collect::<Vec<_>>()))?
                .into_dyn()
        }
        _ => Tensor::from_array((shape, v))?.into_dyn(),
    })
}

/// How the next token is picked from the last row of logits.
#[derive(Debug, Clone)]
pub enum Pick {
    /// The most likely token (argmax).
    Greedy,
    /// Sampled from softmax(logits / temperature), among the `top_k` most likely (0: all), with a
    /// seeded generator: the same seed picks the same tokens.
    Sample {
        /// Temperature, > 0.
        temperature: f32,
        /// Keep the k most likely tokens; 0 keeps all.
        top_k: usize,
        /// The request's generator.
        rng: Box<rand::rngs::StdRng>,
    },
}

impl Pick {
    /// A seeded sampler, or greedy when `temperature` is 0.
    pub fn new(temperature: f64, top_k: u32, seed: u64) -> Self {
        use rand::SeedableRng;
        if temperature > 0.0 {
            Pick::Sample {
                temperature: temperature as f32,
                top_k: top_k as usize,
                rng: Box::new(rand::rngs::StdRng::seed_from_u64(seed)),
            }
        } else {
            Pick::Greedy
        }
    }

    /// The token picked from one row of logits.
    pub fn pick(&mut self, row: &[f32]) -> i64 {
        match self {
            Pick::Greedy => argmax(row) as i64,
            Pick::Sample {
                temperature,
                top_k,
                rng,
            } => {
                use rand::Rng;
                let mut idx: Vec<usize> = (0..row.len()).collect();
                if *top_k > 0 && *top_k < row.len() {
                    idx.select_nth_unstable_by(*top_k - 1, |a, b| row[*b].total_cmp(&row[*a]));
                    idx.truncate(*top_k);
                }
                let max = idx
                    .iter()
                    .map(|&i| row[i])
                    .fold(f32::NEG_INFINITY, f32::max);
                let weights: Vec<f64> = idx
                    .iter()
                    .map(|&i| (((row[i] - max) / *temperature) as f64).exp())
                    .collect();
                let total: f64 = weights.iter().sum();
                let mut u = rng.random::<f64>() * total;
                for (w, &i) in weights.iter().zip(&idx) {
                    if u < *w {
                        return i as i64;
                    }
                    u -= w;
                }
                *idx.last().unwrap_or(&0) as i64
            }
        }
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Every row of `logits` as float32, and the row width (the vocabulary).
fn all_logits(logits: &DynValue) -> Result<(Vec<f32>, usize)> {
    if let Ok((shape, data)) = logits.try_extract_tensor::<f32>() {
        return Ok((data.to_vec(), *shape.last().unwrap_or(&0) as usize));
    }
    let (shape, data) = logits.try_extract_tensor::<half::f16>()?;
    Ok((
        data.iter().map(|x| x.to_f32()).collect(),
        *shape.last().unwrap_or(&0) as usize,
    ))
}

/// The token `pick` takes from the last position of row `row` of `logits` [rows, seq, vocab]
/// (float32 or float16).
fn pick_row(logits: &DynValue, row: usize, rows: usize, pick: &mut Pick) -> Result<i64> {
    let last = |len: usize, vocab: usize| {
        let per_row = len / rows.max(1);
        let end = (row + 1) * per_row;
        end.saturating_sub(vocab)..end
    };
    if let Ok((shape, data)) = logits.try_extract_tensor::<f32>() {
        let vocab = *shape.last().unwrap_or(&0) as usize;
        return Ok(pick.pick(&data[last(data.len(), vocab)]));
    }
    let (shape, data) = logits.try_extract_tensor::<half::f16>()?;
    let vocab = *shape.last().unwrap_or(&0) as usize;
    let row: Vec<f32> = data[last(data.len(), vocab)]
        .iter()
        .map(|x| x.to_f32())
        .collect();
    Ok(pick.pick(&row))
}

/// Generates `new_tokens` tokens after `prompt` greedily, for one request (batch 1).
pub fn generate(
    session: &mut Session,
    io: &DecoderIo,
    prompt: &[i64],
    new_tokens: usize,
) -> Result<Generation> {
    generate_with(session, io, prompt, new_tokens, &mut Pick::Greedy)
}

/// Generates `new_tokens` tokens after `prompt`, each taken by `pick`, for one request (batch 1).
pub fn generate_with(
    session: &mut Session,
    io: &DecoderIo,
    prompt: &[i64],
    new_tokens: usize,
    pick: &mut Pick,
) -> Result<Generation> {
    generate_inner(session, io, prompt, new_tokens, pick, None)
}

/// The logits of every position of `tokens` from one call (teacher forcing: each position sees the
/// true tokens before it), row-major `[tokens.len(), vocab]` as float32, and the vocabulary size.
pub fn prefill_logits(
    session: &mut Session,
    io: &DecoderIo,
    tokens: &[i64],
) -> Result<(Vec<f32>, usize)> {
    let mut sink = (Vec::new(), 0usize);
    generate_inner(session, io, tokens, 1, &mut Pick::Greedy, Some(&mut sink))?;
    Ok(sink)
}

fn generate_inner(
    session: &mut Session,
    io: &DecoderIo,
    prompt: &[i64],
    new_tokens: usize,
    pick: &mut Pick,
    prefill: Option<&mut (Vec<f32>, usize)>,
) -> Result<Generation> {
    let mut out = generate_rows(
        session,
        io,
        &[prompt],
        &[new_tokens],
        std::slice::from_mut(pick),
        prefill,
    )?;
    Ok(out.pop().unwrap_or_default())
}

/// Generates for a static batch of requests in one sequence of calls: prompts left-padded to the
/// longest under the attention mask (position ids count each row's own tokens), one new token per row
/// per call until the longest output is done. Row `r` makes `new_tokens[r]` tokens, picked by
/// `picks[r]`; its tokens after that are computed (the batch runs on) but not returned.
pub fn generate_batch(
    session: &mut Session,
    io: &DecoderIo,
    prompts: &[&[i64]],
    new_tokens: &[usize],
    picks: &mut [Pick],
) -> Result<Vec<Generation>> {
    generate_rows(session, io, prompts, new_tokens, picks, None)
}

fn generate_rows(
    session: &mut Session,
    io: &DecoderIo,
    prompts: &[&[i64]],
    new_tokens: &[usize],
    picks: &mut [Pick],
    mut prefill: Option<&mut (Vec<f32>, usize)>,
) -> Result<Vec<Generation>> {
    let rows = prompts.len();
    if rows == 0
        || new_tokens.len() != rows
        || picks.len() != rows
        || prompts.iter().any(|p| p.is_empty())
        || new_tokens.contains(&0)
    {
        return Err(RuntimeError::Data(
            "generation needs a prompt of at least one token and at least one new token per request"
                .into(),
        ));
    }
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let steps = new_tokens.iter().copied().max().unwrap_or(0);
    if let Some(max) = io.max_positions
        && (longest + steps) as i64 > max
    {
        return Err(RuntimeError::Data(format!(
            "prompt ({longest}) plus output ({steps}) tokens exceed the model's {max} positions"
        )));
    }
    let int_ty = |slot: Slot| {
        session
            .inputs()
            .iter()
            .zip(&io.slots)
            .find(|(_, s)| **s == slot)
            .and_then(|(i, _)| match i.dtype() {
                ValueType::Tensor { ty, .. } => Some(*ty),
                _ => None,
            })
            .unwrap_or(TensorElementType::Int64)
    };
    let (ids_ty, mask_ty, pos_ty) = (
        int_ty(Slot::InputIds),
        int_ty(Slot::AttentionMask),
        int_ty(Slot::PositionIds),
    );
    let cached = io.layers() > 0;
    // Every row as long as the longest: pads (token 0, mask 0) on the left.
    let mut all: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            let mut row = vec![0; longest - p.len()];
            row.extend_from_slice(p);
            row
        })
        .collect();
    let mut mask: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            let mut row = vec![0; longest - p.len()];
            row.resize(longest, 1);
            row
        })
        .collect();
    let b = rows as i64;
    let mut past: Vec<Option<DynValue>> = Vec::new();
    let mut out = vec![Generation::default(); rows];
    let mut decode_run_ns = 0u64;
    let start = Instant::now();
    for step in 0..steps {
        // The columns this call reads: the prompts first, then the one new token (or everything,
        // without a cache); `done` of them are in the cache.
        let width = all[0].len();
        let done = if cached && step > 0 { width - 1 } else { 0 };
        let seq = (width - done) as i64;
        let column = |rows: &[Vec<i64>]| -> Vec<i64> {
            rows.iter()
                .flat_map(|r| r[done..].iter().copied())
                .collect()
        };
        let mut inputs: Vec<SessionInputValue<'_>> = Vec::with_capacity(io.slots.len());
        for slot in &io.slots {
            let v = match *slot {
                Slot::InputIds => ints(ids_ty, vec![b, seq], column(&all))?,
                Slot::AttentionMask => ints(
                    mask_ty,
                    vec![b, width as i64],
                    mask.iter().flatten().copied().collect(),
                )?,
                Slot::PositionIds => {
                    // Each row's own count of real tokens before a position (pads read 0).
                    let positions: Vec<i64> = mask
                        .iter()
                        .flat_map(|m| {
                            let mut seen = 0i64;
                            let pos: Vec<i64> = m
                                .iter()
                                .map(|&on| {
                                    seen += on;
                                    (seen - 1).max(0)
                                })
                                .collect();
                            pos[done..].to_vec()
                        })
                        .collect();
                    ints(pos_ty, vec![b, seq], positions)?
                }
                Slot::PastKey(l) | Slot::PastValue(l) => {
                    let j = 2 * l + usize::from(matches!(slot, Slot::PastValue(_)));
                    match past.get_mut(j).and_then(Option::take) {
                        Some(v) => v,
                        None => {
                            let shape = vec![b, io.kv_heads, 0, io.head_dim];
                            match io.kv_type {
                                TensorElementType::Float16 => {
                                    Tensor::from_array((shape, Vec::<half::f16>::new()))?.into_dyn()
                                }
                                _ => Tensor::from_array((shape, Vec::<f32>::new()))?.into_dyn(),
                            }
                        }
                    }
                }
            };
            inputs.push(v.into());
        }
        let called = Instant::now();
        let mut outputs = session.run(inputs.as_slice())?;
        if step > 0 {
            decode_run_ns += called.elapsed().as_nanos() as u64;
        }
        let names: Vec<String> = outputs.keys().map(str::to_string).collect();
        if step == 0
            && let Some(sink) = prefill.as_deref_mut()
        {
            *sink = all_logits(&outputs[io.logits])?;
        }
        for r in 0..rows {
            let token = pick_row(&outputs[io.logits], r, rows, &mut picks[r])?;
            if step < new_tokens[r] {
                // A token is ready once it is picked (sampling time counts where it is spent).
                out[r]
                    .token_ready_ns
                    .push(start.elapsed().as_nanos() as u64);
                out[r].tokens.push(token);
            }
            all[r].push(token);
            mask[r].push(1);
        }
        if cached {
            past = io
                .present
                .iter()
                .flat_map(|(k, v)| [*k, *v])
                .map(|i| outputs.remove(&names[i]))
                .collect();
        }
    }
    for g in &mut out {
        g.decode_run_ns = decode_run_ns;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_seeded_top1_is_greedy_and_temperature_spreads_the_picks() {
        let row: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let greedy = Pick::Greedy.pick(&row);
        assert_eq!(greedy, argmax(&row) as i64);
        let mut top1 = Pick::new(1.0, 1, 9);
        assert!((0..20).all(|_| top1.pick(&row) == greedy));
        let draw = |seed| {
            let mut p = Pick::new(2.0, 0, seed);
            (0..200).map(|_| p.pick(&row)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5), "the same seed picks the same tokens");
        assert_ne!(draw(5), draw(6));
        let distinct: std::collections::BTreeSet<i64> = draw(5).into_iter().collect();
        assert!(distinct.len() > 5, "{distinct:?}");
        let mut top3 = Pick::new(5.0, 3, 1);
        let mut best: Vec<usize> = (0..row.len()).collect();
        best.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
        for _ in 0..100 {
            let t = top3.pick(&row) as usize;
            assert!(row[t] >= row[best[2]], "token {t} is outside the top 3");
        }
    }

    fn spec(name: &str, ty: TensorElementType, dims: &[i64]) -> IoSpec {
        IoSpec {
            name: name.into(),
            ty: Some(ty),
            dims: dims.to_vec(),
        }
    }

    fn llama(layers: usize) -> (Vec<IoSpec>, Vec<IoSpec>) {
        use TensorElementType::{Float32, Int64};
        let mut i = vec![
            spec("input_ids", Int64, &[-1, -1]),
            spec("attention_mask", Int64, &[-1, -1]),
            spec("position_ids", Int64, &[-1, -1]),
        ];
        let mut o = vec![spec("logits", Float32, &[-1, -1, 512])];
        for l in 0..layers {
            for k in ["key", "value"] {
                i.push(spec(
                    &format!("past_key_values.{l}.{k}"),
                    Float32,
                    &[-1, 4, -1, 32],
                ));
                o.push(spec(&format!("present.{l}.{k}"), Float32, &[-1, 4, -1, 32]));
            }
        }
        (i, o)
    }

    #[test]
    fn the_optimum_convention_is_detected_with_its_cache_shape() {
        let (i, o) = llama(2);
        let io = DecoderIo::from_specs(&i, &o).unwrap();
        assert_eq!(
            (io.layers(), io.kv_heads, io.head_dim, io.vocab),
            (2, 4, 32, Some(512))
        );
        assert_eq!(io.kv_bytes_per_token(), 2 * 2 * 4 * 32 * 4);
        // Without a cache: a full recompute each step.
        let (i, o) = llama(0);
        assert_eq!(DecoderIo::from_specs(&i, &o).unwrap().layers(), 0);
    }

    #[test]
    fn what_does_not_match_is_named() {
        let (i, mut o) = llama(2);
        o.retain(|x| x.name != "logits" && x.name != "present.1.value");
        let e = DecoderIo::from_specs(&i, &o).unwrap_err().to_string();
        assert!(e.contains("no 'logits' output"), "{e}");
        assert!(
            e.contains("'past_key_values.1.value' has no output 'present.1.value'"),
            "{e}"
        );
        let (mut i, mut o) = llama(1);
        o[1].dims = vec![-1, 8, -1, 16];
        i.push(spec("pixel_values", TensorElementType::Float32, &[1, 3]));
        let e = DecoderIo::from_specs(&i, &o).unwrap_err().to_string();
        assert!(
            e.contains("'present.0.key'") && e.contains("does not pair"),
            "{e}"
        );
        assert!(e.contains("input 'pixel_values' is none of"), "{e}");
        let (mut i, o) = llama(1);
        i[3].dims = vec![-1, -1, -1, 32];
        let e = DecoderIo::from_specs(&i, &o).unwrap_err().to_string();
        assert!(e.contains("heads and head_dim fixed"), "{e}");
    }
}
