"""GradientBuckets (the bucketed, backward-overlapped gradient average) on gloo: the same
gradients as `allreduce_gradients`' flat all-reduce, with gradient accumulation, with a
parameter that gets no gradient, and with its `.grad` views kept across zero_grad.

Every rank has its own data. The arithmetic is allreduce_gradients': each element summed over
the ranks by gloo, then divided by the world size. gloo's ring sums an element in an order
that depends on where it falls in the flat tensor, so with 3 ranks a bucket and the one flat
tensor may associate differently ((a + b) + c against a + (b + c)): each order rounds twice by
at most half an ulp of a partial sum, itself at most S = Σ_r |g_r|, so the two sums differ by
at most 2^-22·S, and each divide rounds by half an ulp of its result. The bound per element is
then 2^-22·S/world + 2^-23·|expected| (measured: differences of 2^-32 on elements with S/3 near
2e-3, i.e. about 2^-23·S/3). With 2 ranks a + b is b + a: bit-equal."""

from contextlib import nullcontext

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core", reason="megatron-core is in the [dev] extra")

from distributed import assert_grads_close, count_collectives, run_workers, tiny_batch, tiny_config
from mamba_train.model import Mamba2LM
from mamba_train.parallel import destroy_parallel, init_parallel, validate_layout
from mamba_train.parallel.data_parallel import GradientBuckets, allreduce_gradients

SEQ_LEN = 32
BUCKET_MB = 4 / 1024   # 4 KiB: the tiny model's ~22k parameters fall into several buckets


def _dims(world):
    return init_parallel(validate_layout(tiny_config(), SEQ_LEN, world))   # DP over every rank


def _tiny_model():
    torch.manual_seed(0)   # the same weights on every rank and for the reference
    return Mamba2LM(tiny_config())


def _backward(model, rank, micro=0):
    input_ids, labels, seq_idx = tiny_batch(tiny_config(), 1, SEQ_LEN, [[5 + rank]], seed=10 * rank + micro)
    model.loss(input_ids, labels, seq_idx).backward()


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_equal(actual, expected, world, local_sums=None):
    """Bit-equal with 2 ranks; with 3, within the module docstring's bound."""
    for name, grad in expected.items():
        if world == 2:
            assert torch.equal(actual[name], grad), f"{name}: max diff {(actual[name] - grad).abs().max():.3e}"
        else:
            bound = 2.0**-22 * local_sums[name] / world + 2.0**-23 * grad.abs()
            excess = ((actual[name] - grad).abs() - bound).max()
            assert excess <= 0, f"{name}: beyond the rounding bound by {excess:.3e}"


def _abs_sum_over_ranks(grads, dims):
    sums = {name: grad.abs() for name, grad in grads.items()}
    for value in sums.values():
        torch.distributed.all_reduce(value, group=dims.dp_cp_group)
    return sums


def _check_layout(buckets, model):
    params = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for b in buckets.buckets for p in b.params] == [id(p) for p in params[::-1]], \
        "not in reverse registration order"
    assert len(buckets.buckets) >= 4, f"{len(buckets.buckets)} buckets: expected several"
    for bucket in buckets.buckets:
        assert {p.dtype for p in bucket.params} == {bucket.buffer.dtype}
        assert len(bucket.params) == 1 or bucket.buffer.numel() * bucket.buffer.element_size() <= BUCKET_MB * 2**20
        start = bucket.buffer.data_ptr()
        for param in bucket.params:
            assert param.grad.untyped_storage().data_ptr() == bucket.buffer.untyped_storage().data_ptr()
            assert start <= param.grad.data_ptr() < start + bucket.buffer.numel() * bucket.buffer.element_size()


# ----------------------------------------------------------------------------- (1) one backward


