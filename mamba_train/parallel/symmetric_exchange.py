"""Exchanges over torch's symmetric memory: the products with a TP exchange inside
(SymmetricExchange, parallel.tp_comm_overlap on CUDA), and context parallelism's boundary
states passed rank to rank (StateRelay, at its class).

The TP products: each rank's buffer is mapped into every other rank's address space, so a
rank pulls another's rows with an NVLink copy (copy engines, no SMs) while it multiplies others.

torch's own ops (`fused_all_gather_matmul`, and `_pipelined_produce_and_all2all` under
`fused_matmul_reduce_scatter`) are written to be safe alone: each makes 3 or 4 barriers across
the group (its buffer free, its rows written, read, free again), 14 a block at tp 2, 3.8 ms of a
111 ms step at 1.3b on 2 H100s. Here every exchange makes one: a rank writes its rows into one
of two regions of the workspace, the barrier says every rank's rows are there, and the ranks
pull what they need. Consecutive exchanges alternate regions, so when an exchange writes a
region, the barrier of the exchange before it has already seen every rank finish reading that
region's previous rows (their reads join the stream before their next barrier).

That holds along one sequence of exchanges that every rank runs in the same order. `fence()`
starts a sequence: a barrier behind everything before it, and region 0 next. The model calls it
at the start of each forward, so a CUDA graph's replay (whose exchanges were captured from one
starting region) never follows an exchange of the same region without a barrier between.
"""

from __future__ import annotations

import math

import torch


