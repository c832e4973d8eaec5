"""Config loading and validation: one small case per rule, each naming its dotted key."""

from __future__ import annotations

import os

import pytest
import yaml

from backdoor_train.config import ConfigError, ExperimentConfig, load_config, parse_seeds

from conftest import REPO_ROOT


def test_article_yaml_is_the_articles_setting():
    cfg = load_config(os.path.join(REPO_ROOT, "jobs", "article.yaml"))
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.optimizer) == (10, 500, 0.001, "adam")
    assert (cfg.poison.rate, cfg.poison.target) == (0.01, 8)
    t = cfg.poison.trigger
    assert (t.kind, t.row, t.col, t.value) == ("pixel", 3, 3, 1.0)
    assert cfg.seed == 1 and cfg.model.arch == "article_cnn"
    assert cfg.variants == ("clean", "poisoned")
    assert cfg.poison.selection == "article" and cfg.seeds == ()


def test_the_gpu_job_is_the_same_experiment_on_half_a_gpu_per_model():
    cpu = load_config(os.path.join(REPO_ROOT, "jobs", "article.yaml"))
    gpu = load_config(os.path.join(REPO_ROOT, "jobs", "article-gpu.yaml"))
    assert gpu.scaling.use_gpu and gpu.scaling.gpus_per_worker == 0.5 and gpu.scaling.num_workers == 1
    same = ("seed", "variants", "data", "model", "train", "poison")
    assert {k: cpu.to_dict()[k] for k in same} == {k: gpu.to_dict()[k] for k in same}


@pytest.mark.parametrize("gpus", [0.25, 0.5, 1, 2])
def test_gpus_per_worker_takes_fractions_up_to_one_and_whole_numbers(gpus):
    assert ExperimentConfig.from_dict({"scaling": {"gpus_per_worker": gpus}}).scaling.gpus_per_worker == gpus


def test_config_is_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]


def test_round_trip_through_dict():
    cfg = ExperimentConfig.from_dict({"poison": {"source_classes": [1, 2]}, "variants": ["poisoned"]})
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data, key", [
    ({"poison": {"rate": 1.5}}, "poison.rate must be in [0, 1]"),
    ({"poison": {"rate": -0.1}}, "poison.rate must be in [0, 1]"),
    ({"poison": {"target": 10}}, "poison.target must be a class of mnist, 0..9"),
    ({"poison": {"source_classes": [10]}}, "poison.source_classes must hold classes of mnist"),
    ({"data": {"name": "imagenet"}}, "data.name must be one of"),
    ({"poison": {"target": -1}}, "poison.target must be a class"),
    ({"poison": {"source_classes": [8]}}, "poison.source_classes"),
    ({"poison": {"trigger": {"row": 28}}}, "poison.trigger.row"),
    ({"poison": {"trigger": {"col": -1}}}, "poison.trigger.col"),
    ({"poison": {"trigger": {"kind": "patch", "size": 3, "row": 26}}}, "poison.trigger.row"),
    ({"poison": {"trigger": {"value": 2.0}}}, "poison.trigger.value"),
    ({"poison": {"trigger": {"kind": "star"}}}, "poison.trigger.kind"),
    ({"poison": {"trigger": {"kind": "blend", "alpha": 0}}}, "poison.trigger.alpha"),
    ({"train": {"epochs": 0}}, "train.epochs must be > 0"),
    ({"storage": {"retry_seconds": -1}}, "storage.retry_seconds must be in [0, 3600]"),
    ({"storage": {"retry_seconds": 1e9}}, "storage.retry_seconds must be in [0, 3600]"),
    ({"data": {"wait_seconds": -5}}, "data.wait_seconds must be in [0, 86400]"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
    ({"train": {"lr": 0}}, "train.lr must be > 0"),
    ({"train": {"optimizer": "lbfgs"}}, "train.optimizer"),
    ({"train": {"checkpoint_every": 0}}, "train.checkpoint_every"),
    ({"train": {"max_failures": -2}}, "train.max_failures"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers must be > 0"),
    ({"scaling": {"cpus_per_worker": 0}}, "scaling.cpus_per_worker must be > 0"),
    ({"scaling": {"gpus_per_worker": 0}}, "scaling.gpus_per_worker"),
    ({"scaling": {"gpus_per_worker": -2}}, "scaling.gpus_per_worker"),
    ({"scaling": {"gpus_per_worker": 1.5}}, "scaling.gpus_per_worker"),
    ({"scaling": {"gpus_per_worker": float("nan")}}, "scaling.gpus_per_worker"),
    ({"data": {"train_samples": 0}}, "data.train_samples"),
    ({"data": {"root": " "}}, "data.root"),
    ({"model": {"arch": "resnet"}}, "model.arch"),
    ({"storage": {"path": "gs://bucket/x"}}, "storage.path scheme"),
    ({"storage": {"path": "s3:///nobucket"}}, "storage.path has no bucket"),
    ({"metrics": {"port": 70000}}, "metrics.port"),
    ({"metrics": {"pushgateway": "localhost:9091"}}, "metrics.pushgateway"),
    ({"name": "a/b"}, "name must be"),
    ({"seed": -1}, "seed must be in [0, 4294967295]"),
    ({"seed": 2**32}, "seed must be in [0, 4294967295]"),
    ({"seed": 10**30}, "seed is too large"),
    ({"train": {"lr": float("inf")}}, "train.lr must be a finite number"),
    ({"poison": {"rate": float("nan")}}, "poison.rate must be a finite number"),
    ({"name": "a\tb"}, "name must be"),
    ({"seeds": [1, -2]}, "seeds[1] must be in [0, 4294967295]"),
    ({"seeds": [1, 2, 1]}, "seeds must not repeat"),
    ({"seeds": [2, 3]}, "seed must be the first of seeds"),
    ({"seeds": [-1]}, "seeds[0] must be in [0, 4294967295]"),
    ({"seeds": 3}, "seeds must be a list"),
    ({"poison": {"selection": "random"}}, "poison.selection must be one of"),
    ({"poison": {"source_classes": [1, 1]}}, "poison.source_classes must not repeat"),
    ({"variants": []}, "variants must not be empty"),
    ({"variants": ["dirty"]}, "variants must be drawn"),
    ({"train": {"epoch": 3}}, "unknown key train.epoch"),
    ({"trian": {}}, "unknown key trian"),
    ({"train": {"epochs": "ten"}}, "train.epochs must be an integer"),
    ({"train": {"epochs": True}}, "train.epochs must be an integer"),
    ({"train": {"lr": "fast"}}, "train.lr must be a number"),
    ({"scaling": {"use_gpu": "yes"}}, "scaling.use_gpu must be true or false"),
    ({"train": 5}, "train must be a mapping"),
    ({"variants": "clean"}, "variants must be a list"),
])
def test_bad_values_name_their_key(data, key):
    with pytest.raises(ConfigError, match=_escape(key)):
        ExperimentConfig.from_dict(data)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_load_config_overrides_and_file_errors(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "train": {"epochs": 3}}))
    cfg = load_config(str(path), ["train.epochs=5", "poison.trigger.row=4", "variants=[poisoned]"])
    assert cfg.train.epochs == 5 and cfg.poison.trigger.row == 4 and cfg.variants == ("poisoned",)
    with pytest.raises(ConfigError, match="train.epochs must be > 0"):
        load_config(str(path), ["train.epochs=0"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(str(path), ["train.epochs"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(listy))


@pytest.mark.parametrize("text, seeds", [("1-16", tuple(range(1, 17))), ("3", (3,)), ("1,2,5", (1, 2, 5)),
                                         ("1-3, 9", (1, 2, 3, 9)), ("0-0", (0,))])
def test_seeds_on_the_command_line(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "3-1", "1-", "-2", "1..4", "1,,2"])
def test_bad_seeds_on_the_command_line(text):
    with pytest.raises(ConfigError, match="--seeds must look like"):
        parse_seeds(text)
    with pytest.raises(ConfigError, match="more than 10000 seeds"):
        parse_seeds("0-999999999999")


def test_seeds_replace_seed_and_conflicts_are_refused(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "seed": 4}))
    cfg = load_config(str(path), seeds=(2, 3))
    assert (cfg.seeds, cfg.seed) == ((2, 3), 2)  # --seeds replaces the file's seed
    with pytest.raises(ConfigError, match="seed and seeds are both set"):
        load_config(str(path), ["seeds=[2, 3]"])
    assert load_config(str(path), ["seeds=[4, 5]"]).seeds == (4, 5)  # seed is the first: no conflict
    with pytest.raises(ConfigError, match="seeds must not repeat"):
        load_config(str(path), seeds=parse_seeds("1-3,2"))
    # A multi-seed config survives to_dict -> YAML -> load_config (submit and config.json do that).
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(again)) == cfg


