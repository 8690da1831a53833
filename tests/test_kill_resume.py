"""A save killed at any moment never leaves a checkpoint that `--resume auto` would take
and that is not whole: what a dead save leaves (`.tmp-*`, `.trash-*`) is never read and is
cleared by the next save; a checkpoint being deleted disappears from its name at once.
The slow test is bench/kill_test.py with 3 kills of a 2-process torchrun job."""

import shutil
import sys

import pytest
import torch

from mamba_train.checkpoint import has_checkpoints, resolve_resume, save_checkpoint, verify_checkpoint
from mamba_train.checkpoint import store


def _save(root, step, **kwargs):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(root, step, model, optimizer, {"step": step}, **kwargs)


def _leftovers(root):
    return sorted(entry.name for entry in root.iterdir() if entry.name.startswith("."))


def test_resume_auto_ignores_what_a_killed_save_left_and_the_next_save_clears_it(tmp_path):
    _save(tmp_path, 2)
    # a one-process save and a sharded save killed while writing step 4, one of them after
    # its manifest; a deletion killed after its rename; a `latest` never renamed into place
    for name in (".tmp-step_00000004-4242", ".tmp-step_00000004", ".trash-step_00000001-4242"):
        shutil.copytree(tmp_path / "step_00000002", tmp_path / name)
    (tmp_path / ".tmp-step_00000004" / "model.safetensors").write_bytes(b"half a file")
    (tmp_path / ".latest.tmp-4242").write_text("step_00000004")

    assert resolve_resume(tmp_path, "auto") == tmp_path / "step_00000002"
    assert sorted(path.name for path in tmp_path.glob("step_*")) == ["step_00000002"]
    _save(tmp_path, 4)
    assert _leftovers(tmp_path) == []
    assert resolve_resume(tmp_path, "auto") == tmp_path / "step_00000004"


def test_a_killed_save_before_any_checkpoint_is_a_fresh_start(tmp_path):
    (tmp_path / ".tmp-step_00000002").mkdir()
    (tmp_path / ".tmp-step_00000002" / "optim-rank00000.safetensors").write_bytes(b"partial")
    assert resolve_resume(tmp_path, "auto") is None and not has_checkpoints(tmp_path)


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (not even `except Exception`)."""


def _rmtree_killed_halfway(monkeypatch):
    """shutil.rmtree as store.py calls it, dying after it deleted one file of a directory."""
    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False, **kwargs):
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
        if not files:
            return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)
        files[0].unlink()
        raise Killed(path)

    monkeypatch.setattr(store.shutil, "rmtree", rmtree)


@pytest.mark.parametrize("why", ["retention", "the same step saved again"])
def test_a_delete_killed_halfway_leaves_every_checkpoint_whole(tmp_path, monkeypatch, why):
    _save(tmp_path, 2, keep_last=2)
    _save(tmp_path, 4, keep_last=2)
    with monkeypatch.context() as patch:
        _rmtree_killed_halfway(patch)
        with pytest.raises(Killed):
            # retention deletes step 2; a resumed run that saves step 4 again replaces it
            _save(tmp_path, 6 if why == "retention" else 4, keep_last=2)
    for path in tmp_path.glob("step_*"):
        verify_checkpoint(path)  # never half deleted under its own name
    assert resolve_resume(tmp_path, "auto") is not None
    _save(tmp_path, 8, keep_last=2)
    assert _leftovers(tmp_path) == []


@pytest.mark.distributed
@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_auto_ends_bit_identical(tmp_path, repo_root):
    pytest.importorskip("deepspeed", reason="deepspeed is in the [dev] extra")
    sys.path.insert(0, str(repo_root / "bench"))
    import kill_test

    result = kill_test.run_kill_test(tmp_path, kills=3, steps=30, plan=["step", "save", "save"], seed=1,
                                     log=lambda message: None)
    assert result["kills"] == 3
    assert result["bit_identical"], result["final_difference"]
    assert result["corrupt_loaded"] == 0 and result["corrupt_complete_checkpoints"] == []
    assert result["losses_identical"]
    assert result["steps_lost_max"] <= 2 * 3 + 1  # checkpoint.every 3: one save may be cut short
