//! Which models an ONNX Runtime release can load: the newest ONNX IR version and default-domain opset
//! of each release from 1.17 to 1.31, measured by `scripts/ort_compat_probe.py` (it loads a one-node
//! model stamped with each IR version and opset into that release's PyPI wheel). A model newer than
//! its agent's runtime is refused before the run, naming both versions, instead of failing inside
//! ONNX Runtime. Releases newer than the table pass: they load at least what the newest row does.

/// (major, minor, newest IR version, newest default-domain opset), as the probe printed them.
pub const TABLE: &[(u32, u32, i64, i64)] = &[
    (1, 17, 9, 20),
    (1, 18, 10, 21),
    (1, 19, 10, 21),
    (1, 20, 10, 21),
    (1, 21, 10, 22),
    (1, 22, 10, 22),
    (1, 23, 11, 23),
    (1, 24, 13, 25),
    (1, 25, 13, 26),
    (1, 26, 13, 26),
    (1, 27, 13, 26),
    (1, 28, 13, 26),
    (1, 29, 13, 26),
    (1, 30, 13, 26),
    (1, 31, 13, 26),
];

/// The newest IR version and opset ONNX Runtime `version` ("1.19.2") loads; None for a release the
/// table does not know (newer than it, or not a version).
pub fn limits(version: &str) -> Option<(i64, i64)> {
    let mut parts = version.trim().split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    TABLE
        .iter()
        .find(|(a, b, _, _)| (*a, *b) == (major, minor))
        .map(|&(_, _, ir, opset)| (ir, opset))
}

/// Refuses a model of IR version `ir` and opset `opset` that ONNX Runtime `version` cannot load,
/// naming both versions.
pub fn check(ir: i64, opset: i64, version: &str) -> Result<(), String> {
    let Some((max_ir, max_opset)) = limits(version) else {
        return Ok(());
    };
    if ir > max_ir {
        return Err(format!(
            "the model's ONNX IR version is {ir}, newer than this agent's ONNX Runtime {version} loads \
             (IR {max_ir} at most); run it on agents with a newer runtime, or export it for IR {max_ir}"
        ));
    }
    if opset > max_opset {
        return Err(format!(
            "the model uses opset {opset}, newer than this agent's ONNX Runtime {version} supports \
             (opset {max_opset} at most); run it on agents with a newer runtime, or export it for \
             opset {max_opset}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_newer_than_the_runtime_are_refused_naming_both_versions() {
        assert_eq!(limits("1.19.2"), Some((10, 21)));
        assert!(check(10, 21, "1.19.2").is_ok());
        let e = check(11, 21, "1.19.2").unwrap_err();
        assert!(
            e.contains("IR version is 11") && e.contains("1.19.2") && e.contains("IR 10"),
            "{e}"
        );
        let e = check(9, 23, "1.17.3").unwrap_err();
        assert!(
            e.contains("opset 23") && e.contains("1.17.3") && e.contains("opset 20"),
            "{e}"
        );
        // Newer than the table, or unreadable: passes.
        assert!(check(99, 99, "1.40.0").is_ok());
        assert!(check(99, 99, "custom").is_ok());
    }
}
