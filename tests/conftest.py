"""Shared test set-up: one torch thread per pytest worker, and where the real fixtures live."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two xdist workers on two cores: one thread each, or they fight over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# The dequantised SmolLM2 is cached inside the checkout (git-ignored), not in the user's home.
os.environ.setdefault("BEAMLORA_CACHE", str(REPO / ".cache" / "beamlora"))
REAL_FIXTURES = REPO.parent / "shared" / "fixtures" / "real"


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    # The real checkpoints live beside the repository (../shared), in CI as here; they are read in place.
    assert REAL_FIXTURES.is_dir(), f"real fixtures not found at {REAL_FIXTURES}"
    return REAL_FIXTURES
