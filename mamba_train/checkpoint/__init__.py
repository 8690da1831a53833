from mamba_train.checkpoint.store import (CheckpointError, has_checkpoints, is_sharded, load_checkpoint,
                                          read_trainer_state, resolve_resume, save_checkpoint, verify_checkpoint)
from mamba_train.checkpoint.trained import load_trained_model
from mamba_train.checkpoint.writer import CheckpointWriter

__all__ = ["CheckpointError", "CheckpointWriter", "has_checkpoints", "is_sharded", "load_checkpoint",
           "load_trained_model", "read_trainer_state", "resolve_resume", "save_checkpoint", "verify_checkpoint"]
