"""Timing and memory of one measurement: warm-up, k timed runs (CUDA-synchronized), median,
peak GPU memory (reset before every run), out-of-memory and errors recorded, never raised."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

GIB = 1024 ** 3
OOM_ERRORS: tuple[type[BaseException], ...] = tuple({
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    torch.cuda.OutOfMemoryError})


@dataclass
class Result:
    name: str
    status: str = "ok"  # ok | oom | error | skipped
    median_s: float | None = None  # per call (or extrapolated full cost, see `extrapolated`)
    times_s: list[float] = field(default_factory=list)  # the timed runs as measured
    repeats: int = 0
    warmup: int = 0
    peak_gib: float | None = None  # torch.cuda.max_memory_allocated over the runs (None on CPU)
    extra_gib: float | None = None  # peak minus what was allocated before (weights, inputs)
    ratio_to_forward: float | None = None
    extrapolated: bool = False  # True: median_s = measured part x `scale` (see note)
    scale: float = 1.0
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, OOM_ERRORS) or "out of memory" in str(err).lower()


class Meter:
    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def clean(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def allocated(self) -> float | None:
        return torch.cuda.memory_allocated() / GIB if self.cuda else None

    def run(self, name: str, fn: Callable[[], Any], repeats: int = 3, warmup: int = 1,
            scale: float = 1.0, note: str = "",
            info: Callable[[Any], dict] | None = None) -> Result:
        """Time `fn()`: `warmup` untimed calls, then `repeats` timed calls. `scale` != 1 marks
        an extrapolated measurement (median x scale is reported; times_s stay as measured)."""
        result = Result(name, repeats=repeats, warmup=warmup, scale=scale,
                        extrapolated=scale != 1.0, note=note)
        self.clean()
        base = self.allocated()
        peak = 0.0
        out = None
        try:
            for i in range(warmup + repeats):
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
                self.sync()
                start = time.perf_counter()
                out = fn()
                self.sync()
                elapsed = time.perf_counter() - start
                if self.cuda:
                    peak = max(peak, torch.cuda.max_memory_allocated() / GIB)
                if i >= warmup:
                    result.times_s.append(elapsed)
                if i < warmup + repeats - 1:
                    out = None
            result.median_s = statistics.median(result.times_s) * scale
            if info is not None and out is not None:
                result.info.update(info(out))
        except Exception as err:  # noqa: BLE001  (record and keep going)
            if self.cuda:
                peak = max(peak, torch.cuda.max_memory_allocated() / GIB)
            result.status = "oom" if is_oom(err) else "error"
            result.error = f"{type(err).__name__}: {str(err)[:400]}"
            if result.status == "error":
                result.info["traceback"] = traceback.format_exc(limit=6)[-2000:]
        finally:
            out = None
            self.clean()
        if self.cuda:
            result.peak_gib = round(peak, 3)
            result.extra_gib = round(peak - (base or 0.0), 3)
        return result
