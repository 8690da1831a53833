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


@pytest.mark.parametrize("option", [["--window", "-5"], ["--window", "0"], ["--rows", "0"], ["--max-tokens", "0"]])
def test_zero_or_negative_counts_are_refused(run, capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--ckpt", str(run / "ckpt"), *option])
    assert exit_.value.code == 2
    assert f"argument {option[0]}: expected a positive integer, found {option[1]}" in capsys.readouterr().err


def test_out_naming_a_directory_is_refused_before_any_work(run, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--ckpt", str(run / "ckpt"), "--out", str(run / "data")])
    err = capsys.readouterr().err
    assert f"argument --out: {run / 'data'} is a directory; give a file path" in err


def test_a_corrupt_newest_checkpoint_is_named_and_the_older_one_evaluated(run, capsys):
    newest = run / "ckpt" / "step_00000002"
    model = Mamba2LM(ModelConfig(d_model=32, n_layer=2, d_state=8, headdim=8, chunk_size=8, vocab_size=VOCAB))
    config = json.loads((run / "ckpt" / "step_00000001" / "trainer_state.json").read_text())["config"]
    save_checkpoint(run / "ckpt", 2, model, torch.optim.SGD(model.parameters(), lr=0.1),
                    {"step": 2, "consumed_samples": 0, "config": config})
    with open(newest / "model.safetensors", "r+b") as weights:   # flip one byte
        weights.seek(-1, 2)
        byte = weights.read(1)
        weights.seek(-1, 2)
        weights.write(bytes([byte[0] ^ 1]))
    assert main(["eval", "--ckpt", str(run / "ckpt"), "--out", str(run / "eval.json")]) == 0
    assert json.loads((run / "eval.json").read_text())["checkpoint"] == str(run / "ckpt" / "step_00000001")
    out = capsys.readouterr().out
    assert f"{run / 'ckpt'}: skipping step_00000002: " in out and "model.safetensors is corrupt" in out
    assert f"{run / 'ckpt'}: using step_00000001, the newest checkpoint that verifies" in out
