"""A self-contained HTML report of an experiment or a sweep, with matplotlib plots inlined.

Sections, in ``SECTIONS`` order: the setting and provenance (what ran: attack, data, model,
training, run ids and times, the versions and device); summary table; per-class clean accuracy
and per-source-class ASR; training curves (loss, clean accuracy, ASR per epoch); clean accuracy
vs ASR per variant; ASR vs poison rate with the spread over seeds (sweeps with a poison.rate
axis); example clean and triggered test images with each model's prediction; detection results
(when ``backdoor-train detect`` has run). A section with nothing to show is left out, not shown
empty. Figures are in percent everywhere; a report of one seed says so at the top.

Everything is read from the run's storage, and every value from there is escaped on the way
into the page (``html.escape``): a results file is data, never markup.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
from typing import Any, Iterable, Optional, Sequence

import torch

from backdoor_train.config import ExperimentConfig
from backdoor_train.results import (EpochBands, EpochRecord, MultiSeedResults, SeedRow,
                                    SeedStatistics, SweepSummary, ResultsError, TrialRow, VariantResult,
                                    VariantStatistics)
from backdoor_train.data.split import to_float
from backdoor_train.storage.staging import load_splits
from backdoor_train.attack.evaluate import attack_mask
from backdoor_train.storage.runstore import DETECTION, RunStore, SweepStore
from backdoor_train.storage import Storage, StorageError, open_storage
from backdoor_train.attack.triggers import apply_trigger

SECTIONS = ("Setting", "Summary", "Per-class figures", "Training curves", "Clean accuracy vs ASR",
            "ASR vs poison rate", "Example images", "Detection")
# Shown only when there is something in them: a sweep with a poison.rate axis; a detect run.
OPTIONAL_SECTIONS = ("ASR vs poison rate", "Detection")

# Plot text in points at the PNGs' dpi: 9 pt at 100 dpi is 12.5 px, the smallest text a plot has.
_DPI = 100
_SMALL = 9
_LABEL = 11
# What an environment record holds (runs/experiment.py's ``run_environment``), as the report names it.
_ENVIRONMENT = (("backdoor_train", "backdoor_train"), ("torch", "torch"), ("ray", "Ray"), ("python", "Python"),
                ("platform", "platform"), ("device", "device"))
NOT_RECORDED = "not recorded (results written before versions were recorded)"


def _png(fig: Any, alt: str = "plot") -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return (f'<img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')


def _table(header: list[str], rows: list[list[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{body}</table>"


def _key_values(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column table of names and values (the setting)."""
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or x != x else f"{x:.2%}"


def _percent_axis(ax: Any, label: str, top: Optional[float] = 1.02) -> None:
    """A y axis of fractions shown in percent, labelled, from 0 to ``top`` (1 = 100%); with
    ``top`` None, matplotlib's range around the data (clean accuracy: 98.9% against 99.0% must show)."""
    from matplotlib.ticker import PercentFormatter

    ax.set_ylabel(label)
    if top is not None:
        ax.set_ylim(-0.02, top)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    else:  # as many decimals as the range needs: 98.9%, not 98.900%
        low, high = ax.get_ylim()
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=next(
            (d for d, span in ((0, 0.05), (1, 0.005)) if high - low > span), 2)))


