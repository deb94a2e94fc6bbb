//! Artifact sets: a model and the external-data files its initializers reference, moved and stored as
//! one unit.
//!
//! A set's identity is the sha256 of its canonical manifest: the text
//!
//! ```text
//! fleetbench artifact set v1
//! model <model path>
//! <sha256> <size in bytes> <path>      (one line per file, sorted by path, bytewise)
//! ```
//!
//! A set of one file (a model with its weights inside) keeps that file's own sha256, so artifacts
//! stored before sets existed keep their ids. Paths are relative to the model's folder, with `/`
//! between folders, and never leave it (see [`crate::onnx::check_location`]).

use serde::{Deserialize, Serialize};

/// gRPC metadata key a client names itself with: an upload belongs to the client that started it, and
/// only that client resumes or finishes it.
pub const CLIENT_KEY: &str = "x-fleetbench-client";

/// First line of a canonical manifest.
pub const MANIFEST_HEADER: &str = "fleetbench artifact set v1";

/// Model path of a single-file set (the name is not part of its identity).
pub const SINGLE_MODEL_PATH: &str = "model.onnx";

/// Most files in one set.
pub const MAX_FILES: usize = 10_000;

/// One file of a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFile {
    /// Path relative to the model's folder.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// sha256, lower-case hex.
    pub sha256: String,
}

/// A model and its external-data files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSet {
    /// Path of the ONNX model among `files`.
    pub model_path: String,
    /// Every file, sorted by path.
    pub files: Vec<ArtifactFile>,
}

