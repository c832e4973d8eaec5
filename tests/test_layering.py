"""The package's layers as a rule: no module imports from a layer above its own.

Bottom to top: ``progress`` (elapsed time, ETA and ``--quiet``, which workers, tasks and drivers share),
``checks`` (the one configuration error), ``data``, ``models``, ``attack``, ``defenses``
(what each defense is: its knobs, run, log lines and report content, and their registry), ``config``
(the typed tree, which validates names and knobs against the registries below it), ``results`` (the
typed records of results.json and summary.json, which hold a config), ``storage``, ``training``,
``runs`` (the drivers: an experiment, seeds, sweeps, running the defenses on a finished run),
``reporting``, ``cli``. A module's layer is the longest dotted prefix of its name in ``LAYERS``.
Imports inside a function count as much as those at the top of a module: a lazy import is still a
dependency. Read from the source with ``ast``, so the test needs nothing imported."""

from __future__ import annotations

import ast
import os

import pytest

from conftest import package_files

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "backdoor_train")

LAYERS = ("progress", "checks", "data", "models", "attack", "defenses", "config", "results", "storage", "training", "runs",
          "reporting", "cli", "__main__")
# The package's own __init__ only names the product; it imports nothing and sits nowhere.
TOP_LEVEL_INIT = "__init__"


def _modules() -> dict[str, str]:
    return {rel[:-3].replace(os.sep, "."): path for rel, path in package_files(PACKAGE).items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 1, -1) if ".".join(parts[:n]) in LAYERS), parts[0])


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the project imports absolutely)"
            if node.module == "backdoor_train":
                names.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("backdoor_train."):
                names.add(node.module[len("backdoor_train."):])
        elif isinstance(node, ast.Import):
            names.update(a.name[len("backdoor_train."):] for a in node.names if a.name.startswith("backdoor_train."))
    return names


def test_every_module_has_a_layer_and_a_docstring() -> None:
    for module, path in _modules().items():
        if module == TOP_LEVEL_INIT:
            continue
        assert _layer(module) in LAYERS, f"{module}: in no layer; add it to LAYERS in {__file__}"
        assert ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())), f"{module}: no docstring"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for module, path in _modules().items():
        if module == TOP_LEVEL_INIT:
            continue
        rank = LAYERS.index(_layer(module))
        for target in _imports(path):
            if LAYERS.index(_layer(target)) > rank:
                upward.append(f"{module} imports {target}")
    assert not upward, "imports from a layer above: " + "; ".join(sorted(upward))


@pytest.mark.parametrize("source, target", [("data.split", "config"), ("storage.runstore", "training.checkpoint"),
                                            ("defenses.strip", "config"), ("defenses.registry", "runs.detection")])
def test_an_upward_import_is_caught(tmp_path, monkeypatch, source: str, target: str) -> None:
    """The rule can fail: a planted upward import is reported."""
    planted = tmp_path / "backdoor_train"
    path = planted / (source.replace(".", os.sep) + ".py")
    path.parent.mkdir(parents=True)
    path.write_text(f'"""A planted module."""\n\ndef f():\n    from backdoor_train.{target} import x\n')
    monkeypatch.setattr(__import__(__name__), "PACKAGE", str(planted))
    with pytest.raises(AssertionError, match=f"{source} imports {target}"):
        test_no_module_imports_a_layer_above_its_own()