def _legend(ax: Any) -> None:
    """The panel's legend: inside it for a few lines, below it for more (a sweep's), off the data."""
    n = len(ax.get_legend_handles_labels()[1])
    if n > 3:
        ax.legend(fontsize=_SMALL, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    else:
        ax.legend(fontsize=_SMALL)


def _point(point: dict[str, Any]) -> str:
    """A grid point as plots name it: ``rate=0.1%``, ``trigger=patch-3-3-3-1.0`` (tables keep the JSON)."""
    def value(key: str, v: Any) -> str:
        if key == "poison.rate" and isinstance(v, (int, float)):
            return f"{v * 100:g}%"
        if isinstance(v, dict):
            return "-".join(str(x) for x in v.values())
        return str(v)

    return ", ".join(f"{k.rsplit('.', 1)[-1]}={value(k, v)}" for k, v in point.items())


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


# --- the setting and provenance --------------------------------------------------------------

def _when(ts: Optional[float]) -> str:
    if ts is None:
        return "not recorded"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(started: Optional[float], finished: Optional[float]) -> str:
    if started is None or finished is None:
        return f"{_when(started)} – {_when(finished)}"
    return f"{_when(started)} – {_when(finished)} ({(finished - started) / 60:.1f} min)"


def _trigger(trigger: Any) -> str:
    """``pixel: row 3, col 3, value 1.0``: the trigger's kind and its own fields."""
    fields = {k: v for k, v in dataclasses.asdict(trigger).items() if k != "kind"}
    return f"{trigger.kind}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields.items())


def _varied(grid: dict[str, Any], *keys: str) -> Optional[str]:
    """The grid's values of the dotted ``keys`` (or keys below them); None when the grid varies none."""
    hits = {k: v for k, v in grid.items() if any(k == key or k.startswith(key + ".") for key in keys)}
    return "varied by the grid: " + json.dumps(hits) if hits else None


def _setting_rows(cfg: ExperimentConfig, grid: Optional[dict[str, Any]] = None) -> list[tuple[str, str]]:
    """The attack, data, model and training of ``cfg``; with a sweep's ``grid``, what it varies
    is shown as the grid's values instead of the base's."""
    grid = grid or {}
    p, t, s = cfg.poison, cfg.train, cfg.scaling

    def row(name: str, keys: tuple[str, ...], value: str) -> tuple[str, str]:
        return name, _varied(grid, *keys) or value

    sources = (", ".join(map(str, p.source_classes)) if p.source_classes
               else f"every class but the target ({p.target})")
    return [
        row("dataset", ("data",), f"{cfg.dataset.title} (training images: "
                                  f"{cfg.data.train_samples or 'all'}, test images: {cfg.data.test_samples or 'all'})"),
        row("model", ("model",), cfg.model.arch),
        row("trigger", ("poison.trigger",), _trigger(p.trigger)),
        row("poison rate", ("poison.rate",), f"{p.rate:.2%} of the training images"),
        row("target class", ("poison.target",), str(p.target)),
        row("poisoned source classes", ("poison.source_classes",), sources),
        row("poison selection", ("poison.selection",), p.selection),
        row("seed", ("seed", "seeds"), ", ".join(map(str, cfg.seeds)) if cfg.seeds else str(cfg.seed)),
        row("training", ("train",), f"{t.epochs} epochs, global batch {t.batch_size}, {t.optimizer} lr {t.lr:g}, precision {t.precision}"),
        row("variants", ("variants",), ", ".join(cfg.variants)),
        row("scaling", ("scaling",), f"{s.num_workers} Ray Train worker(s) per model, "
                                     f"{'GPU' if s.use_gpu else 'CPU'}"),
    ]


def _environment_rows(environments: Sequence[Optional[dict[str, Any]]]) -> list[tuple[str, str]]:
    """The versions and device of the runs reported (each run's ``environment``, None where its
    file predates the record); differing values are all listed."""
    known = [e for e in environments if isinstance(e, dict)]
    if not known:
        return [("versions and device", NOT_RECORDED)]
    rows = []
    for key, name in _ENVIRONMENT:
        values = list(dict.fromkeys(str(e[key]) for e in known if key in e))
        rows.append((name, " / ".join(values) if values else "not recorded"))
    if len(known) < len(environments):
        rows.append(("note", f"{len(environments) - len(known)} of {len(environments)} runs did not record "
                             f"their versions"))
    return rows


def _single_seed_note(what: str) -> str:
    return (f'<p class="warn"><b>A single seed.</b> {html.escape(what)} The backdoor is learned abruptly, at a '
            "seed-dependent epoch, so one seed is one draw from a spread: over 16 seeds of the article's setting "
            "the poisoned model's ASR ranged 84.9–98.6% (docs/RESULTS.md). Run with <code>--seeds 1-16</code> "
            "for statistics over seeds.</p>")


# --- per-class figures -------------------------------------------------------------------------

def _class_order(keys: Iterable[str]) -> list[str]:
    """Class keys as numbers sort ("2" before "10"); anything else after them, as text."""
    return sorted(set(keys), key=lambda c: (0, int(c), "") if c.isascii() and c.isdigit() else (1, 0, c))


def _mean(values: list[float]) -> float:
    xs = [v for v in values if isinstance(v, (int, float)) and v == v]
    return sum(xs) / len(xs) if xs else float("nan")


def _per_class(groups: dict[str, list[VariantResult]], target: int) -> str:
    """Each variant's (or grid point's) clean accuracy per class and ASR per source class, the
    mean over its runs when there are several."""
    out = ""
    n = max((len(rs) for rs in groups.values()), default=1)
    over = f" (mean over {n} seeds)" if n > 1 else ""
    for attr, caption, note in (
            ("per_class_accuracy", f"Clean test accuracy per true class{over}", ""),
            ("attack_success_rate_per_source_class",
             f"ASR per source class{over}",
             f"The share of a class's triggered test images classified as the target {target}; the clean "
             f"model's figures are the control.")):
        classes = _class_order(c for rs in groups.values() for r in rs for c in getattr(r, attr))
        if not classes:
            continue
        rows = [[label] + [_pct(_mean([getattr(r, attr).get(c, float("nan")) for r in rs])) for c in classes]
                for label, rs in groups.items()]
        out += _table(["class →"] + classes, rows, caption)
        if note:
            out += f"<p>{html.escape(note)}</p>"
    return out


# --- plots ---------------------------------------------------------------------------------------

def _curves(runs: dict[str, Sequence[EpochRecord]]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label, history in runs.items():
        epochs = [h.epoch for h in history]
        for ax, key in zip(axes, ("train_loss", "test_accuracy", "attack_success_rate")):
            ax.plot(epochs, [getattr(h, key) for h in history], marker="o", ms=3, label=label)
    for ax, title in zip(axes, ("training loss", "clean test accuracy", "attack success rate")):
        ax.set_title(title)
        _integer_epochs(ax)
        _legend(ax)
    axes[0].set_ylabel("mean cross-entropy loss")
    _percent_axis(axes[1], "test images classified correctly", top=None)
    _percent_axis(axes[2], "triggered images → target")
    fig.tight_layout()
    return _png(fig, "training curves")


def _bands(series: dict[str, EpochBands]) -> str:
    """Per-epoch figures over seeds (``stats.by_epoch`` rows): the mean as a line, the 95% t
    interval shaded, min and max dotted. The backdoor appears abruptly, at a seed-dependent
    epoch; one seed's curve would hide that."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
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
        ax.set_title(f"{title}: mean, 95% interval (shaded), min/max (dotted)", fontsize=10)
        _integer_epochs(ax)
        _legend(ax)
    _percent_axis(axes[0], "test images classified correctly", top=None)
    _percent_axis(axes[1], "triggered images → target")
    fig.tight_layout()
    return _png(fig, "training curves over seeds")


def _acc_vs_asr(variants: dict[str, tuple[float, float]]) -> str:
    """Bars of each variant's (clean accuracy, ASR), each labelled with its value: a control's
    ASR of a fraction of a percent is a bar too thin to see, its label is not."""
    import matplotlib.pyplot as plt

    import textwrap

    names = list(variants)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(names) + 2), 3.8))
    xs = list(range(len(names)))
    for offset, i, label in ((-0.2, 0, "clean accuracy"), (0.2, 1, "ASR")):
        values = [variants[n][i] for n in names]
        bars = ax.bar([x + offset for x in xs], [0 if v != v else v for v in values], 0.4, label=label)
        ax.bar_label(bars, labels=[_pct(v) for v in values], padding=2, fontsize=_SMALL)
    ax.set_xticks(xs, [textwrap.fill(n, 18) for n in names], fontsize=_SMALL if len(names) > 2 else None)
    _percent_axis(ax, "share of test images", top=1.15)  # room for the labels above 100%
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=_SMALL)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, "clean accuracy and ASR per variant")


def _examples(cfg: ExperimentConfig, models: dict[str, torch.nn.Module], n: int = 8) -> str:
    """The first ``n`` attacked test images, clean and triggered, with every model's prediction
    above each (the target in red: the backdoor fired, or a clean image misread as the target)."""
    import matplotlib.pyplot as plt

    _, test = load_splits(cfg)
    idx = torch.nonzero(attack_mask(test.labels, cfg.poison)).flatten()[:n]
    n = len(idx)
    if n == 0:
        return "<p>The test set holds no image the trigger attacks.</p>"
    clean = test.images[idx]
    triggered = apply_trigger(clean, cfg.poison.trigger)
    preds = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            preds[name] = (model(to_float(clean)).argmax(1).tolist(), model(to_float(triggered)).argmax(1).tolist())
    # One line of 11 pt text per model above each image, and the true label below the clean one.
    line = _LABEL * 1.45 / 72  # inches
    fig, axes = plt.subplots(2, n, figsize=(1.45 * n, 2 * 1.45 + 2 * (len(models) + 1) * line), squeeze=False)
    fig.subplots_adjust(hspace=(len(models) + 1.2) * line / 1.3, wspace=0.08)
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
            for k, (name, p) in enumerate(reversed(list(preds.items()))):
                pred = p[which][j]
                ax.annotate(f"{name} → {pred}", xy=(0.5, 1.0), xycoords="axes fraction",
                            xytext=(0, 3 + k * _LABEL * 1.3), textcoords="offset points", ha="center", va="bottom",
                            fontsize=_LABEL, color="C3" if pred == cfg.poison.target else "black",
                            fontweight="bold" if pred == cfg.poison.target else "normal")
        axes[0][j].set_xlabel(f"true {int(test.labels[idx[j]])}", fontsize=_LABEL)
    axes[0][0].set_ylabel("clean", fontsize=_LABEL)
    axes[1][0].set_ylabel("with trigger", fontsize=_LABEL)
    return (_png(fig, "example images") +
            f"<p>The first {n} test images whose true class is attacked (not the target "
            f"{cfg.poison.target}): top row as they are, bottom row with the trigger. Above each, every "
            f"model's prediction (“model → class”); red where it is the target {cfg.poison.target}.</p>")


# --- detection -----------------------------------------------------------------------------------

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
                    out += (f"<p>Retrained without the {html.escape(str(r['removed']))} samples "
                            f"{html.escape(method)} flagged ({html.escape(str(r['remaining_poisoned']))} poisoned "
                            f"left): clean accuracy {_pct(r['clean_accuracy'])}, "
                            f"ASR {_pct(r['attack_success_rate'])}.</p>")
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


# --- tables of figures over seeds ---------------------------------------------------------------

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


def _asr_text(target: int, n_triggered: Optional[int] = None) -> str:
    over = f"the {n_triggered} " if n_triggered is not None else "the "
    return (f"<p>ASR (attack success rate): the share of {over}triggered test images whose true class is not "
            f"{target} that a model classifies as {target}; the clean model's ASR is the control. Clean "
            f"accuracy: the share of the untouched test images classified correctly; triggered true-class "
            f"accuracy: the share of triggered images still classified as their true class.</p>")


# --- the page --------------------------------------------------------------------------------------

def _anchor(section: str) -> str:
    return section.lower().replace(" ", "-")


def _page(title: str, parts: dict[str, str], notes: str = "") -> str:
    """The page: ``parts``' sections in ``SECTIONS`` order, a contents line, ``notes`` above all."""
    style = ("body{font-family:sans-serif;font-size:15px;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.6em 0}caption{text-align:left;font-weight:bold;padding:4px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "table.kv th{text-align:left;background:#f4f4f4;font-weight:normal}table.kv td{text-align:left}"
             "h2{margin-top:1.6em;border-bottom:1px solid #ddd}img{max-width:100%}"
             "td:first-child{text-align:left}nav{color:#555}"
             ".warn{background:#fff4d6;border-left:4px solid #e0a800;padding:8px 12px}")
    shown = [s for s in SECTIONS if s in parts]
    unknown = set(parts) - set(SECTIONS)
    if unknown:
        raise ValueError(f"not a report section: {sorted(unknown)}")  # a bug here, not user input
    nav = " · ".join(f'<a href="#{_anchor(s)}">{html.escape(s)}</a>' for s in shown)
    body = "".join(f'<section id="{_anchor(s)}"><h2>{html.escape(s)}</h2>{parts[s]}</section>' for s in shown)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>{notes}{body}"
            f"</body></html>")


def experiment_report(cfg: ExperimentConfig, storage: Storage) -> str:
    store = RunStore(storage, cfg.name)
    results = store.read_results()
    if isinstance(results, MultiSeedResults):  # what was run decides, not whether --seeds was given again
        return seeds_report(cfg, storage, results)
    ran = results.config  # what ran, which a rerun's file may have changed since
    variants = results.variants
    detection = store.read_detection()
    models = {v: store.read_model(v, cfg) for v in variants}
    kept = results.kept_from_earlier_runs
    first = next(iter(variants.values()))
    setting = [("experiment", results.experiment), ("run id", results.run_id)]
    setting += [(f"{v} trained in run", run) for v, run in kept.items()]
    setting += [("run", _span(results.started_at, results.finished_at)),
                ("results file", results.results_uri or "not recorded")]
    setting += _setting_rows(ran)
    setting += [("poisoned training images", results.n_poisoned),
                ("test images", f"{first.n_test} ({first.n_triggered} attacked: triggered for the ASR)")]
    setting += _environment_rows([results.environment])
    parts = {
        "Setting": _key_values(setting),
        "Summary": _table(["variant", "clean accuracy", "ASR", "triggered: true-class accuracy",
                           "poisoned training images", "fit seconds"],
                          [[v, _pct(r.clean_accuracy), _pct(r.attack_success_rate),
                            _pct(r.triggered_true_label_accuracy),
                            results.n_poisoned if v == "poisoned" else 0, f"{r.fit_seconds:.0f}"]
                           for v, r in variants.items()]) + _asr_text(ran.poison.target, first.n_triggered),
        "Per-class figures": _per_class({v: [r] for v, r in variants.items()}, ran.poison.target),
        "Training curves": _curves({v: r.history for v, r in variants.items()}),
        "Clean accuracy vs ASR": _acc_vs_asr({v: (r.clean_accuracy, r.attack_success_rate)
                                              for v, r in variants.items()}),
        "Example images": _examples(cfg, models),
    }
    if detection:
        parts["Detection"] = _detection(detection, cfg, store.uri(DETECTION))
    return _page(f"backdoor_train report: {cfg.name}", parts,
                 _single_seed_note(f"These figures come from one training run per variant (seed {ran.seed})."))


def seeds_report(cfg: ExperimentConfig, storage: Storage, results: MultiSeedResults) -> str:
    """The report of a multi-seed experiment (runs/seeds.py): statistics over seeds first."""
    from backdoor_train.runs.seeds import seed_experiments

    stats = results.statistics
    if not results.per_seed or stats is None or results.by_epoch is None:
        raise StorageError(f"{storage.key_uri(cfg.name)}: no seed has finished, there is nothing to report")
    header, rows = _statistics_table(stats)
    ran = results.config
    children = {c.seed: c for c in seed_experiments(dataclasses.replace(
        cfg, seed=results.per_seed[0].seed, seeds=tuple(r.seed for r in results.per_seed)))}
    stores = {s: RunStore(open_storage(c.storage), c.name) for s, c in children.items()}
    per_seed = {s: st.read_experiment_results() for s, st in stores.items()}
    first = children[results.per_seed[0].seed]
    models = {v: stores[first.seed].read_model(v, first) for v in stats.variants}
    failed = (f"<p>{len(results.failures)} seed(s) failed: {html.escape(', '.join(results.failures))}.</p>"
              if results.failures else "")
    setting = [("experiment", results.experiment), ("run", _span(results.started_at, results.finished_at)),
               ("run ids", ", ".join(f"seed {s}: {r.run_id}" for s, r in per_seed.items())),
               ("results file", results.results_uri or "not recorded")]
    setting += _setting_rows(ran)
    setting += [("poisoned training images", results.n_poisoned if results.n_poisoned is not None else "not recorded")]
    setting += _environment_rows([r.environment for r in per_seed.values()])
    parts = {
        "Setting": _key_values(setting),
        "Summary": _table(header, rows) + failed + _asr_text(ran.poison.target) + "<h3>Per seed</h3>"
                   + _seed_table(results.per_seed),
        "Per-class figures": _per_class({v: [r.variants[v] for r in per_seed.values() if v in r.variants]
                                         for v in stats.variants}, ran.poison.target),
        "Training curves": _bands(results.by_epoch),
        "Clean accuracy vs ASR": _acc_vs_asr({v: _means(f) for v, f in stats.variants.items()})
                                 + "<p>Means over seeds.</p>",
        "Example images": f"<p>Models of seed {first.seed}.</p>" + _examples(first, models),
    }
    detection = stores[first.seed].read_detection()
    if detection:  # detect runs on one trained experiment: a seed's, in its folder
        parts["Detection"] = (f"<p>Seed {first.seed}'s poisoned model.</p>"
                              + _detection(detection, first, stores[first.seed].uri(DETECTION)))
    n = len(results.per_seed)
    notes = _single_seed_note("Only one seed of this multi-seed experiment has finished.") if n == 1 else ""
    return _page(f"backdoor_train report: {cfg.name} over {n} seeds", parts, notes)


def sweep_report(sweep: Any, store: SweepStore, summary: SweepSummary) -> str:
    """The report of a sweep whose folder is ``store``; its trials are experiments in it."""
    from backdoor_train.runs.seeds import by_epoch_over_seeds
    from backdoor_train.runs.sweep import summarize

    if not summary.trials:
        raise StorageError(f"{summary.summary_uri}: no trial has finished, there is nothing to report")
    results = {t.name: store.trial(t.name).read_experiment_results() for t in summary.trials}
    # The statistics of this code, whichever release wrote summary.json.
    summary = dataclasses.replace(summarize(sweep, results), failures=summary.failures)
    rows: list[list[Any]] = []
    header: list[str] = []
    bands = {}
    mean_by_variant: dict[str, tuple[float, float]] = {}
    per_class: dict[str, list[VariantResult]] = {}
    for g in summary.groups:
        point = json.dumps(g.point) if g.point else "all"
        short = _point(g.point)
        header, group_rows = _statistics_table(g.statistics, f"{point} ({g.n_poisoned} poisoned)")
        rows += group_rows
        for variant, by_key in by_epoch_over_seeds([results[t] for t in g.trials]).items():
            bands[f"{short} {variant}".strip()] = by_key
        for variant, f in g.variants.items():
            label = f"{short} {variant}".strip()
            mean_by_variant[label] = _means(f)
            per_class[label] = [results[t].variants[variant] for t in g.trials if variant in results[t].variants]

    # Example images from the trial with the most poisoned images; detection from the most
    # poisoned trial that has it (detect runs on one trial).
    by_poison = sorted(results, key=lambda n: -results[n].n_poisoned)
    example_trial = by_poison[0]
    cfg = results[example_trial].config
    example = store.trial(example_trial)
    models = {v: example.read_model(v, cfg) for v in results[example_trial].variants}
    detected = next(((n, d) for n in by_poison if (d := store.trial(n).read_detection())), None)

    setting = [("sweep", summary.sweep), ("grid", json.dumps(summary.grid)),
               ("trials", f"{len(summary.trials)} finished, {len(summary.failures)} failed"),
               ("run", _span(min(r.started_at for r in results.values()),
                             max(r.finished_at for r in results.values()))),
               ("results file", summary.summary_uri or "not recorded")]
    setting += _setting_rows(sweep.base, summary.grid)
    setting += _environment_rows([r.environment for r in results.values()])
    parts = {
        "Setting": _key_values(setting) + "<p>Each trial's run id is in its results.json; the table above is the "
                                          "sweep's base experiment with the grid's values where they differ.</p>",
        "Summary": _table(header, rows) + _asr_text(cfg.poison.target) + "<h3>Per trial</h3>"
                   + _seed_table(summary.trials, "trial"),
        "Per-class figures": _per_class(per_class, cfg.poison.target),
        "Training curves": _bands(bands),
        "Clean accuracy vs ASR": _acc_vs_asr(mean_by_variant) + "<p>Means over each grid point's seeds.</p>",
        "Example images": f"<p>From trial {html.escape(example_trial)}.</p>" + _examples(cfg, models),
    }
    if "poison.rate" in summary.grid:
        parts["ASR vs poison rate"] = _asr_vs_rate(summary)
    if detected:
        name, detection = detected
        parts["Detection"] = (f"<p>Trial {html.escape(name)}.</p>"
                              + _detection(detection, results[name].config, store.trial(name).uri(DETECTION)))
    notes = ""
    if all(len(g.trials) == 1 for g in summary.groups):
        notes = _single_seed_note("Every grid point of this sweep ran with one seed.")
    return _page(f"backdoor_train sweep report: {summary.sweep}", parts, notes)


def _asr_vs_rate(summary: SweepSummary) -> str:
    """Each variant's ASR against the poison rate: mean over seeds, min–max, every seed's dot;
    one line per value of the grid's other axes."""
    import matplotlib.pyplot as plt

    trials = {t.name: t for t in summary.trials}
    fig, ax = plt.subplots(figsize=(8, 4))

    def others_of(g: Any) -> str:
        return _point({k: v for k, v in g.point.items() if k != "poison.rate"})

    for other in sorted({others_of(g) for g in summary.groups}):
        groups = sorted((g for g in summary.groups if others_of(g) == other), key=lambda g: g.point["poison.rate"])
        for variant in groups[0].variants:
            rates = [g.point["poison.rate"] * 100 for g in groups]
            asr = [g.variants[variant].attack_success_rate for g in groups]
            rates, asr = [r for r, a in zip(rates, asr) if a.n], [a for a in asr if a.n]  # n 0: no ASR
            ax.errorbar(rates, [a.mean for a in asr],
                        yerr=[[a.mean - a.min for a in asr], [a.max - a.mean for a in asr]],
                        marker="o", capsize=3, label=f"{other} {variant}".strip())
            for g in groups:  # every seed's own figure
                for t in g.trials:
                    ax.scatter([g.point["poison.rate"] * 100],
                               [trials[t].variants[variant].attack_success_rate], s=8, c="k", alpha=0.4)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("symlog", linthresh=0.05)
    ax.set_xticks(sorted({g.point["poison.rate"] * 100 for g in summary.groups}))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("poison rate (share of the training images poisoned)")
    _percent_axis(ax, "attack success rate")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _png(fig, "ASR vs poison rate") + "<p>Line: mean over seeds; bars: min–max; dots: single seeds.</p>"