/// Whether `s` is a sha256 in lower-case hex.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ArtifactSet {
    /// A set of one model file.
    pub fn single(sha256: &str, size_bytes: u64) -> Self {
        ArtifactSet {
            model_path: SINGLE_MODEL_PATH.into(),
            files: vec![ArtifactFile {
                path: SINGLE_MODEL_PATH.into(),
                size_bytes,
                sha256: sha256.to_string(),
            }],
        }
    }

    /// Checks the set and puts it in canonical form: paths checked and normalised, files sorted by
    /// path, a single file named [`SINGLE_MODEL_PATH`]. The error names what is wrong.
    pub fn normalised(mut self) -> Result<Self, String> {
        if self.files.is_empty() {
            return Err("the set has no files".into());
        }
        if self
            .files
            .iter()
            .try_fold(0u64, |sum, f| sum.checked_add(f.size_bytes))
            .is_none()
        {
            return Err("the files' sizes add up to more than 2^64 bytes".into());
        }
        if self.files.len() > MAX_FILES {
            return Err(format!(
                "the set has {} files; at most {MAX_FILES} are allowed",
                self.files.len()
            ));
        }
        self.model_path = crate::onnx::check_location(&self.model_path)
            .map_err(|e| format!("model path: {e}"))?;
        for f in &mut self.files {
            f.path = crate::onnx::check_location(&f.path).map_err(|e| format!("file path: {e}"))?;
            f.sha256 = f.sha256.to_ascii_lowercase();
            if !is_sha256(&f.sha256) {
                return Err(format!(
                    "file '{}': '{}' is not a sha256 (64 hex digits)",
                    f.path, f.sha256
                ));
            }
        }
        self.files
            .sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        if let Some(w) = self.files.windows(2).find(|w| w[0].path == w[1].path) {
            return Err(format!("file '{}' is listed twice", w[0].path));
        }
        if !self.files.iter().any(|f| f.path == self.model_path) {
            return Err(format!(
                "the model '{}' is not among the set's files",
                self.model_path
            ));
        }
        if self.files.len() == 1 {
            self.model_path = SINGLE_MODEL_PATH.into();
            self.files[0].path = SINGLE_MODEL_PATH.into();
        }
        Ok(self)
    }

    /// The canonical manifest (see the module's documentation); for a normalised set.
    pub fn manifest(&self) -> String {
        let mut s = format!("{MANIFEST_HEADER}\nmodel {}\n", self.model_path);
        for f in &self.files {
            s.push_str(&format!("{} {} {}\n", f.sha256, f.size_bytes, f.path));
        }
        s
    }

    /// The set's identity; for a normalised set.
    pub fn id(&self) -> String {
        if self.files.len() == 1 {
            self.files[0].sha256.clone()
        } else {
            crate::sha256_hex(self.manifest().as_bytes())
        }
    }

    /// Total size of the files, bytes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }

    /// The model file.
    pub fn model(&self) -> &ArtifactFile {
        self.files
            .iter()
            .find(|f| f.path == self.model_path)
            .expect("a normalised set holds its model")
    }

    /// Parses a canonical manifest back into its set.
    pub fn parse_manifest(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MANIFEST_HEADER) {
            return Err("not an artifact set manifest".into());
        }
        let model_path = lines
            .next()
            .and_then(|l| l.strip_prefix("model "))
            .ok_or("the manifest names no model")?
            .to_string();
        let files = lines
            .map(|l| {
                let mut it = l.splitn(3, ' ');
                match (it.next(), it.next().and_then(|n| n.parse().ok()), it.next()) {
                    (Some(sha), Some(size_bytes), Some(path)) => Ok(ArtifactFile {
                        path: path.to_string(),
                        size_bytes,
                        sha256: sha.to_string(),
                    }),
                    _ => Err(format!("manifest line '{l}' is not 'SHA256 SIZE PATH'")),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        ArtifactSet { model_path, files }.normalised()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, c: char) -> ArtifactFile {
        ArtifactFile {
            path: path.into(),
            size_bytes: 10,
            sha256: c.to_string().repeat(64),
        }
    }

    #[test]
    fn the_id_does_not_depend_on_the_order_files_are_listed_in() {
        let a = ArtifactSet {
            model_path: "m.onnx".into(),
            files: vec![
                file("m.onnx", 'a'),
                file("weights/b.bin", 'b'),
                file("./weights/c.bin", 'c'),
            ],
        }
        .normalised()
        .unwrap();
        let b = ArtifactSet {
            model_path: "./m.onnx".into(),
            files: vec![
                file("weights/c.bin", 'c'),
                file("m.onnx", 'a'),
                file("weights/b.bin", 'b'),
            ],
        }
        .normalised()
        .unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.id(), crate::sha256_hex(a.manifest().as_bytes()));
        assert_eq!(ArtifactSet::parse_manifest(&a.manifest()).unwrap(), a);
        assert_eq!(a.total_bytes(), 30);
    }

    #[test]
    fn a_single_file_keeps_its_own_hash_whatever_its_name() {
        let s = ArtifactSet {
            model_path: "resnet.onnx".into(),
            files: vec![file("resnet.onnx", 'd')],
        }
        .normalised()
        .unwrap();
        assert_eq!(s.id(), "d".repeat(64));
        assert_eq!(s, ArtifactSet::single(&"d".repeat(64), 10));
    }

    #[test]
    fn bad_sets_are_refused_naming_the_problem() {
        let cases = [
            (
                vec![file("../../etc/passwd", 'a')],
                "m",
                "leaves the model's folder",
            ),
            (vec![file("/etc/passwd", 'a')], "m", "absolute path"),
            (vec![file("m", 'a'), file("m", 'b')], "m", "listed twice"),
            (vec![file("x", 'a')], "m", "not among"),
            (vec![], "m", "no files"),
        ];
        for (files, model, want) in cases {
            let err = ArtifactSet {
                model_path: model.into(),
                files,
            }
            .normalised()
            .unwrap_err();
            assert!(err.contains(want), "{err} (wanted {want})");
        }
        let mut bad = file("m", 'a');
        bad.sha256 = "nothex".into();
        let err = ArtifactSet {
            model_path: "m".into(),
            files: vec![bad],
        }
        .normalised()
        .unwrap_err();
        assert!(err.contains("not a sha256"), "{err}");
        let mut huge = file("a", 'a');
        huge.size_bytes = u64::MAX - 5;
        let err = ArtifactSet {
            model_path: "a".into(),
            files: vec![huge, file("b", 'b')],
        }
        .normalised()
        .unwrap_err();
        assert!(err.contains("more than 2^64"), "{err}");
    }
}
