"""`train()` as torchrun runs it, on 2 gloo processes: tensor, context and data parallel
runs train like one process, sharded checkpoints resume bit-exactly on their own layout
and, resharded, on another one, and a bad shard, a bad layout or a hung rank fail clearly.

One module fixture runs every parallel job in one pair of workers (starting workers costs
seconds); each test then checks one behaviour on what they wrote.
"""

import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("megatron.core", reason="megatron-core is in the [dev] extra")
deepspeed = pytest.importorskip("deepspeed", reason="deepspeed is in the [dev] extra")  # imported before the fork

import torch.distributed as dist  # noqa: E402

from distributed import load_rank_results, run_workers, save_rank_results  # noqa: E402
from mamba_train.checkpoint import CheckpointError, load_checkpoint, load_trained_model  # noqa: E402
from mamba_train.model import Mamba2LM  # noqa: E402
from mamba_train.parallel import merge_state_dicts  # noqa: E402
from mamba_train.train.loop import TrainingError, train  # noqa: E402
from synthetic import tiny_config  # noqa: E402

# ngroups 2 so that tp=2 owns whole groups; 6 steps of micro_batch 4 (global batch 4)
COMMON = ("model.ngroups=2", "train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=5",
          "train.eval_every=3", "train.eval_batches=2")
STEP3 = "step_00000003"
# The vocabulary is padded to a multiple of 128·tp: 64 per TP rank gives the 128 rows of the
# one-process model, so both start from the same weights (and the model config is the
# one any resume of the tp2 checkpoints uses).
TP2_MODEL = "model.pad_vocab_multiple=64"
LAYOUTS = {
    "tp2": ("parallel.tp=2", TP2_MODEL, "parallel.sequence_parallel=true"),
    # SP's collectives inside in_proj's and out_proj's products (on CUDA they overlap; gloo runs
    # the same functions with plain collectives)
    "tp2-overlap": ("parallel.tp=2", TP2_MODEL, "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true"),
    "cp2": ("parallel.cp=2",),
    "dp2": ("train.micro_batch=2",),  # × dp 2 = the one process's 4 rows
}
# Losses of a parallel layout and one process differ by fp32 rounding only (sharded matmuls,
# ZeRO's flat buffers, state passing sum in other orders): measured at most 3e-7 relative
# over 6 steps, so 2e-6 leaves a 7x margin. A layout bug shows at 1e-4 and above.
LOSS_REL = 2e-6
# A resharded resume restores weights and Adam moments exactly; what differs is again only
# the rounding of the forward/backward on the new layout: measured 2e-7 over the 3 steps
# after resuming. Resetting the moments instead gives 4e-4 at the second step, so the
# bound also shows that the optimizer state was resharded, not only the weights.
RESHARD_REL = 2e-6


def _worker(rank, world, data, root):
    results = {}

    def run(name, *overrides, **kwargs):
        return train(tiny_config(data, root / name, *COMMON, *overrides), **kwargs)

    for name, overrides in LAYOUTS.items():
        straight = run(name, *overrides)
        results[name] = {"losses": straight.losses, "eval": straight.eval["overall"]["loss"]}
    for name in ("tp2", "dp2"):  # stop at step 3, resume on the same layout
        first = run(f"{name}-resumed", *LAYOUTS[name], stop_after_steps=3)
        second = run(f"{name}-resumed", *LAYOUTS[name], resume="auto")
        results[name]["resumed"] = {**first.losses, **second.losses}
    # the one-process reference's checkpoint, resharded onto tp=2 (its vocabulary: 128 rows)
    results["one-to-tp2"] = run("one-to-tp2", "parallel.tp=2", resume=str(root / "one" / "ckpt" / STEP3)).losses

    corrupt = root / "corrupt" / STEP3
    if rank == 0:
        shutil.copytree(root / "tp2" / "ckpt" / STEP3, corrupt)
        shard = corrupt / "optim-rank00001.safetensors"
        data_bytes = bytearray(shard.read_bytes())
        data_bytes[-1] ^= 0xFF
        shard.write_bytes(bytes(data_bytes))
    dist.barrier()
    try:
        run("corrupt", *LAYOUTS["tp2"], resume=str(corrupt))
        results["corrupt"] = "resumed from a corrupt checkpoint"
    except CheckpointError as err:
        results["corrupt"] = str(err)
    save_rank_results(root, rank, results)