def _equal_worker(rank, world):
    dims = _dims(world)
    reference = _tiny_model()
    _backward(reference, rank)
    local = _grads(reference)
    allreduce_gradients(reference, dims)
    model = _tiny_model()
    buckets = GradientBuckets(model, dims.dp_cp_group, bucket_mb=BUCKET_MB)
    _check_layout(buckets, model)
    with count_collectives() as log:
        _backward(model, rank)
    assert log.counts() == {"all_reduce": len(buckets.buckets)}, log.counts()
    _assert_equal(_grads(model), _grads(reference), world, _abs_sum_over_ranks(local, dims))
    destroy_parallel()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_bucketed_gradients_equal_the_flat_allreduce(world):
    run_workers(_equal_worker, world)


# ----------------------------------------------------------------------------- (2) accumulation


def _accumulation_worker(rank, world):
    dims = _dims(world)
    model = _tiny_model()
    buckets = GradientBuckets(model, dims.dp_cp_group, bucket_mb=BUCKET_MB)
    reference = _tiny_model()
    for step in range(2):   # twice: the second after zero_grad, with `sync` instead of no_sync()
        reference.zero_grad()
        for micro in range(2):
            _backward(reference, rank, 2 * step + micro)   # accumulates locally
        allreduce_gradients(reference, dims)

        buckets.zero_grad()
        with count_collectives() as first:
            if step == 0:
                with buckets.no_sync():
                    _backward(model, rank, 2 * step)
            else:
                buckets.sync = False
                _backward(model, rank, 2 * step)
                buckets.sync = True
        with count_collectives() as last:
            _backward(model, rank, 2 * step + 1)
        assert first.counts() == {}, f"the first micro-batch reduced: {first.counts()}"
        assert last.counts() == {"all_reduce": len(buckets.buckets)}, last.counts()
        assert buckets.sync
        expected = _grads(reference)
        _assert_equal(_grads(model), expected, world)
    destroy_parallel()


@pytest.mark.distributed
def test_gradient_accumulation_reduces_on_the_last_micro_batch_only():
    run_workers(_accumulation_worker, 2)


# ----------------------------------------------------------------------------- (3) no gradient


