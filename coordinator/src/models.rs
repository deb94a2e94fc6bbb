//! Models: artifacts and eval sets stored by sha256, variants with lineage. An artifact must be an ONNX
//! model; a variant never silently replaces another.

use fleetbench_common::{now_ms, onnx, sha256_hex};
use fleetbench_proto::v1::{ModelVariant, RegisterVariantRequest};

use crate::Coordinator;
use crate::error::{Error, Result};
use crate::store::VariantInsert;

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

/// Stores an uploaded blob after checking its hash; returns (sha256, size).
pub async fn store_blob(
    coord: &Coordinator,
    data: Vec<u8>,
    expected_sha256: &str,
) -> Result<(String, u64)> {
    let sha = sha256_hex(&data);
    if !expected_sha256.is_empty() && !expected_sha256.eq_ignore_ascii_case(&sha) {
        return Err(Error::InvalidArgument(format!(
            "upload corrupted in transit: expected sha256 {expected_sha256}, received {sha}"
        )));
    }
    coord.store.put_blob(&sha, &data).await?;
    Ok((sha, data.len() as u64))
}

/// Reads a whole blob (small artifacts only; downloads stream chunk by chunk instead).
pub async fn read_blob(coord: &Coordinator, sha256: &str) -> Result<Vec<u8>> {
    let (size, chunks) = coord
        .store
        .blob_meta(sha256)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no blob with sha256 {sha256}")))?;
    let mut out = Vec::with_capacity(size as usize);
    for i in 0..chunks {
        out.extend(coord.store.blob_chunk(sha256, i).await?);
    }
    Ok(out)
}

/// Registers a variant: the artifact must be stored and be ONNX; eval refs must be stored; `variant_of`
/// must exist. Without a variant name, the name comes from the weights' type (fp32, fp16, int8).
pub async fn register_variant(
    coord: &Coordinator,
    req: RegisterVariantRequest,
) -> Result<ModelVariant> {
    check_name("model", &req.model)?;
    check_sha("artifact_sha256", &req.artifact_sha256)?;
    let bytes = read_blob(coord, &req.artifact_sha256)
        .await
        .map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(format!(
                "artifact {} was not uploaded; upload it before registering",
                req.artifact_sha256
            )),
            e => e,
        })?;
    let info =
        onnx::inspect(&bytes).map_err(|e| Error::InvalidArgument(format!("artifact: {e}")))?;
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
            if coord.store.blob_meta(sha).await?.is_none() {
                return Err(Error::NotFound(format!(
                    "{field}: blob {sha} was not uploaded"
                )));
            }
        }
    }
    // A variant without its own eval set inherits its ancestor's.
    let parent = existing.iter().find(|v| v.variant == variant_of);
    let inherit = |own: &String, pick: fn(&ModelVariant) -> &String| {
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
    let v = ModelVariant {
        model: req.model.clone(),
        variant: variant.clone(),
        artifact_sha256: req.artifact_sha256.to_ascii_lowercase(),
        size_bytes: bytes.len() as u64,
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
    };
    match coord.store.insert_variant(&v).await? {
        VariantInsert::Created => Ok(v),
        VariantInsert::Unchanged => Ok(existing
            .into_iter()
            .find(|e| e.variant == variant)
            .unwrap_or(v)),
    }
}
