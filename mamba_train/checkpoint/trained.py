"""A trained model from a checkpoint, for evaluation and export."""

from __future__ import annotations

from pathlib import Path

import torch

from mamba_train.checkpoint.store import MANIFEST, CheckpointError, load_checkpoint, read_trainer_state, resolve_resume
from mamba_train.config import RunConfig, config_from_dict


def load_trained_model(ckpt: str | Path) -> tuple[torch.nn.Module, RunConfig, Path, torch.device]:
    """(model in fp32 on the GPU if there is one, its resolved config, the checkpoint
    directory, the device) from a checkpoint directory or a checkpoint root with `latest`."""
    from mamba_train.model import Mamba2LM

    ckpt = Path(ckpt)
    path = resolve_resume(ckpt.parent, str(ckpt)) if (ckpt / MANIFEST).exists() else resolve_resume(ckpt, "auto")
    if path is None:
        raise CheckpointError(f"{ckpt} holds no complete checkpoint")
    cfg = config_from_dict(read_trainer_state(path)["config"])
    model = Mamba2LM(cfg.model)
    load_checkpoint(path, model, verify=False)  # resolve_resume verified it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), cfg, path, device
