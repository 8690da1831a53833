"""Context parallelism by state passing equals the single-process model, across documents."""

import copy

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is in the [dev] extra")

from distributed import (assert_close, assert_grads_close, check_eager_and_replayed, count_collectives, run_workers,
                         tiny_batch, tiny_config)
from mamba_train.model import Mamba2LM, set_recompute
from mamba_train.parallel import (context_parallel_piece, init_parallel, parallelize_model, shard_state_dict,
                                  validate_layout)
from mamba_train.parallel.data_parallel import allreduce_gradients


def _doc_starts(seq_len: int, cp: int) -> list[list[int]]:
    piece = seq_len // cp
    return [
        [3, piece, piece + 2],     # a start inside rank 0, one exactly on the first border, one inside rank 1
        [piece - 2, 2 * piece - 1 if cp > 2 else seq_len - 1],   # starts inside the halo rows of a border
        # one document across every border: the state must pass through; with more ranks, one that
        # starts exactly on the first border and runs through rank 1 into the ranks after it
        [] if cp == 2 else [piece],
    ]


def _run(rank, cp, seq_len):
    """Forward + backward of one CP model; returns bytes communicated per layer."""
    cfg = tiny_config(ngroups=2)
    torch.manual_seed(0)
    reference = Mamba2LM(cfg)
    dims = init_parallel(validate_layout(cfg, seq_len, cp, cp=cp))
    model = parallelize_model(copy.deepcopy(reference), dims)
    input_ids, labels, seq_idx = tiny_batch(cfg, 3, seq_len, _doc_starts(seq_len, cp))
    piece = [context_parallel_piece(t, dims) for t in (input_ids, labels, seq_idx)]

    with torch.no_grad():
        assert_close(model(piece[0], piece[2]), context_parallel_piece(reference(input_ids, seq_idx), dims),
                     what=f"logits of rank {rank}")
    with count_collectives() as log:
        loss = model.loss(*piece)
        loss.backward()
    expected_loss = reference.loss(input_ids, labels, seq_idx)
    expected_loss.backward()
    allreduce_gradients(model, dims)  # the mean over the pieces = the mean over the sequence
    assert_grads_close({name: p.grad for name, p in model.named_parameters()},
                       {name: p.grad for name, p in reference.named_parameters()})
    whole_loss = loss.detach().clone()
    torch.distributed.all_reduce(whole_loss, group=dims.cp_group)
    assert_close(whole_loss / cp, expected_loss.detach(), what="loss")
    return log


def _cp_worker(rank, world):
    logs = {seq_len: _run(rank, world, seq_len) for seq_len in (8 * world, 16 * world)}
    short, long = logs.values()
    # communication per layer does not grow with the sequence: same calls, same bytes
    assert short.calls == long.calls, (short.calls, long.calls)
    cfg, batch = tiny_config(ngroups=2), 3
    halo = batch * (cfg.d_conv - 1) * cfg.conv_dim * 4                             # fp32 rows to the next rank
    states = batch * (cfg.nheads * cfg.headdim * cfg.d_state + cfg.nheads) * 4     # (h_r, log a_r)
    per_layer = {"all_gather_into_tensor": states, "reduce_scatter_tensor": world * states}
    for name, size in per_layer.items():
        assert [s for n, s in short.calls if n == name][-cfg.n_layer:] == [size] * cfg.n_layer, name
    sends = [s for n, s in short.calls if n == "isend"]
    # forward: to the next rank (all but the last); backward: to the previous (all but the first)
    assert sends == [halo] * cfg.n_layer * ((rank < world - 1) + (rank > 0)), sends


@pytest.mark.distributed
def test_cp2_equals_one_process_across_document_borders():
    run_workers(_cp_worker, 2)


@pytest.mark.distributed
def test_cp4_equals_one_process_across_document_borders():
    run_workers(_cp_worker, 4)


