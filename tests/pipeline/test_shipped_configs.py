"""Every config the project ships loads and validates (a typo in one fails here, not hours
into a run)."""

from pathlib import Path

import pytest

from tsquant.pipeline.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_configs_are_found():
    assert len(CONFIGS) >= 7


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_config(str(path), {})
    assert cfg.name and cfg.model.name
