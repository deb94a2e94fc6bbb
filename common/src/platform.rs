//! Platform fingerprints: agents whose hardware, runtime and labels match pool into one platform.

use serde::Serialize;

use crate::domain::Inventory;
use crate::labels::{COST_LABEL, Labels};

/// What identifies a platform: everything that shapes performance, nothing that merely names a host.
#[derive(Debug, Serialize)]
struct FingerprintInput<'a> {
    cpu_brand: &'a str,
    cores_available: usize,
    memory_gib: u64,
    accelerators: Vec<(String, String, u64)>,
    os_name: &'a str,
    arch: &'a str,
    ort_version: &'a str,
    execution_providers: Vec<&'a str>,
    labels: Vec<(&'a str, &'a str)>,
}

/// Stable platform id: a short hash of CPU brand, cores available to the agent, memory (whole GiB),
/// accelerators, OS and arch, ONNX Runtime version and providers, and labels other than
/// `cost_per_hour`. The hostname is left out, so identical machines pool.
pub fn platform_id(inv: &Inventory, labels: &Labels) -> String {
    let mut accelerators: Vec<_> = inv
        .accelerators
        .iter()
        .map(|a| (a.kind.clone(), a.name.clone(), a.memory_bytes >> 30))
        .collect();
    accelerators.sort();
    let mut execution_providers: Vec<&str> =
        inv.execution_providers.iter().map(String::as_str).collect();
    execution_providers.sort_unstable();
    let input = FingerprintInput {
        cpu_brand: inv.cpu_brand.trim(),
        cores_available: inv.cpu_set.len(),
        memory_gib: (inv.memory_bytes + (1 << 29)) >> 30,
        accelerators,
        os_name: &inv.os_name,
        arch: &inv.arch,
        ort_version: &inv.ort_version,
        execution_providers,
        labels: labels
            .iter()
            .filter(|(k, _)| k.as_str() != COST_LABEL)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
    };
    let json = serde_json::to_vec(&input).expect("fingerprint input serializes");
    crate::sha256_hex(&json)[..12].to_string()
}

/// CPU brand without trademark marks and marketing suffixes: "Intel(R) Xeon(R) Processor" -> "Intel Xeon".
pub fn short_cpu_brand(brand: &str) -> String {
    let cleaned = brand
        .replace("(R)", "")
        .replace("(TM)", "")
        .replace("(tm)", "");
    let words: Vec<&str> = cleaned
        .split_whitespace()
        .filter(|w| !matches!(*w, "Processor" | "CPU"))
        .filter(|w| !w.ends_with("-Core"))
        .collect();
    let s = words.join(" ");
    if s.is_empty() {
        "unknown CPU".to_string()
    } else {
        s
    }
}

/// Readable platform name: labels (without cost), CPU, cores available, accelerators,
/// e.g. `tier=edge, Intel Xeon, 1 core`.
pub fn platform_name(inv: &Inventory, labels: &Labels) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != COST_LABEL)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.push(short_cpu_brand(&inv.cpu_brand));
    let cores = inv.cpu_set.len();
    parts.push(format!("{cores} core{}", if cores == 1 { "" } else { "s" }));
    for a in &inv.accelerators {
        parts.push(a.name.clone());
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Accelerator;
    use crate::labels::parse_labels;

    fn inv(host: &str, cpus: &[u32]) -> Inventory {
        Inventory {
            hostname: host.into(),
            host_id: format!("id-{host}"),
            cpu_brand: "Intel(R) Xeon(R) Processor".into(),
            cpu_set: cpus.to_vec(),
            memory_bytes: 24 << 30,
            os_name: "Debian".into(),
            arch: "x86_64".into(),
            ort_version: "1.31.1".into(),
            execution_providers: vec!["CPUExecutionProvider".into()],
            ..Default::default()
        }
    }

    #[test]
    fn identical_machines_pool_and_cost_does_not_split_them() {
        let a = platform_id(
            &inv("a", &[0, 1]),
            &parse_labels(&["tier=cloud", "cost_per_hour=0.2"]).unwrap(),
        );
        let b = platform_id(
            &inv("b", &[0, 1]),
            &parse_labels(&["tier=cloud", "cost_per_hour=0.3"]).unwrap(),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn cores_labels_and_accelerators_split_platforms() {
        let labels = parse_labels(&["tier=edge"]).unwrap();
        let one = platform_id(&inv("a", &[0]), &labels);
        let two = platform_id(&inv("a", &[0, 1]), &labels);
        assert_ne!(one, two);
        assert_ne!(
            one,
            platform_id(&inv("a", &[0]), &parse_labels(&["tier=cloud"]).unwrap())
        );
        let mut gpu = inv("a", &[0]);
        gpu.accelerators.push(Accelerator {
            kind: "nvidia-gpu".into(),
            name: "NVIDIA H200".into(),
            memory_bytes: 141 << 30,
        });
        assert_ne!(one, platform_id(&gpu, &labels));
    }

    #[test]
    fn names_are_readable() {
        let labels = parse_labels(&["tier=edge", "cost_per_hour=0.05"]).unwrap();
        assert_eq!(
            platform_name(&inv("a", &[0]), &labels),
            "tier=edge, Intel Xeon, 1 core"
        );
        assert_eq!(
            short_cpu_brand("AMD EPYC 7B13 64-Core Processor"),
            "AMD EPYC 7B13"
        );
    }
}
