"""Object storage against a real S3 API (moto_server): artifacts, staged data, and every error."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

from backdoor_train.cli import EXIT_BAD_INPUT, main
from backdoor_train.config import ExperimentConfig
from backdoor_train.data.split import DataError
from backdoor_train.data.mnist import MNIST
from backdoor_train.storage.staging import load_splits, stage_data
from backdoor_train.storage.s3 import S3Settings, S3Storage
from backdoor_train.storage import StorageError

from conftest import free_port, bucket_keys, fresh_s3_client



def test_artifacts_round_trip_and_are_visible_to_a_fresh_client(s3_env, s3_server):
    storage = S3Storage(f"s3://{s3_env}/runs")
    storage.check()
    storage.write_text("exp/results.json", json.dumps({"ok": 1}))
    storage.write_bytes("exp/clean/model.pt", b"\x00\x01")
    assert storage.exists("exp/results.json") and not storage.exists("exp/nothing.json")
    assert storage.list("exp") == ["exp/clean/model.pt", "exp/results.json"]
    assert bucket_keys(s3_server, s3_env) == ["runs/exp/clean/model.pt", "runs/exp/results.json"]
    body = fresh_s3_client(s3_server).get_object(Bucket=s3_env, Key="runs/exp/results.json")["Body"].read()
    assert json.loads(body) == {"ok": 1}
    assert storage.key_uri("exp/results.json") == f"s3://{s3_env}/runs/exp/results.json"
    path, fs = storage.ray_storage()
    assert path == f"{s3_env}/runs"
    assert fs.get_file_info(f"{s3_env}/runs/exp/results.json").size == len(body)


def test_unreachable_endpoint_is_named(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint http://127.0.0.1"):
        S3Storage(f"s3://{s3_env}/runs").check()


def test_bad_credentials_are_named_without_the_secret(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-4711")
    with pytest.raises(StorageError, match="credentials rejected") as info:
        S3Storage(f"s3://{s3_env}/runs").check()
    assert "not-the-secret-4711" not in str(info.value)
    assert "AWS_SECRET_ACCESS_KEY" in str(info.value)


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-42' .* does not exist"):
        S3Storage("s3://no-such-bucket-42/runs").check()


def test_missing_credentials(s3_env, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match="no S3 credentials"):
        S3Storage(f"s3://{s3_env}/runs").check()


def test_bad_endpoint_variable():
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL must be an http"):
        S3Settings.from_env({"AWS_ENDPOINT_URL": "minio:9000"})


@pytest.mark.parametrize("case", ["unreachable", "credentials", "bucket"])
def test_cli_refuses_bad_storage_before_ray_and_writes_nothing(case, s3_env, s3_server, monkeypatch,
                                                               tmp_path, capsys, mnist_root):
    bucket = s3_env
    if case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    elif case == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    else:
        bucket = "no-such-bucket-42"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": mnist_root}, "storage": {"path": f"s3://{bucket}/runs"}}))
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init on bad storage"))
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert {"unreachable": "cannot reach the S3 endpoint", "credentials": "credentials rejected",
            "bucket": "does not exist"}[case] in err
    assert bucket_keys(s3_server, s3_env) == []


def test_stage_data_then_read_it_through_the_node_cache(s3_env, s3_server, mnist_root, mnist_splits, capsys):
    assert main(["stage-data", f"s3://{s3_env}/datasets/mnist", "--source", mnist_root]) == 0
    keys = bucket_keys(s3_server, s3_env)
    assert "datasets/mnist/mnist_manifest.json" in keys
    assert "datasets/mnist/MNIST/raw/train-images-idx3-ubyte.gz" in keys
    cfg = ExperimentConfig.from_dict({"data": {"root": f"s3://{s3_env}/datasets/mnist"}})
    train, test = load_splits(cfg)
    assert torch.equal(train.images, mnist_splits[0].images) and torch.equal(test.labels, mnist_splits[1].labels)

    # Staging again uploads nothing new; the cache serves later reads without S3.
    stage_data(mnist_root, f"s3://{s3_env}/datasets/mnist")
    assert "already staged" in capsys.readouterr().out
    fresh_s3_client(s3_server).delete_object(Bucket=s3_env, Key="datasets/mnist/MNIST/raw/t10k-labels-idx1-ubyte.gz")
    assert torch.equal(load_splits(cfg)[1].labels, mnist_splits[1].labels)


def test_staged_file_that_does_not_match_its_manifest_is_refused(s3_env, s3_server, mnist_root):
    stage_data(mnist_root, f"s3://{s3_env}/mnist", log=lambda m: None)
    fresh_s3_client(s3_server).put_object(Bucket=s3_env, Key="mnist/MNIST/raw/t10k-labels-idx1-ubyte.gz",
                                          Body=b"tampered")
    cfg = ExperimentConfig.from_dict({"data": {"root": f"s3://{s3_env}/mnist"}})
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz does not match its sha256"):
        load_splits(cfg)


@pytest.mark.parametrize("manifest", [
    "{not json", "[1, 2]", '{"MNIST/raw/train-images-idx3-ubyte.gz": "00"}',
    # Keys become local paths: a bucket's writer must not choose where the node writes.
    json.dumps({f"../../../../../escaped-{i}": hashlib.sha256(b"x").hexdigest() for i in range(4)})])
def test_a_planted_staged_manifest_is_refused_and_writes_nothing_outside_the_cache(
        s3_env, s3_server, tmp_path, monkeypatch, manifest):
    monkeypatch.setenv("BACKDOOR_TRAIN_CACHE_DIR", str(tmp_path / "a" / "b" / "cache"))
    client = fresh_s3_client(s3_server)
    for i in range(4):  # S3 keeps ".." in a key as it is
        client.put_object(Bucket=s3_env, Key=f"evil/../../../../../escaped-{i}", Body=b"x")
    client.put_object(Bucket=s3_env, Key="evil/mnist_manifest.json", Body=manifest.encode())
    cfg = ExperimentConfig.from_dict({"data": {"root": f"s3://{s3_env}/evil"}})
    with pytest.raises(DataError, match=r"^data.root: s3://.*/evil/mnist_manifest.json (is not JSON|is not a manifest)"):
        load_splits(cfg)
    assert not [p for p in tmp_path.rglob("escaped-*")]


def test_unstaged_data_root_says_what_to_do(s3_env):
    cfg = ExperimentConfig.from_dict({"data": {"root": f"s3://{s3_env}/empty"}})
    with pytest.raises(DataError, match="run `backdoor-train stage-data` first"):
        load_splits(cfg)


def test_a_run_waits_for_data_being_staged_and_gives_up_at_the_bound(s3_env, mnist_root, mnist_splits, capsys):
    import threading
    import time

    # A run that starts before the staging Job has finished (the Kubernetes start-up race).
    uri = f"s3://{s3_env}/late"
    cfg = ExperimentConfig.from_dict({"data": {"root": uri, "wait_seconds": 60}})
    stager = threading.Timer(3.0, stage_data, args=(mnist_root, uri), kwargs={"log": lambda m: None})
    stager.start()
    started = time.monotonic()
    train, _ = load_splits(cfg)
    stager.join()
    assert 3.0 <= time.monotonic() - started < 30 and torch.equal(train.labels, mnist_splits[0].labels)
    assert f"waiting up to 60s (data.wait_seconds) for MNIST to be staged at {uri}" in capsys.readouterr().out

    never = ExperimentConfig.from_dict({"data": {"root": f"s3://{s3_env}/never", "wait_seconds": 1.5}})
    started = time.monotonic()
    with pytest.raises(DataError, match=r"no staged MNIST at .* after waiting [\d.]+s \(data.wait_seconds: 1.5\)"):
        load_splits(never)
    assert 1.5 <= time.monotonic() - started < 10


class _Flaky:
    """A storage that answers ``errors`` in turn, then the manifest."""

    def __init__(self, *errors):
        self.errors = list(errors)

    def read_text(self, key):
        if self.errors:
            raise self.errors.pop(0)
        return '{"MNIST/raw/x.gz": "0"}'


def test_the_wait_rides_out_storage_not_yet_up_but_not_refused_credentials(monkeypatch):
    from backdoor_train.storage.staging import wait_for_staged

    monkeypatch.setattr("time.sleep", lambda s: None)
    flaky = _Flaky(StorageError("cannot reach the S3 endpoint", kind="unreachable"),
                   StorageError("s3://b/mnist_manifest.json does not exist", kind="missing"))
    assert wait_for_staged(flaky, "s3://b", MNIST, 60, log=lambda m: None) == {"MNIST/raw/x.gz": "0"}
    with pytest.raises(DataError, match="credentials rejected") as refused:
        wait_for_staged(_Flaky(StorageError("S3 credentials rejected", kind="refused")), "s3://b", MNIST, 60,
                        lambda m: None)
    assert "waiting" not in str(refused.value)  # it returned at once: no "after waiting 60s"


def test_stage_data_refuses_a_corrupt_source(s3_env, tmp_path, mnist_root):
    import shutil

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                 "train-labels-idx1-ubyte"):
        shutil.copy(f"{mnist_root}/MNIST/raw/{name}", raw / name)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"junk")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        stage_data(str(tmp_path), f"s3://{s3_env}/mnist")
    assert len(MNIST.load(mnist_root, False)) == 10000


def test_stage_data_can_create_its_bucket(s3_env, s3_server, mnist_root):
    bucket = s3_env + "-new"
    assert main(["stage-data", f"s3://{bucket}/mnist", "--source", mnist_root, "--create-bucket"]) == 0
    assert "mnist/mnist_manifest.json" in bucket_keys(s3_server, bucket)
    # Creating it again is a no-op.
    assert main(["stage-data", f"s3://{bucket}/mnist", "--source", mnist_root, "--create-bucket"]) == 0


def test_both_clients_retry_transient_errors_with_backoff():
    settings = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "BACKDOOR_TRAIN_S3_MAX_ATTEMPTS": "7",
                                    "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    retries = settings.boto3_client().meta.config.retries
    assert retries["mode"] == "standard" and retries["total_max_attempts"] == 7
    # pyarrow's filesystem goes to the workers pickled: endpoint and scheme must survive that.
    kwargs = settings.pyarrow_fs().__reduce__()[1][0]
    assert (kwargs["endpoint_override"], kwargs["scheme"], kwargs["force_virtual_addressing"]) == \
        ("127.0.0.1:9", "http", False)
    with pytest.raises(StorageError, match="BACKDOOR_TRAIN_S3_MAX_ATTEMPTS must be an integer"):
        S3Settings.from_env({"BACKDOOR_TRAIN_S3_MAX_ATTEMPTS": "many"})
