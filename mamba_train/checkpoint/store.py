"""Checkpoints on disk: one directory per step, complete or absent.

    <root>/step_00000100/  model.safetensors  optimizer.pt  trainer_state.json  manifest.json
    <root>/latest          the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory, renamed into place, and only
then named in `latest` (itself replaced atomically), so a crash at any moment leaves the
previous checkpoint intact. `manifest.json` is written last and lists every file with its
size and SHA-256; a directory without a manifest that verifies is not a checkpoint.
Loading never runs code from a file: safetensors for weights, `torch.load(weights_only=True)`
for optimizer state, JSON for the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
LATEST = "latest"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep_last: int = 3, keep_every: int = 0) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _write_json(tmp / "trainer_state.json", trainer_state)
    files = sorted(p.name for p in tmp.iterdir())
    _write_json(tmp / MANIFEST, {"step": step, "files": {name: _describe(tmp / name) for name in files}})
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name)
    _fsync_dir(root)
    _apply_retention(root, keep_last, keep_every)
    return final


def has_checkpoints(root: str | Path) -> bool:
    """Whether `root` holds any step directory, complete or not (cheap: nothing is read)."""
    return any(Path(root).glob(f"{PREFIX}*"))


def verify_checkpoint(path: str | Path) -> dict:
    """Check the manifest against the files; return the manifest or raise CheckpointError."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from err
    for name, want in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {file} is missing")
        got = _describe(file)
        if got != want:
            raise CheckpointError(f"{file} is corrupt: expected {want['bytes']} bytes with sha256 "
                                  f"{want['sha256'][:12]}…, found {got['bytes']} bytes with sha256 {got['sha256'][:12]}…")
    return manifest


def resolve_resume(root: str | Path, resume: str | None, log=print) -> Path | None:
    """`auto`: the checkpoint named in `latest`, else the newest that verifies (saying so),
    else None (a fresh start). A path: that checkpoint, which must verify."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        verify_checkpoint(path)
        return path
    root = Path(root)
    latest = root / LATEST
    named = root / latest.read_text().strip() if latest.is_file() else None
    candidates = sorted(root.glob(f"{PREFIX}*"), reverse=True) if root.is_dir() else []
    if named is not None:
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CheckpointError as err:
            log(f"resume auto: skipping {candidate}: {err}")
            continue
        if candidate != named:
            log(f"resume auto: using {candidate}, the newest checkpoint that verifies")
        return candidate
    return None


def load_checkpoint(path: str | Path, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, map_location="cpu", verify: bool = True) -> dict:
    """Verify (unless `resolve_resume` just did), then load weights (and optimizer state)
    in place; return the trainer state."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    if model is not None:
        model.load_state_dict(load_file(path / "model.safetensors", device=str(map_location)))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True))
    return read_trainer_state(path)


def read_trainer_state(path: str | Path) -> dict:
    """Step, consumed samples, RNG states and the resolved config of a checkpoint."""
    return json.loads((Path(path) / "trainer_state.json").read_text())


def _apply_retention(root: Path, keep_last: int, keep_every: int) -> None:
    steps = sorted(root.glob(f"{PREFIX}*"))
    for old in steps[:-keep_last]:
        step = int(old.name[len(PREFIX):])
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(old)


def _describe(file: Path) -> dict:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": file.stat().st_size, "sha256": digest.hexdigest()}


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
