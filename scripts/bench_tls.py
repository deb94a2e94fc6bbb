"""What TLS costs the coordinator at saturation: runs fleetbench-simulate RUNS times without and with
--tls (alternating, so drift in the machine hits both alike) and prints the medians of ingest windows/s
and of the steady-state acknowledgement p99.

    .venv/bin/python scripts/bench_tls.py [--runs 5] [--agents 200] [--rate 50] [--duration-s 10]

Build first: cargo build --release --workspace --bins.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args, tls):
    cmd = [
        str(ROOT / "target/release/fleetbench-simulate"),
        "--agents", str(args.agents),
        "--rate", str(args.rate),
        "--duration-s", str(args.duration_s),
    ] + (["--tls"] if tls else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    if report["job_state"] != "succeeded" or report["windows_stored"] != report["windows_sent"]:
        sys.exit(f"a run went wrong: {report}")
    return report["ingest_windows_per_s"], report["ack_latency_steady_ms"]["p99"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--agents", type=int, default=200)
    p.add_argument("--rate", type=float, default=50)
    p.add_argument("--duration-s", type=int, default=10)
    args = p.parse_args()
    results = {False: [], True: []}
    for i in range(args.runs):
        for tls in (False, True):
            ingest, p99 = run(args, tls)
            results[tls].append((ingest, p99))
            print(f"run {i + 1} {'tls  ' if tls else 'plain'}: {ingest:9.1f} windows/s, ack p99 {p99:7.2f} ms",
                  file=sys.stderr)
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
           for k, v in results.items()}
    print(f"{args.agents} agents x {args.rate} windows/s, {args.duration_s} s, median of {args.runs} runs each")
    print(f"{'':8}{'ingest windows/s':>18}{'ack p99 ms':>12}")
    for k, name in ((False, "plain"), (True, "tls")):
        print(f"{name:8}{med[k][0]:18.1f}{med[k][1]:12.2f}")
    d_ingest = 100 * (med[True][0] - med[False][0]) / med[False][0]
    d_p99 = 100 * (med[True][1] - med[False][1]) / med[False][1]
    print(f"{'tls vs':8}{d_ingest:+17.1f}%{d_p99:+11.1f}%")


if __name__ == "__main__":
    main()
