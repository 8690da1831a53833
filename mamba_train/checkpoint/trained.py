"""A trained model from a checkpoint, for evaluation and export."""

from __future__ import annotations

from pathlib import Path

import torch

from mamba_train.checkpoint.store import is_sharded, load_checkpoint, read_trainer_state, resolve_checkpoint
from mamba_train.config import RunConfig, config_from_dict


def load_trained_model(ckpt: str | Path) -> tuple[torch.nn.Module, RunConfig, Path, torch.device]:
    """(model in fp32 on the GPU if there is one, its resolved config, the checkpoint
    directory, the device) from a checkpoint directory or a checkpoint root with `latest`.
    A parallel run's sharded checkpoint is merged into the one-process model."""
    from mamba_train.model import Mamba2LM

    ckpt = Path(ckpt)
    path = resolve_checkpoint(ckpt)
    state = read_trainer_state(path)
    cfg = config_from_dict(state["config"])
    # the vocabulary keeps the padding of the run that started it (a multiple of 128·tp)
    model = Mamba2LM(cfg.model, tp_size=state.get("vocab_tp", 1))
    if is_sharded(state):
        from mamba_train.checkpoint.sharded import read_weights

        model.load_state_dict(read_weights(path, cfg.model))
    else:
        load_checkpoint(path, model, verify=False)  # resolve_checkpoint verified it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), cfg, path, device
