"""Method registry (timm-style): every registered method is contract-tested automatically.

A method is a function `attribute(ctx: AttributionContext, cfg: Config) -> MethodOutput` plus a
frozen dataclass holding its paper's defaults. The registry records what the method needs so
callers can plan (and so the service never branches on a method's name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..context import AttributionContext
from ..schema import MethodOutput


@dataclass(frozen=True)
class MethodSpec:
    name: str
    attribute: Callable[[AttributionContext, Any], MethodOutput]
    config: type
    needs_gradients: bool
    needs_perturbation: bool
    summary: str

    def make_config(self, overrides: dict[str, Any] | None = None) -> Any:
        """The paper defaults with `overrides` applied; unknown or ill-typed fields raise."""
        overrides = dict(overrides or {})
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for method {self.name!r}; "
                             f"known: {sorted(fields)}")
        cfg = self.config(**overrides)
        if hasattr(cfg, "validate"):
            cfg.validate()
        return cfg


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, config: type, needs_gradients: bool,
                    needs_perturbation: bool = False, summary: str = ""):
    def decorator(fn: Callable[[AttributionContext, Any], MethodOutput]):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
            raise TypeError(f"config of {name!r} must be a frozen dataclass")
        _METHODS[name] = MethodSpec(name, fn, config, needs_gradients, needs_perturbation,
                                    summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return decorator


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; available: {sorted(_METHODS)}")
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)


def settings_dict(cfg: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
