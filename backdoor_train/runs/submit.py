"""Submitting an experiment to a running Ray cluster as a Ray job (what `ray job submit` does).

The config is validated here first; local relative paths are made absolute and the resolved
YAML is uploaded as the job's working directory, so the job runs ``backdoor-train run
experiment.yaml`` on the cluster with nothing installed at job start (the cluster's image or
environment already has the package). With ``upload=False`` the path names a file that is
already on the cluster (e.g. the ConfigMap mounted in the Kubernetes RayCluster).
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
from typing import Callable, Optional

import yaml

from backdoor_train.config import load_config, parse_seeds
from backdoor_train.runs.locked import absolute_paths

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_SECONDS = 120


class SubmitError(RuntimeError):
    """The Ray cluster cannot be reached or refused the job."""



def submit(config_path: str, address: str, overrides: list[str], upload: bool = True, wait: bool = True,
           log: Callable[[str], None] = print, poll_seconds: float = 2.0,
           seeds: Optional[str] = None) -> tuple[str, Optional[str]]:
    """Submit; return (job id, final status or None when not waiting). ``seeds`` is ``--seeds``."""
    from ray.job_submission import JobSubmissionClient

    parsed = parse_seeds(seeds) if seeds is not None else None  # ConfigError on bad input, before any connection
    runtime_env = None
    if upload:
        cfg = absolute_paths(load_config(config_path, overrides, parsed))  # ConfigError on bad input
        workdir = tempfile.mkdtemp(prefix="backdoor-train-job-")
        with open(os.path.join(workdir, "experiment.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
        runtime_env = {"working_dir": workdir}
        entrypoint = "backdoor-train run experiment.yaml"
    else:
        entrypoint = "backdoor-train run " + shlex.quote(config_path) + "".join(
            " --set " + shlex.quote(o) for o in overrides) + (f" --seeds {shlex.quote(seeds)}" if seeds is not None else "")
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except Exception as exc:  # connection errors come in several types
            # Right after `ray start` the dashboard answers before its job agent has registered.
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise SubmitError(f"cannot submit to the Ray cluster at {address}: {exc}") from None
    log(f"submitted job {job_id} to {address}: {entrypoint}")
    if not wait:
        return job_id, None

    printed = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            print(logs[printed:], end="", flush=True)
            printed = len(logs)
        if status in TERMINAL:
            log(f"job {job_id}: {status}")
            return job_id, status
        time.sleep(poll_seconds)
