"""The defenses of `backdoor-train detect`, each one Ray task on the poisoned model (on a GPU
with ``scaling.use_gpu``), all at once; defenses/runner.py launches them and writes detection.json.

* ``activations``: activation clustering and spectral signatures on the training set the
  model saw, with the defender's clean images as reference, scored against the poison
  manifest (defenses/activations.py);
* ``neural_cleanse``: a trigger reverse-engineered per class from the defender's clean images,
  the anomalous class flagged, and the flagged trigger unlearned (defenses/cleanse.py), with clean
  accuracy and ASR before and after;
* ``strip``: input filtering by prediction entropy over blends (defenses/strip.py): FRR and FAR.

The defender's clean images are the first ``defense.clean_samples`` test images; every
figure is measured on the test images after them (``split_test``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from backdoor_train.config import ConfigError, ExperimentConfig
from backdoor_train.data.split import Split, to_float

DEFENSES = ("activations", "neural_cleanse", "strip")
ENTROPY_BINS = 40


def split_test(test: Split, clean_samples: int) -> tuple[Split, Split]:
    """(the defender's clean images, the held-out images every figure is measured on)."""
    if clean_samples >= len(test):
        raise ConfigError(f"defense.clean_samples ({clean_samples}) leaves no test images to measure on "
                         f"({len(test)} in all)")
    return test.head(clean_samples), Split(test.images[clean_samples:], test.labels[clean_samples:])


def _device(cfg: ExperimentConfig) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    return torch.device("cpu")


def _rounded(t: torch.Tensor) -> list:
    return torch.round(t.float() * 1e4).div(1e4).tolist()


def run_defense(kind: str, cfg_dict: dict[str, Any], state: dict[str, torch.Tensor],
                poisoned_indices: list[int]) -> dict[str, Any]:
    """One defense (``DEFENSES``) on the model with weights ``state``; a JSON-ready dict."""
    from backdoor_train.storage.staging import load_splits
    from backdoor_train.models.registry import build_model

    cfg = ExperimentConfig.from_dict(cfg_dict)
    device = _device(cfg)
    model = build_model(cfg.model.arch, cfg.dataset)
    model.load_state_dict(state)
    model.eval()
    train, test = load_splits(cfg)
    clean, held = split_test(test, cfg.defense.clean_samples)
    if kind == "activations":
        from backdoor_train.defenses.activations import detect
        from backdoor_train.attack.poison import build_poisoned

        poisoned, _ = build_poisoned(train, cfg.poison, cfg.seed)
        return detect(model, poisoned, frozenset(poisoned_indices), clean, rate_bound=max(cfg.poison.rate, 1e-4),
                      seed=cfg.seed)
    model.to(device)
    if kind == "strip":
        return _strip(cfg, model, clean, held, device)
    if kind == "neural_cleanse":
        return _neural_cleanse(cfg, model, clean, held, device)
    raise ValueError(f"unknown defense {kind!r}")  # a bug, not user input


def _strip(cfg: ExperimentConfig, model: torch.nn.Module, clean: Split, held: Split,
           device: torch.device) -> dict[str, Any]:
    import math

    from backdoor_train.attack.evaluate import attack_mask
    from backdoor_train.defenses.strip import strip
    from backdoor_train.attack.triggers import apply_trigger

    triggered = apply_trigger(held.images[attack_mask(held.labels, cfg.poison)], cfg.poison.trigger)
    found = strip(model, to_float(clean.images).to(device), to_float(held.images).to(device),
                  to_float(triggered).to(device), frr=cfg.defense.strip_frr, n_blends=cfg.defense.strip_blends,
                  seed=cfg.seed)
    # Histograms, not every input's entropy: what the report plots, in a small file.
    top = math.log(cfg.dataset.num_classes)
    edges = torch.linspace(0, top, ENTROPY_BINS + 1)
    for key in ("clean_entropy", "triggered_entropy"):
        values = torch.tensor(found.pop(key)).clamp(0, top)
        found[key + "_histogram"] = torch.histc(values, ENTROPY_BINS, 0, top).int().tolist()
    found["entropy_bin_edges"] = _rounded(edges)
    return found


def _neural_cleanse(cfg: ExperimentConfig, model: torch.nn.Module, clean: Split, held: Split,
                    device: torch.device) -> dict[str, Any]:
    from backdoor_train.defenses.cleanse import mask_mass_near, neural_cleanse, unlearn
    from backdoor_train.attack.evaluate import build_eval_sets, full_evaluation

    x, y = to_float(clean.images).to(device), clean.labels.to(device)
    found = neural_cleanse(model, x, y, cfg.dataset.num_classes, steps=cfg.defense.cleanse_steps, seed=cfg.seed)
    triggers = found.pop("triggers")
    suspect = triggers[found["suspect"]]
    found["suspect_mask"] = _rounded(suspect.mask)
    found["suspect_pattern"] = _rounded(suspect.pattern)
    trigger = cfg.poison.trigger
    if trigger.kind in ("pixel", "patch"):  # where the real trigger is: is the recovered one there?
        size = getattr(trigger, "size", 1)
        found["suspect_mass_near_trigger"] = mask_mass_near(suspect.mask, trigger.row, trigger.col, size)
    # Unlearning (the paper's mitigation) of the flagged class's trigger, measured before and after.
    sets = build_eval_sets(held, cfg.poison).to(device)
    figures = ("clean_accuracy", "attack_success_rate")

    def measure(m: torch.nn.Module) -> dict[str, float]:
        evaluation = full_evaluation(m, sets, cfg.poison.target, cfg.dataset.num_classes)
        return {k: evaluation[k] for k in figures}

    found["unlearning"] = {"before": measure(model)}
    if found["flagged_classes"]:
        fixed = unlearn(copy.deepcopy(model), x, y, suspect, epochs=cfg.defense.unlearn_epochs, seed=cfg.seed)
        found["unlearning"].update(unlearned_class=found["suspect"], after=measure(fixed))
    return found


def remote_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """The Ray resources of one defense task: one training worker's."""
    options: dict[str, Any] = {"num_cpus": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        options["num_gpus"] = cfg.scaling.gpus_per_worker
    return options
