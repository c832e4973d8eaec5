"""Typed result records: what a run writes to ``results.json`` (one experiment's, or a multi-seed
experiment's) and a sweep to ``summary.json``. Each file is a frozen dataclass with its one
writer, ``to_dict``, and its one reader, ``from_stored``; storage/runstore.py moves them in and
out of storage, the drivers (runs/) build them, and the report, the terminal tables and the CLI
read their attributes.

``from_stored(data, where)`` reads a file of any release. Each top-level record's ``_upgrade`` is
the only place that knows the layouts before today's (as ``ExperimentConfig.from_stored`` is for
the config a file holds); then every key is checked against the record's field types, and a key
that is missing or of the wrong type is one ``ResultsError`` naming the file (``where``) and the
dotted key. Keys a later release may add are ignored.

No file written so far carries a version: ``to_dict`` writes exactly today's keys, and an earlier
layout is told by its keys (a record read back says which in ``schema_version``, not written).
The layouts:

``ExperimentResults`` (an experiment's results.json)
    1. before the variants trained at once: a variant's timing is ``fit_seconds`` alone, an epoch
       has no ``eval_seconds`` or ``ended_at`` (the first runs no ``world_size`` either)
    2. before a rerun of fewer variants kept the others: no ``kept_from_earlier_runs``
    3. today's
``MultiSeedResults`` (a multi-seed experiment's results.json): 1, today's
``SweepSummary`` (a sweep's summary.json)
    1. before the statistics over seeds: each figure described by mean, population std (0 for
       one seed), min, max and n, no interval; a trial row without ``results_uri`` or
       ``asr_reached_epoch``
    2. today's

A key added that a reader can go without (``_known()``: written only when known, None when
absent) is no new layout: ``ExperimentResults.environment`` (the versions and device that ran
it) came so, and files without it read as "not recorded".

A later change of a layout bumps that record's ``SCHEMA_VERSION``, writes it as the file's
``schema_version`` key, and teaches its ``_upgrade`` the layout before.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Union

from backdoor_train.checks import ConfigError
from backdoor_train.config import ExperimentConfig


class ResultsError(ValueError):
    """A results or summary file that is not what a run of this project writes (a key missing
    or of the wrong type), naming the file and the key."""


# Field metadata: a key that earlier layouts lack and that is written only when known, and a
# field that is no key of the file at all (where it was read from, which layout it was).
_OMIT_IF_NONE = "omit_if_none"
_NOT_STORED = "not_stored"


def _known(default: Any = None) -> Any:
    return field(default=default, metadata={_OMIT_IF_NONE: True})


def _not_stored(default: Any = None) -> Any:
    return field(default=default, compare=False, repr=False, metadata={_NOT_STORED: True})


@dataclass(frozen=True, kw_only=True)
class _Record:
    """The writer and the field-by-field reader every record shares."""

    def to_dict(self) -> dict[str, Any]:
        """The record as its file holds it (JSON types: lists, not tuples)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get(_NOT_STORED) or (value is None and f.metadata.get(_OMIT_IF_NONE)):
                continue
            out[f.name] = _to_json(value)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str, key: str = "") -> Any:
        """The record from a file's (already upgraded) JSON object at dotted ``key``."""
        if not isinstance(data, dict):
            raise _corrupt(where, key, f"must be a JSON object (got {_show(data)})")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get(_NOT_STORED):
                continue
            sub = f"{key}.{f.name}" if key else f.name
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise _corrupt(where, sub, "is missing")
                continue
            kwargs[f.name] = _read(hints[f.name], data[f.name], where, sub)
        return cls(**kwargs)