def _cp_recompute_worker(rank, world):
    # train.recompute='block' under CP: backward reruns each block, its halo exchange and state
    # all-gather included, in the same order on every rank; gradients as one process's
    cfg = tiny_config(ngroups=2)
    torch.manual_seed(0)
    reference = Mamba2LM(cfg)
    dims = init_parallel(validate_layout(cfg, 32, world, cp=world))
    model = parallelize_model(copy.deepcopy(reference), dims)
    set_recompute(model, "block")
    input_ids, labels, seq_idx = tiny_batch(cfg, 3, 32, _doc_starts(32, world))
    model.loss(*[context_parallel_piece(t, dims) for t in (input_ids, labels, seq_idx)]).backward()
    allreduce_gradients(model, dims)
    reference.loss(input_ids, labels, seq_idx).backward()
    assert_grads_close({name: p.grad for name, p in model.named_parameters()},
                       {name: p.grad for name, p in reference.named_parameters()})


@pytest.mark.distributed
def test_cp2_with_recompute_equals_one_process():
    run_workers(_cp_recompute_worker, 2)


def _tp_cp_worker(rank, world):
    # SP over 4 rows splits them over the TP ranks, over 3 rows each row's CP piece: either way
    # the mixers (and the CP hook) see the whole piece of every row; split by rows, also with
    # SP's collectives inside the products (tp_comm_overlap), there with recompute='block' too
    # (backward reruns each block's gather with its product)
    cfg = tiny_config(ngroups=2)
    for batch, overlap in ((4, False), (3, False), (4, True)):
        torch.manual_seed(0)
        reference = Mamba2LM(cfg, tp_size=2)
        dims = init_parallel(validate_layout(cfg, 32, world, tp=2, cp=2, sequence_parallel=True,
                                             tp_comm_overlap=overlap))
        model = parallelize_model(copy.deepcopy(reference), dims)
        if overlap:
            set_recompute(model, "block")
        input_ids, labels, seq_idx = tiny_batch(cfg, batch, 32, (_doc_starts(32, 2) + [[7, 16]])[:batch])
        model.loss(*[context_parallel_piece(t, dims) for t in (input_ids, labels, seq_idx)]).backward()
        allreduce_gradients(model, dims)
        reference.loss(input_ids, labels, seq_idx).backward()
        expected = shard_state_dict({name: p.grad for name, p in reference.named_parameters()}, cfg, 2, dims.tp_rank)
        assert_grads_close({name: p.grad for name, p in model.named_parameters()}, expected)


@pytest.mark.distributed
def test_tp2_cp2_with_sequence_parallel_split_by_rows_or_sequence_gradients_equal_one_process():
    run_workers(_tp_cp_worker, 4)


# (pieces, h, p, g, n, d_model, chunk): tiny for Triton's interpreter; one 1.3b layer (ngroups 2)
# at 2 × 2048 tokens for two GPUs. Two piece lengths: the bytes sent must not depend on them.
PIECE_SHAPES = {"tiny": ((20, 12), 4, 8, 2, 8, 24, 8), "layer": ((2048, 1024), 64, 64, 2, 128, 2048, 256)}


@pytest.mark.parametrize("wire_dtype, state_shape",
                         [(torch.bfloat16, (2, 3, 5, 7)), (torch.bfloat16, (1, 3, 5, 7)), (torch.bfloat16, (2, 4, 8, 16)),
                          (torch.float16, (2, 4, 8, 16)), (torch.float32, (2, 3, 5, 7)), (torch.float64, (2, 3, 5, 7))],
                         ids=["bf16_odd", "bf16_odd_one_row", "bf16", "fp16", "fp32", "float64"])
def test_states_travel_in_the_wire_dtype_and_log_decays_bit_exact(wire_dtype, state_shape):
    # the all-gather's packing (ContextParallel._pack / _unpack) outside any collective: the
    # states rounded once to the wire's dtype, the log decays' fp32 bits carried whole (an
    # odd h·p·n leaves them unaligned in 2-byte words)
    from mamba_train.parallel.context_parallel import ContextParallel
    gen = torch.Generator().manual_seed(0)
    ranks = 1 if state_shape[0] == 1 else 2   # one rank of one row: a slice torch calls contiguous
    pieces = [(torch.randn(state_shape, generator=gen), -30 * torch.rand(state_shape[:2], generator=gen))
              for _ in range(ranks)]
    every = torch.stack([ContextParallel._pack(state, log_decay, wire_dtype) for state, log_decay in pieces])
    assert every.dtype == wire_dtype
    states, log_decays = ContextParallel._unpack(every, pieces[0][0].shape)
    decay_dtype = torch.promote_types(wire_dtype, torch.float32)   # float64 on a float64 wire
    assert states.dtype == wire_dtype and log_decays.dtype == decay_dtype
    for rank, (state, log_decay) in enumerate(pieces):
        assert torch.equal(states[rank], state.to(wire_dtype))
        assert torch.equal(log_decays[rank], log_decay.to(decay_dtype))


