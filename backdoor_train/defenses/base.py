"""The interface of a defense, and its two families (after ART's defences).

A defense is a ``Defense`` subclass, registered with one line in defenses/registry.py; everything
else about it comes from the class:

* ``name``: its registry key, the name of its Ray task; ``record_key``: its key in detection.json
  (the name unless set); ``title``: the heading of its part of the report's Detection section;
* ``Knobs``: a frozen dataclass of its settings, each field the YAML key ``defense.<field>``
  with its default, checked in ``__post_init__`` by errors that name ``defense.<field>``.
  config.DefenseConfig composes every registered defense's (flat, next to
  ``defense.clean_samples``, which all share);
* ``run(ctx)``: the defense on the poisoned model in ``ctx`` (a ``DefenseContext``), a
  JSON-ready dict (what detection.json keeps under ``record_key``);
* ``log_lines(result)``: what ``detect`` prints of that result;
* ``report_section(result, cfg, detection)``: what the report shows of it, as ``Text``,
  ``Table`` and ``Plot`` blocks (reporting/html.py renders them);
* ``retrain_methods`` and ``flagged(result, method)``: the training samples a method flagged,
  which ``detect --retrain METHOD`` retrains without.

The families, each with its own ``run`` and ``evaluate_defence``:

* ``PoisonDetector``, filtering the training set (ART's ``PoisonFilteringDefence``):
  ``detect_poison(ctx)`` returns each method's flagged training indices (``Detection``),
  ``evaluate_defence`` scores them against the poison manifest (precision, recall, FPR);
  retraining without them is offered per method;
* ``ModelDefense``, inspecting the trained model (Neural Cleanse, STRIP): ``inspect(ctx)`` finds
  what it finds with the defender's clean images (a reversed trigger, a rejection threshold),
  ``evaluate_defence(ctx, found)`` measures that against the real attack on the held-out images.

This layer sits below config (which composes the knobs, as it does the triggers'): a defense
takes its ``ExperimentConfig`` as ``ctx.cfg`` without importing it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Optional, Union

import numpy as np
import torch
from torch import nn

from backdoor_train.checks import ConfigError
from backdoor_train.data.split import Split

# --- what a defense runs on ------------------------------------------------------------------


def split_test(test: Split, clean_samples: int) -> tuple[Split, Split]:
    """(the defender's clean images: the first ``clean_samples`` test images, the held-out
    images after them, which every figure is measured on)."""
    if clean_samples >= len(test):
        raise ConfigError(f"defense.clean_samples ({clean_samples}) leaves no test images to measure on "
                          f"({len(test)} in all)")
    return test.head(clean_samples), Split(test.images[clean_samples:], test.labels[clean_samples:])


@dataclass(frozen=True)
class DefenseContext:
    """Everything a defense may use, built by its Ray task (runs/detection.py)."""

    cfg: Any  # the experiment's ExperimentConfig
    knobs: Any  # this defense's Knobs, as cfg.defense holds them
    model: nn.Module  # the poisoned model, in eval mode, on the CPU
    device: torch.device  # where a defense may move it (a GPU with scaling.use_gpu)
    train: Split  # the training split as loaded, before poisoning
    clean: Split  # the defender's clean images
    held: Split  # the held-out test images every figure is measured on
    poisoned_indices: frozenset[int]  # the poison manifest: for scoring, never for finding
    say: Callable[[str], None] = print  # a progress line (the task's is silent with --quiet)

    @cached_property
    def poisoned_train(self) -> Split:
        """The training set as the model saw it, rebuilt from the config."""
        from backdoor_train.attack.poison import build_poisoned

        return build_poisoned(self.train, self.cfg.poison, self.cfg.seed)[0]


# --- what the report shows of a defense -------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text (escaped when rendered)."""

    text: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class Plot:
    """A matplotlib figure, inlined as a PNG and closed when rendered."""

    figure: Any


Block = Union[Text, Table, Plot]


def pct(x: float) -> str:
    return "n/a" if x != x else f"{x:.2%}"


def rounded(t: torch.Tensor) -> list:
    """A tensor as nested lists of 4-decimal floats: small in detection.json."""
    return torch.round(t.float() * 1e4).div(1e4).tolist()


# --- the interface ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoKnobs:
    """The knobs of a defense that has none."""


class Defense(ABC):
    name: ClassVar[str]
    title: ClassVar[str]
    Knobs: ClassVar[type] = NoKnobs
    record_key: ClassVar[Optional[str]] = None  # detection.json's key for the result; None: the name

    @property
    def detection_key(self) -> str:
        return self.record_key or self.name

    @abstractmethod
    def run(self, ctx: DefenseContext) -> dict[str, Any]:
        """The defense on ``ctx.model``: a JSON-ready dict."""

    def log_lines(self, result: dict[str, Any]) -> list[str]:
        return []

    def report_section(self, result: dict[str, Any], cfg: Any, detection: dict[str, Any]) -> list[Block]:
        """The blocks the report shows under ``title``; ``detection`` is the whole of
        detection.json (its ``defender_clean_samples``, the other defenses' results)."""
        return []

    @property
    def retrain_methods(self) -> tuple[str, ...]:
        """The methods whose flagged training samples ``detect --retrain`` can leave out."""
        return ()

    def flagged(self, result: dict[str, Any], method: str) -> list[int]:
        """The training indices ``method`` (one of ``retrain_methods``) flagged in ``result``."""
        raise KeyError(f"{self.name} flags no training samples (method {method!r})")