class SymmetricExchange:
    """The TP group's symmetric workspace, split in two regions of `region_bytes`, and the side
    stream that pulls the other ranks' rows. Row pieces are contiguous, of one rank's rows."""

    def __init__(self, group_name: str, region_bytes: int):
        from torch.distributed import _symmetric_memory as symm_mem

        self.workspace = symm_mem.get_symm_mem_workspace(group_name, 2 * region_bytes)
        self.region_bytes = region_bytes
        self.rank, self.world = self.workspace.rank, self.workspace.world_size
        self.side = torch.cuda.Stream()
        self._next_region = 0

    def fence(self) -> None:
        """A barrier behind all earlier work of the current stream, and region 0 next."""
        self.workspace.barrier(channel=0)
        self._next_region = 0

    def _region(self, rank: int, like: torch.Tensor) -> torch.Tensor:
        # like's shape and dtype in the next region of `rank`'s buffer
        nbytes = like.numel() * like.element_size()
        if nbytes > self.region_bytes:
            raise RuntimeError(f"tp_comm_overlap: a piece of {tuple(like.shape)} {like.dtype} ({nbytes} bytes) does "
                               f"not fit the symmetric workspace's {self.region_bytes}-byte region")
        offset = self._next_region * self.region_bytes // like.element_size()
        return self.workspace.get_buffer(rank, like.shape, like.dtype, offset)

    def _exchanged(self) -> None:
        # the barrier after this rank's rows are in the region; the next exchange takes the other
        self.workspace.barrier(channel=self._next_region)
        self._next_region ^= 1

    # autocast off in both products: the operands come in the dtype the collectives keep
    @torch.autocast("cuda", enabled=False)
    def gather_matmul(self, local: torch.Tensor, w_t: torch.Tensor,
                      full: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """local: this rank's rows (b/tp, L, k), contiguous; w_t: (k, n) → (every rank's rows
        (b, L, k), those rows @ w_t (b, L, n)). `full`: the tensor to gather into, if local is
        already its rows of this rank (kernels.reference.norm.gathered_rows: not copied again).
        The side stream copies the others' rows in while this rank's are multiplied; their
        products follow on this stream. The products never run side by side: level with
        torch's two streams of them (2 H100s), and no question of which the GPU starts first."""
        in_place = full is not None
        if not in_place:
            full = local.new_empty((local.shape[0] * self.world, *local.shape[1:]))
        out = local.new_empty((*full.shape[:-1], w_t.shape[1]))
        full_rows, out_rows = full.chunk(self.world), out.chunk(self.world)
        k, n = local.shape[-1], w_t.shape[1]
        main = torch.cuda.current_stream()
        pieces = [self._region(r, local) for r in range(self.world)]
        pieces[self.rank].copy_(local)
        self._exchanged()
        self.side.wait_stream(main)
        others = [(self.rank + step) % self.world for step in range(1, self.world)]
        with torch.cuda.stream(self.side):
            for src in others:
                full_rows[src].copy_(pieces[src])
        torch.mm(local.view(-1, k), w_t, out=out_rows[self.rank].view(-1, n))
        if not in_place:
            full_rows[self.rank].copy_(local)
        main.wait_stream(self.side)
        for src in others:
            torch.mm(full_rows[src].view(-1, k), w_t, out=out_rows[src].view(-1, n))
        return full, out

    @torch.autocast("cuda", enabled=False)
    def matmul_parts(self, a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        """a: (b, L, k), this rank's term of a sum over the group; w_t: (k, n) → every rank's
        term of this rank's rows, (tp, b/tp, L, n). A step per other rank: its rows of this
        rank's term are computed into the region, and after the barrier the side stream pulls
        this rank's rows of that rank's term while the next step (then this rank's own term of
        its rows) is computed."""
        rows = a.flatten(0, -2).chunk(self.world)
        parts = a.new_empty((self.world, a.shape[0] // self.world, *a.shape[1:-1], w_t.shape[1]))
        flat_parts = parts.view(self.world, -1, w_t.shape[1])
        main = torch.cuda.current_stream()
        for step in range(1, self.world):
            dst, src = (self.rank + step) % self.world, (self.rank - step) % self.world
            mine, theirs = self._region(self.rank, flat_parts[0]), self._region(src, flat_parts[0])
            torch.mm(rows[dst], w_t, out=mine)
            if step > 1:   # this rank has pulled the last step's rows: its barrier says so
                main.wait_stream(self.side)
            self._exchanged()
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                flat_parts[src].copy_(theirs)
        torch.mm(rows[self.rank], w_t, out=flat_parts[self.rank])
        main.wait_stream(self.side)
        return parts


class StateRelay:
    """Context parallelism's boundary states passed rank to rank over symmetric memory, one way
    a pass: forward, the final state of piece r is the state entering piece r+1; backward, the
    gradient of piece r+1's initial state is that of piece r's final state. A rank's state
    passing writes what it sends into a slot of its own buffer, and the receiver's state passing
    reads it there in place (no copy, no collective); signals say a slot is ready, then free again.

    Why a relay and not an exchange among all ranks: the pieces' states form a chain, each
    waiting only on the rank before it in the pass's direction, which never waits on it, and
    each rank runs its state passing once, from the true initial state (an exchange of states
    run from zero needs a second pass over the chunks to add it in).

    Each direction has `slots` slots a rank, taken in turn. Every rank runs the same sequence of
    passes, so the n-th send to a neighbour and its n-th receive name the same slot. A send waits
    until the receiver freed the slot (its reading kernel has run), then its kernel writes, then
    it signals ready; a receive waits for ready, its kernel reads, and it signals free. torch's
    signals are flags (a second put waits until the first is taken), so after any whole sequence
    every slot is free and none ready again: what a CUDA graph captured replays from that state.

    One relay a group and process (`for_group`): the group's workspace, its slots and their
    signals are one, so every ContextParallel of the group shares its layout and counters."""

    FORWARD, BACKWARD = 0, 1
    slots = 4
    # 0: a wait spins until its signal comes. A rank that never sends leaves the next NCCL
    # collective behind the spinning kernel unfinished, and NCCL's watchdog ends the job after
    # parallel.timeout_minutes, the one timeout for every collective (a trap here would end
    # the CUDA context with no word of which collective waited)
    timeout_ms = 0
    _first_channel = 2   # channels 0 and 1 reserved for the workspace's barriers
    _by_group: dict = {}

    @classmethod
    def for_group(cls, group_name: str, slot_bytes: int) -> "StateRelay":
        """The group's relay, made or grown to slots of at least slot_bytes: collective (every
        rank of the group at the same pass), eagerly (not under a CUDA graph's capture)."""
        relay = cls._by_group.get(group_name)
        if relay is None:
            relay = cls._by_group[group_name] = cls(group_name)
        if slot_bytes > relay.slot_bytes:
            relay.grow(slot_bytes)
        return relay

    def __init__(self, group_name: str):
        self.group_name, self.slot_bytes = group_name, 0
        self.captured = False   # whether a CUDA graph holds the slots' addresses: they may not move then
        self._passes = {"send": [0, 0], "receive": [0, 0]}   # per half and direction: passes ended
        self._passing = [set(), set()]   # per direction, "send" / "receive" between their two halves
        self._marked = None   # torch's workspace tensor whose slots this relay marked free

    def grow(self, slot_bytes: int) -> None:
        """Slots of at least slot_bytes (whole 256-byte blocks). Collective, between passes."""
        from torch.distributed import _symmetric_memory as symm_mem

        if self.captured:
            raise RuntimeError("context parallelism: the symmetric workspace for the boundary states cannot grow "
                               "under a CUDA graph captured before; run an eager forward and backward of the "
                               "largest batch first")
        assert not any(self._passing), "a relay grows between passes"
        self.slot_bytes = -(-slot_bytes // 256) * 256
        self.workspace = symm_mem.get_symm_mem_workspace(self.group_name, 2 * self.slots * self.slot_bytes)
        self.rank, self.world = self.workspace.rank, self.workspace.world_size
        channels = self._channel(self.BACKWARD, 1, self.slots - 1) + 1
        if channels * self.world * 4 > symm_mem.get_signal_pad_size():
            raise RuntimeError(f"context parallelism: {channels} signal channels at cp {self.world} do not fit the "
                               f"symmetric signal pad's {symm_mem.get_signal_pad_size()} bytes")
        # torch keeps one workspace a group, and makes a new one (signals cleared) only when asked
        # for more than the last was made for; its handle is made anew on every call, so the
        # tensor in torch's registry is what tells a new workspace from the old
        tensor = symm_mem._group_name_to_workspace_tensor[self.group_name]
        if self._marked is not tensor:
            self._marked = tensor
            for direction in (self.FORWARD, self.BACKWARD):   # every slot starts free
                sender = self._neighbour(direction, receiving=True)
                if sender is not None:
                    for slot in range(self.slots):
                        self.workspace.put_signal(sender, self._channel(direction, 1, slot), self.timeout_ms)
        else:   # the slots move within the same memory: every rank's earlier reads end first
            self.workspace.barrier(channel=0, timeout_ms=self.timeout_ms)

    def _take(self, direction: int, receiving: bool, shape, dtype) -> torch.Tensor | None:
        # the first half of a pass: wait until this pass's slot is ready (receiving) or free
        # (sending), then hand out the slot, in the sender's buffer
        peer, half = self._neighbour(direction, receiving), "receive" if receiving else "send"
        if peer is None:
            return None
        # a pass's counter moves at its end: a second start before it would name the same slot
        assert half not in self._passing[direction], f"a relay pass's {half} started twice"
        slot = self._passes[half][direction] % self.slots
        self.workspace.wait_signal(peer, self._channel(direction, int(not receiving), slot), self.timeout_ms)
        self._passing[direction].add(half)
        return self._slot(peer if receiving else self.rank, direction, slot, shape, dtype)

    def _give(self, direction: int, receiving: bool) -> None:
        # the second half: the slot is free (read) or ready (written) for the peer
        peer, half = self._neighbour(direction, receiving), "receive" if receiving else "send"
        if peer is None:
            return
        assert half in self._passing[direction], f"a relay pass's {half} ended without a start"
        self._passing[direction].remove(half)
        slot = self._passes[half][direction] % self.slots
        self.workspace.put_signal(peer, self._channel(direction, int(receiving), slot), self.timeout_ms)
        self._passes[half][direction] += 1

    def _channel(self, direction: int, free: int, slot: int) -> int:
        return self._first_channel + (2 * direction + free) * self.slots + slot

    def _neighbour(self, direction: int, receiving: bool) -> int | None:
        # the rank this one receives from (receiving) or sends to in `direction`; None at an end
        step = 1 if direction == self.FORWARD else -1
        peer = self.rank - step if receiving else self.rank + step
        return peer if 0 <= peer < self.world else None

    def _slot(self, rank: int, direction: int, slot: int, shape, dtype) -> torch.Tensor:
        assert math.prod(shape) * dtype.itemsize <= self.slot_bytes, "a boundary state larger than the relay's slots"
        return self.workspace.get_buffer(rank, shape, dtype,
                                         (direction * self.slots + slot) * self.slot_bytes // dtype.itemsize)

    def receive(self, direction: int, shape, dtype) -> torch.Tensor | None:
        """The neighbour's state for this pass, in its buffer, once it is there (the current
        stream waits); None where no rank sends to this one. Call `read` after its reader."""
        return self._take(direction, True, shape, dtype)

    def read(self, direction: int) -> None:
        """After the kernel that read `receive`'s state: its slot is free for the sender again."""
        self._give(direction, True)

    def outgoing(self, direction: int, shape, dtype) -> torch.Tensor | None:
        """This rank's next slot for `direction`, once its receiver has read what it held last
        (the current stream waits), for a kernel to write the state into; None where no rank
        receives from this one. Call `sent` after the writer."""
        return self._take(direction, False, shape, dtype)

    def sent(self, direction: int) -> None:
        """After the kernel that wrote `outgoing`'s slot: the receiver may read it."""
        self._give(direction, False)
