"""The benchmark scripts, loaded as modules (benchmarks/ is not a package)."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("throughput")`` -> benchmarks/throughput.py as a module."""
    return _load


@pytest.fixture(scope="session")
def accuracy():
    return _load("accuracy")
