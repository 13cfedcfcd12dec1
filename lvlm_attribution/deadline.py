"""Per-request compute deadlines that end a request, never the process serving it.

A request that runs too long must not hold the only worker until the server kills it (TorchServe's
responseTimeout kills the worker process, ~10 s outage). Methods stay unaware of time: while a
request runs, every decoder layer checks the deadline before its forward (a forward pre-hook, so
every forward of every method, generation included, is a cancellation point), and the engine
checks between stages. Granularity: one decoder layer's forward; a backward pass already running
is not interrupted, so the deadline must leave room for the longest single backward below the
server's hard timeout.

    deadline = Deadline(30.0)
    with deadline.enforced(adapter.decoder_layers()):
        ...  # raises DeadlineExceeded at the first layer forward past the deadline
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn


class DeadlineExceeded(RuntimeError):
    """The request ran past its deadline; `stage` is where it was stopped."""

    def __init__(self, budget_s: float, elapsed_s: float, stage: str) -> None:
        super().__init__(f"stopped after {elapsed_s:.1f} s at stage {stage!r}: the request's "
                         f"deadline is {budget_s:g} s")
        self.budget_s = budget_s
        self.elapsed_s = elapsed_s
        self.stage = stage


class Deadline:
    def __init__(self, budget_s: float) -> None:
        if not budget_s > 0:
            raise ValueError(f"a deadline needs a positive budget, got {budget_s}")
        self.budget_s = float(budget_s)
        self.started = time.monotonic()
        self.stage = "start"  # set by the engine as it enters each stage, for the message

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def remaining_s(self) -> float:
        return self.budget_s - self.elapsed_s

    def check(self, stage: str | None = None) -> None:
        if stage is not None:
            self.stage = stage
        if self.remaining_s <= 0:
            raise DeadlineExceeded(self.budget_s, self.elapsed_s, self.stage)

    @contextmanager
    def enforced(self, modules: Iterable[nn.Module]) -> Iterator[Deadline]:
        """Check the deadline before every forward of `modules`; the hooks are always removed."""
        handles = [m.register_forward_pre_hook(self._hook) for m in modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, module: nn.Module, args: object) -> None:
        self.check()


@contextmanager
def enforced(deadline: Deadline | None, modules: Iterable[nn.Module]) -> Iterator[None]:
    """`deadline.enforced(modules)`, or nothing when there is no deadline."""
    if deadline is None:
        yield
        return
    with deadline.enforced(modules):
        yield
