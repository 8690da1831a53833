"""Sharded checkpoints of a parallel run (DESIGN §6): every rank writes its own files, in
parallel, into one directory per step; the manifest, `latest` and retention are those of
the one-process checkpoints (store.py).

    <root>/step_00000100/
      model-tp00.safetensors       TP rank 0's weights as the model computes with them (fp32,
      model-tp01.safetensors       or bf16 under DeepSpeed bf16); written by the first DP×CP
                                   rank of each TP rank: the others hold replicas
      optim-rank00000.safetensors  one per rank: its ZeRO partition cut at parameter borders,
      optim-rank00001.safetensors  `<param>/master` (fp32 master weights), `<param>/exp_avg`,
      …                            `<param>/exp_avg_sq`, and in the metadata each fragment's
                                   place in its flattened TP-shard parameter
      trainer_state.json           step, consumed samples, every rank's RNG states, the
                                   resolved config, the layout (tp, cp, dp, vocab_tp, …)
      manifest.json                every file's size and SHA-256, written last

Resume reads per parameter: the fragments of a TP shard are joined by their offsets (so
any DP × CP size reads any other), and when the TP size differs the shards are merged to
the TP=1 tensor and cut again for the new layout (`merge_tensor` / `shard_tensor`). Adam's
moments are elementwise, so they move exactly like their parameter, and resume is exact
on any layout up to the rounding of the forward/backward itself. A one-process checkpoint
reads as a TP=1 one, so runs move freely between one process and many.

With `checkpoint.async_save` the ranks copy their state to CPU (into their writer's
reused, pinned staging buffers: checkpoint/writer.py) and write it from a background
thread each; they meet through marker files in the temporary directory, not collectives
(those belong to the training thread), and rank 0's thread publishes once all markers are
there. The next save, or the end of training, makes every rank agree.

Loading never runs code from a file: safetensors, JSON, and for one-process optimizer
state `torch.load(weights_only=True)`; DeepSpeed's own loader (`torch.load` of pickles)
is not used.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from mamba_train.checkpoint.store import (CheckpointError, checkpoint_name, describe_file, is_sharded,
                                          publish_checkpoint, read_trainer_state, verify_checkpoint, write_json)
from mamba_train.checkpoint.writer import mark_rank_done, wait_for_ranks
from mamba_train.config import ModelConfig

MODEL_FILE = "model-tp{:02d}.safetensors"
OPTIM_FILE = "optim-rank{:05d}.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's elementwise state


# ----------------------------------------------------------------------------- save


def save_sharded(root: str | Path, step: int, engine, dims, trainer_state: dict, rng_state: dict,
                 keep_last: int = 3, keep_every: int = 0, writer=None, timeout_s: float = 1800.0) -> Path:
    """Every rank of the default group calls this at the same step. `trainer_state` is rank
    0's (the same on all ranks); `rng_state` is this rank's. Returns the checkpoint path.

    With a background `CheckpointWriter` (writer.py) only the copy of this rank's state to
    CPU blocks: each rank's thread writes its files and then a marker with their hashes,
    and rank 0's thread, once every rank's marker is there, writes the trainer state and
    the manifest and renames (no collective runs outside the training thread). Rank 0 waits
    at most `timeout_s` for the markers; the next save, or `wait_together` at the end,
    makes every rank agree on the outcome."""
    group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    root = Path(root)
    name = checkpoint_name(step)
    tmp = root / f".tmp-{name}"  # one name for all ranks: rank 0 makes it
    background = writer is not None and writer.background
    snapshot = None  # taken in prepare(): a failure there (e.g. pinning host memory) stops every rank

    def prepare():
        nonlocal snapshot
        if writer is not None:
            writer.wait()  # the previous save first: its error surfaces here, on every rank
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a save that died
            tmp.mkdir()
        snapshot = _snapshot_shard(engine, dims, writer if background else None)

    _on_every_rank(group, prepare)
    layout = {"tp": dims.layout.tp, "cp": dims.layout.cp, "dp": dims.layout.dp,
              "sequence_parallel": dims.layout.sequence_parallel, "world_size": world}

    def publish(every_rank: list) -> None:  # [(files, rng state)] by rank
        write_json(tmp / "trainer_state.json", dict(trainer_state, rng=[rng for _, rng in every_rank], layout=layout))
        files = {file: description for described, _ in every_rank for file, description in described.items()}
        files["trainer_state.json"] = describe_file(tmp / "trainer_state.json")
        publish_checkpoint(tmp, root, step, files, keep_last, keep_every)

    def write_together():  # in the training thread: the ranks agree after each phase
        every_rank = _on_every_rank(group, lambda: _write_shard(snapshot, tmp, rank), share=rng_state)
        _on_every_rank(group, (lambda: publish(every_rank)) if rank == 0 else None)

    def write_in_background():  # in this rank's writer thread: markers instead of collectives
        try:
            files = _write_shard(snapshot, tmp, rank)
        except Exception as err:
            mark_rank_done(tmp, rank, {"error": f"{type(err).__name__}: {err}"})  # rank 0 stops waiting
            raise
        mark_rank_done(tmp, rank, {"files": files, "rng": rng_state})
        if rank == 0:
            every_rank = wait_for_ranks(tmp, world, timeout_s, what=f"saving {name}")
            publish([(marker["files"], marker["rng"]) for marker in every_rank])

    if writer is None:
        write_together()
    else:
        writer.submit(name, write_in_background if background else write_together)
    return root / name


def wait_together(writer, group=None) -> None:
    """Every rank waits for its background save; all raise if it failed on any rank."""
    _on_every_rank(group or dist.group.WORLD, writer.wait)


@dataclass
class _ShardSnapshot:
    """What one rank writes, on CPU: its ZeRO partition and, on the first DP×CP rank of a
    TP rank, that TP rank's weights."""
    tp_rank: int
    optimizer: dict[str, torch.Tensor]
    optimizer_metadata: dict[str, str]
    weights: dict[str, torch.Tensor] | None


