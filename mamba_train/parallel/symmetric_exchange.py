"""Exchanges over torch's symmetric memory: the products with a TP exchange inside
(SymmetricExchange, parallel.tp_comm_overlap on CUDA), and context parallelism's boundary
states read in place (SymmetricStates, at its class).

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


class AlternatingRegions:
    """A group's symmetric workspace, split in two regions of `region_bytes` (whole 256-byte
    blocks, so that the second region starts as aligned as the first), taken in turn by the
    exchanges of one sequence (module docstring). `purpose` names the user in errors."""

    barrier_timeout_ms = 0   # 0: a barrier waits for ever

    def __init__(self, group_name: str, region_bytes: int, purpose: str):
        from torch.distributed import _symmetric_memory as symm_mem

        self.region_bytes = -(-region_bytes // 256) * 256
        self.workspace = symm_mem.get_symm_mem_workspace(group_name, 2 * self.region_bytes)
        self.rank, self.world = self.workspace.rank, self.workspace.world_size
        self.purpose = purpose
        self._next_region = 0

    def fence(self) -> None:
        """A barrier behind all earlier work of the current stream, and region 0 next."""
        self.workspace.barrier(channel=0, timeout_ms=self.barrier_timeout_ms)
        self._next_region = 0

    def region(self, rank: int, shape, dtype) -> torch.Tensor:
        """`rank`'s buffer in the next region, as a tensor of `shape` in `dtype`."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.region_bytes:
            raise RuntimeError(f"{self.purpose}: a piece of {tuple(shape)} {dtype} ({nbytes} bytes) does not fit the "
                               f"symmetric workspace's {self.region_bytes}-byte region")
        return self.workspace.get_buffer(rank, shape, dtype, self._next_region * self.region_bytes // dtype.itemsize)

    def exchanged(self) -> None:
        """The barrier after this rank's piece is in the region; the next exchange takes the other."""
        self.workspace.barrier(channel=self._next_region, timeout_ms=self.barrier_timeout_ms)
        self._next_region ^= 1


class SymmetricExchange(AlternatingRegions):
    """The TP group's symmetric workspace, split in two regions of `region_bytes`, and the side
    stream that pulls the other ranks' rows. Row pieces are contiguous, of one rank's rows."""

    def __init__(self, group_name: str, region_bytes: int):
        super().__init__(group_name, region_bytes, "tp_comm_overlap")
        self.side = torch.cuda.Stream()

    def _region(self, rank: int, like: torch.Tensor) -> torch.Tensor:
        # like's shape and dtype in the next region of `rank`'s buffer
        return self.region(rank, like.shape, like.dtype)

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
        self.exchanged()
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
            self.exchanged()
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                flat_parts[src].copy_(theirs)
        torch.mm(rows[self.rank], w_t, out=flat_parts[self.rank])
        main.wait_stream(self.side)
        return parts


class SymmetricStates(AlternatingRegions):
    """Context parallelism's boundary states over symmetric memory: the CP group's workspace in
    two regions. Each rank packs its (state, log decay) into its own buffer (`region(rank)`),
    one barrier says every rank's is there (`exchanged`), and the state passing reads every
    rank's in place (kernels.reference.ssd.PeerStates, through `offsets`): no all-gather kernel
    holds SMs beside the SSD's, and nothing is copied between buffers. The regions alternate
    as SymmetricExchange's do, for the same reason: each rank's reading kernel runs on the
    stream before its next barrier. `fence()` starts a sequence of exchanges (each forward)."""

    # ranks that went different ways trap each other's barrier kernels after this long, rather
    # than hanging
    barrier_timeout_ms = 300_000

    def __init__(self, group_name: str, region_bytes: int, device):
        super().__init__(group_name, region_bytes, "context parallelism's boundary states")
        pointers = self.workspace.buffer_ptrs
        if not all(pointers):   # a backend that maps no pointer for a peer it cannot reach directly
            raise RuntimeError("context parallelism: a peer's symmetric buffer is not mapped here")
        gaps = [pointer - pointers[self.rank] for pointer in pointers]   # bytes from this rank's buffer
        if any(gap % 32 for gap in gaps):   # the state passing's loads assume offsets of whole 8 elements
            raise RuntimeError(f"context parallelism: symmetric buffers {gaps} bytes apart, not multiples of 32")
        # each rank's buffer from this rank's, in elements of 2 bytes (the states) and 4 (the
        # log decays): made here, as a CUDA graph's capture could not copy them to the device
        self._offsets = {size: torch.tensor([gap // size for gap in gaps], device=device) for size in (2, 4)}

    def offsets(self, itemsize: int) -> torch.Tensor:
        """(world,) int64 on the device: each rank's buffer from this rank's, in elements of itemsize."""
        return self._offsets[itemsize]
