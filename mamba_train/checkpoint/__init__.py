from mamba_train.checkpoint.store import (CheckpointError, load_checkpoint, resolve_resume, save_checkpoint,
                                          verify_checkpoint)

__all__ = ["CheckpointError", "load_checkpoint", "resolve_resume", "save_checkpoint", "verify_checkpoint"]
