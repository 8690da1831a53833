"""Weighted blends, the cached memory-mapped sample index, and exact continuation from
consumed_samples under any data-parallel size."""

import numpy as np
import pytest
import torch

from mamba_train.data import (BlendedSamples, DataError, IndexedDataset, IndexedDatasetWriter, PackedSamples,
                              TrainLoader, parse_blend)
from mamba_train.data.blend import blend_counts, build_blend_index

SEQ = 8


def make(prefix, n_docs, marker):
    """Documents whose tokens all equal `marker` (plus EOD 0), so a sample says its dataset."""
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for i in range(n_docs):
            writer.add_document([marker] * (3 + i % 5) + [0], utf8_bytes=4, subset="x")
    return str(prefix)


@pytest.fixture
def prefixes(tmp_path):
    return [make(tmp_path / "a", 40, 1), make(tmp_path / "b", 10, 2), make(tmp_path / "c", 25, 3)]


def test_counts_follow_the_weights_exactly_and_mix_evenly():
    assert blend_counts([0.5, 0.3, 0.2], 10).tolist() == [5, 3, 2]
    assert blend_counts([1 / 3] * 3, 100).sum() == 100
    index = build_blend_index([0.5, 0.25, 0.25], [100, 100, 100], 400)
    for start in range(0, 400, 40):  # every window of 40 holds about 20/10/10
        window = np.bincount(index[start:start + 40, 0], minlength=3)
        assert np.all(np.abs(window - [20, 10, 10]) <= 1)


def test_upsampled_dataset_repeats_whole_passes():
    index = build_blend_index([0.5, 0.5], [3, 100], 20)
    small = index[index[:, 0] == 0, 1]
    assert small.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_blended_samples_come_from_their_dataset(prefixes):
    blend = BlendedSamples.from_prefixes({prefixes[0]: 2, prefixes[1]: 1, prefixes[2]: 1}, SEQ, num_samples=200)
    assert blend.weights == [0.5, 0.25, 0.25] and len(blend) == 200
    seen = np.zeros(3, dtype=int)
    for i in range(len(blend)):
        tokens, seq_idx = blend[i]
        source = blend.source_of(i)
        assert set(tokens.tolist()) <= {0, source + 1} and tokens.shape == (SEQ + 1,) and seq_idx.shape == (SEQ,)
        seen[source] += 1
    assert seen.tolist() == [100, 50, 50]


def test_index_is_built_once_cached_and_memory_mapped(prefixes, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = BlendedSamples.from_prefixes([[prefixes[0], 0.7], [prefixes[1], 0.3]], SEQ, 64, cache_dir=cache)
    assert len(list(cache.glob("blend-*.npy"))) == 1 and len(list(cache.glob("blend-*.json"))) == 1
    import mamba_train.data.blend as blend_module

    monkeypatch.setattr(blend_module, "build_blend_index", lambda *a: pytest.fail("rebuilt a cached index"))
    again = BlendedSamples.from_prefixes([[prefixes[0], 0.7], [prefixes[1], 0.3]], SEQ, 64, cache_dir=cache)
    assert isinstance(again._index, np.memmap)
    assert np.array_equal(np.asarray(again._index), np.asarray(first._index))
    monkeypatch.undo()
    BlendedSamples.from_prefixes([[prefixes[0], 0.6], [prefixes[1], 0.4]], SEQ, 64, cache_dir=cache)
    assert len(list(cache.glob("blend-*.npy"))) == 2  # other weights: another index


def test_shuffle_order_is_cached_per_epoch(prefixes, tmp_path):
    samples = PackedSamples(IndexedDataset(prefixes[0]), SEQ)
    loader = TrainLoader(samples, micro_batch=4, seed=1, cache_dir=tmp_path / "cache")
    plain = TrainLoader(samples, micro_batch=4, seed=1)
    n = samples.num_samples
    for _ in range(n // 4 + 2):  # into the second epoch
        want, got = next(plain), next(loader)
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert len(list((tmp_path / "cache").glob("shuffle-*.npy"))) == 2


@pytest.mark.parametrize("world_before, world_after", [(1, 4), (4, 2), (2, 1)])
def test_resume_under_another_data_parallel_size_sees_the_same_global_batches(prefixes, tmp_path, world_before,
                                                                               world_after):
    global_batch, steps_before, steps_after = 8, 5, 7
    blend = BlendedSamples.from_prefixes({prefixes[0]: 0.5, prefixes[1]: 0.2, prefixes[2]: 0.3}, SEQ, 50,
                                         cache_dir=tmp_path / "cache")

    def run(world, consumed, steps):
        loaders = [TrainLoader(blend, global_batch // world, seed=3, consumed_samples=consumed, rank=r, world=world,
                               cache_dir=tmp_path / "cache") for r in range(world)]
        batches = [torch.cat([next(loader)["input_ids"] for loader in loaders]) for _ in range(steps)]
        assert len({loader.consumed_samples for loader in loaders}) == 1
        return batches, loaders[0].consumed_samples

    straight, _ = run(1, 0, steps_before + steps_after)  # crosses the blend's epoch of 50 samples
    _, consumed = run(world_before, 0, steps_before)
    assert consumed == steps_before * global_batch
    resumed, _ = run(world_after, consumed, steps_after)
    for want, got in zip(straight[steps_before:], resumed):
        assert torch.equal(want, got)


@pytest.mark.parametrize("spec, message", [
    ({}, "empty"),
    ([], "empty"),
    ({"a": -1}, "must be a finite number >= 0"),
    ({"a": 0, "b": 0}, "weights sum to 0"),
    (["a"], "expected"),
    ({"a": "heavy"}, "must be a number"),
])
def test_bad_blends_are_errors(spec, message):
    with pytest.raises(DataError, match=message):
        parse_blend(spec)


def test_megatron_style_flat_blend_list():
    assert parse_blend([0.3, "a", 0.1, "b"]) == [("a", pytest.approx(0.75)), ("b", pytest.approx(0.25))]
