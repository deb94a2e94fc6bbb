//! ONNX external data: initializers whose bytes live in files beside the model (every model over
//! 2 GiB must keep them so; protobuf cannot hold more). [`load`] reads them into the model, so recipes
//! see ordinary initializers; [`save`] writes a model with its large initializers in one data file
//! beside it, the form `onnx.save(..., save_as_external_data=True)` writes, so a large model's variant
//! comes out in the same form.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fleetbench_common::onnx::{check_location, external_ref};
use fleetbench_common::proto::onnx::{ModelProto, StringStringEntryProto, TensorProto};

use crate::OptError;

/// TensorProto.DataLocation.EXTERNAL.
const EXTERNAL: i32 = 1;

/// Initializers at least this large go to the data file (the `onnx` package's default threshold).
pub const SIZE_THRESHOLD: usize = 1024;

/// Offsets in the data file are multiples of this, so ONNX Runtime can map tensors in place.
const ALIGN: u64 = 4096;

fn io(what: &str, path: &Path, e: std::io::Error) -> OptError {
    OptError::Model(format!("{what} {}: {e}", path.display()))
}

/// Whether any initializer of the main graph keeps its data outside the model file.
pub fn has_external(model: &ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.initializer.iter().any(|t| external_ref(t).is_some()))
}

/// Reads every external initializer of the main graph from its file under `dir` (the model's
/// folder) into `raw_data`. Returns how many it read. A location outside the folder, a missing file
/// or a range past a file's end is refused, naming the initializer.
pub fn load(model: &mut ModelProto, dir: &Path) -> Result<usize, OptError> {
    let Some(graph) = model.graph.as_mut() else {
        return Ok(0);
    };
    let mut n = 0;
    for t in &mut graph.initializer {
        let Some(r) = external_ref(t) else { continue };
        let rel = check_location(&r.location).map_err(|e| {
            OptError::Model(format!("initializer '{}' keeps its data at {e}", r.tensor))
        })?;
        let path = dir.join(&rel);
        let mut f = std::fs::File::open(&path).map_err(|e| {
            OptError::Model(format!(
                "initializer '{}' keeps its data in '{rel}', which cannot be opened ({e})",
                r.tensor
            ))
        })?;
        let size = f.metadata().map_err(|e| io("cannot read", &path, e))?.len();
        let len = r.length.unwrap_or(size.saturating_sub(r.offset));
        if r.offset.saturating_add(len) > size {
            return Err(OptError::Model(format!(
                "initializer '{}' reads bytes {}..{} of '{rel}', which has {size}",
                r.tensor,
                r.offset,
                r.offset.saturating_add(len)
            )));
        }
        let mut buf = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(r.offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| io("cannot read", &path, e))?;
        t.raw_data = Some(buf);
        t.external_data.clear();
        t.data_location = None;
        n += 1;
    }
    Ok(n)
}

/// Writes `model` to `path`. With `external`, every initializer of at least [`SIZE_THRESHOLD`] bytes
/// of raw data goes to one data file beside it (`<file name>.data`, offsets aligned to 4 KiB) and the
/// written model references it; `model` itself is left as it was, and its weights are not copied in
/// memory. Files are written under temporary names, synced and renamed, so an error leaves nothing
/// half-written. Returns the files written, the model first.
pub fn save(model: &mut ModelProto, path: &Path, external: bool) -> Result<Vec<PathBuf>, OptError> {
    let name = path
        .file_name()
        .ok_or_else(|| OptError::Model(format!("{} names no file", path.display())))?
        .to_string_lossy()
        .into_owned();
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let tmp = |p: &Path| {
        let mut n = p.file_name().unwrap_or_default().to_os_string();
        n.push(".tmp");
        p.with_file_name(n)
    };
    // The model without its initializers, cloned cheaply; initializers are added back below.
    let initializers = model
        .graph
        .as_mut()
        .map(|g| std::mem::take(&mut g.initializer))
        .unwrap_or_default();
    let mut shell = model.clone();
    if let Some(g) = model.graph.as_mut() {
        g.initializer = initializers;
    }
    let mut written = vec![path.to_path_buf()];
    let mut staged = Vec::new();
    let result = (|| {
        let data_name = format!("{name}.data");
        let data_path = dir.join(&data_name);
        let data_tmp = tmp(&data_path);
        let mut data_file = None;
        let mut at = 0u64;
        let (Some(source), Some(target)) = (model.graph.as_ref(), shell.graph.as_mut()) else {
            return write_model(&shell, path, &tmp(path), &mut staged);
        };
        for t in &source.initializer {
            let big = external
                && t.raw_data
                    .as_ref()
                    .is_some_and(|d| d.len() >= SIZE_THRESHOLD);
            if !big {
                target.initializer.push(t.clone());
                continue;
            }
            let f = match &mut data_file {
                Some(f) => f,
                None => {
                    staged.push((data_tmp.clone(), data_path.clone()));
                    data_file.insert(std::io::BufWriter::new(
                        std::fs::File::create(&data_tmp)
                            .map_err(|e| io("cannot create", &data_tmp, e))?,
                    ))
                }
            };
            let data = t.raw_data.as_deref().unwrap_or_default();
            let pad = (ALIGN - at % ALIGN) % ALIGN;
            f.write_all(&vec![0u8; pad as usize])
                .and_then(|_| f.write_all(data))
                .map_err(|e| io("cannot write", &data_tmp, e))?;
            at += pad;
            let mut meta = TensorProto {
                raw_data: None,
                ..TensorProto::default()
            };
            meta.name = t.name.clone();
            meta.dims = t.dims.clone();
            meta.data_type = t.data_type;
            meta.doc_string = t.doc_string.clone();
            set_external(&mut meta, &data_name, at, data.len() as u64);
            target.initializer.push(meta);
            at += data.len() as u64;
        }
        if let Some(f) = data_file {
            let f = f
                .into_inner()
                .map_err(|e| io("cannot write", &data_tmp, e.into_error()))?;
            f.sync_all().map_err(|e| io("cannot sync", &data_tmp, e))?;
            written.push(data_path);
        }
        write_model(&shell, path, &tmp(path), &mut staged)
    })();
    if let Err(e) = result {
        for (from, _) in &staged {
            let _ = std::fs::remove_file(from);
        }
        return Err(e);
    }
    Ok(written)
}

