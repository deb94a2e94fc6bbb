//! Models: artifacts and eval sets stored by sha256, variants with lineage. An artifact must be an ONNX
//! model; a variant never silently replaces another.

use fleetbench_common::artifact::ArtifactSet;
use fleetbench_common::{now_ms, onnx, onnx_scan};

use crate::context::Context;
use crate::domain::{Variant, VariantRegistration};
use crate::error::{Error, Result};
use crate::store::{BLOB_CHUNK_BYTES, Deletion, VariantInsert};

/// Names of models and variants: letters, digits, '-', '_', '.'; 1 to 64 characters.
fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{kind} name '{name}' must be 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

fn check_sha(field: &str, sha: &str) -> Result<()> {
    if sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{field}: '{sha}' is not a sha256 (64 hex digits)"
        )))
    }
}

/// A stored blob read through the store, for [`onnx_scan::scan`] on a blocking thread: it seeks past
/// what it does not need, so inspecting a large model reads little of it.
struct BlobReader {
    store: std::sync::Arc<dyn crate::store::Store>,
    rt: tokio::runtime::Handle,
    sha256: String,
    size: u64,
    pos: u64,
    /// The chunk last read: (its offset, its bytes).
    cached: (u64, Vec<u8>),
    /// The store's error, when a read failed: reported as itself (a storage fault, with its details
    /// kept in the log), not as a broken model.
    failed: std::sync::Arc<std::sync::Mutex<Option<Error>>>,
}

impl std::io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let (start, bytes) = &self.cached;
        if self.pos < *start || self.pos >= start + bytes.len() as u64 {
            let chunk = BLOB_CHUNK_BYTES as u64;
            let at = self.pos / chunk * chunk;
            let data =
                match self
                    .rt
                    .block_on(self.store.read_blob(&self.sha256, at, BLOB_CHUNK_BYTES))
                {
                    Ok(d) => d,
                    Err(e) => {
                        *self.failed.lock().expect("failed") = Some(e);
                        return Err(std::io::Error::other("the store failed"));
                    }
                };
            if data.is_empty() {
                return Ok(0);
            }
            self.cached = (at, data);
        }
        let (start, bytes) = &self.cached;
        let from = (self.pos - start) as usize;
        let n = buf.len().min(bytes.len() - from);
        buf[..n].copy_from_slice(&bytes[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for BlobReader {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let next = match to {
            std::io::SeekFrom::Start(n) => n as i128,
            std::io::SeekFrom::End(d) => self.size as i128 + d as i128,
            std::io::SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if next < 0 {
            return Err(std::io::Error::other("seek before the start"));
        }
        self.pos = next as u64;
        Ok(self.pos)
    }
}

/// Inspects the stored model file `sha256` without reading its weights.
async fn inspect_blob(coord: &Context, sha256: &str, size: u64) -> Result<onnx::ModelInfo> {
    let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let reader = BlobReader {
        store: coord.store.clone(),
        rt: tokio::runtime::Handle::current(),
        sha256: sha256.to_string(),
        size,
        pos: 0,
        cached: (0, Vec::new()),
        failed: failed.clone(),
    };
    let scanned = tokio::task::spawn_blocking(move || onnx_scan::scan(reader))
        .await
        .map_err(|e| Error::Internal(format!("inspecting the model failed: {e}")))?;
    if let Some(e) = failed.lock().expect("failed").take() {
        return Err(e);
    }
    let scanned = scanned.map_err(|e| Error::InvalidArgument(format!("artifact: {e}")))?;
    let info = onnx::info_of(&scanned);
    Ok(info)
}

/// Checks that every external-data reference of the model is a file of its set, within its size.
fn check_external(info: &onnx::ModelInfo, set: &ArtifactSet) -> Result<()> {
    for ext in &info.external_data {
        let path = onnx::check_location(&ext.location).map_err(|e| {
            Error::InvalidArgument(format!(
                "artifact: initializer '{}' keeps its data at {e}",
                ext.tensor
            ))
        })?;
        let file = set.files.iter().find(|f| f.path == path).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "artifact: initializer '{}' keeps its data in '{}', which is not in the pushed set \
                 ({} files); push the model with fleetbench models push, which sends every file it \
                 references",
                ext.tensor,
                ext.location,
                set.files.len()
            ))
        })?;
        if let Some(end) = ext.end()
            && end > file.size_bytes
        {
            return Err(Error::InvalidArgument(format!(
                "artifact: initializer '{}' reads bytes up to {end} of '{}', which has {}",
                ext.tensor, file.path, file.size_bytes
            )));
        }
    }
    Ok(())
}

