"""A self-contained HTML report of an experiment or a sweep, with matplotlib plots inlined.

Sections: summary table; training curves (loss, clean accuracy, ASR per epoch); clean
accuracy vs ASR per variant; ASR vs poison rate with the spread over seeds (sweeps);
example clean and triggered test images with each model's prediction; detection results
(when ``backdoor-train detect`` has run). Everything is read from the run's storage.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from typing import Any, Optional, Sequence

import torch

from backdoor_train.config import ExperimentConfig
from backdoor_train.results import (EpochBands, EpochRecord, MultiSeedResults, SeedRow, SeedStatistics, SweepSummary,
                                    ResultsError, TrialRow, VariantStatistics)
from backdoor_train.data.split import to_float
from backdoor_train.storage.staging import load_splits
from backdoor_train.attack.evaluate import attack_mask
from backdoor_train.storage.runstore import DETECTION, RunStore, SweepStore
from backdoor_train.storage import Storage, StorageError, open_storage
from backdoor_train.attack.triggers import apply_trigger

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


def _curves(runs: dict[str, Sequence[EpochRecord]]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, history in runs.items():
        epochs = [h.epoch for h in history]
        for ax, key in zip(axes, ("train_loss", "test_accuracy", "attack_success_rate")):
            ax.plot(epochs, [getattr(h, key) for h in history], marker="o", ms=3, label=label)
    for ax, title in zip(axes, ("training loss", "clean test accuracy", "attack success rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    return _png(fig)


def _bands(series: dict[str, EpochBands]) -> str:
    """Per-epoch figures over seeds (``stats.by_epoch`` rows): the mean as a line, the 95% t
    interval shaded, min and max dotted. The backdoor appears abruptly, at a seed-dependent
    epoch; one seed's curve would hide that."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, (label, by_key) in enumerate(series.items()):
        color = f"C{i % 10}"
        for ax, key in zip(axes, ("test_accuracy", "attack_success_rate")):
            rows = getattr(by_key, key)
            epochs = [r.epoch for r in rows]
            ax.plot(epochs, [r.mean for r in rows], marker="o", ms=3, color=color,
                    label=f"{label} (n={rows[0].n})" if rows else label)
            if rows and rows[0].ci95 is not None:
                ax.fill_between(epochs, [r.ci95[0] for r in rows], [r.ci95[1] for r in rows],
                                color=color, alpha=0.2, linewidth=0)
                for bound in ("min", "max"):
                    ax.plot(epochs, [getattr(r, bound) for r in rows], color=color, linestyle=":", linewidth=0.8)
    for ax, title in zip(axes, ("clean test accuracy", "attack success rate")):
        ax.set_title(f"{title}: mean, 95% interval (shaded), min/max (dotted)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=7)
    return _png(fig)


def _statistics_table(stats: SeedStatistics, label: str = "") -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``seeds.seed_statistics``, each row prefixed with ``label`` if given."""
    from backdoor_train.runs.stats import fmt_pct, fmt_pp, fmt_range

    rows = [[label, v, f.clean_accuracy.n, fmt_pct(f.clean_accuracy), fmt_pct(f.attack_success_rate),
             fmt_range(f.attack_success_rate)]
            for v, f in stats.variants.items()]
    difference = stats.clean_accuracy_difference
    if difference is not None:
        rows.append([label, "poisoned − clean (paired)", difference.n, fmt_pp(difference), "", ""])
    header = ["grid point" if label else "", "variant", "seeds", "clean accuracy: mean ± std [95% t interval]",
              "ASR: mean ± std [95% t interval]", "ASR min–max"]
    if not label:
        header, rows = header[1:], [r[1:] for r in rows]
    return header, rows


def _seed_table(rows: Sequence[SeedRow], label: str = "seed") -> str:
    """Each seed's (or sweep trial's) figures and the epoch its ASR first reached 50%."""
    variants = list(rows[0].variants) if rows else []
    header = [label] + [f"{v} {what}" for v in variants for what in ("clean accuracy", "ASR", "ASR ≥ 50% at epoch")]
    body = []
    for row in rows:
        cells: list[Any] = [row.name if isinstance(row, TrialRow) else row.seed]
        for v in variants:
            r = row.variants[v]
            epoch = r.asr_reached_epoch
            cells += [_pct(r.clean_accuracy), _pct(r.attack_success_rate), "never" if epoch is None else epoch]
        body.append(cells)
    return _table(header, body)


def _means(figures: VariantStatistics) -> tuple[float, float]:
    """The means of clean accuracy and ASR over seeds; NaN where no seed had one."""
    return tuple(float("nan") if s.mean is None else s.mean  # type: ignore[return-value]
                 for s in (figures.clean_accuracy, figures.attack_success_rate))


def _acc_vs_asr(variants: dict[str, tuple[float, float]]) -> str:
    """Bars of each variant's (clean accuracy, ASR)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = list(variants)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [variants[n][0] for n in names], 0.4, label="clean accuracy")
    ax.bar([x + 0.2 for x in xs], [variants[n][1] for n in names], 0.4, label="ASR")
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
            image = imgs[j].permute(1, 2, 0).numpy()  # [C, H, W] → [H, W, C], as matplotlib draws it
            if image.shape[2] == 1:
                ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("\n".join(f"{name[:5]}: {p[which][j]}" for name, p in preds.items()), fontsize=7)
        axes[0][j].set_xlabel(f"true {int(test.labels[idx[j]])}", fontsize=7)
    axes[0][0].set_ylabel("clean")
    axes[1][0].set_ylabel("triggered")
    return _png(fig)