def _corrupt(where: str, key: str, problem: str) -> ResultsError:
    what = f"key {key} {problem}" if key else f"the file {problem}"
    return ResultsError(f"{where} is corrupt or not written by this project ({what}); rerun to rewrite it")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _to_json(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, ExperimentConfig):
        return _to_json(value.to_dict())
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _read(tp: Any, value: Any, where: str, key: str) -> Any:
    """``value`` from a JSON file as type ``tp``; numbers keep the value they were written with."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _read(inner, value, where, key)
    if isinstance(tp, type) and issubclass(tp, _Record):
        return tp.from_dict(value, where, key)
    if tp is ExperimentConfig:
        if not isinstance(value, dict):
            raise _corrupt(where, key, f"must be a JSON object (got {_show(value)})")
        try:
            return ExperimentConfig.from_stored(value)
        except ConfigError as exc:
            raise ResultsError(f"{where}: its {key} is no valid setting today ({exc})") from None
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise _corrupt(where, key, f"must be a list (got {_show(value)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_read(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _corrupt(where, key, f"must hold {len(args)} values (got {_show(value)})")
        return tuple(_read(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _corrupt(where, key, f"must be a JSON object (got {_show(value)})")
        return {k: _read(item, v, where, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _corrupt(where, key, f"must be a number (got {_show(value)})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _corrupt(where, key, f"must be an integer (got {_show(value)})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _corrupt(where, key, f"must be a string (got {_show(value)})")
        return value
    raise TypeError(f"unsupported result type {tp} at {key}")  # a bug here, not a corrupt file


# --- one experiment ------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class EpochRecord(_Record):
    """One epoch of a variant's training, as its workers measured it (training/worker.py)."""

    epoch: int
    train_loss: float
    test_accuracy: float
    attack_success_rate: float  # NaN without triggered test images
    epoch_seconds: float
    worker_samples_per_second: float
    samples_per_second: float
    world_size: Optional[int] = _known()  # None: before layout 1's later runs
    eval_seconds: Optional[float] = _known()  # None: layout 1
    ended_at: Optional[float] = _known()  # wall clock at the epoch's end; None: layout 1


@dataclass(frozen=True, kw_only=True)
class VariantResult(_Record):
    """One trained variant: attack/evaluate.py's figures of its final model, what it trained on,
    how long the fit took, where its checkpoint is, and every epoch."""

    clean_accuracy: float
    attack_success_rate: float
    triggered_true_label_accuracy: float
    per_class_accuracy: dict[str, float]  # by class, as a string ("0".."9")
    attack_success_rate_per_source_class: dict[str, float]
    n_test: int
    n_triggered: int
    train_sha256: str
    fit_seconds: float
    fit_started_at: Optional[float] = _known()  # wall clock; None: layout 1
    fit_finished_at: Optional[float] = _known()
    checkpoint: str
    history: tuple[EpochRecord, ...]


