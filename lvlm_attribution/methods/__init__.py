"""Attribution methods, one file each. Importing this package registers them all."""

from . import (  # noqa: F401  (each import registers its method)
    attngrad,
    dexar,
    glimpse,
    gradcam,
    igos,
    raw_attention,
    rollout,
    tam,
    tmme,
)
from .registry import MethodSpec, get_method, list_methods, register_method, settings_dict

__all__ = ["MethodSpec", "get_method", "list_methods", "register_method", "settings_dict"]
