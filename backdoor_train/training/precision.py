"""Training precision: ``train.precision`` (fp32 or bf16) and whether the workers' hardware runs it.

bf16 is autocast: the forward pass and the loss run in bfloat16 where PyTorch's autocast lists
say so, while the weights, gradients and Adam's state stay fp32 (no loss scaling is needed:
bf16 has fp32's exponent range). The per-epoch evaluation on the workers runs under the same
autocast; the final figures of results.json are computed on the driver in fp32 from the fp32
weights, the same way for either precision, so runs of the two precisions compare like for like.

Where bf16 pays depends on the chip, so ``check_precision`` asks a node that holds a worker's
resources (a Ray task) before anything is written or trained:
* GPU: bf16 tensor cores (compute capability 8.0 and later) or a refusal.
* CPU: native bf16 instructions (x86 AVX512_BF16 or AMX, Arm BF16) run it; AVX-512 without them
  runs oneDNN's emulation (a warning: it may be no faster than fp32); with neither (AVX2 only)
  PyTorch falls back to slow reference kernels: one training step of the article's CNN took
  12x longer in bf16 than in fp32 on an AMD EPYC with AVX2, so that is refused (exit 2).
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch

from backdoor_train.checks import ConfigError
from backdoor_train.config import ExperimentConfig

# CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic: x86 AVX512_BF16 and AMX, Arm's BF16.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def autocast(precision: str, device: torch.device) -> ContextManager[Any]:
    """The context a forward pass (and its loss) runs in at ``precision``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Bf16Support:
    """What a node's device does with bf16: ``native``, ``emulated`` (runs, maybe no faster than
    fp32) or ``none`` (refused); ``chip`` names the device for the messages."""

    verdict: str
    chip: str


def bf16_support(use_gpu: bool, cpu_flags: frozenset[str], mkldnn_bf16: bool, cuda_bf16: bool,
                 chip: str) -> Bf16Support:
    """The verdict from a node's facts (``node_facts``); a pure function, for the tests."""
    if use_gpu:
        return Bf16Support("native" if cuda_bf16 else "none", chip)
    if cpu_flags & set(NATIVE_BF16_FLAGS):
        return Bf16Support("native", chip)
    return Bf16Support("emulated" if mkldnn_bf16 else "none", chip)


def _cpu_facts() -> tuple[frozenset[str], str]:
    """(the CPU's flags, its model name); no flags where /proc/cpuinfo is missing (macOS)."""
    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("flags", "features"):  # x86, Arm
                    flags.update(value.split())
                elif key == "model name":
                    name = value.strip()
    except OSError:
        pass
    return frozenset(flags), name


def node_facts(use_gpu: bool) -> Bf16Support:
    """This process's node's bf16 verdict (on a GPU node: its first visible GPU's)."""
    flags, cpu = _cpu_facts()
    cuda_bf16, chip = False, f"CPU {cpu}"
    if use_gpu:
        if torch.cuda.is_available():
            cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            major, minor = torch.cuda.get_device_capability(0)
            chip = f"GPU {torch.cuda.get_device_name(0)} (compute capability {major}.{minor})"
        else:
            chip = "no GPU visible to the worker"
    mkldnn_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bf16_support(use_gpu, flags, mkldnn_bf16, cuda_bf16, chip)


def refusal(support: Bf16Support) -> str:
    """Why bf16 is refused on ``support``'s chip (the ``ConfigError`` text)."""
    if "GPU" in support.chip:
        why = "has no bf16 tensor cores (compute capability 8.0 or later)"
    else:
        why = ("has neither native bf16 instructions (AVX512_BF16, AMX, Arm BF16) nor AVX-512 for "
               "oneDNN's emulation: PyTorch's fallback kernels make an epoch several times slower than "
               "fp32 (12x measured on an AVX2 AMD EPYC)")
    return f"train.precision: bf16 refused: the workers' {support.chip} {why}; use train.precision=fp32"


def check_precision(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> None:
    """For bf16, ask a node with one worker's resources what its device does with bf16: a
    ``ConfigError`` (exit 2) where it cannot run it usefully, a warning where it is emulated."""
    if cfg.train.precision != "bf16":
        return
    s = cfg.scaling
    support = _probe(s.use_gpu, s.cpus_per_worker, s.gpus_per_worker if s.use_gpu else 0.0)
    if support.verdict == "none":
        raise ConfigError(refusal(support))
    if support.verdict == "emulated":
        log(f"WARNING: train.precision bf16 on {support.chip}: no native bf16 instructions, oneDNN emulates "
            f"them with AVX-512; an epoch may be no faster than in fp32")


@functools.lru_cache(maxsize=None)  # once per process and worker shape: trials and seeds ask again
def _probe(use_gpu: bool, cpus: int, gpus: float) -> Bf16Support:
    import ray

    return ray.get(ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(node_facts).remote(use_gpu))


def check_worker_device(precision: str, use_gpu: bool) -> None:
    """The same verdict on each worker's own node (a cluster's nodes may differ from the one
    ``check_precision`` asked): a ``RuntimeError`` before the worker trains."""
    if precision == "bf16":
        support = node_facts(use_gpu)
        if support.verdict == "none":
            raise RuntimeError(refusal(support))