# --- poison detectors: the training set filtered ----------------------------------------------


@dataclass(frozen=True)
class Detection:
    """What one detection method flagged: training-set indices, and the figure it decided on
    per training label (``figure``: its key in detection.json, plotted by the report)."""

    indices: np.ndarray
    figure: str = ""
    per_label: dict[int, float] = field(default_factory=dict)


def score(flagged: np.ndarray, poisoned: frozenset[int], n_total: int) -> dict[str, Any]:
    """``flagged`` training indices against the manifest's ``poisoned`` ones."""
    flagged_set = set(int(i) for i in flagged)
    tp = len(flagged_set & poisoned)
    fp = len(flagged_set) - tp
    fn = len(poisoned) - tp
    tn = n_total - tp - fp - fn
    return {
        "flagged": len(flagged_set), "true_positives": tp, "false_positives": fp,
        "false_negatives": fn, "true_negatives": tn,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "tpr": tp / (tp + fn) if tp + fn else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
        # What flagging the same number of samples at random would catch, for comparison.
        "chance_precision": len(poisoned) / n_total if n_total else 0.0,
    }


class PoisonDetector(Defense):
    """Finds the poisoned samples of the training set; its result maps each of ``methods`` to
    its score, its flagged ``indices`` and its per-label figure."""

    methods: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def detect_poison(self, ctx: DefenseContext) -> dict[str, Detection]:
        """Each method's flagged indices of ``ctx.poisoned_train`` (the manifest unseen)."""

    def evaluate_defence(self, flagged: np.ndarray, poisoned: frozenset[int], n_total: int) -> dict[str, Any]:
        return score(flagged, poisoned, n_total)

    def run(self, ctx: DefenseContext) -> dict[str, Any]:
        return self.record(self.detect_poison(ctx), ctx.poisoned_indices, len(ctx.train))

    def record(self, found: dict[str, Detection], poisoned: frozenset[int], n_total: int) -> dict[str, Any]:
        """The JSON-ready result of ``found``, scored."""
        out = {}
        for method, d in found.items():
            out[method] = {**self.evaluate_defence(d.indices, poisoned, n_total),
                           "indices": sorted(int(i) for i in d.indices)}
            if d.figure:  # per label (JSON keys: strings)
                out[method][d.figure] = {str(c): v for c, v in d.per_label.items()}
        return out

    @property
    def retrain_methods(self) -> tuple[str, ...]:
        return self.methods

    def flagged(self, result: dict[str, Any], method: str) -> list[int]:
        return list(result[method]["indices"])

    def log_lines(self, result: dict[str, Any]) -> list[str]:
        return [f"{method}: flagged {r['flagged']}, precision {r['precision']:.2%}, recall {r['recall']:.2%}, "
                f"FPR {r['fpr']:.3%} (chance precision {r['chance_precision']:.2%})" for method, r in result.items()]

    def report_section(self, result: dict[str, Any], cfg: Any, detection: dict[str, Any]) -> list[Block]:
        rows = [[m, r["flagged"], r["true_positives"], pct(r["precision"]), pct(r["recall"]), f"{r['fpr']:.3%}",
                 pct(r["chance_precision"])] for m, r in result.items()]
        return [Table(["method", "flagged", "true positives", "precision", "recall (TPR)", "FPR",
                       "precision by chance"], rows)]


# --- model defenses: the trained model inspected ----------------------------------------------


class ModelDefense(Defense):
    """Inspects the trained model with the defender's clean images, then measures what it found
    against the real attack."""

    @abstractmethod
    def inspect(self, ctx: DefenseContext) -> dict[str, Any]:
        """What the defense finds with the defender's clean images (``ctx.clean``)."""

    @abstractmethod
    def evaluate_defence(self, ctx: DefenseContext, found: dict[str, Any]) -> dict[str, Any]:
        """``found`` measured on the held-out images (``ctx.held``): the JSON-ready result."""

    def run(self, ctx: DefenseContext) -> dict[str, Any]:
        return self.evaluate_defence(ctx, self.inspect(ctx))


def check_knobs(knobs: type) -> None:
    """A defense's ``Knobs`` as config composes them: a frozen dataclass, every field with a
    default (a config without the key gets it). A ``TypeError``: a bug, not user input."""
    if not (dataclasses.is_dataclass(knobs) and isinstance(knobs, type) and knobs.__dataclass_params__.frozen):
        raise TypeError(f"{knobs!r}: a defense's Knobs must be a frozen dataclass")
    for f in dataclasses.fields(knobs):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{knobs.__name__}.{f.name}: a knob needs a default")
