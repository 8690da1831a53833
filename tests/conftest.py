import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run under its CPU interpreter here. Set before anything imports triton
    # (megatron-core and DeepSpeed do, at collection): triton reads it when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def markov_data(tmp_path_factory) -> Path:
    """train/valid indexed datasets from a small Markov chain (tests/synthetic.py)."""
    from synthetic import write_markov_dataset

    root = tmp_path_factory.mktemp("markov")
    write_markov_dataset(root / "train", n_docs=400, seed=1)
    write_markov_dataset(root / "valid", n_docs=40, seed=2)
    return root


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine: see bench/README.md)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
