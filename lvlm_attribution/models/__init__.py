"""Model adapters, one per family. Importing this package registers them all."""

from . import llava, paligemma, qwen2_5_vl  # noqa: F401  (registers)
from .base import ModelAdapter, PreparedPrompt
from .registry import adapter_for, register_adapter, supported_model_classes

__all__ = ["ModelAdapter", "PreparedPrompt", "adapter_for", "register_adapter",
           "supported_model_classes"]
