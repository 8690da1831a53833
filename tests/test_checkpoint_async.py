"""`checkpoint.async_save`: training goes on while a CPU copy of the state is written by a
background thread. Its checkpoints hold exactly what a blocking save writes at the same
step, resume bit-exactly, and a failed background write is raised, never lost.

The background writes are slowed down (`slow_writes`) so that several training steps run
while a checkpoint is being written: a copy taken too late, or not at all, would show. The
copy goes into staging buffers reused from one save to the next (pinned for GPU tensors);
on CPU it is a plain clone unless the writer is told to stage CPU tensors too
(`reuse_staging_buffers`), which is how these tests exercise the reuse without a GPU.
"""

import copy
import json
import threading
import time
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from mamba_train.checkpoint import CheckpointError, CheckpointWriter, save_checkpoint
from mamba_train.checkpoint.writer import StagingBuffers
from mamba_train.train.loop import train
from synthetic import tiny_config

STEPS = ("train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=5")
ASYNC = "checkpoint.async_save=true"


def slow_writes(monkeypatch, module, seconds=0.3, fail_on_call=None, threads=None):
    """Make `module.save_file` (safetensors) slow; or fail with OSError on its n-th call.
    `threads`, a list, gets the thread that made each call."""
    real_save_file, calls = module.save_file, {"n": 0}

    def save_file(*args, **kwargs):
        calls["n"] += 1
        if threads is not None:
            threads.append(threading.current_thread())
        if calls["n"] == fail_on_call:
            raise OSError("No space left on device (simulated)")
        time.sleep(seconds)
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(module, "save_file", save_file)


def reuse_staging_buffers(monkeypatch):
    """train()'s writer copies CPU tensors into reused staging buffers, as it does GPU ones."""
    from mamba_train.train import loop

    monkeypatch.setattr(loop, "CheckpointWriter", partial(CheckpointWriter, stage_cpu=True))


def checkpoint_contents(path):
    """Every tensor of a checkpoint (by file and name) and its trainer state without the config
    (whose directories and async_save differ between the runs compared)."""
    tensors = {}
    for file in sorted(path.iterdir()):
        if file.suffix == ".safetensors":
            tensors.update({(file.name, name): tensor for name, tensor in load_file(file).items()})
        elif file.suffix == ".pt":
            optimizer = torch.load(file, weights_only=True)
            for index, state in optimizer["state"].items():
                tensors.update({(file.name, index, key): torch.as_tensor(value) for key, value in state.items()})
            tensors[(file.name, "param_groups")] = torch.tensor(
                [float(value) for group in optimizer["param_groups"] for value in group.values()
                 if isinstance(value, (int, float))])
    state = json.loads((path / "trainer_state.json").read_text())
    state.pop("config")
    return tensors, state, sorted(file.name for file in path.iterdir())


def assert_same_checkpoint(actual, expected):
    tensors, state, files = checkpoint_contents(actual)
    expected_tensors, expected_state, expected_files = checkpoint_contents(expected)
    assert files == expected_files
    assert state == expected_state
    assert tensors.keys() == expected_tensors.keys()
    different = [key for key in tensors if not torch.equal(tensors[key], expected_tensors[key])]
    assert not different, f"{actual.name}: tensors differ from the blocking save's: {different[:5]}"


def leftovers(root):
    return [entry.name for entry in root.iterdir() if entry.name.startswith(".")]


# ----------------------------------------------------------------------------- the writer


def test_writer_reraises_a_failed_background_write_once():
    writer = CheckpointWriter(background=True, log=lambda message: None)

    def fail():
        raise OSError("No space left on device (simulated)")

    writer.submit("step_00000003", fail)
    with pytest.raises(CheckpointError, match=r"writing checkpoint step_00000003 in the background failed: "
                                              r"OSError: No space left"):
        writer.wait()
    writer.wait()  # raised once, then the writer is usable again


