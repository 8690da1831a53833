"""StateRelay's protocol (mamba_train/parallel/symmetric_exchange.py) without a GPU: two relays,
ranks 0 and 1, over a stand-in for torch's symmetric-memory workspace that keeps each rank's
buffer and signal pad in host tensors and flags as torch's kernels do (a put sets a flag and
would spin while it is set; a wait clears it and would spin while it is clear). Here a spin
raises `WouldWait`, so a test can say which step of a pass must wait for the other rank. The
GPU test (tests/test_parallel_cp.py, test_gpu_state_relay_...) runs the real one across two
processes."""

import pytest
import torch

from mamba_train.parallel.symmetric_exchange import StateRelay

FORWARD, BACKWARD = StateRelay.FORWARD, StateRelay.BACKWARD
SHAPE = (2, 3, 4, 8)


class WouldWait(Exception):
    """A put or wait that would spin on the GPU until the other rank acts."""


class Fabric:
    """Two ranks' buffers and signal pads (flags in (world · channel + source rank) order)."""

    def __init__(self, world=2, nbytes=1 << 16, pad_flags=512):
        self.world = world
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)]
        self.pads = [[0] * pad_flags for _ in range(world)]
        self.tensor = torch.empty(0)   # stands for torch's workspace tensor of the group
        self.barriers = 0

    def workspace(self, rank):
        fabric = self

        class Workspace:
            world_size = fabric.world

            def put_signal(self, dst_rank, channel, timeout_ms):
                slot = fabric.world * channel + rank
                if fabric.pads[dst_rank][slot]:
                    raise WouldWait(f"rank {rank}: put to {dst_rank} on channel {channel}, flag still set")
                fabric.pads[dst_rank][slot] = 1

            def wait_signal(self, src_rank, channel, timeout_ms):
                slot = fabric.world * channel + src_rank
                if not fabric.pads[rank][slot]:
                    raise WouldWait(f"rank {rank}: wait for {src_rank} on channel {channel}, flag clear")
                fabric.pads[rank][slot] = 0

            def barrier(self, channel, timeout_ms):   # one process plays both ranks: counted only
                fabric.barriers += 1

            def get_buffer(self, owner, shape, dtype, storage_offset=0):
                flat = fabric.buffers[owner].view(dtype)
                return flat[storage_offset:storage_offset + torch.Size(shape).numel()].view(shape)

        Workspace.rank = rank
        return Workspace()


@pytest.fixture
def relays(monkeypatch):
    """(fabric, [relay of rank 0, relay of rank 1]): each rank's process has its own registry of
    relays, so each rank's relay here gets a group name of its own."""
    from torch.distributed import _symmetric_memory as symm_mem

    fabric = Fabric()
    monkeypatch.setattr(symm_mem, "get_symm_mem_workspace", lambda name, nbytes: fabric.workspace(int(name[-1])))
    monkeypatch.setattr(symm_mem, "get_signal_pad_size", lambda: 4 * len(fabric.pads[0]))
    monkeypatch.setattr(symm_mem, "_group_name_to_workspace_tensor", {f"cp/{r}": fabric.tensor for r in range(2)})
    monkeypatch.setattr(StateRelay, "_by_group", {})
    state_bytes = torch.Size(SHAPE).numel() * 2
    return fabric, [StateRelay.for_group(f"cp/{r}", state_bytes) for r in range(2)]


def send(relay, direction, value):
    slot = relay.outgoing(direction, SHAPE, torch.bfloat16)
    slot.fill_(value)
    relay.sent(direction)


def receive(relay, direction):
    state = relay.receive(direction, SHAPE, torch.bfloat16)
    value = state.clone()
    relay.read(direction)
    return value


def test_a_relay_passes_each_state_to_its_neighbour_and_ends_where_it_started(relays):
    fabric, (first, second) = relays
    start = [list(pad) for pad in fabric.pads]
    # at the ends of the chain there is nothing to receive or send
    assert first.receive(FORWARD, SHAPE, torch.bfloat16) is None
    assert first.outgoing(BACKWARD, SHAPE, torch.bfloat16) is None
    assert second.outgoing(FORWARD, SHAPE, torch.bfloat16) is None
    for step in range(3 * StateRelay.slots):   # every slot several times, forward then backward
        send(first, FORWARD, step)
        assert torch.equal(receive(second, FORWARD), torch.full(SHAPE, float(step), dtype=torch.bfloat16))
        send(second, BACKWARD, -step)
        assert torch.equal(receive(first, BACKWARD), torch.full(SHAPE, float(-step), dtype=torch.bfloat16))
    # every slot free and none ready again: what a CUDA graph's replay starts from
    assert fabric.pads == start
    assert sum(start[0]) == sum(start[1]) == StateRelay.slots


