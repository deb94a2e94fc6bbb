//! Resource telemetry during a run: a background thread samples RSS, system memory, load, CPU frequency
//! and GPU use every period; process CPU time (getrusage) and CPU steal (/proc/stat) are read as deltas
//! over each window. [`Sampler::take`] folds everything since the last call into one record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetbench_proto::v1::ResourceSample;

#[derive(Default)]
struct Acc {
    samples: u32,
    rss_sum: f64,
    rss_peak: u64,
    sysmem_sum: f64,
    load_sum: f64,
    freq_sum: f64,
    freq_n: u32,
    gpu_util_sum: f64,
    gpu_n: u32,
    gpu_mem_peak: u64,
}

/// CPU time of this process, seconds (user, system).
fn process_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills a struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime), t(ru.ru_stime))
}

/// Resident set size of this process, bytes.
pub fn rss_bytes() -> u64 {
    let page = 4096u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * page)
        .unwrap_or(0)
}

fn system_memory_used() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    match (field("MemTotal:"), field("MemAvailable:")) {
        (Some(t), Some(a)) => t.saturating_sub(a),
        _ => 0,
    }
}

fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Mean current frequency of `cpus` in MHz (cpufreq, else /proc/cpuinfo); None when unreadable.
fn cpu_mhz(cpus: &[u32]) -> Option<f64> {
    let from_sysfs: Vec<f64> = cpus
        .iter()
        .filter_map(|c| {
            std::fs::read_to_string(format!(
                "/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_cur_freq"
            ))
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(|khz| khz / 1000.0)
        })
        .collect();
    if !from_sysfs.is_empty() {
        return Some(from_sysfs.iter().sum::<f64>() / from_sysfs.len() as f64);
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut current = None;
    let mut values = Vec::new();
    for line in info.lines() {
        if let Some(v) = line
            .strip_prefix("processor")
            .and_then(|l| l.split(':').nth(1))
        {
            current = v.trim().parse::<u32>().ok();
        } else if line.starts_with("cpu MHz")
            && let (Some(cpu), Some(v)) = (current, line.split(':').nth(1))
            && cpus.contains(&cpu)
            && let Ok(mhz) = v.trim().parse::<f64>()
        {
            values.push(mhz);
        }
    }
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// (steal, total) jiffies over `cpus` from /proc/stat; None when the kernel gives no steal column.
fn steal_jiffies(cpus: &[u32]) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut steal = 0;
    let mut total = 0;
    let mut seen = false;
    for line in stat.lines() {
        let mut it = line.split_whitespace();
        let Some(name) = it.next() else { continue };
        let Some(cpu) = name.strip_prefix("cpu").and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !cpus.contains(&cpu) {
            continue;
        }
        let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
        if v.len() < 8 {
            return None;
        }
        steal += v[7];
        total += v.iter().take(8).sum::<u64>();
        seen = true;
    }
    seen.then_some((steal, total))
}

/// Samples resources in the background while a run goes.
pub struct Sampler {
    acc: Arc<Mutex<Acc>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    cpus: Vec<u32>,
    last_cpu: (f64, f64),
    last_steal: Option<(u64, u64)>,
    last_at: Instant,
}

impl Sampler {
    /// Starts sampling every `period` for an agent using `cpus`.
    pub fn start(period: Duration, cpus: Vec<u32>) -> Sampler {
        let acc = Arc::new(Mutex::new(Acc::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acc, stop, cpus) = (acc.clone(), stop.clone(), cpus.clone());
            std::thread::Builder::new()
                .name("fleetbench-sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        sample_once(&acc, &cpus);
                        let until = Instant::now() + period;
                        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                            std::thread::sleep(Duration::from_millis(10).min(period));
                        }
                    }
                })
                .ok()
        };
        Sampler {
            acc,
            stop,
            thread,
            last_steal: steal_jiffies(&cpus),
            cpus,
            last_cpu: process_cpu(),
            last_at: Instant::now(),
        }
    }

    /// Everything since the last call, as one record.
    pub fn take(&mut self) -> ResourceSample {
        let acc = std::mem::take(&mut *self.acc.lock().expect("sampler lock"));
        let now = Instant::now();
        let wall = now.duration_since(self.last_at).as_secs_f64().max(1e-9);
        let cpu = process_cpu();
        let steal = steal_jiffies(&self.cpus);
        let steal_pct = match (self.last_steal, steal) {
            (Some((s0, t0)), Some((s1, t1))) if t1 > t0 => {
                100.0 * (s1 - s0) as f64 / (t1 - t0) as f64
            }
            (Some(_), Some(_)) => 0.0,
            _ => -1.0,
        };
        let n = acc.samples.max(1) as f64;
        let rss_now = rss_bytes();
        let sample = ResourceSample {
            process_cpu_user_pct: 100.0 * (cpu.0 - self.last_cpu.0) / wall,
            process_cpu_system_pct: 100.0 * (cpu.1 - self.last_cpu.1) / wall,
            rss_mean_bytes: if acc.samples > 0 {
                (acc.rss_sum / n) as u64
            } else {
                rss_now
            },
            rss_peak_bytes: acc.rss_peak.max(rss_now),
            system_memory_used_bytes: if acc.samples > 0 {
                (acc.sysmem_sum / n) as u64
            } else {
                system_memory_used()
            },
            load_average_1m: if acc.samples > 0 {
                acc.load_sum / n
            } else {
                load_1m()
            },
            cpu_frequency_mhz: if acc.freq_n > 0 {
                acc.freq_sum / acc.freq_n as f64
            } else {
                0.0
            },
            cpu_steal_pct: steal_pct,
            gpu_utilization_pct: if acc.gpu_n > 0 {
                acc.gpu_util_sum / acc.gpu_n as f64
            } else {
                -1.0
            },
            gpu_memory_used_bytes: acc.gpu_mem_peak,
            samples: acc.samples.max(1),
        };
        self.last_cpu = cpu;
        self.last_steal = steal;
        self.last_at = now;
        sample
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sample_once(acc: &Mutex<Acc>, cpus: &[u32]) {
    let rss = rss_bytes();
    let sysmem = system_memory_used();
    let load = load_1m();
    let freq = cpu_mhz(cpus);
    let gpus = crate::gpu::gpus();
    let mut a = acc.lock().expect("sampler lock");
    a.samples += 1;
    a.rss_sum += rss as f64;
    a.rss_peak = a.rss_peak.max(rss);
    a.sysmem_sum += sysmem as f64;
    a.load_sum += load;
    if let Some(f) = freq {
        a.freq_sum += f;
        a.freq_n += 1;
    }
    if !gpus.is_empty() {
        a.gpu_util_sum += gpus.iter().map(|g| g.utilization_pct).sum::<f64>() / gpus.len() as f64;
        a.gpu_n += 1;
        a.gpu_mem_peak = a.gpu_mem_peak.max(gpus.iter().map(|g| g.memory_used).sum());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_plausible_under_load() {
        let mut s = Sampler::start(Duration::from_millis(20), crate::inventory::affinity());
        let ballast = std::hint::black_box(vec![1u8; 32 << 20]); // touch 32 MiB
        let t0 = Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let r = s.take();
        drop(ballast);
        assert!(r.samples >= 5, "{r:?}");
        assert!(
            r.process_cpu_user_pct > 50.0 && r.process_cpu_user_pct < 250.0,
            "{r:?}"
        );
        assert!(r.rss_peak_bytes >= 32 << 20, "{r:?}");
        assert!(
            r.rss_mean_bytes > 0 && r.system_memory_used_bytes > r.rss_mean_bytes / 2,
            "{r:?}"
        );
        assert!(r.cpu_steal_pct >= 0.0 || r.cpu_steal_pct == -1.0);
    }
}