class _Branchy(nn.Module):
    """`never` gets no gradient on any rank, `sometimes` on rank 1 only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8, bias=False)
        self.never = nn.Linear(8, 16)
        self.sometimes = nn.Linear(8, 8)
        self.last = nn.Linear(8, 8)

    def forward(self, x, rank):
        h = torch.tanh(self.first(x))
        if rank == 1:
            h = h + self.sometimes(h)
        return self.last(h).square().mean()


def _no_gradient_worker(rank, world):
    dims = _dims(world)
    model, reference = _Branchy(), _Branchy()
    # 640 bytes: [last, sometimes], [never], [first] (reverse order; biases padded to 64 bytes).
    # Rank 1 completes the first bucket during its backward and all-reduces it there; rank 0
    # completes only the last one, whose all-reduce must wait for the two before it (at the end
    # of its backward), or the ranks would reduce different buckets together.
    buckets = GradientBuckets(model, dims.dp_cp_group, bucket_mb=640 / 2**20)
    names = {p: n for n, p in model.named_parameters()}
    assert [[names[p] for p in b.params] for b in buckets.buckets] == [
        ["last.bias", "last.weight", "sometimes.bias", "sometimes.weight"], ["never.bias", "never.weight"],
        ["first.weight"]]
    for step in range(2):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * rank + step))
        reference.zero_grad()
        reference(x, rank).backward()
        for p in reference.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        allreduce_gradients(reference, dims)
        if step == 0:
            buckets.zero_grad()
        else:   # the views detached instead, the buffers holding step 0's gradients: the backward
            model.zero_grad(set_to_none=True)   # copies into the views, and zeroes those without
        with count_collectives() as log:
            model(x, rank).backward()
        assert log.counts() == {"all_reduce": 3}, log.counts()
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, dict(reference.named_parameters())[name].grad), f"step {step}: {name}"
        assert model.never.weight.grad.abs().sum() == 0
        assert model.sometimes.weight.grad.abs().sum() > 0   # rank 1's gradient, averaged with rank 0's zeros
    destroy_parallel()


@pytest.mark.distributed
def test_a_parameter_without_gradient_neither_hangs_nor_skips_its_bucket():
    run_workers(_no_gradient_worker, 2)


# ----------------------------------------------------------------------------- (4) zero_grad


def _zero_grad_worker(rank, world):
    dims = _dims(world)
    model = _tiny_model()
    buckets = GradientBuckets(model, dims.dp_cp_group, bucket_mb=BUCKET_MB)
    views = [p.grad for p in model.parameters()]
    _backward(model, rank)
    assert all(p.grad is view for p, view in zip(model.parameters(), views))
    buckets.zero_grad()
    assert all(p.grad is view for p, view in zip(model.parameters(), views)), "zero_grad replaced a view"
    assert all(b.buffer.abs().sum() == 0 for b in buckets.buckets)
    _check_layout(buckets, model)
    # something detaches or replaces the views: zero_grad puts them back
    params = list(model.parameters())
    params[0].grad = None
    params[1].grad = torch.ones_like(params[1])
    model.zero_grad(set_to_none=True)
    buckets.zero_grad()
    assert all(p.grad is view for p, view in zip(params, views))
    assert all(b.buffer.abs().sum() == 0 for b in buckets.buckets)
    # replaced between zero_grad and the backward: the hook copies the gradient into its view
    params[2].grad = torch.zeros_like(params[2])
    _backward(model, rank)
    assert params[2].grad is views[2]
    reference = _tiny_model()
    _backward(reference, rank)
    allreduce_gradients(reference, dims)
    _assert_equal(_grads(model), _grads(reference), world)
    destroy_parallel()


@pytest.mark.distributed
def test_zero_grad_keeps_the_gradients_views_of_the_buckets():
    run_workers(_zero_grad_worker, 2)


def _one_rank_worker(rank, world):
    model, reference = _tiny_model(), _tiny_model()
    buckets = GradientBuckets(model, None)
    assert buckets.buckets == [] and all(p.grad is None for p in model.parameters())
    for micro in range(2):
        with buckets.no_sync() if micro == 0 else nullcontext():
            _backward(model, rank, micro)
        _backward(reference, rank, micro)
    assert all(torch.equal(a, b) for a, b in zip(_grads(model).values(), _grads(reference).values()))
    buckets.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.distributed
def test_a_group_of_one_rank_buckets_nothing():
    run_workers(_one_rank_worker, 1)


# ----------------------------------------------------------------------------- on two GPUs


def _gpu_worker(rank, world):
    # NCCL: AVG on the side stream, eagerly and replayed from a CUDA graph (the bench's use),
    # against the flat all-reduce; the model's Triton kernels may accumulate in any order
    dims = _dims(world)
    device = torch.device("cuda", rank)
    batch = [t.to(device) for t in tiny_batch(tiny_config(), 1, SEQ_LEN, [[5 + rank]], seed=10 * rank)]
    reference = _tiny_model().to(device)
    reference.loss(*batch).backward()
    allreduce_gradients(reference, dims)
    expected = _grads(reference)
    model = _tiny_model().to(device)
    buckets = GradientBuckets(model, dims.dp_cp_group, bucket_mb=BUCKET_MB)

    def forward_backward():
        buckets.zero_grad()
        model.loss(*batch).backward()

    forward_backward()
    torch.cuda.synchronize()
    assert_grads_close(_grads(model), expected)
    side = torch.cuda.Stream()   # warm-up off the default stream, as capture wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward_backward()
    for _ in range(2):   # each replay zeroes, accumulates and reduces again: the same gradients
        graph.replay()
    torch.cuda.synchronize()
    assert_grads_close(_grads(model), expected)
    destroy_parallel()


@pytest.mark.gpu
def test_gpu_bucketed_gradients_on_two_nccl_ranks_eager_and_graphed():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    run_workers(_gpu_worker, 2, backend="nccl")
