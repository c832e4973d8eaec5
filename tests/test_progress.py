"""Progress on long work: the ETA arithmetic, the driver's tally (lines, a bar on a terminal,
silence with --quiet), the workers' epoch lines and Neural Cleanse's per-class lines. Synthetic
inputs and a fake clock: no Ray, no data."""

from __future__ import annotations

import types

import pytest
import torch

from backdoor_train import progress
from backdoor_train.progress import QUIET_ENV, StepClock, Tally, duration, eta, eta_parallel


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loud(monkeypatch):
    monkeypatch.setenv(QUIET_ENV, "0")  # restored (unset) after the test, whatever it sets


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setenv(QUIET_ENV, "1")


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (8.4, "8s"), (59.6, "1m00s"), (245, "4m05s"),
                                           (3599, "59m59s"), (7380, "2h03m"), (-3, "0s")])
def test_duration_reads_as_people_write_it(seconds, text):
    assert duration(seconds) == text


def test_eta_is_the_mean_pace_times_what_is_left():
    assert eta(30.0, 3, 7) == pytest.approx(70.0)
    assert eta(30.0, 3, 0) == 0.0
    assert eta(12.0, 0, 5) is None  # no pace before the first unit


@pytest.mark.parametrize("unit, running_for, queued, slots, expected", [
    (10.0, [], 4, 2, 20.0),  # two rounds of two
    (10.0, [], 3, 2, 20.0),  # the third waits for a slot
    (10.0, [3.0], 1, 2, 10.0),  # an idle slot takes the queued one now; the running one ends at 7
    (10.0, [3.0, 8.0], 1, 2, 12.0),  # the queued one starts when the older one ends, in 2 s
    (10.0, [15.0], 0, 1, 0.0),  # running longer than the mean: due now, not negative
    (10.0, [], 0, 3, 0.0),
])
def test_eta_parallel_fills_the_first_slot_to_come_free(unit, running_for, queued, slots, expected):
    assert eta_parallel(unit, running_for, queued, slots) == pytest.approx(expected)


def test_a_resumed_loop_paces_only_the_steps_it_runs():
    clock = FakeClock()
    steps = StepClock(10, done=4, clock=clock)  # epochs 1-4 trained by an earlier run
    assert steps.eta() is None
    clock.now += 12
    steps.step()
    clock.now += 8
    steps.step()
    # 20 s for 2 epochs trained now; 4 left: 40 s (the earlier 4 epochs are no part of the pace).
    assert steps.summary() == "20s elapsed  ETA 40s"
    for _ in range(4):
        clock.now += 10
        steps.step()
    assert steps.summary() == "1m00s elapsed"  # done: no ETA


def test_tally_lines_say_count_elapsed_eta_running_and_failed(loud):
    clock, said = FakeClock(), []
    tally = Tally("seed", 5, said.append, slots=2, earlier=1, bar=False, clock=clock)
    tally.start("seed-2")
    tally.start("seed-3")
    clock.now += 60
    tally.finish("seed-2")
    tally.start("seed-4")
    clock.now += 30
    tally.finish("seed-3", error="RuntimeError: boom")
    tally.start("seed-5")
    clock.now += 30
    tally.finish("seed-4")  # took 60 s, like seed-2; seed-5 has run 30 s of its 60
    tally.finish("seed-5")
    tally.close()
    assert said == [
        # seed-3 has run 60 s of the mean 60, seed-4 is queued and starts in the free slot: 60 s.
        "seed seed-2 finished (2/5; 1m00s elapsed, ETA 1m00s; running seed-3)",
        "seed seed-3 FAILED: RuntimeError: boom",
        "seed seed-4 finished (4/5; 2m00s elapsed, ETA 30s; running seed-5; failed seed-3)",
        "seed seed-5 finished (5/5; 2m00s elapsed; failed seed-3)",
    ]


def test_tally_without_eta_and_with_many_running(loud):
    said = []
    tally = Tally("defense", 7, said.append, slots=7, with_eta=False, bar=False, clock=FakeClock())
    for name in "abcdefg":
        tally.start(name)
    tally.finish("a")
    assert said == ["defense a finished (1/7; 0s elapsed; running b, c, d, e +2 more)"]


