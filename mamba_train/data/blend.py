"""Weighted mixtures of packed datasets, with their sample index built once and cached.

A blend of datasets d with weights w_d draws round(w_d · N) of its N samples from d,
spread evenly over the blend (dataset d's k-th sample sits at "time" (k + ½) / n_d; all
samples are ordered by time), so every window of the blend has about the right mix and
the loader's shuffle (loader.TrainLoader) only reorders it. Which samples of d are drawn
is a shuffle of d seeded by (seed, d), so a dataset drawn less than once is sampled all
over, not only at its start; a dataset asked for more samples than it has is repeated
(upsampled) in whole passes, each in its own order, before any sample repeats twice.

Index arrays are built by numpy in O(N log N), written once under `cache_dir` as .npy
files named by a hash of everything they depend on, and memory-mapped on every later
use: a restart, another rank, another run with the same data reuse them. megatron-core
builds the same kind of cached index (its BlendedDataset) but with a C++ helper.
"""

from __future__ import annotations

import os

import numpy as np

from mamba_train.data.cache import cached_array
from mamba_train.data.indexed import DataError, IndexedDataset
from mamba_train.data.loader import PackedSamples


def parse_blend(spec) -> list[tuple[str, float]]:
    """[(prefix, weight)] from {prefix: weight}, [[prefix, weight], ...], or megatron's flat
    [weight, prefix, weight, prefix, ...]; weights are normalized to sum to 1."""
    if isinstance(spec, dict):
        pairs = list(spec.items())
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(p, (list, tuple)) for p in spec):
        pairs = [tuple(p) for p in spec]
    elif isinstance(spec, (list, tuple)) and len(spec) % 2 == 0:
        pairs = [(spec[i + 1], spec[i]) for i in range(0, len(spec), 2)]
    else:
        raise DataError(f"blend: expected {{prefix: weight}}, [[prefix, weight], ...] or [weight, prefix, ...], "
                        f"found {spec!r}")
    if not pairs:
        raise DataError("blend: empty; give at least one dataset prefix with a weight")
    out = []
    for prefix, weight in pairs:
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise DataError(f"blend: weight of {prefix!r} must be a number, found {weight!r}") from None
        if not weight >= 0 or not np.isfinite(weight):
            raise DataError(f"blend: weight of {prefix!r} must be a finite number >= 0, found {weight}")
        out.append((str(prefix), weight))
    total = sum(w for _, w in out)
    if total <= 0:
        raise DataError(f"blend: weights sum to {total}; at least one must be positive")
    return [(prefix, weight / total) for prefix, weight in out]


def blend_counts(weights: list[float], num_samples: int) -> np.ndarray:
    """Samples per dataset: round(w_d · N) by largest remainder, so they sum to N exactly."""
    exact = np.asarray(weights, dtype=np.float64) * num_samples
    counts = np.floor(exact).astype(np.int64)
    short = num_samples - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def build_blend_index(weights: list[float], sizes: list[int], num_samples: int, seed: int | None = None
                      ) -> np.ndarray:
    """(N, 2) int64 rows (dataset, sample in that dataset) in blend order. With `seed`,
    dataset d's draws are shuffled passes over it; without, its samples in order 0, 1, ...
    (both repeat a sample only after a whole pass)."""
    counts = blend_counts(weights, num_samples)
    times = np.concatenate([(np.arange(n) + 0.5) / n for n in counts if n])
    datasets = np.concatenate([np.full(n, d, dtype=np.int64) for d, n in enumerate(counts) if n])
    order = np.argsort(times, kind="stable")  # ties: the earlier dataset first, deterministically
    index = np.empty((num_samples, 2), dtype=np.int64)
    index[:, 0] = datasets[order]
    within = np.concatenate([_draws(sizes[d], n, seed, d) for d, n in enumerate(counts) if n])
    index[:, 1] = within[order]
    return index


def _draws(size: int, count: int, seed: int | None, dataset: int) -> np.ndarray:
    """(count,) samples of a dataset of `size`: whole passes over it, each pass in its own
    order drawn from (seed, dataset); in a single call, as a small dataset upsampled into
    a Pile-scale blend makes millions of passes."""
    passes = np.tile(np.arange(size, dtype=np.int64), (-(-count // size), 1))  # (passes, size)
    if seed is not None:
        passes = np.random.default_rng([seed, dataset]).permuted(passes, axis=1)
    return passes.ravel()[:count]


class BlendedSamples:
    """Packed samples of several datasets mixed by weight; indexable like PackedSamples,
    so TrainLoader (shuffle, resume, data parallelism) works on it unchanged."""

    def __init__(self, parts: list[PackedSamples], weights: list[float], num_samples: int | None = None,
                 cache_dir: str | os.PathLike | None = None, seed: int | None = 0):
        if not parts or len(parts) != len(weights):
            raise DataError(f"blend: {len(parts)} datasets and {len(weights)} weights; give one weight per dataset")
        seq_lens = {p.seq_len for p in parts}
        if len(seq_lens) != 1:
            raise DataError(f"blend: datasets packed with different seq_len {sorted(seq_lens)}")
        self.parts, self.seq_len = parts, parts[0].seq_len
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.num_samples = num_samples or sum(p.num_samples for p in parts)  # default: one pass's worth
        if self.num_samples <= 0:
            raise DataError(f"blend: num_samples must be positive, found {self.num_samples}")
        self.seed = seed
        self._index = cached_array(cache_dir, "blend", self.identity(),
                                   lambda: build_blend_index(self.weights, [p.num_samples for p in parts],
                                                             self.num_samples, seed))

    @classmethod
    def from_prefixes(cls, blend, seq_len: int, num_samples: int | None = None,
                      cache_dir: str | os.PathLike | None = None, seed: int | None = 0) -> "BlendedSamples":
        pairs = parse_blend(blend)
        return cls([PackedSamples(IndexedDataset(prefix), seq_len) for prefix, _ in pairs],
                   [w for _, w in pairs], num_samples, cache_dir, seed)

    def identity(self) -> dict:
        return {"parts": [p.identity() for p in self.parts], "weights": self.weights,
                "num_samples": self.num_samples, "seed": self.seed}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} blended samples)")
        dataset, sample = self._index[i]
        return self.parts[int(dataset)][int(sample)]

    def source_of(self, i: int) -> int:
        """Which dataset of the blend sample i comes from."""
        return int(self._index[i, 0])

    def check_vocab(self, vocab_size: int) -> None:
        for part in self.parts:
            part.check_vocab(vocab_size)