def test_writer_runs_one_save_at_a_time_in_order():
    writer, order = CheckpointWriter(background=True, log=lambda message: None), []
    writer.submit("step_00000001", lambda: (time.sleep(0.2), order.append(1)))
    writer.submit("step_00000002", lambda: order.append(2))  # waits for the first
    writer.wait()
    assert order == [1, 2] and all(record["write_s"] is not None for record in writer.records)


# ----------------------------------------------------------------------------- the snapshot


@pytest.mark.parametrize("stage_cpu", [False, True], ids=["cloned", "staged"])
def test_a_snapshot_is_a_contiguous_copy_of_the_state(stage_cpu):
    weight = torch.arange(12.0).view(3, 4)
    state = {"weights": {"w": weight.t()}, "optimizer": {"step": torch.tensor(3.0), "betas": (0.9, 0.95),
                                                         "params": [0, 1], "foreach": None}}
    snapshot = CheckpointWriter(background=True, stage_cpu=stage_cpu).snapshot(state)
    expected = weight.t().clone()
    weight += 1  # training goes on
    assert snapshot["weights"]["w"].is_contiguous()  # safetensors writes only contiguous tensors
    assert torch.equal(snapshot["weights"]["w"], expected) and snapshot["optimizer"]["step"].item() == 3.0
    assert {k: v for k, v in snapshot["optimizer"].items() if k != "step"} == \
        {"betas": (0.9, 0.95), "params": [0, 1], "foreach": None}


def test_cpu_tensors_are_cloned_at_every_snapshot_unless_staged():
    staging, weight = StagingBuffers(), torch.ones(3, 4)
    first, second = staging.copy({"w": weight})["w"], staging.copy({"w": weight})["w"]
    assert len({first.data_ptr(), second.data_ptr(), weight.data_ptr()}) == 3 and staging.buffers == {}


def test_staging_reuses_a_buffer_while_its_tensor_keeps_shape_and_dtype():
    staging = StagingBuffers(stage_cpu=True)
    first = staging.copy({"a": torch.ones(3, 4), "b": torch.ones(5), "c": torch.ones(2)})
    addresses = {name: tensor.data_ptr() for name, tensor in first.items()}
    second = staging.copy({"a": torch.full((3, 4), 2.0), "b": torch.ones(6), "c": torch.ones(2, dtype=torch.bfloat16)})
    assert second["a"].data_ptr() == addresses["a"] and torch.equal(second["a"], torch.full((3, 4), 2.0))
    assert second["b"].shape == (6,) and second["c"].dtype == torch.bfloat16  # new buffers for these
    assert {path: buffer.data_ptr() for path, buffer in staging.buffers.items()} == \
        {(name,): tensor.data_ptr() for name, tensor in second.items()}


def test_an_async_save_returns_while_its_write_is_still_running(tmp_path, monkeypatch):
    """No timing: the write is held until the test releases it, after save_checkpoint returned."""
    from mamba_train.checkpoint import store

    release, real_save_file = threading.Event(), store.save_file

    def held_save_file(*args, **kwargs):
        assert release.wait(timeout=60), "the test never released the write"
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(store, "save_file", held_save_file)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    writer = CheckpointWriter(background=True, log=lambda message: None)
    path = save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1}, writer=writer)
    assert writer.records[-1]["write_s"] is None and not path.exists()   # returned; the write waits
    release.set()
    writer.wait()
    assert writer.records[-1]["write_s"] is not None and (path / "model.safetensors").is_file()