def test_quiet_says_failures_only(quiet, monkeypatch):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    monkeypatch.setattr(progress, "_ray_bar", lambda *a: pytest.fail("a bar with --quiet"))
    said = []
    tally = Tally("trial", 2, said.append)
    tally.start("a")
    tally.start("b")
    tally.finish("a")
    tally.finish("b", error="ValueError: no")
    tally.close()
    assert said == ["trial b FAILED: ValueError: no"]


class FakeBar:
    def __init__(self, desc: str, unit: str, total: int) -> None:
        self.desc, self.unit, self.total, self.n, self.closed = desc, unit, total, 0, False

    def update(self, n: int) -> None:
        self.n += n

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("terminal", [True, False])
def test_a_bar_on_a_terminal_lines_elsewhere(loud, monkeypatch, terminal):
    bars: list[FakeBar] = []
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: terminal)
    monkeypatch.setattr(progress, "_ray_bar", lambda *a: bars.append(FakeBar(*a)) or bars[-1])
    said = []
    tally = Tally("trial", 3, said.append, earlier=1)
    tally.start("a")
    tally.start("b")
    tally.finish("a")
    if terminal:
        (bar,) = bars
        # Only the trials run now: the one finished earlier is not on the bar.
        assert (bar.total, bar.n, bar.unit, bar.desc) == (2, 1, "trial", "trials (running b)")
        assert said == []
        tally.finish("b", error="boom")
        assert said == ["trial b FAILED: boom"] and bar.desc == "trials (failed b)"
        tally.close()
        assert bar.closed
    else:
        assert bars == [] and said == ["trial a finished (2/3; 0s elapsed, ETA 0s; running b)"]


def _worker(rank: int):
    from backdoor_train.training.worker import WorkerContext

    return WorkerContext(types.SimpleNamespace(name="exp"), "poisoned", rank, 2, torch.device("cpu"), None)


def test_worker_progress_lines_are_rank_0s_and_quiet_drops_them(monkeypatch, capsys):
    monkeypatch.setenv(QUIET_ENV, "0")
    _worker(0).say("epoch 1/2", progress=True)
    _worker(1).say("epoch 1/2", progress=True)
    assert capsys.readouterr().out == "[exp/poisoned] epoch 1/2\n"
    monkeypatch.setenv(QUIET_ENV, "1")
    _worker(0).say("epoch 1/2", progress=True)
    _worker(0).say("resuming after epoch 1 from x")  # not progress: what the run decided
    assert capsys.readouterr().out == "[exp/poisoned] resuming after epoch 1 from x\n"


def test_neural_cleanse_says_each_class_with_an_eta():
    from backdoor_train.defenses.cleanse import neural_cleanse

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(30, 1, 4, 4), torch.arange(30) % 3
    said: list[str] = []
    neural_cleanse(model, x, y, 3, say=said.append, steps=2, batch_size=8)
    assert [line.split(":")[1] for line in said] == [" class 0 (1/3)", " class 1 (2/3)", " class 2 (3/3)"]
    assert all("elapsed" in line for line in said)
    assert all("ETA" in line for line in said[:2]) and "ETA" not in said[2]


def test_quiet_is_an_option_of_the_long_commands_and_reaches_the_job_env(monkeypatch):
    from backdoor_train.cli import build_parser
    from backdoor_train.training.raysession import _job_env

    for argv in (["run", "x.yaml"], ["sweep", "s.yaml"], ["detect", "x.yaml"]):
        assert build_parser().parse_args(argv + ["--quiet"]).quiet
        assert not build_parser().parse_args(argv).quiet
    monkeypatch.setenv(QUIET_ENV, "1")
    assert _job_env("http://127.0.0.1:8265")[QUIET_ENV] == "1"  # every worker and task of the job
    monkeypatch.delenv(QUIET_ENV)
    assert QUIET_ENV not in _job_env("http://127.0.0.1:8265")


def test_the_cli_sets_quiet_for_the_run(monkeypatch, tmp_path):
    from backdoor_train import cli

    monkeypatch.setenv(QUIET_ENV, "0")
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "detect", lambda args: seen.append(progress.quiet()) or 0)
    assert cli.main(["detect", str(tmp_path / "x.yaml"), "--address", "auto", "--quiet"]) == 0
    assert seen == [True]
