"""A self-contained HTML report of an experiment or a sweep, with matplotlib plots inlined.

Sections: summary table; training curves (loss, clean accuracy, ASR per epoch); clean
accuracy vs ASR per variant; ASR vs poison rate with the spread over seeds (sweeps);
example clean and triggered test images with each model's prediction; detection results
(when ``backdoor-train detect`` has run). Everything is read from the run's storage.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, Optional

import torch

from backdoor_train.config import ExperimentConfig
from backdoor_train.data import to_float
from backdoor_train.datasource import load_splits
from backdoor_train.evaluate import attack_mask
from backdoor_train.experiment import RESULTS_KEY
from backdoor_train.poison import apply_trigger
from backdoor_train.storage import Storage

SECTIONS = ("Summary", "Training curves", "Clean accuracy vs ASR", "ASR vs poison rate",
            "Example images", "Detection")


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:.2%}"


def _curves(runs: dict[str, list[dict[str, Any]]]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, history in runs.items():
        epochs = [h["epoch"] for h in history]
        for ax, key in zip(axes, ("train_loss", "test_accuracy", "attack_success_rate")):
            ax.plot(epochs, [h[key] for h in history], marker="o", ms=3, label=label)
    for ax, title in zip(axes, ("training loss", "clean test accuracy", "attack success rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    return _png(fig)


def _acc_vs_asr(variants: dict[str, dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = list(variants)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [variants[n]["clean_accuracy"] for n in names], 0.4, label="clean accuracy")
    ax.bar([x + 0.2 for x in xs], [variants[n]["attack_success_rate"] for n in names], 0.4, label="ASR")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _examples(cfg: ExperimentConfig, models: dict[str, torch.nn.Module], n: int = 8) -> str:
    import matplotlib.pyplot as plt

    _, test = load_splits(cfg)
    idx = torch.nonzero(attack_mask(test.labels, cfg.poison)).flatten()[:n]
    clean = test.images[idx]
    triggered = apply_trigger(clean, cfg.poison.trigger)
    preds = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            preds[name] = (model(to_float(clean)).argmax(1).tolist(), model(to_float(triggered)).argmax(1).tolist())
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 4.0))
    for j in range(n):
        for row, (imgs, which) in enumerate(((clean, 0), (triggered, 1))):
            ax = axes[row][j]
            ax.imshow(imgs[j].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("\n".join(f"{name[:5]}: {p[which][j]}" for name, p in preds.items()), fontsize=7)
        axes[0][j].set_xlabel(f"true {int(test.labels[idx[j]])}", fontsize=7)
    axes[0][0].set_ylabel("clean")
    axes[1][0].set_ylabel("triggered")
    return _png(fig)


def _detection(detection: Optional[dict[str, Any]]) -> str:
    if not detection:
        return "<p>No detection results: run <code>backdoor-train detect</code> on the experiment.</p>"
    rows = [[m, r["flagged"], r["true_positives"], _pct(r["precision"]), _pct(r["recall"]), f"{r['fpr']:.3%}",
             _pct(r["chance_precision"])] for m, r in detection["methods"].items()]
    out = _table(["method", "flagged", "true positives", "precision", "recall (TPR)", "FPR",
                  "precision by chance"], rows)
    for method, r in detection.get("retrain", {}).items():
        out += (f"<p>Retrained without the {r['removed']} samples {html.escape(method)} flagged "
                f"({r['remaining_poisoned']} poisoned left): clean accuracy {_pct(r['clean_accuracy'])}, "
                f"ASR {_pct(r['attack_success_rate'])}.</p>")
    return out


def _page(title: str, parts: dict[str, str]) -> str:
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}h2{margin-top:1.6em}")
    body = "".join(f"<h2>{html.escape(s)}</h2>{parts[s]}" for s in SECTIONS)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"


def experiment_report(cfg: ExperimentConfig, storage: Storage) -> str:
    from backdoor_train.defense import DETECTION_KEY, load_model

    results = json.loads(storage.read_text(f"{cfg.name}/{RESULTS_KEY}"))
    variants = results["variants"]
    detection = (json.loads(storage.read_text(f"{cfg.name}/{DETECTION_KEY}"))
                 if storage.exists(f"{cfg.name}/{DETECTION_KEY}") else None)
    models = {v: load_model(storage, cfg.name, v, cfg.model.arch) for v in variants}
    parts = {
        "Summary": _table(["variant", "clean accuracy", "ASR", "poisoned training images", "fit seconds"],
                          [[v, _pct(r["clean_accuracy"]), _pct(r["attack_success_rate"]),
                            results["n_poisoned"] if v == "poisoned" else 0, f"{r['fit_seconds']:.0f}"]
                           for v, r in variants.items()]),
        "Training curves": _curves({v: r["history"] for v, r in variants.items()}),
        "Clean accuracy vs ASR": _acc_vs_asr(variants),
        "ASR vs poison rate": "<p>A single experiment has one poison rate; see a sweep's report.</p>",
        "Example images": _examples(cfg, models),
        "Detection": _detection(detection),
    }
    return _page(f"backdoor_train report: {cfg.name}", parts)


def sweep_report(sweep: Any, storage: Storage, summary: dict[str, Any]) -> str:
    """``storage`` is rooted at the sweep's folder; trials are experiments below it."""
    import matplotlib.pyplot as plt

    from backdoor_train.defense import DETECTION_KEY, load_model

    trials = {t["name"]: t for t in summary["trials"]}
    results = {name: json.loads(storage.read_text(f"{name}/{RESULTS_KEY}")) for name in trials}
    rows = []
    for g in summary["groups"]:
        for variant, f in g["variants"].items():
            acc, asr = f["clean_accuracy"], f["attack_success_rate"]
            rows.append([json.dumps(g["point"]), g["n_poisoned"], variant, acc["n"],
                         f"{acc['mean']:.2%} ± {acc['std']:.2%}", f"{asr['mean']:.2%} ± {asr['std']:.2%}",
                         f"{asr['min']:.1%}–{asr['max']:.1%}"])
    curves = {f"{n} {v}": r["variants"][v]["history"] for n, r in results.items() for v in r["variants"]}
    mean_by_variant: dict[str, dict[str, float]] = {}
    for g in summary["groups"]:
        for variant, f in g["variants"].items():
            mean_by_variant[f"{json.dumps(g['point'])} {variant}"] = {
                "clean_accuracy": f["clean_accuracy"]["mean"], "attack_success_rate": f["attack_success_rate"]["mean"]}

    rate_part = "<p>This sweep's grid has no poison.rate axis.</p>"
    if "poison.rate" in summary["grid"]:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        others = sorted({json.dumps({k: v for k, v in g["point"].items() if k != "poison.rate"})
                         for g in summary["groups"]})
        for other in others:
            groups = sorted((g for g in summary["groups"] if json.dumps(
                {k: v for k, v in g["point"].items() if k != "poison.rate"}) == other),
                key=lambda g: g["point"]["poison.rate"])
            for variant in groups[0]["variants"]:
                rates = [g["point"]["poison.rate"] * 100 for g in groups]
                asr = [g["variants"][variant]["attack_success_rate"] for g in groups]
                ax.errorbar(rates, [a["mean"] for a in asr],
                            yerr=[[a["mean"] - a["min"] for a in asr], [a["max"] - a["mean"] for a in asr]],
                            marker="o", capsize=3, label=variant if other == "{}" else f"{other} {variant}")
                for g in groups:  # every seed's own figure
                    for t in g["trials"]:
                        ax.scatter([g["point"]["poison.rate"] * 100],
                                   [trials[t]["variants"][variant]["attack_success_rate"]], s=8, c="k", alpha=0.4)
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("poison rate (% of training images)")
        ax.set_ylabel("attack success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        rate_part = _png(fig) + "<p>Line: mean over seeds; bars: min–max; dots: single seeds.</p>"

    # Example images and detection from the trial with the highest poison rate that has both.
    example_trial = max(results, key=lambda n: results[n]["n_poisoned"])
    cfg = ExperimentConfig.from_dict(results[example_trial]["config"])
    models = {v: load_model(storage, example_trial, v, cfg.model.arch) for v in results[example_trial]["variants"]}
    detection = (json.loads(storage.read_text(f"{example_trial}/{DETECTION_KEY}"))
                 if storage.exists(f"{example_trial}/{DETECTION_KEY}") else None)
    parts = {
        "Summary": _table(["grid point", "poisoned", "variant", "seeds", "clean accuracy", "ASR", "ASR range"],
                          rows),
        "Training curves": _curves(curves),
        "Clean accuracy vs ASR": _acc_vs_asr(mean_by_variant),
        "ASR vs poison rate": rate_part,
        "Example images": f"<p>From trial {html.escape(example_trial)}.</p>" + _examples(cfg, models),
        "Detection": f"<p>Trial {html.escape(example_trial)}.</p>" + _detection(detection),
    }
    return _page(f"backdoor_train sweep report: {summary['sweep']}", parts)