# --- a recorded setting, rebuilt through today's schema (experiment.setting_diffs) --------------

def test_a_field_added_with_a_default_keeps_an_earlier_run_resumable():
    from backdoor_train.runs.experiment import setting_diffs

    cfg = ExperimentConfig()
    recorded = cfg.to_dict()
    del recorded["data"]["name"], recorded["data"]["wait_seconds"]  # fields a later release added
    assert setting_diffs(recorded, cfg) == []
    # ... but a field it recorded with another value is a difference, named.
    recorded["train"]["lr"] = 0.01
    assert setting_diffs(recorded, cfg) == ["train.lr: 0.01 -> 0.001"]


def test_a_run_recorded_before_the_trigger_registry_is_the_same_setting():
    from backdoor_train.runs.experiment import setting_diffs

    cfg = ExperimentConfig()
    recorded = cfg.to_dict()
    # One trigger config used to carry every kind's fields; a pixel run recorded all of them.
    recorded["poison"]["trigger"].update(size=3, alpha=0.1, pattern_seed=0)
    assert setting_diffs(recorded, cfg) == []
    assert ExperimentConfig.from_stored(recorded) == cfg


def test_a_run_recorded_before_poison_selection_drew_with_numpy():
    from backdoor_train.runs.experiment import setting_diffs

    cfg = ExperimentConfig()
    recorded = cfg.to_dict()
    del recorded["poison"]["selection"]
    assert setting_diffs(recorded, cfg) == ["poison.selection: 'numpy' -> 'article'"]


def test_a_recorded_setting_invalid_today_is_a_config_error_naming_the_key():
    from backdoor_train.runs.experiment import setting_diffs

    recorded = ExperimentConfig().to_dict()
    recorded["train"]["optimizer"] = "lbfgs"
    with pytest.raises(ConfigError, match="train.optimizer"):
        setting_diffs(recorded, ExperimentConfig())
