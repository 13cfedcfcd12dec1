"""Shared fixtures. Exactness tests run in fp32 with TF32 off (DESIGN §4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from lvlm_attribution.engine import Explainer
from lvlm_attribution.world.embedded_model import build_model
from lvlm_attribution.world.scenes import generate

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = Path(os.environ.get("LVLM_TEST_MODEL_DIR",
                                   ROOT / "model_store" / "tiny-shapes-llava"))

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    return EMBEDDED_DIR


@pytest.fixture(scope="session")
def embedded_explainer() -> Explainer:
    """The shipped, trained embedded model (fp32, CPU)."""
    return Explainer.from_pretrained(EMBEDDED_DIR, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def random_llava_explainer() -> Explainer:
    """The embedded architecture with random weights: structure tests that need no training."""
    model, processor = build_model(seed=1234)
    return Explainer(model, processor, "random-llava", "random")


@pytest.fixture
def scene():
    """A deterministic planted scene as (PIL image, sample)."""
    sample = generate(7, "color")
    return Image.fromarray(sample.image), sample
