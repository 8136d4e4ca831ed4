import os
import sys

import pytest
import torch

# Compile tests cross-compile for Hopper on any machine; the DSL needs the arch named up front.
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")


def pytest_collection_modifyitems(config, items):
    """GPU tests skip with a reason on machines without a CUDA GPU (CI is CPU-only)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/gpu_harness.sh on the lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    torch.manual_seed(0)


# tests/ holds small helper modules (e.g. _tiny_kernel) imported by tests and their subprocesses.
sys.path.insert(0, os.path.dirname(__file__))