def _snapshot_shard(engine, dims, background_writer) -> _ShardSnapshot:
    """This rank's part of the checkpoint on CPU; with a `background_writer`, copied into its
    staging buffers (the write in flight is over: `save_sharded` waited for it)."""
    tensors, metadata = _optimizer_shard(engine, dims.tp_rank)
    weights = engine.module.state_dict() if dims.dp_rank == 0 and dims.cp_rank == 0 else None
    if background_writer is not None:
        # a background write must not see the updates of the steps that train meanwhile
        snapshot = background_writer.snapshot({"optimizer": tensors, "weights": weights})
        tensors, weights = snapshot["optimizer"], snapshot["weights"]
    else:
        # the fragments are views of one flat partition: safetensors wants tensors of their own
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
        if weights is not None:
            weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    return _ShardSnapshot(dims.tp_rank, tensors, metadata, weights)


def _write_shard(snapshot: _ShardSnapshot, tmp: Path, rank: int) -> dict[str, dict]:
    """This rank's files in `tmp`; returns their names, sizes and SHA-256 (each rank hashes its own)."""
    written = [tmp / OPTIM_FILE.format(rank)]
    save_file(snapshot.optimizer, written[0], metadata=snapshot.optimizer_metadata)
    if snapshot.weights is not None:
        written.append(tmp / MODEL_FILE.format(snapshot.tp_rank))
        save_file(snapshot.weights, written[-1], metadata={"tp_rank": str(snapshot.tp_rank)})
    return {file.name: describe_file(file) for file in written}


