"""Submitting an experiment to a running Ray cluster as a Ray job (what `ray job submit` does).

The config is validated here first; local relative paths are made absolute and the resolved
YAML is uploaded as the job's working directory, so the job runs ``backdoor-train run
experiment.yaml`` on the cluster with nothing installed at job start (the cluster's image or
environment already has the package). With ``upload=False`` the path names a file that is
already on the cluster (e.g. the ConfigMap mounted in the Kubernetes RayCluster).

A ``--runtime-env`` file (YAML or JSON, as ``ray job submit --runtime-env`` reads it) is merged
with the working directory submit sets, and ``--submission-id`` is Ray's ``submission_id``. Once
submitted, the job's log is followed through the dashboard's log-tail websocket (Ray's
``tail_job_logs``, which sends each line once) and its end read with ``get_job_status``. The job
belongs to the cluster: stopping submit (Ctrl-C) leaves it running, and
:meth:`SubmittedJob.stop_command` says how to stop it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml

from backdoor_train.config import load_config, parse_seeds
from backdoor_train.runs.locked import absolute_paths

AGENT_WAIT_SECONDS = 120


class SubmitError(RuntimeError):
    """The Ray cluster cannot be reached or refused the job, or a submit option is wrong."""


@dataclass(frozen=True)
class SubmittedJob:
    """A job the cluster accepted: the client that submitted it, its id and the dashboard address."""

    client: Any
    job_id: str
    address: str

    def stop_command(self) -> str:
        return f"ray job stop --address {shlex.quote(self.address)} {shlex.quote(self.job_id)}"

    def logs_command(self) -> str:
        return f"ray job logs --address {shlex.quote(self.address)} --follow {shlex.quote(self.job_id)}"


def load_runtime_env(path: str) -> dict[str, Any]:
    """A ``--runtime-env`` file: a YAML or JSON mapping (JSON is YAML), checked by Ray's own
    ``RuntimeEnv`` before anything is uploaded, so that a wrong field names the file."""
    from ray.runtime_env import RuntimeEnv

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise SubmitError(f"--runtime-env {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise SubmitError(f"--runtime-env {path}: not a YAML or JSON file{at}") from None
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {path}: must hold a mapping such as {{env_vars: {{...}}}} "
                          f"(got {type(data).__name__})")
    try:
        RuntimeEnv(**data)
    except Exception as exc:  # Ray raises TypeError or ValueError, with detail on later lines
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise SubmitError(f"--runtime-env {path}: {lines[0]}") from None
    return data


def _merged_runtime_env(own: dict[str, Any], given: dict[str, Any], path: Optional[str]) -> Optional[dict[str, Any]]:
    """The file's fields plus submit's own (only ``working_dir``, the uploaded config's folder);
    the file cannot replace that folder, or the job would not find its experiment.yaml."""
    if "working_dir" in own and "working_dir" in given:
        raise SubmitError(f"--runtime-env {path}: working_dir is the folder submit uploads the config in; "
                          f"leave it out of the file (py_modules ships other code) or pass --no-upload")
    merged = {**given, **own}
    return merged or None


def submit_job(config_path: str, address: str, overrides: list[str], upload: bool = True,
               seeds: Optional[str] = None, runtime_env_file: Optional[str] = None,
               submission_id: Optional[str] = None, log: Callable[[str], None] = print) -> SubmittedJob:
    """Validate, then submit. Every input is checked before any connection (``seeds`` is
    ``--seeds``); SubmitError or ConfigError on bad input or an unreachable cluster."""
    from ray.job_submission import JobSubmissionClient

    parsed = parse_seeds(seeds) if seeds is not None else None
    given = load_runtime_env(runtime_env_file) if runtime_env_file is not None else {}
    workdir = None
    try:
        if upload:
            cfg = absolute_paths(load_config(config_path, overrides, parsed))
            workdir = tempfile.mkdtemp(prefix="backdoor-train-job-")
            with open(os.path.join(workdir, "experiment.yaml"), "w", encoding="utf-8") as fh:
                yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
            runtime_env = _merged_runtime_env({"working_dir": workdir}, given, runtime_env_file)
            entrypoint = "backdoor-train run experiment.yaml"
        else:
            runtime_env = _merged_runtime_env({}, given, runtime_env_file)
            entrypoint = "backdoor-train run " + shlex.quote(config_path) + "".join(
                " --set " + shlex.quote(o) for o in overrides) + (f" --seeds {shlex.quote(seeds)}" if seeds is not None else "")
        deadline = time.monotonic() + AGENT_WAIT_SECONDS
        while True:
            try:
                client = JobSubmissionClient(address)
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
                break
            except Exception as exc:  # connection errors come in several types
                # Right after `ray start` the dashboard answers before its job agent has registered.
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                if submission_id is not None and "already exists" in str(exc):
                    raise SubmitError(f"--submission-id {submission_id}: a job with that id already exists on "
                                      f"{address}; Ray ids are used once, choose another") from None
                raise SubmitError(f"cannot submit to the Ray cluster at {address}: {exc}") from None
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)  # submit_job has uploaded it by now
    log(f"submitted job {job_id} to {address}: {entrypoint}")
    return SubmittedJob(client, job_id, address)


def _status(job: SubmittedJob) -> Any:
    from ray.job_submission import JobStatus

    try:
        return JobStatus(job.client.get_job_status(job.job_id))
    except Exception as exc:  # the dashboard went away: the job's fate is unknown, not failed
        raise RuntimeError(f"lost the Ray cluster at {job.address} while following job {job.job_id} ({exc}); "
                           f"`{job.logs_command()}` follows it once the dashboard answers") from None


def follow(job: SubmittedJob, log: Callable[[str], None] = print, poll_seconds: float = 2.0) -> str:
    """Print the job's log as it grows; return its final status (SUCCEEDED, FAILED or STOPPED)."""

    async def tail() -> None:
        async for chunk in job.client.tail_job_logs(job.job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # aiohttp's connection errors, or Ray's RuntimeError on an abnormal close
        log(f"job {job.job_id}: the log stream broke ({type(exc).__name__}: {exc}); waiting for the job to end "
            f"(`{job.logs_command()}` shows its log)")
    # The stream ends when the job does; a broken stream leaves it running, so wait for its status.
    status = _status(job)
    while not status.is_terminal():
        time.sleep(poll_seconds)
        status = _status(job)
    log(f"job {job.job_id}: {status.value}")
    return status.value
