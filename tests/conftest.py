"""Test-wide setup: the repository root is importable (model_segmamba, light_training, detection and
the numbered scripts live there), and tests are deterministic and single-threaded enough for 2-core CI."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed_everything():
    import numpy as np
    import torch
    torch.manual_seed(0)
    np.random.seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
