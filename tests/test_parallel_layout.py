"""Layout checks fail before any work, and TP checkpoints convert to and from TP=1
(single process: no groups needed)."""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is in the [dev] extra")

from distributed import tiny_config
from mamba_train.model import Mamba2LM
from mamba_train.parallel import LayoutError, merge_state_dicts, shard_state_dict, validate_layout
from mamba_train.parallel.sequence_parallel import TokenSplit
from mamba_train.parallel.tensor_parallel import in_proj_rows


def test_valid_layout_derives_dp_from_the_world_size():
    layout = validate_layout(tiny_config(ngroups=2), seq_len=32, world_size=8, tp=2, cp=2, sequence_parallel=True)
    assert (layout.tp, layout.cp, layout.dp, layout.sequence_parallel) == (2, 2, 2, True)
    # CP's boundary states over symmetric memory on CUDA unless parallel.cp_symmetric_memory is off
    assert layout.cp_symmetric_memory
    assert not validate_layout(tiny_config(), seq_len=32, world_size=2, cp=2, cp_symmetric_memory=False).cp_symmetric_memory


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=8, world_size=8), "must divide model nheads=4"),
    (dict(tp=2, world_size=2, ngroups=1), "must divide model.ngroups=1"),
    (dict(cp=3, world_size=3), "must divide data.seq_len=32"),
    (dict(tp=2, cp=2, world_size=6), "world size 6 is not tp·cp·dp"),
    (dict(cp=16, world_size=16), "shorter than the conv halo"),
    (dict(tp=4, cp=2, world_size=8, ngroups=4, sequence_parallel=True, seq_len=36),
     "seq_len / cp must be a multiple of tp"),
])
def test_impossible_layout_fails_with_a_message_naming_the_cause(kwargs, message):
    cfg = tiny_config(ngroups=kwargs.pop("ngroups", 2))
    with pytest.raises(LayoutError, match=message):
        validate_layout(cfg, seq_len=kwargs.pop("seq_len", 32), **kwargs)


class _TwoRanks:
    """Stands in for a TP group of 2 seen from rank 0: TokenSplit's choice reads only its size."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


def test_sequence_parallel_splits_rows_when_tp_divides_the_batch_else_the_sequence():
    split = TokenSplit(_TwoRanks())
    split.begin(batch=4, local_len=31)
    assert split.dim == TokenSplit.BATCH_ROWS
    split.begin(batch=3, local_len=32)
    assert split.dim == TokenSplit.SEQUENCE
    with pytest.raises(ValueError, match=r"the batch, 3, must be a multiple of tp.*31 tokens a row must be"):
        split.begin(batch=3, local_len=31)


def test_in_proj_rows_give_each_rank_its_own_z_x_B_C_dt():
    cfg = tiny_config(ngroups=2)  # d_inner 32, ngroups·d_state 16, nheads 4
    rows = in_proj_rows(cfg, tp=2, rank=1)
    z, x, B, C, dt = rows.split([16, 16, 8, 8, 2])
    assert z.tolist() == list(range(16, 32))
    assert x.tolist() == list(range(32 + 16, 32 + 32))
    assert B.tolist() == list(range(64 + 8, 64 + 16))
    assert C.tolist() == list(range(80 + 8, 80 + 16))
    assert dt.tolist() == [96 + 2, 96 + 3]


@pytest.mark.parametrize("tp, ngroups", [(2, 2), (4, 4)])
def test_tp_checkpoint_converts_to_tp1_and_back(tp, ngroups):
    cfg = tiny_config(ngroups=ngroups)
    torch.manual_seed(0)
    full = Mamba2LM(cfg, tp_size=tp).state_dict()
    shards = [shard_state_dict(full, cfg, tp, rank) for rank in range(tp)]
    assert shards[0]["layers.0.mixer.in_proj.weight"].shape[0] == (2 * cfg.d_inner + 2 * ngroups * cfg.d_state
                                                                   + cfg.nheads) // tp
    merged = merge_state_dicts(shards, cfg)
    assert merged.keys() == full.keys()
    for key in full:
        assert torch.equal(merged[key], full[key]), key


def test_sharding_a_vocabulary_padded_for_another_tp_fails_clearly():
    cfg = tiny_config(ngroups=4)
    full = Mamba2LM(cfg, tp_size=1).state_dict()  # 128 rows
    with pytest.raises(ValueError, match="tp_size=3"):
        shard_state_dict(full, cfg, 3, 0)