def _detection(detection: Optional[dict[str, Any]], cfg: ExperimentConfig, where: str) -> str:
    """Each registered defense's part (defenses/registry.py), in order, under its title; after a
    detector's, its methods' retrains. A defense the file lacks (written before it existed) is left out.
    detection.json is each defense's own dict, read by its ``report_section``: a part it cannot read
    is a ``ResultsError`` naming the file (``where``) and the part."""
    from backdoor_train.defenses.registry import defenses

    if not detection:
        return "<p>No detection results: run <code>backdoor-train detect</code> on the experiment.</p>"
    out = ""
    for defense in defenses():
        if defense.detection_key not in detection:
            continue
        part = defense.detection_key
        try:
            out += f"<h3>{html.escape(defense.title)}</h3>"
            out += _blocks(defense.report_section(detection[part], cfg, detection))
            for method in defense.retrain_methods:
                part = f"retrain.{method}"
                r = detection.get("retrain", {}).get(method)
                if r is not None:
                    out += (f"<p>Retrained without the {r['removed']} samples {html.escape(method)} flagged "
                            f"({r['remaining_poisoned']} poisoned left): clean accuracy "
                            f"{_pct(r['clean_accuracy'])}, ASR {_pct(r['attack_success_rate'])}.</p>")
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
            raise ResultsError(f"{where} is corrupt or not written by this project (its {part} part: "
                               f"{type(exc).__name__}: {str(exc)[:120]}); rerun detect to rewrite it") from None
    return out


def _blocks(blocks: list[Any]) -> str:
    """A defense's report blocks (defenses/base.py) as HTML."""
    from backdoor_train.defenses.base import Plot, Table, Text

    out = ""
    for block in blocks:
        if isinstance(block, Text):
            out += f"<p>{html.escape(block.text)}</p>"
        elif isinstance(block, Table):
            out += _table(block.header, block.rows)
        elif isinstance(block, Plot):
            out += _png(block.figure)
        else:
            raise TypeError(f"not a report block: {block!r}")  # a defense's bug, not user input
    return out


def _page(title: str, parts: dict[str, str]) -> str:
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}h2{margin-top:1.6em}")
    body = "".join(f"<h2>{html.escape(s)}</h2>{parts[s]}" for s in SECTIONS)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"


def experiment_report(cfg: ExperimentConfig, storage: Storage) -> str:
    store = RunStore(storage, cfg.name)
    results = store.read_results()
    if isinstance(results, MultiSeedResults):  # what was run decides, not whether --seeds was given again
        return seeds_report(cfg, storage, results)
    variants = results.variants
    detection = store.read_detection()
    models = {v: store.read_model(v, cfg) for v in variants}
    parts = {
        "Summary": _table(["variant", "clean accuracy", "ASR", "poisoned training images", "fit seconds"],
                          [[v, _pct(r.clean_accuracy), _pct(r.attack_success_rate),
                            results.n_poisoned if v == "poisoned" else 0, f"{r.fit_seconds:.0f}"]
                           for v, r in variants.items()]),
        "Training curves": _curves({v: r.history for v, r in variants.items()}),
        "Clean accuracy vs ASR": _acc_vs_asr({v: (r.clean_accuracy, r.attack_success_rate)
                                              for v, r in variants.items()}),
        "ASR vs poison rate": "<p>A single experiment has one poison rate; see a sweep's report.</p>",
        "Example images": _examples(cfg, models),
        "Detection": _detection(detection, cfg, store.uri(DETECTION)),
    }
    return _page(f"backdoor_train report: {cfg.name}", parts)