def _optimizer_shard(engine, tp_rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This rank's ZeRO partition as tensors (views of the live fp32 master weights and Adam
    moments, on their device) and the safetensors metadata."""
    tensors, fragments, adam_steps = {}, {}, set()
    for name, param, fragment, state in _zero_fragments(engine):
        lp = fragment.lp_fragment_address
        fragments[name] = [lp.start, lp.numel, list(param.shape)]
        tensors[f"{name}/master"] = fragment.hp_fragment.detach()
        for key in MOMENTS:
            moment = _narrow_state(state, key, fragment)
            tensors[f"{name}/{key}"] = moment if moment is not None else torch.zeros(lp.numel)
        adam_steps.add(int(state["step"]) if "step" in state else 0)
    if len(adam_steps) > 1:
        raise CheckpointError(f"rank {dist.get_rank()}: parameter groups disagree on Adam's step count "
                              f"{sorted(adam_steps)}")
    metadata = {"tp_rank": str(tp_rank), "adam_step": str(adam_steps.pop() if adam_steps else 0),
                "fragments": json.dumps(fragments)}
    return tensors, metadata


def _on_every_rank(group, work, share=None) -> list:
    """Run `work` (or nothing) here, then agree: if it failed on any rank, every rank raises
    (no rank is left waiting in a later collective). Returns every rank's (result, share)."""
    result, error = None, None
    try:
        result = work() if work is not None else None
    except Exception as err:  # re-raised below, on this rank and all others
        error = err
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (result, share, None if error is None else f"{type(error).__name__}: {error}"),
                           group=group)
    failures = [(rank, message) for rank, (_, _, message) in enumerate(gathered) if message is not None]
    if failures:
        rank, message = failures[0]
        raise CheckpointError(f"saving a checkpoint failed on rank {rank}: {message}") from error
    return [(result, share) for result, share, _ in gathered]


# ----------------------------------------------------------------------------- ZeRO partitions


def _zero_fragments(engine):
    """(name, parameter, fragment, Adam state) for every parameter with a piece in this rank's
    ZeRO-1/2 partition. DeepSpeed links each model parameter to its piece of the flat fp32
    partition (`_hp_mapping`: offsets in the flattened parameter and in the partition); the
    torch AdamW under it keeps one state per partition (its group's only parameter)."""
    adam = getattr(engine.optimizer, "optimizer", None)
    params = list(engine.module.named_parameters())
    if adam is None or not all(hasattr(param, "_hp_mapping") for _, param in params) \
            or any(len(group["params"]) != 1 for group in adam.param_groups):
        raise CheckpointError(f"sharded checkpoints need a DeepSpeed ZeRO stage 1 or 2 optimizer (one flat fp32 "
                              f"partition per parameter group), found {type(engine.optimizer).__name__}")
    for name, param in params:
        fragment = param._hp_mapping
        if fragment is not None:
            partition = adam.param_groups[fragment.param_group_index]["params"][0]
            yield name, param, fragment, adam.state.setdefault(partition, {})


def _narrow_state(state: dict, key: str, fragment) -> torch.Tensor | None:
    if key not in state:
        return None
    hp = fragment.hp_fragment_address
    return state[key].narrow(0, hp.start, hp.numel)


def _create_adam_state(engine, adam_step: int) -> None:
    """The state torch's AdamW would hold after `adam_step` steps, zero-filled, so that the
    loaded moments can be written into it before the first step (AdamW creates its state
    lazily, and DeepSpeed links its views to it only after a step)."""
    adam = engine.optimizer.optimizer
    for group in adam.param_groups:
        partition = group["params"][0]
        on_device = group.get("fused") or group.get("capturable")  # where torch keeps `step`
        adam.state[partition] = {
            "step": torch.tensor(float(adam_step), dtype=torch.float32,
                                 device=partition.device if on_device else "cpu"),
            **{key: torch.zeros_like(partition, memory_format=torch.preserve_format) for key in MOMENTS}}


# ----------------------------------------------------------------------------- load


