"""Writes the Grafana dashboard for backdoor_train's metrics (k8s/base/monitoring/grafana-dashboard.json).

The JSON is generated so that every panel's query names a metric the code exports; a test
checks that it does. Run: python scripts/make_dashboard.py
"""

import json
import os

SEL = 'experiment=~"$experiment",variant=~"$variant"'


def panel(pid, title, exprs, unit, x, y, w=12, h=8, kind="timeseries", legend="{{variant}} rank {{rank}}"):
    return {
        "id": pid, "type": kind, "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else
                   {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "orientation": "auto", "textMode": "auto", "colorMode": "value"},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}} for i, e in enumerate(exprs)],
    }


panels = [
    panel(1, "Final clean test accuracy (Pushgateway)", [f"backdoor_train_final_test_accuracy_ratio{{{SEL}}}"],
          "percentunit", 0, 0, 8, 5, "stat", "{{variant}}"),
    panel(2, "Final attack success rate (Pushgateway)", [f"backdoor_train_final_attack_success_ratio{{{SEL}}}"],
          "percentunit", 8, 0, 8, 5, "stat", "{{variant}}"),
    panel(3, "Poisoned training images", [f"max by (variant) (backdoor_train_poisoned_samples{{{SEL}}})"],
          "none", 16, 0, 8, 5, "stat", "{{variant}}"),
    panel(4, "Training loss", [f"backdoor_train_training_loss{{{SEL},rank=\"0\"}}"], "none", 0, 5,
          legend="{{variant}}"),
    panel(5, "Clean test accuracy", [f"backdoor_train_test_accuracy_ratio{{{SEL},rank=\"0\"}}"], "percentunit",
          12, 5, legend="{{variant}}"),
    panel(6, "Attack success rate", [f"backdoor_train_attack_success_ratio{{{SEL},rank=\"0\"}}"], "percentunit",
          0, 13, legend="{{variant}}"),
    panel(7, "Epoch", [f"backdoor_train_epoch{{{SEL},rank=\"0\"}}"], "none", 12, 13, legend="{{variant}}"),
    panel(8, "Throughput per worker", [f"backdoor_train_throughput_samples_per_second{{{SEL}}}",
                                       f"rate(backdoor_train_samples_processed_total{{{SEL}}}[2m])"],
          "none", 0, 21),
    panel(9, "Epoch duration (p50, p95)", [
        f"histogram_quantile(0.5, sum by (le, variant) (rate(backdoor_train_epoch_duration_seconds_bucket{{{SEL}}}[10m])))",
        f"histogram_quantile(0.95, sum by (le, variant) (rate(backdoor_train_epoch_duration_seconds_bucket{{{SEL}}}[10m])))"],
          "s", 12, 21, legend="{{variant}}"),
    panel(10, "Checkpoint save duration (p95)", [
        f"histogram_quantile(0.95, sum by (le, variant) (rate(backdoor_train_checkpoint_save_duration_seconds_bucket{{{SEL}}}[10m])))"],
          "s", 0, 29, 8, legend="{{variant}}"),
    panel(11, "Checkpoint size and bytes written", [f"backdoor_train_checkpoint_size_bytes{{{SEL}}}",
                                                   f"rate(backdoor_train_checkpoint_written_bytes_total{{{SEL}}}[5m])"],
          "bytes", 8, 29, 8),
    panel(12, "Checkpoint failures", [f"increase(backdoor_train_checkpoint_failures_total{{{SEL}}}[1h])"],
          "none", 16, 29, 8),
    panel(13, "Run status", [f"backdoor_train_run_status{{{SEL}}} == 1"], "none", 0, 37, 12, 6, "stat",
          "{{variant}} rank {{rank}}: {{status}}"),
    panel(14, "Last success", [f"time() - max by (variant) (backdoor_train_last_success_timestamp_seconds{{{SEL}}})"],
          "s", 12, 37, 12, 6, "stat", "{{variant}}"),
]

dashboard = {
    "uid": "backdoor-train", "title": "backdoor_train: training and attack results",
    "tags": ["backdoor_train", "ray"], "timezone": "browser", "schemaVersion": 39, "version": 1,
    "refresh": "10s", "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
        {"name": "experiment", "type": "query", "label": "Experiment", "includeAll": True, "multi": True,
         "datasource": {"type": "prometheus", "uid": "${datasource}"}, "refresh": 2,
         "query": {"query": "label_values(backdoor_train_epoch, experiment)", "refId": "experiment"},
         "definition": "label_values(backdoor_train_epoch, experiment)"},
        {"name": "variant", "type": "custom", "label": "Variant", "includeAll": True, "multi": True,
         "query": "clean,poisoned",
         "options": [{"text": v, "value": v, "selected": False} for v in ("clean", "poisoned")]},
    ]},
    "panels": panels,
}

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(root, "k8s", "components", "monitoring", "grafana-dashboard.json")
    with open(out, "w") as fh:
        json.dump(dashboard, fh, indent=1)
        fh.write("\n")
    print(out)