def test_a_writer_runs_ahead_by_the_slots_and_no_further(relays):
    _, (first, second) = relays
    with pytest.raises(WouldWait, match="wait for 0"):
        second.receive(FORWARD, SHAPE, torch.bfloat16)   # nothing sent yet
    for step in range(StateRelay.slots):
        send(first, FORWARD, step)
    with pytest.raises(WouldWait, match="wait for 1"):   # every slot holds a state not yet read
        first.outgoing(FORWARD, SHAPE, torch.bfloat16)
    # the oldest first
    assert torch.equal(receive(second, FORWARD), torch.zeros(SHAPE, dtype=torch.bfloat16))
    send(first, FORWARD, StateRelay.slots)   # into the slot just read
    for step in range(1, StateRelay.slots + 1):
        assert torch.equal(receive(second, FORWARD), torch.full(SHAPE, float(step), dtype=torch.bfloat16))


def test_a_slot_is_free_only_after_its_reader_is_done(relays):
    _, (first, second) = relays
    for step in range(StateRelay.slots):
        send(first, FORWARD, step)
    second.receive(FORWARD, SHAPE, torch.bfloat16)   # being read: read() not called yet
    with pytest.raises(WouldWait):
        first.outgoing(FORWARD, SHAPE, torch.bfloat16)
    second.read(FORWARD)
    first.outgoing(FORWARD, SHAPE, torch.bfloat16)


def test_a_pass_cannot_start_twice_nor_the_relay_grow_inside_one(relays):
    _, (first, _) = relays
    first.outgoing(FORWARD, SHAPE, torch.bfloat16)
    with pytest.raises(AssertionError, match="started twice"):
        first.outgoing(FORWARD, SHAPE, torch.bfloat16)
    with pytest.raises(AssertionError, match="between passes"):
        first.grow(2 * first.slot_bytes)
    first.sent(FORWARD)
    with pytest.raises(AssertionError, match="without a start"):
        first.sent(FORWARD)


def test_a_group_has_one_relay_whose_slots_move_only_behind_a_barrier(relays, monkeypatch):
    from torch.distributed import _symmetric_memory as symm_mem

    fabric, (first, second) = relays
    send(first, FORWARD, 1.0)
    receive(second, FORWARD)
    # every ContextParallel of the group gets its relay: one layout of slots, one count of passes
    assert StateRelay.for_group("cp/0", 64) is first and first.slot_bytes >= torch.Size(SHAPE).numel() * 2
    # larger slots in the same workspace (torch's was made large enough): moved behind a barrier,
    # every slot still free
    for relay in (first, second):
        StateRelay.for_group(relay.group_name, 2 * relay.slot_bytes)
    assert fabric.barriers == 2
    send(first, FORWARD, 2.0)
    assert torch.equal(receive(second, FORWARD), torch.full(SHAPE, 2.0, dtype=torch.bfloat16))
    # larger still: torch makes a new workspace (its signals cleared), whose slots are marked anew
    fresh = Fabric()
    monkeypatch.setattr(symm_mem, "get_symm_mem_workspace", lambda name, nbytes: fresh.workspace(int(name[-1])))
    monkeypatch.setattr(symm_mem, "_group_name_to_workspace_tensor", {f"cp/{r}": fresh.tensor for r in range(2)})
    for relay in (first, second):
        relay.grow(4 * relay.slot_bytes)
    assert fresh.barriers == 0
    send(first, FORWARD, 3.0)
    assert torch.equal(receive(second, FORWARD), torch.full(SHAPE, 3.0, dtype=torch.bfloat16))
    first.captured = True   # a CUDA graph holds the slots' addresses
    with pytest.raises(RuntimeError, match="cannot grow"):
        first.grow(8 * first.slot_bytes)
