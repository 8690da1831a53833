"""Tensor parallelism (megatron-core layers on gloo) equals the single-process model."""

import contextlib
import copy

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is in the [dev] extra")
import torch.distributed as dist

from distributed import (assert_close, assert_grads_close, check_eager_and_replayed, count_collectives, run_workers,
                         tiny_batch, tiny_config)
from mamba_train.model import Mamba2LM, set_recompute
from mamba_train.parallel import init_parallel, merge_state_dicts, parallelize_model, shard_state_dict, validate_layout

SEQ_LEN = 32


@contextlib.contextmanager
def linear_inputs():
    """Whether each input megatron's linears get is contiguous. A transposed view there made
    torch.matmul a batch of one tiny product per token: 3.6x slower steps on an H100."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    seen, originals = [], {cls: cls.forward for cls in (ColumnParallelLinear, RowParallelLinear)}

    def recording(forward):
        def wrapped(self, input_, *args, **kwargs):
            seen.append(input_.is_contiguous())
            return forward(self, input_, *args, **kwargs)
        return wrapped

    for cls, forward in originals.items():
        cls.forward = recording(forward)
    try:
        yield seen
    finally:
        for cls, forward in originals.items():
            cls.forward = forward


def _residual_shapes(log) -> set:
    """Shapes of the (batch, seqlen, d)-like tensors the all-gathers and reduce-scatters were
    given: the residual stream's (the cross-entropy's all-gather is of 2-D rows)."""
    return {shape for name, shapes in log.shapes if name in ("all_gather_into_tensor", "reduce_scatter_tensor")
            for shape in shapes if len(shape) == 3}


def _check_tp(rank, world, ngroups, sequence_parallel, batch, overlap=False):
    tp = world
    cfg = tiny_config(ngroups=ngroups)
    torch.manual_seed(0)
    reference = Mamba2LM(cfg, tp_size=tp)
    dims = init_parallel(validate_layout(cfg, SEQ_LEN, world, tp=tp, sequence_parallel=sequence_parallel,
                                         tp_comm_overlap=overlap))
    model = parallelize_model(copy.deepcopy(reference), dims)
    # documents starting inside the sequence, and one row that is a single document
    input_ids, labels, seq_idx = tiny_batch(cfg, batch, SEQ_LEN, [[5, 20], [], [9], [3, 30]][:batch])
    # with SP, the TP ranks split the batch rows when tp divides them, else the sequence
    split_rows = batch % tp == 0

    vocab = reference.vocab_size // tp
    with torch.no_grad():
        assert_close(model(input_ids, seq_idx), reference(input_ids, seq_idx)[..., rank * vocab:(rank + 1) * vocab],
                     what="logits")

    found_in_place = []
    if model.token_split is not None:   # which gathers found this rank's rows written in place
        find = model.token_split._gathered_base
        model.token_split._gathered_base = lambda local: found_in_place.append(find(local)) or found_in_place[-1]
    with count_collectives() as log, linear_inputs() as contiguous:
        loss = model.loss(input_ids, labels, seq_idx)
    # in_proj's inputs; out_proj's matmul runs inside kernels.mixer_body, which calls only the
    # row-parallel layer's collective (reduce_partial). With SP in_proj gathers its input and
    # multiplies by its weight itself, so megatron's forward runs for neither
    assert len(contiguous) == (0 if sequence_parallel else cfg.n_layer) and all(contiguous), contiguous
    expected_loss = reference.loss(input_ids, labels, seq_idx)
    assert_close(loss.detach(), expected_loss.detach(), what="loss")
    # with tp_comm_overlap and the rows split, the mixer body exchanges the rows of out_proj's
    # product itself (TokenSplit.matmul_parts: the next norm sums the ranks' terms) and in_proj
    # gathers inside its product (gather_matmul)
    fused = sequence_parallel and overlap and split_rows
    assert (model.layers[0].mixer.out_proj.out_scatter() is not None) == fused
    # with the exchange, every block norm but the first (which adds no update) writes its
    # output into this rank's rows of in_proj's gathered tensor (add_rmsnorm's gather_rank)
    assert [base is not None for base in found_in_place] == ([False] + [True] * (cfg.n_layer - 1) if fused else
                                                             [False] * len(found_in_place))
    # forward collectives: one per block (the row-parallel out_proj), plus the embedding's
    # and the cross-entropy's one all-gather (each row's log-sum-exp and label logit per shard)
    n = cfg.n_layer
    if fused:
        # blocks: in_proj all-gathers; out_proj sends each rank its rows of this rank's term
        # (all-to-all: the next norm adds the terms); embedding reduce-scatters, head all-gathers
        assert log.counts() == {"all_gather_into_tensor": n + 1 + 1, "all_to_all_single": n,
                                "reduce_scatter_tensor": 1}, log.calls
    elif sequence_parallel:
        # blocks: in_proj all-gathers, out_proj reduce-scatters; embedding reduce-scatters, head all-gathers
        assert log.counts() == {"all_gather_into_tensor": n + 1 + 1, "reduce_scatter_tensor": n + 1}, log.calls
    else:
        assert log.counts() == {"all_reduce": n + 1, "all_gather_into_tensor": 1}, log.calls
    with count_collectives() as block_log:
        if not sequence_parallel:
            hidden = torch.randn(batch, SEQ_LEN, cfg.d_model)
        else:   # this rank's tokens, under the split the loss's forward chose
            hidden = torch.randn(batch // tp, SEQ_LEN, cfg.d_model) if split_rows else \
                torch.randn(batch, SEQ_LEN // tp, cfg.d_model)
        model.layers[0](hidden, seq_idx=seq_idx)
    if fused:   # out_proj's product, every row, out; this rank's rows of each rank's term, in
        d = cfg.d_model
        assert [shapes for name, shapes in block_log.shapes if name == "all_to_all_single"] == \
            [((tp, batch // tp, SEQ_LEN, d), (batch, SEQ_LEN, d))]
    assert block_log.counts() == ({"all_gather_into_tensor": 1, "all_to_all_single": 1} if fused else
                                  {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1} if sequence_parallel
                                  else {"all_reduce": 1})

    with count_collectives() as backward_log:
        loss.backward()
    if not sequence_parallel:
        # backward: one all-reduce per block (in_proj's input gradient, column-parallel) and one
        # for the head's input; out_proj and the embedding need none
        assert backward_log.counts() == {"all_reduce": n + 1}, backward_log.calls
    elif fused:
        # as below, but in_proj hands each rank its rows of this rank's input-gradient term
        # (all-to-all) where the block norm before it sums them (add_rmsnorm's out_parts): every
        # block but the first, whose norm adds no update
        assert backward_log.counts() == {"all_gather_into_tensor": n + 1, "reduce_scatter_tensor": 1 + 1,
                                         "all_to_all_single": n - 1, "all_reduce": n + 1}, backward_log.calls
    else:
        # per block: out_proj all-gathers its output gradient, in_proj reduce-scatters its input
        # gradient (it kept the gathered input for its weight's gradient: no second gather), the
        # block norm's weight gradient is summed; the head reduce-scatters, the embedding
        # all-gathers, norm_f sums
        assert backward_log.counts() == {"all_gather_into_tensor": n + 1, "reduce_scatter_tensor": n + 1,
                                         "all_reduce": n + 1}, backward_log.calls
    if sequence_parallel:
        # Every gather and scatter, forward and backward, takes the batch-first tensor's rows as
        # they are when tp divides the batch: nothing is transposed to seq-first and copied.
        # Split by the sequence, each one sees the seq-first copy.
        d = cfg.d_model
        expected_shapes = {(batch // tp, SEQ_LEN, d), (batch, SEQ_LEN, d)} if split_rows else \
            {(SEQ_LEN // tp, batch, d), (SEQ_LEN, batch, d)}
        for what, shapes in (("forward", _residual_shapes(log)), ("backward", _residual_shapes(backward_log))):
            assert shapes == expected_shapes, (what, shapes, expected_shapes)
    expected_loss.backward()
    full_grads = {name: p.grad for name, p in reference.named_parameters()}
    grads = shard_state_dict(full_grads, cfg, tp, rank)
    assert_grads_close({name: param.grad for name, param in model.named_parameters()}, grads)

    # checkpoint conversion: every rank's state dict merges back into the TP=1 one, and
    # the TP=1 one shards into exactly this rank's
    shards = [None] * tp
    dist.all_gather_object(shards, {k: v.detach() for k, v in model.state_dict().items()}, group=dims.tp_group)
    merged = merge_state_dicts(shards, cfg)
    assert merged.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(merged[key], value), key
    for key, value in shard_state_dict(reference.state_dict(), cfg, tp, rank).items():
        assert torch.equal(model.state_dict()[key], value), key


def _tp_worker(rank, world, ngroups, uneven_batch):
    _check_tp(rank, world, ngroups, sequence_parallel=False, batch=world)
    # SP over a batch of tp rows (split by rows), then over uneven_batch rows, which tp does not
    # divide (split by the sequence); each with the products fused with their collectives
    # (tp_comm_overlap: here the functions that overlap them on CUDA, running gloo's collectives)
    for overlap in (False, True):
        for batch in (world, uneven_batch):
            _check_tp(rank, world, ngroups, sequence_parallel=True, batch=batch, overlap=overlap)


def _ignored_labels_worker(rank, world):
    # ignored labels, and slices small enough that the loss runs several (each with its own
    # all-gather over the vocabulary shards): the same loss and gradients as one process
    import mamba_train.model.loss as loss_module

    loss_module._SLICE_BYTES = 4 * 7 * 256   # a few rows of fp32 logits a slice: several slices a loss
    cfg = tiny_config(ngroups=2)
    torch.manual_seed(0)
    reference = Mamba2LM(cfg, tp_size=world)
    for sequence_parallel in (False, True):
        dims = init_parallel(validate_layout(cfg, SEQ_LEN, world, tp=world, sequence_parallel=sequence_parallel))
        model = parallelize_model(copy.deepcopy(reference), dims)
        input_ids, labels, seq_idx = tiny_batch(cfg, 2, SEQ_LEN, [[5, 20], []])
        labels = labels.clone()
        labels[0, :9] = -100
        labels[1, -4:] = -100
        loss = model.loss(input_ids, labels, seq_idx)
        expected = reference.loss(input_ids, labels, seq_idx)
        assert_close(loss.detach(), expected.detach(), what="loss")
        loss.backward()
        expected.backward()
        grads = shard_state_dict({name: p.grad for name, p in reference.named_parameters()}, cfg, world, rank)
        assert_grads_close({name: param.grad for name, param in model.named_parameters()}, grads)
        reference.zero_grad(set_to_none=True)


@pytest.mark.distributed
def test_tp2_ignored_labels_and_several_loss_slices_equal_one_process():
    run_workers(_ignored_labels_worker, 2)


@pytest.mark.distributed
def test_tp2_equals_one_process_with_and_without_sequence_parallel_split_by_rows_or_sequence():
    run_workers(_tp_worker, 2, 2, 3)


@pytest.mark.distributed
def test_tp4_with_four_groups_equals_one_process_with_and_without_sequence_parallel_split_by_rows_or_sequence():
    # not 3 rows: their D gradients nearly cancel in some heads (1e-6 of the others), where two
    # fp32 summation orders differ by more than assert_grads_close's per-tensor bound
    run_workers(_tp_worker, 4, 4, 2)


@pytest.mark.gpu
def test_gpu_parallel_model_on_one_nccl_rank_matches_the_plain_model(monkeypatch):
    """On CUDA both models run kernels.mixer_body's Triton Function; the parallel one wraps it
    in megatron's linears and runs the row-parallel collective (one NCCL rank) after it."""
    import socket

    from megatron.core import parallel_state

    from mamba_train.config import ModelConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        cfg = ModelConfig(d_model=32, n_layer=2, d_state=16, headdim=16, ngroups=2, chunk_size=16, vocab_size=64)
        torch.manual_seed(0)
        reference = Mamba2LM(cfg)
        dims = init_parallel(validate_layout(cfg, 64, 1, tp=1))
        model = parallelize_model(copy.deepcopy(reference), dims).cuda()   # sharded on the CPU, as the trainer does
        reference = reference.cuda()
        input_ids, labels, seq_idx = (t.cuda() for t in tiny_batch(cfg, 2, 64, [[5, 40], []]))
        with linear_inputs() as linear_calls:
            loss = model.loss(input_ids, labels, seq_idx)
        # none: over one rank in_proj takes the padded-rows product itself (model/padded_rows.py),
        # and out_proj's matmul is the mixer body's
        assert len(linear_calls) == 0
        expected = reference.loss(input_ids, labels, seq_idx)
        # the same kernels on both sides; the linears' and the losses' own kernels may differ
        assert_close(loss.detach(), expected.detach(), rel=1e-3, what="loss")
        loss.backward()
        expected.backward()
        assert_grads_close({name: p.grad for name, p in model.named_parameters()},
                           {name: p.grad for name, p in reference.named_parameters()}, rel=1e-3, rel_each=2e-2)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _overlap_worker(rank, world):
    from mamba_train.config import ModelConfig
    from mamba_train.train.cuda_graph import capture_graph

    device = torch.device("cuda", rank)
    # real kernels at small sizes; 4 rows, so SP splits them (2 a rank) and the products overlap
    cfg = ModelConfig(d_model=128, n_layer=2, d_state=32, headdim=32, ngroups=2, chunk_size=32, vocab_size=256)
    seq_len, batch = 128, 4
    torch.manual_seed(0)
    reference = Mamba2LM(cfg, tp_size=world)
    models = {}
    for overlap in (False, True):
        dims = init_parallel(validate_layout(cfg, seq_len, world, tp=world, sequence_parallel=True,
                                             tp_comm_overlap=overlap))
        models[overlap] = parallelize_model(copy.deepcopy(reference), dims).to(device)

    def loss_and_grads(model, batch_tensors, amp):
        input_ids, labels, seq_idx = batch_tensors
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            loss = model.loss(input_ids, labels, seq_idx)
        loss.backward()
        return loss.detach().clone(), {name: p.grad.clone() for name, p in model.named_parameters()}

    def batch_on_gpu(seed):
        return [t.to(device) for t in tiny_batch(cfg, batch, seq_len, [[5, 70], [], [33], [64]], seed=seed)]

    # fp32: the overlapped products (the symmetric-memory path) equal the NCCL collectives'
    first = batch_on_gpu(0)
    assert models[True].token_split.overlap and not models[False].token_split.overlap
    loss, grads = loss_and_grads(models[True], first, amp=False)
    expected_loss, expected_grads = loss_and_grads(models[False], first, amp=False)
    assert_close(loss, expected_loss, rel=1e-5, what="fp32 loss")
    assert_grads_close(grads, expected_grads)
    # train.recompute="block": the Triton mixer body and norm rerun under the checkpoint, the
    # update's terms summed before it (the gloo tests reach only the reference path)
    set_recompute(models[True], "block")
    recomputed_loss, recomputed_grads = loss_and_grads(models[True], first, amp=False)
    set_recompute(models[True], "none")
    assert_close(recomputed_loss, loss, rel=1e-6, what="fp32 loss under recompute=block")
    # the SSD's backward sums dt's and D's terms with atomics: bounds as for two summation orders
    assert_grads_close(recomputed_grads, grads)

    # bf16, where the update's gradient is a tensor apart from the residual's: each gather but
    # two finds this rank's rows written in place (add_rmsnorm's gather_rank), forward in_proj's
    # after every block norm but the first (a plain norm), backward out_proj's after every
    # block norm's backward but norm_f's
    found, find = [], models[True].token_split._gathered_base
    models[True].token_split._gathered_base = lambda local: found.append(find(local)) or found[-1]
    loss_and_grads(models[True], first, amp=True)
    del models[True].token_split._gathered_base
    in_place = [False] + [True] * (cfg.n_layer - 1)
    assert [base is not None for base in found] == in_place * 2, "gathers that found their rows in place"

    # bf16, captured in a CUDA graph (the workspace grown before the capture, the barriers and
    # side streams inside it): each replay gives the eager overlapped step's loss and gradients
    def step(s):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = models[True].loss(s["input_ids"], s["labels"], s["seq_idx"])
        loss.backward()
        return loss, {name: p.grad for name, p in models[True].named_parameters()}

    static = dict(zip(("input_ids", "labels", "seq_idx"), batch_on_gpu(1)))
    # captured with the gradients unset: the graph's backward writes them into its own tensors
    graph, (replayed_loss, replayed) = capture_graph(step, static, warmup=2,
                                                     before_capture=lambda: models[True].zero_grad(set_to_none=True))
    for seed in (2, 3):
        fresh = batch_on_gpu(seed)
        eager_loss, eager_grads = loss_and_grads(models[True], fresh, amp=True)
        plain_loss, plain_grads = loss_and_grads(models[False], fresh, amp=True)
        assert_close(eager_loss, plain_loss, rel=1e-2, what="bf16 loss against the NCCL collectives")
        assert_grads_close(eager_grads, plain_grads, rel=2e-2, rel_each=5e-2)
        for key, value in zip(("input_ids", "labels", "seq_idx"), fresh):
            static[key].copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        # the same loss bit for bit; gradients within 4e-7 of each tensor's largest element
        # (measured on 2 H100s), not always bit for bit. Why is not pinned down; the SSD's
        # backward adds its dt, dA and D terms with atomics, whose order may vary between runs
        assert torch.equal(replayed_loss, eager_loss), "the replayed loss differs from eager"
        assert_grads_close(replayed, eager_grads, rel=1e-5, rel_each=1e-5)


