"""Tensor parallelism (megatron-core layers on gloo) equals the single-process model."""

import contextlib
import copy

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is in the [dev] extra")
import torch.distributed as dist

from distributed import assert_close, assert_grads_close, count_collectives, run_workers, tiny_batch, tiny_config
from mamba_train.model import Mamba2LM
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


def _check_tp(rank, world, ngroups, sequence_parallel, batch):
    tp = world
    cfg = tiny_config(ngroups=ngroups)
    torch.manual_seed(0)
    reference = Mamba2LM(cfg, tp_size=tp)
    dims = init_parallel(validate_layout(cfg, SEQ_LEN, world, tp=tp, sequence_parallel=sequence_parallel))
    model = parallelize_model(copy.deepcopy(reference), dims)
    # documents starting inside the sequence, and one row that is a single document
    input_ids, labels, seq_idx = tiny_batch(cfg, batch, SEQ_LEN, [[5, 20], [], [9], [3, 30]][:batch])
    # with SP, the TP ranks split the batch rows when tp divides them, else the sequence
    split_rows = batch % tp == 0

    vocab = reference.vocab_size // tp
    with torch.no_grad():
        assert_close(model(input_ids, seq_idx), reference(input_ids, seq_idx)[..., rank * vocab:(rank + 1) * vocab],
                     what="logits")

    with count_collectives() as log, linear_inputs() as contiguous:
        loss = model.loss(input_ids, labels, seq_idx)
    # in_proj's inputs; out_proj's matmul runs inside kernels.mixer_body, which calls only the
    # row-parallel layer's collective (reduce_partial). With SP in_proj gathers its input and
    # multiplies by its weight itself, so megatron's forward runs for neither
    assert len(contiguous) == (0 if sequence_parallel else cfg.n_layer) and all(contiguous), contiguous
    expected_loss = reference.loss(input_ids, labels, seq_idx)
    assert_close(loss.detach(), expected_loss.detach(), what="loss")
    # forward collectives: one per block (the row-parallel out_proj), plus the embedding's
    # and the cross-entropy's one all-gather (each row's log-sum-exp and label logit per shard)
    n = cfg.n_layer
    if sequence_parallel:
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
    assert block_log.counts() == ({"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1} if sequence_parallel
                                  else {"all_reduce": 1})

    with count_collectives() as backward_log:
        loss.backward()
    if not sequence_parallel:
        # backward: one all-reduce per block (in_proj's input gradient, column-parallel) and one
        # for the head's input; out_proj and the embedding need none
        assert backward_log.counts() == {"all_reduce": n + 1}, backward_log.calls
    else:
        # per block: out_proj all-gathers its output gradient, in_proj reduce-scatters its input
        # gradient (it kept the gathered input for its weight's gradient: no second gather), the
        # block norm's weight gradient is summed; the head reduce-scatters, the embedding
        # all-gathers, norm_f sums
        assert backward_log.counts() == {"all_gather_into_tensor": n + 1, "reduce_scatter_tensor": n + 1,
                                         "all_reduce": n + 1}, backward_log.calls
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
    # divide (split by the sequence)
    for batch in (world, uneven_batch):
        _check_tp(rank, world, ngroups, sequence_parallel=True, batch=batch)


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