/// Writes the model file to `tmp` and renames everything staged into place.
fn write_model(
    model: &ModelProto,
    path: &Path,
    tmp: &Path,
    staged: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<(), OptError> {
    staged.push((tmp.to_path_buf(), path.to_path_buf()));
    let bytes = prost::Message::encode_to_vec(model);
    let mut f = std::fs::File::create(tmp).map_err(|e| io("cannot create", tmp, e))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io("cannot write", tmp, e))?;
    for (from, to) in staged.iter() {
        std::fs::rename(from, to).map_err(|e| io("cannot move into place", to, e))?;
    }
    Ok(())
}

fn set_external(t: &mut TensorProto, location: &str, offset: u64, length: u64) {
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.to_string()),
        value: Some(v),
    };
    t.external_data = vec![
        entry("location", location.to_string()),
        entry("offset", offset.to_string()),
        entry("length", length.to_string()),
    ];
    t.data_location = Some(EXTERNAL);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetbench_common::proto::onnx::GraphProto;

    fn model() -> ModelProto {
        let t = |name: &str, n: usize| TensorProto {
            name: Some(name.into()),
            dims: vec![n as i64],
            data_type: Some(2), // uint8
            raw_data: Some((0..n).map(|i| (i % 251) as u8).collect()),
            ..Default::default()
        };
        ModelProto {
            ir_version: Some(8),
            graph: Some(GraphProto {
                initializer: vec![t("big", 10_000), t("small", 16), t("big2", 5000)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_model_saved_with_external_data_loads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let mut m = model();
        let files = save(&mut m, &path, true).unwrap();
        assert_eq!(m, model(), "the model in memory is left as it was");
        assert_eq!(files, vec![path.clone(), dir.path().join("m.onnx.data")]);
        let mut back: ModelProto =
            prost::Message::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        assert!(has_external(&back));
        let g = back.graph.as_ref().unwrap();
        assert!(g.initializer[0].raw_data.is_none() && g.initializer[1].raw_data.is_some());
        assert_eq!(external_ref(&g.initializer[2]).unwrap().offset % ALIGN, 0);
        assert_eq!(load(&mut back, dir.path()).unwrap(), 2);
        assert_eq!(back, model());
        // No temporary file is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn locations_that_escape_or_are_missing_are_refused_naming_the_initializer() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = model();
        set_external(
            &mut m.graph.as_mut().unwrap().initializer[0],
            "../x.bin",
            0,
            10,
        );
        let e = load(&mut m.clone(), dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("'big'") && e.contains("leaves the model's folder"),
            "{e}"
        );
        set_external(
            &mut m.graph.as_mut().unwrap().initializer[0],
            "w.bin",
            0,
            10,
        );
        let e = load(&mut m.clone(), dir.path()).unwrap_err().to_string();
        assert!(e.contains("'big'") && e.contains("'w.bin'"), "{e}");
        std::fs::write(dir.path().join("w.bin"), [0u8; 5]).unwrap();
        let e = load(&mut m, dir.path()).unwrap_err().to_string();
        assert!(e.contains("bytes 0..10 of 'w.bin', which has 5"), "{e}");
    }
}
