"""Checkpoints on disk: one directory per step, complete or absent.

    <root>/step_00000100/  model.safetensors  optimizer.pt  trainer_state.json  manifest.json
    <root>/latest          the name of the newest complete checkpoint

(one process; a parallel run writes its shards instead: checkpoint/sharded.py, same
manifest, `latest` and retention).

A checkpoint is written into a hidden temporary directory, renamed into place, and only
then named in `latest` (itself replaced atomically), so a crash at any moment leaves the
previous checkpoint intact. `manifest.json` is written last and lists every file with its
size and SHA-256; a directory without a manifest that verifies is not a checkpoint.
Directories are deleted (retention, a step saved again) by renaming them out of sight
first, so a crash never leaves a half-deleted `step_*`; what a crash leaves (`.tmp-*`,
`.trash-*`) is never read and is removed by the next save that completes.
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
                    trainer_state: dict, keep_last: int = 3, keep_every: int = 0, writer=None) -> Path:
    """Write the checkpoint of `step` and return its path. With a `CheckpointWriter`
    (writer.py) in the background, only the copy of the state to CPU happens here (into the
    writer's staging buffers, once its previous write is over): the path is complete once
    `writer.wait()` returns."""
    root = Path(root)
    if writer is not None and writer.background:
        # a background write must not see the updates of the steps that train meanwhile
        snapshot = writer.snapshot({"weights": model.state_dict(), "optimizer": optimizer.state_dict()})
        weights, optimizer_state = snapshot["weights"], snapshot["optimizer"]
    else:  # written before training goes on: no copy beyond the one to CPU
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        optimizer_state = optimizer.state_dict()

    def write() -> None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, tmp / "model.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        write_json(tmp / "trainer_state.json", trainer_state)
        files = {p.name: describe_file(p) for p in sorted(tmp.iterdir())}
        publish_checkpoint(tmp, root, step, files, keep_last, keep_every)

    if writer is None:
        write()
    else:
        writer.submit(checkpoint_name(step), write)
    return root / checkpoint_name(step)


def publish_checkpoint(tmp: Path, root: Path, step: int, files: dict[str, dict], keep_last: int,
                       keep_every: int) -> Path:
    """The end of every save: the manifest of `files` (name → size and SHA-256) written
    last, `tmp` renamed into place, then `latest` pointed at it, then retention."""
    final = root / checkpoint_name(step)
    write_json(tmp / MANIFEST, {"step": step, "files": files})
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        _remove_dir(final)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name)
    _fsync_dir(root)
    _apply_retention(root, keep_last, keep_every)
    # No other save of this run is in flight now (one at a time, and every rank's files are
    # in `final`): what is left is from saves that died.
    _remove_leftovers(root)
    return final


def has_checkpoints(root: str | Path) -> bool:
    """Whether `root` holds any step directory, complete or not (cheap: nothing is read)."""
    return any(Path(root).glob(f"{PREFIX}*"))


def is_checkpoint_root(path: str | Path) -> bool:
    """Whether `path` is a run's checkpoint directory (`latest`, or step directories)."""
    return (Path(path) / LATEST).is_file() or has_checkpoints(path)


def verify_checkpoint(path: str | Path, share: tuple[int, int] = (0, 1)) -> dict:
    """Check the manifest against the files; return the manifest or raise CheckpointError.
    `share=(i, n)`: only every n-th file from the i-th (ranks verify a checkpoint together)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not manifest_path.is_file():
        if is_checkpoint_root(path):
            raise CheckpointError(f"{path} is a directory of checkpoints, not one checkpoint: name one of its "
                                  f"{PREFIX}* directories, or resolve it with resume 'auto'")
        if (path / "trainer_state.json").exists() or any(path.glob("*.safetensors")):
            raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing (the save did not finish)")
        roots = sorted(str(sub) for sub in path.iterdir() if sub.is_dir() and is_checkpoint_root(sub))
        hint = f"; {roots[0]} holds checkpoints" if roots else ""
        raise CheckpointError(f"{path} is not a checkpoint (no {MANIFEST}, no {PREFIX}* directories){hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from err
    first, every = share
    for name in sorted(expected)[first::every]:
        want = expected[name]
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {file} is missing")
        got = describe_file(file)
        if got != want:
            raise CheckpointError(f"{file} is corrupt: expected {want['bytes']} bytes with sha256 "
                                  f"{want['sha256'][:12]}…, found {got['bytes']} bytes with sha256 {got['sha256'][:12]}…")
    return manifest


def resolve_resume(root: str | Path, resume: str | None, log=print, verify=verify_checkpoint) -> Path | None:
    """`auto`: the checkpoint named in `latest`, else the newest that verifies (saying so);
    None where `root` holds no step directory (a fresh start); CheckpointError where it holds
    some and none verifies (a fresh start would overwrite them). A path: resolve_checkpoint.
    `verify(path)` raises CheckpointError (a parallel run passes one that splits the work
    over ranks)."""
    if resume is None:
        return None
    if resume != "auto":
        return resolve_checkpoint(resume, log, verify)
    root = Path(root)
    latest = root / LATEST
    named = root / latest.read_text().strip() if latest.is_file() else None
    candidates = sorted(root.glob(f"{PREFIX}*"), reverse=True) if root.is_dir() else []
    if named is not None:
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        try:
            verify(candidate)
        except CheckpointError as err:
            log(f"{root}: skipping {candidate.name}: {err}")
            continue
        if candidate != named:
            log(f"{root}: using {candidate.name}, the newest checkpoint that verifies")
        return candidate
    if has_checkpoints(root):
        raise CheckpointError(f"none of the checkpoints in {root} verifies (each one's reason is above); "
                              "nothing was loaded or overwritten: repair them, or move them away to start over")
    return None


def resolve_checkpoint(path: str | Path, log=print, verify=verify_checkpoint) -> Path:
    """The checkpoint to load from `path`: a checkpoint directory, which must verify, or a
    checkpoint root (a run's checkpoint.dir), resolved as resume "auto" is."""
    path = Path(path)
    if not (path / MANIFEST).is_file() and is_checkpoint_root(path):
        chosen = resolve_resume(path, "auto", log, verify)
        if chosen is None:
            raise CheckpointError(f"{path} holds no checkpoint ({LATEST} names one that is gone)")
        return chosen
    verify(path)
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, map_location="cpu", verify: bool = True) -> dict:
    """Verify (unless `resolve_resume` just did), then load weights (and optimizer state)
    in place; return the trainer state. A parallel run's sharded checkpoint is merged into
    the one-process model and AdamW (checkpoint/sharded.py)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    state = read_trainer_state(path)
    if is_sharded(state):
        from mamba_train.checkpoint.sharded import load_sharded_into_single

        load_sharded_into_single(path, model, optimizer, map_location)
        return state
    if model is not None:
        model.load_state_dict(load_file(path / "model.safetensors", device=str(map_location)))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True))
    return state


def is_sharded(trainer_state: dict) -> bool:
    """Whether the checkpoint was written by a parallel run (its trainer state has a layout)."""
    return "layout" in trainer_state


def read_trainer_state(path: str | Path) -> dict:
    """Step, consumed samples, RNG states and the resolved config of a checkpoint."""
    return json.loads((Path(path) / "trainer_state.json").read_text())


def _apply_retention(root: Path, keep_last: int, keep_every: int) -> None:
    steps = sorted(root.glob(f"{PREFIX}*"))
    for old in steps[:-keep_last]:
        step = int(old.name[len(PREFIX):])
        if keep_every and step % keep_every == 0:
            continue
        _remove_dir(old)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint directory without ever leaving a half-deleted one under its name:
    renamed out of sight (atomic) first, then deleted."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)


def _remove_leftovers(root: Path) -> None:
    """What saves that died left behind: their temporary directories, directories renamed
    for deletion, and temporary `latest` files. None of them is ever read."""
    for entry in root.iterdir():
        if entry.name.startswith((".tmp-", ".trash-", f".{LATEST}.tmp-")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def describe_file(file: Path) -> dict:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": file.stat().st_size, "sha256": digest.hexdigest()}


def write_json(path: Path, obj) -> None:
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
