"""Data parallelism: DeepSpeed ZeRO-1/2 on gloo over megatron's groups, alone and under
TP × CP, trains exactly like one process with AdamW on the same global batch."""

import math

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is in the [dev] extra")
pytest.importorskip("deepspeed", reason="deepspeed is in the [dev] extra")

from distributed import run_workers, tiny_batch, tiny_config
from mamba_train.config import OptimConfig
from mamba_train.model import Mamba2LM, param_groups
from mamba_train.parallel import destroy_parallel, init_parallel, parallelize_model, setup_parallel, validate_layout
from mamba_train.parallel.data_parallel import build_engine, deepspeed_config

SEQ_LEN = 32
OPTIM = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CLIP = 1.0
# Losses agree to fp32 rounding grown by the steps: summation orders differ (sharded
# matmuls, ZeRO's flat buffers, state passing), and Adam's normalised update amplifies
# rounding in near-zero gradients. Measured worst over 20 steps: 2e-7 (fp32 vs float64
# of one process is also 2e-7), so 2e-6 leaves a 10x margin. A layout bug shows at 1e-4+
# (a clipping norm that missed the TP shards gave 1e-3 by step 20).
LOSS_REL = 2e-6


def _global_batch(cfg, step: int, rows: int):
    # documents that start inside a rank's piece and exactly on the CP border (16)
    return tiny_batch(cfg, rows, SEQ_LEN, [[5, 16], [], [11, 27], [16]][:rows], seed=step)


def _rank_piece(run, input_ids, labels, seq_idx) -> dict:
    # a global batch of one row per DP rank → this rank's row, cut to its CP piece
    rows = slice(run.dims.dp_rank, run.dims.dp_rank + 1)
    return run.piece({"input_ids": input_ids[rows], "labels": labels[rows], "seq_idx": seq_idx[rows]})


def _reference_losses(cfg, steps: int, rows: int, tp_size: int) -> list[float]:
    torch.manual_seed(0)
    model = Mamba2LM(cfg, tp_size=tp_size)
    optimizer = torch.optim.AdamW(param_groups(model, OPTIM["weight_decay"]), lr=OPTIM["lr"], betas=OPTIM["betas"],
                                  eps=OPTIM["eps"])
    losses = []
    for step in range(steps):
        input_ids, labels, seq_idx = _global_batch(cfg, step, rows)
        loss = model.loss(input_ids, labels, seq_idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _train(rank, world, tp, cp, zero_stage, steps, sequence_parallel, grad_accum=1, handed_over=False):
    cfg = tiny_config(ngroups=2)
    micro_batch = 1
    optim = OptimConfig(lr=OPTIM["lr"], beta1=OPTIM["betas"][0], beta2=OPTIM["betas"][1], eps=OPTIM["eps"],
                        weight_decay=OPTIM["weight_decay"], grad_clip=CLIP)
    # the loop's entry point: same seed as the reference, so the same starting weights
    run = setup_parallel(cfg, SEQ_LEN, optim, micro_batch, grad_accum, tp=tp, cp=cp,
                         sequence_parallel=sequence_parallel, zero_stage=zero_stage, seed=0)
    dims = run.dims
    rows = micro_batch * grad_accum * dims.layout.dp   # the global batch
    losses = []
    for step in range(steps):
        input_ids, labels, seq_idx = _global_batch(cfg, step, rows)
        step_loss = 0.0
        for micro in range(grad_accum):
            # micro-batch `micro` of this DP rank's rows, then this CP rank's piece of it
            first = (dims.dp_rank * grad_accum + micro) * micro_batch
            rows_of = slice(first, first + micro_batch)
            batch = run.piece({"input_ids": input_ids[rows_of], "labels": labels[rows_of],
                               "seq_idx": seq_idx[rows_of]})
            if handed_over and step == micro == 0:
                run.graph_loss(batch, capture=False)  # train.cuda_graph's hand-over, without the graph
            loss = run.engine(batch["input_ids"], batch["seq_idx"], labels=batch["labels"])
            run.engine.backward(loss)   # scales by 1 / grad_accum; steps only at the boundary
            run.engine.step()
            step_loss += run.average(loss) / grad_accum
        losses.append(step_loss)
    expected = _reference_losses(cfg, steps, rows, tp)
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, expected))
    assert worst <= LOSS_REL, f"rank {rank}: worst relative loss difference {worst:.2e}\n{losses}\n{expected}"
    if rank == 0:
        print(f"tp={tp} cp={cp} dp={dims.layout.dp} zero={zero_stage} accum={grad_accum}: "
              f"worst relative loss difference {worst:.1e}")
    weights = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    if handed_over:
        run.release_graph()   # what the trainer's close does before the groups go
        assert "forward" not in vars(run.model) and run.graphed is None
    destroy_parallel()
    return losses, weights


