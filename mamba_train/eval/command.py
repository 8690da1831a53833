"""`mamba-train eval --ckpt DIR --data NAME`: the table on stdout, JSON with --out.

Run under torchrun for several ranks (`torchrun --nproc-per-node 8 -m mamba_train.cli eval
...`): each rank scores its share of the documents and all of them hold the result; rank
0 prints and writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from mamba_train.checkpoint import load_trained_model
from mamba_train.data import DataError, IndexedDataset
from mamba_train.data.indexed import dataset_files
from mamba_train.eval.perplexity import evaluate, format_table

SPLIT_NAMES = ("train", "valid", "test")


def resolve_data(name: str | None, data_cfg) -> str:
    """A dataset prefix from NAME: an existing prefix (`<NAME>.idx` exists), or a split
    name (train/valid/test) in the directory of the run's validation data; no NAME: the
    run's data.valid_prefix."""
    if name is None:
        return data_cfg.valid_prefix
    if dataset_files(name)[1].is_file():
        return name
    if name in SPLIT_NAMES:
        prefix = str(Path(data_cfg.valid_prefix).parent / name)
        if dataset_files(prefix)[1].is_file():
            return prefix
        raise DataError(f"--data {name}: no {prefix}.idx beside the run's validation data")
    raise DataError(f"--data {name}: neither a dataset prefix ({name}.idx not found) nor one of "
                    f"{', '.join(SPLIT_NAMES)}")


def run(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    try:
        model, cfg, path, device = load_trained_model(args.ckpt)
        if cfg.train.torch_threads:  # the run's own setting: oversubscribed CPU threads crawl
            torch.set_num_threads(cfg.train.torch_threads)
        prefix = resolve_data(args.data, cfg.data)
        # None: not given (the CLI refuses 0 and negatives)
        window = args.window if args.window is not None else cfg.data.seq_len
        rows = args.rows if args.rows is not None else 1
        dataset = IndexedDataset(prefix)
        main_rank = not dist.is_initialized() or dist.get_rank() == 0
        if main_rank:  # scoring a whole split takes minutes on a CPU: say what runs
            print(f"scoring {path} on {prefix} ({len(dataset):,} documents, {dataset.num_tokens:,} tokens"
                  f"{f', the first {args.max_tokens:,}' if args.max_tokens else ''}) ...", flush=True)
        results = evaluate(model, dataset, window=window, max_tokens=args.max_tokens, device=device, rows=rows,
                           autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
                           group=dist.group.WORLD if world > 1 else None, progress=main_rank)
        results["checkpoint"], results["data"] = str(path), prefix
        if main_rank:
            print(f"{path} on {prefix} ({results['ranks']} rank(s), window {results['window']})")
            print(format_table(results))
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0