@pytest.mark.gpu
@pytest.mark.distributed
def test_gpu_tp2_comm_overlap_equals_nccl_collectives_eager_and_graphed():
    """Two GPUs: SP with in_proj's gather and out_proj's scatter inside their matmuls
    (torch's symmetric memory) gives the losses and gradients of NCCL's collectives, and a CUDA
    graph of the step replays the eager step."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_workers(_overlap_worker, 2, backend="nccl")


def _exchange_worker(rank, world):
    import warnings

    from torch.distributed import _symmetric_memory as symm_mem

    from mamba_train.parallel.symmetric_exchange import SymmetricExchange

    device = torch.device("cuda", rank)
    group = dist.group.WORLD
    rows, seq_len, k, n = 2, 2048, 1024, 1536   # a rank's piece: 8 MiB in bf16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        symm_mem.enable_symm_mem_for_group(group.group_name)
    exchange = SymmetricExchange(group.group_name, rows * seq_len * max(k, n) * 2)
    torch.manual_seed(rank)   # each rank its own weights and data
    w_t = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    n_pairs = 4

    def fresh_inputs():
        return {"local": torch.randn(n_pairs + 1, rows, seq_len, k, device=device, dtype=torch.bfloat16),
                "terms": torch.randn(n_pairs, world * rows, seq_len, k, device=device, dtype=torch.bfloat16)}

    def hold_back(lag):
        # rank 1 falls behind before an exchange: on its current stream (its rows written late:
        # any barrier covers that), or on the side stream that pulls the other ranks' rows (its
        # reads late, while rank 0 runs ahead into the next exchange: the two regions cover that)
        if lag is None or rank != 1:
            return
        stream = torch.cuda.current_stream()
        if lag == "side":
            exchange.side.wait_stream(stream)   # inside a capture, the side stream joins it
            stream = exchange.side
        with torch.cuda.stream(stream):
            torch.cuda._sleep(200_000)

    def exchanged(inputs, lag):
        # gathers and all-to-alls in turn, each on its own data, so that rows read from a
        # region too early or too late show as wrong values; an odd count (a last gather), so
        # that the next sequence starts on the region this one ended on, after the fence
        exchange.fence()
        outs = []
        for i in range(n_pairs):
            hold_back(lag)
            outs.extend(exchange.gather_matmul(inputs["local"][i], w_t))
            hold_back(lag)
            outs.append(exchange.matmul_parts(inputs["terms"][i], w_t))
        hold_back(lag)
        outs.extend(exchange.gather_matmul(inputs["local"][n_pairs], w_t))
        return outs

    def expected(inputs):
        # NCCL's collectives, and the products of the same row pieces (the same matmul shapes)
        outs = []
        for i in range(n_pairs + 1):
            full = torch.empty(world * rows, seq_len, k, device=device, dtype=torch.bfloat16)
            dist.all_gather_into_tensor(full, inputs["local"][i])
            outs += [full, torch.cat([piece @ w_t for piece in full.chunk(world)])]
            if i == n_pairs:
                break
            mine = torch.stack([piece @ w_t for piece in inputs["terms"][i].chunk(world)])
            parts = torch.empty_like(mine)
            dist.all_to_all_single(parts, mine)
            outs.append(parts)
        return outs

    def check(outs, inputs, what):
        # the gathered rows bit for bit; the products within bf16's rounding (cuBLAS may pick
        # another kernel for a slice of a larger output): rows read from the wrong exchange
        # would be off by their whole size
        for j, (got, want) in enumerate(zip(outs, expected(inputs), strict=True)):
            if j % 3 == 0:
                assert torch.equal(got, want), f"{what}: gathered rows {j // 3} differ from NCCL's"
            else:
                assert_close(got.float(), want.float(), rel=1e-2, what=f"{what}: product {j}")

    check_eager_and_replayed(exchanged, check, fresh_inputs, ("main", "side"),
                             describe=lambda lag: f"rank 1 held back on the {lag or 'no'} stream")


@pytest.mark.gpu
@pytest.mark.distributed
def test_gpu_symmetric_exchange_equals_nccl_with_a_lagging_rank_eager_and_replayed():
    """Every GPU of the machine (2 or more): SymmetricExchange's one barrier an exchange (two
    regions in turn) gives NCCL's gathers and all-to-alls, with one rank held back before each
    exchange, eagerly and over replays of a captured CUDA graph."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_workers(_exchange_worker, torch.cuda.device_count(), backend="nccl")
