"""scripts/setup.sh's options, through --dry-run on a copy of the script (nothing is installed;
`--cpu` against PyTorch's real CPU index is not exercised by any test)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _setup(tmp_path, *args, venv_python: str | None = None, **env):
    """Run a copy of setup.sh in an empty checkout, optionally with a stand-in .venv/bin/python."""
    os.makedirs(tmp_path / "scripts", exist_ok=True)
    shutil.copy(os.path.join(REPO_ROOT, "scripts", "setup.sh"), tmp_path / "scripts" / "setup.sh")
    if venv_python is not None:
        os.makedirs(tmp_path / ".venv" / "bin", exist_ok=True)
        (tmp_path / ".venv" / "bin" / "python").write_text("#!/bin/sh\n" + venv_python + "\n")
        os.chmod(tmp_path / ".venv" / "bin" / "python", 0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    proc = subprocess.run(["bash", "scripts/setup.sh", "--dry-run", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**base, "PYTHON": "python-that-is-not-there", **env})
    return proc.returncode, [line for line in proc.stdout.splitlines() if "pip install" in line], proc.stderr


def test_the_default_and_test_installs_are_the_pinned_ones(tmp_path):
    rc, pip, _ = _setup(tmp_path)
    assert rc == 0 and pip == ["+ .venv/bin/python -m pip install -q -c constraints.txt -e ."]
    rc, pip, _ = _setup(tmp_path, "--test")
    assert rc == 0 and pip == [r"+ .venv/bin/python -m pip install -q -c constraints.txt -e .\[test\]"]


@pytest.mark.parametrize("args", [("--cpu",), ("--cpu", "--test"), ("--test", "--cpu")])
def test_cpu_takes_torch_from_pytorchs_cpu_index_first(tmp_path, args):
    rc, pip, _ = _setup(tmp_path, *args, venv_python="exit 1")  # a .venv without torch
    assert rc == 0 and len(pip) == 2
    assert pip[0] == (f"+ .venv/bin/python -m pip install -q -c constraints.txt --index-url {CPU_INDEX} "
                      f"--extra-index-url https://pypi.org/simple torch torchvision")
    assert pip[1].endswith(r"-e .\[test\]" if "--test" in args else "-e .")


def test_cpu_keeps_the_configured_index_as_an_extra_one(tmp_path):
    rc, pip, _ = _setup(tmp_path, "--cpu", venv_python="exit 1", PIP_INDEX_URL="https://mirror.example/simple")
    assert rc == 0 and f"--index-url {CPU_INDEX} --extra-index-url https://mirror.example/simple" in pip[0]


def test_cpu_refuses_a_venv_with_torchs_cuda_build(tmp_path):
    # The stand-in answers 0 to "is torch.version.cuda set?": the CUDA build is installed.
    rc, pip, err = _setup(tmp_path, "--cpu", venv_python="exit 0")
    assert rc == 2 and pip == []
    assert "error: .venv holds torch's CUDA build; remove .venv (rm -rf .venv) and rerun with --cpu" in err


def test_an_unknown_option_is_refused_with_the_options(tmp_path):
    rc, pip, err = _setup(tmp_path, "--gpu")
    assert rc == 2 and pip == []
    assert "unknown option --gpu" in err and "scripts/setup.sh --cpu" in err
