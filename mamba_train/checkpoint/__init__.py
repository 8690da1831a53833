from mamba_train.checkpoint.store import (CheckpointError, has_checkpoints, load_checkpoint, resolve_resume,
                                          save_checkpoint, verify_checkpoint)

__all__ = ["CheckpointError", "has_checkpoints", "load_checkpoint", "resolve_resume", "save_checkpoint",
           "verify_checkpoint"]
