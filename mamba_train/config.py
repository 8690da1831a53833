"""The whole run's configuration: one dataclass per concern, loaded from YAML with
dotted command-line overrides (`model.n_layer=2 optim.lr=1e-3`).

Every field has a default and a home; `load_config` validates types and values and
names the offending field in its error, so a typo never runs silently.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last
    without a word, so `steps: 2` ... `steps: 3` would run 3 steps. Run configs and prep
    recipes are both read through it (parse_yaml)."""

    def flatten_mapping(self, node):
        # Checked here, before PyYAML resolves `<<: *base` merges: it writes the merged keys into
        # the node in place (an anchored node too, when another mapping merges it first), and a
        # merged key that the mapping overrides is YAML's override, not a duplicate.
        checked = self.__dict__.setdefault("_checked_nodes", set())
        if id(node) not in checked:
            checked.add(id(node))
            first_line = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found duplicate key {key!r} (first at line {first_line[key] + 1}); keep one",
                        key_node.start_mark)
                first_line[key] = key_node.start_mark.line
        super().flatten_mapping(node)


def parse_yaml(text: str, where: str):
    """YAML text → Python values through UniqueKeyLoader. A syntax error or a duplicate key
    raises ConfigError naming `where` (a file, an override) and YAML's line and column,
    instead of PyYAML's multi-line traceback."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        context = f" ({error.context} from line {error.context_mark.line + 1})" if error.context_mark else ""
        raise ConfigError(f"{where}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
                          f"{error.problem}{context}") from None
    except yaml.YAMLError as error:  # a control character or bad encoding: no line to point at
        raise ConfigError(f"{where}: invalid YAML: {str(error).splitlines()[0]}") from None


@dataclass
class ModelConfig:
    d_model: int = 768
    n_layer: int = 24
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    # 0 means "take it from the tokenizer"; the embedding is padded to a multiple of
    # `pad_vocab_multiple` (times the tensor-parallel size) so matmuls stay aligned.
    vocab_size: int = 0
    pad_vocab_multiple: int = 128
    norm_eps: float = 1e-5
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    D_has_hdim: bool = False
    initializer_range: float = 0.02

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        multiple = self.pad_vocab_multiple * tp_size
        return -(-self.vocab_size // multiple) * multiple

    def validate(self) -> None:
        for name in ("d_model", "n_layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size",
                     "pad_vocab_multiple"):
            _require(getattr(self, name) > 0, f"model.{name}", "a positive integer", getattr(self, name))
        _require(self.vocab_size >= 0, "model.vocab_size", "0 (from the tokenizer) or a positive integer", self.vocab_size)
        _require(self.d_inner % self.headdim == 0, "model.headdim",
                 f"a divisor of d_inner = expand * d_model = {self.d_inner}", self.headdim)
        _require(self.nheads % self.ngroups == 0, "model.ngroups",
                 f"a divisor of nheads = {self.nheads}", self.ngroups)
        _require(2 <= self.d_conv <= 4, "model.d_conv", "2, 3 or 4", self.d_conv)
        _require(0 <= self.dt_limit[0] < self.dt_limit[1], "model.dt_limit", "[low, high] with 0 <= low < high",
                 list(self.dt_limit))
        _require(0 < self.dt_min <= self.dt_max < math.inf, "model.dt_min/dt_max", "0 < dt_min <= dt_max, finite",
                 (self.dt_min, self.dt_max))
        _require(0 <= self.dt_init_floor < math.inf, "model.dt_init_floor", "a finite number >= 0", self.dt_init_floor)
        # A = -uniform(A_init_range) and the model keeps log(A): both ends positive and finite
        _require(0 < self.A_init_range[0] <= self.A_init_range[1] < math.inf, "model.A_init_range",
                 "[low, high] with 0 < low <= high, finite", list(self.A_init_range))
        _require(0 < self.norm_eps < math.inf, "model.norm_eps", "a finite positive number", self.norm_eps)
        _require(0 <= self.initializer_range < math.inf, "model.initializer_range", "a finite number >= 0",
                 self.initializer_range)


@dataclass
class DataConfig:
    # Prefix of the Megatron-style indexed dataset (`<prefix>.bin`, `<prefix>.idx`) for
    # training; `valid_prefix` for evaluation. `tokenizer` is a sentencepiece .model or
    # a Hugging Face tokenizer.json.
    train_prefix: str = "data/quickstart/train"
    valid_prefix: str = "data/quickstart/valid"
    tokenizer: str = "data/quickstart/tokenizer.model"
    seq_len: int = 2048
    seed: int = 1234
    # Train on a weighted mixture instead of train_prefix alone: [[weight, prefix], ...], or
    # megatron's --data-path string "w1 prefix1 w2 prefix2 ..." (handy on the command line).
    # Weights are relative (normalized to sum to 1). Empty: train_prefix alone.
    blend: list[list[str | float]] | str = field(default_factory=list)
    # Where the blend's sample index and the loader's epoch shuffles are cached (built once,
    # memory-mapped by every rank and restart); "": `index-cache/` beside the first training
    # dataset. Set it when the data directory is read-only.
    cache_dir: str = ""

    def blend_weights(self) -> list[tuple[float, str]]:
        """[(weight, prefix)] to train on, weights summing to 1: the blend, or train_prefix alone."""
        if not self.blend:
            return [(1.0, self.train_prefix)]
        form = 'a list of [weight, prefix] pairs or a string "w1 prefix1 w2 prefix2 ..."'
        if isinstance(self.blend, str):
            words = self.blend.split()
            if len(words) % 2:
                raise ConfigError(f"data.blend: expected {form}, found {len(words)} words in {self.blend!r} "
                                  "(an odd count: a weight without a prefix, or a prefix without a weight)")
            pairs = [(f"data.blend word {i + 1}", words[i], words[i + 1]) for i in range(0, len(words), 2)]
        else:
            for i, pair in enumerate(self.blend):
                if len(pair) != 2:
                    raise ConfigError(f"data.blend[{i}]: expected [weight, prefix], found {pair!r} ({form})")
            pairs = [(f"data.blend[{i}]", weight, prefix) for i, (weight, prefix) in enumerate(self.blend)]
        out = []
        for where, weight, prefix in pairs:
            try:
                weight = float(weight)
            except ValueError:
                raise ConfigError(f"{where}: expected a weight (a number) before the prefix, found {weight!r}; "
                                  f"data.blend is {form}") from None
            if not (math.isfinite(weight) and weight >= 0):
                raise ConfigError(f"{where}: expected a finite weight >= 0, found {weight}")
            if not isinstance(prefix, str) or not prefix:
                raise ConfigError(f"{where}: expected a dataset prefix (a path without .bin/.idx), found {prefix!r}")
            out.append((weight, prefix))
        total = sum(weight for weight, _ in out)
        if total <= 0:
            raise ConfigError(f"data.blend: expected at least one positive weight, found weights {[w for w, _ in out]}")
        return [(weight / total, prefix) for weight, prefix in out]

    def validate(self) -> None:
        _require(self.seq_len > 0, "data.seq_len", "a positive integer", self.seq_len)
        self.blend_weights()  # raises on a malformed blend


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 100
    # After warmup: "cosine" from lr down to min_lr at the last step; "constant"; or "wsd"
    # (warmup-stable-decay): lr until the last `decay_fraction` of the steps, then down to min_lr
    # along 1 - sqrt(progress), the best cooldown shape in Hägele et al. 2024. A WSD run's rate
    # does not depend on its length until the decay starts, so a stable-phase checkpoint can
    # be continued with a larger train.steps (a longer run, or another token budget).
    schedule: str = "cosine"
    decay_fraction: float = 0.2

    def validate(self) -> None:
        # `x < math.inf` also refuses nan, which fails every comparison
        _require(0 < self.lr < math.inf, "optim.lr", "a finite positive number", self.lr)
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"a number in [0, lr={self.lr}]", self.min_lr)
        _require(0 <= self.weight_decay < math.inf, "optim.weight_decay", "a finite number >= 0", self.weight_decay)
        for name in ("beta1", "beta2"):  # Adam's moment decays; 1 would never forget the first gradient
            _require(0 <= getattr(self, name) < 1, f"optim.{name}", "a number in [0, 1)", getattr(self, name))
        _require(0 <= self.eps < math.inf, "optim.eps", "a finite number >= 0", self.eps)
        _require(0 <= self.grad_clip < math.inf, "optim.grad_clip", "a finite number >= 0 (0 disables clipping)",
                 self.grad_clip)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        _require(self.schedule in ("cosine", "constant", "wsd"), "optim.schedule", "'cosine', 'constant' or 'wsd'",
                 self.schedule)
        _require(0 < self.decay_fraction <= 1, "optim.decay_fraction", "a fraction of the steps in (0, 1]",
                 self.decay_fraction)


# train.recompute's values, from the most memory to the least (mamba_train.model.set_recompute)
RECOMPUTE_MODES = ("none", "mixer", "block")


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch: int = 8
    grad_accum: int = 1
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    seed: int = 1234
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 8
    torch_threads: int = 0  # 0: leave torch's default
    # Steps whose loss or gradient is NaN/inf are dropped; more than this many stop the run.
    max_skipped_steps: int = 5
    # What backward recomputes instead of keeping (RECOMPUTE_MODES). "mixer": each mixer's conv
    # and gated-norm outputs, (conv_dim + d_inner) · 2 bytes a token a layer less for a conv and
    # a norm forward more (on GPUs; the CPU's ops keep them regardless). "none": nothing, the
    # fastest where memory allows (130m at its config's micro-batch on an H100).
    # "block": every block's activations (activation checkpointing): memory for one block's
    # activations instead of all, for about one more forward; for a micro-batch or sequence
    # that does not fit otherwise.
    recompute: str = "mixer"
    # Replay each micro-batch's forward and backward from a CUDA graph (on GPUs; in parallel
    # runs DeepSpeed's reduction and step stay eager): the CPU launches one graph instead of
    # thousands of kernels, for steps the CPU would otherwise bound (train/cuda_graph.py).
    # Fixed batch shapes; its memory is about an eager step's; not with train.recompute='block'.
    cuda_graph: bool = False

    def validate(self) -> None:
        _require(self.steps > 0, "train.steps", "a positive integer", self.steps)
        _require(not (self.cuda_graph and self.device == "cpu"), "train.cuda_graph",
                 "false when train.device is 'cpu' (it replays CUDA graphs)", self.cuda_graph)
        modes = ", ".join(map(repr, RECOMPUTE_MODES[:-1])) + f" or {RECOMPUTE_MODES[-1]!r}"
        _require(self.recompute in RECOMPUTE_MODES, "train.recompute", modes, self.recompute)
        _require(not (self.cuda_graph and self.recompute == "block"), "train.cuda_graph",
                 "false with train.recompute='block' (block recomputation inside a captured graph is not "
                 "supported yet)", self.cuda_graph)
        _require(self.micro_batch > 0, "train.micro_batch", "a positive integer", self.micro_batch)
        _require(self.grad_accum > 0, "train.grad_accum", "a positive integer", self.grad_accum)
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", "'auto', 'cpu' or 'cuda'", self.device)
        _require(self.precision in ("auto", "bf16", "fp32"), "train.precision", "'auto', 'bf16' or 'fp32'",
                 self.precision)
        _require(self.eval_every >= 0, "train.eval_every", "an integer >= 0", self.eval_every)
        _require(self.eval_batches > 0, "train.eval_batches", "a positive integer", self.eval_batches)
        _require(self.torch_threads >= 0, "train.torch_threads", "a positive integer, or 0 for torch's default",
                 self.torch_threads)
        _require(self.max_skipped_steps >= 0, "train.max_skipped_steps", "an integer >= 0", self.max_skipped_steps)


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every: int = 500  # 0: only at the end
    keep_last: int = 3
    keep_every: int = 0  # additionally keep every M-th step forever; 0: none
    # Copy the state to CPU at a save (the only part that blocks training) and write the
    # files from a background thread; the next save and the end of training wait for it.
    # The copy goes into host buffers allocated at the first save and reused by the next,
    # page-locked (pinned) for GPU tensors: they hold one checkpoint in host memory for the
    # whole run (a parallel run: each rank its share), e.g. 16 GB for 1.3b on one GPU.
    async_save: bool = False

    def validate(self) -> None:
        _require(self.every >= 0, "checkpoint.every", "an integer >= 0", self.every)
        _require(self.keep_last >= 1, "checkpoint.keep_last", "an integer >= 1", self.keep_last)
        _require(self.keep_every >= 0, "checkpoint.keep_every", "an integer >= 0", self.keep_every)


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_every: int = 10
    tensorboard: bool = True
    progress_bar: str = "auto"  # auto: only on a terminal | on | off
    # FLOP/s that MFU divides by; 0 measures the GPU's bf16 matmul rate at start (issue 9).
    peak_flops: float = 0.0
    # [first, last]: profile those training steps (train/profile.py); [0, 0]: off
    profile_steps: tuple[int, int] = (0, 0)

    def validate(self) -> None:
        _require(self.log_every > 0, "logging.log_every", "a positive integer", self.log_every)
        _require(0 <= self.peak_flops < math.inf, "logging.peak_flops", "a finite number >= 0 (0: measure it)",
                 self.peak_flops)
        first, last = self.profile_steps
        _require(first == last == 0 or 1 <= first <= last, "logging.profile_steps",
                 "[first, last] steps with 1 <= first <= last, or [0, 0] (off)", list(self.profile_steps))
        _require(self.progress_bar in ("auto", "on", "off"), "logging.progress_bar", "'auto', 'on' or 'off'",
                 self.progress_bar)


@dataclass
class ParallelConfig:
    # data parallel size = WORLD_SIZE / (tp · cp); a run with WORLD_SIZE > 1 (torchrun) or
    # tp/cp > 1 trains through DeepSpeed ZeRO over megatron-core's groups (DESIGN §4)
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False  # Megatron sequence parallelism inside the TP group
    # With sequence_parallel: in_proj's all-gather and out_proj's reduce-scatter overlap their
    # matmuls (torch's symmetric memory over NVLink/P2P: the TP group within one node; CUDA)
    tp_comm_overlap: bool = False
    # With cp > 1 on CUDA: each layer's boundary states are relayed rank to rank through
    # symmetric memory (each rank's state passing reads the previous rank's final state in
    # place) rather than all-gathered through NCCL; off: the all-gather. Falls back to the
    # all-gather where symmetric memory cannot be set up.
    cp_symmetric_memory: bool = True
    zero_stage: int = 1  # DeepSpeed ZeRO: 1 partitions the optimizer state, 2 the gradients too
    # A collective that has not completed after this long raises instead of hanging (a dead
    # or stuck rank); keep it above the slowest checkpoint save.
    timeout_minutes: float = 30.0

    def validate(self) -> None:
        _require(self.tp >= 1, "parallel.tp", "an integer >= 1", self.tp)
        _require(self.cp >= 1, "parallel.cp", "an integer >= 1", self.cp)
        _require(self.zero_stage in (1, 2), "parallel.zero_stage", "1 or 2", self.zero_stage)
        _require(not self.tp_comm_overlap or self.sequence_parallel, "parallel.tp_comm_overlap",
                 "false unless parallel.sequence_parallel is on (it overlaps SP's gather and scatter)",
                 self.tp_comm_overlap)
        _require(0 < self.timeout_minutes < math.inf, "parallel.timeout_minutes", "a finite positive number of minutes",
                 self.timeout_minutes)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        for section in fields(self):
            getattr(self, section.name).validate()

    def to_dict(self) -> dict:
        return _plain(asdict(self))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Build a validated RunConfig from a YAML file (optional) and `a.b=value` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, found {type(raw).__name__}")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected the form section.field=value")
        *sections, leaf = key.split(".")
        node = raw
        for name in sections:
            if node.get(name) is None:  # absent, or `model:` with nothing under it
                node[name] = {}
            node = node[name]
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {name} is not a section")
        node[leaf] = parse_yaml(text, f"override {override!r}, value {text!r}")
    config = from_mapping(RunConfig, raw)
    config.validate()
    return config


def config_from_dict(raw: dict) -> RunConfig:
    """Inverse of RunConfig.to_dict (used when resuming from a checkpoint)."""
    config = from_mapping(RunConfig, raw)
    config.validate()
    return config


def from_mapping(cls, raw: dict, prefix: str = ""):
    """A dataclass (nested ones too) from a YAML mapping, checking every key and type.
    Used for run configs and data-prep recipes alike; raises ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, found {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown key {prefix}{unknown[0]} ({where} allows: {', '.join(sorted(known))})")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value, hint, name: str):
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, {} if value is None else value, prefix=f"{name}.")
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, found {value!r}")
        return [_coerce(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        item_types = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{name}: expected a list of {len(item_types)} values, found {value!r}")
        return tuple(_coerce(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) == 1:  # `X | None`: report X's own error
            return _coerce(value, options[0], name)
        for option in options:
            try:
                return _coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected null, found {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        whole = _whole_number(value) if isinstance(value, str) else None
        if whole is not None:  # YAML 1.1 reads `1e4` (no dot, no exponent sign) as a string
            raise ConfigError(f"{name}: expected int, found str {value!r}; write {whole}")
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) and `inf` as strings; users mean numbers.
            try:
                return float(value.strip().replace(".inf", "inf"))
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{name}: expected {hint.__name__}, found {type(value).__name__} {value!r}")


def _whole_number(text: str) -> int | None:
    """`text` as an int when it reads as a whole float (`1e4`, `2.5e3`), else None."""
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _require(ok: bool, name: str, allowed: str, found) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {allowed}, found {found!r}")


def _plain(value):
    """Make asdict output YAML/JSON friendly (tuples → lists, inf → 'inf')."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
