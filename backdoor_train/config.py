"""The experiment's typed configuration tree, loaded from YAML.

One frozen dataclass per component. ``load_config`` turns a YAML file (plus
``key.sub=value`` overrides from the command line) into an ``ExperimentConfig``;
every unknown key, wrong type or out-of-range value raises ``ConfigError``
naming the dotted key, so a bad file fails before any Ray work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from backdoor_train.checks import MAX_SEED, ConfigError, check
from backdoor_train.attack.poison import PoisonConfig
from backdoor_train.attack.triggers import TRIGGERS, PixelTrigger, Trigger
from backdoor_train.defenses.registry import defenses, knob_owners

VARIANTS = ("clean", "poisoned")
MAX_INT = 2**53  # integers a JSON reader (config.json, results.json) holds exactly
MAX_SEEDS = 10_000  # each seed is a whole experiment: more is a typo, not a plan
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True)
class DataConfig:
    # A dataset registered in data/registry.py; its files are under ``root`` in torchvision's layout.
    name: str = "mnist"
    root: str = "../shared/datasets/mnist"
    download: bool = False
    # Use only the first N images (tests, quick looks); None means all of them.
    train_samples: Optional[int] = None
    test_samples: Optional[int] = None
    # With an s3:// root: how long to wait for the staged copy to appear (a Kubernetes run may
    # start before its staging Job has finished); 0 refuses at once.
    wait_seconds: float = 0.0

    def __post_init__(self) -> None:
        from backdoor_train.data.registry import DATASETS

        check(self.name in DATASETS, f"data.name must be one of {sorted(DATASETS)} (got {self.name!r})")
        check(bool(self.root.strip()), "data.root must not be empty")
        check(0 <= self.wait_seconds <= 86400,
               f"data.wait_seconds must be in [0, 86400] (got {self.wait_seconds})")
        for key in ("train_samples", "test_samples"):
            value = getattr(self, key)
            check(value is None or value > 0, f"data.{key} must be > 0 or null (got {value})")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "article_cnn"

    def __post_init__(self) -> None:
        from backdoor_train.models.registry import ARCHITECTURES

        check(self.arch in ARCHITECTURES,
               f"model.arch must be one of {sorted(ARCHITECTURES)} (got {self.arch!r})")


# fp32, or bf16 autocast with fp32 master weights (training/precision.py checks the hardware).
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    # The global batch: split across workers, so it is the same whatever the worker count.
    batch_size: int = 500
    lr: float = 0.001
    optimizer: str = "adam"
    checkpoint_every: int = 1
    max_failures: int = 0
    # A rerun under another precision is another setting (not in RESUMABLE_KEYS).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check(self.precision in PRECISIONS,
              f"train.precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        check(self.epochs > 0, f"train.epochs must be > 0 (got {self.epochs})")
        check(self.batch_size > 0, f"train.batch_size must be > 0 (got {self.batch_size})")
        check(self.lr > 0, f"train.lr must be > 0 (got {self.lr})")
        check(self.optimizer in ("adam", "sgd"),
               f"train.optimizer must be 'adam' or 'sgd' (got {self.optimizer!r})")
        check(self.checkpoint_every > 0,
               f"train.checkpoint_every must be > 0 (got {self.checkpoint_every})")
        check(self.max_failures >= -1,
               f"train.max_failures must be >= -1, -1 meaning unlimited (got {self.max_failures})")


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers of one model. Every variant of an experiment is its own trainer, and
    they run at once where the cluster holds them: 0.5 ``gpus_per_worker`` puts two on a GPU."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0  # with use_gpu only; a fraction shares one GPU between trainers

    def __post_init__(self) -> None:
        check(self.num_workers > 0, f"scaling.num_workers must be > 0 (got {self.num_workers})")
        check(self.cpus_per_worker > 0,
               f"scaling.cpus_per_worker must be > 0 (got {self.cpus_per_worker})")
        g = self.gpus_per_worker
        # Ray hands out GPU fractions only below one; above, whole GPUs.
        check(g > 0 and (g <= 1 or float(g).is_integer()),
               f"scaling.gpus_per_worker must be in (0, 1] or a whole number (got {g})")


@dataclass(frozen=True)
class StorageConfig:
    # A local directory (the embedded default) or an s3://bucket/prefix URI. Kept as str:
    # pathlib would mangle "s3://".
    path: str = "./runs"
    # How long a write keeps retrying transient errors (S3 unreachable, 5xx, throttling) before
    # the run ends with exit 1, resumable: artifacts, checkpoint uploads, Ray's run snapshot.
    retry_seconds: float = 60.0

    def __post_init__(self) -> None:
        check(bool(self.path.strip()), "storage.path must not be empty")
        check(0 <= self.retry_seconds <= 3600,
               f"storage.retry_seconds must be in [0, 3600] (got {self.retry_seconds})")
        if "://" in self.path:
            scheme, rest = self.path.split("://", 1)
            check(scheme == "s3", f"storage.path scheme must be s3:// or none (got {scheme}://)")
            check(bool(rest.split("/", 1)[0]), f"storage.path has no bucket: {self.path!r}")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    # Base port of the per-worker /metrics endpoint; each worker adds its local rank so workers
    # sharing a node do not clash. 0 picks a free port.
    port: int = 9100
    pushgateway: Optional[str] = None

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, f"metrics.port must be in [0, 65535] (got {self.port})")
        if self.pushgateway is not None:
            check(bool(re.match(r"^https?://[^/\s]+", self.pushgateway)),
                   f"metrics.pushgateway must be an http(s):// URL (got {self.pushgateway!r})")


@dataclass(frozen=True)
class DefenseConfig:
    """`backdoor-train detect`: what the defender holds and how hard each defense tries. The
    defender's clean images are the first ``clean_samples`` test images; every figure of the
    defenses is measured on the test images after them. Each registered defense brings its own
    knobs (defenses/registry.py, e.g. ``strip_frr``, Neural Cleanse's ``cleanse_steps``), flat
    in YAML next to ``clean_samples`` (``defense.strip_frr``) and checked by the defense's own
    dataclass; ``knobs`` holds one per defense, in registry order (``of`` picks one)."""

    clean_samples: int = 2000
    knobs: tuple[Any, ...] = field(default_factory=lambda: tuple(d.Knobs() for d in defenses()))

    def __post_init__(self) -> None:
        check(self.clean_samples > 0, f"defense.clean_samples must be > 0 (got {self.clean_samples})")

    def of(self, defense: Any) -> Any:
        """``defense``'s knobs (its defaults when it was registered after this config was built)."""
        return next((k for k in self.knobs if type(k) is defense.Knobs), None) or defense.Knobs()

    def __getattr__(self, name: str) -> Any:
        # A knob by its YAML name (cfg.defense.strip_frr), whichever defense owns it.
        for knobs in self.__dict__.get("knobs", ()):
            if name in {f.name for f in dataclasses.fields(knobs)}:
                return getattr(knobs, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The flat ``defense`` section, as YAML and every stored config hold it."""
        return {"clean_samples": self.clean_samples,
                **{k: v for knobs in self.knobs for k, v in dataclasses.asdict(knobs).items()}}

    @classmethod
    def from_flat(cls, data: Any, key: str) -> "DefenseConfig":
        """The ``defense`` section ``data`` (found at ``key``): each knob to the defense that owns it."""
        if not isinstance(data, dict):
            raise ConfigError(f"{key} must be a mapping (got {type(data).__name__})")
        owners = knob_owners()
        allowed = sorted({f.name for f in dataclasses.fields(cls) if f.name != "knobs"} | set(owners))
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown key {key}.{unknown[0]!s} (allowed at {key}: {allowed})")
        shared = _build(cls, {k: v for k, v in data.items() if k not in owners}, f"{key}.")
        knobs = tuple(_build(d.Knobs, {k: v for k, v in data.items() if owners.get(k) is d}, f"{key}.")
                      for d in defenses())
        return dataclasses.replace(shared, knobs=knobs)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 1
    # Non-empty: the paired experiment runs once per seed (runs/seeds.py) and reports statistics
    # over them; ``seed`` then equals the first (load_config sees to it).
    seeds: tuple[int, ...] = ()
    variants: tuple[str, ...] = VARIANTS
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        check(len(self.seeds) <= MAX_SEEDS, f"seeds must hold at most {MAX_SEEDS} seeds (got {len(self.seeds)})")
        for i, s in enumerate(self.seeds):
            check(0 <= s <= MAX_SEED, f"seeds[{i}] must be in [0, {MAX_SEED}] (got {s})")
        check(len(set(self.seeds)) == len(self.seeds), "seeds must not repeat")
        check(0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}] (got {self.seed})")
        check(not self.seeds or self.seed == self.seeds[0],
               f"seed must be the first of seeds when seeds is set (got seed {self.seed}, seeds {list(self.seeds)})")
        check(len(self.variants) > 0, "variants must not be empty")
        for v in self.variants:
            check(v in VARIANTS, f"variants must be drawn from {list(VARIANTS)} (got {v!r})")
        check(len(set(self.variants)) == len(self.variants), "variants must not repeat")
        # What depends on the dataset: the classes there are, the image the trigger must fit in.
        spec = self.dataset
        check(self.poison.target < spec.num_classes,
              f"poison.target must be a class of {spec.name}, 0..{spec.num_classes - 1} (got {self.poison.target})")
        for c in self.poison.source_classes:
            check(c < spec.num_classes, f"poison.source_classes must hold classes of {spec.name}, "
                                        f"0..{spec.num_classes - 1} (got {c})")
        self.poison.trigger.check_fits(spec.shape)

    @property
    def dataset(self) -> Any:
        """The ``DatasetSpec`` of ``data.name`` (data/registry.py)."""
        from backdoor_train.data.registry import get_dataset

        return get_dataset(self.data.name)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "defense": self.defense.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentConfig":
        return _build(cls, data, "")

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> "ExperimentConfig":
        """A config a run recorded (config.json, results.json), whichever release wrote it,
        rebuilt through today's schema: fields added since get the value such a run used, or
        their default."""
        return cls.from_dict(_upgrade(data))


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A recorded config in today's schema; the only place that knows earlier schemas."""
    data = copy.deepcopy(data)
    poison = data.get("poison")
    if isinstance(poison, dict):
        # Runs before poison.selection existed drew their images with numpy, not the article's way.
        poison.setdefault("selection", "numpy")
        trigger = poison.get("trigger")
        if isinstance(trigger, dict) and isinstance(trigger.get("kind"), str) and trigger["kind"] in TRIGGERS:
            # Before the trigger registry one config carried every kind's fields: keep the kind's own.
            own = {f.name for f in dataclasses.fields(TRIGGERS[trigger["kind"]][0])}
            poison["trigger"] = {k: v for k, v in trigger.items() if k in own}
    return data


# --- building dataclasses from plain data, with dotted-key errors ---------------------------

def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping (got {type(data).__name__})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (allowed at {where}: {sorted(names)})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp == Trigger:
        # A tagged union: ``kind`` picks the trigger's own config (attack/triggers.py).
        check(isinstance(value, dict), f"{key} must be a mapping (got {value!r})")
        kind = value.get("kind", PixelTrigger.kind)
        check(isinstance(kind, str) and kind in TRIGGERS, f"{key}.kind must be one of {list(TRIGGERS)} (got {kind!r})")
        return _build(TRIGGERS[kind][0], value, key + ".")
    if tp is DefenseConfig:
        return DefenseConfig.from_flat(value, key)  # flat in YAML, one dataclass per defense here
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (got {type(value).__name__})")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {value!r})")
        return value
    if tp is int:
        # bool is an int subclass in Python; `epochs: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer (got {value!r})")
        if not -MAX_INT <= value <= MAX_INT:  # numpy, torch and JSON readers hold 64 bits at most
            raise ConfigError(f"{key} is too large (got {value}; at most {MAX_INT})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key} is too large (got {value})") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number (got {value})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {value!r})")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")  # a bug here, not user input


def apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = parse_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"override {key}: {exc}") from None


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds`` on the command line: "1-16", "1,2,5" or "1-4,9" (ranges inclusive)."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ConfigError(f"--seeds must look like 1-16 or 1,2,5 (got {text!r})")
        span = range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
        check(len(seeds) + len(span) <= MAX_SEEDS, f"--seeds asks for more than {MAX_SEEDS} seeds (got {text!r})")
        seeds += span
    return tuple(seeds)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``, refusing what would pass unnoticed: a key given twice (YAML keeps the
    last one silently) and aliases (``*name``: a few lines can expand into a huge value)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML aliases (*name) are not supported; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text (a file's, or a ``--set`` value) with ``_StrictLoader``."""
    return yaml.load(text, Loader=_StrictLoader)


def read_yaml(path: str, what: str = "config file") -> Any:
    """A YAML file's content; every way a path can be wrong is a ``ConfigError`` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_yaml(fh.read())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text (a binary file?)") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None


def check_name(value: Any, key: str) -> None:
    """Names become folders and Ray run names: letters, digits, '_', '.', '-' only."""
    check(isinstance(value, str) and bool(_NAME_RE.fullmatch(value)),  # match() lets "x\n" pass
           f"{key} must be 1-100 characters of letters, digits, '_', '.', '-' (got {value!r})")


def load_config(path: str, overrides: Optional[list[str]] = None,
                seeds: Optional[tuple[int, ...]] = None) -> ExperimentConfig:
    """Read an experiment YAML file, apply ``key.sub=value`` overrides, validate everything.
    ``seeds`` (``--seeds``) replaces the file's ``seed``/``seeds``."""
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for override in overrides or []:
        apply_override(data, override)
    if seeds:
        data.pop("seed", None)
        data["seeds"] = list(seeds)
    if isinstance(data.get("seeds"), list) and data["seeds"]:
        first = data["seeds"][0]
        # A different seed would be silently unused; the first seed is what to_dict() writes.
        check(data.get("seed", first) == first,
               f"seed and seeds are both set (seed {data.get('seed')!r}, seeds {data['seeds']!r}): seeds runs the "
               f"experiment once per seed; remove seed, or use --seeds, which replaces both")
        if isinstance(first, int) and not isinstance(first, bool):
            data["seed"] = first
    return ExperimentConfig.from_dict(data)
