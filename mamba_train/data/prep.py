"""`mamba-train prep RECIPE.yaml`: corpus → tokenizer → indexed train/valid datasets.

Steps: build the local corpus (if the recipe asks for one) → train a sentencepiece
tokenizer (or copy an existing one) → tokenize in worker processes → write `train` and
`valid` indexed datasets (EOD after every document, .docs.npz sidecar) and `prep.json`.

Everything is written into a temporary directory beside the output and renamed into
place at the end, so a failure leaves an existing output untouched. The train/valid
split is a hash of (seed, document index): the same documents land in the same split
whatever the worker count or run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from mamba_train.config import ConfigError, from_mapping
from mamba_train.data.corpus import LOCAL_SUBSETS, build_local_corpus, expand_sources, read_documents
from mamba_train.data.indexed import DataError, IndexedDatasetWriter, token_dtype_for_vocab
from mamba_train.data.tokenizer import load_tokenizer, train_sentencepiece


class PrepError(DataError):
    """A recipe or input that cannot be prepared; the message names the key or file."""


@dataclass
class LocalCorpusRecipe:
    max_mb: float = 12.0
    subsets: list[str] | None = None  # None: all of corpus.LOCAL_SUBSETS


@dataclass
class SourcesRecipe:
    local_corpus: LocalCorpusRecipe | None = None
    files: list[str] = field(default_factory=list)  # .jsonl / .jsonl.zst / .txt paths or globs


@dataclass
class TokenizerRecipe:
    path: str | None = None  # an existing .model or tokenizer.json, copied as is; else train:
    vocab_size: int = 4096
    model_type: str = "bpe"
    sample_docs: int = 20000


@dataclass
class Recipe:
    output: str = "data/quickstart"
    sources: SourcesRecipe = field(default_factory=SourcesRecipe)
    tokenizer: TokenizerRecipe = field(default_factory=TokenizerRecipe)
    valid_fraction: float = 0.02
    seed: int = 1234
    chunk_bytes: int = 1 << 20  # text per worker task: bounds memory and keeps workers busy

    def validate(self) -> None:
        if self.sources.local_corpus is None and not self.sources.files:
            raise PrepError("sources: give a local_corpus block, files, or both")
        if self.sources.local_corpus is not None:
            corpus = self.sources.local_corpus
            if corpus.max_mb <= 0:
                raise PrepError(f"sources.local_corpus.max_mb: expected a positive number, found {corpus.max_mb}")
            unknown = [name for name in corpus.subsets or [] if name not in LOCAL_SUBSETS]
            if unknown:
                raise PrepError(f"sources.local_corpus.subsets: unknown subset {unknown[0]!r} "
                                f"(known: {', '.join(LOCAL_SUBSETS)})")
        if self.tokenizer.path is None:
            if self.tokenizer.model_type not in ("bpe", "unigram"):
                raise PrepError(f"tokenizer.model_type: expected 'bpe' or 'unigram', found {self.tokenizer.model_type!r}")
            if not 260 <= self.tokenizer.vocab_size <= 2**31 - 1:
                raise PrepError(f"tokenizer.vocab_size: expected at least 260 (256 byte pieces + specials), "
                                f"found {self.tokenizer.vocab_size}")
            if self.tokenizer.sample_docs <= 0:
                raise PrepError(f"tokenizer.sample_docs: expected a positive integer, found {self.tokenizer.sample_docs}")
        if not 0 <= self.valid_fraction < 1:
            raise PrepError(f"valid_fraction: expected a number in [0, 1), found {self.valid_fraction}")
        if self.chunk_bytes <= 0:
            raise PrepError(f"chunk_bytes: expected a positive integer, found {self.chunk_bytes}")


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"recipe not found: {path}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if isinstance(raw.get("sources"), list):  # shorthand: `sources: [a.jsonl.zst, b/*.txt]`
        raw["sources"] = {"files": raw["sources"]}
    try:
        recipe = from_mapping(Recipe, raw)
        recipe.validate()
    except (ConfigError, PrepError) as error:
        raise PrepError(f"{path}: {error}") from None
    return recipe


# Preparing ------------------------------------------------------------------------------

def prepare(recipe: Recipe, out: str | os.PathLike | None = None, force: bool = False,
            workers: int | None = None) -> dict:
    """Run the recipe into `out` (default recipe.output); returns the prep.json summary."""
    recipe.validate()
    out = Path(out or recipe.output)
    if out.exists() and not force:
        built = _read_summary(out)
        if built is not None and built.get("recipe") == json.loads(json.dumps(dataclasses.asdict(recipe))):
            _log(f"{out} is up to date (built from this recipe); --force rebuilds it")
            return built
        raise PrepError(f"{out} already exists and was not built from this recipe; pass --force to replace it")
    workers = max(1, workers or os.cpu_count() or 1)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = _prepare_into(recipe, tmp, workers)
        summary["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "prep.json").write_text(json.dumps(summary, indent=1) + "\n")
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _read_summary(out: Path) -> dict | None:
    try:
        return json.loads((out / "prep.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _prepare_into(recipe: Recipe, tmp: Path, workers: int) -> dict:
    files, corpus = [], None
    if recipe.sources.local_corpus is not None:
        local = recipe.sources.local_corpus
        _log(f"building the local corpus ({local.max_mb} MB) ...")
        corpus = build_local_corpus(tmp / "corpus", local.max_mb, local.subsets)
        files += [tmp / "corpus" / entry["file"] for entry in corpus["subsets"].values()]
    try:
        files += expand_sources(recipe.sources.files)
    except DataError as error:
        raise PrepError(f"sources.files: {error}") from None

    def documents() -> Iterator[tuple[str, str]]:
        for path in files:
            for text, subset in read_documents(path):
                if text:  # an empty document would be a lone EOD: nothing to learn from
                    yield text, subset

    n_docs = None
    if recipe.tokenizer.path is None:
        _log(f"training a sentencepiece {recipe.tokenizer.model_type} tokenizer "
             f"(vocab {recipe.tokenizer.vocab_size}) ...")
        counter = _Counter(documents())
        tokenizer = _train(recipe, counter, tmp, files)
        n_docs = counter.count
    else:
        tokenizer = _copy_tokenizer(Path(recipe.tokenizer.path), tmp)
    dtype = token_dtype_for_vocab(tokenizer.vocab_size)
    _log(f"tokenizing with {workers} worker process{'es' if workers > 1 else ''} ...")

    splits = {"train": _new_split_summary()}
    if recipe.valid_fraction > 0:
        splits["valid"] = _new_split_summary()
    with IndexedDatasetWriter(tmp / "train", dtype) as train_writer, \
            IndexedDatasetWriter(tmp / "valid", dtype) as valid_writer, \
            tqdm(total=n_docs, unit="doc", desc="tokenizing", disable=None) as progress:
        for index, (subset, utf8_bytes, tokens) in enumerate(
                _tokenize(documents(), tokenizer.path, workers, recipe.chunk_bytes)):
            split = "valid" if _in_valid(recipe.seed, index, recipe.valid_fraction) else "train"
            (valid_writer if split == "valid" else train_writer).add_document(tokens, utf8_bytes, subset)
            _count(splits[split], subset, utf8_bytes, tokens.size)
            progress.update(1)
            if index % 256 == 0:
                progress.set_postfix(tokens=f"{splits['train']['tokens'] + splits.get('valid', {}).get('tokens', 0):,}")
        if not sum(split["documents"] for split in splits.values()):
            raise PrepError(f"no documents in the sources ({_describe(files)})")
        for name, split in splits.items():
            if not split["documents"]:
                raise PrepError(f"no documents for the {name} split: valid_fraction={recipe.valid_fraction} of "
                                f"{index + 1} documents; change it or add data")
    if "valid" not in splits:
        for suffix in (".bin", ".idx", ".docs.npz"):
            (tmp / f"valid{suffix}").unlink(missing_ok=True)
    return {
        "tokenizer": {"file": tokenizer.path.name, "kind": type(tokenizer).__name__,
                      "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id},
        "token_dtype": str(dtype),
        "splits": splits,
        "subsets": sorted({name for split in splits.values() for name in split["subsets"]}),
        "sources": [str(path.relative_to(tmp)) if path.is_relative_to(tmp) else str(path) for path in files],
        "local_corpus": corpus,
        "recipe": dataclasses.asdict(recipe),
    }


def _train(recipe: Recipe, documents: _Counter, tmp: Path, files: list[Path]):
    config = recipe.tokenizer
    try:
        return train_sentencepiece((text for text, _ in documents), tmp / "tokenizer", config.vocab_size,
                                   model_type=config.model_type, sample_docs=config.sample_docs, seed=recipe.seed)
    except DataError:
        if documents.count == 0:
            raise PrepError(f"no documents in the sources ({_describe(files)})") from None
        raise


def _copy_tokenizer(path: Path, tmp: Path):
    source = load_tokenizer(path).path  # resolves a directory to its tokenizer file
    name = "tokenizer.model" if source.suffix == ".model" else "tokenizer.json"
    shutil.copyfile(source, tmp / name)
    if (source.parent / "tokenizer_config.json").is_file() and name == "tokenizer.json":
        shutil.copyfile(source.parent / "tokenizer_config.json", tmp / "tokenizer_config.json")
    return load_tokenizer(tmp / name)


def _in_valid(seed: int, index: int, fraction: float) -> bool:
    """A per-document coin that depends on nothing but (seed, index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


# Tokenizing in worker processes -------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _tokenize_chunk(texts: list[str]) -> list[np.ndarray]:
    """Token arrays (int64) of a chunk of documents, each with EOD appended."""
    eod = _worker_tokenizer.eod_id
    return [np.array(ids + [eod], dtype=np.int64) for ids in _worker_tokenizer.encode_batch(texts)]


def _tokenize(documents: Iterator[tuple[str, str]], tokenizer_path: Path, workers: int,
              chunk_bytes: int) -> Iterator[tuple[str, int, np.ndarray]]:
    """(subset, utf8_bytes, tokens) per document, in input order.

    Reading stays in this process (so its errors name file:line); chunks of about
    `chunk_bytes` of text go to the workers, at most 2 per worker in flight, so memory
    stays bounded however large the input.
    """
    chunks = _chunks(documents, chunk_bytes)
    if workers == 1:
        _init_worker(str(tokenizer_path))
        for texts, subsets, sizes in chunks:
            yield from zip(subsets, sizes, _tokenize_chunk(texts))
        return
    # forkserver/spawn, not fork: the parent may hold threads (torch, tqdm) and locks
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":  # import this module (and its dependencies) once, in the server
        context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(str(tokenizer_path),)) as pool:
        in_flight = deque()
        for texts, subsets, sizes in chunks:
            in_flight.append((pool.submit(_tokenize_chunk, texts), subsets, sizes))
            if len(in_flight) >= 2 * workers:
                future, subsets, sizes = in_flight.popleft()
                yield from zip(subsets, sizes, future.result())
        while in_flight:
            future, subsets, sizes = in_flight.popleft()
            yield from zip(subsets, sizes, future.result())