/// Registers a variant: the artifact must be stored and be ONNX; eval refs must be stored; `variant_of`
/// must exist. Without a variant name, the name comes from the weights' type (fp32, fp16, int8).
pub async fn register_variant(coord: &Context, req: VariantRegistration) -> Result<Variant> {
    check_name("model", &req.model)?;
    check_sha("artifact_sha256", &req.artifact_sha256)?;
    let set_sha = req.artifact_sha256.to_ascii_lowercase();
    let set = crate::artifacts::get_set(coord, &set_sha)
        .await
        .map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(format!(
                "artifact {} was not uploaded; upload it before registering",
                req.artifact_sha256
            )),
            e => e,
        })?;
    // Every file must be stored: a set recorded earlier may have lost a file to a deletion since.
    for f in &set.files {
        if coord.store.blob_size(&f.sha256).await? != Some(f.size_bytes) {
            return Err(Error::NotFound(format!(
                "artifact: file '{}' of set {set_sha} is not stored; push the model again",
                f.path
            )));
        }
    }
    let model_file = set.model().clone();
    let info = inspect_blob(coord, &model_file.sha256, model_file.size_bytes).await?;
    check_external(&info, &set)?;
    let variant = if req.variant.is_empty() {
        info.weight_kind.to_string()
    } else {
        req.variant.clone()
    };
    check_name("variant", &variant)?;

    let existing = coord.store.list_variants(Some(&req.model)).await?;
    let base = existing
        .iter()
        .find(|v| v.variant_of.is_empty() && v.variant != variant);
    let variant_of = if !req.variant_of.is_empty() {
        if !existing.iter().any(|v| v.variant == req.variant_of) {
            return Err(Error::NotFound(format!(
                "variant_of: model '{}' has no variant '{}'",
                req.model, req.variant_of
            )));
        }
        req.variant_of.clone()
    } else {
        base.map(|b| b.variant.clone()).unwrap_or_default()
    };
    for (field, sha) in [
        ("eval_inputs", &req.eval_inputs_sha256),
        ("eval_labels", &req.eval_labels_sha256),
    ] {
        if !sha.is_empty() {
            check_sha(field, sha)?;
            if coord.store.blob_size(sha).await?.is_none() {
                return Err(Error::NotFound(format!(
                    "{field}: blob {sha} was not uploaded"
                )));
            }
        }
    }
    // A variant without its own eval set inherits its ancestor's.
    let parent = existing.iter().find(|v| v.variant == variant_of);
    let inherit = |own: &String, pick: fn(&Variant) -> &String| {
        if own.is_empty() {
            parent.map(|p| pick(p).clone()).unwrap_or_default()
        } else {
            own.clone()
        }
    };
    let technique = if req.technique.is_empty() && !variant_of.is_empty() {
        match info.weight_kind {
            "int8" | "fp16" | "bf16" => "quantized".to_string(),
            _ => String::new(),
        }
    } else {
        req.technique.clone()
    };
    let v = Variant {
        model: req.model.clone(),
        variant: variant.clone(),
        artifact_sha256: set_sha,
        size_bytes: set.total_bytes(),
        variant_of,
        technique,
        recipe_json: req.recipe_json.clone(),
        eval_inputs_sha256: inherit(&req.eval_inputs_sha256, |p| &p.eval_inputs_sha256),
        eval_labels_sha256: inherit(&req.eval_labels_sha256, |p| &p.eval_labels_sha256),
        inputs: info.inputs,
        outputs: info.outputs,
        created_at_ms: now_ms(),
        node_count: info.node_count as u32,
        opset: info.opset,
        ir_version: info.ir_version,
        file_count: set.files.len() as u32,
        max_positions: info.max_positions,
    };
    // A model uploaded whole as one blob becomes a set of one file once it is a variant's.
    coord
        .store
        .put_set(&v.artifact_sha256, &set, now_ms())
        .await?;
    match coord.store.insert_variant(&v).await? {
        VariantInsert::Created => Ok(v),
        VariantInsert::Unchanged => Ok(existing
            .into_iter()
            .find(|e| e.variant == variant)
            .unwrap_or(v)),
    }
}

/// Deletes `variant` of `model` (every variant when None) with its runs, then the blobs nothing
/// references any more. A variant others derive from needs `recursive` (they go too, children first).
/// Refused while a queued or running job uses one of them.
pub async fn delete(
    coord: &Context,
    model: &str,
    variant: Option<&str>,
    recursive: bool,
    dry_run: bool,
) -> Result<Deletion> {
    let variants = coord.store.list_variants(Some(model)).await?;
    if variants.is_empty() {
        return Err(Error::NotFound(format!("no model '{model}'")));
    }
    let roots: Vec<&str> = match variant {
        Some(v) => {
            if !variants.iter().any(|x| x.variant == v) {
                return Err(Error::NotFound(format!(
                    "model '{model}' has no variant '{v}'"
                )));
            }
            vec![v]
        }
        None => variants
            .iter()
            .filter(|v| v.variant_of.is_empty())
            .map(|v| v.variant.as_str())
            .collect(),
    };
    // Depth-first, children before their parents.
    fn collect<'a>(v: &'a str, all: &'a [Variant], out: &mut Vec<String>) {
        for child in all.iter().filter(|c| c.variant_of == v && c.variant != v) {
            if !out.contains(&child.variant) {
                collect(&child.variant, all, out);
            }
        }
        if !out.iter().any(|o| o == v) {
            out.push(v.to_string());
        }
    }
    let mut targets = Vec::new();
    for r in &roots {
        collect(r, &variants, &mut targets);
    }
    if variant.is_none() {
        for v in &variants {
            collect(&v.variant, &variants, &mut targets);
        }
    }
    let derived: Vec<&String> = targets
        .iter()
        .filter(|t| !roots.contains(&t.as_str()))
        .collect();
    if !derived.is_empty() && !recursive {
        let what = match variant {
            Some(v) => format!("{model}/{v}"),
            None => format!("model '{model}'"),
        };
        return Err(Error::FailedPrecondition(format!(
            "{what} has derived variants ({}); delete them first, or pass --recursive to delete them \
             with it",
            derived
                .iter()
                .map(|d| d.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let deletion = coord
        .store
        .delete_variants(model, &targets, dry_run)
        .await?;
    if !dry_run {
        coord.notify_watchers();
    }
    Ok(deletion)
}