def _zero_worker(rank, world):
    from deepspeed import comm

    for stage in (1, 2):
        _train(rank, world, tp=1, cp=1, zero_stage=stage, steps=5, sequence_parallel=False)
        assert comm.comm.cdb.shm_comm_op is None   # its JIT build skipped on CPU (build_engine)
    # global batch = micro (1) × accumulation (2) × dp (2) = 4 sequences
    _train(rank, world, tp=1, cp=1, zero_stage=1, steps=5, sequence_parallel=False, grad_accum=2)


@pytest.mark.distributed
def test_zero1_and_zero2_on_gloo_equal_plain_adamw_with_gradient_accumulation():
    run_workers(_zero_worker, 2)


def _tp_cp_dp_worker(rank, world):
    _train(rank, world, tp=2, cp=2, zero_stage=1, steps=20, sequence_parallel=True)


@pytest.mark.distributed
def test_tp2_cp2_dp2_trains_like_one_process_for_20_steps():
    run_workers(_tp_cp_dp_worker, 8)


def _handed_over_worker(rank, world):
    # TP2 (sequence parallel: the norms' gradient sum) × CP2, accumulation 3 (a scale 1/3 that is
    # not a power of two), ZeRO-1 and -2
    for stage in (1, 2):
        plain = _train(rank, world, tp=2, cp=2, zero_stage=stage, steps=3, sequence_parallel=True, grad_accum=3)
        handed = _train(rank, world, tp=2, cp=2, zero_stage=stage, steps=3, sequence_parallel=True, grad_accum=3,
                        handed_over=True)
        assert handed[0] == plain[0], f"ZeRO-{stage}: losses {handed[0]} vs {plain[0]}"
        for name, weight in plain[1].items():
            assert torch.equal(handed[1][name], weight), f"ZeRO-{stage}: {name} differs after 3 steps"


@pytest.mark.distributed
def test_gradients_handed_over_to_deepspeed_train_bit_for_bit_as_its_backward():
    """train.cuda_graph's path without the graph: the loss and its gradients computed first, then
    handed to the engine's backward (1/accum, hooks, ZeRO reduction), equal a plain backward."""
    run_workers(_handed_over_worker, 4)


def _bf16_worker(rank, world):
    cfg = tiny_config(ngroups=2)
    dims = init_parallel(validate_layout(cfg, SEQ_LEN, world, tp=world))
    torch.manual_seed(0)
    model = parallelize_model(Mamba2LM(cfg, tp_size=world), dims)
    engine = build_engine(model, dims, deepspeed_config(1, 1, 1, grad_clip=CLIP, bf16=True, **OPTIM),
                          param_groups(model, OPTIM["weight_decay"]))
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    losses = []
    for step in range(10):
        input_ids, labels, seq_idx = _global_batch(cfg, step, 1)
        loss = engine(input_ids, seq_idx, labels=labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    expected = _reference_losses(cfg, 10, 1, world)
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, expected))
    # bf16 weights and activations, fp32 master weights: measured 2.7e-4 against fp32 over 10
    # steps; bf16's own resolution is 7.8e-3, and without fp32 masters the updates (lr·~1 on
    # weights ~0.02-1) would round away
    assert worst <= 2e-3, f"bf16 losses {losses} vs fp32 {expected}: worst relative {worst:.1e}"


@pytest.mark.distributed
def test_bf16_zero1_with_fp32_master_weights_tracks_fp32_under_tp2():
    run_workers(_bf16_worker, 2)