def _chunks(documents: Iterator[tuple[str, str]], chunk_bytes: int) -> Iterator[tuple[list, list, list]]:
    texts, subsets, sizes, total = [], [], [], 0
    for text, subset in documents:
        texts.append(text)
        subsets.append(subset)
        sizes.append(len(text.encode("utf-8")))
        total += sizes[-1]
        if total >= chunk_bytes or len(texts) >= 4096:
            yield texts, subsets, sizes
            texts, subsets, sizes, total = [], [], [], 0
    if texts:
        yield texts, subsets, sizes


# Bookkeeping ------------------------------------------------------------------------------

class _Counter:
    """Passes an iterator through and counts it (the document total for the progress bar)."""

    def __init__(self, items):
        self._items, self.count = items, 0

    def __iter__(self):
        for item in self._items:
            self.count += 1
            yield item


def _new_split_summary() -> dict:
    return {"documents": 0, "tokens": 0, "utf8_bytes": 0, "subsets": {}}


def _count(split: dict, subset: str, utf8_bytes: int, tokens: int) -> None:
    for entry in (split, split["subsets"].setdefault(subset, {"documents": 0, "tokens": 0, "utf8_bytes": 0})):
        entry["documents"] += 1
        entry["tokens"] += tokens
        entry["utf8_bytes"] += utf8_bytes


def _describe(files: list[Path]) -> str:
    return ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "") or "none"


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp → out; an old out is moved aside first and removed only after."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _log(message: str) -> None:
    print(f"prep: {message}", file=sys.stderr, flush=True)


# CLI ------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe, e.g. data_prep/quickstart.yaml")
    parser.add_argument("--out", help="output directory (default: the recipe's `output`)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer processes (default: one per CPU core)")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    out = Path(args.out or recipe.output)
    summary = prepare(recipe, out, force=args.force, workers=args.workers)
    for name, split in summary["splits"].items():
        print(f"{out}/{name}: {split['documents']:,} documents, {split['tokens']:,} tokens, "
              f"{split['utf8_bytes'] / 1e6:.1f} MB of text")
    print(f"{out}/{summary['tokenizer']['file']}: vocab {summary['tokenizer']['vocab_size']}, "
          f"eod {summary['tokenizer']['eod_id']} | {summary['seconds']} s")
    return 0
