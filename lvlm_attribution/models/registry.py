"""Adapter registry: model class name -> adapter class."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ModelAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for name in cls.model_classes:
        if name in _ADAPTERS:
            raise ValueError(f"an adapter for {name} is already registered")
        _ADAPTERS[name] = cls
    return cls


def adapter_for(model: nn.Module, processor: Any) -> ModelAdapter:
    name = type(model).__name__
    if name not in _ADAPTERS:
        raise ValueError(f"no adapter for {name}; supported: {sorted(_ADAPTERS)}")
    return _ADAPTERS[name](model, processor)


def supported_model_classes() -> list[str]:
    return sorted(_ADAPTERS)