class CheckpointReader:
    """Tensors of a checkpoint, sharded or one-process, for any TP layout: `tensor(name,
    kind, tp, rank)` with kind "master" (fp32 weights), "weight" (as the model held them),
    "exp_avg" or "exp_avg_sq". Sharded checkpoints are read one tensor at a time, so memory
    holds one parameter (a one-process checkpoint's optimizer.pt is read whole)."""

    def __init__(self, path: str | Path, model_cfg: ModelConfig):
        self.path, self.cfg = Path(path), model_cfg
        state = read_trainer_state(self.path)
        self.vocab_tp = state.get("vocab_tp", 1)
        self.sharded = is_sharded(state)
        self.tp = state["layout"]["tp"] if self.sharded else 1
        self._files = contextlib.ExitStack()
        self._handles = {}
        if self.sharded:
            self._index_fragments(state["layout"]["world_size"])
        else:
            self._index_single()

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tensor(self, name: str, kind: str, tp: int = 1, rank: int = 0) -> torch.Tensor:
        """`name`'s tensor of TP rank `rank` of a `tp`-way layout, resharded if the checkpoint's differs."""
        if tp == self.tp:
            return self._shard(name, kind, rank)
        from mamba_train.parallel.tensor_parallel import merge_tensor, shard_tensor

        shards = [self._shard(name, kind, r) for r in range(self.tp)]
        full = shards[0] if self.tp == 1 else merge_tensor(name, shards, self.cfg)
        return full if tp == 1 else shard_tensor(name, full, self.cfg, tp, rank)

    def flat_range(self, name: str, kind: str, tp: int, rank: int, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of the flattened `tensor(name, kind, tp, rank)`;
        on the same TP size only the fragments overlapping them are read."""
        if self.sharded and tp == self.tp and kind != "weight":
            return self._read_range(rank, name, kind, start, start + numel)
        return self.tensor(name, kind, tp, rank).flatten().narrow(0, start, numel)

    # -- one-process checkpoints: model.safetensors and torch AdamW's state_dict

    def _index_single(self) -> None:
        from mamba_train.model import Mamba2LM, param_groups

        with torch.device("meta"):  # names and the optimizer's parameter order, no memory
            model = Mamba2LM(self.cfg, tp_size=self.vocab_tp)
        names = {id(param): name for name, param in model.named_parameters()}
        order = [names[id(param)] for group in param_groups(model, 0.0) for param in group["params"]]
        optimizer = torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)
        self._single_moments = {order[index]: state for index, state in optimizer["state"].items()}
        steps = {int(state["step"]) for state in optimizer["state"].values() if "step" in state}
        self.adam_step = steps.pop() if steps else 0

    # -- sharded checkpoints

    def _index_fragments(self, world_size: int) -> None:
        self._fragments: dict[tuple[int, str], list] = {}  # (tp rank, name) → [(file, start, numel)]
        self._shapes: dict[tuple[int, str], list[int]] = {}
        adam_steps = set()
        for rank in range(world_size):
            file = self.path / OPTIM_FILE.format(rank)
            metadata = self._handle(file).metadata() or {}
            try:
                tp_rank, fragments = int(metadata["tp_rank"]), json.loads(metadata["fragments"])
                adam_steps.add(int(metadata["adam_step"]))
            except (KeyError, ValueError) as err:
                raise CheckpointError(f"{file}: not an optimizer shard of this trainer (metadata: {err})") from err
            for name, (start, numel, shape) in fragments.items():
                self._fragments.setdefault((tp_rank, name), []).append((file, start, numel))
                self._shapes[(tp_rank, name)] = shape
        if len(adam_steps) > 1:
            raise CheckpointError(f"{self.path}: the optimizer shards disagree on Adam's step {sorted(adam_steps)}")
        self.adam_step = adam_steps.pop() if adam_steps else 0

    def _handle(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"checkpoint {self.path} is incomplete: {file} is missing")
            self._handles[file] = self._files.enter_context(safe_open(file, framework="pt"))
        return self._handles[file]

    def _shard(self, name: str, kind: str, tp_rank: int) -> torch.Tensor:
        if not self.sharded:
            if kind in ("master", "weight"):
                return self._handle(self.path / "model.safetensors").get_tensor(name).float()
            state = self._single_moments.get(name, {})
            if kind not in state:
                raise CheckpointError(f"{self.path / 'optimizer.pt'}: no AdamW {kind} for {name}")
            return state[kind].float()
        if kind == "weight":
            return self._handle(self.path / MODEL_FILE.format(tp_rank)).get_tensor(name)
        shape = self._shapes.get((tp_rank, name))
        if shape is None:
            raise CheckpointError(f"{self.path}: no optimizer shard holds {name} of TP rank {tp_rank}")
        return self._read_range(tp_rank, name, kind, 0, torch.Size(shape).numel()).view(shape)

    def _read_range(self, tp_rank: int, name: str, kind: str, lo: int, hi: int) -> torch.Tensor:
        values = torch.empty(hi - lo, dtype=torch.float32)
        covered = 0
        for file, start, numel in self._fragments.get((tp_rank, name), []):
            first, last = max(lo, start), min(hi, start + numel)
            if first < last:  # read only the overlap (safetensors slices without loading the rest)
                piece = self._handle(file).get_slice(f"{name}/{kind}")
                values[first - lo:last - lo] = piece[first - start:last - start]
                covered += last - first
        if covered != hi - lo:
            raise CheckpointError(f"{self.path}: the optimizer shards hold {covered} of {hi - lo} elements of {name} "
                                  f"({kind}) of TP rank {tp_rank}")
        return values


def load_sharded_into_engine(path: str | Path, engine, dims, model_cfg: ModelConfig) -> None:
    """Weights, fp32 masters and Adam state of this rank from any checkpoint (sharded with
    any layout, or one-process), resharded to this rank's place in `dims`."""
    tp, tp_rank = dims.layout.tp, dims.tp_rank
    with CheckpointReader(path, model_cfg) as reader, torch.no_grad():
        _create_adam_state(engine, reader.adam_step)
        fragments = {name: (fragment, state) for name, _, fragment, state in _zero_fragments(engine)}
        for name, param in engine.module.named_parameters():
            master = reader.tensor(name, "master", tp, tp_rank)
            if master.shape != param.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(master.shape)} for TP rank {tp_rank} of "
                                      f"{tp}, the model {tuple(param.shape)}")
            # the model's copy (in its dtype: DeepSpeed rounds the masters the same way)
            param.copy_(master.to(param.device, param.dtype))
            if name not in fragments:
                continue
            fragment, state = fragments[name]
            lp = fragment.lp_fragment_address
            fragment.hp_fragment.copy_(master.flatten().narrow(0, lp.start, lp.numel))
            for key in MOMENTS:
                _narrow_state(state, key, fragment).copy_(reader.flat_range(name, key, tp, tp_rank, lp.start, lp.numel))