@dataclass(frozen=True, kw_only=True)
class ExperimentResults(_Record):
    """An experiment's results.json: every variant's figures plus the config."""

    SCHEMA_VERSION: ClassVar[int] = 3

    experiment: str
    run_id: str
    started_at: float
    finished_at: float
    poison_seconds: float
    n_poisoned: int
    poison_manifest: str  # its URI
    variants: dict[str, VariantResult]  # in VARIANTS order
    kept_from_earlier_runs: dict[str, str]  # variant -> the run that trained it (not this one)
    config: ExperimentConfig
    # What ran it (runs/experiment.py's ``run_environment``): package versions, Python, the device.
    # Absent (None) in files of earlier releases, which did not record it.
    environment: Optional[dict[str, str]] = _known()
    results_uri: Optional[str] = _not_stored()  # where it was written or read
    schema_version: int = _not_stored(SCHEMA_VERSION)  # the layout it was read from

    @classmethod
    def from_stored(cls, data: Any, where: str) -> "ExperimentResults":
        """An experiment's results.json of any release, in today's schema; a ``ResultsError``
        naming ``where`` and the key when it is not one."""
        if isinstance(data, dict) and "per_seed" in data:
            raise ResultsError(f"{where} holds a multi-seed experiment's results, not one experiment's")
        data, version = cls._upgrade(_object(data, where))
        return dataclasses.replace(cls.from_dict(data, where), schema_version=version)

    @staticmethod
    def _upgrade(data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        if "kept_from_earlier_runs" in data:
            return data, 3
        variants = data.get("variants")
        timed = isinstance(variants, dict) and any(
            isinstance(v, dict) and "fit_started_at" in v for v in variants.values())
        # No earlier release kept another run's variants; layout 1's missing timings and epoch
        # keys read as unknown (None).
        return {**data, "kept_from_earlier_runs": {}}, 2 if timed else 1


# --- statistics over seeds (runs/stats.py describes, runs/seeds.py and runs/sweep.py use) ----

@dataclass(frozen=True, kw_only=True)
class Description(_Record):
    """A figure over seeds: n, mean, sample std, the 95% t interval of the mean, min and max.
    One value has no std or interval (None); no value (all NaN) has None everywhere."""

    n: int
    mean: Optional[float]
    std: Optional[float]
    ci95: Optional[tuple[float, float]]
    min: Optional[float]
    max: Optional[float]


@dataclass(frozen=True, kw_only=True)
class EpochDescription(Description):
    """One epoch's figure described over seeds."""

    epoch: int


@dataclass(frozen=True, kw_only=True)
class EpochBands(_Record):
    """A variant's per-epoch clean accuracy and ASR, described over seeds epoch by epoch."""

    test_accuracy: tuple[EpochDescription, ...]
    attack_success_rate: tuple[EpochDescription, ...]


@dataclass(frozen=True, kw_only=True)
class VariantStatistics(_Record):
    """A variant's final clean accuracy and ASR described over seeds."""

    clean_accuracy: Description
    attack_success_rate: Description


@dataclass(frozen=True, kw_only=True)
class SeedStatistics:
    """What runs/seeds.py's ``seed_statistics`` finds: per variant, its figures over seeds; with
    both variants, the paired difference in clean accuracy (poisoned - clean, seed by seed)."""

    variants: dict[str, VariantStatistics]
    clean_accuracy_difference: Optional[Description] = None


@dataclass(frozen=True, kw_only=True)
class SeedFigures(_Record):
    """One seed's final figures of a variant and the first epoch its ASR reached 50%."""

    clean_accuracy: float
    attack_success_rate: float
    asr_reached_epoch: Optional[int]  # None: never (or, read from a sweep summary of layout 1, unknown)


@dataclass(frozen=True, kw_only=True)
class SeedRow(_Record):
    """One seed's experiment, as the statistics over seeds use it."""

    seed: int
    n_poisoned: int
    results_uri: Optional[str]  # the seed's results.json
    variants: dict[str, SeedFigures]


@dataclass(frozen=True, kw_only=True)
class TrialRow(SeedRow):
    """A sweep trial's row: its seed's figures plus its name and grid point."""

    name: str
    point: dict[str, Any]  # dotted key -> value, the grid's keys other than seed

    @classmethod
    def of(cls, row: SeedRow, name: str, point: dict[str, Any]) -> "TrialRow":
        return cls(name=name, point=point, **{f.name: getattr(row, f.name) for f in dataclasses.fields(SeedRow)})


@dataclass(frozen=True, kw_only=True)
class MultiSeedResults(_Record):
    """A multi-seed experiment's results.json (runs/seeds.py): per-seed rows, the statistics
    over them (absent until a seed has finished), the config."""

    SCHEMA_VERSION: ClassVar[int] = 1

    experiment: str
    seeds: tuple[int, ...]
    started_at: float
    finished_at: float
    per_seed: tuple[SeedRow, ...]
    failures: dict[str, str]  # seed's name -> why it failed
    config: ExperimentConfig
    n_poisoned: Optional[int] = _known()
    variants: Optional[dict[str, VariantStatistics]] = _known()
    clean_accuracy_difference: Optional[Description] = _known()
    by_epoch: Optional[dict[str, EpochBands]] = _known()
    results_uri: Optional[str] = _not_stored()
    schema_version: int = _not_stored(SCHEMA_VERSION)

    @property
    def statistics(self) -> Optional[SeedStatistics]:
        """The statistics over seeds; None while no seed has finished."""
        if self.variants is None:
            return None
        return SeedStatistics(variants=self.variants, clean_accuracy_difference=self.clean_accuracy_difference)

    @classmethod
    def from_stored(cls, data: Any, where: str) -> "MultiSeedResults":
        return cls.from_dict(_object(data, where), where)


def results_from_stored(data: Any, where: str) -> Union[ExperimentResults, MultiSeedResults]:
    """A results.json of either kind: a multi-seed experiment's holds ``per_seed``."""
    if isinstance(data, dict) and "per_seed" in data:
        return MultiSeedResults.from_stored(data, where)
    return ExperimentResults.from_stored(data, where)


# --- a sweep -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SweepGroup(_Record):
    """The trials of one grid point (differing only in seed) and their statistics."""

    point: dict[str, Any]
    trials: tuple[str, ...]
    n_poisoned: int
    variants: dict[str, VariantStatistics]
    clean_accuracy_difference: Optional[Description] = _known()

    @property
    def statistics(self) -> SeedStatistics:
        return SeedStatistics(variants=self.variants, clean_accuracy_difference=self.clean_accuracy_difference)


@dataclass(frozen=True, kw_only=True)
class SweepSummary(_Record):
    """A sweep's summary.json (runs/sweep.py): its grid, groups and trials, failed trials."""

    SCHEMA_VERSION: ClassVar[int] = 2

    sweep: str
    grid: dict[str, Any]
    groups: tuple[SweepGroup, ...]
    trials: tuple[TrialRow, ...]
    failures: dict[str, str] = field(default_factory=dict)
    summary_uri: Optional[str] = _not_stored()
    schema_version: int = _not_stored(SCHEMA_VERSION)

    @classmethod
    def from_stored(cls, data: Any, where: str) -> "SweepSummary":
        data, version = cls._upgrade(_object(data, where))
        return dataclasses.replace(cls.from_dict(data, where), schema_version=version)

    @staticmethod
    def _upgrade(data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        groups, trials = data.get("groups"), data.get("trials")
        if not isinstance(groups, list) or not any(
                isinstance(f, dict) and "ci95" not in f for g in groups for f in _figures(g)):
            return data, 2

        def describe(f: Any) -> Any:
            # Layout 1 described a figure with the population std: the sample std is sqrt(n/(n-1))
            # times it, and one seed has none. It had no interval.
            if not isinstance(f, dict):
                return f
            n, std = f.get("n"), f.get("std")
            known = isinstance(n, int) and n > 1 and isinstance(std, (int, float))
            return {**f, "std": std * math.sqrt(n / (n - 1)) if known else None, "ci95": None}

        def group(g: Any) -> Any:
            if not isinstance(g, dict) or not isinstance(g.get("variants"), dict):
                return g
            return {**g, "variants": {v: {m: describe(f) for m, f in figs.items()} if isinstance(figs, dict) else figs
                                      for v, figs in g["variants"].items()}}

        def trial(t: Any) -> Any:
            # Its rows named no results file and did not find when the ASR reached 50% (unknown: None).
            if not isinstance(t, dict) or not isinstance(t.get("variants"), dict):
                return t
            return {"results_uri": None, **t, "variants": {
                v: {"asr_reached_epoch": None, **f} if isinstance(f, dict) else f for v, f in t["variants"].items()}}

        return {**data, "groups": [group(g) for g in groups],
                "trials": [trial(t) for t in trials] if isinstance(trials, list) else trials}, 1


def _figures(group: Any) -> list[Any]:
    """A summary group's described figures (each variant's clean accuracy and ASR), unchecked."""
    if not isinstance(group, dict) or not isinstance(group.get("variants"), dict):
        return []
    return [f for figs in group["variants"].values() if isinstance(figs, dict) for f in figs.values()]


def _object(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _corrupt(where, "", f"must hold a JSON object (got {type(data).__name__})")
    return data
