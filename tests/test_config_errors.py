"""User mistakes in run configs end in one ConfigError naming the file or field, never a
library traceback."""

import re

import pytest
import yaml

from mamba_train.config import ConfigError, load_config, parse_yaml


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = write(tmp_path, "train:\n  steps: 2\n  device: cpu: fast\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: invalid YAML at line 3, column 14: mapping values")):
        load_config(path)


def test_yaml_syntax_error_in_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'model\.dt_limit=\[0,', value '\[0,': invalid YAML at line 1, "
                                          r"column 4: expected the node content"):
        load_config(None, ["model.dt_limit=[0,"])


def test_duplicate_key_names_the_key_file_and_lines(tmp_path):
    path = write(tmp_path, "train:\n  steps: 2\n  steps: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: invalid YAML at line 3, column 3: "
                                                    "found duplicate key 'steps' (first at line 2)")):
        load_config(path)


def test_merge_key_overrides_are_not_duplicates():
    # `<<: *anchor` then a key of the anchor: YAML's override, not a duplicate
    assert parse_yaml("a: &a {x: 1, y: 2}\nb: {<<: *a, x: 3}\n", "test")["b"] == {"x": 3, "y": 2}
    # an anchored mapping with a merge of its own, merged again elsewhere (PyYAML flattens it in
    # place, and its own key `y` then sits beside the merged one): read as PyYAML reads it
    nested = "base: &b {y: 0}\nx: {a: &a {<<: *b, y: 1}}\nc: {<<: *a}\n"
    assert parse_yaml(nested, "test") == yaml.safe_load(nested)


@pytest.mark.parametrize("override, message", [
    ("optim.beta1=1.0", r"optim\.beta1: expected a number in \[0, 1\), found 1\.0"),
    ("optim.beta2=-0.1", r"optim\.beta2: expected a number in \[0, 1\), found -0\.1"),
    ("optim.lr=inf", r"optim\.lr: expected a finite positive number, found inf"),
    ("optim.lr=nan", r"optim\.lr: expected a finite positive number, found nan"),
    ("optim.weight_decay=.inf", r"optim\.weight_decay: expected a finite number >= 0, found inf"),
    ("model.pad_vocab_multiple=0", r"model\.pad_vocab_multiple: expected a positive integer, found 0"),
    ("model.norm_eps=0", r"model\.norm_eps: expected a finite positive number, found 0\.0"),
    ("model.A_init_range=[0, 16]", r"model\.A_init_range: expected \[low, high\] with 0 < low <= high"),
    ("train.torch_threads=-1", r"train\.torch_threads: expected a positive integer, or 0 for torch's default, "
                               r"found -1"),
    ("train.eval_batches=0", r"train\.eval_batches: expected a positive integer, found 0"),
    ("parallel.timeout_minutes=inf", r"parallel\.timeout_minutes: expected a finite positive number"),
])
def test_out_of_range_values_name_the_field_and_the_allowed_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_torch_threads_zero_means_torch_default():
    assert load_config(None, ["train.torch_threads=0"]).train.torch_threads == 0


def test_empty_section_takes_overrides(tmp_path):
    path = write(tmp_path, "model:\ntrain:\n  steps: 2\n")
    assert load_config(path, ["model.d_model=64"]).model.d_model == 64


def test_int_written_as_exponent_says_what_to_write():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, found str '1e4'; write 10000"):
        load_config(None, ["train.steps=1e4"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, found str '1\.5e0'$"):
        load_config(None, ["train.steps=1.5e0"])