def test_consecutive_async_saves_each_hold_their_own_step(tmp_path, monkeypatch):
    """Each save's snapshot reuses the previous one's staging buffers: it must wait until the
    previous write (slowed down here, while training goes on) has read them."""
    from mamba_train.checkpoint import store

    written_from = []  # the addresses of the tensors each model.safetensors was written from
    real_save_file = store.save_file

    def slow_save_file(tensors, *args, **kwargs):
        time.sleep(0.3)
        written_from.append({name: tensor.data_ptr() for name, tensor in tensors.items()})
        return real_save_file(tensors, *args, **kwargs)

    monkeypatch.setattr(store, "save_file", slow_save_file)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    writer = CheckpointWriter(background=True, log=lambda message: None, stage_cpu=True)
    expected, waits = {}, []
    for step in (1, 2, 3):
        model(torch.randn(2, 4)).square().sum().backward()  # changes weights and moments in place
        optimizer.step()
        optimizer.zero_grad()
        expected[step] = copy.deepcopy((model.state_dict(), optimizer.state_dict()["state"]))
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, writer=writer)
        waits.append(writer.last_snapshot["wait_s"])
    writer.wait()
    # the stall is reported split: the first save waits for nothing, the next for a 0.3 s write
    assert waits[0] == 0.0 and min(waits[1:]) > 0.1, waits
    for step, (weights, adam) in expected.items():
        path = tmp_path / f"step_{step:08d}"
        saved_weights = load_file(path / "model.safetensors")
        saved_adam = torch.load(path / "optimizer.pt", weights_only=True)["state"]
        assert saved_weights.keys() == weights.keys() and saved_adam.keys() == adam.keys()
        assert all(torch.equal(saved_weights[name], weights[name]) for name in weights), step
        assert all(torch.equal(saved_adam[index][key], value)
                   for index in adam for key, value in adam[index].items()), step
    assert written_from[0] == written_from[1] == written_from[2]  # the same buffers at every save


# ----------------------------------------------------------------------------- one process


@pytest.fixture(scope="module")
def one_process_runs(markov_data, tmp_path_factory):
    from mamba_train.checkpoint import store

    root = tmp_path_factory.mktemp("async-one")
    blocking = train(tiny_config(markov_data, root / "blocking", *STEPS))
    writing_threads = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        slow_writes(monkeypatch, store, threads=writing_threads)
        with pytest.MonkeyPatch.context() as staging:  # the resumed runs clone, as on CPU
            reuse_staging_buffers(staging)
            background = train(tiny_config(markov_data, root / "async", *STEPS, ASYNC))
        async_writes = list(writing_threads)
        first = train(tiny_config(markov_data, root / "resumed", *STEPS, ASYNC), stop_after_steps=3)
        second = train(tiny_config(markov_data, root / "resumed", *STEPS, ASYNC), resume="auto")
    return {"root": root, "blocking": blocking, "async": background, "async_writes": async_writes,
            "resumed": {**first.losses, **second.losses}}


def test_async_save_writes_the_same_tensors_as_a_blocking_save(one_process_runs):
    root = one_process_runs["root"]
    for step in ("step_00000003", "step_00000006"):
        assert_same_checkpoint(root / "async" / "ckpt" / step, root / "blocking" / "ckpt" / step)
    assert not leftovers(root / "async" / "ckpt")


def test_resume_from_an_async_checkpoint_is_bit_exact(one_process_runs):
    assert one_process_runs["resumed"] == one_process_runs["blocking"].losses  # float equality at every step


def test_async_save_records_the_stall_and_the_write_time(one_process_runs):
    saves = one_process_runs["async"].saves
    assert [record["checkpoint"] for record in saves] == ["step_00000003", "step_00000006"]
    for record in saves:  # the slowed safetensors write sleeps 0.3 s, in the background
        assert record["write_s"] >= 0.3, record
        # the stall is the wait for the previous write plus the copy: how long either takes is
        # the machine's business (CI's shared cores), so only the accounting is asserted
        assert record["blocking_s"] >= record["wait_s"] + record["copy_s"], record
    assert saves[0]["wait_s"] == 0.0  # nothing was being written before the first save
    writes = one_process_runs["async_writes"]
    assert writes and threading.main_thread() not in writes, writes  # training never slept on a write


