"""The training samples of a run, from its `data` config: what the training loop calls."""

from __future__ import annotations

import os
from pathlib import Path

from mamba_train.config import DataConfig
from mamba_train.data.blend import BlendedSamples
from mamba_train.data.indexed import DataError, IndexedDataset
from mamba_train.data.loader import PackedSamples


def build_train_samples(data: DataConfig, num_samples: int) -> PackedSamples | BlendedSamples:
    """Packed samples of `data.train_prefix`, or of the `data.blend` mixture.

    `num_samples`: how many samples the whole run draws (train.steps × micro_batch ×
    grad_accum × data-parallel size). A blend's index holds exactly that many, drawn by
    weight, so the run sees the mixture once without wrapping around; it is built on first
    use, cached under `index_cache_dir(data)` and memory-mapped by every later rank and
    restart. A single dataset needs no index: its samples are all its packed samples, and
    `num_samples` is not used. Either way, TrainLoader(samples, ..., consumed_samples,
    rank, world) continues exactly from consumed_samples under any data-parallel size with
    the same global batch.
    """
    data.validate()
    if not data.blend:
        return PackedSamples(IndexedDataset(data.train_prefix), data.seq_len)
    if num_samples <= 0:
        raise DataError(f"build_train_samples: num_samples must be positive for a blend, found {num_samples}")
    weights = data.blend_weights()
    parts = [PackedSamples(IndexedDataset(prefix), data.seq_len) for _, prefix in weights]
    return BlendedSamples(parts, [weight for weight, _ in weights], num_samples, cache_dir=index_cache_dir(data),
                          seed=data.seed)


def index_cache_dir(data: DataConfig) -> Path:
    """`data.cache_dir`, else `index-cache/` beside the first training dataset; checked
    writable here, so a read-only data directory fails before any index is built."""
    first_prefix = data.blend_weights()[0][1]
    directory = Path(data.cache_dir) if data.cache_dir else Path(first_prefix).parent / "index-cache"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"data.cache_dir: cannot create {directory} ({error.strerror}); "
                        "set data.cache_dir to a writable directory") from None
    if not os.access(directory, os.W_OK):
        raise DataError(f"data.cache_dir: {directory} is not writable; set data.cache_dir to a writable directory")
    return directory