def _grad_norm_worker(rank, world, tp, cp, bf16):
    cfg = tiny_config(ngroups=2)
    run = setup_parallel(cfg, SEQ_LEN, OptimConfig(grad_clip=CLIP), 1, 1, tp=tp, cp=cp, bf16=bf16, seed=0)
    dims = run.dims
    input_ids, labels, seq_idx = _global_batch(cfg, 0, dims.layout.dp)
    batch = _rank_piece(run, input_ids, labels, seq_idx)
    loss = run.engine(batch["input_ids"], batch["seq_idx"], labels=batch["labels"])
    run.engine.backward(loss)
    run.engine.step()
    reported = float(run.engine.get_global_grad_norm())
    torch.manual_seed(0)   # the same initial weights, rounded as the engine holds them
    model = Mamba2LM(cfg, tp_size=tp)
    if bf16:
        model = model.to(torch.bfloat16).float()
    model.loss(input_ids, labels, seq_idx).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    # measured within 1e-3 relative with bf16 gradients (tp, cp or dp 2), 1e-6 in fp32
    assert abs(reported - expected) <= (3e-3 if bf16 else 1e-5) * expected, \
        f"tp={tp} cp={cp} bf16={bf16}: reported {reported:.6f}, one process {expected:.6f}"


@pytest.mark.distributed
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tp, cp", [(1, 1), (2, 1), (1, 2)])
def test_reported_grad_norm_is_the_whole_models_on_every_layout(tp, cp, bf16):
    """DeepSpeed's reported norm (bf16 ZeRO-1 over megatron's groups) is the whole model's: a
    gradient summed instead of averaged over DP/CP, or a TP shard counted twice, shows here as a
    factor of the world size, which the loss tests cannot see when every step is clipped (a
    clipped Adam step does not depend on the gradient's scale)."""
    run_workers(_grad_norm_worker, 2, tp, cp, bf16)


def _non_finite_worker(rank, world, tp, bf16):
    cfg = tiny_config(ngroups=2)
    run = setup_parallel(cfg, SEQ_LEN, OptimConfig(grad_clip=CLIP), 1, 1, tp=tp, bf16=bf16, seed=0)
    dims = run.dims
    norms, changed = [], []
    for step in range(3):
        batch = _rank_piece(run, *_global_batch(cfg, step, dims.layout.dp))
        before = [p.detach().clone() for p in run.model.parameters()]
        loss = run.engine(batch["input_ids"], batch["seq_idx"], labels=batch["labels"])
        if step == 1 and rank == 1:   # one rank's gradient overflows (inf · 0 = nan in places)
            loss = loss * float("inf")
        run.engine.backward(loss)
        if step == 0:
            _check_fused_gradient_checks(run.engine.optimizer)
        run.engine.step()
        norms.append(float(run.engine.get_global_grad_norm()))
        changed.append(any(not torch.equal(p, b) for p, b in zip(run.model.parameters(), before)))
    destroy_parallel()
    assert changed == [True, False, True], f"rank {rank} tp={tp} bf16={bf16}: weights changed at steps {changed}"
    assert math.isfinite(norms[0]) and not math.isfinite(norms[1]) and math.isfinite(norms[2]), norms


def _check_fused_gradient_checks(optimizer):
    # data_parallel._fuse_gradient_checks on this rank's reduced gradients, before the step.
    # The norm: as DeepSpeed's own per-tensor fp64 one (which tensors count under TP included).
    groups = [i for i in range(len(optimizer.bit16_groups)) if optimizer.averaged_gradients.get(i)]
    assert groups, "no reduced gradients to check"
    for i in groups:
        grads, params = optimizer.averaged_gradients[i], optimizer.params_in_partition[i]
        fused = optimizer.get_grad_norm_direct(grads, params).item()
        per_tensor = type(optimizer).get_grad_norm_direct(optimizer, grads, params).item()
        assert abs(fused - per_tensor) <= 1e-6 * per_tensor, f"group {i}: norm {fused} vs DeepSpeed's {per_tensor}"
    # The overflow check: none, then one element of one gradient is inf, -inf, nan
    assert not optimizer.has_overflow_partitioned_grads_serial().item()
    flat = [g for i in groups for g in optimizer.averaged_gradients[i] if g.numel()][-1].view(-1)
    kept = flat[0].clone()
    for bad in (float("inf"), float("-inf"), float("nan")):
        flat[0] = bad
        assert optimizer.has_overflow_partitioned_grads_serial().item(), bad
    flat[0] = kept


@pytest.mark.distributed
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(tp, bf16):
    """DeepSpeed's overflow check: a non-finite gradient on one rank (before the DP reduction
    with tp=1, in one TP shard with tp=2) leaves every rank's weights as they were, reports a
    non-finite norm (the trainer counts the step as skipped), and the next step trains. (The
    norm alone already catches it: the fused overflow check and norm are tested on their own
    too, against planted inf/nan and against DeepSpeed's per-tensor norm.)"""
    run_workers(_non_finite_worker, 2, tp, bf16)
