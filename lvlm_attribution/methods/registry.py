"""Method registry (timm-style): every registered method is contract-tested automatically.

A method is a function `attribute(ctx: AttributionContext, cfg: Config) -> MethodOutput` plus a
frozen dataclass holding its paper's defaults. The registry records what the method needs so
callers can plan (and so the service never branches on a method's name).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..context import AttributionContext, ContextBatch
from ..schema import MethodOutput


@dataclass(frozen=True)
class MethodSpec:
    name: str
    attribute: Callable[[AttributionContext, Any], MethodOutput]
    config: type
    needs_gradients: bool
    needs_perturbation: bool
    summary: str
    # Optional: every request of a ContextBatch in shared passes (must equal `attribute` on each).
    attribute_batch: Callable[[ContextBatch, Any], list[MethodOutput]] | None = None
    # Reads the final hidden states (what the LM head reads, every position): the engine then
    # records them during generation, so the method needs no forward of its own.
    needs_final_hidden: bool = False

    @property
    def batchable(self) -> bool:
        return self.attribute_batch is not None

    def run_batch(self, batch: ContextBatch, cfg: Any) -> list[MethodOutput]:
        """The batched path where the method has one, else its single-request code per request."""
        if self.attribute_batch is not None:
            return self.attribute_batch(batch, cfg)
        return [self.attribute(ctx, cfg) for ctx in batch.contexts]

    def make_config(self, overrides: Mapping[str, Any] | None = None,
                    limits: Mapping[str, float] | None = None) -> Any:
        """The paper defaults with `overrides` applied. Unknown settings, values of the wrong
        type, non-finite numbers and values above the method's cost limits (`self.limits`,
        tightened or widened by `limits`) raise SettingError naming the setting."""
        overrides = dict(overrides or {})
        hints = typing.get_type_hints(self.config)
        known = sorted(f.name for f in dataclasses.fields(self.config))
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise SettingError(unknown[0], f"unknown setting for method {self.name!r}; "
                               f"known: {known}")
        bounds = {**self.limits, **(limits or {})}
        for key, value in overrides.items():
            overrides[key] = _checked(key, value, hints[key], bounds.get(key))
        cfg = self.config(**overrides)
        if hasattr(cfg, "validate"):
            try:
                cfg.validate()
            except ValueError as err:
                raise SettingError(_named_setting(str(err), overrides), str(err)) from None
        return cfg

    @property
    def limits(self) -> dict[str, float]:
        """Upper bounds the service accepts for settings that scale a request's cost."""
        return dict(getattr(self.config, "COST_LIMITS", {}))


class SettingError(ValueError):
    """A method setting the caller may not use; `setting` names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


def _checked(key: str, value: Any, hint: Any, upper: float | None) -> Any:
    """`value` if it has the annotated type (JSON-shaped: lists stand for tuples), is finite and
    at most `upper`; SettingError otherwise. Never coerces a bool to a number or vice versa."""
    if not _has_type(value, hint):
        raise SettingError(key, f"expected {_type_name(hint)}, got {_json_type(value)} "
                           f"{_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(key, f"must be a finite number, got {value}")
    if isinstance(value, list):
        value = tuple(value)
    if upper is not None and isinstance(value, int | float) and value > upper:
        raise SettingError(key, f"{value} exceeds the limit of {upper:g}")
    return value


def _has_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, list | tuple) and all(_has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             type(None): "null"}
    return names.get(hint, str(hint))


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _named_setting(message: str, overrides: Mapping[str, Any]) -> str:
    """The setting a config's own validate() complained about (its message starts with it)."""
    first = message.split(" ", 1)[0]
    return first if first in overrides or first.isidentifier() else "settings"


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, config: type, needs_gradients: bool,
                    needs_perturbation: bool = False, summary: str = "",
                    batch: Callable[[ContextBatch, Any], list[MethodOutput]] | None = None,
                    needs_final_hidden: bool = False):
    def decorator(fn: Callable[[AttributionContext, Any], MethodOutput]):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
            raise TypeError(f"config of {name!r} must be a frozen dataclass")
        stray = set(getattr(config, "COST_LIMITS", {})) - {f.name for f in
                                                           dataclasses.fields(config)}
        if stray:
            raise TypeError(f"COST_LIMITS of {name!r} names unknown settings {sorted(stray)}")
        _METHODS[name] = MethodSpec(name, fn, config, needs_gradients, needs_perturbation,
                                    summary or (fn.__doc__ or "").strip().split("\n")[0], batch,
                                    needs_final_hidden)
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
