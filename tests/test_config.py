import math

import pytest
import yaml

from mamba_train.config import ConfigError, RunConfig, config_from_dict, load_config

CONFIGS = ["tiny-cpu", "130m", "370m", "780m", "1.3b", "2.7b"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load_and_validate(repo_root, name):
    cfg = load_config(repo_root / "configs" / f"{name}.yaml")
    assert cfg.model.nheads * cfg.model.headdim == cfg.model.d_inner


def test_paper_sizes_match_the_mamba2_paper(repo_root):
    sizes = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}
    for name, (d_model, n_layer) in sizes.items():
        m = load_config(repo_root / "configs" / f"{name}.yaml").model
        assert (m.d_model, m.n_layer, m.d_state, m.headdim, m.expand, m.d_conv, m.ngroups, m.chunk_size) == \
            (d_model, n_layer, 128, 64, 2, 4, 1, 256)


def test_dotted_overrides_take_yaml_values(repo_root):
    cfg = load_config(repo_root / "configs/tiny-cpu.yaml", ["model.n_layer=2", "optim.lr=1e-3", "logging.tensorboard=false",
                                                            "model.dt_limit=[0.0, 0.5]"])
    assert cfg.model.n_layer == 2 and cfg.optim.lr == 1e-3 and cfg.logging.tensorboard is False
    assert cfg.model.dt_limit == (0.0, 0.5)


def test_unknown_key_names_the_field_and_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key model\.n_layers .*allows: .*n_layer"):
        load_config(None, ["model.n_layers=2"])


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"train\.micro_batch: expected int, found str 'eight'"):
        load_config(None, ["train.micro_batch=eight"])


def test_invalid_value_names_the_allowed_values():
    with pytest.raises(ConfigError, match=r"model\.ngroups: expected a divisor of nheads = 24"):
        load_config(None, ["model.ngroups=5"])
    with pytest.raises(ConfigError, match=r"train\.precision: expected 'auto', 'bf16' or 'fp32'"):
        load_config(None, ["train.precision=fp8"])
    # train.recompute was a flag: `true` is now 'block', and is refused with the field's type
    with pytest.raises(ConfigError, match=r"train\.recompute: expected 'none', 'mixer' or 'block', found 'all'"):
        load_config(None, ["train.recompute=all"])
    with pytest.raises(ConfigError, match=r"train\.recompute: expected str, found bool True"):
        load_config(None, ["train.recompute=true"])
    with pytest.raises(ConfigError, match=r"parallel\.tp_comm_overlap: expected false unless "
                                          r"parallel\.sequence_parallel is on"):
        load_config(None, ["parallel.tp=2", "parallel.tp_comm_overlap=true"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["model.n_layer"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_yaml_with_infinity():
    cfg = RunConfig()
    assert cfg.model.dt_limit[1] == math.inf
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
