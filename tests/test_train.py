"""The training loop end to end on synthetic data with known structure (a sparse
Markov chain): it learns, resumes bit-exactly, and refuses bad checkpoints clearly."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mamba_train.checkpoint import CheckpointError
from mamba_train.config import load_config
from mamba_train.data import IndexedDataset, IndexedDatasetWriter
from mamba_train.train.loop import TrainingError, train

VOCAB = 64


def write_markov_dataset(prefix, n_docs: int, seed: int) -> None:
    """Documents from a Markov chain where each token has 3 likely successors: the
    conditional entropy (~1.1 nats) is far below the unigram entropy (~4.1 nats)."""
    rng = np.random.default_rng(seed)
    successors = np.random.default_rng(0).integers(1, VOCAB, size=(VOCAB, 3))  # same chain for every split
    with IndexedDatasetWriter(prefix) as writer:
        for _ in range(n_docs):
            length = int(rng.integers(20, 120))
            tokens = [int(rng.integers(1, VOCAB))]
            for _ in range(length - 1):
                tokens.append(int(successors[tokens[-1], rng.integers(0, 3)]))
            tokens.append(0)  # EOD
            writer.add_document(tokens, utf8_bytes=2 * length, subset="even" if len(tokens) % 2 else "odd")


@pytest.fixture(scope="module")
def markov_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("markov")
    write_markov_dataset(root / "train", n_docs=400, seed=1)
    write_markov_dataset(root / "valid", n_docs=40, seed=2)
    return root


def tiny_config(data_root, run_dir, *extra):
    return load_config(None, [
        "model.d_model=32", "model.n_layer=2", "model.d_state=8", "model.headdim=8", "model.chunk_size=16",
        f"model.vocab_size={VOCAB}", f"data.train_prefix={data_root / 'train'}",
        f"data.valid_prefix={data_root / 'valid'}", "data.seq_len=64", "train.micro_batch=4", "train.steps=120",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=10", f"logging.run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'ckpt'}", "checkpoint.every=0", "logging.tensorboard=false",
        "logging.log_every=1000", *extra])


def unigram_cross_entropy(train_prefix, valid_prefix) -> float:
    """Loss of the best context-free model: train-set unigram frequencies (add-one)."""
    counts = np.bincount(IndexedDataset(train_prefix).token_stream(), minlength=VOCAB) + 1.0
    log_p = np.log(counts / counts.sum())
    valid = np.asarray(IndexedDataset(valid_prefix).token_stream())
    return float(-log_p[valid[1:]].mean())


def test_training_learns_well_below_the_unigram_entropy(markov_data, tmp_path):
    cfg = tiny_config(markov_data, tmp_path)
    result = train(cfg)
    baseline = unigram_cross_entropy(markov_data / "train", markov_data / "valid")
    valid_loss = result.eval["overall"]["loss"]
    assert valid_loss < 0.6 * baseline, (valid_loss, baseline)
    assert set(result.eval["subsets"]) == {"even", "odd"}
    assert math.isclose(result.eval["overall"]["ppl"], math.exp(valid_loss))
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "eval.json").is_file()


def test_resume_is_bit_exact(markov_data, tmp_path):
    steps = ["train.steps=16", "checkpoint.every=8"]
    straight = train(tiny_config(markov_data, tmp_path / "straight", *steps))
    first = train(tiny_config(markov_data, tmp_path / "resumed", *steps), stop_after_steps=8)
    assert first.step == 8 and first.eval is None
    second = train(tiny_config(markov_data, tmp_path / "resumed", *steps), resume="auto")
    assert {**first.losses, **second.losses} == straight.losses  # float equality at every step
    weights_straight = load_file(straight.checkpoint / "model.safetensors")
    weights_resumed = load_file(second.checkpoint / "model.safetensors")
    assert all(torch.equal(weights_straight[k], weights_resumed[k]) for k in weights_straight)


def test_resume_refuses_an_incomplete_checkpoint_and_auto_falls_back(markov_data, tmp_path, capsys):
    cfg = tiny_config(markov_data, tmp_path, "train.steps=4", "checkpoint.every=2")
    train(cfg)
    ckpt_root = tmp_path / "ckpt"
    newest = ckpt_root / "step_00000004"
    (newest / "manifest.json").unlink()  # as if the job died while saving
    with pytest.raises(CheckpointError, match=r"step_00000004 is incomplete: manifest.json is missing"):
        train(cfg, resume=str(newest))
    result = train(tiny_config(markov_data, tmp_path, "train.steps=6", "checkpoint.every=2"), resume="auto")
    assert "using" in capsys.readouterr().out and min(result.losses) == 3  # continued from step 2


def test_corrupt_checkpoint_file_is_named(markov_data, tmp_path):
    cfg = tiny_config(markov_data, tmp_path, "train.steps=2")
    train(cfg)
    weights = tmp_path / "ckpt" / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt"):
        train(cfg, resume=str(weights.parent))


def test_new_run_refuses_to_overwrite_existing_checkpoints(markov_data, tmp_path):
    cfg = tiny_config(markov_data, tmp_path, "train.steps=2")
    train(cfg)
    before = (tmp_path / "ckpt" / "step_00000002" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds checkpoints.*--resume auto"):
        train(cfg)
    assert (tmp_path / "ckpt" / "step_00000002" / "model.safetensors").read_bytes() == before


def test_resume_with_another_model_shape_is_refused(markov_data, tmp_path):
    train(tiny_config(markov_data, tmp_path, "train.steps=2"))
    with pytest.raises(TrainingError, match=r"model.n_layer: checkpoint 2 vs config 3"):
        train(tiny_config(markov_data, tmp_path, "train.steps=4", "model.n_layer=3"), resume="auto")