def test_a_failed_background_write_surfaces_at_the_next_save(markov_data, tmp_path, monkeypatch):
    from mamba_train.checkpoint import store

    slow_writes(monkeypatch, store, seconds=0.0, fail_on_call=1)  # the save of step 2
    with pytest.raises(CheckpointError, match=r"writing checkpoint step_00000002 in the background failed: "
                                              r"OSError: No space left on device"):
        train(tiny_config(markov_data, tmp_path, "train.steps=8", "checkpoint.every=2", ASYNC))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # training went on to the next save, which raised
    assert not (tmp_path / "ckpt" / "step_00000002").exists()


def test_a_failed_last_background_write_surfaces_before_the_run_returns(markov_data, tmp_path, monkeypatch):
    from mamba_train.checkpoint import store

    slow_writes(monkeypatch, store, seconds=0.0, fail_on_call=2)  # the final save (step 4)
    with pytest.raises(CheckpointError, match=r"writing checkpoint step_00000004 in the background failed"):
        train(tiny_config(markov_data, tmp_path, "train.steps=4", "checkpoint.every=2", ASYNC))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000002"


# ----------------------------------------------------------------------------- sharded (DP=2)

DP2 = ("train.micro_batch=2", *STEPS)


def _dp2_worker(rank, world, data, root):
    from distributed import save_rank_results
    from mamba_train.checkpoint import sharded

    results = {}
    results["blocking"] = train(tiny_config(data, root / "blocking", *DP2)).losses
    with pytest.MonkeyPatch.context() as monkeypatch:
        slow_writes(monkeypatch, sharded)
        with pytest.MonkeyPatch.context() as staging:  # the resumed runs clone, as on CPU
            reuse_staging_buffers(staging)
            results["async"] = train(tiny_config(data, root / "async", *DP2, ASYNC)).losses
        first = train(tiny_config(data, root / "resumed", *DP2, ASYNC), stop_after_steps=3)
        second = train(tiny_config(data, root / "resumed", *DP2, ASYNC), resume="auto")
        results["resumed"] = {**first.losses, **second.losses}
    with pytest.MonkeyPatch.context() as monkeypatch:
        if rank == 1:  # only rank 1's shard of step 3 fails
            slow_writes(monkeypatch, sharded, seconds=0.0, fail_on_call=1)
        try:
            train(tiny_config(data, root / "failing", *DP2, ASYNC))
            results["failing"] = "finished"
        except CheckpointError as err:
            results["failing"] = str(err)
    save_rank_results(root, rank, results)


@pytest.fixture(scope="module")
def dp2_runs(markov_data, tmp_path_factory):
    pytest.importorskip("megatron.core", reason="megatron-core is in the [dev] extra")
    pytest.importorskip("deepspeed", reason="deepspeed is in the [dev] extra")
    from distributed import load_rank_results, run_workers

    root = tmp_path_factory.mktemp("async-dp2")
    run_workers(_dp2_worker, 2, markov_data, root)
    return {"root": root, "ranks": load_rank_results(root, 2)}


@pytest.mark.distributed
@pytest.mark.slow
def test_async_sharded_save_writes_the_same_tensors_as_a_blocking_save(dp2_runs):
    root = dp2_runs["root"]
    for step in ("step_00000003", "step_00000006"):
        assert_same_checkpoint(root / "async" / "ckpt" / step, root / "blocking" / "ckpt" / step)
    assert not leftovers(root / "async" / "ckpt")  # markers and temporary directories are gone
    assert dp2_runs["ranks"][0]["async"] == dp2_runs["ranks"][0]["blocking"]


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_from_an_async_sharded_checkpoint_is_bit_exact(dp2_runs):
    for results in dp2_runs["ranks"]:
        assert results["resumed"] == results["blocking"]  # float equality at every step


@pytest.mark.distributed
@pytest.mark.slow
def test_a_failed_shard_write_surfaces_on_every_rank(dp2_runs):
    for rank, results in enumerate(dp2_runs["ranks"]):
        message = results["failing"]
        assert "step_00000003" in message and "No space left on device" in message, (rank, message)
    assert not (dp2_runs["root"] / "failing" / "ckpt" / "step_00000003").exists()
