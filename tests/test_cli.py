"""The user's path through `mamba-train`: prep → train → eval → export on a tiny real
corpus (Pile-format jsonl.zst), and expected failures as one `error:` line, exit 2."""

import json

import pytest
import yaml
import zstandard

from mamba_train.cli import main

TEXT = ("The state space model reads the sequence one chunk at a time. Each chunk keeps a small "
        "state and passes it on. ")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    records = [json.dumps({"text": TEXT * (1 + i % 4) + f"Document {i}.", "meta": {"pile_set_name": s}})
               for i in range(120) for s in (("prose", "notes")[i % 2],)]
    (root / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(records).encode()))
    recipe = {"output": str(root / "data"), "sources": {"files": [str(root / "00.jsonl.zst")]},
              "tokenizer": {"vocab_size": 300, "sample_docs": 120}, "valid_fraction": 0.1, "seed": 0}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["prep", str(root / "recipe.yaml"), "--workers", "1"]) == 0
    return root


def run_overrides(root):
    return [f"data.train_prefix={root / 'data/train'}", f"data.valid_prefix={root / 'data/valid'}",
            f"data.tokenizer={root / 'data/tokenizer.model'}", "data.seq_len=32", "model.d_model=32",
            "model.n_layer=2", "model.d_state=8", "model.headdim=8", "model.chunk_size=16", "train.micro_batch=2",
            "train.steps=3", "optim.warmup_steps=1", f"logging.run_dir={root / 'run'}",
            f"checkpoint.dir={root / 'run/ckpt'}", "logging.tensorboard=true"]


def test_prep_train_eval_export(prepared, repo_root, capsys):
    root = prepared
    assert main(["train", str(repo_root / "configs/tiny-cpu.yaml"), *run_overrides(root)]) == 0
    assert (root / "run/ckpt/latest").read_text().strip() == "step_00000003"
    assert list((root / "run/tensorboard").iterdir()), "TensorBoard event files"
    saved = yaml.safe_load((root / "run/config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 300  # resolved from the tokenizer

    assert main(["eval", "--ckpt", str(root / "run/ckpt"), "--out", str(root / "eval.json")]) == 0
    results = json.loads((root / "eval.json").read_text())
    assert set(results["subsets"]) == {"prose", "notes"} and results["overall"]["bpb"] > 0
    assert "overall" in capsys.readouterr().out

    assert main(["export", "--ckpt", str(root / "run/ckpt"), "--out", str(root / "hf")]) == 0
    config = json.loads((root / "hf/config.json").read_text())
    assert config["model_type"] == "mamba2" and config["vocab_size"] == 384 and config["eos_token_id"] == \
        results_eod(root)


def results_eod(root):
    return json.loads((root / "data/prep.json").read_text())["tokenizer"]["eod_id"]


def test_rerunning_a_finished_run_with_resume_auto_does_no_training(prepared, repo_root, capsys):
    root = prepared
    args = ["train", str(repo_root / "configs/tiny-cpu.yaml"), *run_overrides(root), "--resume", "auto"]
    if not (root / "run/ckpt/latest").exists():
        assert main(args) == 0
    lines_before = (root / "run/metrics.jsonl").read_text().count("\n")
    assert main(args) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (root / "run/metrics.jsonl").read_text().count("\n") == lines_before


@pytest.mark.parametrize("override, message", [
    ("model.n_layers=2", "unknown key model.n_layers"),
    ("optim.lr=fast", "optim.lr: expected float"),
    ("train.device=tpu", "train.device: expected 'auto', 'cpu' or 'cuda'"),
])
def test_bad_config_is_one_error_line_and_exit_2(repo_root, capsys, override, message):
    assert main(["train", str(repo_root / "configs/tiny-cpu.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_overrides_after_resume_are_overrides(repo_root, capsys):
    # the bad override after --resume reaches the config (its error), not argparse's
    assert main(["train", str(repo_root / "configs/tiny-cpu.yaml"), "--resume", "auto", "model.n_layers=2"]) == 2
    assert "unknown key model.n_layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # anything else unknown is still argparse's error
        main(["train", str(repo_root / "configs/tiny-cpu.yaml"), "--resume", "auto", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path)]) == 2
    assert "is not a checkpoint (no manifest.json, no step_* directories)" in capsys.readouterr().err


def test_prep_of_empty_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    recipe = {"output": str(tmp_path / "out"), "sources": {"files": [str(tmp_path / "empty.jsonl")]},
              "tokenizer": {"vocab_size": 300}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["prep", str(tmp_path / "recipe.yaml")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_train_without_arguments_names_only_the_config_as_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    assert exit_.value.code == 2
    assert "the following arguments are required: config\n" in capsys.readouterr().err


def test_export_to_an_existing_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    for out in (tmp_path / "taken", tmp_path / "taken" / "hf"):
        with pytest.raises(SystemExit):   # argparse: before the (missing) checkpoint is read
            main(["export", "--ckpt", str(tmp_path / "no-ckpt"), "--out", str(out)])
        assert f"argument --out: {out}" in capsys.readouterr().err


def test_prep_refuses_zero_workers(tmp_path, capsys):
    assert main(["prep", str(tmp_path / "recipe.yaml"), "--workers", "0"]) == 2
    assert "--workers: expected a positive number of processes, found 0" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--sizes", "0"], "--sizes: a parabola per budget needs at least 3 model sizes, found 0"),
    (["--tp", "0"], "--tp: expected an integer >= 1, found 0"),
    (["--min-steps", "-1"], "--min-steps: expected an integer >= 1, found -1"),
    (["--valid-tokens", "-1"], "--valid-tokens: expected a number of tokens >= 0 (0: all), found -1"),
])
def test_scale_plan_refuses_zero_and_negative_counts(repo_root, tmp_path, capsys, option, message):
    base = str(repo_root / "configs/scaling/tiny.yaml")
    assert main(["scale", "plan", "--tiny", "--vocab-size", "300", "--base", base, "--out", str(tmp_path / "sweep"),
                 *option]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "sweep").exists()


def test_ctrl_c_exits_130_without_a_traceback(repo_root, monkeypatch, capsys):
    from mamba_train.train import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    assert main(["train", str(repo_root / "configs/tiny-cpu.yaml")]) == 130
    assert "interrupted: mamba-train train stopped by Ctrl-C" in capsys.readouterr().err
