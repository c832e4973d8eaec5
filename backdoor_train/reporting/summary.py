"""Readable terminal tables of an experiment's results."""

from __future__ import annotations

from backdoor_train.results import ExperimentResults


def _pct(x: float) -> str:
    return "   n/a" if x != x else f"{x * 100:6.2f}%"


def format_results(results: ExperimentResults) -> str:
    target = results.config.poison.target
    variants = results.variants
    lines = [
        f"experiment {results.experiment}  (run {results.run_id}, "
        f"{results.n_poisoned} poisoned training images, target {target})",
        "",
        f"{'variant':<10} {'clean acc':>10} {'ASR trigger→' + str(target):>16} {'triggered true-label acc':>25} {'fit':>8}",
    ]
    for name, v in variants.items():
        lines.append(f"{name:<10} {_pct(v.clean_accuracy):>10} {_pct(v.attack_success_rate):>16} "
                     f"{_pct(v.triggered_true_label_accuracy):>25} {v.fit_seconds:7.1f}s")
    lines.append(f"(ASR over {next(iter(variants.values())).n_triggered} triggered test images whose true "
                 f"label is not {target}; the clean model's figure is the control)")
    # The dataset's classes, as evaluated (JSON keys: sorted as numbers, not as strings).
    classes = sorted(next(iter(variants.values())).per_class_accuracy, key=int)
    lines += ["", "per-class clean accuracy:", f"{'variant':<10} " + " ".join(f"{c:>7}" for c in classes)]
    for name, v in variants.items():
        lines.append(f"{name:<10} " + " ".join(f"{_pct(v.per_class_accuracy[c]):>7}" for c in classes))
    lines += ["", f"results: {results.results_uri or '(not saved)'}"]
    return "\n".join(lines)
