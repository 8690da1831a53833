"""Weighted blends, the cached memory-mapped sample index, exact continuation from
consumed_samples under any data-parallel size, and the blend of a run's config."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mamba_train.config import ConfigError, DataConfig, load_config
from mamba_train.data import (BlendedSamples, DataError, IndexedDataset, IndexedDatasetWriter, PackedSamples,
                              TrainLoader, build_train_samples, index_cache_dir, parse_blend)
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


# The run's training samples from its config: data.blend, data.cache_dir and
# mamba_train.data.build_train_samples, which the training loop calls.

def data_config(**fields):
    cfg = DataConfig(seq_len=SEQ, **fields)
    cfg.validate()
    return cfg


def test_blend_config_as_pairs_or_megatron_string_gives_the_same_weights(prefixes):
    pairs = data_config(blend=[[2, prefixes[0]], [1, prefixes[1]], [1.0, prefixes[2]]])
    string = data_config(blend=f"2 {prefixes[0]} 1 {prefixes[1]} 1 {prefixes[2]}")
    assert pairs.blend_weights() == string.blend_weights() == [(0.5, prefixes[0]), (0.25, prefixes[1]),
                                                               (0.25, prefixes[2])]
    assert data_config(train_prefix=prefixes[0]).blend_weights() == [(1.0, prefixes[0])]  # no blend


@pytest.mark.parametrize("value, message", [
    ("[[a, 0.5]]", r"data.blend\[0\]: expected a weight \(a number\) before the prefix, found 'a'"),
    ("0.5 a 0.5", "data.blend: expected .* found 3 words"),
    ("[[0.5, a, b]]", r"data.blend\[0\]: expected \[weight, prefix\]"),
    ("[[-1, a]]", r"data.blend\[0\]: expected a finite weight >= 0, found -1.0"),
    ("[[0, a], [0, b]]", "data.blend: expected at least one positive weight"),
    ("[[1, '']]", r"data.blend\[0\]: expected a dataset prefix"),
    ("{a: 1}", "data.blend: .* matches none of"),
])
def test_bad_blend_configs_are_errors_naming_the_field(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.blend={value}"])


def test_without_a_blend_the_run_trains_on_train_prefix_as_before(prefixes):
    samples = build_train_samples(data_config(train_prefix=prefixes[0]), num_samples=10**6)
    plain = PackedSamples(IndexedDataset(prefixes[0]), SEQ)
    assert isinstance(samples, PackedSamples) and samples.num_samples == plain.num_samples
    assert all(np.array_equal(samples[i][0], plain[i][0]) for i in range(plain.num_samples))


def test_built_blend_draws_each_dataset_by_its_weight(prefixes, tmp_path):
    cfg = data_config(blend=[[0.5, prefixes[0]], [0.3, prefixes[1]], [0.2, prefixes[2]]], cache_dir=str(tmp_path))
    samples = build_train_samples(cfg, num_samples=1000)
    sources = np.array([samples.source_of(i) for i in range(len(samples))])
    assert len(samples) == 1000 and np.bincount(sources).tolist() == [500, 300, 200]
    for start in range(0, 1000, 100):  # mixed evenly: every window holds about its share
        assert np.all(np.abs(np.bincount(sources[start:start + 100], minlength=3) - [50, 30, 20]) <= 1)
    for i in range(0, 1000, 7):  # dataset d's tokens are all d + 1 (or EOD 0)
        assert set(samples[i][0].tolist()) <= {0, sources[i] + 1}


def test_built_blend_index_is_cached_beside_the_data_and_reused(prefixes, monkeypatch):
    cfg = data_config(blend=[[0.7, prefixes[0]], [0.3, prefixes[1]]])  # no cache_dir: beside the first dataset
    first = build_train_samples(cfg, num_samples=64)
    cache = index_cache_dir(cfg)
    assert cache == Path(prefixes[0]).parent / "index-cache" and len(list(cache.glob("blend-*.npy"))) == 1
    import mamba_train.data.blend as blend_module

    monkeypatch.setattr(blend_module, "build_blend_index", lambda *a: pytest.fail("rebuilt a cached index"))
    again = build_train_samples(cfg, num_samples=64)
    assert isinstance(again._index, np.memmap) and np.array_equal(again._index, first._index)


def test_built_blend_is_deterministic_and_follows_the_seed(prefixes, tmp_path):
    blend = [[0.5, prefixes[0]], [0.5, prefixes[2]]]
    a = build_train_samples(data_config(blend=blend, cache_dir=str(tmp_path / "a")), num_samples=300)
    b = build_train_samples(data_config(blend=blend, cache_dir=str(tmp_path / "b")), num_samples=300)
    assert [f.read_bytes() for f in sorted((tmp_path / "a").glob("*.npy"))] == \
        [f.read_bytes() for f in sorted((tmp_path / "b").glob("*.npy"))]
    other = build_train_samples(data_config(blend=blend, seed=7, cache_dir=str(tmp_path / "c")), num_samples=300)
    assert np.array_equal(a._index[:, 0], other._index[:, 0])  # the same mix ...
    assert not np.array_equal(a._index[:, 1], other._index[:, 1])  # ... of other samples
    assert np.array_equal(a._index, b._index)


def test_a_dataset_drawn_less_than_once_is_sampled_all_over_and_repeats_in_whole_passes():
    index = build_blend_index([0.5, 0.5], [1000, 10], 200, seed=0)
    big, small = index[index[:, 0] == 0, 1], index[index[:, 0] == 1, 1]
    assert len(set(big.tolist())) == 100 and big.max() > 500  # not just the first 100 samples
    for start in range(0, 100, 10):  # 10 shuffled passes over the small dataset
        assert sorted(small[start:start + 10].tolist()) == list(range(10))
    assert small[:10].tolist() != small[10:20].tolist()


@pytest.mark.parametrize("world_before, world_after", [(1, 4), (4, 2)])
def test_training_on_a_built_blend_resumes_exactly_under_another_data_parallel_size(prefixes, tmp_path,
                                                                                      world_before, world_after):
    cfg = data_config(blend=f"0.5 {prefixes[0]} 0.2 {prefixes[1]} 0.3 {prefixes[2]}", cache_dir=str(tmp_path))
    global_batch, steps = 8, 12

    def run(world, consumed, n):  # every rank builds (or finds) the blend, as the training loop does
        loaders = [TrainLoader(build_train_samples(cfg, num_samples=steps * global_batch), global_batch // world,
                               seed=cfg.seed, consumed_samples=consumed, rank=r, world=world,
                               cache_dir=index_cache_dir(cfg)) for r in range(world)]
        return [torch.cat([next(loader)["input_ids"] for loader in loaders]) for _ in range(n)]

    straight = run(1, 0, steps + 2)  # two steps past the blend's samples: a new epoch
    run(world_before, 0, 5)
    for want, got in zip(straight[5:], run(world_after, 5 * global_batch, steps + 2 - 5)):
        assert torch.equal(want, got)


def test_an_unwritable_cache_dir_is_an_error_naming_the_field(prefixes, tmp_path):
    (tmp_path / "a-file").write_text("")
    cfg = data_config(blend=[[1, prefixes[0]]], cache_dir=str(tmp_path / "a-file" / "cache"))
    with pytest.raises(DataError, match="data.cache_dir: cannot create"):
        build_train_samples(cfg, num_samples=10)
