"""The defenses of `backdoor-train detect`, one ``register`` line each, in the order they run, log
and appear in the report. A defense is one module with a ``Defense`` subclass (defenses/base.py);
registering it here is all it takes:

* config.DefenseConfig composes its ``Knobs`` (``defense.<knob>`` in YAML);
* runs/detection.py runs it as one Ray task on the poisoned model, prints its ``log_lines`` and
  keeps its result in detection.json under its ``detection_key``;
* the report shows its ``report_section`` in the Detection section;
* ``detect --retrain`` offers its ``retrain_methods``.

The defenses now:

* ``activations``: activation clustering and spectral signatures on the training set the model
  saw, with the defender's clean images as reference, scored against the poison manifest
  (defenses/activations.py);
* ``neural_cleanse``: a trigger reverse-engineered per class from the defender's clean images,
  the anomalous class flagged, and the flagged trigger unlearned (defenses/cleanse.py), with
  clean accuracy and ASR before and after;
* ``strip``: input filtering by prediction entropy over blends (defenses/strip.py): FRR and FAR.

A defense registered at run time (a test's) runs where it was registered; Ray's workers import
this module, so a defense that ``detect`` runs on a cluster is registered here.
"""

from __future__ import annotations

import dataclasses

from backdoor_train.defenses.activations import ActivationDefense
from backdoor_train.defenses.base import Defense, check_knobs
from backdoor_train.defenses.cleanse import NeuralCleanse
from backdoor_train.defenses.strip import Strip

SHARED_KNOBS = ("clean_samples",)  # defense.clean_samples: the defender's images, every defense's

_DEFENSES: dict[str, Defense] = {}


def defenses() -> tuple[Defense, ...]:
    """The registered defenses, in order."""
    return tuple(_DEFENSES.values())


def get_defense(name: str) -> Defense:
    return _DEFENSES[name]


def knob_owners() -> dict[str, Defense]:
    """Each knob (a ``defense.<knob>`` key) and the defense it belongs to."""
    return {f.name: d for d in _DEFENSES.values() for f in dataclasses.fields(d.Knobs)}


def retrain_methods() -> dict[str, Defense]:
    """Each method ``detect --retrain`` accepts and the defense whose result holds its flags."""
    return {m: d for d in _DEFENSES.values() for m in d.retrain_methods}


def register(defense: Defense) -> Defense:
    """Add ``defense``, after the registered ones. Its name, detection.json key, knobs and retrain
    methods must be its own: a ``ValueError`` (or ``TypeError`` for malformed knobs) otherwise."""
    check_knobs(defense.Knobs)
    taken = {
        "name": set(_DEFENSES),
        "detection.json key": {d.detection_key for d in _DEFENSES.values()} | {
            "experiment", "n_poisoned", "defender_clean_samples", "retrain", "detection_uri"},
        "knob": set(knob_owners()) | set(SHARED_KNOBS),
        "retrain method": set(retrain_methods()),
    }
    mine = {
        "name": {defense.name},
        "detection.json key": {defense.detection_key},
        "knob": {f.name for f in dataclasses.fields(defense.Knobs)},
        "retrain method": set(defense.retrain_methods),
    }
    for what, names in mine.items():
        clash = sorted(names & taken[what])
        if clash:
            raise ValueError(f"defense {defense.name!r}: {what} {clash[0]!r} is taken")
    _DEFENSES[defense.name] = defense
    return defense


def unregister(name: str) -> None:
    del _DEFENSES[name]


register(ActivationDefense())
register(NeuralCleanse())
register(Strip())
