//! Reading a model's graph without its weights. A large model is mostly initializer data (its
//! `raw_data` and typed value fields); [`scan`] walks the protobuf wire format over a reader, seeks
//! past those fields and the nodes' bodies, and decodes the rest, so inspecting a model of many
//! gigabytes reads a few kilobytes and holds no weights in memory.

use std::io::{BufReader, Read, Seek, SeekFrom};

use prost::Message;

use super::onnx::OnnxError;
use crate::proto::onnx::{GraphProto, ModelProto, TensorProto};

/// Largest single field kept (decoded) by the scan; larger ones are a hostile or broken file.
const MAX_KEPT_FIELD: u64 = 64 << 20;

/// A model read by [`scan`]: its graph without nodes and with initializers stripped of their data.
#[derive(Debug, Clone)]
pub struct Scanned {
    /// The model; `graph.node` is empty, initializers keep name, type, dims and external-data fields.
    pub model: ModelProto,
    /// Number of nodes in the main graph.
    pub node_count: usize,
}

struct Wire<R> {
    r: BufReader<R>,
    pos: u64,
}

impl<R: Read + Seek> Wire<R> {
    fn byte(&mut self) -> Result<Option<u8>, OnnxError> {
        let mut b = [0u8; 1];
        match self.r.read(&mut b) {
            Ok(0) => Ok(None),
            Ok(_) => {
                self.pos += 1;
                Ok(Some(b[0]))
            }
            Err(e) => Err(OnnxError::Decode(format!("read error: {e}"))),
        }
    }

    fn varint(&mut self, out: &mut Vec<u8>) -> Result<Option<u64>, OnnxError> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some(b) = self.byte()? else {
                return if i == 0 {
                    Ok(None)
                } else {
                    Err(OnnxError::Decode("truncated varint".into()))
                };
            };
            out.push(b);
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(Some(v));
            }
        }
        Err(OnnxError::Decode("varint longer than 10 bytes".into()))
    }

    fn need_varint(&mut self, out: &mut Vec<u8>) -> Result<u64, OnnxError> {
        self.varint(out)?
            .ok_or_else(|| OnnxError::Decode("truncated field".into()))
    }

    fn skip(&mut self, n: u64) -> Result<(), OnnxError> {
        let n = i64::try_from(n).map_err(|_| OnnxError::Decode("field length overflows".into()))?;
        self.r
            .seek_relative(n)
            .map_err(|e| OnnxError::Decode(format!("seek error: {e}")))?;
        self.pos += n as u64;
        Ok(())
    }

    fn read_into(&mut self, n: u64, out: &mut Vec<u8>) -> Result<(), OnnxError> {
        if n > MAX_KEPT_FIELD {
            return Err(OnnxError::Decode(format!(
                "a graph field of {n} bytes is larger than any model's metadata"
            )));
        }
        let start = out.len();
        out.resize(start + n as usize, 0);
        self.r
            .read_exact(&mut out[start..])
            .map_err(|_| OnnxError::Decode("truncated field".into()))?;
        self.pos += n;
        Ok(())
    }
}

/// One field's key: (field number, wire type), with its encoded bytes appended to `raw`.
fn key<R: Read + Seek>(w: &mut Wire<R>, raw: &mut Vec<u8>) -> Result<Option<(u64, u8)>, OnnxError> {
    Ok(w.varint(raw)?.map(|k| (k >> 3, (k & 7) as u8)))
}

/// What to do with a field.
enum Action {
    Keep,
    Skip,
}

/// Handles one length-delimited field itself (given the field number, its length and its key bytes);
/// returns false to leave it to the walk.
type OnLen<'a, R> = dyn FnMut(&mut Wire<R>, u64, u64, &[u8]) -> Result<bool, OnnxError> + 'a;

/// Walks the fields of a message that ends at `end`, calling `on_len` for length-delimited fields it
/// wants to handle itself (given the field number, length and the key bytes); other fields are kept
/// (appended to `kept` as they were) or skipped per `keep`.
fn walk<R: Read + Seek>(
    w: &mut Wire<R>,
    end: u64,
    kept: &mut Vec<u8>,
    keep: &dyn Fn(u64) -> Action,
    on_len: &mut OnLen<'_, R>,
) -> Result<(), OnnxError> {
    while w.pos < end {
        let mut raw = Vec::new();
        let Some((field, wire)) = key(w, &mut raw)? else {
            return Err(OnnxError::Decode("message cut short".into()));
        };
        match wire {
            0 => {
                w.need_varint(&mut raw)?;
            }
            1 => w.read_into(8, &mut raw)?,
            5 => w.read_into(4, &mut raw)?,
            2 => {
                let len = w.need_varint(&mut raw)?;
                if w.pos + len > end {
                    return Err(OnnxError::Decode(format!(
                        "field {field} runs past the end of its message"
                    )));
                }
                if on_len(w, field, len, &raw)? {
                    continue;
                }
                match keep(field) {
                    Action::Keep => {
                        kept.extend_from_slice(&raw);
                        w.read_into(len, kept)?;
                    }
                    Action::Skip => w.skip(len)?,
                }
                continue;
            }
            _ => {
                return Err(OnnxError::Decode(format!(
                    "unsupported wire type {wire} in field {field}"
                )));
            }
        }
        if matches!(keep(field), Action::Keep) {
            kept.extend_from_slice(&raw);
        }
    }
    if w.pos != end {
        return Err(OnnxError::Decode("a field runs past its message".into()));
    }
    Ok(())
}

