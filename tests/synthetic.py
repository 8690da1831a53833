"""Synthetic training data with known structure, and the tiny run config the training,
CLI and launch tests share."""

import numpy as np

from mamba_train.config import load_config
from mamba_train.data import IndexedDatasetWriter

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


def tiny_config(data_root, run_dir, *extra):
    return load_config(None, tiny_overrides(data_root, run_dir, *extra))


def tiny_overrides(data_root, run_dir, *extra) -> list[str]:
    return [
        "model.d_model=32", "model.n_layer=2", "model.d_state=8", "model.headdim=8", "model.chunk_size=16",
        f"model.vocab_size={VOCAB}", f"data.train_prefix={data_root / 'train'}",
        f"data.valid_prefix={data_root / 'valid'}", "data.seq_len=64", "train.micro_batch=4", "train.steps=120",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=10", f"logging.run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'ckpt'}", "checkpoint.every=0", "logging.tensorboard=false",
        "logging.log_every=1000", *extra]


