import numpy as np
import pytest
import torch

from mamba_train.data import DataError, IndexedDataset, IndexedDatasetWriter, PackedSamples, TrainLoader

EOD = 0


@pytest.fixture
def dataset(tmp_path) -> IndexedDataset:
    """Documents of lengths 1..12 tokens plus EOD; token values say nothing about position."""
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as writer:
        for length in [5, 1, 12, 3, 7, 2, 9, 4, 11, 6, 1, 8, 10, 3, 5]:
            writer.add_document(list(rng.integers(1, 50, length)) + [EOD], utf8_bytes=length, subset="x")
    return IndexedDataset(tmp_path / "ds")


def test_samples_cover_the_stream_without_padding(dataset):
    seq_len = 7
    samples = PackedSamples(dataset, seq_len)
    stream = dataset.token_stream()
    assert samples.num_samples == (dataset.num_tokens - 1) // seq_len
    for i in range(samples.num_samples):
        tokens, seq_idx = samples[i]
        assert tokens.dtype == np.int64 and tokens.shape == (seq_len + 1,)
        assert seq_idx.dtype == np.int32 and seq_idx.shape == (seq_len,)
        assert tokens.tolist() == stream[i * seq_len: i * seq_len + seq_len + 1].tolist()
        if i + 1 < samples.num_samples:
            assert tokens[-1] == samples[i + 1][0][0]  # last target = next sample's first input
    covered = np.concatenate([samples[i][0][:-1] for i in range(samples.num_samples)])
    assert covered.tolist() == stream[: samples.num_samples * seq_len].tolist()


@pytest.mark.parametrize("seq_len", [1, 4, 16, 50])
def test_seq_idx_steps_up_right_after_each_eod(dataset, seq_len):
    samples = PackedSamples(dataset, seq_len)
    for i in range(samples.num_samples):
        tokens, seq_idx = samples[i]
        inputs = tokens[:-1]
        expected = np.concatenate([[0], np.cumsum(inputs[:-1] == EOD)])  # new id after every EOD
        assert seq_idx.tolist() == expected.tolist()


def test_too_short_dataset_and_vocab_check_name_the_file(dataset):
    with pytest.raises(DataError, match="fewer than one sample"):
        PackedSamples(dataset, dataset.num_tokens)
    samples = PackedSamples(dataset, 8)
    samples.check_vocab(50)
    with pytest.raises(DataError, match=r"ds\.bin: token id 49 does not fit the model's vocabulary of 49"):
        samples.check_vocab(49)


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_shifted_tokens_with_seq_idx(dataset):
    samples = PackedSamples(dataset, 6)
    batch = next(TrainLoader(samples, micro_batch=3, seed=1))
    assert batch["input_ids"].shape == (3, 6) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].dtype == torch.long and batch["seq_idx"].dtype == torch.int32
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_each_epoch_is_a_permutation_of_all_samples(dataset):
    samples = PackedSamples(dataset, 5)
    n = samples.num_samples
    loader = TrainLoader(samples, micro_batch=1, seed=3)
    order = [next(loader)["input_ids"][0].tolist() for _ in range(2 * n)]
    every_sample = sorted(samples[i][0][:-1].tolist() for i in range(n))
    assert sorted(order[:n]) == every_sample and sorted(order[n:]) == every_sample
    assert order[:n] != order[n:]  # a new shuffle per epoch


@pytest.mark.parametrize("stop_after", [1, 4, 7])
def test_resume_from_consumed_samples_continues_exactly(dataset, stop_after):
    samples = PackedSamples(dataset, 8)  # 15 samples; 3 per batch crosses epochs at batch 5, 10
    straight = TrainLoader(samples, micro_batch=3, seed=7)
    expected = batches(straight, 12)
    assert straight.consumed_samples == 36
    first = TrainLoader(samples, micro_batch=3, seed=7)
    batches(first, stop_after)
    resumed = TrainLoader(samples, micro_batch=3, seed=7, consumed_samples=first.consumed_samples)
    for want, got in zip(expected[stop_after:], batches(resumed, 12 - stop_after)):
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_data_parallel_ranks_split_the_global_batch(dataset):
    samples = PackedSamples(dataset, 8)
    single = batches(TrainLoader(samples, micro_batch=4, seed=2, consumed_samples=8), 3)
    ranks = [TrainLoader(samples, micro_batch=2, seed=2, consumed_samples=8, rank=r, world=2) for r in range(2)]
    for step in range(3):
        parts = [next(loader) for loader in ranks]
        for key in single[step]:
            assert torch.equal(torch.cat([p[key] for p in parts]), single[step][key])
    assert all(loader.consumed_samples == 8 + 3 * 4 for loader in ranks)
