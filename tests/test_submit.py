"""`backdoor-train submit` against a stand-in for Ray's JobSubmissionClient: options, the
runtime environment it sends, the log it follows, its end and Ctrl-C (the real cluster:
test_job_submit.py)."""

from __future__ import annotations

import os

import pytest
import ray.job_submission
import yaml

from backdoor_train.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, main

ADDRESS = "http://10.0.0.5:8265"


class FakeClient:
    """What submit uses of JobSubmissionClient; the class attributes are each test's script."""

    submitted: list[dict] = []
    used_ids: set[str] = set()
    log_chunks: list = []
    statuses: list[str] = []

    def __init__(self, address):
        assert address == ADDRESS

    def submit_job(self, *, entrypoint, runtime_env=None, submission_id=None):
        if submission_id in self.used_ids:
            # What Ray 2.58's job server answers (job_manager.submit_job, through the head).
            raise RuntimeError(f"Request failed with status code 500: Job with submission_id {submission_id} "
                               f"already exists. Please use a different submission_id..")
        uploaded = None
        if entrypoint == "backdoor-train run experiment.yaml":  # the real client uploads working_dir here
            with open(os.path.join(runtime_env["working_dir"], "experiment.yaml")) as fh:
                uploaded = yaml.safe_load(fh)
        job_id = submission_id or f"raysubmit_{len(self.submitted) + 1}"
        self.submitted.append({"entrypoint": entrypoint, "runtime_env": runtime_env, "id": job_id,
                               "uploaded": uploaded})
        self.used_ids.add(job_id)
        return job_id

    async def tail_job_logs(self, job_id):
        for chunk in self.log_chunks:
            if isinstance(chunk, BaseException):
                raise chunk
            yield chunk

    def get_job_status(self, job_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


@pytest.fixture
def fake_ray(monkeypatch):
    monkeypatch.setattr(FakeClient, "submitted", [])
    monkeypatch.setattr(FakeClient, "used_ids", set())
    monkeypatch.setattr(FakeClient, "log_chunks", ["line 1\n", "line 2\n"])
    monkeypatch.setattr(FakeClient, "statuses", ["SUCCEEDED"])
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    return FakeClient


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "sub", "data": {"root": "data"}, "storage": {"path": "runs"}}))
    return str(path)


def _output(capsys) -> str:
    """Everything printed: the job's log and submit's lines are progress, which the CLI may send to stderr."""
    captured = capsys.readouterr()
    return captured.out + captured.err


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_log_is_followed_once_and_the_status_read_at_its_end(fake_ray, experiment, capsys):
    assert main(["submit", experiment, "--address", ADDRESS]) == 0
    out = _output(capsys)
    assert out.count("line 1\nline 2\n") == 1 and "job raysubmit_1: SUCCEEDED" in out
    job = fake_ray.submitted[0]
    assert job["entrypoint"] == "backdoor-train run experiment.yaml"
    # Local paths travel absolute, and the uploaded folder is removed once Ray has it.
    assert os.path.isabs(job["uploaded"]["data"]["root"]) and os.path.isabs(job["uploaded"]["storage"]["path"])
    assert not os.path.exists(job["runtime_env"]["working_dir"])


def test_a_failed_job_fails_submit(fake_ray, experiment, capsys):
    fake_ray.statuses[:] = ["FAILED"]
    assert main(["submit", experiment, "--address", ADDRESS]) == EXIT_FAILED
    assert "job raysubmit_1: FAILED" in _output(capsys)


def test_a_broken_log_stream_waits_for_the_job_to_end(fake_ray, experiment, capsys, monkeypatch):
    import backdoor_train.runs.submit as submit

    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    fake_ray.log_chunks[:] = ["line 1\n", RuntimeError("WebSocket connection closed unexpectedly")]
    fake_ray.statuses[:] = ["RUNNING", "RUNNING", "SUCCEEDED"]
    assert main(["submit", experiment, "--address", ADDRESS]) == 0
    out = _output(capsys)
    assert "the log stream broke (RuntimeError: WebSocket connection closed unexpectedly)" in out
    assert f"ray job logs --address {ADDRESS} --follow raysubmit_1" in out and "raysubmit_1: SUCCEEDED" in out


