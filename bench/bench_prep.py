"""Tokenizing throughput: ours (mamba_train.data.shards: worker processes over shards →
Megatron .bin/.idx) beside Hugging Face `datasets` (load_dataset("json") +
`map(batched=True, num_proc=N)`), same tokenizer, same Pile-format jsonl.zst text, in one run.

The anchor's map function calls the tokenizer library's own batch encode
(`Tokenizer.encode_batch`: sentencepiece's `Encode(list)`, tokenizers' `encode_batch_fast`),
as a `datasets` user would. Ours calls `Tokenizer.encode_documents`, which for sentencepiece
BPE encodes each distinct segment of a chunk once (mamba_train/data/segments.py). A third,
informational row runs datasets.map with that same encoder, so the table shows how much of
the gap is the encoder and how much the pipeline.

Each side runs in a fresh subprocess, timed from its first read of the input to its last
write (interpreter start-up and imports excluded), while this process samples the
resident memory and CPU time of that subprocess and all its children (psutil, every 50 ms)
for the peak RSS and the CPU seconds. MB/s counts the documents' UTF-8 text bytes; the
machine is shared, so the load average before each side is recorded with it. Writes
bench/results/prep.json.

    python bench/bench_prep.py                          # ~50 MB, both sides, 2 workers
    python bench/bench_prep.py --mb 1000 --ours-only    # peak memory on a 1 GB input

The text is the local corpus (mamba_train.data.corpus: stdlib code and docstrings,
/usr/share/doc, man pages), repeated when the machine has less than asked for.
"""

import argparse
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIDES = ["ours", "datasets", "datasets_our_encoder"]


def make_input(work: Path, mb: float, shards: int) -> list[Path]:
    """`shards` jsonl.zst files holding about `mb` MB of text (reused if already there)."""
    import zstandard

    from mamba_train.data.corpus import read_jsonl
    from mamba_train.data.local_corpus import build_local_corpus

    stamp = work / f"input-{mb}-{shards}.json"
    if stamp.is_file():
        return [Path(p) for p in json.loads(stamp.read_text())]
    base = work / "local-corpus"
    if not base.is_dir():
        build_local_corpus(base, max_mb=min(mb, 40))
    records = [(t, s) for path in sorted(base.glob("*.jsonl.zst")) for t, s in read_jsonl(path)]
    budget, per_shard = int(mb * 1e6), int(mb * 1e6 / shards) + 1
    files, written, i = [], 0, 0
    while written < budget:
        path = work / f"in-{mb:g}mb-{len(files):03d}.jsonl.zst"
        shard_bytes = 0
        with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
            while shard_bytes < per_shard and written < budget:
                text, subset = records[i % len(records)]
                i += 1
                out.write((json.dumps({"text": text, "meta": {"pile_set_name": subset}}) + "\n").encode())
                shard_bytes += len(text.encode())
                written += len(text.encode())
        files.append(path)
    stamp.write_text(json.dumps([str(p) for p in files]))
    return files


