#!/usr/bin/env python3
"""Writes fleetbench's Grafana dashboards (fleet.json, model.json, generative.json) into this folder.

The dashboards are generated so that every panel follows one pattern: Prometheus queries on the names
fleetbench's /metrics endpoint and the OpenTelemetry Collector's Prometheus exporter both produce,
template variables matched with =~ (so "All" is .*), fleet gauges aggregated with max (every
coordinator replica reports the same fleet-wide value) and rates over $__rate_interval.

Run it after changing a panel: python3 dashboards/make_dashboards.py
"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}


def datasource_var():
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
    }


def label_var(name, metric, depends=""):
    q = f"label_values({metric}{depends}, {name})"
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DS,
        "query": {"query": q, "refId": f"var-{name}"},
        "definition": q,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
        "sort": 1,
    }


class Board:
    def __init__(self, uid, title, description, variables):
        self.uid, self.title, self.description = uid, title, description
        self.variables = [datasource_var()] + variables
        self.panels = []
        self.y = 0
        self.x = 0

    def row(self, title):
        if self.x:
            self.x, self.y = 0, self.y + 8
        self.panels.append({
            "type": "row", "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": [],
            "id": len(self.panels) + 1,
        })
        self.y += 1

    def panel(self, title, targets, unit="short", description="", kind="timeseries"):
        w = 12
        self.panels.append({
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": 8, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True}},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                for i, (expr, legend) in enumerate(targets)
            ],
        })
        self.x += w
        if self.x >= 24:
            self.x, self.y = 0, self.y + 8

    def write(self, name):
        board = {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["fleetbench"],
            "schemaVersion": 39,
            "version": 1,
            "editable": True,
            "time": {"from": "now-1h", "to": "now"},
            "refresh": "30s",
            "templating": {"list": self.variables},
            "annotations": {"list": []},
            "panels": self.panels,
        }
        (HERE / name).write_text(json.dumps(board, indent=2) + "\n")


SEL = '{model=~"$model", platform=~"$platform", variant=~"$variant"}'


def model_vars(metric):
    """Variables model, platform and variant, from the label values of `metric`."""
    return [label_var("model", metric),
            label_var("platform", metric, '{model=~"$model"}'),
            label_var("variant", metric, '{model=~"$model"}')]


def quantiles(metric, by, sel, qs=(0.5, 0.99)):
    return [
        (f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{sel}[$__rate_interval])))",
         f"p{int(q * 100)} {{{{{by.replace(', ', '}} {{')}}}}}")
        for q in qs
    ]


def fleet():
    b = Board("fleetbench-fleet", "fleetbench / Fleet",
              "Agents, tasks, ingest and the coordinators' own health.", [])
    b.row("Fleet")
    b.panel("Agents online by platform",
            [("max by (platform) (fleetbench_agents_online)", "{{platform}}")],
            description="Fleet-wide (read from the database), so replicas agree: max, not sum.")
    b.panel("Tasks by state", [("max by (state) (fleetbench_tasks)", "{{state}}")])
    b.row("Ingest")
    b.panel("Windows ingested by outcome",
            [("sum by (outcome) (rate(fleetbench_ingest_windows_total[$__rate_interval]))", "{{outcome}}")],
            unit="reqps")
    b.panel("Window acknowledgement latency",
            quantiles("fleetbench_ingest_ack_duration_seconds", "instance", "", (0.5, 0.99)), unit="s",
            description="From a window's arrival to its acknowledgement, after it is stored; per coordinator.")
    b.panel("Samples measured per second by model",
            [("sum by (model) (rate(fleetbench_inference_samples_total[$__rate_interval]))", "{{model}}")],
            unit="ops")
    b.panel("Telemetry not measured and OTLP export failures",
            [("sum(increase(fleetbench_telemetry_dropped_total[$__rate_interval]))", "windows not measured"),
             ("sum by (signal) (increase(fleetbench_otlp_export_failures_total[$__rate_interval]))",
              "failed {{signal}} exports")])
    b.row("Database and leases")
    b.panel("Database operation latency p99",
            quantiles("db_client_operation_duration_seconds", "db_operation_name", "", (0.99,)), unit="s")
    b.panel("Database operations by outcome",
            [("sum by (outcome) (rate(db_client_operation_duration_seconds_count[$__rate_interval]))",
              "{{outcome}}")], unit="ops")
    b.panel("Leases expired",
            [("sum by (outcome) (increase(fleetbench_leases_expired_total[$__rate_interval]))", "{{outcome}}")],
            description="Tasks whose agent went silent: requeued, or failed for good after max_attempts.")
    b.panel("Artifact bytes transferred",
            [("sum by (direction) (rate(fleetbench_transfer_bytes_total[$__rate_interval]))", "{{direction}}")],
            unit="Bps")
    b.write("fleet.json")


def model():
    sel = SEL
    b = Board("fleetbench-model", "fleetbench / Model",
              "One model across platforms and variants: latency, throughput, CPU, memory, accuracy.",
              model_vars("fleetbench_inference_queries_total"))
    b.row("Latency")
    b.panel("Latency p50 and p99 by platform and variant",
            quantiles("fleetbench_inference_latency_seconds", "platform, variant", sel), unit="s")
    b.panel("Latency p99.9 by platform and variant",
            quantiles("fleetbench_inference_latency_seconds", "platform, variant", sel, (0.999,)), unit="s")
    b.row("Throughput")
    b.panel("Samples per second",
            [(f"sum by (platform, variant) (rate(fleetbench_inference_samples_total{sel}[$__rate_interval]))",
              "{{platform}} {{variant}}")], unit="ops")
    b.panel("Queries completed",
            [(f"sum by (platform, variant) (fleetbench_inference_queries_total{sel})",
              "{{platform}} {{variant}}")])
    b.row("Resources and quality")
    b.panel("Agent process CPU (fraction of one CPU)",
            [(f"max by (platform, variant, cpu_mode) (process_cpu_utilization_ratio{sel})",
              "{{platform}} {{variant}} {{cpu_mode}}")], unit="percentunit")
    b.panel("Agent process memory",
            [(f"max by (platform, variant) (process_memory_usage_bytes{sel})", "mean {{platform}} {{variant}}"),
             (f"max by (platform, variant) (fleetbench_process_memory_peak_bytes{sel})",
              "peak {{platform}} {{variant}}")], unit="bytes")
    b.panel("Top-1 accuracy of the last run",
            [(f"max by (platform, variant) (fleetbench_run_accuracy_ratio{sel})", "{{platform}} {{variant}}")],
            unit="percentunit")
    b.write("model.json")


def generative():
    sel = SEL
    b = Board("fleetbench-generative", "fleetbench / Generative",
              "Decoding across the fleet: time to first token, time per output token, tokens per second.",
              model_vars("fleetbench_generation_tokens_total"))
    b.row("Latency")
    b.panel("Time to first token p50 and p99",
            quantiles("gen_ai_server_time_to_first_token_seconds", "platform, variant", sel), unit="s")
    b.panel("Time per output token p50 and p99",
            quantiles("gen_ai_server_time_per_output_token_seconds", "platform, variant", sel), unit="s")
    b.row("Throughput")
    out = sel.replace("}", ', gen_ai_token_type="output"}')
    inp = sel.replace("}", ', gen_ai_token_type="input"}')
    b.panel("Output tokens per second",
            [(f"sum by (platform, variant) (rate(fleetbench_generation_tokens_total{out}[$__rate_interval]))",
              "{{platform}} {{variant}}")], unit="ops")
    b.panel("Prompt tokens per second",
            [(f"sum by (platform, variant) (rate(fleetbench_generation_tokens_total{inp}[$__rate_interval]))",
              "{{platform}} {{variant}}")], unit="ops")
    b.panel("Requests per second and goodput",
            [(f"sum by (platform, variant) (rate(fleetbench_inference_queries_total{sel}[$__rate_interval]))",
              "requests {{platform}} {{variant}}"),
             (f"sum by (platform, variant) (rate(fleetbench_generation_requests_good_total{sel}[$__rate_interval]))",
              "within SLO {{platform}} {{variant}}")], unit="reqps")
    b.panel("Request latency (arrival to last token) p99",
            quantiles("fleetbench_inference_latency_seconds", "platform, variant", sel, (0.99,)), unit="s")
    b.write("generative.json")


if __name__ == "__main__":
    fleet()
    model()
    generative()
