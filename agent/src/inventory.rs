//! What the agent reports about its machine: host, OS, CPU, the CPUs it may use, memory, accelerators,
//! and the ONNX Runtime it loaded.

use fleetbench_common::domain::{Accelerator, Inventory};
use sysinfo::System;

use fleetbench_runtime::Runtime;

/// CPUs this process may run on (its affinity mask), sorted.
pub fn affinity() -> Vec<u32> {
    // SAFETY: sched_getaffinity fills a cpu_set_t we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            let n = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            return (0..n as u32).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|i| libc::CPU_ISSET(*i, &set))
            .map(|i| i as u32)
            .collect()
    }
}

/// Pins the calling thread (and threads it starts later) to `cpus`. Call before any other thread starts
/// to pin the whole process.
pub fn pin_process(cpus: &[u32]) -> std::io::Result<()> {
    // SAFETY: sched_setaffinity reads a cpu_set_t we built.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(*c as usize, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Parses a CPU list like `0`, `0-3` or `0,2,4-5`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("cpus: '{s}' is not a CPU list like 0, 0-3 or 0,2,4-5");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(format!("cpus: '{s}' names no CPU"));
    }
    Ok(out)
}

/// A stable id of this host, from /etc/machine-id (else the hostname), salted and hashed: the
/// coordinator needs only to tell whether two agents share a host, and the machine id is a secret of
/// the machine's (systemd documents it as confidential).
pub fn host_id() -> String {
    let raw = std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(System::host_name)
        .unwrap_or_else(|| "unknown-host".into());
    salted_host_id(&raw)
}

/// The id fleetbench reports for a raw machine id.
pub fn salted_host_id(raw: &str) -> String {
    fleetbench_common::sha256_hex(format!("fleetbench host id v1\n{raw}").as_bytes())[..32]
        .to_string()
}

/// Collects the inventory. `cpu_set` is the CPUs the agent may use; `host_id` overrides the host id.
pub fn collect(runtime: &Runtime, cpu_set: &[u32], host_id_override: Option<&str>) -> Inventory {
    let mut sys = System::new();
    sys.refresh_cpu_all();
    sys.refresh_memory();
    let brand = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .unwrap_or_default();
    let accelerators = crate::gpu::gpus()
        .into_iter()
        .map(|g| Accelerator {
            kind: "nvidia-gpu".into(),
            name: g.name,
            memory_bytes: g.memory_total,
        })
        .collect();
    Inventory {
        hostname: System::host_name().unwrap_or_default(),
        host_id: host_id_override.map(str::to_string).unwrap_or_else(host_id),
        os_name: System::name().unwrap_or_default(),
        os_version: System::os_version().unwrap_or_default(),
        kernel_version: System::kernel_version().unwrap_or_default(),
        arch: System::cpu_arch(),
        cpu_brand: brand,
        physical_cores: System::physical_core_count().unwrap_or(0) as u32,
        logical_cores: sys.cpus().len() as u32,
        cpu_set: cpu_set.to_vec(),
        memory_bytes: sys.total_memory(),
        ort_version: runtime.version.clone(),
        execution_providers: runtime.providers.clone(),
        accelerators,
        agent_version: fleetbench_common::VERSION.to_string(),
        ort_build_info: runtime.build_info.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("x").unwrap_err().contains("cpus"));
        assert!(!affinity().is_empty());
    }

    #[test]
    fn the_machine_id_is_not_sent_as_it_is() {
        let raw = std::fs::read_to_string("/etc/machine-id").unwrap_or_else(|_| "x".into());
        let id = host_id();
        assert!(!id.contains(raw.trim()), "{id}");
        assert_eq!(id.len(), 32);
        assert_eq!(salted_host_id("abc"), salted_host_id("abc"));
        assert_ne!(salted_host_id("abc"), salted_host_id("abd"));
    }
}