/// TensorProto without its values: dims (1), data_type (2), segment (3), name (8), doc_string (12),
/// external_data (13), data_location (14).
fn scan_tensor<R: Read + Seek>(w: &mut Wire<R>, len: u64) -> Result<TensorProto, OnnxError> {
    let mut kept = Vec::new();
    let end = w.pos + len;
    walk(
        w,
        end,
        &mut kept,
        &|f| match f {
            1 | 2 | 3 | 8 | 12 | 13 | 14 => Action::Keep,
            _ => Action::Skip,
        },
        &mut |_, _, _, _| Ok(false),
    )?;
    TensorProto::decode(kept.as_slice()).map_err(|e| OnnxError::Decode(e.to_string()))
}

fn scan_graph<R: Read + Seek>(
    w: &mut Wire<R>,
    len: u64,
    nodes: &mut usize,
) -> Result<GraphProto, OnnxError> {
    let mut kept = Vec::new();
    let mut initializers = Vec::new();
    let end = w.pos + len;
    walk(
        w,
        end,
        &mut kept,
        // name (2), doc_string (10), input (11), output (12); not value_info (13), annotations (14)
        // or sparse initializers (15).
        &|f| match f {
            2 | 10 | 11 | 12 => Action::Keep,
            _ => Action::Skip,
        },
        &mut |w, field, len, _| match field {
            1 => {
                *nodes += 1;
                w.skip(len)?;
                Ok(true)
            }
            5 => {
                initializers.push(scan_tensor(w, len)?);
                Ok(true)
            }
            _ => Ok(false),
        },
    )?;
    let mut graph =
        GraphProto::decode(kept.as_slice()).map_err(|e| OnnxError::Decode(e.to_string()))?;
    graph.initializer = initializers;
    Ok(graph)
}

/// Reads a model from `r` without its weights (see the module's documentation).
pub fn scan<R: Read + Seek>(r: R) -> Result<Scanned, OnnxError> {
    let mut r = BufReader::with_capacity(64 << 10, r);
    let total = r
        .seek(SeekFrom::End(0))
        .and_then(|n| r.seek(SeekFrom::Start(0)).map(|_| n))
        .map_err(|e| OnnxError::Decode(format!("seek error: {e}")))?;
    let mut w = Wire { r, pos: 0 };
    let mut kept = Vec::new();
    let mut graph = None;
    let mut node_count = 0;
    walk(
        &mut w,
        total,
        &mut kept,
        // ir_version (1), producer (2, 3), domain (4), model_version (5), doc_string (6), opset_import
        // (8), metadata_props (14); not training_info (20) or functions (25).
        &|f| match f {
            1..=6 | 8 | 14 => Action::Keep,
            _ => Action::Skip,
        },
        &mut |w, field, len, _| {
            if field == 7 {
                graph = Some(scan_graph(w, len, &mut node_count)?);
                Ok(true)
            } else {
                Ok(false)
            }
        },
    )?;
    let mut model =
        ModelProto::decode(kept.as_slice()).map_err(|e| OnnxError::Decode(e.to_string()))?;
    model.graph = graph;
    super::onnx::check_model(&model)?;
    Ok(Scanned { model, node_count })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn student() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/digits/digits-student.onnx"
        ))
        .expect("the bundled student model")
    }

    #[test]
    fn a_scan_reads_what_a_full_decode_reads_without_the_weights() {
        let bytes = student();
        let full = super::super::onnx::inspect(&bytes).unwrap();
        let scanned = scan(std::io::Cursor::new(&bytes)).unwrap();
        let info = super::super::onnx::info_of(&scanned);
        assert_eq!(info.inputs, full.inputs);
        assert_eq!(info.outputs, full.outputs);
        assert_eq!(info.node_count, full.node_count);
        assert_eq!(info.opset, full.opset);
        assert_eq!(info.ir_version, full.ir_version);
        assert_eq!(info.weight_kind, full.weight_kind);
        let g = scanned.model.graph.as_ref().unwrap();
        assert!(g.node.is_empty());
        assert!(!g.initializer.is_empty());
        assert!(
            g.initializer
                .iter()
                .all(|t| t.raw_data.is_none() && t.float_data.is_empty() && !t.dims.is_empty())
        );
    }

    #[test]
    fn a_cut_model_is_an_error() {
        let bytes = student();
        for cut in [1, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                scan(std::io::Cursor::new(&bytes[..cut])).is_err(),
                "cut at {cut}"
            );
        }
    }
}

#[cfg(test)]
mod scanning_outside_bytes {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes: an error or a model, never a panic or a huge allocation.
        #[test]
        fn any_bytes_scan_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = super::scan(std::io::Cursor::new(bytes));
        }
    }
}
