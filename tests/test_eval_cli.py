"""`mamba-train eval --ckpt DIR --data NAME`: a split name or a prefix, JSON output,
clear errors for unknown data and for data the model's vocabulary cannot hold."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from mamba_train.checkpoint import save_checkpoint
from mamba_train.cli import main
from mamba_train.config import ModelConfig, RunConfig
from mamba_train.data import IndexedDatasetWriter
from mamba_train.model import Mamba2LM

VOCAB = 97


@pytest.fixture
def run(tmp_path):
    """A checkpoint of a tiny model whose run config points at data/valid; data/ also
    holds a test split and a dataset tokenized with a larger vocabulary."""
    rng = np.random.default_rng(0)
    for name, n_docs, top in (("valid", 6, VOCAB), ("test", 9, VOCAB), ("wide", 2, 500)):
        with IndexedDatasetWriter(tmp_path / "data" / name, np.uint16) as writer:
            for i in range(n_docs):
                writer.add_document(np.append(rng.integers(2, top, 5 + i), 1), utf8_bytes=20 + i,
                                    subset=("Pile-CC", "Github")[i % 2])
    cfg = RunConfig()
    cfg.model = ModelConfig(d_model=32, n_layer=2, d_state=8, headdim=8, chunk_size=8, vocab_size=VOCAB)
    cfg.data.valid_prefix = str(tmp_path / "data" / "valid")
    cfg.data.seq_len = 16
    torch.manual_seed(0)
    model = Mamba2LM(cfg.model)
    save_checkpoint(tmp_path / "ckpt", 1, model, torch.optim.SGD(model.parameters(), lr=0.1),
                    {"step": 1, "consumed_samples": 0, "config": dataclasses.asdict(cfg)})
    return tmp_path


def test_eval_a_split_by_name_writes_json_and_prints_the_table(run, capsys):
    assert main(["eval", "--ckpt", str(run / "ckpt"), "--data", "test", "--out", str(run / "out/test.json")]) == 0
    results = json.loads((run / "out/test.json").read_text())
    assert results["data"] == str(run / "data" / "test") and results["overall"]["documents"] == 9
    assert set(results["subsets"]) == {"Pile-CC", "Github"} and results["window"] == 16
    table = capsys.readouterr().out
    assert "bpb" in table and "Github" in table and "overall" in table


def test_eval_a_prefix_with_rows_equals_one_row(run, capsys):
    prefix = str(run / "data" / "valid")
    assert main(["eval", "--ckpt", str(run / "ckpt"), "--data", prefix, "--out", str(run / "a.json")]) == 0
    assert main(["eval", "--ckpt", str(run / "ckpt"), "--data", prefix, "--rows", "3", "--window", "5",
                 "--out", str(run / "b.json")]) == 0
    a, b = (json.loads((run / f"{n}.json").read_text())["overall"] for n in "ab")
    assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("data, message", [
    ("nowhere", "--data nowhere: neither a dataset prefix"),
    ("train", "no .*data/train.idx beside the run's validation data"),
    ("{run}/data/wide", "wide.bin: token id 4\\d\\d does not fit the model's vocabulary of 97"),
])
def test_bad_data_is_one_error_line(run, capsys, data, message):
    assert main(["eval", "--ckpt", str(run / "ckpt"), "--data", data.format(run=run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
