"""Training precision (training/precision.py): the config key, bf16 autocast with fp32 weights, the
hardware verdict and its refusal before any training, and a precision change as another setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import backdoor_train.training.precision as precision
from backdoor_train.checks import ConfigError
from backdoor_train.config import ExperimentConfig
from backdoor_train.runs.experiment import setting_diffs
from backdoor_train.training.precision import Bf16Support, bf16_support, refusal
from backdoor_train.training.worker import train_one_epoch

from conftest import small_config


def _cfg(**train) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"name": "p", "train": train})


# --- the config key ---------------------------------------------------------------------------

def test_precision_defaults_to_fp32_and_rejects_other_values_naming_the_key():
    assert _cfg().train.precision == "fp32"
    assert _cfg(precision="bf16").train.precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.precision must be one of fp32, bf16 \(got 'fp16'\)"):
        _cfg(precision="fp16")


def test_another_precision_is_another_setting_and_an_old_record_is_fp32():
    old = _cfg().to_dict()
    assert setting_diffs(old, _cfg(precision="bf16")) == ["train.precision: 'fp32' -> 'bf16'"]
    del old["train"]["precision"]  # a run recorded before the key existed trained in fp32
    assert setting_diffs(old, _cfg()) == []
    assert setting_diffs(old, _cfg(precision="bf16")) == ["train.precision: 'fp32' -> 'bf16'"]


# --- bf16 autocast: the forward pass in bf16, the weights and Adam's state in fp32 ----------------

class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _train(prec: str) -> tuple[_Net, torch.optim.Optimizer, float, list[torch.dtype]]:
    torch.manual_seed(0)
    net = _Net()
    seen: list[torch.dtype] = []
    net.conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    loss, n = train_one_epoch(net, opt, x, y, torch.arange(64), 16, precision=prec)
    return net, opt, loss / n, seen


def test_bf16_runs_the_forward_pass_in_bf16_and_keeps_fp32_weights_and_optimizer_state():
    net32, _, loss32, dtypes32 = _train("fp32")
    net16, opt16, loss16, dtypes16 = _train("bf16")
    assert set(dtypes32) == {torch.float32} and set(dtypes16) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in net16.parameters())
    assert all(t.dtype == torch.float32 for state in opt16.state.values() for k, t in state.items() if k != "step")
    # The same training, to bf16's 8 bits of mantissa: close, not equal.
    assert loss16 == pytest.approx(loss32, rel=0.05) and loss16 != loss32
    for a, b in zip(net32.parameters(), net16.parameters()):
        assert torch.allclose(a, b, atol=0.02) and not torch.equal(a, b)


# --- the hardware verdict ----------------------------------------------------------------------

@pytest.mark.parametrize("use_gpu, flags, mkldnn, cuda, verdict", [
    (False, {"avx2", "avx512f", "avx512_bf16"}, True, False, "native"),
    (False, {"avx2", "amx_bf16"}, True, False, "native"),
    (False, {"asimd", "bf16"}, False, False, "native"),        # Arm (Graviton 3 and later)
    (False, {"avx2", "avx512f", "avx512bw"}, True, False, "emulated"),
    (False, {"avx2", "fma"}, False, False, "none"),          # the AVX2 EPYC measured 12x slower
    (True, {"avx2"}, False, True, "native"),
    (True, {"avx512_bf16"}, True, False, "none"),             # a pre-Ampere GPU on a bf16 CPU
])
def test_bf16_verdict_per_chip(use_gpu, flags, mkldnn, cuda, verdict):
    assert bf16_support(use_gpu, frozenset(flags), mkldnn, cuda, "chip").verdict == verdict


def test_refusals_name_the_key_the_chip_and_the_way_out():
    cpu = refusal(Bf16Support("none", "CPU AMD EPYC"))
    assert cpu.startswith("train.precision: bf16 refused: the workers' CPU AMD EPYC")
    assert "AVX512_BF16" in cpu and cpu.endswith("use train.precision=fp32")
    gpu = refusal(Bf16Support("none", "GPU Tesla T4 (compute capability 7.5)"))
    assert "compute capability 8.0" in gpu and "Tesla T4" in gpu


def test_check_precision_asks_only_for_bf16_refuses_none_and_warns_on_emulation(monkeypatch):
    asked = []

    def probe(use_gpu, cpus, gpus):
        asked.append((use_gpu, cpus, gpus))
        return Bf16Support(verdict, "CPU X")

    monkeypatch.setattr(precision, "_probe", probe)
    verdict = "none"
    precision.check_precision(_cfg())
    assert asked == []  # fp32 never asks
    with pytest.raises(ConfigError, match="train.precision: bf16 refused: the workers' CPU X"):
        precision.check_precision(_cfg(precision="bf16"))
    assert asked == [(False, 1, 0.0)]  # one worker's resources
    verdict, lines = "emulated", []
    precision.check_precision(_cfg(precision="bf16"), lines.append)
    assert len(lines) == 1 and lines[0].startswith("WARNING: train.precision bf16 on CPU X")
    verdict, lines = "native", []
    precision.check_precision(_cfg(precision="bf16"), lines.append)
    assert lines == []


def test_a_worker_on_a_chip_without_bf16_stops_before_training(monkeypatch):
    monkeypatch.setattr(precision, "node_facts", lambda use_gpu: Bf16Support("none", "CPU Y"))
    precision.check_worker_device("fp32", False)
    with pytest.raises(RuntimeError, match="bf16 refused: the workers' CPU Y"):
        precision.check_worker_device("bf16", False)


# --- on a real Ray cluster ----------------------------------------------------------------------

def test_bf16_run_on_this_machine_trains_or_is_refused_before_anything_is_written(tmp_path, mnist_root):
    """`run --set train.precision=bf16` with local Ray: the probe task's verdict for this machine
    (the same as this process's) decides; refused is exit 2 with nothing written, else it trains
    and records the precision."""
    cfg = small_config(mnist_root, str(tmp_path / "runs"), name="tiny-bf16", train={"epochs": 1},
                       data={"train_samples": 1000, "test_samples": 500}, scaling={"num_workers": 1})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "backdoor_train", "run", str(path), "--json",
                           "--set", "train.precision=bf16"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    expected = precision.node_facts(False)
    if expected.verdict == "none":
        assert proc.returncode == 2, proc.stderr[-4000:]
        assert json.loads(proc.stdout)["ok"] is False
        assert "train.precision: bf16 refused" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "runs" / "tiny-bf16").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = json.loads(proc.stdout)
        assert results["config"]["train"]["precision"] == "bf16"
        assert ", bf16" in proc.stderr  # the driver's "training ..." line says the precision
