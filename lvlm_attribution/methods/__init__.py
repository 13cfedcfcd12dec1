"""Attribution methods, one file each. Importing this package registers them all."""

from . import attngrad  # noqa: F401
from . import dexar  # noqa: F401  (registers)
from . import glimpse  # noqa: F401
from . import gradcam  # noqa: F401
from . import igos  # noqa: F401
from . import raw_attention  # noqa: F401
from . import rollout  # noqa: F401
from . import tmme  # noqa: F401
from .registry import MethodSpec, get_method, list_methods, register_method, settings_dict

__all__ = ["MethodSpec", "get_method", "list_methods", "register_method", "settings_dict"]
