"""Two clocks, and timers that go through the library's public extension points.

Why two clocks: the wall clock is what a user waits for, but on a shared machine it also
counts time other processes took; the process CPU clock (one thread per process) does not,
so a ratio measured in both says whether a difference is ours or the neighbours'.

Why no patching: a benchmark that replaces library functions measures a program nobody runs
and breaks when a private name moves. Phases are timed where a user could time them: the
loss callable (the forward), a ``PruningStrategy`` wrapper (selection) and a ``LocalBackend``
subclass (the backward); what the probe does between them is the remainder.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gradprobe_dist import PruningStrategy
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.strategies import SelectionContext


@dataclass
class Seconds:
    """Elapsed wall-clock and process-CPU seconds of one measurement."""

    wall: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: "Seconds") -> "Seconds":
        return Seconds(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: "Seconds") -> "Seconds":
        return Seconds(self.wall - other.wall, self.cpu - other.cpu)

    def times(self, factor: float) -> "Seconds":
        return Seconds(self.wall * factor, self.cpu * factor)


def timed(fn: Callable, *args, **kwargs) -> tuple[object, Seconds]:
    """``fn(*args, **kwargs)`` and how long it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, Seconds(time.perf_counter() - wall, time.process_time() - cpu)


def median(samples: Sequence[Seconds]) -> Seconds:
    """Per-clock median of repeated measurements."""
    return Seconds(statistics.median(s.wall for s in samples), statistics.median(s.cpu for s in samples))


class Stopwatch:
    """Adds up the time of every call made through ``wrap``."""

    def __init__(self):
        self.total = Seconds()
        self.calls = 0

    def wrap(self, fn: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            result, took = timed(fn, *args, **kwargs)
            self.total, self.calls = self.total + took, self.calls + 1
            return result
        return timed_call


class TimedStrategy(PruningStrategy):
    """``strategy`` itself, with the time of its ``select`` calls in ``self.watch``; its other
    attributes (``nm``, ``scope``, ...) read through."""

    def __init__(self, strategy: PruningStrategy):
        self.inner, self.watch = strategy, Stopwatch()
        self.needs_activations = strategy.needs_activations

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def select(self, context: SelectionContext, sparsity: float) -> dict[str, torch.Tensor]:
        return self.watch.wrap(self.inner.select)(context, sparsity)

    def select_weights_to_prune(self, model, sparsity: float) -> dict[str, torch.Tensor]:
        return self.watch.wrap(self.inner.select_weights_to_prune)(model, sparsity)

    def get_name(self) -> str:
        return self.inner.get_name()


class TimedBackwardBackend(LocalBackend):
    """The one-process backend, with the time of every ``backward`` in ``self.watch``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.watch = Stopwatch()

    def backward(self, loss: torch.Tensor) -> None:
        self.watch.wrap(super().backward)(loss)