def _mixer_body_piece_worker(rank, world, shape, zx_dtype, bound, symmetric=False):
    """The Triton mixer body on this rank's piece, with the hook running its collectives in the
    op's forward and backward, against the reference on the whole sequence (float64 on CPU,
    fp32 on a GPU): output, the gradient of in_proj's output (this piece's rows) and the
    weights' gradients (summed over ranks); and the collectives, the same at two lengths."""
    import torch.distributed as dist

    from kernels import reference
    from kernels.triton_mixer import mixer_body_triton
    from mamba_train.parallel.context_parallel import ContextParallel
    from test_mixer_body import GRADS, make_inputs, upcast

    device = f"cuda:{rank}" if dist.get_backend() == "nccl" else "cpu"
    ref_dtype = torch.float32 if device != "cpu" else torch.float64
    pieces, h, p, g, n, d_model, chunk = PIECE_SHAPES[shape]
    b = 3
    logs = []
    for piece in pieces:
        seq_len = world * piece
        inputs = make_inputs(b, seq_len, h, p, g, n, d_model, D="channel", device=device, seed=3)
        # decays of order one over a piece, so that the states passed between ranks weigh in the
        # result (at the layer's A, heads forget a whole piece)
        inputs["A"] = inputs["A"] / piece
        inputs["seq_idx"] = tiny_batch(tiny_config(), b, seq_len, _doc_starts(seq_len, world))[2].to(device)
        out_grad = torch.randn(b, seq_len, d_model, generator=torch.Generator().manual_seed(1)).to(device, ref_dtype)
        kwargs = dict(ngroups=g, chunk_size=chunk)

        whole = {k: (v.detach().clone().requires_grad_(True) if k in GRADS else v)
                 for k, v in upcast(inputs, ref_dtype).items()}
        expected = reference.mixer_body(**whole, **kwargs)
        (expected * out_grad).sum().backward()

        rows = slice(rank * piece, (rank + 1) * piece)
        mine = {k: (v[:, rows].contiguous() if k in ("zxbcdt", "seq_idx") else v) for k, v in inputs.items()}
        mine["zxbcdt"] = mine["zxbcdt"].to(zx_dtype)
        mine = {k: (v.detach().clone().requires_grad_(True) if k in GRADS else v) for k, v in mine.items()}
        cp = ContextParallel(dist.group.WORLD, d_conv=4, symmetric=symmetric)
        cp.begin(mine["seq_idx"], b, torch.device(device))
        with count_collectives() as log:
            out = mixer_body_triton(**mine, **kwargs, context_parallel=cp)
            (out.to(ref_dtype) * out_grad[:, rows]).sum().backward()
        logs.append(log)

        assert_close(out.to(ref_dtype), expected.detach()[:, rows], rel=bound, what=f"output of rank {rank}")
        assert_close(mine["zxbcdt"].grad.to(ref_dtype), whole["zxbcdt"].grad[:, rows], rel=bound,
                     what=f"dzxbcdt of rank {rank}")
        for name in GRADS[1:]:
            summed = mine[name].grad.to(ref_dtype)
            dist.all_reduce(summed)
            assert_close(summed, whole[name].grad, rel=bound, what=f"d{name} on rank {rank}")
    # per layer (one here): the halo and the incoming state forward, their gradients backward
    assert logs[0].calls == logs[1].calls, (logs[0].calls, logs[1].calls)
    halo = b * 3 * (h * p + 2 * g * n) * zx_dtype.itemsize     # (d_conv - 1) rows of conv channels
    # (state, log decay): the state in C's dtype (zx's), the log decay in fp32
    states = b * (h * p * n * zx_dtype.itemsize + h * 4)
    # (relayed over symmetric memory, the states go through no collective of torch's)
    gathers = [] if symmetric else [("all_gather_into_tensor", states)] * 2
    expected_calls = ([("isend", halo)] if rank < world - 1 else []) + gathers + ([("isend", halo)] if rank > 0 else [])
    sends = [(name, size) for name, size in logs[0].calls if name in ("isend", "all_gather_into_tensor")]
    assert sends == expected_calls, sends