def seeds_report(cfg: ExperimentConfig, storage: Storage, results: MultiSeedResults) -> str:
    """The report of a multi-seed experiment (runs/seeds.py): statistics over seeds first."""
    from backdoor_train.runs.seeds import seed_experiments

    stats = results.statistics
    if not results.per_seed or stats is None or results.by_epoch is None:
        raise StorageError(f"{storage.key_uri(cfg.name)}: no seed has finished, there is nothing to report")
    header, rows = _statistics_table(stats)
    seed = results.per_seed[0].seed
    (first,) = seed_experiments(dataclasses.replace(cfg, seed=seed, seeds=(seed,)))
    child = RunStore(open_storage(first.storage), first.name)
    models = {v: child.read_model(v, first) for v in stats.variants}
    failed = (f"<p>{len(results.failures)} seed(s) failed: {html.escape(', '.join(results.failures))}.</p>"
              if results.failures else "")
    parts = {
        "Summary": _table(header, rows) + failed + "<h3>Per seed</h3>" + _seed_table(results.per_seed),
        "Training curves": _bands(results.by_epoch),
        "Clean accuracy vs ASR": _acc_vs_asr({v: _means(f) for v, f in stats.variants.items()}),
        "ASR vs poison rate": "<p>A multi-seed experiment has one poison rate; see a sweep's report.</p>",
        "Example images": f"<p>Models of seed {first.seed}.</p>" + _examples(first, models),
        "Detection": "<p>Detection runs on one trained experiment: one seed's, in its folder.</p>",
    }
    return _page(f"backdoor_train report: {cfg.name} over {len(results.per_seed)} seeds", parts)


def sweep_report(sweep: Any, store: SweepStore, summary: SweepSummary) -> str:
    """The report of a sweep whose folder is ``store``; its trials are experiments in it."""
    import matplotlib.pyplot as plt

    from backdoor_train.runs.seeds import by_epoch_over_seeds
    from backdoor_train.runs.sweep import summarize

    if not summary.trials:
        raise StorageError(f"{summary.summary_uri}: no trial has finished, there is nothing to report")
    results = {t.name: store.trial(t.name).read_experiment_results() for t in summary.trials}
    # The statistics of this code, whichever release wrote summary.json.
    summary = dataclasses.replace(summarize(sweep, results), failures=summary.failures)
    trials = {t.name: t for t in summary.trials}
    rows: list[list[Any]] = []
    header: list[str] = []
    bands = {}
    mean_by_variant: dict[str, tuple[float, float]] = {}
    for g in summary.groups:
        point = json.dumps(g.point) if g.point else "all"
        header, group_rows = _statistics_table(g.statistics, f"{point} ({g.n_poisoned} poisoned)")
        rows += group_rows
        for variant, by_key in by_epoch_over_seeds([results[t] for t in g.trials]).items():
            bands[f"{point if g.point else ''} {variant}".strip()] = by_key
        for variant, f in g.variants.items():
            mean_by_variant[f"{json.dumps(g.point)} {variant}"] = _means(f)

    rate_part = "<p>This sweep's grid has no poison.rate axis.</p>"
    if "poison.rate" in summary.grid:
        fig, ax = plt.subplots(figsize=(7, 3.6))

        def others_of(g: Any) -> str:
            return json.dumps({k: v for k, v in g.point.items() if k != "poison.rate"})

        for other in sorted({others_of(g) for g in summary.groups}):
            groups = sorted((g for g in summary.groups if others_of(g) == other), key=lambda g: g.point["poison.rate"])
            for variant in groups[0].variants:
                rates = [g.point["poison.rate"] * 100 for g in groups]
                asr = [g.variants[variant].attack_success_rate for g in groups]
                rates, asr = [r for r, a in zip(rates, asr) if a.n], [a for a in asr if a.n]  # n 0: no ASR
                ax.errorbar(rates, [a.mean for a in asr],
                            yerr=[[a.mean - a.min for a in asr], [a.max - a.mean for a in asr]],
                            marker="o", capsize=3, label=variant if other == "{}" else f"{other} {variant}")
                for g in groups:  # every seed's own figure
                    for t in g.trials:
                        ax.scatter([g.point["poison.rate"] * 100],
                                   [trials[t].variants[variant].attack_success_rate], s=8, c="k", alpha=0.4)
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("poison rate (% of training images)")
        ax.set_ylabel("attack success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        rate_part = _png(fig) + "<p>Line: mean over seeds; bars: min–max; dots: single seeds.</p>"

    # Example images and detection from the trial with the highest poison rate that has both.
    example_trial = max(results, key=lambda n: results[n].n_poisoned)
    cfg = results[example_trial].config
    example = store.trial(example_trial)
    models = {v: example.read_model(v, cfg) for v in results[example_trial].variants}
    detection = example.read_detection()
    parts = {
        "Summary": _table(header, rows) + "<h3>Per trial</h3>" + _seed_table(summary.trials, "trial"),
        "Training curves": _bands(bands),
        "Clean accuracy vs ASR": _acc_vs_asr(mean_by_variant),
        "ASR vs poison rate": rate_part,
        "Example images": f"<p>From trial {html.escape(example_trial)}.</p>" + _examples(cfg, models),
        "Detection": f"<p>Trial {html.escape(example_trial)}.</p>" + _detection(detection, cfg, example.uri(DETECTION)),
    }
    return _page(f"backdoor_train sweep report: {summary.sweep}", parts)