def load_sharded_into_single(path: str | Path, model: torch.nn.Module | None,
                             optimizer: torch.optim.Optimizer | None, map_location="cpu") -> None:
    """A parallel run's checkpoint into the one-process model (fp32 masters, TP shards
    merged) and torch AdamW (moments merged the same way)."""
    if model is None:
        if optimizer is not None:
            raise ValueError("loading optimizer state from a sharded checkpoint needs the model too")
        return
    with CheckpointReader(path, model.cfg) as reader:
        names = {id(param): name for name, param in model.named_parameters()}
        model.load_state_dict({name: reader.tensor(name, "master").to(map_location) for name in names.values()})
        if optimizer is None:
            return
        state, index = {}, 0
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = names[id(param)]
                state[index] = {"step": torch.tensor(float(reader.adam_step)),
                                **{key: reader.tensor(name, key).to(map_location) for key in MOMENTS}}
                index += 1
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def read_weights(path: str | Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The TP=1 weights of a sharded checkpoint, as the model computed with them (for
    evaluation and export): the model-tp files merged, in fp32."""
    from mamba_train.parallel.tensor_parallel import merge_state_dicts
    from safetensors.torch import load_file

    tp = read_trainer_state(path)["layout"]["tp"]
    shards = [load_file(Path(path) / MODEL_FILE.format(rank)) for rank in range(tp)]
    return {name: tensor.float() for name, tensor in merge_state_dicts(shards, model_cfg).items()}


def verify_together(path: str | Path, group=None) -> None:
    """verify_checkpoint with the files split over the ranks of `group` (each hashes its
    share); every rank raises the same CheckpointError, naming the file, if one fails."""
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    error = None
    try:
        verify_checkpoint(path, share=(rank, world))
    except CheckpointError as err:
        error = str(err)
    errors = [None] * world
    dist.all_gather_object(errors, error, group=group)
    first = next((message for message in errors if message is not None), None)
    if first is not None:
        raise CheckpointError(first)
