//! The network path between an agent and the places its users are: what an agent measures (round-trip
//! time and throughput to the coordinator and to operator-named probe targets), how it is checked when
//! it arrives, and what one request's network time is from it.
//!
//! Method, the same for every target: a warm-up exchange (not counted) opens the connection; then
//! `samples` small exchanges give the round-trip times (their median is the RTT; the smallest is kept
//! too); then one transfer of `probe_bytes` each way. A transfer takes one round trip plus its bytes
//! over the link's throughput, so throughput = bytes / (elapsed − smallest RTT). A TCP echo returns
//! what it receives, so an echo target's transfer gives one figure for both directions (the slower
//! one's). A transfer that fits inside the round-trip noise reads as very fast: on fast links, raise
//! the probe size.

use serde::{Deserialize, Serialize};

use crate::proto::v1 as pb;

/// The target name of an agent's path to its coordinator.
pub const COORDINATOR: &str = "coordinator";

/// The most bytes one probe transfer may carry (both sides refuse more).
pub const MAX_PROBE_BYTES: u64 = 2 << 20;

/// The most paths one report may hold.
pub const MAX_PATHS: usize = 32;

/// An agent's measured path to one target.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkPath {
    /// [`COORDINATOR`] or a probe target's name.
    pub target: String,
    /// What was probed: the coordinator's URL, or HOST:PORT.
    pub address: String,
    /// Median round-trip time, ms.
    pub rtt_ms: f64,
    /// Smallest round-trip time, ms.
    pub rtt_min_ms: f64,
    /// Agent to target, bytes/s; 0 when not measured.
    pub up_bytes_per_s: f64,
    /// Target to agent, bytes/s; 0 when not measured.
    pub down_bytes_per_s: f64,
    /// Bytes of each throughput transfer.
    pub probe_bytes: u64,
    /// Round-trip samples.
    pub samples: u32,
    /// When, Unix ms.
    pub measured_at_ms: i64,
    /// Why it failed; empty on success.
    pub error: String,
}

impl NetworkPath {
    /// Whether the measurement succeeded.
    pub fn ok(&self) -> bool {
        self.error.is_empty()
    }

    /// A failed measurement of `target` at `address`.
    pub fn failed(target: &str, address: &str, error: String, now_ms: i64) -> Self {
        NetworkPath {
            target: target.into(),
            address: address.into(),
            measured_at_ms: now_ms,
            error,
            ..Default::default()
        }
    }
}

impl From<&NetworkPath> for pb::NetworkPath {
    fn from(p: &NetworkPath) -> Self {
        pb::NetworkPath {
            target: p.target.clone(),
            address: p.address.clone(),
            rtt_ms: p.rtt_ms,
            rtt_min_ms: p.rtt_min_ms,
            up_bytes_per_s: p.up_bytes_per_s,
            down_bytes_per_s: p.down_bytes_per_s,
            probe_bytes: p.probe_bytes,
            samples: p.samples,
            measured_at_ms: p.measured_at_ms,
            error: p.error.clone(),
        }
    }
}

impl From<pb::NetworkPath> for NetworkPath {
    fn from(p: pb::NetworkPath) -> Self {
        NetworkPath {
            target: p.target,
            address: p.address,
            rtt_ms: p.rtt_ms,
            rtt_min_ms: p.rtt_min_ms,
            up_bytes_per_s: p.up_bytes_per_s,
            down_bytes_per_s: p.down_bytes_per_s,
            probe_bytes: p.probe_bytes,
            samples: p.samples,
            measured_at_ms: p.measured_at_ms,
            error: p.error,
        }
    }
}

/// Why `name` cannot name a probe target, if it cannot: 1 to 64 of letters, digits, `.`, `_`, `-`.
pub fn check_target_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "'{}' is not a target name (1 to 64 letters, digits, '.', '_' or '-')",
            name.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