def make_hf_tokenizer(work: Path, vocab_size: int) -> Path:
    """A GPT-NeoX-style byte-level BPE tokenizer.json trained on the local corpus (no hub
    here to fetch GPT-NeoX's own); reused if already there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mamba_train.data.corpus import read_jsonl

    path = work / f"hf-bpe-{vocab_size}" / "tokenizer.json"
    if path.is_file():
        return path
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = (t for p in sorted((work / "local-corpus").glob("*.jsonl.zst")) for t, _ in read_jsonl(p))
    tokenizer.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def run_ours(files, tokenizer, out: Path, workers: int) -> dict:
    from mamba_train.data import load_tokenizer, token_dtype_for_vocab
    from mamba_train.data.shards import merge, tokenize_sources

    dtype = token_dtype_for_vocab(load_tokenizer(tokenizer).vocab_size)
    started = time.perf_counter()
    shards = tokenize_sources(files, Path(tokenizer), out, dtype, workers, chunk_bytes=1 << 20, shard_bytes=1,
                              progress=False)
    merge(shards, out, dtype, seed=0, valid_fraction=0.0, test_fraction=0.0)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "text_bytes": sum(s["utf8_bytes"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "tokens_sha256": token_digest(_read_in_pieces(out / "train.bin", dtype))}


def _read_in_pieces(path: Path, dtype, piece: int = 1 << 24):
    """The file's tokens, a piece at a time, by read() rather than a memory map (whose
    pages would count in the peak RSS being measured)."""
    import numpy as np

    with open(path, "rb") as f:
        while data := f.read(piece * dtype.itemsize):
            yield np.frombuffer(data, dtype=dtype)


def run_datasets(files, tokenizer, out: Path, workers: int, our_encoder: bool = False) -> dict:
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    from mamba_train.data import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(tokenizer)
    started = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train", cache_dir=str(out / "hf"))
    loaded = time.perf_counter()

    def library_encode(batch):  # the anchor: the tokenizer library's batch call
        return {"input_ids": [ids + [tok.eod_id] for ids in tok.encode_batch(batch["text"])]}

    def encode_like_ours(batch):  # informational: our segment encoder inside datasets.map
        ids, ends = tok.encode_documents(batch["text"])
        return {"input_ids": [doc.tolist() + [tok.eod_id] for doc in np.split(ids, ends[:-1])]}

    tokenized = ds.map(encode_like_ours if our_encoder else library_encode, batched=True, num_proc=workers, remove_columns=ds.column_names)
    seconds = time.perf_counter() - started
    # counted in Arrow: Python lists of every token would add a GiB to this side's peak RSS
    tokens = tokenized.data.column("input_ids").combine_chunks().flatten().to_numpy()
    return {"seconds": seconds, "load_seconds": loaded - started, "map_seconds": seconds - (loaded - started),
            "text_bytes": pc.sum(pc.binary_length(ds.data.column("text"))).as_py(),
            "tokens": int(tokens.size), "tokens_sha256": token_digest([tokens])}


def token_digest(pieces) -> str:
    """SHA-256 of the token ids as int32: every side must produce exactly the same tokens."""
    digest = hashlib.sha256()
    for tokens in pieces:
        digest.update(tokens.astype("<i4").tobytes())
    return digest.hexdigest()


def measure(side: str, args, files, out: Path) -> dict:
    """Run one side in a subprocess; its result plus the peak RSS of its process tree."""
    command = [sys.executable, __file__, "--run", side, "--tokenizer", args.tokenizer, "--workers",
               str(args.workers), "--scratch", str(out), "--files", *map(str, files)]
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    peak, root = 0, psutil.Process(proc.pid)
    cpu = {}  # pid → last seen user + system seconds (a process that ends loses < 50 ms)

    def sample():
        nonlocal peak
        while proc.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
                for p in tree:
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{side} failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gib"] = peak / 2**30
    result["mb_per_s"] = result["text_bytes"] / 1e6 / result["seconds"]
    result["cpu_seconds"] = sum(cpu.values())  # whole run of the process tree, start-up included
    result["load_before"] = load_before
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph, whole
    parser.add_argument("--mb", type=float, default=50.0, help="MB of text")
    parser.add_argument("--shards", type=int, default=8, help="input files")
    parser.add_argument("--workers", type=int, default=2, help="our workers and datasets' num_proc")
    parser.add_argument("--tokenizer", default=str(REPO / "data/quickstart/tokenizer.model"),
                        help="a .model or tokenizer.json; 'hf-bpe' trains a byte-level BPE tokenizer.json")
    parser.add_argument("--ours-only", action="store_true", help="skip datasets.map (the memory run)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_prep"))
    parser.add_argument("--out", default=str(REPO / "bench/results/prep.json"))
    parser.add_argument("--run", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # the subprocess side
        run = {"ours": run_ours, "datasets": run_datasets,
               "datasets_our_encoder": functools.partial(run_datasets, our_encoder=True)}[args.run]
        print(json.dumps(run([Path(f) for f in args.files], args.tokenizer, Path(args.scratch), args.workers)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = make_input(work, args.mb, args.shards)
    if args.tokenizer == "hf-bpe":
        args.tokenizer = str(make_hf_tokenizer(work, 16384))
    if not Path(args.tokenizer).is_file():
        raise SystemExit(f"{args.tokenizer}: not found; run `mamba-train prep data_prep/quickstart.yaml` first "
                         "or pass --tokenizer")
    print(f"bench_prep | {args.mb:g} MB of text in {len(files)} jsonl.zst shards | tokenizer {args.tokenizer} | "
          f"{args.workers} workers | {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"(shared with other jobs; load average {os.getloadavg()[0]:.2f} at start)")
    results = {}
    for side in SIDES[:1] if args.ours_only else SIDES:
        scratch = work / f"out-{side}"
        subprocess.run(["rm", "-rf", str(scratch)], check=True)
        scratch.mkdir()
        results[side] = measure(side, args, files, scratch)
    names = {"ours": "ours (shards)", "datasets": f"datasets.map num_proc={args.workers}",
             "datasets_our_encoder": "  same, with our encoder"}
    print(f"{'':<28} {'MB/s':>8} {'seconds':>8} {'CPU s':>7} {'tokens':>12} {'peak RSS GiB':>13} {'load':>5}")
    for side, r in results.items():
        print(f"{names[side]:<28} {r['mb_per_s']:>8.2f} {r['seconds']:>8.1f} {r['cpu_seconds']:>7.1f} "
              f"{r['tokens']:>12,} {r['peak_rss_gib']:>13.2f} {r['load_before']:>5.2f}")
    if "datasets" in results:
        assert len({r["tokens_sha256"] for r in results.values()}) == 1, "the sides disagree on the tokens"
        print(f"ours / datasets: {results['ours']['mb_per_s'] / results['datasets']['mb_per_s']:.2f}x "
              f"(datasets: load_dataset {results['datasets']['load_seconds']:.1f} s + map "
              f"{results['datasets']['map_seconds']:.1f} s); with our encoder in datasets.map: "
              f"{results['ours']['mb_per_s'] / results['datasets_our_encoder']['mb_per_s']:.2f}x")
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {}
    run_key = f"{args.mb:g}mb_{Path(args.tokenizer).suffix.lstrip('.')}" + ("_ours_only" if args.ours_only else "")
    record.setdefault("runs", {})[run_key] = {"mb": args.mb, "workers": args.workers, "tokenizer": args.tokenizer,
                                              "cpus": os.cpu_count(), "shared_machine": True, **results}
    # one line per run, kept across runs: on a shared machine a single figure says little
    record.setdefault("history", []).append({"utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "run": run_key,
                                             **{f"{side}_mb_per_s": round(r["mb_per_s"], 2)
                                                for side, r in results.items()},
                                             "load_before": round(results["ours"]["load_before"], 2)})
    if not args.ours_only and Path(args.tokenizer).suffix == ".model":  # the headline: the quickstart's kind
        record["ours_mb_per_s"] = results["ours"]["mb_per_s"]
        record["datasets_map_mb_per_s"] = results["datasets"]["mb_per_s"]
    if args.ours_only or "peak_rss_gib" not in record:
        record["peak_rss_gib"] = results["ours"]["peak_rss_gib"]
        record["peak_rss_input_mb"] = args.mb
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
