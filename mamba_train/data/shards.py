"""Tokenizing many sources in worker processes, one shard per source, resumably.

Each source (a .jsonl.zst shard of the Pile, a parquet file, a dataset) becomes one
indexed shard `<work>/shards/NNNNN-<name>.{bin,idx,docs.npz}`, written by one worker
from a stream: a worker holds one chunk of text (`chunk_bytes`) and its tokens at a
time, so memory does not grow with the input. A shard is finished when its
`.done.json` exists (written after the shard's files are renamed into place); a rerun
after an interruption skips finished shards whose source is unchanged (same size and
mtime) and tokenizer is the same. `merge` then writes the splits in source order, so
the output never depends on the number of workers or on which shards were resumed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mamba_train.data.corpus import SkippedRecords
from mamba_train.data.indexed import IndexedDataset, IndexedDatasetWriter
from mamba_train.data.sources import Source, read_source, source_name, source_size
from mamba_train.data.tokenizer import load_tokenizer


@dataclass(frozen=True)
class ShardTask:
    index: int
    sources: tuple[str, ...]  # paths or `hf:` specs (str, so the task pickles and compares simply)
    prefix: str  # output prefix of the shard
    tokenizer_path: str
    token_dtype: str
    chunk_bytes: int
    skip_bad_records: bool

    def identity(self) -> dict:
        """What a finished shard must match to be reused."""
        stats = [Path(source).stat() if Path(source).exists() else None for source in self.sources]
        return {"sources": [[source, stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
                            for source, stat in zip(self.sources, stats)],
                "tokenizer_sha256": _sha256(self.tokenizer_path), "token_dtype": self.token_dtype,
                "skip_bad_records": self.skip_bad_records}


def done_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.done.json")


def tokenize_sources(sources: list[Source], tokenizer_path: Path, work_dir: Path, token_dtype: np.dtype,
                     workers: int, chunk_bytes: int, shard_bytes: int = 256 << 20, skip_bad_records: bool = False,
                     progress: bool | None = None) -> list[dict]:
    """Tokenize the sources into shards (skipping finished ones); returns each shard's
    summary ({"prefix", "documents", "tokens", "utf8_bytes", "skipped", ...}) in order.

    A shard is one source, or a run of consecutive small sources up to `shard_bytes` on
    disk (a folder of a million .txt files must not become a million shards), or less
    so that there are `workers` shards. A single source is never split: one huge file
    is one worker's work (the Pile comes as 30 files)."""
    shard_dir = work_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob("*.tmp-*"):  # left by a worker stopped mid-shard
        stale.unlink()
    sizes = [source_size(s) for s in sources]
    # at least one shard per worker when the sources allow it, so small inputs use every core
    target = max(1, min(shard_bytes, -(-sum(sizes) // max(workers, 1))))
    groups: list[list[int]] = []
    group_bytes = 0
    for i, size in enumerate(sizes):
        if not groups or group_bytes + size > target:
            groups.append([])
            group_bytes = 0
        groups[-1].append(i)
        group_bytes += size
    tasks = [ShardTask(k, tuple(str(sources[i]) for i in group),
                       str(shard_dir / f"{k:05d}-{source_name(sources[group[0]])}"), str(tokenizer_path),
                       str(np.dtype(token_dtype)), chunk_bytes, skip_bad_records)
             for k, group in enumerate(groups)]
    task_bytes = [sum(sizes[i] for i in group) for group in groups]
    results: dict[int, dict] = {}
    todo = []
    for task in tasks:
        finished = _finished(task)
        if finished is not None:
            results[task.index] = finished
        else:
            todo.append(task)
    bar = tqdm(total=sum(task_bytes[t.index] for t in todo) or None, unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"tokenizing {len(todo)}/{len(tasks)} shards", disable=None if progress is None else not progress,
               smoothing=0.1)
    meter = _Meter(bar)
    try:
        if workers <= 1 or len(todo) <= 1:
            # in process: no pool start-up for one shard, and tracebacks stay simple
            for task in todo:
                results[task.index] = _tokenize_shard(task, meter.update)
        else:
            results.update(_run_pool(todo, workers, meter))
    finally:
        bar.close()
    return [results[i] for i in range(len(tasks))]


def _finished(task: ShardTask) -> dict | None:
    try:
        done = json.loads(done_path(task.prefix).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if done.get("identity") != task.identity():
        return None
    if not all(Path(task.prefix + suffix).is_file() for suffix in (".bin", ".idx", ".docs.npz")):
        return None
    return done


def _run_pool(todo: list[ShardTask], workers: int, meter: "_Meter") -> dict[int, dict]:
    # forkserver/spawn, not fork: the parent may hold threads (torch, tqdm) and locks
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":  # import this module (and its dependencies) once, in the server
        context.set_forkserver_preload([__name__])
    reports = context.Queue()
    results = {}
    pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=_init_worker,
                               initargs=(reports,))
    try:
        pending = {pool.submit(_tokenize_shard_in_worker, task): task for task in todo}
        sent = received = 0
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            received += _drain(reports, meter)
            for future in done:
                task = pending.pop(future)
                results[task.index], reports_sent = future.result()  # re-raises a worker's error here
                sent += reports_sent
        # A worker's last reports can still be on their way through the queue's pipe when its
        # future is done (a feeder thread writes them): wait for them, so that the bar ends at
        # the full counts. Bounded: the counts only feed the display.
        _drain(reports, meter, wanted=sent - received, timeout=30.0)
    except BaseException:
        # Fail now, not when the other running shards end (an hour for a Pile shard): stop
        # the workers; their unfinished shards are redone on resume, finished ones kept.
        workers_now = list((pool._processes or {}).values())  # private, but the only handle on them
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers_now:
            process.terminate()
        raise
    pool.shutdown()
    return results


def _drain(reports, meter: "_Meter", wanted: int = 0, timeout: float = 0.0) -> int:
    """Apply the reports that have arrived, first waiting up to `timeout` s for `wanted` of
    them; returns how many were applied."""
    deadline, applied = time.monotonic() + timeout, 0
    while True:
        try:
            if applied < wanted:
                counts = reports.get(timeout=max(deadline - time.monotonic(), 1e-3))
            else:
                counts = reports.get_nowait()
        except queue.Empty:
            return applied
        meter.update(*counts)
        applied += 1


_reports = None


def _init_worker(reports) -> None:
    global _reports
    _reports = reports
    # one tokenizer thread per worker: the workers already fill the cores, and Rust
    # threads on top of them only oversubscribe (read when `tokenizers` is first imported)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tokenize_shard_in_worker(task: ShardTask) -> tuple[dict, int]:
    """The shard's summary, and how many progress reports it put on the queue."""
    sent = 0

    def report(*counts):
        nonlocal sent
        _reports.put(counts)
        sent += 1

    return _tokenize_shard(task, report), sent


_tokenizers: dict[str, object] = {}  # one loaded tokenizer per worker process, reused across shards


def _tokenize_shard(task: ShardTask, report: Callable[[int, int, int, int], None]) -> dict:
    """Stream one source into its shard; report(documents, utf8 bytes, tokens, disk bytes)
    after every chunk."""
    started = time.perf_counter()
    tokenizer = _tokenizers.get(task.tokenizer_path)
    if tokenizer is None:
        tokenizer = _tokenizers[task.tokenizer_path] = load_tokenizer(task.tokenizer_path)
    eod = tokenizer.eod_id
    skipped = SkippedRecords() if task.skip_bad_records else None
    disk_bytes = [0]
    totals = {"documents": 0, "tokens": 0, "utf8_bytes": 0, "empty": 0}
    subsets: dict[str, int] = {}

    def on_read(n: int) -> None:
        disk_bytes[0] += n

    documents = (document for source in task.sources for document in read_source(source, skipped, on_read))
    with IndexedDatasetWriter(task.prefix, task.token_dtype) as writer:
        for texts, names, sizes in _chunks(documents, task.chunk_bytes, totals):
            ids, ends = tokenizer.encode_documents(texts)
            tokens = np.insert(ids, ends, eod)  # every document followed by EOD
            writer.add_documents(tokens, np.diff(ends, prepend=0) + 1, sizes, names)
            for name in names:
                subsets[name] = subsets.get(name, 0) + 1
            totals["documents"] += len(texts)
            totals["tokens"] += tokens.size
            totals["utf8_bytes"] += sum(sizes)
            report(len(texts), sum(sizes), tokens.size, disk_bytes[0])
            disk_bytes[0] = 0
    summary = {"prefix": task.prefix, "sources": list(task.sources), **totals, "subsets": subsets,
               "skipped": skipped.count if skipped else 0, "skipped_examples": skipped.examples if skipped else [],
               "seconds": round(time.perf_counter() - started, 3), "identity": task.identity()}
    tmp = done_path(task.prefix).with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, done_path(task.prefix))  # the shard counts as finished only now
    return summary


def _chunks(documents: Iterator[tuple[str, str]], chunk_bytes: int, totals: dict
            ) -> Iterator[tuple[list[str], list[str], list[int]]]:
    texts, names, sizes, total = [], [], [], 0
    for text, name in documents:
        if not text:  # an empty document would be a lone EOD: nothing to learn from
            totals["empty"] += 1
            continue
        size = len(text.encode("utf-8"))
        texts.append(text)
        names.append(name)
        sizes.append(size)
        total += size
        if total >= chunk_bytes or len(texts) >= 4096:
            yield texts, names, sizes
            texts, names, sizes, total = [], [], [], 0
    if texts:
        yield texts, names, sizes


class _Meter:
    """The progress bar: disk bytes drive the bar and its ETA; documents, text bytes and
    tokens/s go in the postfix."""

    def __init__(self, bar: tqdm):
        self.bar, self.started = bar, time.perf_counter()
        self.documents = self.tokens = self.text_bytes = 0

    def update(self, documents: int, text_bytes: int, tokens: int, disk_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.text_bytes += text_bytes
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.documents:,} docs, {self.text_bytes / 1e6:,.1f} MB text, "
                                 f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(disk_bytes)


# Merging ------------------------------------------------------------------------------------

SPLITS = ("train", "valid", "test")


def split_of_documents(seed: int, first_index: int, count: int, valid_fraction: float,
                       test_fraction: float) -> np.ndarray:
    """(count,) split codes 0 train / 1 valid / 2 test of documents first_index ... by a
    per-document coin that depends on (seed, global index) alone (splitmix64, vectorized:
    a Python hash per document would take minutes at the Pile's 200M documents)."""
    with np.errstate(over="ignore"):
        x = np.arange(first_index, first_index + count, dtype=np.uint64)
        x = x + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    coin = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
    return np.where(coin < valid_fraction, 1, np.where(coin < valid_fraction + test_fraction, 2, 0)).astype(np.int8)


def merge(shards: list[dict], out_dir: Path, token_dtype: np.dtype, seed: int, valid_fraction: float,
          test_fraction: float) -> dict[str, np.ndarray]:
    """Write `<out_dir>/{train,valid,test}` from the shards in order; returns, per split,
    the global document indices it received. A split with fraction 0 is not written."""
    wanted = [name for name, fraction in zip(SPLITS, (1.0, valid_fraction, test_fraction)) if fraction > 0]
    writers = {name: IndexedDatasetWriter(out_dir / name, token_dtype) for name in wanted}
    chosen: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    first = 0
    entered = []
    try:
        for writer in writers.values():
            entered.append(writer.__enter__())
        for shard in shards:
            dataset = IndexedDataset(shard["prefix"])
            codes = split_of_documents(seed, first, len(dataset), valid_fraction, test_fraction)
            for code, name in enumerate(SPLITS):
                if name in writers:
                    local = np.flatnonzero(codes == code)
                    writers[name].add_documents_from(dataset, local)
                    chosen[name].append(local + first)
            first += len(dataset)
    except BaseException as error:
        for writer in entered:
            writer.__exit__(type(error), error, error.__traceback__)
        raise
    for writer in entered:
        writer.__exit__(None, None, None)
    return {name: np.concatenate(parts) if parts else np.zeros(0, np.int64) for name, parts in chosen.items()}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