def test_ctrl_c_leaves_the_job_running_and_says_how_to_stop_it(fake_ray, experiment, capsys):
    fake_ray.log_chunks[:] = ["line 1\n", KeyboardInterrupt()]
    assert main(["submit", experiment, "--address", ADDRESS, "--submission-id", "exp-7"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert f"job exp-7 goes on running on the cluster: stop it with `ray job stop --address {ADDRESS} exp-7`" in err
    assert "rerun" not in err


def test_runtime_env_file_is_merged_with_the_uploaded_config(fake_ray, experiment, tmp_path):
    env = _write(tmp_path, "env.yaml", "env_vars: {OMP_NUM_THREADS: '1'}\npip: [tqdm]\n")
    assert main(["submit", experiment, "--address", ADDRESS, "--runtime-env", env, "--no-wait"]) == 0
    runtime_env = fake_ray.submitted[0]["runtime_env"]
    assert runtime_env["env_vars"] == {"OMP_NUM_THREADS": "1"} and runtime_env["pip"] == ["tqdm"]
    assert fake_ray.submitted[0]["uploaded"]["name"] == "sub"
    # JSON is a runtime-env file too; with --no-upload the file's working_dir is the job's.
    env = _write(tmp_path, "env.json", '{"working_dir": "%s", "env_vars": {"A": "b"}}' % tmp_path)
    assert main(["submit", "/cluster/exp.yaml", "--address", ADDRESS, "--runtime-env", env, "--no-upload",
                 "--no-wait", "--set", "train.epochs=1"]) == 0
    job = fake_ray.submitted[1]
    assert job["runtime_env"] == {"working_dir": str(tmp_path), "env_vars": {"A": "b"}}
    assert job["entrypoint"] == "backdoor-train run /cluster/exp.yaml --set train.epochs=1"


def test_no_runtime_env_file_sends_none_with_no_upload(fake_ray):
    assert main(["submit", "/cluster/exp.yaml", "--address", ADDRESS, "--no-upload", "--no-wait"]) == 0
    assert fake_ray.submitted[0]["runtime_env"] is None


@pytest.mark.parametrize("text, says", [
    ("env_vars: [unclosed", "not a YAML or JSON file at line"),
    ("- a\n- b\n", "must hold a mapping"),
    ("env_vars: {A: 1}\n", "runtime_env['env_vars'] must be of type Dict[str, str]"),
    ("conda: x\npip: [a]\n", "cannot be specified at the same time"),
    ("working_dir: /tmp\n", "working_dir is the folder submit uploads the config in"),
])
def test_a_bad_runtime_env_file_is_named_and_nothing_is_submitted(fake_ray, experiment, tmp_path, capsys,
                                                                   text, says):
    env = _write(tmp_path, "env.yaml", text)
    assert main(["submit", experiment, "--address", ADDRESS, "--runtime-env", env]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"backdoor-train: error: --runtime-env {env}: ") and says in err
    assert len(err.splitlines()) == 1 and fake_ray.submitted == []


def test_a_missing_runtime_env_file_is_named(fake_ray, experiment, tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert main(["submit", experiment, "--address", ADDRESS, "--runtime-env", missing]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == f"backdoor-train: error: --runtime-env {missing}: No such file or directory"


def test_a_used_submission_id_is_a_clear_error(fake_ray, experiment, capsys):
    assert main(["submit", experiment, "--address", ADDRESS, "--submission-id", "exp-1", "--no-wait"]) == 0
    assert fake_ray.submitted[0]["id"] == "exp-1"
    capsys.readouterr()
    assert main(["submit", experiment, "--address", ADDRESS, "--submission-id", "exp-1"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == (
        f"backdoor-train: error: --submission-id exp-1: a job with that id already exists on {ADDRESS}; "
        f"Ray ids are used once, choose another")
