"""Evaluation of attribution maps: metrics (see `lvlm_attribution.evaluation.metrics`)."""

from lvlm_attribution.evaluation.metrics import *  # noqa: F403
from lvlm_attribution.evaluation.metrics import __all__  # noqa: F401