def _interpreted_triton():
    pytest.importorskip("triton")
    from kernels.triton_ssd import chunk_cumsum
    from triton_device import triton_device

    return triton_device(chunk_cumsum._chunk_cumsum_fwd_kernel, "kernels.triton_ssd") == "cpu"


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_triton_mixer_body_on_pieces_equals_the_whole_sequence(world):
    # The op's own backward of the state passing across ranks against autograd through the
    # reference, under Triton's interpreter (a GPU machine runs the NCCL test below instead)
    if not _interpreted_triton():
        pytest.skip("the kernels are compiled for the GPU here: the gpu test below runs them")
    # fp32 pieces against the float64 whole: measured up to ~1e-6
    run_workers(_mixer_body_piece_worker, world, "tiny", torch.float32, 1e-5)


def _triton_model_worker(rank, world, tp, recompute, with_docs):
    # The whole parallel model with the Triton mixer body (Triton's interpreter on CPU) in place
    # of the reference one, against the single-process reference model: TP and CP together,
    # recomputation re-running the op's collectives, one document or several.
    import mamba_train.model.mamba2 as mamba2
    from kernels.triton_mixer import mixer_body_triton

    mamba2.mixer_body = mixer_body_triton
    cfg, cp, seq_len = tiny_config(ngroups=2, n_layer=1), world // tp, 16   # small: every kernel is interpreted
    torch.manual_seed(0)
    reference = Mamba2LM(cfg, tp_size=tp)
    dims = init_parallel(validate_layout(cfg, seq_len, world, tp=tp, cp=cp))
    _check_triton_model(reference, dims, cfg, seq_len, recompute, with_docs, torch.device("cpu"))


def _check_triton_model(reference, dims, cfg, seq_len, recompute, with_docs, device):
    """The parallel model made from `reference` (its weights), one step's gradients of it against
    the reference's over the whole sequence (which runs the same mixer body); returns the
    parallel run's collectives."""
    model = parallelize_model(copy.deepcopy(reference), dims).to(device)
    reference = copy.deepcopy(reference).to(device)
    set_recompute(model, recompute)
    batch = tiny_batch(cfg, 3, seq_len, _doc_starts(seq_len, dims.layout.cp))
    input_ids, labels, seq_idx = (t.to(device) for t in batch)
    seq_idx = seq_idx if with_docs else None
    pieces = [None if t is None else context_parallel_piece(t, dims) for t in (input_ids, labels, seq_idx)]
    with count_collectives() as log:
        model.loss(*pieces).backward()
    allreduce_gradients(model, dims)
    reference.loss(input_ids, labels, seq_idx).backward()
    expected = shard_state_dict({name: p.grad for name, p in reference.named_parameters()}, cfg, dims.layout.tp,
                                dims.tp_rank)
    assert_grads_close({name: p.grad for name, p in model.named_parameters()}, expected)
    return log


@pytest.mark.distributed
@pytest.mark.parametrize("tp, world, recompute, with_docs", [(2, 4, "none", True), (1, 2, "block", False)],
                         ids=["tp2_cp2_docs", "cp2_recompute_one_document"])
def test_parallel_model_with_the_triton_mixer_body_equals_one_process(tp, world, recompute, with_docs):
    if not _interpreted_triton():
        pytest.skip("the kernels are compiled for the GPU here: the gpu test below runs them")
    run_workers(_triton_model_worker, world, tp, recompute, with_docs)


def _relayed_model_worker(rank, world):
    # The CP=2 model on two GPUs, its boundary states relayed over symmetric memory, with whole
    # blocks recomputed and without: the recomputed forward relays again, in the backward's
    # order (rank r's recompute reads rank r-1's, its backward then waits for rank r+1's), and
    # every gradient must still equal one process's.
    import mamba_train.model.mamba2 as mamba2
    from kernels.triton_mixer import mixer_body_triton
    from mamba_train.config import ModelConfig

    mamba2.mixer_body = mixer_body_triton
    # the smallest shapes whose dots the compiled kernels tile (16 and up), 2 chunks a rank
    cfg = ModelConfig(d_model=64, n_layer=2, d_state=16, d_conv=4, expand=2, headdim=16, ngroups=2, chunk_size=16,
                      vocab_size=50)
    seq_len, device = 64, torch.device("cuda", rank)
    torch.manual_seed(0)
    reference = Mamba2LM(cfg)
    dims = init_parallel(validate_layout(cfg, seq_len, world, tp=1, cp=world))
    for recompute in ("none", "block"):
        log = _check_triton_model(reference, dims, cfg, seq_len, recompute, True, device)
        # one all-gather a step (`begin`'s, of each piece's first and last document ids); the
        # all-gather path would add two a layer, three with the recomputed forward
        assert log.counts().get("all_gather_into_tensor", 0) == 1, (recompute, log.calls)