/// A probe target an operator named: `NAME=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Its name, as `rank --client` uses it.
    pub name: String,
    /// HOST:PORT of a TCP echo.
    pub address: String,
}

impl std::str::FromStr for ProbeTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, address) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not NAME=HOST:PORT"))?;
        let (name, address) = (name.trim(), address.trim());
        check_target_name(name)?;
        if name == COORDINATOR {
            return Err(format!(
                "'{COORDINATOR}' names the agent's own path to its coordinator, which it always \
                 measures; give this target another name"
            ));
        }
        let port = address
            .rsplit_once(':')
            .and_then(|(host, port)| (!host.is_empty()).then_some(port))
            .ok_or_else(|| format!("'{address}' (of {name}) is not HOST:PORT"))?;
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => {
                return Err(format!(
                    "'{address}' (of {name}): '{port}' is not a port (1 to 65535)"
                ));
            }
        }
        Ok(ProbeTarget {
            name: name.into(),
            address: address.into(),
        })
    }
}

/// Checks a report's paths as they arrive: at most [`MAX_PATHS`], named targets, one per target,
/// finite non-negative figures. The message names the first fault.
pub fn check_report(paths: &[NetworkPath]) -> Result<(), String> {
    if paths.len() > MAX_PATHS {
        return Err(format!(
            "network: {} paths in one report; at most {MAX_PATHS}",
            paths.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for p in paths {
        check_target_name(&p.target).map_err(|e| format!("network: target {e}"))?;
        if !seen.insert(p.target.as_str()) {
            return Err(format!("network: target '{}' appears twice", p.target));
        }
        if p.address.len() > 512 || p.error.len() > 2048 {
            return Err(format!(
                "network: target '{}': address or error too long",
                p.target
            ));
        }
        for (what, v) in [
            ("rtt_ms", p.rtt_ms),
            ("rtt_min_ms", p.rtt_min_ms),
            ("up_bytes_per_s", p.up_bytes_per_s),
            ("down_bytes_per_s", p.down_bytes_per_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!(
                    "network: target '{}': {what} is {v}, not a finite non-negative number",
                    p.target
                ));
            }
        }
        if p.rtt_min_ms > p.rtt_ms {
            return Err(format!(
                "network: target '{}': rtt_min_ms {} exceeds rtt_ms {}",
                p.target, p.rtt_min_ms, p.rtt_ms
            ));
        }
    }
    Ok(())
}

/// Round-trip figures from samples, seconds: (median, smallest). None without samples.
pub fn round_trips(samples_s: &[f64]) -> Option<(f64, f64)> {
    if samples_s.is_empty() {
        return None;
    }
    let min = samples_s.iter().copied().fold(f64::INFINITY, f64::min);
    Some((crate::changepoint::median(samples_s), min))
}

/// Throughput of a transfer of `bytes` that took `elapsed_s` on a path whose smallest round trip is
/// `rtt_min_s`: bytes over the time beyond one round trip (at least a microsecond).
pub fn throughput(bytes: u64, elapsed_s: f64, rtt_min_s: f64) -> f64 {
    bytes as f64 / (elapsed_s - rtt_min_s).max(1e-6)
}

/// One request's network time, ms: the round trip, the request's bytes towards the platform (the
/// agent's download) and the response's bytes back (its upload). None when bytes must cross a
/// direction that was not measured.
pub fn request_time_ms(
    rtt_ms: f64,
    down_bytes_per_s: f64,
    up_bytes_per_s: f64,
    request_bytes: u64,
    response_bytes: u64,
) -> Option<f64> {
    let leg = |bytes: u64, rate: f64| -> Option<f64> {
        match bytes {
            0 => Some(0.0),
            _ if rate > 0.0 => Some(bytes as f64 / rate * 1e3),
            _ => None,
        }
    };
    Some(rtt_ms + leg(request_bytes, down_bytes_per_s)? + leg(response_bytes, up_bytes_per_s)?)
}

/// Bytes per second as people read them: "812 kB/s", "1.2 GB/s" (decimal units, as links are sold).
pub fn format_rate(bytes_per_s: f64) -> String {
    if bytes_per_s <= 0.0 || !bytes_per_s.is_finite() {
        return "—".into();
    }
    let units = [(1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s"), (1.0, "B/s")];
    let (scale, unit) = units
        .iter()
        .find(|(s, _)| bytes_per_s >= *s)
        .copied()
        .unwrap_or((1.0, "B/s"));
    let v = bytes_per_s / scale;
    if v >= 100.0 {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.1} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_targets_parse_and_bad_ones_are_named() {
        let t: ProbeTarget = "office=10.0.0.5:7701".parse().unwrap();
        assert_eq!(
            (t.name.as_str(), t.address.as_str()),
            ("office", "10.0.0.5:7701")
        );
        let t: ProbeTarget = "v6=[::1]:9".parse().unwrap();
        assert_eq!(t.address, "[::1]:9");
        for (bad, says) in [
            ("office", "NAME=HOST:PORT"),
            ("office=10.0.0.5", "not HOST:PORT"),
            ("office=10.0.0.5:0", "not a port"),
            ("office=10.0.0.5:http", "not a port"),
            ("office=:80", "not HOST:PORT"),
            ("of fice=h:1", "not a target name"),
            ("coordinator=h:1", "always"),
        ] {
            let e = bad.parse::<ProbeTarget>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn reports_with_bad_figures_or_repeated_targets_are_refused() {
        let good = NetworkPath {
            target: "coordinator".into(),
            rtt_ms: 2.0,
            rtt_min_ms: 1.0,
            ..Default::default()
        };
        assert!(check_report(std::slice::from_ref(&good)).is_ok());
        let e = check_report(&[good.clone(), good.clone()]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let nan = NetworkPath {
            rtt_ms: f64::NAN,
            ..good.clone()
        };
        assert!(check_report(&[nan]).unwrap_err().contains("rtt_ms"));
        let inverted = NetworkPath {
            rtt_min_ms: 3.0,
            ..good.clone()
        };
        assert!(check_report(&[inverted]).unwrap_err().contains("exceeds"));
        let many: Vec<NetworkPath> = (0..=MAX_PATHS)
            .map(|i| NetworkPath {
                target: format!("t{i}"),
                ..Default::default()
            })
            .collect();
        assert!(check_report(&many).unwrap_err().contains("at most"));
    }

    #[test]
    fn throughput_is_bytes_over_the_time_beyond_one_round_trip() {
        // 100 kB in 150 ms on a 100 ms path: 2 MB/s.
        assert!((throughput(100_000, 0.150, 0.100) - 2e6).abs() < 1.0);
        // A transfer faster than the round-trip noise does not divide by zero or go negative.
        assert!(throughput(1000, 0.099, 0.100) > 0.0);
        let (median, min) = round_trips(&[0.3, 0.1, 0.2, 0.4]).unwrap();
        assert_eq!((median, min), (0.25, 0.1));
        assert_eq!(round_trips(&[]), None);
    }

    #[test]
    fn a_requests_network_time_adds_the_round_trip_and_both_legs() {
        // 100 ms RTT, 1 MB up at 1 MB/s (1 s), 10 kB down at 2 MB/s (5 ms).
        let t = request_time_ms(100.0, 1e6, 2e6, 1_000_000, 10_000).unwrap();
        assert!((t - 1105.0).abs() < 1e-9, "{t}");
        assert_eq!(request_time_ms(7.0, 0.0, 0.0, 0, 0), Some(7.0));
        assert_eq!(request_time_ms(7.0, 0.0, 1e6, 10, 0), None);
    }

    #[test]
    fn rates_read_in_decimal_units() {
        assert_eq!(format_rate(812_000.0), "812 kB/s");
        assert_eq!(format_rate(1.25e9), "1.2 GB/s");
        assert_eq!(format_rate(0.0), "—");
    }
}
