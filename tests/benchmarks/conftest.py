"""The accuracy harness, loaded as a module (benchmarks/ is not a package)."""

import importlib.util
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="session")
def accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