@pytest.mark.gpu
def test_gpu_relayed_cp2_model_with_and_without_recompute_equals_one_process(monkeypatch):
    if _interpreted_triton() or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    # fp32 dots in fp32, not tf32, so that the CPU tests' fp32 bounds hold (the workers inherit it;
    # the setting is part of Triton's cache key)
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    run_workers(_relayed_model_worker, 2, backend="nccl")


def _state_relay_worker(rank, world):
    """Sequences of boundary states relayed over symmetric memory (ContextParallel's
    relay_forward and relay_backward, alternating), one rank held back before it writes or
    before it reads, eagerly and over replays of a captured CUDA graph: each rank reads what its
    neighbour wrote in that pass, bit for bit, with more passes in each direction than the
    relay has slots (a writer that runs ahead must wait for the slot to be read)."""
    import torch.distributed as dist

    from mamba_train.parallel.context_parallel import ContextParallel
    from mamba_train.parallel.symmetric_exchange import StateRelay

    device = torch.device("cuda", rank)
    shape, passes, wire = (2, 8, 64, 128), 2 * StateRelay.slots + 3, torch.bfloat16
    cp = ContextParallel(dist.group.WORLD, d_conv=4, symmetric=True)

    def fresh_inputs():
        return {"states": torch.randn(passes, *shape, device=device)}

    def hold_back(when, lag):
        if lag == when and rank == 1:
            torch.cuda._sleep(200_000)

    def relay(inputs, lag=None):
        # pass i: forward when even (rank r reads rank r-1's), backward when odd (rank r+1's)
        cp.begin(None, shape[0], device)
        received = []
        for i in range(passes):
            assert cp.relays(shape, wire, device), "the states were not relayed"
            relayed = (cp.relay_forward if i % 2 == 0 else cp.relay_backward)(shape, wire)
            hold_back("write", lag)
            if relayed.outgoing is not None:
                relayed.outgoing.copy_(inputs["states"][i])
            hold_back("read", lag)
            received.append(relayed.incoming.clone() if relayed.incoming is not None
                            else torch.zeros(shape, dtype=wire, device=device))
            if relayed.incoming is not None and not torch.cuda.is_current_stream_capturing():
                # one document throughout: the state reaches every row (compared eagerly: a capture cannot sync)
                assert torch.equal(relayed.scale, torch.ones(shape[0], device=device))
            relayed.done()
        return received

    def check(received, inputs, what):
        every = torch.empty(world, *inputs["states"].shape, device=device)
        dist.all_gather_into_tensor(every, inputs["states"])
        for i, got in enumerate(received):
            sender = rank - 1 if i % 2 == 0 else rank + 1
            want = every[sender, i].to(wire) if 0 <= sender < world else torch.zeros_like(got)
            assert torch.equal(got, want), f"{what}: pass {i} is not what rank {sender} wrote"

    check_eager_and_replayed(relay, check, fresh_inputs, ("write", "read"),
                             describe=lambda lag: f"rank 1 held back before each {lag or 'nothing'}")


@pytest.mark.gpu
def test_gpu_state_relay_passes_each_neighbours_state_with_a_lagging_rank_eager_and_replayed():
    if _interpreted_triton() or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    run_workers(_state_relay_worker, torch.cuda.device_count(), backend="nccl")


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["relay", "all_gather"])
def test_gpu_triton_mixer_body_on_two_nccl_ranks_equals_the_whole_sequence(symmetric):
    if _interpreted_triton() or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    # bf16 in_proj output against the fp32 reference, as test_mixer_body's gpu test bounds it;
    # the boundary states relayed rank to rank over symmetric memory, or all-gathered
    run_workers(_mixer_body_piece_worker, 2, "layer", torch.bfloat16, 2e-2, symmetric, backend="nccl")