@pytest.fixture(scope="module")
def runs(markov_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    one = train(tiny_config(markov_data, root / "one", *COMMON))  # before the workers: they resume from it
    started = time.perf_counter()
    run_workers(_worker, 2, markov_data, root)
    print(f"parallel runs: {time.perf_counter() - started:.1f} s")
    ranks = load_rank_results(root, 2)
    return {"root": root, "data": markov_data, "one": one, "ranks": ranks}


def _int_keys(losses: dict) -> dict:
    return {int(step): loss for step, loss in losses.items()}


def _worst_relative(losses: dict, expected: dict) -> float:
    assert losses.keys() == expected.keys(), (sorted(losses), sorted(expected))
    return max(abs(losses[step] - expected[step]) / abs(expected[step]) for step in expected)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "tp2-overlap", "cp2"])
def test_tp2_and_cp2_train_like_one_process_with_the_same_global_batch(runs, layout):
    losses = _int_keys(runs["ranks"][0][layout]["losses"])
    worst = _worst_relative(losses, runs["one"].losses)
    assert worst <= LOSS_REL, f"{layout}: worst relative loss difference {worst:.1e}"


@pytest.mark.distributed
@pytest.mark.slow
def test_dp2_zero1_trains_like_one_process_with_the_double_batch(runs):
    # dp 2 × micro_batch 2 against one process with micro_batch 4: the same global batch
    losses = _int_keys(runs["ranks"][0]["dp2"]["losses"])
    worst = _worst_relative(losses, runs["one"].losses)
    assert worst <= LOSS_REL, f"dp2: worst relative loss difference {worst:.1e}"


@pytest.mark.distributed
@pytest.mark.slow
def test_every_rank_logs_the_same_global_loss_and_valid_loss(runs):
    rank0, rank1 = runs["ranks"]
    for layout in LAYOUTS:
        assert rank0[layout] == rank1[layout], layout
    # the windowed valid loss of the final weights: the same model on every layout
    evals = [rank0[layout]["eval"] for layout in LAYOUTS]
    assert max(evals) - min(evals) <= 1e-5 * min(evals), evals


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_resume_on_the_same_layout_is_bit_exact(runs, layout):
    result = runs["ranks"][0][layout]
    assert result["resumed"] == result["losses"]  # float equality at every step


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout, model", [("tp2", (TP2_MODEL,)), ("dp2", ())])
def test_sharded_checkpoint_resumes_resharded_on_one_process(runs, layout, model, tmp_path):
    # tp 2 → 1 merges the TP shards; dp 2 → 1 joins the ZeRO partitions (weights and moments).
    # One process with micro_batch 4: the global batch of both layouts.
    checkpoint = runs["root"] / layout / "ckpt" / STEP3
    resumed = train(tiny_config(runs["data"], tmp_path, *COMMON, *model), resume=str(checkpoint))
    expected = {step: loss for step, loss in _int_keys(runs["ranks"][0][layout]["losses"]).items() if step > 3}
    worst = _worst_relative(resumed.losses, expected)
    assert worst <= RESHARD_REL, f"{layout} → one process: worst relative loss difference {worst:.1e}"


@pytest.mark.distributed
@pytest.mark.slow
def test_one_process_checkpoint_resumes_resharded_on_tp2(runs):
    expected = {step: loss for step, loss in runs["one"].losses.items() if step > 3}
    worst = _worst_relative(_int_keys(runs["ranks"][0]["one-to-tp2"]), expected)
    assert worst <= RESHARD_REL, f"one process → tp2: worst relative loss difference {worst:.1e}"


@pytest.mark.distributed
@pytest.mark.slow
def test_corrupt_shard_is_named_on_every_rank(runs):
    for rank, results in enumerate(runs["ranks"]):
        assert "optim-rank00001.safetensors is corrupt" in results["corrupt"], (rank, results["corrupt"])


