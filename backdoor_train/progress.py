"""Progress on long work: elapsed time and an ETA where a person waits, and silence with ``--quiet``.

Three kinds of long work report it (docs/cli.md, "Progress"):

* a model's epochs: its rank-0 Train worker ends each epoch line with the time trained so far
  and an ETA (``StepClock``; a resumed fit's pace counts only the epochs it trains now);
* Neural Cleanse's classes, printed by its Ray task the same way;
* on the driver, a multi-seed run's seeds, a sweep's trials and ``detect``'s defenses
  (``Tally``): a bar on stderr when stderr is a terminal (Ray's own ``tqdm_ray``, which Ray
  hides while it prints the workers' forwarded lines), else a line each time one finishes.

Workers and tasks print lines, never bars: a line reads the same in a terminal, a log file and a
pod's log. ``--quiet`` sets ``QUIET_ENV``, which the job's runtime environment carries to every
task and worker (training/raysession.py); then none of this prints, while errors and results
still do. The standard library only (tqdm through Ray, lazily), so that every layer may use it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

QUIET_ENV = "BACKDOOR_TRAIN_QUIET"
MAX_NAMES = 4  # running / failed units named on a line; more are counted


def quiet() -> bool:
    """Whether progress stays unprinted (``--quiet``, or ``BACKDOOR_TRAIN_QUIET=1``)."""
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def duration(seconds: float) -> str:
    """A duration as people read it: ``8s``, ``4m05s``, ``2h03m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(elapsed: float, done: int, left: int) -> Optional[float]:
    """Seconds until ``left`` more units are done, one after the other, at the pace of the
    ``done`` units of ``elapsed`` seconds; None before the first unit (no pace yet)."""
    if done <= 0:
        return None
    return elapsed / done * left


def eta_parallel(unit_seconds: float, running_for: Sequence[float], queued: int, slots: int) -> float:
    """Seconds until the running units (each running for the seconds in ``running_for``) and
    ``queued`` more are done, ``slots`` at a time, when a unit takes ``unit_seconds``: each
    queued unit starts in the first slot to come free."""
    free_at = sorted(max(0.0, unit_seconds - age) for age in running_for)
    free_at += [0.0] * max(0, slots - len(free_at))  # idle slots take queued units at once
    for _ in range(queued):
        free_at.sort()
        free_at[0] += unit_seconds
    return max(free_at, default=0.0)


class StepClock:
    """The pace of a loop of ``total`` steps of which ``done`` were done before it started (a
    resumed fit's epochs: done, but no part of the pace measured now)."""

    def __init__(self, total: int, done: int = 0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.done, self._before, self._clock = total, done, done, clock
        self.started = clock()

    def step(self) -> None:
        self.done += 1

    def elapsed(self) -> float:
        return self._clock() - self.started

    def eta(self) -> Optional[float]:
        return eta(self.elapsed(), self.done - self._before, self.total - self.done)

    def summary(self) -> str:
        """``"1m02s elapsed  ETA 3m10s"``; no ETA once every step is done."""
        left = self.eta() if self.done < self.total else None
        return f"{duration(self.elapsed())} elapsed" + ("" if left is None else f"  ETA {duration(left)}")


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f" +{len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced, or closed
        return False


class Tally:
    """Units of work (seeds, trials, defenses) that run ``slots`` at a time, counted as they
    finish out of ``total`` (of which ``earlier`` finished in an earlier run). With ``bar``
    (default: when stderr is a terminal) a bar on stderr, else a line through ``log`` as each
    finishes, with the elapsed time, an ETA (``with_eta``) and the units running and failed.
    A failure is always said (an error); with ``quiet()`` nothing else is."""

    def __init__(self, what: str, total: int, log: Callable[[str], None], slots: int = 1, earlier: int = 0,
                 with_eta: bool = True, bar: Optional[bool] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.what, self.total, self.log, self.slots, self.with_eta = what, total, log, slots, with_eta
        self.finished = earlier
        self._clock = clock
        self.started_at = clock()
        self.running: dict[str, float] = {}  # name: when it started
        self.failed: list[str] = []
        self.durations: list[float] = []  # of the units that finished now, failures left out
        self.silent = quiet()
        self._bar: Any = None
        if not self.silent and (stderr_is_terminal() if bar is None else bar):
            self._bar = _ray_bar(f"{what}s", what, total - earlier)

    def start(self, name: str) -> None:
        self.running[name] = self._clock()
        self._describe()

    def finish(self, name: str, error: Optional[str] = None) -> None:
        """``name`` finished, or failed with ``error``."""
        began = self.running.pop(name, self.started_at)
        self.finished += 1
        if error is not None:
            self.failed.append(name)
            self.log(f"{self.what} {name} FAILED: {error}")
        else:
            self.durations.append(self._clock() - began)
        if self._bar is not None:
            self._bar.update(1)
            self._describe()
        elif not self.silent and error is None:
            self.log(self.line(name))

    def eta(self) -> Optional[float]:
        """Seconds until every unit is done, each taking the mean time of those finished now."""
        if not self.durations:
            return None
        now = self._clock()
        queued = self.total - self.finished - len(self.running)
        return eta_parallel(sum(self.durations) / len(self.durations), [now - t for t in self.running.values()],
                            queued, self.slots)

    def line(self, name: str) -> str:
        """``"trial x finished (3/8; 4m10s elapsed, ETA 6m40s; running a, b; failed c)"``."""
        parts = [f"{self.finished}/{self.total}", f"{duration(self._clock() - self.started_at)} elapsed"]
        left = self.eta() if self.with_eta and self.finished < self.total else None
        if left is not None:
            parts[-1] += f", ETA {duration(left)}"
        if self.running:
            parts.append(f"running {_names(list(self.running))}")
        if self.failed:
            parts.append(f"failed {_names(self.failed)}")
        return f"{self.what} {name} finished ({'; '.join(parts)})"

    def _describe(self) -> None:
        if self._bar is None:
            return
        state = [f"running {_names(list(self.running))}"] if self.running else []
        state += [f"failed {_names(self.failed)}"] if self.failed else []
        self._bar.set_description(f"{self.what}s" + (f" ({'; '.join(state)})" if state else ""))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _ray_bar(desc: str, unit: str, total: int) -> Any:
    """A bar drawn by Ray's driver-side tqdm manager: Ray clears it while it prints a worker's
    line and draws it again after, so forwarded lines never run into it. Every update is drawn
    (by default Ray draws at most one a second and would drop the last)."""
    from ray.experimental import tqdm_ray

    return tqdm_ray.tqdm(desc=desc, total=max(0, total), unit=unit, flush_interval_s=0)
