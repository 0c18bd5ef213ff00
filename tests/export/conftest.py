"""Fixtures: an exported random TSQ ResNet (module scope: exported once)."""

import pytest
from export_helpers import SHAPES, random_tsq_model

from tsquant.export import export_model


@pytest.fixture(scope="module")
def exported_resnet(tmp_path_factory):
    model = random_tsq_model("resnet20")
    folder = tmp_path_factory.mktemp("export")
    export_model(model, folder, list(SHAPES["resnet20"]), {"model": "resnet20"})
    return model, folder
