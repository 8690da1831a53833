"""Packed fixed-length training samples and the resumable loader over them.

No token is padding: the token stream (documents with their EOD, back to back) is cut
into samples of seq_len + 1 tokens that overlap by one (the last target of sample i is
the first input of sample i + 1). A document may span samples; `seq_idx` tells the SSD
where documents start inside a sample so its state resets there (the Mamba-2 paper's
variable-length training: no state flows from one document into the next).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mamba_train.data.cache import cached_array
from mamba_train.data.indexed import DataError, IndexedDataset


class PackedSamples:
    """Sample i = stream[i*seq_len : i*seq_len + seq_len + 1]; read from the memmap."""

    def __init__(self, dataset: IndexedDataset, seq_len: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, found {seq_len}")
        self.dataset = dataset
        self.seq_len = seq_len
        self._stream = dataset.token_stream()
        self._doc_starts = dataset.doc_offsets  # (n_docs,) sorted token offsets
        self.num_samples = max(0, (dataset.num_tokens - 1) // seq_len)
        if self.num_samples == 0:
            raise DataError(f"{dataset.bin_path}: {dataset.num_tokens} tokens, fewer than one sample of "
                            f"seq_len + 1 = {seq_len + 1}")

    def __len__(self) -> int:
        return self.num_samples

    def identity(self) -> dict:
        """What a cached index over these samples depends on (blend.cached_array keys on it)."""
        idx = self.dataset.idx_path.stat()
        return {"prefix": str(Path(self.dataset.prefix).resolve()), "tokens": self.dataset.num_tokens,
                "documents": len(self.dataset), "idx_bytes": idx.st_size, "idx_mtime_ns": idx.st_mtime_ns,
                "seq_len": self.seq_len}

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (seq_len+1,) int64, seq_idx (seq_len,) int32).

        seq_idx[t] is the document of input position t, counted from 0 at the sample's
        first token: it steps up exactly where a document starts, i.e. right after an EOD.
        """
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples of {self.seq_len})")
        start, length = i * self.seq_len, self.seq_len
        tokens = np.asarray(self._stream[start : start + length + 1], dtype=np.int64)
        # documents starting strictly inside the input window (a start at `start` is id 0)
        lo = np.searchsorted(self._doc_starts, start, side="right")
        hi = np.searchsorted(self._doc_starts, start + length, side="left")
        starts_inside = self._doc_starts[lo:hi] - start
        # bincount, not a scatter of ones: zero-length documents (possible in foreign
        # Megatron data) start at the same offset and must each count
        seq_idx = np.cumsum(np.bincount(starts_inside, minlength=length), dtype=np.int32)
        return tokens, seq_idx

    def check_vocab(self, vocab_size: int) -> None:
        self.dataset.check_vocab(vocab_size)


class TrainLoader:
    """Infinite iterator of batches {"input_ids", "labels": (b, L) int64, "seq_idx": (b, L) int32}.

    The global sample order is one permutation of all samples per epoch, drawn from
    default_rng([seed, epoch]); the position in it is `consumed_samples` alone, so a run
    resumed with the checkpoint's consumed_samples sees exactly the batches it would have
    seen. With data parallelism each of `world` ranks takes its `micro_batch` slice of
    every global batch of micro_batch * world samples, and consumed_samples counts global
    samples (megatron's convention), so it is the same number on every rank. Hence a run
    may resume under another data-parallel size: with the same global batch
    (micro_batch · world) it sees exactly the same global batches.

    `samples` is a PackedSamples or a blend.BlendedSamples. With `cache_dir`, each epoch's
    permutation is built once, saved there and memory-mapped (at Pile scale it is ~1 GB
    per epoch, which every rank would otherwise hold and recompute).
    """

    def __init__(self, samples, micro_batch: int, seed: int, consumed_samples: int = 0,
                 rank: int = 0, world: int = 1, cache_dir=None):
        if micro_batch <= 0:
            raise ValueError(f"micro_batch must be positive, found {micro_batch}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, found {consumed_samples}")
        self.samples = samples
        self.micro_batch = micro_batch
        self.seed = seed
        self.rank, self.world = rank, world
        self.consumed_samples = consumed_samples
        self.cache_dir = cache_dir
        self._epoch, self._order = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.consumed_samples + self.rank * self.micro_batch
        items = [self.samples[self._sample_at(position)] for position in range(first, first + self.micro_batch)]
        self.consumed_samples += self.global_batch
        tokens = np.stack([t for t, _ in items])  # (b, L+1)
        seq_idx = np.stack([s for _, s in items])  # (b, L)
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(tokens[:, 1:])),
            "seq_idx": torch.from_numpy(seq_idx),
        }

    def _sample_at(self, position: int) -> int:
        """Sample index at a global position of the endless, epoch-by-epoch order."""
        epoch, offset = divmod(position, self.samples.num_samples)
        if epoch != self._epoch:  # one epoch's permutation held: batches rarely straddle two
            n = self.samples.num_samples
            key = {"samples": self.samples.identity(), "seed": self.seed, "epoch": epoch}
            self._order = cached_array(self.cache_dir, "shuffle", key,
                                       lambda: np.random.default_rng([self.seed, epoch]).permutation(n))
            self._epoch = epoch
        return int(self._order[offset])
