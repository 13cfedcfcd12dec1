"""Attribution methods, one file each. Importing this package registers them all."""

from . import dexar  # noqa: F401  (registers)
from .registry import MethodSpec, get_method, list_methods, register_method, settings_dict

__all__ = ["MethodSpec", "get_method", "list_methods", "register_method", "settings_dict"]
