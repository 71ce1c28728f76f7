"""Shared fixtures: paths of the real data fixtures and quiet, CPU-only TensorFlow."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()


def shared(name: str) -> Path:
    """Path of a real fixture in ../shared/data; skips the test (with the reason) where it is absent."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real fixture {p} not present")
    return p


@pytest.fixture
def shared_data():
    return shared