@pytest.mark.distributed
@pytest.mark.slow
def test_missing_shard_is_named(runs, tmp_path):
    checkpoint = tmp_path / STEP3
    shutil.copytree(runs["root"] / "tp2" / "ckpt" / STEP3, checkpoint)
    (checkpoint / "model-tp01.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: .*model-tp01.safetensors is missing"):
        train(tiny_config(runs["data"], tmp_path / "run", *COMMON, TP2_MODEL), resume=str(checkpoint))


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_checkpoint_loads_merged_for_eval_and_export(runs):
    checkpoint = runs["root"] / "tp2" / "ckpt" / "step_00000006"
    model, cfg, path, _ = load_trained_model(checkpoint)
    assert path == checkpoint and cfg.parallel.tp == 2
    shards = [load_file(checkpoint / f"model-tp{rank:02d}.safetensors") for rank in range(2)]
    merged = merge_state_dicts(shards, cfg.model)
    weights = model.state_dict()
    assert weights.keys() == merged.keys()
    assert all(torch.equal(weights[k].cpu(), merged[k]) for k in merged)
    # fp32 training: the weights the model computed with are its fp32 masters
    masters = Mamba2LM(cfg.model, tp_size=2)
    load_checkpoint(checkpoint, masters)
    assert all(torch.equal(masters.state_dict()[k], merged[k]) for k in merged)


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=3", r"parallel layout: parallel.tp=3 must divide model nheads=8"),
    ("parallel.cp=3", r"parallel layout: parallel.cp=3 must divide data.seq_len=64"),
])
def test_a_layout_that_cannot_work_fails_before_any_work(markov_data, tmp_path, override, message):
    with pytest.raises(TrainingError, match=message):
        train(tiny_config(markov_data, tmp_path, "model.ngroups=2", override))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "config.yaml").exists()


def test_comm_overlap_across_nodes_fails_before_any_work(markov_data, tmp_path, monkeypatch):
    # four TP ranks on nodes of two GPUs each: symmetric memory cannot map the group's GPUs
    from mamba_train.train.parallel_trainer import ParallelTrainer

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = tiny_config(markov_data, tmp_path, "model.ngroups=4", "parallel.tp=4", "parallel.sequence_parallel=true",
                      "parallel.tp_comm_overlap=true")
    with pytest.raises(TrainingError, match=r"tp_comm_overlap needs each TP group on one node: tp=4 is more than "
                                            r"the 2 processes a node runs"):
        ParallelTrainer(cfg, torch.device("cuda"))


def _hung_rank_worker(rank, world, data, root):
    from mamba_train.train.parallel_trainer import ParallelTrainer

    if rank == 1:  # rank 1 stalls before its first step; rank 0 waits in the gradient all-reduce
        real_step = ParallelTrainer.train_step

        def stalled_step(self, loader, lr):
            time.sleep(4)
            return real_step(self, loader, lr)

        ParallelTrainer.train_step = stalled_step
    try:
        train(tiny_config(data, root, "train.micro_batch=2", "train.steps=2", "parallel.timeout_minutes=0.02"))
        outcome = "finished"
    except TrainingError as err:
        outcome = str(err)
    (root / f"rank{rank}.txt").write_text(outcome)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_hung_collective_raises_a_clear_error(markov_data, tmp_path):
    run_workers(_hung_rank_worker, 2, markov_data, tmp_path)
    waiting = (tmp_path / "rank0.txt").read_text()
    assert "rank 0: a collective did not complete within parallel.timeout_minutes=0.02" in waiting, waiting
    assert "another rank" in (tmp_path / "rank1.txt").read_text()


def _graph_worker(rank, world, data, root):
    # eager steps and train.cuda_graph's replays of every layout, with accumulation over 3
    # micro-batches (an engine scale of 1/3) and an evaluation between steps 3 and 4 (eager)
    results = {}
    for name, overrides in LAYOUTS.items():
        for graph in ("false", "true"):
            run = train(tiny_config(data, root / f"{name}-graph-{graph}", *COMMON, *overrides, "train.device=cuda",
                                    "train.grad_accum=3", f"train.cuda_graph={graph}"))
            results[f"{name}-graph-{graph}"] = {"losses": run.losses, "eval": run.eval["overall"]["loss"]}
    save_rank_results(root, rank, results)


@pytest.mark.gpu
@pytest.mark.distributed
def test_gpu_cuda_graph_of_tp2_cp2_dp2_trains_exactly_as_eager(markov_data, tmp_path):
    """The parallel trainer's graph: the model's loss and backward (collectives, and the
    sequence-parallel norms' gradient sum, inside) replayed, then handed to DeepSpeed's engine,
    whose reduction and step stay eager: the same losses, bit for bit, on two NCCL ranks."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    run_workers(_graph_worker, 2, markov_data, tmp_path, backend="nccl")
    ranks = load_rank_results(tmp_path, 2)
    for layout in LAYOUTS:
        eager, graphed = ranks[0][f"{layout}-graph-false"], ranks[0][f"{layout}-graph-true"]
        assert graphed == eager, f"{layout}: graphed {graphed} vs eager {eager}"
        assert ranks[1][f"{layout}-graph-true"] == graphed, layout
