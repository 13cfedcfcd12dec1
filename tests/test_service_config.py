"""The shipped model configs parse into the handler's settings (a typo fails here, not at boot)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lvlm_attribution.service import ServiceConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["model-config.yaml", "model-config.gpu.yaml"])
def test_deploy_model_configs_parse(name: str) -> None:
    path = REPO / "deploy" / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    section = yaml.safe_load(path.read_text())["handler"]
    cfg = ServiceConfig.from_mapping(section)
    assert set(cfg.default_methods) <= set(cfg.allowed_methods or cfg.default_methods)
    assert cfg.max_new_tokens_cap >= 1 and cfg.max_image_bytes > 0
    assert yaml.safe_load(path.read_text()).get("batchSize", 1) == 1
